"""The training step as one CUDA graph (``train.cuda_graphs``): forward, loss, backward, the fused SGD update
and the non-finite marker are captured once and replayed for every batch, so that the host's per-kernel launch
cost leaves the step. ``auto`` stays off until benchmarks/run_gpu.sh measures it faster than eager.

Each batch is copied into static buffers; a few eager warm-up steps run on a side stream first; for the capture
each param group's ``lr`` is a device tensor (outside it the float the scheduler and checkpoints know), and the
host writes the scheduler's value into it before each replay. Lr schedule, EMA and step counter stay on the
host, as in eager, and everything the graph updates is updated in place, so a graphed run's checkpoint resumes
eagerly and vice versa. The graph is captured again when what it baked in changes (optimizer state replaced,
parameters moved, train/eval mode, the batch's shape, dtype or layout). What cannot be captured (CPU, DDP,
fp16's GradScaler, reduce-overhead's own graphs, a non-fused SGD) is what :func:`use_cuda_graphs` refuses;
the reasons: docs/design.md.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from fdmobilenet.config import ConfigError, ExperimentConfig
from fdmobilenet.distributed import DistInfo
from fdmobilenet.engine import Trainer
from fdmobilenet.optim import resolve_impl

# What train.cuda_graphs=auto means on one GPU. False until benchmarks/run_gpu.sh has measured the graphed
# step faster than eager (its "compiled_cuda_graphs" ceiling against "compiled"); then True.
AUTO_ON_ONE_GPU = False


def use_cuda_graphs(cfg: ExperimentConfig, info: DistInfo, amp_dtype: Optional[torch.dtype]) -> tuple[bool, str]:
    """(capture the step?, why) for ``train.cuda_graphs``; ConfigError when ``on`` cannot work here."""
    train = cfg.train
    if train.cuda_graphs == "off":
        return False, "off"
    blockers = []
    if info.device.type != "cuda":
        blockers.append(f"this run is on the {info.device.type}, and CUDA graphs need a GPU")
    if info.distributed:
        blockers.append(f"this run has {info.world_size} ranks, and graphs are one-GPU only (DDP's all-reduce "
                        f"is not captured; see fdmobilenet/cuda_graph.py)")
    if amp_dtype == torch.float16:
        blockers.append("fp16 AMP's GradScaler syncs with the host every step; use train.amp=bf16")
    if train.compile_mode == "reduce-overhead":
        blockers.append("train.compile_mode=reduce-overhead captures CUDA graphs of its own")
    impl = resolve_impl(cfg.optim.impl, info.device)
    if impl != "fused" and info.device.type == "cuda":
        blockers.append(f"optim.impl={impl} reads the learning rate on the host; use optim.impl=fused (or auto)")
    if blockers and train.cuda_graphs == "on":
        raise ConfigError(f"train.cuda_graphs=on: {'; '.join(blockers)}. Use train.cuda_graphs=auto or off")
    if blockers:
        return False, f"auto -> off ({blockers[0]})"
    if train.cuda_graphs == "on":
        return True, "on"
    return AUTO_ON_ONE_GPU, ("auto -> on" if AUTO_ON_ONE_GPU else
                             "auto -> off (not yet measured faster than eager on a GPU)")


def capture_cuda_graph(body: Callable[[], None], stream: torch.cuda.Stream) -> Callable[[], None]:
    """Capture ``body`` on ``stream`` (nothing runs yet); returns the replay, which runs on the stream that
    is current when it is called.

    ``thread_local``: only this thread is held to capture rules. DALI's worker threads keep decoding the next
    batches meanwhile, on streams of their own, and may allocate or synchronise while we capture; in the
    default ``global`` mode that would abort their work (and invalidate the capture)."""
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            body()
    except RuntimeError as e:
        raise RuntimeError(f"capturing the training step as a CUDA graph failed: {e}. train.cuda_graphs=off "
                           f"runs the step eagerly") from e
    return graph.replay


class GraphedStep:
    """``step(images, labels) -> (loss, correct)`` like Trainer.step, run as a replayed CUDA graph (see the
    module docstring), for a trainer that :func:`use_cuda_graphs` allows. ``capture(body, stream) -> replay``
    is :func:`capture_cuda_graph`; the CPU tests give a stand-in that replays by calling ``body``."""

    def __init__(self, trainer: Trainer, warmup_steps: int = 3,
                 capture: Callable[[Callable[[], None], Optional[torch.cuda.Stream]], Callable[[], None]]
                 = capture_cuda_graph):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1 (the capture needs one eager step first), "
                             f"got {warmup_steps}")
        self.trainer, self.warmup_steps, self._capture = trainer, warmup_steps, capture
        device = trainer.info.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._baked: Optional[tuple] = None      # what the graph (or the warm-up towards it) depends on
        self._replay: Optional[Callable[[], None]] = None
        self._warmed = 0
        self._lrs: list[torch.Tensor] = []       # one device tensor per param group, read by the graph
        self._lrs_hold: list[float] = []         # what they hold

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.trainer
        baked = self._fingerprint(images, labels)
        if not self._same(baked):                # first step, or something the graph depends on changed
            self._replay, self._warmed, self._baked = None, 0, baked
            self._images, self._labels = torch.empty_like(images), torch.empty_like(labels)
        self._images.copy_(images)
        self._labels.copy_(labels)
        if self._replay is None and self._warmed < self.warmup_steps:
            self._warmed += 1
            loss, correct = self._on_side_stream(lambda: t.step(self._images, self._labels))
            self._output_dtypes = loss.dtype, correct.dtype
            return loss, correct
        if self._replay is None:
            self._prepare_capture()
            self._replay = self._capture(self._captured_update, self._stream)
        t.begin_step()
        self._load_lrs()
        self._replay()
        t.end_step()
        return self._outputs[0].clone(), self._outputs[1].clone()

    def _fingerprint(self, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        """What a replay silently relies on, cheaply: the optimizer state object (load_state_dict replaces it
        and every momentum buffer; held here, so that a new one can never reuse its id), where the parameters
        live, train/eval mode, the batch's layout."""
        t = self.trainer
        first = next(t.module.parameters())
        return (t.optimizer.state, first.data_ptr(), t.module.training, len(t.optimizer.param_groups),
                *((x.shape, x.stride(), x.dtype, x.device) for x in (images, labels)))

    def _same(self, baked: tuple) -> bool:
        return self._baked is not None and baked[0] is self._baked[0] and baked[1:] == self._baked[1:]

    def _on_side_stream(self, fn: Callable):
        """``fn()`` on the side stream, ordered after everything queued so far and before what comes next:
        the side stream waits for the current one first, so it never reuses memory the current stream may
        still read (the previous step's outputs), and the current one waits for it afterwards."""
        if self._stream is None:
            return fn()
        current = torch.cuda.current_stream(self._stream.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            out = fn()
        current.wait_stream(self._stream)
        return out

    def _prepare_capture(self) -> None:
        """The graph's other static tensors, made before the capture (a capture may not copy from the host):
        one learning-rate tensor per param group and the loss / correct outputs."""
        device = self.trainer.info.device
        self._lrs_hold = [float(g["lr"]) for g in self.trainer.optimizer.param_groups]
        self._lrs = [torch.tensor(lr, dtype=torch.float32, device=device) for lr in self._lrs_hold]
        self._outputs = tuple(torch.zeros((), dtype=dtype, device=device) for dtype in self._output_dtypes)

    def _captured_update(self) -> None:
        """What the graph holds: Trainer.update on the static buffers, the param groups' learning rates read
        from the device tensors, the results copied into the static outputs."""
        groups = self.trainer.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for g, lr in zip(groups, self._lrs):
            g["lr"] = lr
        try:
            loss, correct = self.trainer.update(self._images, self._labels)
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr
        self._outputs[0].copy_(loss)
        self._outputs[1].copy_(correct)

    def _load_lrs(self) -> None:
        for i, g in enumerate(self.trainer.optimizer.param_groups):
            if g["lr"] != self._lrs_hold[i]:
                self._lrs[i].fill_(g["lr"])
                self._lrs_hold[i] = g["lr"]
