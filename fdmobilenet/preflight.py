"""The pre-flight check of a training command: what would fail in every worker, found in one plain process.

    python train_ddp.py --check --world-size 8 [the run's own arguments]

The launchers (launch/*.sh, launch/*.sbatch) run it before torchrun / srun and stop on its exit code: a
user's mistake exits 2 with one line (fdmobilenet.cli), so a job that cannot work is never started,
restarted by torchrun (--max-restarts restarts a worker whatever its exit code) or requeued by SLURM. It is
cheap - no device, no loader, no image decoded: the config resolved, the global batch against the planned
world size(s), ``train.cuda_graphs=on`` against them and the AMP / SGD settings, the data's splits listed
and their manifests checked (pipelines.splits), the checkpoint the run would resume from loaded and
fitted to the model.

The checks are the functions in CHECKS, run in order; each takes the Plan and returns a line for the report
or raises a user error (fdmobilenet.cli.USER_ERRORS). A new check is one more function on that list. The
workers themselves call the parts that decide what they do (per_rank_batch, use_cuda_graphs,
checkpoint_to_resume, check_split), so the answers are the same in both places.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from fdmobilenet.checkpoint import CheckpointError, load_checkpoint, load_weights
from fdmobilenet.cli import UsageError
from fdmobilenet.config import ExperimentConfig, changes, from_dict, to_dict
from fdmobilenet.cuda_graph import use_cuda_graphs
from fdmobilenet.distributed import DistInfo
from fdmobilenet.model import FDMobileNet
from pipelines.base import train_steps
from pipelines.splits import check_split, each_split


@dataclass
class Plan:
    """What a training command is about to do."""
    config: ExperimentConfig
    world_sizes: list[int]       # the world size it will run at (an elastic job: every size it may run at)
    checkpoint: Path             # {output_dir}/{label}.pth.tar
    resume: bool = False         # --resume: the checkpoint must exist
    fresh: bool = False          # --fresh: start over even if it exists (a first start only, see restarts)
    evaluate: bool = False       # --evaluate: only score the checkpoint (it must exist)


def restarts() -> int:
    """How often the launcher has started this job again: torchrun's restarts of its workers
    (TORCHELASTIC_RESTART_COUNT) or SLURM's requeues (SLURM_RESTART_COUNT); 0 for a first start."""
    return max(int(os.environ.get(name) or 0) for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def per_rank_batch(cfg: ExperimentConfig, world_size: int) -> int:
    """optim.batch_size is global; every rank gets an equal share."""
    if cfg.optim.batch_size % world_size:
        raise UsageError(f"optim.batch_size={cfg.optim.batch_size} (global) must divide evenly over "
                         f"{world_size} ranks; pick a multiple of {world_size}")
    return cfg.optim.batch_size // world_size


def checkpoint_to_resume(plan: Plan) -> Optional[dict]:
    """The checkpoint the run continues from (or evaluates), loaded and checked to fit; None to start fresh.

    A checkpoint that does not fit this config but would fit the config it was saved with is not a reason to
    start over: the message says how to continue it (its saved config is what train_ddp.py takes without
    --config) and, for this config, a new --label - never --fresh, which would destroy the run."""
    cfg, path = plan.config, plan.checkpoint
    label = cfg.train.label
    if plan.evaluate and not path.is_file():
        raise UsageError(f"--evaluate: no checkpoint {path} for label '{label}'; give the --label (and "
                         f"train.output_dir) of a trained run, or score any file with "
                         f"`python evaluate.py --checkpoint FILE`")
    if plan.resume and not path.is_file():
        raise UsageError(f"--resume: no checkpoint {path} for label '{label}'; give the --label (and "
                         f"train.output_dir) of a trained run, or leave out --resume to start this one")
    if not plan.evaluate and (plan.fresh or not (plan.resume or (cfg.train.auto_resume and path.is_file()))):
        return None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:   # damaged, or not a checkpoint
        if plan.evaluate:
            raise
        raise CheckpointError(f"{e}; to train this config from scratch, start over with --fresh (overwrites "
                              f"{path}) or use a new --label") from None
    saved = from_dict(ckpt["config"], f"the config stored in {path}") if isinstance(ckpt.get("config"), dict) \
        else None
    continue_it = (f"to continue it, keep the values it was saved with (`train_ddp.py --label {label}` without "
                   f"--config takes its saved config); to train this config, use a new --label")
    try:
        load_weights(model_of(cfg), ckpt, str(path))
    except CheckpointError as e:   # the weights of another model
        if plan.evaluate:
            raise
        if saved is None or not fits(ckpt, saved):   # nothing this project saved loads it (an edited file)
            raise CheckpointError(f"{e}; to train this config from scratch, start over with --fresh (overwrites "
                                  f"{path}) or use a new --label") from None
        shape = [c for c in changes(to_dict(saved), to_dict(cfg)) if c.startswith(("model.", "data.num_classes"))]
        raise CheckpointError(f"{e} — it was saved with another config ({', '.join(shape)}): {continue_it}") from None
    if not plan.evaluate and saved is not None and saved.optim.batch_size != cfg.optim.batch_size:
        raise UsageError(f"{path} was trained with optim.batch_size={saved.optim.batch_size}; resuming with "
                         f"{cfg.optim.batch_size} would change the schedule: {continue_it}")
    return ckpt


def model_of(cfg: ExperimentConfig) -> FDMobileNet:
    return FDMobileNet(cfg.model.width_mult, num_classes=cfg.data.num_classes)


def fits(ckpt: dict, cfg: ExperimentConfig) -> bool:
    """Whether the checkpoint's weights load into the model ``cfg`` describes."""
    try:
        load_weights(model_of(cfg), ckpt, "checkpoint")
    except CheckpointError:
        return False
    return True


def nothing_left(ckpt: dict, cfg: ExperimentConfig, path: Path) -> Optional[str]:
    """The message for a run whose checkpoint has completed every epoch; None while there is work left."""
    if ckpt["epoch"] < cfg.optim.epochs:
        return None
    best = f" (best val top-1 {ckpt['best_top1']:.2f}% at epoch {ckpt.get('best_epoch', '?')})"
    return (f"{path} has completed all {cfg.optim.epochs} epochs{best}: nothing left to do. Raise optim.epochs "
            f"to train on, --evaluate to score it, or --fresh to start over")


# ---------------------------------------------------------------------------------------------- the checks
def check_batch(plan: Plan) -> str:
    shares = [f"{per_rank_batch(plan.config, n)} x {n}" for n in plan.world_sizes]
    return f"global batch {plan.config.optim.batch_size} = {' or '.join(shares)} ranks"


def check_cuda_graphs(plan: Plan) -> str:
    """The ranks' own decision (fdmobilenet.cuda_graph.use_cuda_graphs) for what is known here - the world
    sizes, train.amp, optim.impl, train.compile_mode, an explicit train.device=cpu - so that an impossible
    ``train.cuda_graphs=on`` never starts (under torchrun --max-restarts it would be restarted). Whether the
    ranks see a GPU, and whether it has bf16 (amp auto), is theirs to find."""
    train = plan.config.train
    device = torch.device("cpu" if train.device == "cpu" else "cuda")
    amp = {"off": None, "fp16": torch.float16}.get(train.amp, torch.bfloat16)
    decisions = {use_cuda_graphs(plan.config, DistInfo(0, 0, n, device), amp)[1] for n in plan.world_sizes}
    gpu_assumed = train.cuda_graphs != "off" and train.device != "cpu"
    return f"cuda graphs: {' / '.join(sorted(decisions))}" + (", if the ranks have a GPU" if gpu_assumed else "")


def check_data(plan: Plan) -> str:
    """The data pre-flight of every split the run reads (pipelines.splits.check_split), without its scan:
    the listing (split and class folders against data.num_classes, or the shards and their indices) and each
    split's manifest. A manifest that matches its split has its verdicts applied here, so a damaged file
    stops the job once, before any worker starts. Without one the files are not read here: the ranks check
    them at start, each its 1/world share, in a fraction of the time one process would take
    (benchmarks/RESULTS.md, "Start-up data check")."""
    data = plan.config.data
    if data.loader == "synthetic":
        return "data: synthetic batches (nothing to read)"
    splits = ("val",) if plan.evaluate else ("train", "val")
    checked = each_split(splits, lambda split: check_split(data, split, scan=False))
    if not plan.evaluate:   # a batch larger than a rank's share of the train split: what the workers would find
        for n in plan.world_sizes:
            train_steps(checked[0].total, per_rank_batch(plan.config, n), n, str(checked[0].folder))
    return (f"data: {data.root} ({data.layout}, {data.num_classes} classes, loader {data.loader}): "
            + "; ".join(f"{c.name} {c.total:,} images, {c.how}" for c in checked))


def check_checkpoint(plan: Plan) -> str:
    ckpt = checkpoint_to_resume(plan)
    if ckpt is None:
        return f"checkpoint: none, starts from scratch ({plan.checkpoint})"
    done = nothing_left(ckpt, plan.config, plan.checkpoint)
    where = f"epoch {ckpt['epoch'] + 1} step {ckpt['step_in_epoch']}"
    return f"checkpoint: {done}" if done and not plan.evaluate else f"checkpoint: {plan.checkpoint} ({where})"


CHECKS: list[Callable[[Plan], str]] = [check_batch, check_cuda_graphs, check_data, check_checkpoint]


def preflight(plan: Plan) -> list[str]:
    """Run every check; one line per check, or the first user error."""
    return [check(plan) for check in CHECKS]
