"""Baseline loader: torchvision ImageFolder + DataLoader with the same augmentation as the DALI graph.

Workers decode and augment with PIL and hand over uint8 CHW tensors (a quarter of the bytes of float32);
the conversion to float, the mean/std normalisation, the dtype and channels_last happen after the
(non-blocking, pinned) transfer to the device, on the GPU when there is one.

Images are turned upright by their EXIF orientation (:func:`open_rgb`), as DALI's decoders do, and a file
that does not decode is a DamagedFiles error naming it and the fix, as in the DALI loader.

The training resolution may change between epochs (data.train_res). The workers are persistent, each with
its own copy of the dataset made when it started, so the size cannot be set on the dataset: the train
sampler hands out ``(index, size)`` pairs instead, and the dataset crops each image to the size it comes with.
"""
from __future__ import annotations

import functools
import os
import signal
from typing import Iterator

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from fdmobilenet.cli import CorruptImageError
from fdmobilenet.config import DataConfig
from pipelines.base import BatchLoader, image_dtype
from pipelines.splits import CheckedSplit, DamagedFiles


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """An image file as RGB, turned by its EXIF orientation tag as a viewer (and DALI's decoder) shows it:
    a phone photo stored sideways with orientation 6 comes out upright. PIL's own errors pass through."""
    with Image.open(path) as img:
        return upright_rgb(img)


def upright_rgb(img: Image.Image) -> Image.Image:
    """What :func:`open_rgb` makes of an opened image: EXIF orientation applied, then RGB (CMYK, grayscale,
    palette and alpha images converted as PIL converts them)."""
    return ImageOps.exif_transpose(img).convert("RGB")


def load_image(path: str, folder: str) -> Image.Image:
    """ImageFolder's loader: :func:`open_rgb`, with a file that does not decode reported as the DALI loader
    reports it (``folder``: the split, for the message)."""
    try:
        return open_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:   # UnidentifiedImageError is an OSError
        what = "empty file, 0 bytes" if os.path.getsize(path) == 0 else f"truncated or corrupt image: {e}"
        raise DamagedFiles.undecodable(path, what, folder) from e


def train_transform(data: DataConfig, size: int) -> T.Compose:
    """The training augmentation, cropping to ``size`` px."""
    if data.train_crop == "random_resized":
        ops = [T.RandomResizedCrop(size, scale=data.scale, ratio=data.ratio)]
    else:
        ops = [T.Resize(data.train_resize), T.RandomCrop(size)]
    if data.color_jitter:
        ops.append(T.ColorJitter(*data.color_jitter))
    if data.hflip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + [T.PILToTensor()])


def val_transform(data: DataConfig) -> T.Compose:
    return T.Compose([T.Resize(data.val_resize), T.CenterCrop(data.val_crop), T.PILToTensor()])


class CheckedImageFolder(ImageFolder):
    """torchvision's ImageFolder over the listing that pipelines.splits checked (clear errors for missing or
    empty folders, damaged files refused or, with ``on_corrupt: skip``, dropped) - the same files, order and
    labels as the DALI reader."""

    def __init__(self, split: CheckedSplit, transform):
        self._checked = split.samples
        folder = str(split.folder)
        super().__init__(folder, transform, loader=functools.partial(load_image, folder=folder))

    def make_dataset(self, *args, **kwargs) -> list[tuple[str, int]]:
        return self._checked


def ignore_sigint(worker_id: int) -> None:
    """A DataLoader worker's start: a Ctrl-C in a terminal reaches the workers too, and the trainer decides what
    it does (a checkpoint at a step the ranks agree on); a worker left to torch's default would end at once and
    fail the next batch. The workers end with their process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
class SizedTrainImages(CheckedImageFolder):
    """The training images, indexed by ``(index, size)``: image ``index`` augmented and cropped to ``size`` px
    (see the module docstring)."""

    def __init__(self, split: CheckedSplit, data: DataConfig):
        super().__init__(split, transform=None)
        self._data = data
        self._transforms: dict[int, T.Compose] = {}

    def __getitem__(self, index_size: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, size = index_size
        if size not in self._transforms:
            self._transforms[size] = train_transform(self._data, size)
        path, label = self.samples[index]
        return self._transforms[size](self.loader(path)), label


class WithSize(torch.utils.data.Sampler):
    """``sampler``'s indices, each paired with ``size`` (set per epoch)."""

    def __init__(self, sampler: torch.utils.data.Sampler, size: int):
        self.sampler, self.size = sampler, size

    def __iter__(self):
        return ((index, self.size) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class TorchvisionLoader(BatchLoader):
    """ImageFolder + DistributedSampler (rank, world_size; reshuffled by ``set_epoch``) + DataLoader with
    ``data.num_threads`` persistent workers. Train drops the last partial batch; val keeps it, and its
    sampler is not padded, so every image is counted exactly once across ranks."""

    def __init__(self, data: DataConfig, split: CheckedSplit, batch_size: int, *, rank: int, world_size: int,
                 device: torch.device):
        super().__init__(data, split.name, split.total, batch_size, rank, world_size, device,
                         where=f"{split.folder} (torchvision)")
        self.dtype, self.split = image_dtype(data, device), split
        if self.train:
            dataset = SizedTrainImages(split, data)
            # drop_last: every rank gets total // world_size indices (the smallest share), as DALI's train
            self.sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=data.seed,
                                              drop_last=True)
            self._sized = WithSize(self.sampler, self.image_size)
        else:
            dataset = CheckedImageFolder(split, val_transform(data))
            self.sampler = range(*self.shard)   # a contiguous, unpadded slice per rank: the split DALI's val uses
        # val: a generator of its own, because starting an iterator draws the workers' base seed from it -
        # from torch's global generator by default, so evaluating would shift the training augmentations
        # that follow (and a resumed run, whose evaluation may have been cut short, would not repeat them)
        self._loader = DataLoader(dataset, batch_size=batch_size, sampler=self._sized if self.train else self.sampler,
                                  drop_last=self.train,
                                  num_workers=data.num_threads, persistent_workers=data.num_threads > 0,
                                  pin_memory=device.type == "cuda",
                                  generator=None if self.train else torch.Generator(), worker_init_fn=ignore_sigint,
                                  prefetch_factor=data.prefetch_queue_depth if data.num_threads > 0 else None)
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(data.mean, device=device).view(shape) * 255
        self._std = torch.tensor(data.std, device=device).view(shape) * 255

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.train:
            self.sampler.set_epoch(epoch)
            self._sized.size = self.image_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for step, (images, labels) in enumerate(self._loader):
                if step == len(self):
                    break
                images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                images = ((images.float() - self._mean) / self._std).to(self.dtype)
                yield images, labels.to(self.device, non_blocking=True)
        except CorruptImageError as e:
            # From a worker process the DataLoader re-raises it with the worker's traceback in the message;
            # the message itself is its last line.
            raise DamagedFiles(str(e).rsplit(f"{type(e).__name__}: ", 1)[-1].strip()) from None
