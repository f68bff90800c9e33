"""Trainer building blocks, in-process: the paper's LR schedule and linear scaling, optimizer back-ends, AMP,
torch.compile, metrics. (Whole runs under torchrun: tests/test_train_runs.py.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fdmobilenet.config import OptimConfig, SchedConfig, TrainConfig, load_experiment
from fdmobilenet.distributed import init_distributed
from fdmobilenet.engine import (Trainer, accuracy, correct_topk, evaluate, make_grad_scaler, prepare_model,
                                resolve_amp)
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


def test_accuracy_topk():
    output = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.8, 0.1, 0.05, 0.03, 0.01, 0.0]])
    top1, top5 = accuracy(output, torch.tensor([1, 5]))
    assert top1 == 50.0 and top5 == 50.0


def test_topk_counts_each_k_separately():
    """Four samples whose label is ranked 1st, 3rd, 5th and 6th among 10 logits: top-1 25 %, top-2 25 %,
    top-5 75 %, top-10 100 %; the same through evaluate(), which the logs' val_top5 comes from."""
    ranked = torch.arange(10.0, 0.0, -1.0)              # class 0 scores highest, class 9 lowest
    output = torch.stack([ranked.roll(shift) for shift in range(4)])
    labels = torch.tensor([0, 3, 6, 8])                 # ranked 1st, 3rd, 5th, 6th in their rows
    assert correct_topk(output, labels, (1, 2, 5, 10)).tolist() == [1, 1, 3, 4]
    assert accuracy(output, labels) == [25.0, 75.0]
    m = evaluate(nn.Identity(), [(output[:3], labels[:3]), (output[3:], labels[3:])], init_distributed("cpu"))
    assert (m["val_top1"], m["val_top5"], m["val_images"]) == (25.0, 75.0, 4)


def test_run_logger_files_and_resume_truncation(tmp_path):
    """Per-epoch CSV/JSONL with a fixed header (epochs without validation leave cells empty); a resumed run
    keeps the epochs before its start and drops the ones it will run again."""
    import csv
    import json

    from fdmobilenet.logs import RunLogger
    log = RunLogger(str(tmp_path), "r", enabled=True)
    log.epoch({"epoch": 0, "lr": 0.1, "train_loss": 2.0, "train_top1": 10.0, "img_s": 5.0, "epoch_time_s": 1.0})
    log.epoch({"epoch": 1, "lr": 0.1, "train_loss": 1.0, "train_top1": 50.0, "img_s": 5.0, "epoch_time_s": 1.0,
               "val_loss": 1.2, "val_top1": 40.0, "val_top5": 90.0, "val_images": 10})
    log.epoch({"epoch": 2, "lr": 0.01, "train_loss": 0.5, "train_top1": 80.0, "img_s": 5.0, "epoch_time_s": 1.0})
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [r["val_top1"] for r in rows] == ["", "40.0", ""]
    resumed = RunLogger(str(tmp_path), "r", enabled=True, start_epoch=2)
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "r.jsonl")] == [0, 1]
    assert len(list(csv.DictReader(open(tmp_path / "r.csv")))) == 2
    assert resumed.close(plot=True) == tmp_path / "r.png" and (tmp_path / "r.png").stat().st_size > 0
    assert RunLogger(str(tmp_path / "other"), "r", enabled=False).write_config({}, {}) is None   # rank > 0
    assert not (tmp_path / "other").exists()
