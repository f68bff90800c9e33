"""Test-only fault injection for subprocesses (train_ddp.py, torchrun workers, SLURM tasks); never shipped.

A test that wants a fault puts this folder first on PYTHONPATH (``fault_plugin.fault_env`` builds that
environment); Python then imports this file as ``sitecustomize`` at start-up (it hides any other
sitecustomize; the project's venv has none). With none of the variables below set it does nothing: no import
hook, nothing patched. With one set, it patches the training code as that is imported:

  FDM_FAULT_RAISE_AT_STEP=k   rank FDM_FAULT_RAISE_RANK (default: the last rank) raises RuntimeError
                              ("injected failure on rank R at global step k") before global step k
  FDM_FAULT_NAN_AT_STEP=k     the images of global step k become NaN on every rank, so its loss is NaN
  FDM_FAULT_SLOW_SAVE_S=s     every checkpoint write first sleeps s seconds (a slow filesystem), printing
                              "fault plugin: ..." before and after

Global steps count from 0, as the trainer's own ``global_step`` does. The step faults reach the eager step
and the CUDA-graphed one (train.cuda_graphs) alike.
"""
from __future__ import annotations

import importlib.abc
import os
import sys
import time

RAISE_AT_STEP = "FDM_FAULT_RAISE_AT_STEP"
RAISE_RANK = "FDM_FAULT_RAISE_RANK"
NAN_AT_STEP = "FDM_FAULT_NAN_AT_STEP"
SLOW_SAVE_S = "FDM_FAULT_SLOW_SAVE_S"
VARIABLES = (RAISE_AT_STEP, RAISE_RANK, NAN_AT_STEP, SLOW_SAVE_S)

# ------------------------------------------------------------------------------- what is patched, in one place
# (module, attribute path) of the functions the faults wrap, and how the step's global step is read.
# Retarget here when the training code moves; nothing else in this file names the product's code.
STEP = ("fdmobilenet.engine", "Trainer.step")              # step(self, images, labels), one optimizer step
# the same step as a replayed CUDA graph (train.cuda_graphs): its replays do not go through Trainer.step
GRAPHED_STEP = ("fdmobilenet.cuda_graph", "GraphedStep.step")
SAVE = ("fdmobilenet.checkpoint", "save_checkpoint")       # save_checkpoint(obj, path), every checkpoint write


def global_step(owner) -> int:
    """The global step ``owner.step`` is about to run (``owner``: a Trainer, or a GraphedStep of one)."""
    return getattr(owner, "trainer", owner).global_step


# ------------------------------------------------------------------------------------------------ the faults
def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def faulty_step(step):
    raise_at, nan_at = int(os.environ.get(RAISE_AT_STEP, -1)), int(os.environ.get(NAN_AT_STEP, -1))

    def patched(self, images, labels, *args, **kwargs):
        at = global_step(self)
        if at == raise_at:
            rank, world = _rank_and_world()
            if rank == int(os.environ.get(RAISE_RANK, world - 1)):
                raise RuntimeError(f"injected failure on rank {rank} at global step {at} (tests/fault_plugin)")
        if at == nan_at:
            images = images * float("nan")
        return step(self, images, labels, *args, **kwargs)
    return patched


def slow_save(save):
    seconds = float(os.environ[SLOW_SAVE_S])

    def patched(obj, path, *args, **kwargs):
        print(f"fault plugin: slow checkpoint write, {seconds:g} s before writing {path}", file=sys.stderr,
              flush=True)
        time.sleep(seconds)
        save(obj, path, *args, **kwargs)
        print(f"fault plugin: checkpoint {path} written", file=sys.stderr, flush=True)
    return patched


# ------------------------------------------------------------------------------------------------ patching
class PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds modules through the other finders and, for the target modules, wraps the loader so that the
    patches apply right after the module has run (before any ``from module import name`` binds a name)."""

    def __init__(self, patches: dict[str, list[tuple[str, object]]]):
        self.patches = patches   # module -> [(attribute path, wrapper factory)]

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    spec.loader = PatchingLoader(spec.loader, self.patches[name])
                    return spec
        return None


class PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patches):
        self.loader, self.patches = loader, patches

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def __getattr__(self, name):   # get_source, is_package, resource readers: the real loader's
        return getattr(self.loader, name)

    def exec_module(self, module):
        self.loader.exec_module(module)
        for attribute, wrap in self.patches:
            *owner_path, name = attribute.split(".")
            owner = module
            for part in owner_path:
                owner = getattr(owner, part)
            setattr(owner, name, wrap(getattr(owner, name)))


def install() -> None:
    patches: dict[str, list] = {}
    if os.environ.get(RAISE_AT_STEP) or os.environ.get(NAN_AT_STEP):
        for module, attribute in (STEP, GRAPHED_STEP):
            patches.setdefault(module, []).append((attribute, faulty_step))
    if os.environ.get(SLOW_SAVE_S):
        patches.setdefault(SAVE[0], []).append((SAVE[1], slow_save))
    if patches:
        sys.meta_path.insert(0, PatchOnImport(patches))


if __name__ == "sitecustomize":   # imported by site at start-up (not when a test imports the names above)
    install()
