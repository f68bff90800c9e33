"""The CUDA-graphed training step (fdmobilenet/cuda_graph.py).

On CPU: when ``train.cuda_graphs`` turns graphs on and the errors for what cannot work; and the graphed step's
orchestration - warm-up, one capture, static buffers, learning rates read from device tensors, step counter,
non-finite marker, EMA, re-capture when what the graph baked in changes, the training loop and its
checkpoints - with a stand-in for torch.cuda.CUDAGraph that replays by calling the captured function (there
is no CUDA here, so nothing can be captured: the stand-in is the one mock, and the ``gpu`` tests below run
the real capture). A command with ``train.cuda_graphs=on`` on a CPU is a one-line user error: tests/test_bad_input.py.
"""
from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fdmobilenet.checkpoint import CheckpointSaver, load_checkpoint
from fdmobilenet.config import (ConfigError, ExperimentConfig, OptimConfig, ResolutionRamp, SchedConfig,
                                TrainConfig)
from fdmobilenet.cuda_graph import GraphedStep, use_cuda_graphs
from fdmobilenet.distributed import DistInfo
from fdmobilenet.engine import (NonFiniteLossError, PreemptionFlag, Trainer, make_grad_scaler, prepare_model,
                                setup_backends)
from fdmobilenet.logs import RunLogger
from fdmobilenet.loop import Loop, RunState
from fdmobilenet.model import FDMobileNet
from fdmobilenet.optim import build_ema, build_optimizer, build_scheduler
from launch_support import build_digits, env, kill_group, start, wait_for
from pipelines import build_loader

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo(0, 0, 1, torch.device("cpu"))
ONE_GPU = DistInfo(0, 0, 1, torch.device("cuda", 0))          # a description only: nothing runs on it here
TWO_GPUS = DistInfo(0, 0, 2, torch.device("cuda", 0))


# ------------------------------------------------------------------------------------------ configuration
def experiment(**train) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.train = dataclasses.replace(cfg.train, **{k: v for k, v in train.items() if k != "impl"})
    cfg.optim = dataclasses.replace(cfg.optim, impl=train.get("impl", "auto"))
    return cfg


def test_when_graphs_are_on():
    assert use_cuda_graphs(experiment(cuda_graphs="off"), ONE_GPU, torch.bfloat16) == (False, "off")
    assert use_cuda_graphs(experiment(cuda_graphs="on"), ONE_GPU, torch.bfloat16) == (True, "on")
    assert use_cuda_graphs(experiment(cuda_graphs="on"), ONE_GPU, None) == (True, "on")      # fp32
    assert use_cuda_graphs(experiment(cuda_graphs="on", impl="fused"), ONE_GPU, None) == (True, "on")
    on, why = use_cuda_graphs(experiment(), ONE_GPU, torch.bfloat16)   # auto: off until measured faster
    assert not on and "not yet measured" in why
    for info, amp, settings, reason in (
            (CPU, None, {}, "this run is on the cpu, and CUDA graphs need a GPU"),
            (TWO_GPUS, torch.bfloat16, {}, "2 ranks"),
            (ONE_GPU, torch.float16, {}, "GradScaler"),
            (ONE_GPU, torch.bfloat16, {"compile_mode": "reduce-overhead"}, "reduce-overhead"),
            (ONE_GPU, torch.bfloat16, {"impl": "foreach"}, "optim.impl=foreach reads the learning rate on the host"),
            (ONE_GPU, torch.bfloat16, {"impl": "plain"}, "optim.impl=plain"),
            (ONE_GPU, torch.bfloat16, {"impl": "apex"}, "optim.impl=apex")):
        on, why = use_cuda_graphs(experiment(**settings), info, amp)
        assert not on and why.startswith("auto -> off (") and reason in why
        with pytest.raises(ConfigError, match=f"train.cuda_graphs=on: .*{re.escape(reason)}.*"
                                              f"Use train.cuda_graphs=auto or off"):
            use_cuda_graphs(experiment(cuda_graphs="on", **settings), info, amp)


# ------------------------------------------------------------------------------- orchestration (stand-in)
class ReplayByCalling:
    """Stand-in for capture_cuda_graph where CUDA cannot run: counts captures; the "replay" calls the
    captured function, which reads only static tensors - as the graph does."""

    def __init__(self):
        self.captures = 0

    def __call__(self, body, stream):
        self.captures += 1
        return body


def tiny_trainer(info: DistInfo, optim: OptimConfig, sched: SchedConfig, ema: float = 0.0, amp=None,
                 steps_per_epoch: int = 4) -> Trainer:
    torch.manual_seed(0)
    module = FDMobileNet(0.25, num_classes=10)
    model, _ = prepare_model(module, TrainConfig(compile="off"), info)
    opt = build_optimizer(module, optim, info.device)
    return Trainer(model, module, opt, build_scheduler(opt, optim, sched, steps_per_epoch), nn.CrossEntropyLoss(),
                   info, amp, make_grad_scaler(info.device, amp), build_ema(module, ema))


def batches(n: int, device: torch.device, size: int = 32, batch: int = 8) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last).to(device),
             torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(n)]


def assert_same_training_state(a: Trainer, b: Trainer, **tol) -> None:
    assert a.global_step == b.global_step
    assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"]
    for (name, x), y in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        torch.testing.assert_close(y, x, msg=name, **tol)
    for p, q in zip(a.module.parameters(), b.module.parameters()):
        torch.testing.assert_close(b.optimizer.state[q]["momentum_buffer"], a.optimizer.state[p]["momentum_buffer"],
                                   **tol)
    if a.ema is not None:
        for x, y in zip(a.ema.module.state_dict().values(), b.ema.module.state_dict().values()):
            torch.testing.assert_close(y, x, **tol)


def test_graphed_step_runs_like_the_eager_one():
    """Fused SGD (CPU has the kernel, with its tensor-lr variant), a warmup + cosine schedule (the lr changes
    every step: each replay must see the new value), EMA; 3 warm-up steps, then replays. Bitwise equal on CPU."""
    optim = OptimConfig(lr=0.05, batch_size=8, base_batch_size=8, impl="fused", warmup_epochs=1, epochs=3)
    sched = SchedConfig(type="cosine")
    eager, graphed = (tiny_trainer(CPU, optim, sched, ema=0.9) for _ in range(2))
    capture = ReplayByCalling()
    step = GraphedStep(graphed, warmup_steps=3, capture=capture)
    data = batches(9, CPU.device)
    eager_losses = [eager.step(*b) for b in data[:8]]
    graphed_losses = []
    for i, b in enumerate(data[:8]):
        graphed_losses.append(step.step(*b))
        assert capture.captures == (0 if i < 3 else 1)            # eager warm-up, then one capture
    for (le, ce), (lg, cg) in zip(eager_losses, graphed_losses):   # kept across steps: each its own tensor
        assert torch.equal(le, lg) and torch.equal(ce, cg)
    assert len({id(loss) for loss, _ in graphed_losses}) == 8
    assert_same_training_state(eager, graphed, rtol=0, atol=0)
    assert graphed.ema.n_averaged.item() == 8
    assert all(isinstance(g["lr"], float) for g in graphed.optimizer.param_groups)   # the tensor only in capture

    # a NaN batch in a replay: the marker records that global step, the check raises naming it
    bad = (torch.full_like(data[8][0], float("nan")), data[8][1])
    step.step(*bad)
    with pytest.raises(NonFiniteLossError, match="at global step 8 "):
        graphed.check_finite(epoch=2)


def test_graph_is_captured_again_when_what_it_baked_in_changes():
    """optimizer.load_state_dict (a resume) replaces every momentum buffer; train/eval mode and the batch
    layout are baked in too. Each change: warm-up again, capture again - and the steps stay the eager ones."""
    optim = OptimConfig(lr=0.05, batch_size=8, base_batch_size=8, impl="fused")
    eager, graphed = (tiny_trainer(CPU, optim, SchedConfig()) for _ in range(2))
    capture = ReplayByCalling()
    step = GraphedStep(graphed, warmup_steps=1, capture=capture)
    data = batches(11, CPU.device)
    for b in data[:3]:
        eager.step(*b)
        step.step(*b)
    assert capture.captures == 1
    for _ in range(2):   # twice without a step between: the second state must not pass for the first one
        saved = {"optimizer": graphed.optimizer.state_dict(), "scheduler": graphed.scheduler.state_dict()}
        graphed.optimizer.load_state_dict(saved["optimizer"])      # what RunState.load_state_dict does
        graphed.scheduler.load_state_dict(saved["scheduler"])
    for b in data[3:5]:
        eager.step(*b)
        step.step(*b)
    assert capture.captures == 2
    for model in (eager.module, graphed.module):
        model.eval()
    for b in data[5:7]:                                        # BN on running statistics
        eager.step(*b)
        step.step(*b)
    assert capture.captures == 3
    for model in (eager.module, graphed.module):
        model.train()
    small = [(x[:4], y[:4]) for x, y in data[7:10]]              # another batch shape
    for b in small:
        eager.step(*b)
        step.step(*b)
    assert capture.captures == 4                       # train mode and the new shape came in the same step
    eager.global_step = graphed.global_step = 100      # set from outside, as a resume does
    tail = (data[10][0][:4], data[10][1][:4])
    eager.step(*tail)
    step.step(*tail)
    assert capture.captures == 4                       # a host value: no new capture, the device counter follows
    assert_same_training_state(eager, graphed, rtol=0, atol=0)
    nan = (torch.full_like(tail[0], float("nan")), tail[1])
    step.step(*nan)
    with pytest.raises(NonFiniteLossError, match="at global step 101 "):
        graphed.check_finite(epoch=0)


def training_loop(tmp_path: Path, label: str, train: TrainConfig, preempt: PreemptionFlag, **data) -> Loop:
    """A Loop over the synthetic loader (fused SGD, cosine with warm-up, EMA), its saver, a silent log;
    ``data``: DataConfig fields to change."""
    cfg = ExperimentConfig(train=train)
    cfg.data = dataclasses.replace(cfg.data, **{"loader": "synthetic", "num_classes": 10, "crop_size": 32,
                                                "val_crop": 32, **data})
    cfg.optim = dataclasses.replace(cfg.optim, epochs=2, batch_size=8, base_batch_size=8, lr=0.05, impl="fused",
                                    warmup_epochs=0.5, ema_decay=0.9)
    cfg.sched = SchedConfig(type="cosine")
    t = tiny_trainer(CPU, cfg.optim, cfg.sched, ema=0.9, steps_per_epoch=5)
    loader = build_loader(cfg.data, "train", 8, device=CPU.device)
    return Loop(RunState(t, loader, cfg, 5), CheckpointSaver(tmp_path, label),
                RunLogger(str(tmp_path), label, enabled=False), preempt)


def test_the_loop_trains_with_the_graphed_step_checkpoints_and_resumes_like_eager(tmp_path):
    """Loop.train_epoch with GraphedStep.step (stand-in capture) for two epochs of 5 steps, a step
    checkpoint every 4 global steps: the same weights, momentum, EMA and lr as the eager loop, bitwise. Then
    its last step checkpoint resumed eagerly, and the eager one resumed graphed (a warm-up step, then a
    capture and a replay): each continues to the same end state."""
    handlers = {sig: signal.getsignal(sig) for sig in PreemptionFlag.SIGNALS}
    try:
        preempt = PreemptionFlag()
        train = TrainConfig(print_freq=2, save_every_steps=4)
        runs = {}
        for label, graphed in (("eager", False), ("graphed", True)):
            loop = training_loop(tmp_path, label, train, preempt)
            state, capture = loop.state, ReplayByCalling()
            if graphed:
                loop.train_step = GraphedStep(state.trainer, warmup_steps=2, capture=capture).step
            while state.epoch < 2:
                loop.train_epoch()
                state.end_epoch({"epoch": state.epoch + 1})
            runs[label] = state
            if graphed:
                assert capture.captures == 1                  # one capture for the whole run, across epochs
        assert_same_training_state(runs["eager"].trainer, runs["graphed"].trainer, rtol=0, atol=0)
        # the step checkpoints at global step 8 (epoch 2, step 3), each resumed the other way
        for written, resumed_graphed in (("graphed", False), ("eager", True)):
            ckpt = load_checkpoint(tmp_path / f"{written}.pth.tar")
            assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 3, 8)
            loop = training_loop(tmp_path, f"resumed-{written}", train, preempt)
            state, capture = loop.state, ReplayByCalling()
            state.load_state_dict(ckpt, written)
            if resumed_graphed:
                loop.train_step = GraphedStep(state.trainer, warmup_steps=1, capture=capture).step
            loop.train_epoch()
            assert capture.captures == (1 if resumed_graphed else 0)
            assert_same_training_state(runs["eager"].trainer, state.trainer, rtol=0, atol=0)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_the_graphed_step_is_captured_once_per_training_resolution(tmp_path):
    """A data.train_res ramp, 32 px in epoch 1 and 64 px in epoch 2: the graph is captured again when the
    batch's size changes, and only then (one capture per size, not per epoch or step), and the run ends
    with the eager loop's weights, momentum, EMA and lr, bitwise."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        preempt, train, runs = PreemptionFlag(), TrainConfig(print_freq=5), {}
        for label, graphed in (("eager", False), ("graphed", True)):
            loop = training_loop(tmp_path, label, train, preempt, crop_size=64,
                                 train_res=ResolutionRamp(start_res=32, ramp_start=1, ramp_end=2))
            state, capture = loop.state, ReplayByCalling()
            if graphed:
                loop.train_step = GraphedStep(state.trainer, warmup_steps=2, capture=capture).step
            sizes = []
            while state.epoch < 2:
                sizes.append(loop.train_epoch()["train_res"])
                state.end_epoch({"epoch": state.epoch + 1})
            assert sizes == [32, 64] and capture.captures == (2 if graphed else 0)
            runs[label] = state
        assert_same_training_state(runs["eager"].trainer, runs["graphed"].trainer, rtol=0, atol=0)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_graphed_step_equals_eager_after_5_steps_on_the_gpu():
    """Same seed, same 5 batches, deterministic kernels, fp32, no compile; 2 eager warm-up steps, then the
    capture and 3 replays. The graph replays the kernels eager runs, and lr 2^-4 is exact in float32, so the
    tensor-lr SGD kernel multiplies by the value the scalar one does: bitwise equality is expected. The
    tolerance (1e-6 relative, 1e-7 absolute) only admits a reduction order cuDNN might pick differently for
    the capture stream."""
    gpu = DistInfo(0, 0, 1, torch.device("cuda", 0))
    setup_backends(gpu.device, deterministic=True)
    try:
        optim = OptimConfig(lr=0.0625, batch_size=32, base_batch_size=32, epochs=1000)  # step schedule: constant
        eager, graphed = (tiny_trainer(gpu, optim, SchedConfig(), ema=0.9) for _ in range(2))
        step = GraphedStep(graphed, warmup_steps=2)
        data = batches(5, gpu.device, size=64, batch=32)
        losses = [(eager.step(*b)[0], step.step(*b)[0]) for b in data]
        torch.cuda.synchronize()
        for le, lg in losses:
            torch.testing.assert_close(lg, le, rtol=1e-6, atol=1e-7)
        assert_same_training_state(eager, graphed, rtol=1e-6, atol=1e-7)
        untrained = tiny_trainer(gpu, optim, SchedConfig()).module
        assert not torch.equal(eager.module.classifier.weight, untrained.classifier.weight)   # they did learn
    finally:
        torch.use_deterministic_algorithms(False)


def gpu_run(digits: Path, out: Path, label: str, *extra: str,
            faults: dict | None = None) -> subprocess.CompletedProcess:
    """train_ddp.py on the GPU, deterministic, fp32, no compile, torchvision loader in the main process (so
    that a resumed run draws the same augmentations), lr 2^-4 (exact in float32). ``faults``: keywords of
    fault_plugin.fault_env."""
    words = ["--config", "demo", f"--label={label}", f"data.root={digits}", "data.loader=torchvision",
             "data.num_threads=0", "data.crop_size=32", "data.val_resize=36", "data.val_crop=32",
             "optim.batch_size=16", "optim.base_batch_size=16", "optim.lr=0.0625", "optim.epochs=2",
             "optim.warmup_epochs=0", "sched.type=step", "optim.ema_decay=0.9", "train.steps_per_epoch=6",
             "train.print_freq=2", "train.deterministic=true", "train.amp=off", "train.compile=off",
             "train.plot=false", f"train.output_dir={out}", *extra]
    return subprocess.run([sys.executable, str(REPO / "train_ddp.py"), *words], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env(faults))


def ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def digits32(tmp_path_factory) -> Path:
    return build_digits(tmp_path_factory.mktemp("digits"))


@pytest.mark.gpu
def test_a_graphed_run_checkpoints_and_resumes_like_an_eager_one(digits32, tmp_path):
    """Eager: 2 epochs straight. Graphed: a step checkpoint at global step 8 (epoch 2 step 2), a crash at
    step 9 (a replay: the fault plugin wraps GraphedStep.step too), then the same command resumes (graphed:
    warm-up and capture after the restore). The final weights, momentum and EMA equal the eager run's (same
    tolerance as above, same reason)."""
    ok(gpu_run(digits32, tmp_path, "eager", "train.cuda_graphs=off"))
    graphed = ["train.cuda_graphs=on", "train.save_every_steps=4"]
    crashed = gpu_run(digits32, tmp_path, "graphed", *graphed, faults={"raise_at_step": 9})
    assert crashed.returncode == 1 and "injected failure on rank 0 at global step 9" in crashed.stderr
    assert "cuda graphs on |" in crashed.stdout
    assert load_checkpoint(tmp_path / "graphed.pth.tar")["global_step"] == 8
    assert "resumed from" in ok(gpu_run(digits32, tmp_path, "graphed", *graphed))
    a, b = load_checkpoint(tmp_path / "eager.pth.tar"), load_checkpoint(tmp_path / "graphed.pth.tar")
    assert a["global_step"] == b["global_step"] == 12
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    for key, value in a["ema"].items():
        torch.testing.assert_close(b["ema"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    for key, value in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][key]["momentum_buffer"], value["momentum_buffer"],
                                   rtol=1e-6, atol=1e-7)
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.gpu
def test_nan_loss_in_a_replay_stops_the_graphed_run(digits32, tmp_path):
    p = gpu_run(digits32, tmp_path, "nan", "train.cuda_graphs=on", "optim.epochs=1", faults={"nan_at_step": 5})
    assert p.returncode == 1
    assert "NonFiniteLossError: training loss is NaN/Inf in epoch 1, at global step 5 (counted from 0)" in p.stderr


@pytest.mark.gpu
def test_preempting_a_graphed_run_checkpoints_at_a_step_boundary(digits32, tmp_path):
    """SIGUSR1 while the graph replays: the trainer stops at its next poll (every 10 steps, or an epoch's
    end), saves that step and exits 0, as in eager. GPU steps are fast, so where it stops is not fixed."""
    log = tmp_path / "preempt.log"
    p = start([sys.executable, str(REPO / "train_ddp.py"), "--config", "demo", "--label=preempt",
               f"data.root={digits32}", "data.crop_size=32", "data.val_resize=36", "data.val_crop=32",
               "optim.batch_size=16", "optim.epochs=5", "train.steps_per_epoch=80", "train.print_freq=1",
               "train.eval_every=0", "train.cuda_graphs=on", "train.compile=off", "train.plot=false",
               f"train.output_dir={tmp_path}"], log)
    try:
        wait_for(log, r"epoch 1/5 step 5/", 120, p)          # past the warm-up: replaying
        p.send_signal(signal.SIGUSR1)
        assert p.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if p.poll() is None:
            kill_group(p)
    m = re.search(r"preempted \(SIGUSR1\) at epoch (\d) step (\d+), checkpoint saved", log.read_text())
    assert m, log.read_text()[-3000:]
    epoch, step = int(m.group(1)), int(m.group(2))
    assert step % 10 == 0 and (epoch, step) < (5, 80)
    ck = load_checkpoint(tmp_path / "preempt.pth.tar")
    assert (ck["epoch"] + 1, ck["step_in_epoch"], ck["global_step"]) == (epoch, step, (epoch - 1) * 80 + step)


@pytest.mark.gpu
def test_digits_demo_trains_to_90_percent_with_amp_channels_last_compile_and_graphs(tmp_path):
    """The demo as `make demo` runs it on one GPU (bf16 AMP, channels_last, torch.compile: the config's auto
    settings), with the step graphed; validation only at the end."""
    from pipelines.demo_data import build_digits as build
    build(tmp_path / "digits", size=64)
    p = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), "--config", "demo",
                        f"data.root={tmp_path / 'digits'}", f"train.output_dir={tmp_path}", "train.cuda_graphs=on",
                        "train.compile=on", "train.eval_every=0", "train.plot=false"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=env())
    out = ok(p)
    assert "amp bf16 | compile True | cuda graphs on |" in out
    last = json.loads((tmp_path / "demo.jsonl").read_text().splitlines()[-1])
    assert last["val_top1"] >= 90.0, last
