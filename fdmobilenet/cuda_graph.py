"""The training step as one CUDA graph (``train.cuda_graphs``): forward, loss, backward, the fused SGD update
and the non-finite marker are captured once and replayed for every batch.

Why: a step of this network is hundreds of small kernels, each launched from Python. A replay launches the
whole step with one call, so the host's per-kernel cost disappears from the step and the host runs ahead of
the GPU. Whether that makes training faster than eager (or than ``torch.compile(mode="reduce-overhead")``,
inductor's own graphs) is what benchmarks/run_gpu.sh measures; until it has, ``auto`` means off.

How (PyTorch's whole-network capture: torch.cuda.graph, and the CUDA graph notes' training example):

* every batch is copied into static input buffers - the graph reads fixed addresses;
* the first ``warmup_steps`` steps run eagerly (Trainer.step) on a side stream, on those buffers: cuDNN's
  autotuning, torch.compile's compilation, SGD's momentum buffers and the libraries' per-stream workspaces
  come into being there, not inside the capture;
* then Trainer.update is captured on that stream. For the capture each param group's ``lr`` is swapped for a
  one-element device tensor, so that the captured fused SGD kernel reads the learning rate from memory (SGD
  takes a Tensor lr, and torch._fused_sgd_ has a tensor-lr variant). Outside the capture ``lr`` stays the
  float the scheduler and the checkpoints know: before each replay the step writes the scheduler's current
  value into the tensor (one fill, only when it changed). So LambdaLR, ``optimizer.state_dict()`` and the
  logs are the same as in eager, and a checkpoint of a graphed run resumes eagerly and vice versa. Only the
  fused kernel reads a tensor lr on the device: torch's foreach and plain SGD turn it into a host number
  (``alpha=-lr``), a sync a capture cannot contain, so graphs need ``optim.impl`` fused (auto on a GPU);
* each later step: copy the batch in, Trainer.begin_step, replay, Trainer.end_step (lr schedule, EMA, step
  counter) on the host, as in eager. Loss and correct count are copied out of the graph's static outputs, so
  a caller may keep them across steps. The EMA update stays outside the graph: AveragedModel.update_parameters
  reads its update count on the host, a sync every step, so with optim.ema_decay > 0 the host cannot run
  ahead.

Everything the graph updates is updated in place - weights, BN statistics, momentum buffers, the non-finite
marker and the device step counter (Trainer) - so checkpoints, the NaN stop and resume read the same tensors
as in eager. The graph is captured again (after a new warm-up) when what it baked in changed: the optimizer's
state was replaced (``load_state_dict``), the parameters moved, the model switched between train and eval, or
a batch has another shape, dtype or layout - under a data.train_res ramp once per training size, as the ramp
visits each size in one stretch of epochs.

Not supported - ``train.cuda_graphs=on`` is then a ConfigError (a one-line user error), ``auto`` stays off:

* CPU: CUDA graphs need a CUDA device.
* DDP (more than one rank): PyTorch's recipe for capturing DDP's gradient all-reduce (CUDA graph notes,
  "Usage with DistributedDataParallel") wants DDP built on a side stream, at least 11 eager DDP iterations
  before the capture, and NCCL's asynchronous error handling off - the last would undo launch/common.sh's
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``, which makes a dead peer end the job instead of hanging it. Nothing in
  this project runs on more than one GPU to test it, so graphs are one-GPU only.
* fp16 AMP: GradScaler's step reads ``found_inf`` on the host (a sync, which a capture cannot contain); bf16,
  the default where the GPU has it, needs no scaler.
* ``train.compile_mode=reduce-overhead``: inductor then captures CUDA graphs of its own, inside ours.
* ``optim.impl`` other than fused: see the learning rate above.
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
