"""SGD (torch fused / foreach / plain, or NVIDIA apex), the learning-rate schedule and the weight EMA.

The paper's recipe: SGD, Nesterov momentum 0.9, weight decay 4e-5 on every parameter, lr 0.1 for a global
batch of 256, x0.1 every 30 epochs, 120 epochs. For another global batch the base lr scales linearly
(Goyal et al. 2017): lr = optim.lr * batch_size / base_batch_size; large batches usually want warmup_epochs.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fdmobilenet.config import OptimConfig, SchedConfig


def scaled_lr(cfg: OptimConfig) -> float:
    """The peak learning rate for the configured global batch (linear scaling rule)."""
    return cfg.lr * cfg.batch_size / cfg.base_batch_size


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto``: the fused CUDA kernel on GPU (one launch for all parameters), the foreach path on CPU."""
    if impl == "auto":
        return "fused" if device.type == "cuda" else "foreach"
    return impl


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """All parameters decayed (the paper), or, with no_wd_bn_bias, BN weights and biases (every 1-D
    parameter) left undecayed."""
    if not cfg.no_wd_bn_bias:
        return [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    impl = resolve_impl(cfg.impl, device)
    groups = param_groups(model, cfg)
    kwargs = dict(lr=scaled_lr(cfg), momentum=cfg.momentum, nesterov=cfg.nesterov)
    if impl == "apex":
        try:
            from apex.optimizers import FusedSGD
        except ImportError as e:
            raise RuntimeError("optim.impl=apex needs NVIDIA apex (github.com/NVIDIA/apex, built with "
                               "--cuda_ext; the PyPI package called 'apex' is unrelated), which is not "
                               "importable here. torch has the same fused kernel built in: use "
                               "optim.impl=fused (or auto)") from e
        return FusedSGD(groups, **kwargs)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {"foreach": False}}[impl]
    return torch.optim.SGD(groups, **kwargs, **flags)


def lr_multiplier(optim_cfg: OptimConfig, sched_cfg: SchedConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``step`` optimizer steps.

    step: lr x gamma^(epoch // step_size), constant within an epoch (the paper steps it once per epoch);
    cosine: per-step cosine from the peak to min_lr over all epochs. Either way, the first warmup_epochs rise
    linearly (per step) from ~0 to the peak.
    """
    peak = scaled_lr(optim_cfg)
    total = optim_cfg.epochs * steps_per_epoch
    warmup = round(optim_cfg.warmup_epochs * steps_per_epoch)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if sched_cfg.type == "step":
            return sched_cfg.gamma ** ((step // steps_per_epoch) // sched_cfg.step_size)
        progress = (step - warmup) / max(1, total - warmup)
        floor = sched_cfg.min_lr / peak
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, sched_cfg: SchedConfig,
                    steps_per_epoch: int) -> LambdaLR:
    """Stepped once per optimizer step (so warmup and cosine are smooth; the step schedule's value only
    changes at epoch boundaries). Its state_dict holds the step count; the rule itself comes from config.
    One LambdaLR rather than SequentialLR(LinearLR, StepLR / CosineAnnealingLR): SequentialLR restarts the
    second scheduler's count after the warmup, which moves StepLR's decays off the epoch boundaries
    (tests/test_trainer.py compares the two)."""
    return LambdaLR(optimizer, lr_multiplier(optim_cfg, sched_cfg, steps_per_epoch))


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """Exponential moving average of the weights and BN buffers (None when optim.ema_decay is 0, the paper).
    ``model`` is the plain module (not DDP, not compiled) so the EMA's keys match the model's."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
