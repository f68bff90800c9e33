"""Bad input, end to end through train_ddp.py / evaluate.py (real subprocesses, real files): each case stops
with a clear error that names the file / key / value and says what to do, and loses nothing — the run's
last good checkpoint is byte-for-byte the same afterwards (sha256 before/after). A user's mistake is one
line `train_ddp.py: ...` (or `evaluate.py: ...`), printed once, without a traceback, with exit code 2
(fdmobilenet/cli.py); the launchers find the same mistakes in their pre-flight before starting torchrun.

The loader's and checkpoint module's own unit tests live with them (test_pipelines_*, test_checkpoint); these
are the user-facing checks. Each run is one plain CPU process on the 32 px digits, a few seconds.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdmobilenet.checkpoint import load_checkpoint, save_checkpoint
from fdmobilenet.model import FDMobileNet
from launch_support import LAUNCH, REPO, build_digits, env, run, run_words, sha256

STEPS = 2


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return build_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def good_checkpoint(digits, tmp_path_factory) -> Path:
    """A real checkpoint of one finished epoch (2 steps), to resume from."""
    out = tmp_path_factory.mktemp("good")
    p = train(digits, out, "good")
    assert p.returncode == 0, p.stdout + p.stderr
    return out / "good.pth.tar"


def train(root: Path, out: Path, label: str, *extra: str, faults: dict | None = None) -> subprocess.CompletedProcess:
    """One plain train_ddp.py process (a few seconds; the timeout only stops a hang). ``faults``: keywords
    of fault_plugin.fault_env."""
    words = run_words(root, out, label, *extra, steps=STEPS)
    return subprocess.run([sys.executable, str(REPO / "train_ddp.py"), *words], cwd=REPO, env=env(faults),
                          capture_output=True, text=True, timeout=120)


def resumable(good: Path, out: Path, label: str) -> str:
    """Put the good checkpoint where the run ``label`` auto-resumes from; returns its sha256."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(good, out / f"{label}.pth.tar")
    return sha256(out / f"{label}.pth.tar")


def assert_fails(p: subprocess.CompletedProcess, *needles: str) -> str:
    text = p.stdout + p.stderr
    assert p.returncode != 0, f"expected a failure, got exit 0:\n{text[-3000:]}"
    for needle in needles:
        assert needle in text, f"{needle!r} not in the error:\n{text[-3000:]}"
    return text


def assert_user_error(p: subprocess.CompletedProcess, *needles: str, prog: str = "train_ddp.py") -> str:
    """A user's mistake: exit 2, no traceback, and exactly one line `prog: ...` that holds every needle."""
    text = assert_fails(p, *needles)
    assert p.returncode == 2 and "Traceback" not in text, f"exit {p.returncode}:\n{text[-3000:]}"
    lines = [line for line in text.splitlines() if line.startswith(f"{prog}: ")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), text[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------- data
def test_missing_data_dir(good_checkpoint, tmp_path):
    before = resumable(good_checkpoint, tmp_path, "run")
    p = train(tmp_path / "no-such-dir", tmp_path, "run", "optim.epochs=2")
    assert_user_error(p, f"data folder {tmp_path / 'no-such-dir'}", "not found", "Set data.root")
    assert sha256(tmp_path / "run.pth.tar") == before


def test_empty_class_folder(digits, good_checkpoint, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    for f in (root / "train" / "3").iterdir():
        f.unlink()
    before = resumable(good_checkpoint, tmp_path, "run")
    p = train(root, tmp_path, "run", "optim.epochs=2")
    assert_user_error(p, "empty class folder", str(root / "train" / "3"), "Add images or remove the folder")
    assert sha256(tmp_path / "run.pth.tar") == before


@pytest.mark.parametrize("damage", ["truncated", "not-a-jpeg", "val-headers"])
def test_corrupt_jpeg_is_named(digits, good_checkpoint, tmp_path, damage):
    """Found up front by the data pre-flight, before the first step: a truncated train JPEG, random bytes under
    a .jpg name, and a val JPEG whose headers are garbled (not only at the first evaluation, an epoch later)."""
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    victim = sorted((root / ("val" if damage == "val-headers" else "train") / "7").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes({"truncated": data[: len(data) // 3], "not-a-jpeg": os.urandom(len(data)),
                        "val-headers": data[:2] + bytes(200) + data[202:]}[damage])
    before = resumable(good_checkpoint, tmp_path, "run")
    p = train(root, tmp_path, "run", "optim.epochs=2", "train.steps_per_epoch=0")
    assert_user_error(p, str(victim), "replace or delete", "data.on_corrupt=skip")
    assert "epoch 2/2 step" not in p.stdout                      # no training step ran
    assert sha256(tmp_path / "run.pth.tar") == before


def test_damaged_files_of_both_splits_in_one_start(digits, tmp_path):
    """A truncated train JPEG and a val JPEG with garbled headers: one start names both (at fa77a31 the val one
    alone, the train one only at the next start), in the trainer's scan and in the launcher's pre-flight,
    which reads the manifests' verdicts."""
    from pipelines.verify import main as verify_main
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    train_victim, val_victim = (sorted((root / split / "7").iterdir())[0] for split in ("train", "val"))
    train_victim.write_bytes(train_victim.read_bytes()[:300])
    data = val_victim.read_bytes()
    val_victim.write_bytes(data[:2] + bytes(200) + data[202:])
    line = assert_user_error(train(root, tmp_path, "run"), str(train_victim), str(val_victim))
    assert line.count("replace or delete them") == 1        # the advice once, each split's verify command
    assert all(f"`python -m pipelines.verify {root / split}`" in line for split in ("val", "train"))
    assert verify_main([str(root), "--manifest"]) == 1
    p = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), "--check", *run_words(root, tmp_path, "run")],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert_user_error(p, str(train_victim), str(val_victim))


# ----------------------------------------------------------------------------------------------- config
def test_unknown_config_key_names_the_file_and_the_key(digits, good_checkpoint, tmp_path):
    data_cfg = tmp_path / "my-data.yaml"
    data_cfg.write_text((REPO / "configs" / "data" / "digits-demo.yaml").read_text()
                        .replace("hflip: false", "hflipp: false"))
    before = resumable(good_checkpoint, tmp_path, "run")
    p = train(digits, tmp_path, "run", "--data", str(data_cfg))
    assert_user_error(p, str(data_cfg), "unknown key 'data.hflipp'", "did you mean 'hflip'")
    assert "Traceback" not in p.stderr          # a config mistake is a message, not a crash
    assert sha256(tmp_path / "run.pth.tar") == before


def test_wrong_type_names_the_key_and_the_value(digits, good_checkpoint, tmp_path):
    before = resumable(good_checkpoint, tmp_path, "run")
    p = train(digits, tmp_path, "run", "optim.lr=fast")
    assert_user_error(p, "key 'optim.lr': expected a number (float), got 'fast'")
    assert "Traceback" not in p.stderr
    assert sha256(tmp_path / "run.pth.tar") == before


def test_per_rank_batch_larger_than_the_shard(digits, tmp_path):
    """One line that says what to set, from the ranks and from the launchers' pre-flight (2 ranks: 719 each)."""
    p = train(digits, tmp_path, "big", "optim.batch_size=2000", "optim.base_batch_size=2000")
    assert_user_error(p, "per-rank batch size 2000 is larger than", "1438 training images",
                      "set optim.batch_size (the global batch) to 1438 or less")
    p = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), "--check", "--world-size", "2",
                        *run_words(digits, tmp_path, "big", batch=2000)], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert_user_error(p, "per-rank batch size 1000 is larger than", "(1438 // 2 ranks = 719)",
                      "set optim.batch_size (the global batch) to 1438 or less")
    assert not (tmp_path / "big.pth.tar").exists()


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_of_another_width(digits, good_checkpoint, tmp_path):
    ck = load_checkpoint(good_checkpoint)
    ck["state_dict"] = FDMobileNet(0.5, num_classes=10).state_dict()
    save_checkpoint(ck, tmp_path / "run.pth.tar")
    before = sha256(tmp_path / "run.pth.tar")
    p = train(digits, tmp_path, "run", "optim.epochs=2")
    assert_user_error(p, f"checkpoint {tmp_path / 'run.pth.tar'} does not fit the model",
                      "features.conv_0.weight has shape (16, 3, 3, 3) in the checkpoint but (8, 3, 3, 3) in the model",
                      "width_mult", "start over with --fresh", "or use a new --label")
    assert sha256(tmp_path / "run.pth.tar") == before


def test_resume_by_label_takes_the_config_it_was_saved_with_and_never_suggests_fresh_for_it(digits, tmp_path):
    """`train_ddp.py --label L --resume` without --config continues L with the config it was saved with
    (its {label}.config.yaml), says so, and takes the overrides on top. With a --config whose model does
    not fit L's checkpoint, the one line says how to continue L (and to give this config a new label),
    not --fresh, which would destroy it; the checkpoint stays as it was."""
    assert train(digits, tmp_path, "mine").returncode == 0
    saved = tmp_path / "mine.config.yaml"
    p = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), "--label", "mine", "--resume",
                        f"train.output_dir={tmp_path}", "optim.epochs=2"], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith(f"config: {saved}, what run 'mine' was saved with (no --config given); on top: "
                               f"train.output_dir={tmp_path} optim.epochs=2\n"), p.stdout
    assert f"resumed from {tmp_path / 'mine.pth.tar'}: epoch 2 step 0, global step {STEPS}" in p.stdout
    assert "  with a config that differs from the one it was saved with: optim.epochs 1 -> 2\n" in p.stdout
    assert f"epoch 2/2 step {STEPS}/{STEPS}" in p.stdout and "FD-MobileNet 0.25x" in p.stdout
    assert load_checkpoint(tmp_path / "mine.pth.tar")["global_step"] == 2 * STEPS

    before = sha256(tmp_path / "mine.pth.tar")
    p = train(digits, tmp_path, "mine", "optim.epochs=3", "model.width_mult=0.5")
    line = assert_user_error(p, f"checkpoint {tmp_path / 'mine.pth.tar'} does not fit the model",
                             "— it was saved with another config (model.width_mult 0.25 -> 0.5)",
                             "to continue it, keep the values it was saved with (`train_ddp.py --label mine` "
                             "without --config takes its saved config); to train this config, use a new --label")
    assert "--fresh" not in line and sha256(tmp_path / "mine.pth.tar") == before


def test_truncated_checkpoint(digits, good_checkpoint, tmp_path):
    data = good_checkpoint.read_bytes()
    (tmp_path / "run.pth.tar").write_bytes(data[: len(data) // 2])
    p = train(digits, tmp_path, "run", "optim.epochs=2")
    assert_user_error(p, f"checkpoint {tmp_path / 'run.pth.tar'} is truncated or corrupt", "use an earlier checkpoint")
    assert (tmp_path / "run.pth.tar").read_bytes() == data[: len(data) // 2]   # not replaced by a fresh start


class Payload:
    """Unpickling this runs a shell command: what a malicious "checkpoint" can do with a plain torch.load."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_checkpoint_is_refused_by_train_and_evaluate(digits, tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "run.pth.tar"
    torch.save({"state_dict": FDMobileNet(0.25, num_classes=10).state_dict(), "epoch": Payload(marker)}, evil)
    refused = "contains objects that are not plain tensors/containers"
    assert_user_error(train(digits, tmp_path, "run", "--resume"), f"checkpoint {evil}", refused, "it was not loaded")
    p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(evil), f"data.root={digits}",
                        "data.val_resize=36", "data.val_crop=32"], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=60)
    assert_user_error(p, f"checkpoint {evil}", refused, prog="evaluate.py")
    assert not marker.exists(), "the pickled payload ran"


# -------------------------------------------------------------------------------------------- during a run
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(digits, good_checkpoint, tmp_path):
    before = resumable(good_checkpoint, tmp_path, "run")
    # resumed at global step 2; the loss of global step 3 (epoch 2, its second step) becomes NaN. No log point
    # before the step checkpoint at 4 (print_freq 100): the save itself must find the NaN and refuse to write.
    p = train(digits, tmp_path, "run", "optim.epochs=2", "train.steps_per_epoch=6", "train.save_every_steps=2",
              "train.print_freq=100", faults={"nan_at_step": 3})
    assert_fails(p, "NonFiniteLossError: training loss is NaN/Inf in epoch 2, at global step 3 (counted from 0)",
                 "the last checkpoint is the last good state", "Lower optim.lr")
    assert p.returncode == 1 and "Traceback" in p.stderr     # not a mistake in the command: a crash, exit 1
    assert sha256(tmp_path / "run.pth.tar") == before
    ck = load_checkpoint(tmp_path / "run.pth.tar")
    assert ck["global_step"] == STEPS
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())


def test_disk_full_while_saving_keeps_the_previous_checkpoint(digits, good_checkpoint, tmp_path):
    """Output on a real tmpfs just big enough for the previous checkpoint (mount -t tmpfs, as root): the next
    save runs out of space. Where mounting is not allowed the test is skipped with the reason (in CI, which
    runs as root, it fails)."""
    out = tmp_path / "small"
    out.mkdir()
    size = good_checkpoint.stat().st_size
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + 256 * 1024}", "tmpfs", str(out)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        why = f"cannot mount a tmpfs here (needs root): {mount.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs as root and must test a full disk: {why}")
        pytest.skip(why)
    try:
        before = resumable(good_checkpoint, out, "run")
        p = train(digits, out, "run", "optim.epochs=2")
        # a full disk is the user's to fix: one line (exit 2) that names the file, the cause and what is kept
        assert_user_error(p, f"could not write checkpoint {out / 'run.pth.tar'}", "No space left on device",
                          "the previous file (if any) is unchanged")
        assert sha256(out / "run.pth.tar") == before
        assert load_checkpoint(out / "run.pth.tar")["global_step"] == STEPS        # still loads
        assert not [f.name for f in out.iterdir() if ".tmp" in f.name or f.name.startswith(".")], \
            f"temporary files left behind: {sorted(f.name for f in out.iterdir())}"
    finally:
        subprocess.run(["umount", str(out)], check=True)


# ------------------------------------------------------------------------------------------- the command
@pytest.mark.parametrize("extra, needles", [
    (["--data", "imagenet-agressive"], ["config file not found: imagenet-agressive", "nearest names: imagenet-aggressive"]),
    (["train.compile=false"], ["key 'train.compile': expected one of auto, on, off, got False"]),
    (["--evaluate"], ["--evaluate: no checkpoint", "never-trained.pth.tar", "evaluate.py --checkpoint FILE"]),
    (["--resume"], ["--resume: no checkpoint", "never-trained.pth.tar for label 'never-trained'",
                    "leave out --resume to start this one"]),
    (["train.cuda_graphs=on"], ["train.cuda_graphs=on: this run is on the cpu, and CUDA graphs need a GPU. "
                                "Use train.cuda_graphs=auto or off"]),
    (["--check", "--world-size", "2", "train.cuda_graphs=on"],     # the launchers' pre-flight, before any rank
     ["train.cuda_graphs=on: this run has 2 ranks, and graphs are one-GPU only"]),
    (["data.train_res={start_res: 150, ramp_start: 2, ramp_end: 3}"],
     ["key 'data.train_res': start_res must be a positive multiple of 32 (the network's stride), got 150"]),
    (["--check", "data.train_res={start_res: 32, ramp_start: 2, ramp_end: 3}", "data.crop_size=40"],
     ["data.train_res ramps to data.crop_size, which must then be a positive multiple of 32, got 40"]),
], ids=["family-typo", "invalid-choice", "evaluate-untrained-label", "resume-missing", "cuda-graphs-on-cpu",
        "cuda-graphs-on-two-ranks-check", "ramp-value", "ramp-end-check"])
def test_command_mistakes_say_what_to_do(digits, tmp_path, extra, needles):
    assert_user_error(train(digits, tmp_path, "never-trained", *extra), *needles)
    assert not any(tmp_path.iterdir()), sorted(tmp_path.iterdir())   # nothing written: no checkpoint, no logs


def test_bare_width_a_runs_own_config_file_and_a_finished_run(digits, tmp_path):
    """--model takes a bare width (as evaluate.py, predict and convert_model.py do); the {label}.config.yaml a
    run writes is a valid --config; running a finished run again says so and leaves its files alone."""
    p = train(digits, tmp_path, "w", "--model", "0.25")
    assert p.returncode == 0, p.stdout + p.stderr
    assert load_checkpoint(tmp_path / "w.pth.tar")["name"] == "0.25x-FDMobileNet-224"
    before = sha256(tmp_path / "w.pth.tar")
    own = ["--config", str(tmp_path / "w.config.yaml")]
    again = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), *own], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (f"train_ddp.py: {tmp_path / 'w.pth.tar'} has completed all 1 epochs (best val top-1 " in again.stdout
            and "nothing left to do" in again.stdout and "epoch 1/1 step" not in again.stdout)
    assert sha256(tmp_path / "w.pth.tar") == before
    scored = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), *own, "--evaluate"], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=60)
    assert scored.returncode == 0 and f"evaluate {tmp_path / 'w.pth.tar'}: top-1 " in scored.stdout, scored.stderr


def test_evaluate_mistakes(good_checkpoint, photo_root):
    """A 10-class model on a folder of 3 classes: the message says how such a folder is scored; --ema of a
    file without EMA weights; a checkpoint that does not exist."""
    p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(good_checkpoint),
                        f"data.root={photo_root}"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
    assert_user_error(p, f"{photo_root / 'val'} has 3 class folders but {good_checkpoint} has 10 outputs",
                      "--labels-from-folder-names", prog="evaluate.py")
    p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(good_checkpoint), "--ema"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
    assert_user_error(p, "--ema:", "holds no EMA weights", prog="evaluate.py")
    missing = good_checkpoint.parent / "no-such.pth.tar"
    p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(missing)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=60)
    assert_user_error(p, f"checkpoint {missing} not found", prog="evaluate.py")


def test_a_mistake_is_reported_once_and_the_launcher_starts_nothing(digits, tmp_path):
    """Straight torchrun with 2 ranks: both find the missing folder, rank 0 alone reports it. The launcher
    finds it in its pre-flight before torchrun starts, so MAX_RESTARTS=3 restarts nothing; likewise a global
    batch that the 2 ranks cannot share."""
    missing = tmp_path / "no-such-dir"
    words = run_words(missing, tmp_path, "run", steps=STEPS)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "train_ddp.py"), *words], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=120)
    text = p.stdout + p.stderr
    assert p.returncode != 0 and text.count(f"train_ddp.py: data folder {missing}") == 1, text[-3000:]
    assert "training failed" not in text and "[rank 1]" not in text
    for root, batch, needle in ((missing, 16, f"train_ddp.py: data folder {missing}"),
                                (digits, 15, "train_ddp.py: optim.batch_size=15 (global) must divide evenly over 2")):
        rc, text = run([str(LAUNCH / "local.sh"), *run_words(root, tmp_path, "run", steps=STEPS, batch=batch)],
                       tmp_path / "launch.log", timeout=120, MAX_RESTARTS="3", NPROC_PER_NODE="2")
        assert rc == 2 and text.count(needle) == 1, text[-3000:]
        assert "torch.distributed" not in text and "Traceback" not in text   # torchrun never started
    assert not (tmp_path / "run.pth.tar").exists()
