"""Helpers for the loader tests (test_pipelines_dali, test_pipelines_loaders): tiny data configs over the
conftest photo folders, and the labels one epoch yields."""
from __future__ import annotations

from pathlib import Path

from fdmobilenet.config import DataConfig
from pipelines import BatchLoader


def small(root: Path, num_classes: int, loader: str, **kw) -> DataConfig:
    """Tiny crops, one thread: the test machine has 2 shared cores."""
    base = dict(root=str(root), num_classes=num_classes, loader=loader, crop_size=32, train_resize=40,
                val_resize=40, val_crop=32, num_threads=1, prefetch_queue_depth=1)
    return DataConfig(**{**base, **kw})


def epoch_labels(loader: BatchLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [label for _, labels in loader for label in labels.tolist()]
