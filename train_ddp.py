"""Train FD-MobileNet with DistributedDataParallel: one process per GPU (or a few CPU processes with gloo).

Single GPU, or a plain process (CPU or one GPU, no torchrun needed):
    python train_ddp.py --config 0.25x-FDMobileNet-224
One node, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train_ddp.py --config 1x-FDMobileNet-224
Two nodes of 8 GPUs (run on each node; NODE_RANK 0 on the node whose address is MASTER_ADDR):
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER_ADDR:29500 --rdzv_id=$JOB_ID train_ddp.py --config 1x-FDMobileNet-224
SLURM: launch/slurm.sbatch (torchrun per node), or `srun` one task per GPU: SLURM_PROCID etc. are read.
The authors' flags work too:
    torchrun --nproc_per_node=4 train_ddp.py --data imagenet-aggressive --model 0.5x-FDMobileNet-224 \
        --optim SGD-120-nesterov --sched StepLR-30-0.1 --label 0.5x [--print-freq 100] [--resume] [--evaluate]
Any config field can be overridden: `--set optim.lr=0.2` (repeatable) or trailing `optim.lr=0.2` words.

A run continues from {output_dir}/{label}.pth.tar when that file exists (train.auto_resume; --fresh starts
over). SIGTERM / SIGUSR1 (preemption) make every rank stop at the next agreed step, save a checkpoint that
records the step, and exit with code 0 (so torchrun does not count it as a failure; the SLURM script requeues).
Any error on any rank prints its traceback and exits 1 at once; the launcher (torchrun, srun
--kill-on-bad-exit) then stops the other ranks, so the job ends non-zero instead of hanging.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from torch import nn

import pipelines
from fdmobilenet import watchdog
from fdmobilenet.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint, strip_prefixes
from fdmobilenet.config import ConfigError, ExperimentConfig, from_dict, load_experiment, to_dict
from fdmobilenet.distributed import (DistInfo, any_rank, gather_to_main, init_distributed, run_rank,
                                     seed_everything)
from fdmobilenet.engine import (Trainer, epoch_batches, evaluate, make_grad_scaler, prepare_model, resolve_amp,
                                setup_backends, train_one_epoch)
from fdmobilenet.logs import RunLogger, format_metrics, run_metadata
from fdmobilenet.model import FDMobileNet
from fdmobilenet.optim import build_ema, build_optimizer, build_scheduler, scaled_lr

# How often (in steps) the ranks agree on a pending preemption signal: one tiny all-reduce on the host-side
# gloo group. 10 steps keep the reaction well under a minute even at several seconds per step.
PREEMPT_POLL_STEPS = 10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train FD-MobileNet (DDP, AMP, torch.compile, DALI).",
                                 epilog="Trailing section.key=value words are overrides, like --set.")
    ap.add_argument("--config", help="experiment file composing data/model/optim/sched/train "
                                     "(a path or a name in configs/experiments/)")
    for family in ("data", "model", "optim", "sched"):
        ap.add_argument(f"--{family}", help=f"{family} config (a path or a name in configs/{family}/); "
                                            f"replaces the experiment's")
    ap.add_argument("--label", help="run name: checkpoints/{label}.pth.tar, logs (train.label)")
    ap.add_argument("--print-freq", type=int, help="log every N steps (train.print_freq)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from {output_dir}/{label}.pth.tar (an error if it does not exist)")
    ap.add_argument("--no-resume", "--fresh", dest="fresh", action="store_true",
                    help="start from scratch even if the label's checkpoint exists (overwrites it)")
    ap.add_argument("--evaluate", action="store_true",
                    help="only evaluate on the val split (the label's checkpoint if present), then exit")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    ap.add_argument("overrides", nargs="*", metavar="[CONFIG] SECTION.KEY=VALUE",
                    help="overrides; a first word without '=' is the experiment file (same as --config)")
    args = ap.parse_intermixed_args(argv)   # CONFIG --label X k=v: words and options in any order
    if args.resume and args.fresh:
        ap.error("--resume and --fresh contradict each other")
    if args.overrides and "=" not in args.overrides[0] and not args.config:
        args.config = args.overrides.pop(0)
    return args


def load_config(args: argparse.Namespace) -> ExperimentConfig:
    """All through fdmobilenet.config: experiment file, then family flags, then overrides."""
    flags = [f"train.label={args.label}"] if args.label else []
    flags += [f"train.print_freq={args.print_freq}"] if args.print_freq else []
    return load_experiment(args.config, data=args.data, model=args.model, optim=args.optim, sched=args.sched,
                           overrides=[*flags, *args.set, *args.overrides])


# ------------------------------------------------------------------------------------------- preemption
class PreemptionFlag:
    """SIGTERM / SIGUSR1 only set a flag: the ranks act on it together at a step boundary (a rank acting
    alone would leave the others waiting in the next collective). Repeats are ignored: SLURM signals every
    process of the step and torchrun forwards the same signal again milliseconds later, so a worker routinely
    gets it twice (tests/test_launch_slurm.py). A stuck process is ended by torchrun's --shutdown-timeout,
    SLURM's KillWait, or SIGINT / SIGKILL."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested, self.signal_name = True, signal.Signals(signum).name


# ------------------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    """This rank's random generators (numpy's as plain lists: weights_only loading accepts no arrays)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    return {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np_state["state"]["key"] = np.array(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_state(t: Trainer, cfg: ExperimentConfig, loader, epoch: int, step_in_epoch: int, best_top1: float,
               *paths: str) -> None:
    """Collective (every rank calls it at the same point): check the loss is finite on all ranks, gather
    every rank's RNG and reader states, then rank 0 writes each path atomically. ``epoch`` /
    ``step_in_epoch``: where a resume starts."""
    t.check_finite(epoch)   # never replace a good checkpoint with diverged weights
    # every rank's own generators and reader state: each rank reads its own shard with its own augmentation
    per_rank = gather_to_main((rng_state(), loader.state_dict()), t.info)
    if not t.info.is_main:
        return
    state = {
        "name": cfg.model.name, "state_dict": strip_prefixes(t.module.state_dict()),
        "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler else None,
        # EMA as a plain model state_dict (evaluate.py --ema loads it like any weights) + its update count
        "ema": t.ema.module.state_dict() if t.ema else None,
        "ema_n_averaged": int(t.ema.n_averaged) if t.ema else 0,
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": t.global_step, "best_top1": best_top1,
        "config": to_dict(cfg), "rng": [rng for rng, _ in per_rank], "loader": [state for _, state in per_rank],
        "world_size": t.info.world_size}
    for path in paths:
        save_checkpoint(state, path)


def restore_state(t: Trainer, ckpt: dict, loader, path: str) -> tuple[int, int, float, dict | None]:
    """Load everything save_state wrote; returns (epoch, step_in_epoch, best_top1, this rank's RNG state or
    None when the world size changed - to be applied once the loader is positioned). The loader gets this
    rank's reader state (rank 0's when the world size changed)."""
    load_weights(t.module, ckpt, path)
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.scheduler.load_state_dict(ckpt["scheduler"])
    if t.scaler is not None and ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    if t.ema is not None and ckpt.get("ema"):
        load_weights(t.ema.module, ckpt["ema"], f"{path} (ema)")
        t.ema.n_averaged.fill_(ckpt["ema_n_averaged"])
    t.global_step = ckpt["global_step"]
    same_layout = ckpt.get("world_size") == t.info.world_size   # then each rank gets its own states back
    states = ckpt.get("loader") or [{}]
    if isinstance(states, dict):   # a file holding one reader state (rank 0's) for every rank
        states = [states]
    loader.load_state_dict(states[t.info.rank] if same_layout and len(states) > 1 else states[0])
    return ckpt["epoch"], ckpt["step_in_epoch"], ckpt["best_top1"], ckpt["rng"][t.info.rank] if same_layout else None


# ------------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace, cfg: ExperimentConfig, info: DistInfo) -> None:
    train_cfg, optim_cfg = cfg.train, cfg.optim
    seed_everything(train_cfg.seed, info.rank)
    setup_backends(info.device, train_cfg.deterministic)
    if optim_cfg.batch_size % info.world_size:
        raise ValueError(f"optim.batch_size={optim_cfg.batch_size} (global) must divide evenly over "
                         f"{info.world_size} ranks; pick a multiple of {info.world_size}")
    batch = optim_cfg.batch_size // info.world_size
    ckpt_path = os.path.join(train_cfg.output_dir, f"{train_cfg.label}.pth.tar")
    best_path = os.path.join(train_cfg.output_dir, f"{train_cfg.label}_best.pth.tar")
    ckpt = None
    if args.resume or (train_cfg.auto_resume and not args.fresh and os.path.isfile(ckpt_path)):
        try:
            ckpt = load_checkpoint(ckpt_path)
        except CheckpointError as e:   # missing (--resume) or corrupt: the message names the file
            raise CheckpointError(f"{e}; or start this label over with --fresh") from e
        if not args.evaluate and from_dict(ckpt["config"]).optim.batch_size != optim_cfg.batch_size:
            raise ValueError(f"{ckpt_path} was trained with optim.batch_size="
                             f"{ckpt['config']['optim']['batch_size']}; resuming with {optim_cfg.batch_size} "
                             f"would change the schedule. Keep the batch size or start with --fresh")

    # Data. The loader (DALI GPU / DALI CPU / torchvision / synthetic) comes from data.loader alone; all of
    # them hand over channels_last images on this rank's device, so nothing below depends on which it is.
    def loader(split: str):
        return pipelines.build_loader(cfg.data, split, batch, rank=info.rank, world_size=info.world_size,
                                      local_rank=info.local_rank, device=info.device, epochs_hint=optim_cfg.epochs)
    val_loader = loader("val")

    # Model and the speed switches (channels_last, torch.compile, then DDP: see engine.prepare_model).
    module = FDMobileNet(cfg.model.width_mult, num_classes=cfg.data.num_classes, dropout=cfg.model.dropout)
    model, eval_model = prepare_model(module, train_cfg, info)
    amp_dtype = resolve_amp(train_cfg.amp, info.device)
    if args.evaluate:
        if ckpt is not None:
            load_weights(module, ckpt, ckpt_path)
        m = evaluate(eval_model, val_loader, info, amp_dtype, train_cfg.print_freq)
        if info.is_main:
            print(f"evaluate {ckpt_path if ckpt else '(untrained weights)'}: {format_metrics(m)}", flush=True)
        return
    log = RunLogger(train_cfg.output_dir, train_cfg.label, info.is_main, start_epoch=ckpt["epoch"] if ckpt else 0)

    train_loader = loader("train")
    steps = len(train_loader) if train_cfg.steps_per_epoch <= 0 else min(len(train_loader),
                                                                          train_cfg.steps_per_epoch)
    optimizer = build_optimizer(module, optim_cfg, info.device)
    t = Trainer(model=model, module=module, optimizer=optimizer,
                scheduler=build_scheduler(optimizer, optim_cfg, cfg.sched, steps),
                criterion=nn.CrossEntropyLoss(label_smoothing=optim_cfg.label_smoothing), info=info,
                amp_dtype=amp_dtype, scaler=make_grad_scaler(info.device, amp_dtype),
                ema=build_ema(module, optim_cfg.ema_decay))
    start_epoch, start_step, best_top1, rng, skip = 0, 0, 0.0, None, 0
    if ckpt is not None:
        start_epoch, start_step, best_top1, rng = restore_state(t, ckpt, train_loader, ckpt_path)
        # Mid-epoch: a loader with reader state (DALI) continues from it by itself; one without replays the
        # epoch's order and the first start_step batches are drawn and dropped (engine.epoch_batches).
        skip = 0 if train_loader.state_dict() else start_step
        log.print(f"resumed from {ckpt_path}: epoch {start_epoch + 1} step {start_step}, "
                  f"global step {t.global_step}, best top-1 {best_top1:.2f}%")
    del ckpt

    config_file = log.write_config(to_dict(cfg), {**run_metadata(sys.argv), "world_size": info.world_size})
    log.print(f"FD-MobileNet {cfg.model.width_mult:g}x  {sum(p.numel() for p in module.parameters()):,} params | "
              f"{info.world_size} rank(s) on {info.device.type}, batch {batch}/rank = {optim_cfg.batch_size} "
              f"global, lr {scaled_lr(optim_cfg):g} | amp {amp_dtype} | compile {eval_model is not module} | "
              f"{type(train_loader).__name__} ({cfg.data.loader}): {steps} steps/epoch, "
              f"{val_loader.num_samples} val images on rank 0 | config -> {config_file}")

    preempt = PreemptionFlag()
    epochs, run_start, run_step0 = optim_cfg.epochs, time.perf_counter(), t.global_step
    progress = {"epoch": start_epoch}

    def eta(m: dict) -> float:
        remaining = (epochs - m["epoch"]) * steps - m["step"]
        return remaining * (time.perf_counter() - run_start) / max(1, t.global_step - run_step0)

    def preempted(epoch: int, step: int) -> None:
        log.print(f"preempted ({preempt.signal_name or 'signal on another rank'}) at epoch {epoch + 1} step {step}, "
                  f"checkpoint saved to {ckpt_path}")
        log.close(plot=False)

    def after_step(steps_done: int) -> bool:
        """Step checkpoints and the agreed reaction to a preemption signal; True stops the epoch."""
        epoch = progress["epoch"]
        if steps_done == steps:   # the epoch-end path saves and checks the flag
            return False
        stop = steps_done % PREEMPT_POLL_STEPS == 0 and any_rank(preempt.requested, info)
        if stop or (train_cfg.save_every_steps > 0 and t.global_step % train_cfg.save_every_steps == 0):
            save_state(t, cfg, train_loader, epoch, steps_done, best_top1, ckpt_path)
        if stop:
            preempted(epoch, steps_done)
        return stop

    for epoch in range(start_epoch, epochs):
        progress["epoch"] = epoch
        train_loader.set_epoch(epoch)
        lr = t.optimizer.param_groups[0]["lr"]
        epoch_start = time.perf_counter()
        batches = epoch_batches(train_loader, steps - start_step, skip,
                                lambda: rng is not None and set_rng_state(rng))
        s = train_one_epoch(t, batches, epoch, steps, start_step, train_cfg.print_freq,
                            lambda m: log.step(m, epochs, eta(m)), after_step)
        if s["steps_done"] < steps:   # preempted: the checkpoint is written, exit 0 (see the docstring)
            return
        train_time = time.perf_counter() - epoch_start
        summary = {"epoch": epoch, "lr": lr, "train_loss": s["train_loss"], "train_top1": s["train_top1"],
                   "img_s": (steps - start_step) * optim_cfg.batch_size / train_time, "epoch_time_s": train_time}
        start_step, skip, rng = 0, 0, None
        last = epoch == epochs - 1
        if last or (train_cfg.eval_every > 0 and (epoch + 1) % train_cfg.eval_every == 0):
            summary.update(evaluate(eval_model, val_loader, info, amp_dtype))
            if t.ema is not None:
                summary["ema_val_top1"] = evaluate(t.ema.module, val_loader, info, amp_dtype)["val_top1"]
        is_best = summary.get("val_top1", -1.0) > best_top1
        best_top1 = max(best_top1, summary.get("val_top1", -1.0))
        log.epoch(summary)
        save_state(t, cfg, train_loader, epoch + 1, 0, best_top1, ckpt_path, *([best_path] if is_best else []))
        if not last and any_rank(preempt.requested, info):
            preempted(epoch + 1, 0)
            return
    log.print(f"done: best val top-1 {best_top1:.2f}%, checkpoint {ckpt_path}, logs {log.dir}/{train_cfg.label}.csv"
              f", {(time.perf_counter() - run_start) / 60:.1f} min")
    plot = log.close(train_cfg.plot)
    if plot:
        log.print(f"curves: {plot}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
    except ConfigError as e:
        sys.exit(f"train_ddp.py: {e}")
    watchdog.start(cfg.train)   # before the process group: it forks (fdmobilenet/watchdog.py)
    info = init_distributed(cfg.train.device)
    run_rank(lambda: run(args, cfg, info), info, "training")   # an error on any rank ends the job at once


if __name__ == "__main__":
    main()
