"""A training run at a step boundary, and its checkpoint.

:class:`RunState` holds everything training changes - model, optimizer, LR scheduler, GradScaler and EMA (in
its Trainer), the train loader's reader position, the epoch and step, the best val top-1, the epoch's
running sums and every rank's random generators - and turns it into a checkpoint (``state_dict``) and back
(``load_state_dict``).

Position: ``epoch`` counts the epochs completed, i.e. the epoch in progress counted from 0 (what the LR
schedule and the loaders use; logs and messages count from 1), and ``step`` the steps done in it. ``step ==
steps`` is an epoch whose steps are all trained but whose evaluation, log row and end-of-epoch checkpoint
are still to come: what a preemption signal during the evaluation saves, and what a resumed run finishes
first (train_one_epoch runs no step, the evaluation runs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from fdmobilenet.checkpoint import CheckpointSaver, load_weights
from fdmobilenet.config import ExperimentConfig, to_dict
from fdmobilenet.distributed import DistInfo, gather_to_main, rng_state
from fdmobilenet.engine import Trainer
from pipelines.base import BatchLoader


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
    trainer: Trainer
    loader: BatchLoader          # the train loader
    config: ExperimentConfig
    steps: int                   # steps per epoch
    epoch: int = 0               # epochs completed = the one in progress, counted from 0
    step: int = 0                # steps done in the epoch in progress
    best_top1: float = 0.0
    best_epoch: int = 0          # counted from 1; 0 = not evaluated yet
    sums: EpochSums = field(default_factory=EpochSums)
    classes: Optional[list[str]] = None   # the class names in label order (the class folders), for predict
    # left for the first batch of a resumed run (engine.epoch_batches): batches to draw and drop (a loader
    # without reader state replays its epoch), and this rank's generators to restore after them
    skip: int = 0
    resume_rng: Optional[dict] = None

    @property
    def info(self) -> DistInfo:
        return self.trainer.info

    def state_dict(self) -> Optional[dict]:
        """The checkpoint, on rank 0; None on the other ranks. Collective: every rank calls it at the same
        step boundary. First the loss is checked finite on every rank (a diverged state never replaces a
        good checkpoint), then every rank's generators and epoch sums travel to rank 0."""
        t = self.trainer
        t.check_finite(self.epoch)
        # every rank's own generators, epoch sums and reader state: each rank reads its own shard with its
        # own augmentation
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
        """Continue from a checkpoint of :meth:`state_dict` (``source`` names it in errors). Checkpoints of
        this project from before ``best_epoch`` / ``epoch_sums`` existed load too (best epoch unknown: 0;
        sums of a resumed epoch: from the resume on)."""
        t = self.trainer
        load_weights(t.module, ckpt, source)
        t.optimizer.load_state_dict(ckpt["optimizer"])
        t.scheduler.load_state_dict(ckpt["scheduler"])
        if t.scaler is not None and ckpt.get("scaler"):
            t.scaler.load_state_dict(ckpt["scaler"])
        if t.ema is not None and ckpt.get("ema"):
            load_weights(t.ema.module, ckpt["ema"], f"{source} (ema)")
            t.ema.n_averaged.fill_(ckpt["ema_n_averaged"])
        t.global_step = ckpt["global_step"]
        self.epoch, self.step, self.best_top1 = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["best_top1"]
        self.best_epoch = ckpt.get("best_epoch", 0)
        # Each rank gets its own reader state, generators and sums back when the layout is the same; otherwise
        # rank 0's reader state serves every rank, the generators start from the seeds and rank 0 carries
        # the whole epoch's sums (they are all-reduced).
        rank, same_layout = self.info.rank, ckpt.get("world_size") == self.info.world_size
        readers = ckpt.get("loader") or [{}]
        if isinstance(readers, dict):   # a file holding one reader state (rank 0's) for every rank
            readers = [readers]
        self.loader.load_state_dict(readers[rank] if same_layout and len(readers) > 1 else readers[0])
        self.skip = 0 if self.loader.state_dict() else self.step   # no reader state: replay and drop
        self.resume_rng = ckpt["rng"][rank] if same_layout else None
        sums = [EpochSums(**s) for s in ckpt.get("epoch_sums", [])]
        if sums and same_layout:
            self.sums = sums[rank]
        elif sums and rank == 0:
            self.sums = EpochSums(sum(s.loss for s in sums), sum(s.correct for s in sums),
                                  sum(s.samples for s in sums), sums[0].seconds, sums[0].lr)

    def save(self, saver: CheckpointSaver, best: bool = False) -> None:
        """Collective: :meth:`state_dict`, written by rank 0 (``best``: also as the best checkpoint)."""
        ckpt = self.state_dict()
        if ckpt is not None:
            saver.save(ckpt, best)

    def end_epoch(self, summary: dict) -> bool:
        """Count the epoch of ``summary`` as done; True when its val top-1 is the best so far."""
        self.epoch, self.step, self.sums = self.epoch + 1, 0, EpochSums()
        best = summary.get("val_top1", -1.0) > self.best_top1
        if best:
            self.best_top1, self.best_epoch = summary["val_top1"], summary["epoch"]
        return best
