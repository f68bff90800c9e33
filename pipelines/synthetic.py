"""Synthetic loader: one random batch made on the device once and handed out ``len(self)`` times.

It measures the trainer without any data loading. Its epoch is ImageNet-1k's (1,281,167 train / 50,000 val
images split over the ranks like the real loaders); ``train.steps_per_epoch`` caps it for short runs. Every
epoch is the same batches, so ``set_epoch`` has nothing to do.
"""
from __future__ import annotations

from typing import Iterator

import torch

from fdmobilenet.config import DataConfig
from pipelines.base import BatchLoader, image_dtype
from pipelines.imagenet import OFFICIAL_COUNTS   # what the synthetic loader pretends to be: ILSVRC-2012's sizes


class SyntheticLoader(BatchLoader):
    def __init__(self, data: DataConfig, split: str, batch_size: int, *, rank: int, world_size: int,
                 device: torch.device):
        total = OFFICIAL_COUNTS[split]
        super().__init__(split, total, batch_size, rank, world_size, device,
                         where=f"synthetic {split} ({total} images)")
        size = data.crop_size if self.train else data.val_crop
        g = torch.Generator(device=device).manual_seed(data.seed + rank)
        self._images = torch.randn(batch_size, 3, size, size, generator=g, device=device).to(
            image_dtype(data, device)).contiguous(memory_format=torch.channels_last)
        self._labels = torch.randint(0, data.num_classes, (batch_size,), generator=g, device=device)
        self._last = self.num_samples - (len(self) - 1) * batch_size   # val: the remainder, as with real data

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(len(self)):
            if step == len(self) - 1 and self._last != self.batch_size:
                yield self._images[:self._last], self._labels[:self._last]
            else:
                yield self._images, self._labels
