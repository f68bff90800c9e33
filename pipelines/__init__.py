"""Data loaders behind one batch interface (see pipelines.base.BatchLoader); ``build_loader`` picks one.

The loader modules are imported where they are used, not here: ``python -m pipelines.<tool>`` imports this
package first, which should neither load torch for a tool that does not use it nor hold the tool's module
already (runpy would warn that it is found in sys.modules)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fdmobilenet.cli import DataError
from pipelines.defaults import resolve_loader_defaults

if TYPE_CHECKING:
    import torch

    from fdmobilenet.config import DataConfig
    from pipelines.base import BatchLoader

__all__ = ["build_loader", "build_loaders", "resolve_loader_defaults", "BatchLoader"]


def __getattr__(name: str):
    """``pipelines.BatchLoader``: pipelines.base's, loaded on first use (it loads torch)."""
    if name == "BatchLoader":
        from pipelines.base import BatchLoader
        return BatchLoader
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")


def build_loader(data: DataConfig, split: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 local_rank: int = 0, device: torch.device, group=None) -> BatchLoader:
    """The ``split`` ('train' | 'val') loader named by ``data.loader`` (dali | torchvision | synthetic).

    ``batch_size`` is per rank; ``rank`` is the global rank (the shard this process reads), ``world_size``
    the number of shards, ``local_rank`` the GPU on this node (DALI's device_id; ignored on CPU). 'dali'
    runs mixed/GPU ops when ``device.type == 'cuda'`` and the same graph on the CPU otherwise. Loader knobs
    set to ``auto`` get this rank's values first (pipelines.defaults). The file loaders start from the checked
    split (pipelines.splits.check_split), whose check the ranks share over ``group`` (the host-side gloo
    group: every rank builds the same loaders in the same order); without a group each process checks every
    file itself. ``data.num_classes: auto`` is the number of classes of ``split`` here
    (pipelines.splits.resolve_classes); the trainer resolves it once, from the train split.
    """
    from pipelines.base import check_split_name
    from pipelines.splits import check_split, resolve_classes
    check_split_name(split)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive per-rank batch size, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    data, _ = resolve_loader_defaults(data, device)   # the 'auto' loader knobs, for this rank's GPU and CPUs
    if data.num_classes == "auto":
        data, _ = resolve_classes(data, split)
    if data.loader == "synthetic":
        from pipelines.synthetic import SyntheticLoader
        return SyntheticLoader(data, split, batch_size, rank=rank, world_size=world_size, device=device)
    if data.loader == "torchvision" and data.layout != "folder":
        raise DataError(f"data.loader=torchvision reads data.layout=folder (an ImageFolder tree), not "
                        f"{data.layout}; use data.loader=dali for webdataset shards")
    checked = check_split(data, split, rank=rank, world_size=world_size, group=group)
    if data.loader == "dali":
        from pipelines.dali import DaliLoader   # DALI is optional: import it only when asked for
        return DaliLoader(data, checked, batch_size, rank=rank, world_size=world_size, local_rank=local_rank,
                          device=device)
    from pipelines.torchvision_loader import TorchvisionLoader
    return TorchvisionLoader(data, checked, batch_size, rank=rank, world_size=world_size, device=device)


def build_loaders(data: DataConfig, splits: tuple[str, ...], batch_size: int, **kwargs) -> list[BatchLoader]:
    """:func:`build_loader` for each of ``splits``, the damaged files of all of them in one error."""
    from pipelines.splits import each_split
    return each_split(splits, lambda split: build_loader(data, split, batch_size, **kwargs))
