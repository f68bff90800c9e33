"""Train FD-MobileNet with DistributedDataParallel: one process per GPU (or a few CPU processes with gloo).

    python train_ddp.py --config 0.25x-FDMobileNet-224                       # one process: CPU or one GPU
    torchrun --standalone --nproc_per_node=8 train_ddp.py --config 1x-FDMobileNet-224   # one node, 8 GPUs
Several nodes: launch/multinode.sh (torchrun on each node, with the settings a restart needs: docs/restarts.md);
SLURM: launch/slurm.sbatch (torchrun per node), or `srun` one task per GPU (SLURM_PROCID etc. are read).
The authors' flags work too (--data --model --optim --sched --label --print-freq --resume --evaluate), and any
config field can be overridden: `--set optim.lr=0.2` or trailing `optim.lr=0.2` words.

A run continues from {output_dir}/{label}.pth.tar when that file exists (train.auto_resume; --fresh starts
over); without --config a label that has run before takes the config it was saved with. SIGTERM / SIGUSR1
(preemption) make every rank stop at the next agreed step (or evaluation batch), save, and exit 0; SIGINT
(Ctrl-C) does the same and exits 130; a second Ctrl-C stops at once without saving. Exit codes: 0 done,
preempted, or nothing left to do; 130 interrupted by Ctrl-C; 2 a user's mistake (one line, fdmobilenet/cli.py);
1 anything else, with its traceback - and the launcher then stops the other ranks. `--check` runs the checks
of train_check.py in one process and exits; the launchers run it before starting the workers. A rank that
stops making progress is killed after train.step_timeout_s (fdmobilenet/watchdog.py).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

import pipelines
import train_check
from fdmobilenet import cli, watchdog
from fdmobilenet.checkpoint import CheckpointSaver, load_weights
from fdmobilenet.config import ExperimentConfig, changes, from_dict, load_experiment, to_dict
from fdmobilenet.cuda_graph import GraphedStep, use_cuda_graphs
from fdmobilenet.distributed import DistInfo, init_distributed, run_rank, seed_everything
from fdmobilenet.engine import (PreemptionFlag, Trainer, evaluate, make_grad_scaler, prepare_model, resolve_amp,
                                set_cpu_threads, setup_backends)
from fdmobilenet.logs import RunLogger, format_metrics, format_resolutions, run_metadata
from fdmobilenet.loop import Loop, RunState
from fdmobilenet.model import FDMobileNet
from fdmobilenet.optim import build_ema, build_optimizer, build_scheduler, scaled_lr
from fdmobilenet.resume import Plan, checkpoint_to_resume, nothing_left, per_rank_batch, restarts, saved_config
from pipelines.splits import Classes, resolve_classes

PROG = "train_ddp.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description="Train FD-MobileNet (DDP, AMP, torch.compile, DALI).",
                                 epilog="Trailing section.key=value words are overrides, like --set. Exit codes: "
                                        "0 done / preempted / nothing left to do, 130 stopped by Ctrl-C (after a "
                                        "checkpoint), 2 a mistake in the command, its config or its files (one "
                                        "line), 1 a crash (traceback).")
    ap.add_argument("--config", help="experiment file composing data/model/optim/sched/train (a path, a name "
                                     "in configs/experiments/, or a run's own {label}.config.yaml); default: the "
                                     "config the label's run was saved with, else the paper's recipe")
    for family in ("data", "optim", "sched"):
        ap.add_argument(f"--{family}", help=f"{family} config (a path or a name in configs/{family}/); "
                                            f"replaces the experiment's")
    ap.add_argument("--model", help="model config (a path or a name in configs/model/) or a width multiplier "
                                    "such as 0.25; replaces the experiment's")
    ap.add_argument("--label", help="run name: checkpoints/{label}.pth.tar, logs (train.label)")
    ap.add_argument("--print-freq", type=int, help="log every N steps (train.print_freq)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from {output_dir}/{label}.pth.tar (an error if it does not exist)")
    ap.add_argument("--no-resume", "--fresh", dest="fresh", action="store_true",
                    help="start from scratch even if the label's checkpoint exists (overwrites it); a torchrun "
                         "restart or SLURM requeue of the job resumes instead")
    ap.add_argument("--evaluate", action="store_true",
                    help="only evaluate the label's checkpoint on the val split (an error if it does not exist)")
    ap.add_argument("--check", action="store_true",
                    help="pre-flight only: check config, data folders, batch / world size and checkpoint in "
                         "this one process, then exit (0 fine, 2 a mistake); the launchers run it first")
    ap.add_argument("--world-size", default=os.environ.get("WORLD_SIZE", "1"),
                    help="with --check: the world size(s) the job will run at, e.g. 8 or 8,16 (elastic)")
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
    """Experiment file, then the family flags, then the overrides. Without --config a label that has run
    before continues with the config it was saved with (so that a restart or requeue of `--label L --resume`
    trains L as it was), the flags and overrides on top; rank 0 says which config it took."""
    flags = [f"train.label={args.label}"] if args.label else []
    flags += [f"train.print_freq={args.print_freq}"] if args.print_freq else []
    overrides = [*flags, *args.set, *args.overrides]
    families = dict(data=args.data, model=args.model, optim=args.optim, sched=args.sched)
    start = None
    if args.config is None:
        train = load_experiment(overrides=overrides).train     # where the label's files are
        saved = saved_config(train.output_dir, train.label)
        if saved is not None:
            source, stored = saved
            start = from_dict(stored, source)
            start.train.output_dir, start.train.label = train.output_dir, train.label   # where its files are now
            given = [f"--{family} {ref}" for family, ref in families.items() if ref] + [*args.set, *args.overrides]
            if cli.is_main_rank():
                print(f"config: {source}, what run '{train.label}' was saved with (no --config given)"
                      + (f"; on top: {' '.join(given)}" if given else ""), flush=True)
    return load_experiment(args.config, **families, overrides=overrides, start=start)


def plan(args: argparse.Namespace, cfg: ExperimentConfig, world_sizes: list[int]) -> Plan:
    # --fresh is for a job's first start: a torchrun restart or SLURM requeue runs the same command line again
    return Plan(cfg, world_sizes, CheckpointSaver(cfg.train.output_dir, cfg.train.label).path,
                resume=args.resume, fresh=args.fresh and not restarts(), evaluate=args.evaluate)


def run(args: argparse.Namespace, cfg: ExperimentConfig, info: DistInfo, classes: Classes) -> int | None:
    """This rank's training (or --evaluate); returns the exit code when it is not 0: 130 after a Ctrl-C."""
    train_cfg, optim_cfg = cfg.train, cfg.optim
    seed_everything(train_cfg.seed, info.rank)
    setup_backends(info.device, train_cfg.deterministic)
    # The 'auto' loader knobs become this rank's numbers first: the CPU split, the header, config.yaml use them.
    cfg.data, data_auto = pipelines.resolve_loader_defaults(cfg.data, info.device)
    threads = set_cpu_threads(cfg.data)
    batch = per_rank_batch(cfg, info.world_size)
    saver = CheckpointSaver(train_cfg.output_dir, train_cfg.label)
    ckpt = checkpoint_to_resume(plan(args, cfg, [info.world_size]))   # None: start from scratch
    done = ckpt is not None and not args.evaluate and nothing_left(ckpt, cfg, saver.path)
    if done:
        if info.is_main:
            print(f"{PROG}: {done}", flush=True)
        return

    # Data: whichever data.loader, channels_last batches on this rank's device. Both splits are checked
    # before either error is reported: the damaged files of both in one line.
    splits = ("val",) if args.evaluate else ("val", "train")
    loaders = dict(zip(splits, pipelines.build_loaders(
        cfg.data, splits, batch, rank=info.rank, world_size=info.world_size, local_rank=info.local_rank,
        device=info.device, group=info.control_group)))
    val_loader = loaders["val"]

    module = FDMobileNet(cfg.model.width_mult, num_classes=cfg.data.num_classes, dropout=cfg.model.dropout)
    model, eval_model = prepare_model(module, train_cfg, info)   # channels_last, torch.compile, DDP
    amp_dtype = resolve_amp(train_cfg.amp, info.device)
    if args.evaluate:   # the whole val split, whatever train.val_steps says
        load_weights(module, ckpt, str(saver.path))
        info.report_own_errors = True
        m = evaluate(eval_model, val_loader, info, amp_dtype, train_cfg.print_freq)
        if info.is_main:
            print(f"evaluate {saver.path}: {format_metrics(m)}", flush=True)
        return

    graphed, graphs_why = use_cuda_graphs(cfg, info, amp_dtype)   # an 'on' that cannot work: a user error
    train_loader = loaders["train"]
    steps = len(train_loader) if train_cfg.steps_per_epoch <= 0 else min(len(train_loader),
                                                                          train_cfg.steps_per_epoch)
    optimizer = build_optimizer(module, optim_cfg, info.device)
    trainer = Trainer(model=model, module=module, optimizer=optimizer,
                      scheduler=build_scheduler(optimizer, optim_cfg, cfg.sched, steps),
                      criterion=nn.CrossEntropyLoss(label_smoothing=optim_cfg.label_smoothing), info=info,
                      amp_dtype=amp_dtype, scaler=make_grad_scaler(info.device, amp_dtype),
                      ema=build_ema(module, optim_cfg.ema_decay))
    state, resumed = RunState(trainer, train_loader, cfg, steps, classes=classes.names), ckpt is not None
    changed = changes(ckpt["config"], to_dict(cfg)) if resumed else []
    if resumed:
        state.load_state_dict(ckpt, str(saver.path))
    del ckpt
    log = RunLogger(train_cfg.output_dir, train_cfg.label, info.is_main, start_epoch=state.epoch)
    if resumed:
        log.print(f"resumed from {saver.path}: epoch {state.epoch + 1} step {state.step}, global step "
                  f"{trainer.global_step}, best top-1 {state.best_top1:.2f}%"
                  + (" (its steps are done: evaluation first)" if state.step == steps else ""))
        if changed:
            log.print(f"  with a config that differs from the one it was saved with: {', '.join(changed)}")

    config_file = log.write_config(to_dict(cfg), {**run_metadata(sys.argv), "world_size": info.world_size,
                                                  "data_auto": data_auto, "cuda_graphs": graphs_why,
                                                  "classes": classes.names})
    val_images = val_loader.num_samples if train_cfg.val_steps <= 0 else min(val_loader.num_samples,
                                                                              train_cfg.val_steps * batch)
    log.print(f"FD-MobileNet {cfg.model.width_mult:g}x  {sum(p.numel() for p in module.parameters()):,} params | "
              f"{info.world_size} rank(s) on {info.device.type}, batch {batch}/rank = {optim_cfg.batch_size} "
              f"global, lr {scaled_lr(optim_cfg):g} = {optim_cfg.lr:g} x {optim_cfg.batch_size}/"
              f"{optim_cfg.base_batch_size} | {classes} | amp {amp_name(amp_dtype)} | "
              f"compile {eval_model is not module} | "
              f"cuda graphs {graphs_why} | torch threads {threads} | "
              f"loader auto: {', '.join(f'{k}={getattr(cfg.data, k)}' for k in data_auto) or '-'} | "
              f"{type(train_loader).__name__} ({cfg.data.loader}): {steps} steps/epoch, "
              f"{val_images} val images on rank 0 | {format_resolutions(cfg.data, optim_cfg.epochs)} | "
              f"config -> {config_file}")

    preempt = PreemptionFlag()      # from here a signal stops the ranks at an agreed step (fdmobilenet/loop.py)
    info.report_own_errors = True   # from here an error can be one rank's own (see DistInfo)
    return Loop(state, saver, log, preempt, GraphedStep(trainer).step if graphed else None, eval_model,
                val_loader).run()


def amp_name(amp_dtype) -> str:
    """The header's word for the autocast dtype: bf16, fp16, or off (full fp32)."""
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


def check(args: argparse.Namespace, cfg: ExperimentConfig) -> None:
    """--check: the checks of train_check.py, one line each, or the first user error."""
    try:
        sizes = [int(n) for n in str(args.world_size).split(",")]
    except ValueError:
        raise cli.UsageError(f"--world-size {args.world_size!r}: expected a number, or numbers separated by "
                             f"commas (an elastic job)") from None
    for line in train_check.preflight(plan(args, cfg, sizes)):
        print(f"{PROG} --check: {line}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with cli.exit_on_interrupt(PROG):
        with cli.exit_on_user_error(PROG):
            cfg = load_config(args)
            # data.num_classes 'auto': the classes of the split the labels come from (the train split's)
            cfg.data, classes = resolve_classes(cfg.data, "val" if args.evaluate else "train")
            if args.check:
                return check(args, cfg)
        watchdog.start(cfg.train)   # before the process group: it forks (fdmobilenet/watchdog.py)
        info = init_distributed(cfg.train.device)
    run_rank(lambda: run(args, cfg, info, classes), info, PROG, "training")


if __name__ == "__main__":
    main()
