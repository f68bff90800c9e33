"""Trainer building blocks, in-process: the paper's LR schedule and linear scaling, optimizer back-ends, AMP,
torch.compile, metrics. (Whole runs under torchrun: tests/test_train_runs.py.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fdmobilenet.config import OptimConfig, SchedConfig, TrainConfig, load_experiment
from fdmobilenet.distributed import init_distributed
from fdmobilenet.engine import Trainer, correct_topk, evaluate, make_grad_scaler, prepare_model, resolve_amp
from fdmobilenet.model import FDMobileNet
from fdmobilenet.optim import build_ema, build_optimizer, build_scheduler, lr_multiplier, scaled_lr

STEPS_PER_EPOCH = 7


def lr_at_epochs(optim: OptimConfig, sched: SchedConfig, epochs: list[int]) -> dict[int, float]:
    """The lr the real optimizer holds during each epoch, by stepping the real scheduler once per step."""
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, optim, torch.device("cpu"))
    sch = build_scheduler(opt, optim, sched, STEPS_PER_EPOCH)
    seen = {}
    for step in range(optim.epochs * STEPS_PER_EPOCH):
        epoch = step // STEPS_PER_EPOCH
        if epoch in epochs and step % STEPS_PER_EPOCH == STEPS_PER_EPOCH - 1:   # last step: constant within
            seen[epoch] = opt.param_groups[0]["lr"]
        opt.step()
        sch.step()
    return seen


def test_paper_schedule_steps_tenfold_every_30_epochs():
    cfg = load_experiment("0.25x-FDMobileNet-224")
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.optim.weight_decay, cfg.optim.nesterov) == (0.1, 256, 4e-5, True)
    assert (cfg.optim.warmup_epochs, cfg.optim.label_smoothing, cfg.optim.ema_decay, cfg.optim.no_wd_bn_bias) == \
        (0.0, 0.0, 0.0, False)
    lrs = lr_at_epochs(cfg.optim, cfg.sched, [0, 29, 30, 60, 90, 119])
    assert lrs == pytest.approx({0: 0.1, 29: 0.1, 30: 0.01, 60: 0.001, 90: 1e-4, 119: 1e-4}, rel=1e-9)
    # weight decay on every parameter, BN included (the paper)
    opt = build_optimizer(FDMobileNet(0.25), cfg.optim, torch.device("cpu"))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 4e-5


def test_linear_scaling_at_batch_1024_with_warmup():
    cfg = load_experiment("1x-FDMobileNet-224", optim="SGD-120-nesterov-bs1024")
    assert scaled_lr(cfg.optim) == pytest.approx(0.4)
    lrs = lr_at_epochs(cfg.optim, cfg.sched, [0, 4, 5, 29, 30, 119])
    assert lrs[0] == pytest.approx(0.4 * STEPS_PER_EPOCH / (5 * STEPS_PER_EPOCH))   # linear warmup, per step
    assert lrs[4] == pytest.approx(0.4) and lrs[5] == pytest.approx(0.4) and lrs[29] == pytest.approx(0.4)
    assert lrs[30] == pytest.approx(0.04) and lrs[119] == pytest.approx(4e-4)
    # the same rule from a plain override of the paper's optim config
    over = load_experiment("1x-FDMobileNet-224", overrides=["optim.batch_size=1024"])
    assert scaled_lr(over.optim) == pytest.approx(0.4)


def test_cosine_schedule_ends_at_min_lr():
    optim = OptimConfig(epochs=10, lr=0.1)
    mult = lr_multiplier(optim, SchedConfig(type="cosine", min_lr=0.001), STEPS_PER_EPOCH)
    assert mult(0) == pytest.approx(1.0)
    assert 0.1 * mult(10 * STEPS_PER_EPOCH) == pytest.approx(0.001)
    assert mult(5 * STEPS_PER_EPOCH) == pytest.approx((1 + 0.01) / 2, rel=1e-6)


def test_no_wd_bn_bias_splits_groups():
    opt = build_optimizer(FDMobileNet(0.25), OptimConfig(no_wd_bn_bias=True), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])


def test_optimizer_back_ends():
    model = nn.Linear(3, 3)
    cpu = torch.device("cpu")
    assert build_optimizer(model, OptimConfig(impl="auto"), cpu).defaults["foreach"] is True
    assert build_optimizer(model, OptimConfig(impl="fused"), cpu).defaults["fused"] is True
    assert build_optimizer(model, OptimConfig(impl="plain"), cpu).defaults["foreach"] is False
    try:
        import apex.optimizers  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="optim.impl=fused"):
            build_optimizer(model, OptimConfig(impl="apex"), cpu)
    else:
        pytest.skip("NVIDIA apex is installed here: the missing-apex message cannot be shown")


def test_amp_resolution():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None          # off on CPU unless asked
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    assert make_grad_scaler(cpu, torch.bfloat16) is None                       # bf16 needs no loss scaling
    assert isinstance(make_grad_scaler(cpu, torch.float16), torch.amp.GradScaler)


def tiny_trainer(train: TrainConfig, ema_decay: float = 0.0) -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    info = init_distributed("cpu")
    module = FDMobileNet(0.25, num_classes=10)
    model, _ = prepare_model(module, train, info)
    optim = OptimConfig(lr=0.05, batch_size=8, base_batch_size=8, ema_decay=ema_decay)
    opt = build_optimizer(module, optim, info.device)
    amp_dtype = resolve_amp(train.amp, info.device)
    t = Trainer(model, module, opt, build_scheduler(opt, optim, SchedConfig(), 10), nn.CrossEntropyLoss(), info,
                amp_dtype, make_grad_scaler(info.device, amp_dtype), build_ema(module, ema_decay))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    return t, images, torch.randint(0, 10, (8,), generator=g)


def test_amp_bf16_trains_on_cpu_with_ema():
    t, images, labels = tiny_trainer(TrainConfig(amp="bf16", compile="off"), ema_decay=0.9)
    losses = [t.step(images, labels)[0] for _ in range(6)]
    assert all(torch.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]                 # it fits the fixed batch
    t.check_finite(epoch=0)
    ema_w, w = t.ema.module.classifier.weight, t.module.classifier.weight
    assert not torch.equal(ema_w, w) and torch.isfinite(ema_w).all()   # EMA tracks, lagging behind


def test_ema_is_the_average_computed_by_hand():
    """torch.optim.swa_utils' EMA as the trainer drives it (after every optimizer step, BN buffers included):
    the first update copies the weights, each later one is ema = d * ema + (1 - d) * weights."""
    decay, steps = 0.9, 5
    t, images, labels = tiny_trainer(TrainConfig(amp="off", compile="off"), ema_decay=decay)
    by_hand = None
    for _ in range(steps):
        t.step(images, labels)
        now = {k: v.clone() for k, v in t.module.state_dict().items()}
        by_hand = now if by_hand is None else {k: (decay * by_hand[k] + (1 - decay) * v).to(v.dtype)
                                                for k, v in now.items()}
    ema = t.ema.module.state_dict()
    for key, value in by_hand.items():
        torch.testing.assert_close(ema[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert int(t.ema.n_averaged) == steps
    # and it is an average, not the latest weights: the classifier moved every step
    assert not torch.allclose(ema["classifier.weight"], now["classifier.weight"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("off", torch.float32)])
def test_amp_dtype_is_what_the_layers_compute_in(amp, dtype):
    """Seen from inside the forward of a training step: every convolution and the classifier produce
    bfloat16 under train.amp=bf16 (autocast really on), float32 with it off."""
    t, images, labels = tiny_trainer(TrainConfig(amp=amp, compile="off"))
    seen = set()
    for m in t.module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    t.step(images, labels)
    assert seen == {dtype}


def test_float16_batches_train_without_amp():
    """data.dtype auto hands float16 to a GPU model; with train.amp=off the step must still run (in fp32)."""
    t, images, labels = tiny_trainer(TrainConfig(amp="off", compile="off"))
    loss, _ = t.step(images.half(), labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.slow
def test_compile_matches_eager():
    """Same init, same batch: one compiled and one eager training step give the same loss and gradients to
    float tolerance (later steps drift apart chaotically: BN over 8 samples at a 1x1 map amplifies rounding).
    On these 2 CPU cores inductor takes ~45 s to compile forward + backward the first time (later runs hit
    its cache); GPU runs compile by default, CPU runs keep it off."""
    results = {}
    for mode in ("off", "on"):
        t, images, labels = tiny_trainer(TrainConfig(compile=mode))
        loss, _ = t.step(images, labels)
        results[mode] = (loss, {n: p.grad.clone() for n, p in t.module.named_parameters()})
        assert (t.model is not t.module) == (mode == "on")
    torch.testing.assert_close(results["on"][0], results["off"][0], rtol=1e-5, atol=1e-5)
    for name, grad in results["off"][1].items():   # per tensor: relative error of the whole gradient
        # (BN weights start with tiny, nearly cancelling gradients: there rounding shows up to ~2e-3)
        assert (results["on"][1][name] - grad).norm() <= 1e-2 * grad.norm() + 1e-7, name


@pytest.mark.parametrize("dynamic, symbolic", [("auto", [False, True]), ("off", [False, False]), ("on", [True])])
def test_compile_dynamic_decides_the_graphs_of_a_second_image_size(dynamic, symbolic):
    """A data.train_res ramp (and a benchmark's second batch size) changes the input shape a few times in a
    run. train.compile_dynamic=off compiles one static graph per shape; torch's default (auto) turns the second
    shape into a dynamic-shape graph (symbolic sizes: slower kernels); on compiles one dynamic graph for all.
    Never a graph per step. Dynamo only (a recording backend): no code generation, so this runs in seconds;
    which variant trains faster: benchmarks/compile_resolutions.py."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
            isinstance(d, torch.SymInt) for d in x.shape)) for x in example_inputs))
        return gm.forward
    torch._dynamo.reset()
    info = init_distributed("cpu")
    model, _ = prepare_model(FDMobileNet(width_mult=0.25, num_classes=10),
                             TrainConfig(compile="on", compile_backend=recording_backend, channels_last=False,
                                         compile_dynamic=dynamic), info)
    for size in (64, 64, 96, 96):   # 2 and 3 px at the end: no size of 1, which dynamo specialises
        model(torch.randn(4, 3, size, size))
    assert graphs == symbolic
    torch._dynamo.reset()


def test_accuracy_topk():
    output = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.8, 0.1, 0.05, 0.03, 0.01, 0.0]])
    top1, top5 = (100.0 * correct_topk(output, torch.tensor([1, 5])) / 2).tolist()
    assert top1 == 50.0 and top5 == 50.0


def test_topk_counts_each_k_separately():
    """Four samples whose label is ranked 1st, 3rd, 5th and 6th among 10 logits: top-1 25 %, top-2 25 %,
    top-5 75 %, top-10 100 %; the same through evaluate(), which the logs' val_top5 comes from."""
    ranked = torch.arange(10.0, 0.0, -1.0)              # class 0 scores highest, class 9 lowest
    output = torch.stack([ranked.roll(shift) for shift in range(4)])
    labels = torch.tensor([0, 3, 6, 8])                 # ranked 1st, 3rd, 5th, 6th in their rows
    assert correct_topk(output, labels, (1, 2, 5, 10)).tolist() == [1, 1, 3, 4]
    assert (100.0 * correct_topk(output, labels) / 4).tolist() == [25.0, 75.0]
    m = evaluate(nn.Identity(), [(output[:3], labels[:3]), (output[3:], labels[3:])], init_distributed("cpu"))
    assert (m["val_top1"], m["val_top5"], m["val_images"]) == (25.0, 75.0, 4)


def test_run_logger_files_and_resume_truncation(tmp_path):
    """Per-epoch CSV/JSONL with a fixed header (epochs without validation leave cells empty); a resumed run
    keeps the epochs before its start and drops the ones it will run again."""
    import csv
    import json

    from fdmobilenet.logs import RunLogger
    log = RunLogger(str(tmp_path), "r", enabled=True)
    log.epoch({"epoch": 1, "lr": 0.1, "train_loss": 2.0, "train_top1": 10.0, "img_s": 5.0, "epoch_time_s": 1.0})
    log.epoch({"epoch": 2, "lr": 0.1, "train_loss": 1.0, "train_top1": 50.0, "img_s": 5.0, "epoch_time_s": 1.0,
               "val_loss": 1.2, "val_top1": 40.0, "val_top5": 90.0, "val_images": 10})
    log.epoch({"epoch": 3, "lr": 0.01, "train_loss": 0.5, "train_top1": 80.0, "img_s": 5.0, "epoch_time_s": 1.0})
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [r["val_top1"] for r in rows] == ["", "40.0", ""]
    # epochs are counted from 1 in the files, as on the console; start_epoch = epochs completed
    resumed = RunLogger(str(tmp_path), "r", enabled=True, start_epoch=2)
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "r.jsonl")] == [1, 2]
    assert len(list(csv.DictReader(open(tmp_path / "r.csv")))) == 2
    assert resumed.close(plot=True) == tmp_path / "r.png" and (tmp_path / "r.png").stat().st_size > 0
    assert RunLogger(str(tmp_path / "other"), "r", enabled=False).write_config({}, {}) is None   # rank > 0
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------------------------- run state, checkpoints
@pytest.fixture
def preempt():
    """A PreemptionFlag, with this process's SIGTERM / SIGUSR1 / SIGINT handlers put back afterwards."""
    import signal

    from fdmobilenet.engine import PreemptionFlag
    handlers = {sig: signal.getsignal(sig) for sig in PreemptionFlag.SIGNALS}
    yield PreemptionFlag()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def tiny_run(tmp_path, preempt, steps: int = 4, **train):
    """A Loop over the synthetic loader (one process, CPU), its saver and a logger that prints nothing;
    ``train``: TrainConfig fields to change."""
    import dataclasses

    from fdmobilenet.checkpoint import CheckpointSaver
    from fdmobilenet.config import ExperimentConfig
    from fdmobilenet.logs import RunLogger
    from fdmobilenet.loop import Loop, RunState
    from pipelines import build_loader
    t, _, _ = tiny_trainer(TrainConfig(compile="off"), ema_decay=0.9)
    cfg = ExperimentConfig()
    cfg.data = dataclasses.replace(cfg.data, loader="synthetic", num_classes=10, crop_size=32, val_crop=32)
    cfg.optim = dataclasses.replace(cfg.optim, epochs=2, batch_size=8)
    cfg.train = dataclasses.replace(cfg.train, **train)
    loader = build_loader(cfg.data, "train", 8, device=t.info.device)
    return Loop(RunState(t, loader, cfg, steps), CheckpointSaver(tmp_path, "tiny"),
                RunLogger(str(tmp_path), "tiny", enabled=False), preempt)


def test_run_state_round_trips_through_a_checkpoint(tmp_path, preempt):
    """RunState.state_dict -> file -> load_state_dict into a fresh state: the same weights, optimizer, EMA,
    position, best and epoch sums; and both states then train to the same weights."""
    from fdmobilenet.checkpoint import load_checkpoint
    loop = tiny_run(tmp_path, preempt, print_freq=1)
    state, saver = loop.state, loop.saver
    state.step = 1                              # a mid-epoch position, as after a step checkpoint
    state.best_top1, state.best_epoch = 12.5, 1
    loop.train_epoch()
    assert (state.step, state.trainer.global_step, state.sums.samples) == (4, 3, 24)
    loop.save()
    ckpt = load_checkpoint(saver.path)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"], ckpt["best_epoch"]) == (0, 4, 3, 1)

    other_loop = tiny_run(tmp_path, preempt, print_freq=1)
    other = other_loop.state
    other.load_state_dict(ckpt, str(saver.path))
    assert (other.epoch, other.step, other.best_top1, other.best_epoch) == (0, 4, 12.5, 1)
    assert other.sums == state.sums and other.trainer.global_step == 3
    for a, b in zip(state.trainer.module.state_dict().values(), other.trainer.module.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(state.trainer.ema.module.state_dict().values(), other.trainer.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    # the epoch's steps are done: a resumed train_epoch runs none and reports the whole epoch's sums
    assert other_loop.train_epoch()["train_loss"] == pytest.approx(state.sums.loss / 24)
    for each in (loop, other_loop):
        each.state.end_epoch({"epoch": 1, "val_top1": 10.0})
        each.train_epoch()
    assert state.trainer.global_step == other.trainer.global_step == 7 and state.best_epoch == 1
    for a, b in zip(state.trainer.module.state_dict().values(), other.trainer.module.state_dict().values()):
        assert torch.equal(a, b)


def test_best_checkpoint_is_a_link_to_the_saved_file_not_a_second_save(tmp_path, monkeypatch):
    """timm's CheckpointSaver: the best file is the file just written (a hard link here), and a later save
    of the latest file leaves it as it was."""
    import os

    from fdmobilenet import checkpoint
    writes = []
    real = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda obj, path: (writes.append(path), real(obj, path)))
    saver = checkpoint.CheckpointSaver(tmp_path, "run")
    saver.save({"epoch": 1}, best=True)
    assert writes == [saver.path] and os.path.samefile(saver.path, saver.best_path)
    saver.save({"epoch": 2})
    assert writes == [saver.path, saver.path] and not os.path.samefile(saver.path, saver.best_path)
    assert checkpoint.load_checkpoint(saver.best_path)["epoch"] == 1
    assert checkpoint.load_checkpoint(saver.path)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pth.tar", "run_best.pth.tar"]   # no temp files


# -------------------------------------------------------------------------------------------------- logs
def test_step_line_has_running_averages_and_gpu_memory(tmp_path, capsys):
    """timm's `loss 2.33 (2.35)`: the window's value, the epoch's running average in brackets; the CUDA
    memory high-water mark when the trainer runs on a GPU (Loop.step_boundary passes None on CPU)."""
    from fdmobilenet.logs import RunLogger
    log = RunLogger(str(tmp_path), "r", enabled=True)
    m = {"epoch": 2, "epochs": 3, "step": 10, "steps": 20, "global_step": 30, "loss": 2.3312, "loss_avg": 2.3501,
         "top1": 12.5, "top1_avg": 10.25, "lr": 0.05, "img_s": 1234.0, "data_wait": 0.03, "step_time": 0.1,
         "steps_left": 30, "max_mem_gib": None}
    log.step(m)
    log.step({**m, "step": 20, "global_step": 40, "steps_left": 20, "max_mem_gib": 3.25})
    log.close(plot=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("epoch 2/3 step 10/20  loss 2.3312 (2.3501)  top1  12.5% ( 10.2%)  lr 0.05000  "
                               "1,234 img/s  data wait   3%  ETA 0:00:03")
    assert "max mem" not in lines[0] and "max mem 3.25 GiB" in lines[1]


def test_durations_read_as_timedelta():
    from fdmobilenet.logs import format_duration
    assert [format_duration(s) for s in (27.4, 250, 7384, 2 * 86400 + 5)] == \
        ["0:00:27", "0:04:10", "2:03:04", "2 days, 0:00:05"]


def test_curves_have_whole_epoch_ticks_and_mark_the_best_epoch():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fdmobilenet.logs import plot_history
    history = [{"epoch": e, "lr": 0.1 / e, "train_loss": 2.0 / e, "train_top1": 10.0 * e,
                "val_loss": 2.5 / e, "val_top1": [30.0, 55.0, 41.0][e - 1], "val_top5": 90.0} for e in (1, 2, 3)]
    fig = plot_history(history, "r", best_epoch=2)
    try:
        for ax in fig.axes:
            fig.canvas.draw()
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
            marks = [line for line in ax.get_lines() if list(line.get_xdata()) == [2, 2]]
            assert len(marks) == 1 and "best: epoch 2" in [t.get_text() for t in ax.get_legend().get_texts()]
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------- CPU threads
def test_cpu_threads_leave_the_loaders_cores_free(monkeypatch):
    """Without OMP_NUM_THREADS torch would take every core, on top of the loader's threads; the trainer takes
    the cores left over (at least one). OMP_NUM_THREADS (torchrun, the launchers) is left as it is."""
    import dataclasses
    import os

    from fdmobilenet.config import DataConfig
    from fdmobilenet.engine import set_cpu_threads
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        data = DataConfig(num_threads=1)
        assert set_cpu_threads(data) == f"{max(1, cores - 1)} ({cores} cores, 1 of them for the loader)"
        assert torch.get_num_threads() == max(1, cores - 1)
        assert set_cpu_threads(dataclasses.replace(data, num_threads=cores + 3)).startswith("1 (")
        assert set_cpu_threads(dataclasses.replace(data, loader="synthetic")).startswith(f"{cores} (")
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_cpu_threads(data) == "1 (OMP_NUM_THREADS)" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_schedule_against_torchs_sequential_lr():
    """Why the schedule is one LambdaLR and not torch's SequentialLR(LinearLR, CosineAnnealingLR / StepLR):
    the cosine form gives the same lr at every step, but SequentialLR restarts its second scheduler's count
    at the end of the warmup, so StepLR's decays come `warmup` steps late - the paper's "lr / 10 at epochs 30,
    60, 90" would move. One rule serves both and keeps the epoch boundaries exact."""
    import warnings

    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR, StepLR
    optim = OptimConfig(lr=0.1, epochs=10, warmup_epochs=2)
    warmup = 2 * STEPS_PER_EPOCH
    for sched, late in ((SchedConfig(type="cosine", min_lr=0.001), False), (SchedConfig(step_size=3), True)):
        ours = build_optimizer(nn.Linear(2, 2), optim, torch.device("cpu"))
        ours_sched = build_scheduler(ours, optim, sched, STEPS_PER_EPOCH)
        theirs = build_optimizer(nn.Linear(2, 2), optim, torch.device("cpu"))
        after = (CosineAnnealingLR(theirs, T_max=optim.epochs * STEPS_PER_EPOCH - warmup, eta_min=sched.min_lr)
                 if sched.type == "cosine" else StepLR(theirs, step_size=sched.step_size * STEPS_PER_EPOCH))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # SequentialLR's own deprecation notes
            theirs_sched = SequentialLR(theirs, [LinearLR(theirs, 1 / warmup, 1.0, warmup - 1), after], [warmup])
        differ = []
        for step in range(optim.epochs * STEPS_PER_EPOCH):
            a, b = ours.param_groups[0]["lr"], theirs.param_groups[0]["lr"]
            if a != pytest.approx(b, rel=1e-9):
                differ.append(step)
            for o, s in ((ours, ours_sched), (theirs, theirs_sched)):
                o.step()
                s.step()
        if not late:
            assert differ == []
        else:   # epoch 3's decay at step 21 (ours) comes at 21 + warmup in SequentialLR, and so on
            first = 3 * STEPS_PER_EPOCH
            assert differ[:warmup] == list(range(first, first + warmup))
