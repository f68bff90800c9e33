"""Checkpoint I/O: atomic saves, the latest/best pair of a run, safe loads, and strict weight loading with
errors that say what to do; what a checkpoint says about its model and the run that wrote it.

Every load goes through ``torch.load(..., weights_only=True)``: a checkpoint is plain tensors and containers,
and a file that needs more than that is refused rather than unpickled (unpickling runs arbitrary code).
``save_checkpoint`` is the one function that writes a checkpoint file.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from fdmobilenet.cli import CheckpointError
from fdmobilenet.config import ExperimentConfig, ModelConfig, from_dict, load_model_ref, read_yaml
from fdmobilenet.model import BLOCKS

# Wrappers that prefix parameter names: DistributedDataParallel (``module.``) and torch.compile
# (``_orig_mod.``), possibly nested either way: stripped in this order, that takes off both nestings.
STRIP_ORDER = ("module.", "_orig_mod.", "module.")


# Read once at import (setting the umask is the only way to read it, and must not race with other threads).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` atomically: a crash or a full disk leaves the previous file untouched.

    The data goes to a temporary file in the same directory (same filesystem, so the rename is atomic), is
    fsynced, and only then replaces ``path``; on any failure the temporary file is removed. It is serialised
    in memory first and then written in one piece, so a failing write reports the operating system's error
    (e.g. "No space left on device"), not whichever check of torch's zip writer it trips first.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = io.BytesIO()
        torch.save(obj, data)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise CheckpointError(f"could not write checkpoint {path}: {e}; the previous file (if any) is "
                                  f"unchanged — free disk space or fix permissions and save again") from e
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable across a power loss; not every filesystem allows it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` the same file as ``src``, atomically: a hard link (no bytes written), or a copy where the
    filesystem has no hard links, made under a temporary name and renamed over ``dst``.

    A hard link is safe because ``save_checkpoint`` never writes into an existing file: the next save of
    ``src`` renames a new file over that name, and ``dst`` keeps the old contents."""
    src, dst = Path(src), Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:   # no hard links here (some network / FUSE filesystems)
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise CheckpointError(f"could not make {dst} a copy of {src}: {e}; {dst} (if any) is unchanged") from e
        raise
    _fsync_dir(dst.parent)


# A run's files beside {label}.pth.tar: the best checkpoint, and the resolved config written when it starts
BEST_SUFFIX = "_best"             # {label}_best.pth.tar
CONFIG_SUFFIX = ".config.yaml"    # {label}.config.yaml (fdmobilenet.logs.RunLogger.write_config)


class CheckpointSaver:
    """A run's two files, as timm's CheckpointSaver keeps them: ``{label}.pth.tar``, the latest state, written
    at every save, and ``{label}_best.pth.tar``, a hard link to (or copy of) the file just written when that
    state is the best so far. One serialisation per save, so the best file is byte for byte a saved state."""

    def __init__(self, output_dir: str | os.PathLike, label: str):
        self.path = Path(output_dir) / f"{label}.pth.tar"
        self.best_path = Path(output_dir) / f"{label}{BEST_SUFFIX}.pth.tar"

    def save(self, obj: dict, best: bool = False) -> None:
        save_checkpoint(obj, self.path)
        if best:
            link_or_copy(self.path, self.best_path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True`` (never falling back to full unpickling).

    ``map_location`` defaults to the CPU because legacy files (e.g. the authors' released weights) record CUDA
    storages and would not load on a machine without a GPU otherwise.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise CheckpointError(f"checkpoint {path} {what}; check the path (a .pth.tar written by train or "
                              f"convert_model.py)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler also rejects byte soup ("Unsupported operand"): that is damage, not a
        # foreign object.
        if "Weights only load failed" in str(e) and "Unsupported operand" not in str(e):
            raise CheckpointError(
                f"checkpoint {path} contains objects that are not plain tensors/containers (weights_only=True "
                f"refused: {_weights_only_reason(e)}); this file is not a checkpoint written by this project, "
                f"or it may be malicious; it was not loaded") from e
        raise _corrupt(path, e) from e
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        raise _corrupt(path, e) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights; "
                              f"it is not a checkpoint of this project")
    return obj


def _corrupt(path: Path, e: BaseException) -> CheckpointError:
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {detail}); it cannot "
                           f"be loaded — use an earlier checkpoint or re-download it")


def _weights_only_reason(e: BaseException) -> str:
    # torch's message is boilerplate around one informative line (e.g. "Unsupported GLOBAL posix.system ...").
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    informative = [line for line in lines[1:] if not line.startswith("Check the documentation")]
    return " ".join(informative) or lines[0]


def strip_prefixes(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """A copy without the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, either nested in the
    other (torch's consume_prefix_in_state_dict_if_present, once per wrapper and order).

    BatchNorm's version metadata is carried over under the stripped names, so loading behaves as for the
    unwrapped model (it decides whether a missing ``num_batches_tracked`` is legacy or an error).
    """
    out = OrderedDict(state_dict)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict(metadata)   # stripped in place below: the caller's stays as it is
    for prefix in STRIP_ORDER:
        consume_prefix_in_state_dict_if_present(out, prefix)
    return out


def model_state_dict(ckpt: Mapping[str, Any], source: str = "checkpoint") -> Mapping[str, Any]:
    """The model weights in a checkpoint: ``ckpt['state_dict']``, ``ckpt['model']``, or ``ckpt`` itself when it
    is already a flat mapping of names to tensors."""
    for key in ("state_dict", "model"):
        if isinstance(ckpt.get(key), Mapping):
            return ckpt[key]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise CheckpointError(f"{source} has no model weights: expected a 'state_dict' or 'model' entry or a flat "
                          f"mapping of tensors, found keys {', '.join(map(str, list(ckpt)[:8]))}")


def load_weights(model: nn.Module, ckpt_or_state_dict: Mapping[str, Any], source: str) -> None:
    """Load weights into ``model`` strictly (prefixes stripped); a mismatch names the source, the first
    mismatched key and both shapes, or the missing / unexpected keys."""
    state = strip_prefixes(model_state_dict(ckpt_or_state_dict, source))
    own = model.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if mismatched:
        key, theirs, ours = mismatched[0]
        # Only the classifier differing means another class count; anything else, another width.
        other = ("data.num_classes" if all(k.startswith("classifier.") for k, _, _ in mismatched)
                 else "width_mult")
        raise CheckpointError(
            f"checkpoint {source} does not fit the model: {key} has shape {theirs} in the checkpoint but {ours} "
            f"in the model (first of {len(mismatched)} mismatches) — was it trained with another {other}?")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        parts = [f"{label} {len(keys)} keys: {_some(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"checkpoint {source} does not fit the model: {'; '.join(parts) or e} — is it a "
                              f"checkpoint of this model (FD-MobileNet, same num_classes)?") from e


def model_config(ckpt: Mapping[str, Any], source: str) -> tuple[ModelConfig, int]:
    """(model config, number of classes) of the weights in ``ckpt``: the config this project stores in its
    checkpoints, else what the tensor shapes say (the authors' files store none). The width comes from the
    classifier's input, the last block's int(1024 x width) channels (exact for the paper's widths); one that
    rounding makes ambiguous is refused by the strict load that follows, naming the file."""
    state = strip_prefixes(model_state_dict(ckpt, source))
    if "classifier.weight" not in state:
        raise CheckpointError(f"{source} holds no FD-MobileNet weights (no classifier.weight); is it a "
                              f"checkpoint of this model?")
    num_classes = state["classifier.weight"].shape[0]
    if isinstance(ckpt.get("config"), dict) and "model" in ckpt["config"]:
        return from_dict({"model": ckpt["config"]["model"]}, f"config stored in {source}").model, num_classes
    width = state["classifier.weight"].shape[1] / BLOCKS[-1][1]
    return load_model_ref(f"{width:g}"), num_classes


def checkpoint_run(ckpt: dict, path: str | os.PathLike) -> tuple[ExperimentConfig | None, list[str] | None]:
    """The config and class names (label order) of the run that wrote the checkpoint at ``path``: stored in
    it (this project's checkpoints), else in the run's {label}.config.yaml beside it; None for what neither
    holds (the authors' released weights hold no config)."""
    config = from_dict(ckpt["config"], f"config stored in {path}") if isinstance(ckpt.get("config"), dict) else None
    classes = ckpt.get("classes")
    if config is None or classes is None:
        path = Path(path)
        label = path.name.removesuffix(".pth.tar")
        for name in (label, label.removesuffix(BEST_SUFFIX)):
            beside = path.with_name(f"{name}{CONFIG_SUFFIX}")
            if beside.is_file():
                raw = read_yaml(beside)
                if isinstance(raw, dict):
                    config = config or from_dict(raw, str(beside))
                    classes = classes or (raw.get("run") or {}).get("classes")
                break
    return config, classes


def _some(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
