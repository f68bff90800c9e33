"""The batch interface every loader satisfies, and the helpers the loaders share.

A trainer sees only :class:`BatchLoader`: ``len(loader)`` steps per epoch on this rank, ``iter(loader)``
yielding ``(images, labels)`` - images float NCHW in channels_last memory on the loader's device, labels
int64 on the same device - ``set_epoch(epoch)`` before each epoch, and ``state_dict()`` /
``load_state_dict()`` for the reader position (``{}`` where a loader has none to save).
"""
from __future__ import annotations

import abc
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from fdmobilenet.config import DataConfig

# What the synthetic loader pretends to be: ImageNet-1k (ILSVRC-2012) train / val sizes.
IMAGENET_SIZES = {"train": 1_281_167, "val": 50_000}


class DataError(ValueError):
    """The data on disk is not what the config promises; the message names the path and the fix."""


class CorruptImageError(RuntimeError):
    """An image could not be decoded during an epoch; the message names the file."""


class BatchLoader(abc.ABC):
    """One epoch of ``(images, labels)`` batches for this rank; see the module docstring."""

    batch_size: int      # per rank
    num_samples: int     # images this rank sees per epoch (val: exact, no padding duplicates)
    device: torch.device

    @abc.abstractmethod
    def __len__(self) -> int:
        """Steps per epoch on this rank."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch."""

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch; loaders that shuffle use it for the epoch's order."""

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
                        f"{smallest}), so a rank would get no full batch; use a smaller optim.batch_size, "
                        f"fewer ranks, or more data")
    return smallest // batch_size


def split_dir(data: DataConfig, split: str) -> Path:
    """``{root}/{train_split}`` or ``{root}/{val_split}``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return Path(data.root) / (data.train_split if split == "train" else data.val_split)


# ----------------------------------------------------------------------------------------- ImageFolder
def _expected(folder: Path) -> str:
    return f"expected {folder}/<class>/<image>.jpg (one sub-folder per class, as torchvision ImageFolder)"


def check_split_folder(folder: Path) -> None:
    """The split folder exists and holds class sub-folders; errors say what was expected and what to do."""
    if not folder.is_dir():
        hint = ("the data root does not exist" if not folder.parent.is_dir()
                else f"it holds {sorted(p.name for p in folder.parent.iterdir())[:10]}")
        raise DataError(f"data folder {folder} not found ({hint}); {_expected(folder)}. Set data.root / "
                        f"data.train_split / data.val_split, or make a small demo set with "
                        f"`python -m pipelines.demo_data`")
    if not any(p.is_dir() for p in folder.iterdir()):
        raise DataError(f"data folder {folder} has no class sub-folders; {_expected(folder)}")


def check_classes(folder: Path, classes: list[str], labels: list[int], num_classes: int) -> None:
    """Every class folder holds at least one image, and the class count matches data.num_classes."""
    counts = [0] * len(classes)
    for label in labels:
        counts[label] += 1
    empty = [classes[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"empty class folder(s) in {folder}: {', '.join(str(folder / c) for c in empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''} ({len(empty)} of {len(classes)}); "
                        f"{_expected(folder)} with extensions {', '.join(IMG_EXTENSIONS)}. Add images or "
                        f"remove the folder (the class indices are the sorted folder names)")
    if len(classes) != num_classes:
        raise DataError(f"{folder} has {len(classes)} class folders but data.num_classes is {num_classes}; "
                        f"set data.num_classes={len(classes)} (labels are indices of the sorted folder names)")


def folder_samples(data: DataConfig, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(path, label), ...])`` of one split, in torchvision ImageFolder order and labelling,
    checked (see :func:`check_split_folder`, :func:`check_classes`); with ``data.on_corrupt == 'skip'`` the
    files that do not decode are dropped (with a warning that lists them)."""
    folder = split_dir(data, split)
    check_split_folder(folder)
    classes, class_to_idx = find_classes(str(folder))
    samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if data.on_corrupt == "skip":
        samples = drop_unreadable(folder, samples, data.num_threads)
    else:
        refuse_cut_short_jpegs([(path, path, 0, None) for path, _ in samples], folder,
                               "replace or delete them, or set data.on_corrupt=skip")
    check_classes(folder, classes, [label for _, label in samples], data.num_classes)
    return classes, samples


def drop_unreadable(folder: Path, samples: list[tuple[str, int]], workers: int) -> list[tuple[str, int]]:
    """``samples`` without the files pipelines.verify finds undecodable (every file is fully decoded once,
    so this costs about one CPU epoch of JPEG decoding; run ``python -m pipelines.verify`` and fix the data
    instead where that matters)."""
    from pipelines.verify import check_tree   # H2b's checker: full PIL decode, parallel

    _, problems, _ = check_tree(folder, workers)
    bad = {p.path for p in problems if p.severity == "error"}
    if not bad:
        return samples
    kept = [s for s in samples if s[0] not in bad]
    dropped = sorted(bad & {path for path, _ in samples})
    if dropped:
        warnings.warn(f"data.on_corrupt=skip: dropped {len(dropped)} unreadable file(s) from {folder}: "
                      f"{', '.join(dropped[:10])}{' ...' if len(dropped) > 10 else ''}", stacklevel=2)
    return kept


# -------------------------------------------------------------------------------------- damaged JPEGs
Member = tuple[str, str, int, "int | None"]   # (name for messages, file, byte offset, size or None = whole file)
JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
TAIL_BYTES = 64          # room for the zero padding some writers put after the end-of-image marker
HEADER_BYTES = 1 << 16   # JPEG headers (tables, frame, EXIF) nearly always fit; longer ones are read whole


def _decodes(data: bytes, headers_only: bool = False) -> bool:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:   # open() parses every marker up to the scan data
            if not headers_only:
                im.load()
        return True
    except Exception:    # any failure to decode is the answer, whatever PIL calls it
        return False


def _unparsable(item: Member) -> bool:
    _, path, offset, size = item
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(HEADER_BYTES if size is None else min(size, HEADER_BYTES))
        if _decodes(head, headers_only=True):
            return False
        if len(head) == HEADER_BYTES:            # headers longer than the first piece: read it all
            f.seek(offset)
            return not _decodes(f.read(-1 if size is None else size), headers_only=True)
    return True


def find_unparsable(items: list[Member], workers: int) -> list[str]:
    """Names of the images whose headers PIL cannot parse - the failure that DALI's decoders report without
    a file name. Reads up to 64 KiB of each file in ``workers`` threads (~120 us per file here); meant for
    that error path, not for every start. Threads, not a fork Pool: this runs inside the training process,
    whose DALI / torch threads can hold locks at fork time (a forked child then waited forever)."""
    workers = max(1, min(workers, len(items) // 256))
    if workers == 1:
        flags = [_unparsable(item) for item in items]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            flags = list(pool.map(_unparsable, items))
    return [item[0] for item, bad in zip(items, flags) if bad]


def jpeg_cut_short(path: str, offset: int = 0, size: int | None = None) -> bool:
    """True for a JPEG (``size`` bytes at ``offset`` of ``path``; the whole file by default) whose data ends
    before its end-of-image marker - a truncated file - confirmed by a full decode. Costs two small reads
    for a sound JPEG; files that are not JPEGs are not judged here (the decoders report them)."""
    with open(path, "rb") as f:
        if size is None:
            size = os.fstat(f.fileno()).st_size
        f.seek(offset)
        if size < 4 or f.read(2) != JPEG_SOI:
            return size < 4
        f.seek(offset + max(2, size - TAIL_BYTES))
        if f.read(min(TAIL_BYTES, size - 2)).rstrip(b"\x00\r\n\t ").endswith(JPEG_EOI):
            return False
        f.seek(offset)                  # no marker at the end: decode it to be sure (rare: trailing data)
        return not _decodes(f.read(size))


def refuse_cut_short_jpegs(items: list[Member], where: Path, fix: str) -> None:
    """Raise CorruptImageError naming every truncated JPEG among ``items`` = (name, path, offset, size).

    Why up front: the GPU decoders (nvJPEG and the hardware JPEG decoder behind DALI's 'mixed' decode)
    decode a truncated JPEG without an error, grey where the data is missing - training would go on with a
    damaged image. The CPU decoder (libjpeg-turbo) fails on it, and DALI then names the file (see
    pipelines.dali), but only when the epoch reaches it. The check reads two small pieces of each file,
    in threads (I/O bound)."""
    def check(chunk):   # (name, empty) of the cut-short ones; a 0-byte file is empty, not truncated
        return [(name, (os.path.getsize(path) if size is None else size) == 0)
                for name, path, offset, size in chunk if jpeg_cut_short(path, offset, size)]

    chunks = [items[i:i + 512] for i in range(0, len(items), 512)]
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(chunks)))) as pool:
        bad = sorted(found for founds in pool.map(check, chunks) for found in founds)
    kinds = [(what, [name for name, empty in bad if empty == is_empty])
             for what, is_empty in (("truncated JPEG(s)", False), ("empty file(s) (0 bytes)", True))]
    if bad:
        raise CorruptImageError("; ".join(f"{len(names)} {what} in {where}: {', '.join(names[:10])}"
                                          f"{' ...' if len(names) > 10 else ''}" for what, names in kinds if names)
                                + f"; {fix}")
