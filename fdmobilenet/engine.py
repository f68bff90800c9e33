"""The training and evaluation loops, their metrics, and the speed switches they run under.

No per-step host synchronisation: loss, correct counts and a non-finite-loss marker accumulate on the device
and are read back only every ``print_freq`` steps (and before a checkpoint), so the host keeps queueing work
ahead of the GPU. Throughput is timed between two synchronised log points.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fdmobilenet import watchdog
from fdmobilenet.config import TrainConfig
from fdmobilenet.distributed import DistInfo, all_reduce_sum

class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; raised before any checkpoint could store the diverged weights."""


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
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def model_input(images: torch.Tensor, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Loaders hand over float16 on GPU (data.dtype auto: half the bytes); autocast takes it as it is, a
    full-precision model (train.amp=off) needs float32. Memory format (channels_last) is kept."""
    return images.float() if amp_dtype is None and images.dtype != torch.float32 else images


def make_grad_scaler(device: torch.device, amp_dtype: Optional[torch.dtype]) -> Optional[torch.amp.GradScaler]:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def compile_enabled(train: TrainConfig, device: torch.device) -> bool:
    """``auto`` compiles on GPU only: on CPU the one-off compile time outweighs what short runs gain."""
    return train.compile == "on" or (train.compile == "auto" and device.type == "cuda")


def prepare_model(model: nn.Module, train: TrainConfig, info: DistInfo) -> tuple[nn.Module, nn.Module]:
    """Device, memory format, torch.compile, then DDP. Returns (what to train, what to evaluate): evaluation
    skips DDP, whose forward would broadcast buffers - a collective per batch, and ranks may hold different
    numbers of val batches.

    Compile wraps the plain module *before* DDP (as PyTorch's guidance for wrappers and timm do): DDP then
    sees an ordinary module and registers its hooks on real parameters, and checkpoint keys are predictable
    (``module._orig_mod.`` stripped by fdmobilenet.checkpoint). The cost is that the compiled backward is
    one graph, so gradient all-reduce overlaps less with compute; at 0.4-2.9 M parameters (one or two DDP
    buckets) that overlap is worth little.
    """
    model.to(info.device)
    if train.channels_last:
        model.to(memory_format=torch.channels_last)   # NHWC: what cuDNN's fast conv kernels want
    if compile_enabled(train, info.device):
        model = torch.compile(model, backend=train.compile_backend,
                              mode=None if train.compile_mode == "default" else train.compile_mode)
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
    """Everything one optimizer step touches."""
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
    # device-side marker: the first global step whose loss was not finite (-1 = none so far)
    first_bad_step: torch.Tensor = field(default=None)

    def __post_init__(self):
        self.first_bad_step = torch.tensor(-1, device=self.info.device)

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
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module)
        loss = loss.detach()
        newly_bad = (~torch.isfinite(loss)) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly_bad, self.global_step, self.first_bad_step)
        self.global_step += 1
        return loss, (output.detach().argmax(dim=1) == labels).sum()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_batches(loader, count: int, skip: int = 0, after_skip: Callable[[], None] = lambda: None):
    """``count`` batches of the current epoch, after drawing and dropping ``skip`` of them.

    Skipping is how a loader without reader state resumes mid-epoch: every loader shuffles per epoch from
    (seed, epoch) after set_epoch(), so it replays the same order. ``after_skip`` runs once the skipped
    batches are drawn (the trainer restores the RNG state there, so the augmentations drawn from torch's
    generator continue exactly). A loader whose iterator ends early - DALI continues an epoch that a
    steps_per_epoch cap left unfinished, and that epoch may end first - is simply iterated again.
    """
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    after_skip()
    for _ in range(count):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        yield batch


def train_one_epoch(t: Trainer, batches, epoch: int, steps: int, start_step: int, print_freq: int,
                    log_step: Callable[[dict], None], after_step: Callable[[int], bool]) -> dict:
    """Run steps ``start_step`` .. ``steps - 1`` of ``epoch`` on ``batches`` (see epoch_batches).

    ``log_step`` gets the metrics every ``print_freq`` steps (rank 0 prints them); ``after_step(steps_done)``
    returns True to stop the epoch early (preemption). Returns the summary of the steps run here,
    all-reduced over the ranks.
    """
    t.model.train()
    device = t.info.device
    batches = iter(batches)
    window_loss = torch.zeros((), device=device)
    window_correct = torch.zeros((), device=device, dtype=torch.long)
    totals = torch.zeros(2, device=device, dtype=torch.float64)   # loss sum, correct (samples: on the host)
    samples, window_steps, window_samples, wait, steps_done = 0, 0, 0, 0.0, start_step

    def fold_window() -> None:
        nonlocal samples
        totals.add_(torch.stack([window_loss.double() * (window_samples / window_steps), window_correct.double()]))
        samples += window_samples
        window_loss.zero_()
        window_correct.zero_()

    sync(device)
    window_start = time.perf_counter()
    for step in watchdog.timed_steps(range(start_step, steps)):   # a rank that stops progressing is killed
        fetch_start = time.perf_counter()
        images, labels = next(batches)
        wait += time.perf_counter() - fetch_start
        loss, correct = t.step(images, labels)
        window_loss += loss
        window_correct += correct
        window_steps += 1
        window_samples += labels.shape[0]
        steps_done = step + 1
        if steps_done % print_freq == 0 or steps_done == steps:
            sync(device)
            elapsed = time.perf_counter() - window_start
            t.check_finite(epoch)
            log_step({"epoch": epoch, "step": steps_done, "steps": steps, "global_step": t.global_step,
                      "loss": window_loss.item() / window_steps,
                      "top1": 100.0 * window_correct.item() / window_samples, "lr": t.optimizer.param_groups[0]["lr"],
                      "img_s": window_samples * t.info.world_size / elapsed, "data_wait": wait / elapsed,
                      "step_time": elapsed / window_steps})
            fold_window()
            window_steps, window_samples, wait = 0, 0, 0.0
            window_start = time.perf_counter()
        if after_step(steps_done):
            break
    if window_steps:   # stopped between print points (preemption): fold in the rest
        fold_window()
    loss_sum, correct, samples = all_reduce_sum(torch.cat([totals, totals.new_tensor([samples])]), t.info).tolist()
    return {"train_loss": loss_sum / max(samples, 1), "train_top1": 100.0 * correct / max(samples, 1),
            "steps_done": steps_done}


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, info: DistInfo, amp_dtype: Optional[torch.dtype] = None,
             print_freq: int = 0, label_map: Optional[torch.Tensor] = None) -> dict:
    """Top-1, top-5 and mean cross-entropy over the whole validation set (``label_map``: loader label ->
    model output index, for folders that hold only some of the model's classes).

    Each rank sums over its own shard (the loaders give every image to exactly one rank, the last batch
    possibly smaller), then one all-reduce adds the sums: no image is counted twice or dropped.
    """
    model.eval()
    sums = torch.zeros(3, device=info.device, dtype=torch.float64)   # loss, top-1 hits, top-5 hits
    n = 0   # images, counted on the host: a device tensor made per batch would be a copy (and a sync) each
    for i, (images, labels) in enumerate(loader):
        if label_map is not None:
            labels = label_map[labels]
        with autocast(info.device, amp_dtype):
            output = model(model_input(images, amp_dtype))
        loss = F.cross_entropy(output.float(), labels, reduction="sum")
        sums += torch.cat([loss.double()[None], correct_topk(output, labels).double()])
        n += labels.shape[0]
        if print_freq and (i + 1) % print_freq == 0 and info.is_main:
            print(f"  eval batch {i + 1}/{len(loader)}  (rank 0: {n} images so far)", flush=True)
    loss, top1, top5, n = all_reduce_sum(torch.cat([sums, sums.new_tensor([n])]), info).tolist()
    if n == 0:
        raise RuntimeError("the validation loader yielded no images")
    return {"val_loss": loss / n, "val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n, "val_images": int(n)}
