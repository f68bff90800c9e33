"""Checkpoint I/O: atomic saves, safe loads, and strict weight loading with errors that say what to do.

Every load goes through ``torch.load(..., weights_only=True)``: a checkpoint is plain tensors and containers,
and a file that needs more than that is refused rather than unpickled (unpickling runs arbitrary code).
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

# Wrappers that prefix parameter names: DistributedDataParallel (``module.``) and torch.compile
# (``_orig_mod.``), possibly nested either way.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# Read once at import (setting the umask is the only way to read it, and must not race with other threads).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or applied; the message names the file and what to do."""


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` atomically: a crash or a full disk leaves the previous file untouched.

    The data goes to a temporary file in the same directory (same filesystem, so the rename is atomic), is
    fsynced, and only then replaces ``path``; on any failure the temporary file is removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
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
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, nested in any order.

    BatchNorm's version metadata is carried over under the stripped names, so loading behaves as for the
    unwrapped model (it decides whether a missing ``num_batches_tracked`` is legacy or an error).
    """
    def strip(key: str) -> str:
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        return key

    out = OrderedDict((strip(k), v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict((strip(k + ".")[:-1] if k else k, v) for k, v in metadata.items())
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
        raise CheckpointError(
            f"checkpoint {source} does not fit the model: {key} has shape {theirs} in the checkpoint but {ours} "
            f"in the model (first of {len(mismatched)} mismatches) — was it trained with another width_mult?")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        parts = [f"{label} {len(keys)} keys: {_some(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"checkpoint {source} does not fit the model: {'; '.join(parts) or e} — is it a "
                              f"checkpoint of this model (FD-MobileNet, same num_classes)?") from e


def _some(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
