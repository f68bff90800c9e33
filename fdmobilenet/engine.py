"""The training and evaluation loops, their metrics, and the speed switches they run under.

No per-step host synchronisation: loss, correct counts and a non-finite-loss marker accumulate on the device
and are read back only every ``print_freq`` steps (and before a checkpoint), so the host keeps queueing work
ahead of the GPU. Throughput is timed between two synchronised log points.

Preemption: SIGTERM / SIGUSR1, and SIGINT (Ctrl-C), only set a flag (PreemptionFlag); the ranks agree on it
every ``poll_every`` steps and at an epoch's last step (train_one_epoch), and every ``poll_every`` batches of
an evaluation (evaluate), then save and raise Preempted. A rank acting on the signal alone would leave the
others waiting in their next collective.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fdmobilenet import watchdog
from fdmobilenet.config import DataConfig, TrainConfig
from fdmobilenet.distributed import (DistInfo, all_reduce_sum, broadcast_buffers, max_over_ranks, min_over_ranks,
                                     set_rng_state)

if TYPE_CHECKING:   # annotations only: state imports this module
    from fdmobilenet.checkpoint import CheckpointSaver
    from fdmobilenet.logs import RunLogger
    from fdmobilenet.state import RunState

# How often (in steps, and in batches during an evaluation) the ranks agree on a pending preemption signal:
# one tiny all-reduce on the host-side gloo group. 10 keeps the reaction well under a minute even at
# several seconds per step.
PREEMPT_POLL_STEPS = 10

class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; raised before any checkpoint could store the diverged weights."""


class Preempted(Exception):
    """The ranks agreed to stop for a preemption signal; raised once the checkpoint is saved."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (preemption) and SIGINT (Ctrl-C) only set a flag; :meth:`agreed` is the collective
    that acts on it. Repeats of SIGTERM / SIGUSR1 are ignored: SLURM signals every process of the step and
    torchrun forwards the same signal again milliseconds later, so a worker routinely gets it twice
    (tests/test_launch_slurm.py). A stuck process is ended by torchrun's --shutdown-timeout, SLURM's
    KillWait, or SIGKILL.

    A SIGINT reaches a worker once per Ctrl-C: a terminal signals its foreground process group (one process,
    or torchrun, whose workers run in sessions of their own) and torchrun forwards it once. So after a
    SIGINT the next SIGINT - a second Ctrl-C - or SIGTERM - what torchrun sends its workers on a second
    Ctrl-C - stops the process at once: KeyboardInterrupt wherever it is (a checkpoint being written is left
    as it was: saves are atomic), and the default action for any signal after that."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)   # the handlers it installs

    def __init__(self, poll_every: int = PREEMPT_POLL_STEPS):
        self.poll_every = poll_every
        self.requested = False
        self.interrupted = False    # after agreed(): some rank got SIGINT, the user's stop (not a preemption)
        self._sigint = False        # this rank got SIGINT
        self.signal_name = "signal on another rank"
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self._sigint and signum in (signal.SIGINT, signal.SIGTERM):
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            raise KeyboardInterrupt("a second one, so at once, without a checkpoint (the last one written is "
                                    "unchanged)")
        self._sigint = self._sigint or signum == signal.SIGINT
        if not self.requested:
            self.requested, self.signal_name = True, signal.Signals(signum).name

    def agreed(self, info: DistInfo) -> bool:
        """True on every rank when any rank got a signal. Every rank must call it at the same point."""
        state = max_over_ranks(2 if self._sigint else int(self.requested), info)
        self.interrupted = state == 2
        return state > 0


# ------------------------------------------------------------------------------------------- speed switches
def setup_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN autotuning and TF32 for speed, or bit-reproducible kernels when train.deterministic is set."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed input shapes: autotuned convolutions pay off
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for full fp32. ``auto``: bf16 on GPUs that support it (no loss scaling
    needed), fp16 on older GPUs, off on CPU (CPU autocast is slower for convolutions than fp32 here)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"train.amp=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support; "
                           f"use train.amp=fp16 (or auto)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """torch.autocast without its weight cache: a CUDA graph capture requires it off (PyTorch's CUDA graph
    notes, "Usage with torch.cuda.amp"), and it saves nothing here - every weight is cast once per forward
    either way."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype, cache_enabled=False)


def model_input(images: torch.Tensor, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Loaders hand over float16 on GPU (data.dtype auto: half the bytes); autocast takes it as it is, a
    full-precision model (train.amp=off) needs float32. Memory format (channels_last) is kept."""
    return images.float() if amp_dtype is None and images.dtype != torch.float32 else images


def make_grad_scaler(device: torch.device, amp_dtype: Optional[torch.dtype]) -> Optional[torch.amp.GradScaler]:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def set_cpu_threads(data: DataConfig) -> str:
    """Set torch's intra-op threads for this process; returns the choice and its reason, for the log.

    OMP_NUM_THREADS, when set, is torch's choice and stays: torchrun sets 1 per worker, the launchers the
    cores per worker. Otherwise torch would start one thread per core while the loader runs its
    data.num_threads threads (DALI) or worker processes (DataLoader) on the same cores; oversubscribed, the
    two preempt each other mid-kernel (a plain process on 2 cores trained several times slower than with
    one thread: benchmarks/RESULTS.md). So: the cores this process may run on, minus the loader's threads,
    at least one."""
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    cores = len(os.sched_getaffinity(0))
    loader = 0 if data.loader == "synthetic" else data.num_threads
    torch.set_num_threads(max(1, cores - loader))
    return f"{torch.get_num_threads()} ({cores} cores, {loader} of them for the loader)"


def compile_enabled(train: TrainConfig, device: torch.device) -> bool:
    """``auto`` compiles on GPU only: on CPU the one-off compile time outweighs what short runs gain."""
    return train.compile == "on" or (train.compile == "auto" and device.type == "cuda")


def prepare_model(model: nn.Module, train: TrainConfig, info: DistInfo,
                  dynamic: Optional[bool] = None) -> tuple[nn.Module, nn.Module]:
    """Device, memory format, torch.compile, then DDP. Returns (what to train, what to evaluate): evaluation
    skips DDP, whose forward would broadcast buffers - a collective per batch, and ranks may hold different
    numbers of val batches. ``dynamic`` is torch.compile's: None (its default) turns a second input shape into
    a dynamic-shape graph, False compiles every shape as its own static graph (the benchmarks, whose shapes
    are fixed per measurement).

    Compile wraps the plain module *before* DDP (as PyTorch's guidance for wrappers and timm do): DDP then
    sees an ordinary module and registers its hooks on real parameters, and checkpoint keys are predictable
    (``module._orig_mod.`` stripped by fdmobilenet.checkpoint). The cost is that the compiled backward is
    one graph, so gradient all-reduce overlaps less with compute; at 0.4-2.9 M parameters (one or two DDP
    buckets) that overlap is worth little.

    ``train.compile_dynamic`` picks static shapes (a graph per image size: the few sizes of a data.train_res
    ramp and the val size) or dynamic ones; benchmarks/compile_resolutions.py measured which trains faster.
    """
    model.to(info.device)
    if train.channels_last:
        model.to(memory_format=torch.channels_last)   # NHWC: what cuDNN's fast conv kernels want
    if compile_enabled(train, info.device):
        model = torch.compile(model, backend=train.compile_backend,
                              mode=None if train.compile_mode == "default" else train.compile_mode,
                              dynamic={"auto": None, "on": True, "off": False}[train.compile_dynamic])
    if not info.distributed:
        return model, model
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
        gradient_as_bucket_view=True)   # grads live in the comm buckets: one copy less per step
    return ddp, model


# ---------------------------------------------------------------------------------------------------- metrics
def correct_topk(output: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is within the top-k logits, for each k (a device tensor, no sync)."""
    kmax = min(max(ks), output.shape[1])
    top = output.topk(kmax, dim=1).indices
    hit = top == target[:, None]
    return torch.stack([hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks])


def accuracy(output: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent (host floats: this one syncs)."""
    return [100.0 * c / target.numel() for c in correct_topk(output, target, ks).tolist()]


# ------------------------------------------------------------------------------------------------- training
@dataclass
class Trainer:
    """Everything one optimizer step touches.

    A step is three parts: :meth:`begin_step` (host: the device copy of the step counter follows
    ``global_step``), :meth:`update` (device: forward, loss, backward, optimizer step, the non-finite marker -
    no host sync and no host value that changes from step to step, so that fdmobilenet.cuda_graph can
    capture it as a CUDA graph) and :meth:`end_step` (host: lr schedule, EMA, the step counter). :meth:`step`
    runs the three; it is what the training loop calls unless the step is graphed.
    """
    model: nn.Module            # what forward runs: DDP and/or compiled wrapper around `module`
    module: nn.Module           # the plain FDMobileNet (state_dict, EMA source)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    info: DistInfo
    amp_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Optional[nn.Module] = None
    global_step: int = 0
    # device-side marker, updated in place: the first global step whose loss was not finite (-1 = none so far)
    first_bad_step: torch.Tensor = field(default=None)

    def __post_init__(self):
        self.first_bad_step = torch.tensor(-1, device=self.info.device)
        # global_step on the device (what the marker records), and the value the host last put there
        self._device_step = torch.tensor(0, device=self.info.device)
        self._device_step_holds = 0

    def check_finite(self, epoch: int) -> None:
        """Raise NonFiniteLossError if any rank saw a non-finite loss (a sync; call at log/save points).
        ``epoch`` counts from 0, as everywhere in the code; messages show it from 1, as the log lines do."""
        bad = self.first_bad_step.clone()
        if self.info.distributed:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() >= 0:
            raise NonFiniteLossError(f"training loss is NaN/Inf in epoch {epoch + 1}, at global step {bad.item()} "
                                     f"(counted from 0); "
                                     f"stopped without saving, the last checkpoint is the last good state. "
                                     f"Lower optim.lr or raise optim.warmup_epochs")

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss, number correct) as device tensors."""
        self.begin_step()
        loss, correct = self.update(images, labels)
        self.end_step()
        return loss, correct

    def begin_step(self) -> None:
        if self._device_step_holds != self.global_step:   # global_step was set from outside (a resume)
            self._device_step.fill_(self.global_step)
            self._device_step_holds = self.global_step

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The device work of one step; returns (loss, number correct)."""
        with autocast(self.info.device, self.amp_dtype):
            output = self.model(model_input(images, self.amp_dtype))
            loss = self.criterion(output, labels)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        loss = loss.detach()
        newly_bad = (~torch.isfinite(loss)) & (self.first_bad_step < 0)
        self.first_bad_step.copy_(torch.where(newly_bad, self._device_step, self.first_bad_step))
        self._device_step += 1
        return loss, (output.detach().argmax(dim=1) == labels).sum()

    def end_step(self) -> None:
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module)
        self.global_step += 1
        self._device_step_holds += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_batches(state: RunState) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of the rest of the current epoch (the caller takes ``state.steps - state.step``).

    A resume is finished here, before the first batch: a loader with reader state (DALI) continues by itself;
    one without replays the epoch's order (its order is a function of (seed, epoch) after set_epoch(): the
    contract in pipelines.base), so the ``state.skip`` batches already trained on are drawn and dropped. Then this rank's
    random generators from the checkpoint are restored, so the augmentations drawn from torch's generator
    continue exactly. An epoch with no steps left (trained, evaluation pending) touches the loader not at
    all. A loader whose iterator ends early - DALI continues an epoch that a steps_per_epoch cap left
    unfinished, and that epoch may end first - is simply iterated again.
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
             "img_s": self.samples * state.trainer.info.world_size / elapsed, "data_wait": self.wait / elapsed,
             "step_time": elapsed / max(self.steps, 1)}
        self._start()
        return m


def train_one_epoch(state: RunState, cfg: TrainConfig, log: RunLogger, saver: CheckpointSaver,
                    preempt: PreemptionFlag, step: Optional[Callable] = None) -> dict:
    """Train steps ``state.step`` .. ``state.steps - 1`` of epoch ``state.epoch``; return the epoch's summary,
    all-reduced over the ranks (the whole epoch, also after a resume midway: its sums are checkpointed).
    ``step(images, labels) -> (loss, correct)`` runs each step: Trainer.step unless given
    (fdmobilenet.cuda_graph.GraphedStep.step replays it as a CUDA graph).

    At each step boundary, in this order: every ``cfg.print_freq`` steps and at the epoch's last step a log
    line (and the non-finite loss check); every ``preempt.poll_every`` steps and at the last step the ranks'
    agreement on a preemption signal; a checkpoint every ``cfg.save_every_steps`` global steps (not at the
    epoch's last step: the end of the epoch saves after its evaluation) and on a signal - one when both fall
    on the step - then, on a signal, Preempted. A signal at the last step leaves the epoch trained but not evaluated: the resumed run
    evaluates it first.
    """
    t, info, epochs = state.trainer, state.trainer.info, state.config.optim.epochs
    t.model.train()
    state.loader.set_epoch(state.epoch)
    batches = epoch_batches(state)
    window = StepWindow(info.device)
    for _ in watchdog.timed_steps(range(state.step, state.steps)):   # a rank that stops progressing is killed
        fetch_start = time.perf_counter()
        images, labels = next(batches)
        window.wait += time.perf_counter() - fetch_start
        state.sums.lr = t.optimizer.param_groups[0]["lr"]   # what this step uses; the scheduler moves it after
        loss, correct = (step or t.step)(images, labels)
        window.add(loss, correct, labels.shape[0])
        state.step += 1
        last = state.step == state.steps
        if state.step % cfg.print_freq == 0 or last:
            t.check_finite(state.epoch)
            m = window.fold(state)
            s = state.sums
            log.step({**m, "epoch": state.epoch + 1, "epochs": epochs, "step": state.step, "steps": state.steps,
                      "global_step": t.global_step, "lr": s.lr, "loss_avg": s.loss / s.samples,
                      "top1_avg": 100.0 * s.correct / s.samples,
                      "steps_left": (epochs - state.epoch) * state.steps - state.step,
                      "max_mem_gib": torch.cuda.max_memory_allocated(info.device) / 2**30
                      if info.device.type == "cuda" else None})
        save_due = cfg.save_every_steps > 0 and t.global_step % cfg.save_every_steps == 0 and not last
        stop = (state.step % preempt.poll_every == 0 or last) and preempt.agreed(info)
        if save_due or stop:            # one save when a periodic save and a preemption meet at a step
            window.fold(state)
            state.save(saver)
        if stop:
            raise Preempted(preempt.signal_name)
    s = state.sums
    loss_sum, correct, samples = all_reduce_sum(
        torch.tensor([s.loss, s.correct, s.samples], dtype=torch.float64, device=info.device), info).tolist()
    return {"epoch": state.epoch + 1, "train_res": state.loader.image_size, "lr": s.lr,
            "train_loss": loss_sum / max(samples, 1),
            "train_top1": 100.0 * correct / max(samples, 1), "img_s": samples / max(s.seconds, 1e-9),
            "epoch_time_s": s.seconds}


def validate(state: RunState, model: nn.Module, loader, cfg: TrainConfig, saver: CheckpointSaver,
             preempt: PreemptionFlag) -> dict:
    """The evaluation of a training epoch, of the weights the checkpoint will hold: val metrics, and the
    EMA's top-1 when there is an EMA.

    Every rank first takes rank 0's BatchNorm buffers (and the EMA's), the ones rank 0 saves. They differ
    otherwise: DDP broadcasts rank 0's buffers at the start of every training forward, then each rank
    updates its copy from its own batch, so after the last step every rank holds slightly different
    running statistics, and a distributed evaluation would score a mixture no checkpoint contains.
    Broadcasting rather than averaging (timm's distribute_bn offers both) keeps the saved file and the
    training trajectory exactly as they were - the next forward broadcasts rank 0's buffers anyway - and
    makes the logged numbers the saved model's: evaluate.py on the checkpoint, same ranks and batches,
    reproduces them.

    A preemption signal during the evaluation abandons it: the trained epoch is saved (``state.step ==
    state.steps``) and Preempted raised; the resumed run evaluates the epoch first.
    """
    t = state.trainer
    broadcast_buffers(t.module, t.info)
    if t.ema is not None:
        broadcast_buffers(t.ema.module, t.info)
    try:
        m = evaluate(model, loader, t.info, t.amp_dtype, cfg.print_freq, max_batches=cfg.val_steps, preempt=preempt)
        if t.ema is not None:
            m["ema_val_top1"] = evaluate(t.ema.module, loader, t.info, t.amp_dtype, max_batches=cfg.val_steps,
                                         preempt=preempt)["val_top1"]
    except Preempted:
        state.save(saver)
        raise
    return m


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, info: DistInfo, amp_dtype: Optional[torch.dtype] = None,
             print_freq: int = 0, label_map: Optional[torch.Tensor] = None, max_batches: int = 0,
             preempt: Optional[PreemptionFlag] = None) -> dict:
    """Top-1, top-5 and mean cross-entropy over the validation set (``label_map``: loader label -> model
    output index, for folders that hold only some of the model's classes; ``max_batches`` > 0: only the first
    that many batches of each rank, train.val_steps).

    Each rank sums over its own shard (the loaders give every image to exactly one rank, the last batch
    possibly smaller), then one all-reduce adds the sums: no image is counted twice or dropped.
    With ``preempt``, the ranks agree on a pending signal every ``preempt.poll_every`` batches and raise
    Preempted on one. The ranks' batch counts can differ by one, so the polls stop at the smallest count:
    a poll at a batch that one rank never reaches would leave the others waiting in it.
    """
    model.eval()
    batches = len(loader) if max_batches <= 0 else min(len(loader), max_batches)
    polled = min_over_ranks(batches, info) if preempt is not None else 0
    sums = torch.zeros(3, device=info.device, dtype=torch.float64)   # loss, top-1 hits, top-5 hits
    n = 0   # images, counted on the host: a device tensor made per batch would be a copy (and a sync) each
    for i, (images, labels) in enumerate(loader):
        if i == batches:
            break
        if label_map is not None:
            labels = label_map[labels]
        with autocast(info.device, amp_dtype):
            output = model(model_input(images, amp_dtype))
        loss = F.cross_entropy(output.float(), labels, reduction="sum")
        sums += torch.cat([loss.double()[None], correct_topk(output, labels).double()])
        n += labels.shape[0]
        if print_freq and (i + 1) % print_freq == 0 and info.is_main:
            print(f"  eval batch {i + 1}/{batches}  (rank 0: {n} images so far)", flush=True)
        if preempt is not None and (i + 1) % preempt.poll_every == 0 and i + 1 <= polled and preempt.agreed(info):
            raise Preempted(preempt.signal_name)
    loss, top1, top5, n = all_reduce_sum(torch.cat([sums, sums.new_tensor([n])]), info).tolist()
    if n == 0:
        raise RuntimeError("the validation loader yielded no images")
    return {"val_loss": loss / n, "val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n, "val_images": int(n)}
