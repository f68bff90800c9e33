"""Whole runs of train_ddp.py / evaluate.py as subprocesses, on CPU: real torchrun, real gloo process groups,
real JPEGs (scikit-learn's digits, scikit-image's photos), the authors' released weights.

Crashes are injected by the test-only fault plugin (tests/fault_plugin), switched on per run with ``faults``.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fault_plugin import fault_env
from fdmobilenet.checkpoint import load_checkpoint
from fdmobilenet.config import load_experiment
from fdmobilenet.model import FDMobileNet
from fdmobilenet.optim import lr_multiplier, scaled_lr
from launch_support import assert_same_state

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(script: str, *words: str, nproc: int = 0, faults: dict | None = None, timeout: float = 180,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``script`` as one plain process (nproc=0) or under torchrun with ``nproc`` CPU ranks; ``faults``:
    keywords of fault_plugin.fault_env (e.g. ``{"raise_at_step": 9}``)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    return subprocess.run([*launcher, str(REPO / script), *words], cwd=cwd,
                          env={**fault_env(**(faults or {})), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The demo's real digits, at 32 px to keep the runs short."""
    from pipelines.demo_data import build_digits
    root = tmp_path_factory.mktemp("digits")
    build_digits(root, size=32)
    return root


def digits_run(digits: Path, out: Path, label: str, *extra: str) -> list[str]:
    """A deterministic CPU run on the digits through the torchvision loader in the main process (so torch's
    generator drives the augmentation: restoring it makes a resumed run exact)."""
    return ["--config", "demo", f"--label={label}", f"data.root={digits}", "data.loader=torchvision",
            "data.num_threads=0", "data.crop_size=32", "data.val_resize=36", "data.val_crop=32",
            "optim.batch_size=16", "optim.base_batch_size=16", "optim.epochs=2", "optim.warmup_epochs=0",
            "sched.type=step", f"train.output_dir={out}", "train.steps_per_epoch=6", "train.print_freq=2",
            "optim.ema_decay=0.9", "train.deterministic=true", "train.plot=false", *extra]


def logged_steps(text: str) -> dict[int, tuple[str, str]]:
    """{global step (from 1): (loss, lr)} from rank 0's per-step lines; the lr is the one that step used."""
    return {(int(e) - 1) * int(n) + int(s): (loss, lr) for e, s, n, loss, lr in
            re.findall(r"epoch (\d+)/\d+ step (\d+)/(\d+)  loss (\S+) .*?  lr (\S+)", text)}


def test_resume_is_exact_at_epoch_boundary_and_mid_epoch(digits, tmp_path):
    straight = ok(run("train_ddp.py", *digits_run(digits, tmp_path, "straight")))
    assert "epoch 2/2 step 6/6" in straight and not (tmp_path / "straight.png").exists()   # train.plot=false
    assert "module." not in "".join(load_checkpoint(tmp_path / "straight.pth.tar")["state_dict"])

    # 1 epoch, then the same label again with 2 epochs: auto-resume (no flag) continues at epoch 2
    ok(run("train_ddp.py", *digits_run(digits, tmp_path, "split", "optim.epochs=1")))
    second = ok(run("train_ddp.py", *digits_run(digits, tmp_path, "split")))
    assert "resumed from" in second and "epoch 2 step 0" in second
    assert_same_state(tmp_path / "straight.pth.tar", tmp_path / "split.pth.tar")

    # a crash in epoch 2 after a step checkpoint (global step 8 = epoch 2 step 2), then auto-resume mid-epoch
    crashed = run("train_ddp.py", *digits_run(digits, tmp_path, "mid", "train.save_every_steps=4"),
                  faults={"raise_at_step": 9})
    assert crashed.returncode != 0 and "injected failure on rank 0 at global step 9" in crashed.stderr
    ck = load_checkpoint(tmp_path / "mid.pth.tar")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 2, 8)
    resumed = ok(run("train_ddp.py", *digits_run(digits, tmp_path, "mid", "train.save_every_steps=4")))
    assert "resumed from" in resumed and "epoch 2 step 2" in resumed
    assert_same_state(tmp_path / "straight.pth.tar", tmp_path / "mid.pth.tar")

    # logs: one row per epoch (the resumed runs rewrote, not duplicated, theirs), the config with the commit
    rows = [json.loads(line) for line in (tmp_path / "mid.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]          # counted from 1, as on the console
    assert (tmp_path / "mid.csv").read_text().count("\n") == 3
    assert "git_commit" in (tmp_path / "mid.config.yaml").read_text()

    # the trainer's --evaluate and evaluate.py (weights, and --ema) agree with the last epoch's logged top-1
    logged = json.loads((tmp_path / "straight.jsonl").read_text().splitlines()[-1])
    ckpt = str(tmp_path / "straight.pth.tar")
    for key, out in (("val_top1", ok(run("train_ddp.py", *digits_run(digits, tmp_path, "straight"), "--evaluate"))),
                     ("val_top1", ok(run("evaluate.py", "--checkpoint", ckpt, "--print-freq", "2"))),
                     ("ema_val_top1", ok(run("evaluate.py", "--checkpoint", ckpt, "--ema")))):
        top1 = float(re.search(r"top-1 ([\d.]+)%", out).group(1))
        assert top1 == pytest.approx(logged[key], abs=0.01) and "(359 images)" in out


def test_mid_epoch_resume_is_exact_with_dali_reader_state(digits, tmp_path):
    """DALI's loader checkpoints its reader and RNG: the trainer saves that state and, on resume, lets the
    loader continue by itself instead of skipping batches. DALI CPU graph, one thread: bit-identical."""
    dali = ["data.loader=dali", "data.num_threads=1", "train.save_every_steps=4"]
    ok(run("train_ddp.py", *digits_run(digits, tmp_path, "straight", *dali)))
    crashed = run("train_ddp.py", *digits_run(digits, tmp_path, "mid", *dali), faults={"raise_at_step": 9})
    assert crashed.returncode != 0
    # DALI's own reader state; its epoch is the whole digits set, which the 6-step trainer epochs continue
    # through, so 8 batches of it are done (6 in trainer epoch 1, 2 in epoch 2)
    assert [state["steps_done"] for state in load_checkpoint(tmp_path / "mid.pth.tar")["loader"]] == [8]
    resumed = ok(run("train_ddp.py", *digits_run(digits, tmp_path, "mid", *dali)))
    assert "resumed from" in resumed and "epoch 2 step 2" in resumed
    assert_same_state(tmp_path / "straight.pth.tar", tmp_path / "mid.pth.tar")


def test_two_rank_dali_mid_epoch_resume_with_warmup_and_cosine_is_exact(digits, tmp_path):
    """As users run it: torchrun with 2 ranks, the DALI loader, a warmup then cosine schedule (the lr moves
    every step) and EMA; a crash mid-epoch (rank 1, global step 9, after the step checkpoint at 8), then
    the same command again. The resumed run ends in the straight run's state exactly: weights, EMA,
    optimizer (momentum, the next step's lr), scheduler (last_epoch, last lr), and logs the same loss and lr
    at every step after the resume. Exact because nothing differs: DALI's CPU graph with one thread,
    deterministic kernels, and a 2-rank all-reduce adds the same two numbers either way."""
    words = ["data.loader=dali", "data.num_threads=1", "sched.type=cosine", "optim.warmup_epochs=0.5",
             "train.save_every_steps=4", "train.print_freq=1"]
    straight = ok(run("train_ddp.py", *digits_run(digits, tmp_path, "straight", *words), nproc=2))
    crashed = run("train_ddp.py", *digits_run(digits, tmp_path, "mid", *words), nproc=2,
                  faults={"raise_at_step": 9})
    assert crashed.returncode != 0 and "injected failure on rank 1 at global step 9" in crashed.stderr
    ck = load_checkpoint(tmp_path / "mid.pth.tar")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"], ck["world_size"]) == (1, 2, 8, 2)
    # each rank's own reader state (its own shard, its own augmentation generators)
    assert [state["steps_done"] for state in ck["loader"]] == [8, 8] and ck["loader"][0] != ck["loader"][1]
    lr = ck["optimizer"]["param_groups"][0]["lr"]   # what the first resumed step uses: the straight run's
    assert f"{lr:.5f}" == logged_steps(straight)[9][1] != logged_steps(straight)[8][1]   # and it moves

    resumed = ok(run("train_ddp.py", *digits_run(digits, tmp_path, "mid", *words), nproc=2))
    assert "resumed from" in resumed and "epoch 2 step 2, global step 8" in resumed
    after = logged_steps(resumed)
    assert list(after) == [9, 10, 11, 12]
    assert after == {step: logged for step, logged in logged_steps(straight).items() if step > 8}
    assert_same_state(tmp_path / "straight.pth.tar", tmp_path / "mid.pth.tar")


def test_two_ranks_log_the_numbers_of_the_model_they_save(digits, tmp_path):
    """The digits demo on 2 gloo ranks under torchrun (DALI CPU graph), 3 epochs, with an EMA. The logged best
    epoch's val top-1 / top-5 / loss (and EMA top-1) are what evaluate.py measures on the saved best
    checkpoint with the same 2 ranks, loader and batch: every rank evaluates with rank 0's BatchNorm
    statistics, the ones in the file. The logs count epochs from 1 and show each epoch's last lr."""
    words = ["--config", "demo", "--label=two", f"data.root={digits}", "data.crop_size=32", "data.val_resize=36",
             "data.val_crop=32", "optim.epochs=3", "optim.ema_decay=0.9", f"train.output_dir={tmp_path}"]
    out = ok(run("train_ddp.py", *words, nproc=2))
    rows = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["val_top1"])      # the first of equals, as the trainer picks it
    best_file = tmp_path / "two_best.pth.tar"
    for flags in ([], ["--ema"]):
        e = ok(run("evaluate.py", "--checkpoint", str(best_file), "--batch-size", "32", *flags, nproc=2))
        m = re.search(r"top-1 ([\d.]+)%  top-5 ([\d.]+)%  loss ([\d.]+)  \(359 images\)", e)
        assert m, e
        if flags:
            assert float(m.group(1)) == pytest.approx(best["ema_val_top1"], abs=0.01)
        else:
            assert float(m.group(1)) == pytest.approx(best["val_top1"], abs=0.01)
            assert float(m.group(2)) == pytest.approx(best["val_top5"], abs=0.01)
            assert float(m.group(3)) == pytest.approx(best["val_loss"], abs=1e-3)
    assert f"done: best val top-1 {best['val_top1']:.2f}% at epoch {best['epoch']}" in out
    assert load_checkpoint(best_file)["epoch"] == best["epoch"]   # epochs completed = the 1-based epoch

    # logs: epochs 1..3; the lr column is that of the epoch's last step (22 steps of 64 of the 1,438 digits);
    # step lines carry the epoch's running averages; TensorBoard and the curves are written
    cfg = load_experiment("demo", overrides=["optim.epochs=3"])
    lr_at = lr_multiplier(cfg.optim, cfg.sched, 22)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == pytest.approx([scaled_lr(cfg.optim) * lr_at(e * 22 - 1) for e in (1, 2, 3)])
    assert re.search(r"epoch 2/3 step 10/22  loss \d\.\d{4} \(\d\.\d{4}\)  top1 +[\d.]+% \( *[\d.]+%\)", out), out
    assert list((tmp_path / "tb" / "two").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (tmp_path / "two.png").stat().st_size > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the memory column is CUDA's max_memory_allocated")
def test_step_lines_show_gpu_memory_on_cuda(tmp_path):
    out = ok(run("train_ddp.py", "--config", "demo", "data.loader=synthetic", "optim.epochs=1",
                 "train.steps_per_epoch=4", "train.val_steps=2", "train.print_freq=2", "train.compile=off",
                 f"train.output_dir={tmp_path}"))
    assert re.search(r"epoch 1/1 step 4/4 .* max mem \d+\.\d\d GiB", out), out



def test_a_raising_rank_ends_the_torchrun_job_quickly(tmp_path):
    # The bound is the feature: without the exit path the other rank would wait in its next collective until
    # COLLECTIVE_TIMEOUT (30 min); ending within a minute means it did not wait.
    start = time.monotonic()
    p = run("train_ddp.py", "--config", "demo", "data.loader=synthetic", "data.crop_size=32", "data.val_crop=32",
            "optim.batch_size=8", "train.steps_per_epoch=100000", "train.print_freq=1",
            f"train.output_dir={tmp_path}", nproc=2, faults={"raise_at_step": 3}, timeout=120)
    elapsed = time.monotonic() - start
    assert p.returncode != 0
    assert "[rank 1] training failed" in p.stderr and "injected failure on rank 1 at global step 3" in p.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after rank 1 raised"


DDP_WORKER = """
import sys, torch
from torch import nn
import pipelines
from fdmobilenet.config import DataConfig, OptimConfig, SchedConfig, TrainConfig
from fdmobilenet.distributed import init_distributed, seed_everything, shutdown
from fdmobilenet.engine import Trainer, prepare_model
from fdmobilenet.model import FDMobileNet
from fdmobilenet.optim import build_optimizer, build_scheduler

root, global_batch, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
info = init_distributed("cpu")
torch.manual_seed(0)                      # same init everywhere (DDP would broadcast rank 0's anyway)
module = FDMobileNet(0.25, num_classes=10)
model, _ = prepare_model(module, TrainConfig(compile="off"), info)
# No augmentation: a full-image crop of the square digits, no flip - the only randomness is the shuffle.
data = DataConfig(root=root, num_classes=10, loader="torchvision", num_threads=0, crop_size=32, scale=(1.0, 1.0),
                  ratio=(1.0, 1.0), hflip=False, mean=(0.3, 0.3, 0.3), std=(0.35, 0.35, 0.35))
loader = pipelines.build_loader(data, "train", global_batch // info.world_size, rank=info.rank,
                                world_size=info.world_size, device=info.device)
optim = OptimConfig(lr=0.2, batch_size=global_batch, base_batch_size=global_batch)
opt = build_optimizer(module, optim, info.device)
t = Trainer(model, module, opt, build_scheduler(opt, optim, SchedConfig(), len(loader)), nn.CrossEntropyLoss(), info)
# BatchNorm in eval mode (running statistics): in train mode each rank would normalise with its own half
# batch's statistics, which differ from the full batch's, so the two runs would not compute the same
# function. With fixed statistics the loss is a plain mean over samples and DDP's gradient average over
# ranks equals the single process's gradient over the whole batch.
module.eval()
loader.set_epoch(0)
for step, (images, labels) in zip(range(4), loader):
    t.step(images, labels)
if info.is_main:
    torch.save(module.state_dict(), out)
shutdown()
"""


def test_ddp_two_ranks_equal_one_rank_with_twice_the_batch(digits, tmp_path):
    worker = tmp_path / "ddp_worker.py"
    worker.write_text(DDP_WORKER)
    ok(run(str(worker), str(digits), "32", str(tmp_path / "two.pt"), nproc=2))
    ok(run(str(worker), str(digits), "32", str(tmp_path / "one.pt")))
    two, one = torch.load(tmp_path / "two.pt", weights_only=True), torch.load(tmp_path / "one.pt", weights_only=True)
    torch.manual_seed(0)
    init = FDMobileNet(0.25, num_classes=10).state_dict()   # what the workers started from
    moved = 0
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)
        moved += not torch.equal(value, init[key]) if key.endswith("weight") else 0
    assert moved > 20   # the 4 steps really changed the weights


EMA_WORKER = """
import sys, torch
from torch import nn
import pipelines
from fdmobilenet.checkpoint import CheckpointSaver
from fdmobilenet.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from fdmobilenet.distributed import gather_to_main, init_distributed, shutdown
from fdmobilenet.engine import PreemptionFlag, Trainer, prepare_model
from fdmobilenet.logs import RunLogger
from fdmobilenet.loop import Loop, RunState
from fdmobilenet.model import FDMobileNet
from fdmobilenet.optim import build_ema, build_optimizer, build_scheduler

info = init_distributed("cpu")
torch.manual_seed(0)
cfg = ExperimentConfig(data=DataConfig(loader="synthetic", num_classes=10, crop_size=32, val_crop=32),
                       optim=OptimConfig(batch_size=16, base_batch_size=16, ema_decay=0.9),
                       train=TrainConfig(compile="off", val_steps=2))
module = FDMobileNet(0.25, num_classes=10)
model, eval_model = prepare_model(module, cfg.train, info)
opt = build_optimizer(module, cfg.optim, info.device)
t = Trainer(model, module, opt, build_scheduler(opt, cfg.optim, cfg.sched, 3), nn.CrossEntropyLoss(), info,
            ema=build_ema(module, cfg.optim.ema_decay))
train, val = (pipelines.build_loader(cfg.data, split, 8, rank=info.rank, world_size=2, device=info.device)
              for split in ("train", "val"))
for _, (images, labels) in zip(range(3), train):   # each rank its own batch (synthetic: seeded by rank)
    t.step(images, labels)


def ranks_agree(module):
    mine = [b.clone() for b in module.buffers() if b.is_floating_point()]   # running mean / var
    gathered = gather_to_main(mine, info)
    return gathered is None or all(torch.equal(a, b) for a, b in zip(*gathered))


before = ranks_agree(t.ema.module), ranks_agree(module)
Loop(RunState(t, train, cfg, 3), CheckpointSaver(sys.argv[1], "ema"), RunLogger(sys.argv[1], "ema", False),
     PreemptionFlag(), eval_model=eval_model, val_loader=val).validate()
after = ranks_agree(t.ema.module), ranks_agree(module)
if info.is_main:
    print(f"BatchNorm buffers equal on both ranks (EMA, model): before the evaluation {before}, after {after}",
          flush=True)
shutdown()
"""


def test_after_an_evaluation_every_rank_holds_rank_0s_batchnorm_buffers_in_the_ema_too(tmp_path):
    """Loop.validate on 2 gloo ranks after 3 steps on each rank's own batches: before it, the ranks' BatchNorm
    running statistics differ, in the model and in its EMA (each rank updates both from its own batch); after
    it, every rank holds rank 0's - the ones rank 0 saves - so the logged EMA numbers are the checkpoint's.
    (Compared by value: the EMA's val loss moves by less than 1e-4 here, and its top-1 by one image at most.)"""
    worker = tmp_path / "ema_worker.py"
    worker.write_text(EMA_WORKER)
    out = ok(run(str(worker), str(tmp_path), nproc=2))
    assert ("BatchNorm buffers equal on both ranks (EMA, model): before the evaluation (False, False), after "
            "(True, True)") in out, out


def test_evaluate_released_weights_on_real_photos(released_weights, tmp_path):
    """The authors' 0.25x file over three real photos filed under their ImageNet class index, on 2 ranks
    (DALI CPU; 3 images over 2 ranks: each counted once). The model calls the cat an Egyptian cat (285) and
    the coffee an espresso (967), both top-1; the rocket's class, missile (657), is only in its top 5."""
    import skimage.data
    from PIL import Image
    for index, photo in ((285, "chelsea"), (967, "coffee"), (657, "rocket")):
        (tmp_path / "val" / str(index)).mkdir(parents=True)
        Image.fromarray(getattr(skimage.data, photo)()).save(tmp_path / "val" / str(index) / f"{photo}.jpg", quality=95)
    out = ok(run("evaluate.py", "--checkpoint", str(released_weights), "--data", "imagenet-aggressive", "--model",
                 "0.25x-FDMobileNet-224", "--labels-from-folder-names", f"data.root={tmp_path}", nproc=2))
    m = re.search(r"top-1 ([\d.]+)%  top-5 ([\d.]+)%  loss ([\d.]+)  \((\d+) images\)", out)
    assert m, out
    assert (float(m.group(1)), float(m.group(2)), int(m.group(4))) == (pytest.approx(66.67, abs=0.01), 100.0, 3)
    # without --model the width comes from the file's tensor shapes (it stores no config): the same result
    alone = ok(run("evaluate.py", "--checkpoint", str(released_weights), "--data", "imagenet-aggressive",
                   "--labels-from-folder-names", f"data.root={tmp_path}"))
    assert m.group(0) in alone
    # without --labels-from-folder-names, 3 folders against 1000 outputs: the message names the flag
    p = run("evaluate.py", "--checkpoint", str(released_weights), "--data", "imagenet-aggressive", f"data.root={tmp_path}")
    assert p.returncode == 2 and "--labels-from-folder-names" in p.stderr and "Traceback" not in p.stderr
