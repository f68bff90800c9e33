"""The batch interface every loader satisfies, and what the loaders share.

A trainer sees only :class:`BatchLoader`: ``len(loader)`` steps per epoch on this rank, ``iter(loader)``
yielding ``(images, labels)`` - images float NCHW in channels_last memory on the loader's device, labels
int64 on the same device - ``set_epoch(epoch)`` before each epoch, and ``state_dict()`` /
``load_state_dict()`` for the reader position (``{}`` where a loader has none to save).

**The epoch's resolution**: train batches are ``data.train_size(epoch)`` px square (data.crop_size, or where
the data.train_res ramp has got to), val batches data.val_crop; ``image_size`` is the size of the epoch
in progress. ``set_epoch`` is where a loader follows a change of training resolution.

**The epoch's order** (what ``set_epoch`` guarantees): a loader *without* reader state (torchvision, synthetic)
gives for ``set_epoch(e)`` an order that is a function of (data.seed, e) alone - the same in a restarted
process - so a resumed run replays epoch e and drops the batches already trained (engine.epoch_batches). A
loader *with* reader state (DALI's train loader) continues from its ``state_dict`` instead, whatever epoch it
is told; it reshuffles by itself at the end of each of its own epochs, and ``set_epoch`` before its first
batch picks its shuffle seed (data.seed + e), so that a run resumed without reader state does not replay
epoch 0's order. Either way every epoch is a new permutation of the whole split, each rank reading a
disjoint part of it.
"""
from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Iterator

import torch

from fdmobilenet.cli import DataError
from fdmobilenet.config import DataConfig


class BatchLoader(abc.ABC):
    """One epoch of ``(images, labels)`` batches for this rank; see the module docstring.

    The step count is the same for every loader: train yields the smallest rank's full batches on every rank
    (DDP needs equal step counts; the few images past them are not trained on that epoch), val every image of
    this rank's contiguous slice once (:func:`shard_bounds`), its last batch possibly smaller.
    """

    split = None   # the checked split a file loader reads (pipelines.splits.CheckedSplit); None: synthetic

    def __init__(self, data: DataConfig, split: str, total: int, batch_size: int, rank: int, world_size: int,
                 device: torch.device, where: str):
        """``total``: the split's images; ``where`` names the data in errors."""
        self.train = split == "train"
        self.batch_size = batch_size    # per rank
        self.device = device
        self._sizes = data.train_size if self.train else (lambda epoch: data.val_crop)
        self.image_size = self._sizes(0)   # px, of the epoch in progress (the first until set_epoch says)
        if self.train:
            self._steps = train_steps(total, batch_size, world_size, where)
            self.num_samples = self._steps * batch_size   # images this rank trains on per epoch
        else:
            self.shard = shard_bounds(total, rank, world_size)
            self.num_samples = self.shard[1] - self.shard[0]   # exact: no padding duplicates
            self._steps = math.ceil(self.num_samples / batch_size)

    def __len__(self) -> int:
        """Steps per epoch on this rank."""
        return self._steps

    @abc.abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch."""

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch with the epoch in progress (from 0); what it guarantees: the module docstring.
        Loaders that override it call it first: it sets ``image_size``."""
        self.image_size = self._sizes(epoch)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no reader state, but was given keys "
                             f"{sorted(state)}; was the checkpoint written with another data.loader?")


# --------------------------------------------------------------------------------------------- placement
def image_dtype(data: DataConfig, device: torch.device) -> torch.dtype:
    """data.dtype, with 'auto' = float16 on CUDA (what the GPU consumes under AMP), float32 on CPU."""
    if data.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "float32": torch.float32}[data.dtype]


def nchw_channels_last(nhwc: torch.Tensor) -> torch.Tensor:
    """View an NHWC tensor as NCHW; the view is channels_last-contiguous and shares the storage (no copy)."""
    return nhwc.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------- sharding
def shard_bounds(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[begin, end) of shard ``shard_id``: the split DALI's readers and the DALI iterator use."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


def train_steps(num_samples: int, batch_size: int, num_shards: int, where: str) -> int:
    """Full batches per rank per epoch, the same on every rank (DDP needs equal step counts): the smallest
    shard decides. A batch bigger than that shard is an error naming the sizes."""
    smallest = num_samples // num_shards
    if batch_size > smallest:
        raise DataError(f"{where}: per-rank batch size {batch_size} is larger than the smallest rank's share "
                        f"of the {num_samples} training images ({num_samples} // {num_shards} ranks = "
                        f"{smallest}), so a rank would get no full batch; set optim.batch_size (the global "
                        f"batch) to {smallest * num_shards} or less, or use fewer ranks or more data; the lr "
                        f"scales with it (optim.lr x optim.batch_size / optim.base_batch_size)")
    return smallest // batch_size


def check_split_name(split: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def split_dir(data: DataConfig, split: str) -> Path:
    """``{root}/{train_split}`` or ``{root}/{val_split}``."""
    check_split_name(split)
    return Path(data.root) / (data.train_split if split == "train" else data.val_split)
