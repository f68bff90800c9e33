"""Synthetic loader: one random batch made on the device once and handed out ``len(self)`` times.

It measures the trainer without any data loading. Its epoch is ImageNet-1k's (1,281,167 train / 50,000 val
images split over the ranks like the real loaders); ``train.steps_per_epoch`` caps it for short runs.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from fdmobilenet.config import DataConfig
from pipelines.base import IMAGENET_SIZES, BatchLoader, image_dtype, shard_bounds, train_steps


class SyntheticLoader(BatchLoader):
    def __init__(self, data: DataConfig, split: str, batch_size: int, *, rank: int, world_size: int,
                 device: torch.device, dataset_size: int | None = None):
        self.batch_size, self.device = batch_size, device
        total = dataset_size if dataset_size is not None else IMAGENET_SIZES[split]
        if split == "train":
            self._steps = train_steps(total, batch_size, world_size, f"synthetic {split} ({total} images)")
            self.num_samples = self._steps * batch_size
            last = batch_size
        else:
            begin, end = shard_bounds(total, rank, world_size)
            self.num_samples = end - begin
            self._steps = math.ceil(self.num_samples / batch_size)
            last = self.num_samples - (self._steps - 1) * batch_size
        size = data.crop_size if split == "train" else data.val_crop
        g = torch.Generator(device=device).manual_seed(data.seed + rank)
        self._images = torch.randn(batch_size, 3, size, size, generator=g, device=device).to(
            image_dtype(data, device)).contiguous(memory_format=torch.channels_last)
        self._labels = torch.randint(0, data.num_classes, (batch_size,), generator=g, device=device)
        self._last = last   # val: the last batch is the remainder, as with real data

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(self._steps):
            if step == self._steps - 1 and self._last != self.batch_size:
                yield self._images[:self._last], self._labels[:self._last]
            else:
                yield self._images, self._labels
