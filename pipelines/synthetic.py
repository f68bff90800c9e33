"""Synthetic loader: one random batch made on the device once and handed out ``len(self)`` times.

It measures the trainer without any data loading. Its epoch is ImageNet-1k's (1,281,167 train / 50,000 val
images split over the ranks like the real loaders); ``train.steps_per_epoch`` caps it for short runs. Every
epoch is the same batches, at the epoch's resolution: ``set_epoch`` makes them again when it changes.
"""
from __future__ import annotations

from typing import Iterator

import torch

from fdmobilenet.config import DataConfig
from pipelines.base import BatchLoader, image_dtype
from pipelines.splits import IMAGENET_IMAGES


class SyntheticLoader(BatchLoader):
    def __init__(self, data: DataConfig, split: str, batch_size: int, *, rank: int, world_size: int,
                 device: torch.device):
        total = IMAGENET_IMAGES[split]
        super().__init__(data, split, total, batch_size, rank, world_size, device,
                         where=f"synthetic {split} ({total} images)")
        self._data, self._rank = data, rank
        self._make_batch()
        self._last = self.num_samples - (len(self) - 1) * batch_size   # val: the remainder, as with real data

    def _make_batch(self) -> None:
        """The batch at ``image_size``, from the same seed at every size."""
        data, size, device = self._data, self.image_size, self.device
        g = torch.Generator(device=device).manual_seed(data.seed + self._rank)
        self._images = torch.randn(self.batch_size, 3, size, size, generator=g, device=device).to(
            image_dtype(data, device)).contiguous(memory_format=torch.channels_last)
        self._labels = torch.randint(0, data.num_classes, (self.batch_size,), generator=g, device=device)

    def set_epoch(self, epoch: int) -> None:
        size = self.image_size
        super().set_epoch(epoch)
        if self.image_size != size:
            self._make_batch()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(len(self)):
            if step == len(self) - 1 and self._last != self.batch_size:
                yield self._images[:self._last], self._labels[:self._last]
            else:
                yield self._images, self._labels
