"""The training step (Trainer), evaluation, preemption signals, and the speed switches the step runs under.

Loss, correct counts and a non-finite-loss marker stay on the device; the loop (fdmobilenet.loop) reads them
back only at its print and save points. A preemption signal only sets a flag (PreemptionFlag): the ranks
agree on it at step boundaries and evaluation batches, since a rank acting alone would leave the others
waiting in their next collective.
"""
from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fdmobilenet.config import DataConfig, TrainConfig
from fdmobilenet.distributed import DistInfo, all_reduce_sum, max_over_ranks, min_over_ranks

# How often (in steps, and in batches during an evaluation) the ranks agree on a pending preemption signal:
# one tiny all-reduce on the host-side gloo group. 10 keeps the reaction well under a minute even at
# several seconds per step.
PREEMPT_POLL_STEPS = 10


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; raised before any checkpoint could store the diverged weights."""


class Preempted(Exception):
    """The ranks agreed to stop for a preemption signal (fdmobilenet.loop.Loop.run saves, and stops)."""

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
    or torchrun, whose workers run in process groups of their own) and torchrun forwards it once. So after a
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

    OMP_NUM_THREADS, when set, is torch's choice and stays (torchrun sets 1 per worker, the launchers the
    cores per worker). Otherwise torch would start one thread per core beside the loader's threads or
    workers, and the two would preempt each other mid-kernel (benchmarks/RESULTS.md): so the cores this
    process may run on, minus the loader's threads, at least one."""
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    cores = len(os.sched_getaffinity(0))
    loader = 0 if data.loader == "synthetic" else data.num_threads
    torch.set_num_threads(max(1, cores - loader))
    return f"{torch.get_num_threads()} ({cores} cores, {loader} of them for the loader)"


def compile_enabled(train: TrainConfig, device: torch.device) -> bool:
    """``auto`` compiles on GPU only: on CPU the one-off compile time outweighs what short runs gain."""
    return train.compile == "on" or (train.compile == "auto" and device.type == "cuda")


def prepare_model(model: nn.Module, train: TrainConfig, info: DistInfo) -> tuple[nn.Module, nn.Module]:
    """Device, memory format, torch.compile, then DDP. Returns (what to train, what to evaluate): evaluation
    skips DDP, whose forward would broadcast buffers - a collective per batch, and ranks may hold different
    numbers of val batches. Compile wraps the plain module before DDP (as timm does): DDP's hooks sit on real
    parameters and checkpoint keys stay predictable (docs/design.md). ``train.compile_dynamic`` picks
    static shapes (a graph per image size) or dynamic ones (benchmarks/compile_resolutions.py)."""
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
