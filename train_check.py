"""The checks of ``train_ddp.py --check``: what would fail in every worker, found in one plain process.

    python train_ddp.py --check --world-size 8 [the run's own arguments]

The launchers (launch/*.sh, launch/*.sbatch) run it before torchrun / srun and stop on its exit code: a
user's mistake exits 2 with one line (fdmobilenet.cli), so a job that cannot work is never started,
restarted by torchrun (--max-restarts restarts a worker whatever its exit code) or requeued by SLURM. No
device, no loader, no image decoded. Each check takes the Plan and returns a line for the report, or raises
a user error; the workers call the same functions (per_rank_batch, use_cuda_graphs, checkpoint_to_resume,
check_split) to decide what they do, so the answers are the same in both places.
"""
from __future__ import annotations

from typing import Callable

import torch

from fdmobilenet.cuda_graph import use_cuda_graphs
from fdmobilenet.distributed import DistInfo
from fdmobilenet.resume import Plan, checkpoint_to_resume, nothing_left, per_rank_batch
from pipelines.base import train_steps
from pipelines.splits import check_split, each_split


def check_batch(plan: Plan) -> str:
    shares = [f"{per_rank_batch(plan.config, n)} x {n}" for n in plan.world_sizes]
    return f"global batch {plan.config.optim.batch_size} = {' or '.join(shares)} ranks"


def check_cuda_graphs(plan: Plan) -> str:
    """The ranks' own decision for what is known here - the world sizes, train.amp, optim.impl,
    train.compile_mode, an explicit train.device=cpu - so that an impossible ``train.cuda_graphs=on`` never
    starts. Whether the ranks see a GPU, and whether it has bf16 (amp auto), is theirs to find."""
    train = plan.config.train
    device = torch.device("cpu" if train.device == "cpu" else "cuda")
    amp = {"off": None, "fp16": torch.float16}.get(train.amp, torch.bfloat16)
    decisions = {use_cuda_graphs(plan.config, DistInfo(0, 0, n, device), amp)[1] for n in plan.world_sizes}
    gpu_assumed = train.cuda_graphs != "off" and train.device != "cpu"
    return f"cuda graphs: {' / '.join(sorted(decisions))}" + (", if the ranks have a GPU" if gpu_assumed else "")


def check_data(plan: Plan) -> str:
    """Every split the run reads, listed and its manifest applied (pipelines.splits.check_split without its
    scan): a damaged file stops the job here, once. Without a manifest the ranks read the files at start,
    each its share, faster than one process would (benchmarks/RESULTS.md, "Start-up data check")."""
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
