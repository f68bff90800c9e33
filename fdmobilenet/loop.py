"""A training run: its state and checkpoint (RunState), and the loop over its epochs and steps (Loop).

What happens between two steps is :meth:`Loop.step_boundary`; every checkpoint is written by :meth:`Loop.save`;
a preemption signal ends the run in :meth:`Loop.run`, the one place that catches Preempted.

Position: ``epoch`` counts the epochs completed, i.e. the epoch in progress counted from 0 (what the LR
schedule and the loaders use; logs and messages count from 1), and ``step`` the steps done in it. ``step ==
steps`` is an epoch whose steps are all trained but whose evaluation, log row and end-of-epoch checkpoint
are still to come: what a preemption signal during the evaluation saves, and what a resumed run finishes
first (no step runs, the evaluation does).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Protocol

import torch
from torch import nn

from fdmobilenet import cli, watchdog
from fdmobilenet.checkpoint import CheckpointSaver, load_weights
from fdmobilenet.config import ExperimentConfig, to_dict
from fdmobilenet.distributed import (DistInfo, all_reduce_sum, broadcast_buffers, gather_to_main, rng_state,
                                     set_rng_state)
from fdmobilenet.engine import Preempted, PreemptionFlag, Trainer, evaluate, sync
from fdmobilenet.logs import RunLogger, format_duration


class TrainLoader(Protocol):
    """What the loop uses of the train loader (pipelines.base.BatchLoader has it all)."""
    image_size: int   # px, of the epoch in progress

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def evaluation_due(cfg: ExperimentConfig, epoch: int) -> bool:
    """After every train.eval_every-th epoch (``epoch`` counted from 0), and always after the last one."""
    every = cfg.train.eval_every
    return epoch == cfg.optim.epochs - 1 or (every > 0 and (epoch + 1) % every == 0)


# ------------------------------------------------------------------------------------------------ the state
@dataclass
class EpochSums:
    """One rank's running sums over the epoch in progress: what the epoch's summary is computed from. They
    are checkpointed, so that a resumed epoch's summary still covers the whole epoch."""
    loss: float = 0.0       # sum of per-sample losses
    correct: int = 0
    samples: int = 0
    seconds: float = 0.0    # training time, between synchronised print points
    lr: float = 0.0         # the learning rate of the last step run


@dataclass
class RunState:
    """Everything training changes - model, optimizer, LR scheduler, GradScaler and EMA (in its Trainer), the
    train loader's reader position, the position, the best val top-1, the epoch's sums and every rank's
    random generators - as a checkpoint (:meth:`state_dict`) and back (:meth:`load_state_dict`)."""
    trainer: Trainer
    loader: TrainLoader          # the train loader
    config: ExperimentConfig
    steps: int                   # steps per epoch
    epoch: int = 0               # epochs completed = the one in progress, counted from 0
    step: int = 0                # steps done in the epoch in progress
    best_top1: float = 0.0
    best_epoch: int = 0          # counted from 1; 0 = not evaluated yet
    sums: EpochSums = field(default_factory=EpochSums)
    classes: Optional[list[str]] = None   # the class names in label order (the class folders), for predict.py
    # left for the first batch of a resumed run (epoch_batches): batches to draw and drop (a loader without
    # reader state replays its epoch), and this rank's generators to restore after them
    skip: int = 0
    resume_rng: Optional[dict] = None

    @property
    def info(self) -> DistInfo:
        return self.trainer.info

    def state_dict(self) -> Optional[dict]:
        """The checkpoint, on rank 0; None on the other ranks. Collective: every rank calls it at the same
        step boundary. First the loss is checked finite on every rank (a diverged state never replaces a
        good checkpoint), then every rank's generators, epoch sums and reader state travel to rank 0: each
        rank reads its own shard with its own augmentation."""
        t = self.trainer
        t.check_finite(self.epoch)
        per_rank = gather_to_main({"rng": rng_state(), "sums": dataclasses.asdict(self.sums),
                                   "loader": self.loader.state_dict()}, self.info)
        if not self.info.is_main:
            return None
        return {
            "name": self.config.model.name, "state_dict": t.module.state_dict(),
            "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict() if t.scaler else None,
            # EMA as a plain model state_dict (evaluate.py --ema loads it like any weights) + its update count
            "ema": t.ema.module.state_dict() if t.ema else None,
            "ema_n_averaged": int(t.ema.n_averaged) if t.ema else 0,
            "epoch": self.epoch, "step_in_epoch": self.step, "global_step": t.global_step,
            "best_top1": self.best_top1, "best_epoch": self.best_epoch, "config": to_dict(self.config),
            "rng": [r["rng"] for r in per_rank], "epoch_sums": [r["sums"] for r in per_rank],
            "loader": [r["loader"] for r in per_rank], "world_size": self.info.world_size,
            "classes": self.classes}

    def load_state_dict(self, ckpt: dict, source: str) -> None:
        """Continue from a checkpoint of :meth:`state_dict` (``source`` names it in errors)."""
        t = self.trainer
        load_weights(t.module, ckpt, source)
        t.optimizer.load_state_dict(ckpt["optimizer"])
        t.scheduler.load_state_dict(ckpt["scheduler"])
        if t.scaler is not None and ckpt["scaler"]:
            t.scaler.load_state_dict(ckpt["scaler"])
        if t.ema is not None and ckpt["ema"]:
            load_weights(t.ema.module, ckpt["ema"], f"{source} (ema)")
            t.ema.n_averaged.fill_(ckpt["ema_n_averaged"])
        t.global_step = ckpt["global_step"]
        self.epoch, self.step, self.best_top1 = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["best_top1"]
        self.best_epoch = ckpt["best_epoch"]
        # Each rank gets its own reader state, generators and sums back when the layout is the same; otherwise
        # rank 0's reader state serves every rank, the generators start from the seeds and rank 0 carries
        # the whole epoch's sums (they are all-reduced).
        rank, same_layout = self.info.rank, ckpt["world_size"] == self.info.world_size
        self.loader.load_state_dict(ckpt["loader"][rank if same_layout else 0])
        self.skip = 0 if self.loader.state_dict() else self.step   # no reader state: replay and drop
        self.resume_rng = ckpt["rng"][rank] if same_layout else None
        sums = [EpochSums(**s) for s in ckpt["epoch_sums"]]
        if same_layout:
            self.sums = sums[rank]
        elif rank == 0:
            self.sums = EpochSums(sum(s.loss for s in sums), sum(s.correct for s in sums),
                                  sum(s.samples for s in sums), sums[0].seconds, sums[0].lr)

    def end_epoch(self, summary: dict) -> bool:
        """Count the epoch of ``summary`` as done; True when its val top-1 is the best so far."""
        self.epoch, self.step, self.sums = self.epoch + 1, 0, EpochSums()
        best = summary.get("val_top1", -1.0) > self.best_top1
        if best:
            self.best_top1, self.best_epoch = summary["val_top1"], summary["epoch"]
        return best


def epoch_batches(state: RunState) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of the rest of the current epoch (the caller takes ``state.steps - state.step``).

    A resume is finished here, before the first batch: a loader with reader state (DALI) continues by itself;
    one without replays the epoch's order (a function of (seed, epoch) after set_epoch(): pipelines.base), so
    the ``state.skip`` batches already trained on are drawn and dropped. Then this rank's random generators
    are restored, so the augmentations continue exactly. An epoch with no steps left touches the loader not
    at all. A loader whose iterator ends early (DALI continuing an epoch that a steps_per_epoch cap left
    unfinished) is iterated again.
    """
    batches = iter(state.loader) if state.step < state.steps else iter(())
    for _ in range(state.skip if state.step < state.steps else 0):
        next(batches)
    if state.resume_rng is not None:
        set_rng_state(state.resume_rng)
    state.skip, state.resume_rng = 0, None
    return _continued(state.loader, batches)


def _continued(loader, batches: Iterator) -> Iterator:
    """``batches``, then the loader's next epochs, without end (the caller counts)."""
    while True:
        yield from batches
        batches = iter(loader)


class StepWindow:
    """The steps since the last print (or save) point: loss and hits summed on the device, no host sync per
    step; :meth:`fold` reads them once, adds them to the epoch's running sums and starts the next window."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self._start()

    def _start(self) -> None:
        self.loss.zero_()
        self.correct.zero_()
        self.steps, self.samples, self.wait = 0, 0, 0.0
        sync(self.device)
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, correct: torch.Tensor, samples: int) -> None:
        self.loss += loss
        self.correct += correct
        self.steps += 1
        self.samples += samples

    def fold(self, state: RunState) -> dict:
        """Sync; add the window to ``state.sums``; return its metrics (this rank's; img/s for all ranks)."""
        sync(self.device)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        loss, correct, s = self.loss.item() / max(self.steps, 1), self.correct.item(), state.sums
        s.loss += loss * self.samples    # the steps' mean loss x samples: every training batch is full
        s.correct += correct
        s.samples += self.samples
        s.seconds += elapsed
        m = {"loss": loss, "top1": 100.0 * correct / max(self.samples, 1),
             "img_s": self.samples * state.info.world_size / elapsed, "data_wait": self.wait / elapsed,
             "step_time": elapsed / max(self.steps, 1)}
        self._start()
        return m


# ------------------------------------------------------------------------------------------------- the loop
class Loop:
    """The epochs and steps of one run. ``train_step(images, labels) -> (loss, correct)`` runs each step:
    Trainer.step unless given (fdmobilenet.cuda_graph.GraphedStep.step replays it as a CUDA graph)."""

    def __init__(self, state: RunState, saver: CheckpointSaver, log: RunLogger, preempt: PreemptionFlag,
                 train_step: Optional[Callable] = None, eval_model: Optional[nn.Module] = None, val_loader=None):
        self.state, self.saver, self.log, self.preempt = state, saver, log, preempt
        self.train_step = train_step or state.trainer.step
        self.eval_model, self.val_loader = eval_model, val_loader
        self.window: Optional[StepWindow] = None    # while an epoch's steps run

    def run(self) -> Optional[int]:
        """Every epoch left: train, evaluate when due, log the summary, save (and link the best). Returns the
        exit code when it is not 0: 130 after a Ctrl-C."""
        s, cfg = self.state, self.state.config
        start = time.perf_counter()
        try:
            while s.epoch < cfg.optim.epochs:
                summary = self.train_epoch()
                if evaluation_due(cfg, s.epoch):
                    summary.update(self.validate())
                best = s.end_epoch(summary)
                self.log.epoch(summary)
                self.save(best)
        except Preempted as p:   # agreed at a step boundary or an evaluation batch: save, and stop
            self.save()
            pending = s.step == s.steps and evaluation_due(cfg, s.epoch)
            interrupted = self.preempt.interrupted
            self.log.print(f"{'interrupted' if interrupted else 'preempted'} ({p.signal_name}) at epoch "
                           f"{s.epoch + 1} step {s.step}, checkpoint saved to {self.saver.path}"
                           + (" (the epoch's evaluation runs first on resume)" if pending else "")
                           + ("; the same command continues from there" if interrupted else ""))
            self.log.close(plot=False)
            return cli.EXIT_INTERRUPTED if interrupted else None
        self.log.print(f"done: best val top-1 {s.best_top1:.2f}% at epoch {s.best_epoch} ({self.saver.best_path}), "
                       f"checkpoint {self.saver.path}, logs {self.log.dir}/{cfg.train.label}.csv, "
                       f"{format_duration(time.perf_counter() - start)} (h:mm:ss)")
        curves = self.log.close(cfg.train.plot, s.best_epoch)
        if curves:
            self.log.print(f"curves: {curves}")
        return None

    def train_epoch(self) -> dict:
        """Steps ``state.step`` .. ``state.steps - 1`` of epoch ``state.epoch``, each followed by the step
        boundary; returns the epoch's summary, all-reduced over the ranks (the whole epoch, also after a
        resume midway: its sums are checkpointed)."""
        s, t = self.state, self.state.trainer
        t.model.train()
        s.loader.set_epoch(s.epoch)
        batches = epoch_batches(s)
        self.window = StepWindow(t.info.device)
        for _ in watchdog.timed_steps(range(s.step, s.steps)):   # a rank that stops progressing is killed
            fetch_start = time.perf_counter()
            images, labels = next(batches)
            self.window.wait += time.perf_counter() - fetch_start
            s.sums.lr = t.optimizer.param_groups[0]["lr"]   # what this step uses; the scheduler moves it after
            loss, correct = self.train_step(images, labels)
            self.window.add(loss, correct, labels.shape[0])
            s.step += 1
            self.step_boundary()
        self.window = None
        loss_sum, correct, samples = all_reduce_sum(torch.tensor(
            [s.sums.loss, s.sums.correct, s.sums.samples], dtype=torch.float64, device=t.info.device), t.info).tolist()
        return {"epoch": s.epoch + 1, "train_res": s.loader.image_size, "lr": s.sums.lr,
                "train_loss": loss_sum / max(samples, 1), "train_top1": 100.0 * correct / max(samples, 1),
                "img_s": samples / max(s.sums.seconds, 1e-9), "epoch_time_s": s.sums.seconds}

    def step_boundary(self) -> None:
        """After each step, in this order:

        1. every train.print_freq steps and at the epoch's last step: the check that no rank's loss went
           NaN/Inf (NonFiniteLossError, nothing saved), then the log line;
        2. every ``preempt.poll_every`` steps and at the last step: the ranks agree on a preemption signal;
           on one, Preempted (:meth:`run` saves and stops; at the last step the epoch's evaluation is left
           for the resumed run);
        3. every train.save_every_steps global steps, except at the epoch's last step (the end of the epoch
           saves after its evaluation): a checkpoint.
        """
        s, t, train = self.state, self.state.trainer, self.state.config.train
        last = s.step == s.steps
        if s.step % train.print_freq == 0 or last:
            t.check_finite(s.epoch)
            m, epochs = self.window.fold(s), s.config.optim.epochs
            self.log.step({**m, "epoch": s.epoch + 1, "epochs": epochs, "step": s.step, "steps": s.steps,
                           "global_step": t.global_step, "lr": s.sums.lr, "loss_avg": s.sums.loss / s.sums.samples,
                           "top1_avg": 100.0 * s.sums.correct / s.sums.samples,
                           "steps_left": (epochs - s.epoch) * s.steps - s.step,
                           "max_mem_gib": torch.cuda.max_memory_allocated(t.info.device) / 2**30
                           if t.info.device.type == "cuda" else None})
        if (s.step % self.preempt.poll_every == 0 or last) and self.preempt.agreed(t.info):
            raise Preempted(self.preempt.signal_name)
        if train.save_every_steps > 0 and t.global_step % train.save_every_steps == 0 and not last:
            self.save()

    def save(self, best: bool = False) -> None:
        """Write the checkpoint (``best``: also as the best one); every checkpoint of a run is written here.
        Collective: every rank calls it at the same boundary. The steps since the last print point go into
        the epoch's sums first; rank 0 writes."""
        if self.window is not None:
            self.window.fold(self.state)
        ckpt = self.state.state_dict()
        if ckpt is not None:
            self.saver.save(ckpt, best)

    def validate(self) -> dict:
        """The evaluation of the trained epoch: val metrics, and the EMA's top-1 when there is an EMA. Every
        rank first takes rank 0's BatchNorm buffers (and the EMA's), the ones rank 0 saves, so that the
        numbers are the checkpoint's (docs/design.md). A preemption signal abandons it (Preempted)."""
        t, train = self.state.trainer, self.state.config.train
        broadcast_buffers(t.module, t.info)
        if t.ema is not None:
            broadcast_buffers(t.ema.module, t.info)
        m = evaluate(self.eval_model, self.val_loader, t.info, t.amp_dtype, train.print_freq,
                     max_batches=train.val_steps, preempt=self.preempt)
        if t.ema is not None:
            m["ema_val_top1"] = evaluate(t.ema.module, self.val_loader, t.info, t.amp_dtype,
                                         max_batches=train.val_steps, preempt=self.preempt)["val_top1"]
        return m
