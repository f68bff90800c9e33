"""Bad input, end to end through train_ddp.py / evaluate.py (real subprocesses, real files): each case stops
with a clear error that names the file / key / value and says what to do, and loses nothing — the run's
last good checkpoint is byte-for-byte the same afterwards (sha256 before/after).

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
from launch_support import REPO, build_digits, env, run_words, sha256

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


# ------------------------------------------------------------------------------------------------- data
def test_missing_data_dir(good_checkpoint, tmp_path):
    before = resumable(good_checkpoint, tmp_path, "run")
    p = train(tmp_path / "no-such-dir", tmp_path, "run", "optim.epochs=2")
    assert_fails(p, f"data folder {tmp_path / 'no-such-dir'}", "not found", "Set data.root")
    assert sha256(tmp_path / "run.pth.tar") == before


def test_empty_class_folder(digits, good_checkpoint, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    for f in (root / "train" / "3").iterdir():
        f.unlink()
    before = resumable(good_checkpoint, tmp_path, "run")
    p = train(root, tmp_path, "run", "optim.epochs=2")
    assert_fails(p, "empty class folder", str(root / "train" / "3"), "Add images or remove the folder")
    assert sha256(tmp_path / "run.pth.tar") == before


@pytest.mark.parametrize("damage", ["truncated", "not-a-jpeg"])
def test_corrupt_jpeg_is_named(digits, good_checkpoint, tmp_path, damage):
    """A truncated JPEG is found up front; random bytes under a .jpg name when DALI decodes the batch (so the
    run covers the whole epoch: train.steps_per_epoch=0)."""
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    victim = sorted((root / "train" / "7").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(len(data)))
    before = resumable(good_checkpoint, tmp_path, "run")
    p = train(root, tmp_path, "run", "optim.epochs=2", *([] if damage == "truncated" else ["train.steps_per_epoch=0"]))
    assert_fails(p, str(victim), "replace or delete", "data.on_corrupt=skip")
    assert sha256(tmp_path / "run.pth.tar") == before


# ----------------------------------------------------------------------------------------------- config
def test_unknown_config_key_names_the_file_and_the_key(digits, good_checkpoint, tmp_path):
    data_cfg = tmp_path / "my-data.yaml"
    data_cfg.write_text((REPO / "configs" / "data" / "digits-demo.yaml").read_text()
                        .replace("hflip: false", "hflipp: false"))
    before = resumable(good_checkpoint, tmp_path, "run")
    p = train(digits, tmp_path, "run", "--data", str(data_cfg))
    assert_fails(p, str(data_cfg), "unknown key 'data.hflipp'", "did you mean 'hflip'")
    assert "Traceback" not in p.stderr          # a config mistake is a message, not a crash
    assert sha256(tmp_path / "run.pth.tar") == before


def test_wrong_type_names_the_key_and_the_value(digits, good_checkpoint, tmp_path):
    before = resumable(good_checkpoint, tmp_path, "run")
    p = train(digits, tmp_path, "run", "optim.lr=fast")
    assert_fails(p, "key 'optim.lr': expected a number (float), got 'fast'")
    assert "Traceback" not in p.stderr
    assert sha256(tmp_path / "run.pth.tar") == before


def test_per_rank_batch_larger_than_the_shard(digits, tmp_path):
    p = train(digits, tmp_path, "big", "optim.batch_size=2000", "optim.base_batch_size=2000")
    assert_fails(p, "per-rank batch size 2000 is larger than", "1438 training images", "use a smaller optim.batch_size")
    assert not (tmp_path / "big.pth.tar").exists()


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_of_another_width(digits, good_checkpoint, tmp_path):
    ck = load_checkpoint(good_checkpoint)
    ck["state_dict"] = FDMobileNet(0.5, num_classes=10).state_dict()
    save_checkpoint(ck, tmp_path / "run.pth.tar")
    before = sha256(tmp_path / "run.pth.tar")
    p = train(digits, tmp_path, "run", "optim.epochs=2")
    assert_fails(p, f"checkpoint {tmp_path / 'run.pth.tar'} does not fit the model",
                 "features.conv_0.weight has shape (16, 3, 3, 3) in the checkpoint but (8, 3, 3, 3) in the model",
                 "width_mult")
    assert sha256(tmp_path / "run.pth.tar") == before


def test_truncated_checkpoint(digits, good_checkpoint, tmp_path):
    data = good_checkpoint.read_bytes()
    (tmp_path / "run.pth.tar").write_bytes(data[: len(data) // 2])
    p = train(digits, tmp_path, "run", "optim.epochs=2")
    assert_fails(p, f"checkpoint {tmp_path / 'run.pth.tar'} is truncated or corrupt", "use an earlier checkpoint")
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
    assert_fails(train(digits, tmp_path, "run", "--resume"), f"checkpoint {evil}", refused, "it was not loaded")
    p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(evil), f"data.root={digits}",
                        "data.val_resize=36", "data.val_crop=32"], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=60)
    assert_fails(p, f"checkpoint {evil}", refused)
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
        text = assert_fails(p, f"could not write checkpoint {out / 'run.pth.tar'}", "No space left on device",
                            "the previous file (if any) is unchanged")
        # the OSError itself is kept as the cause
        assert "OSError: [Errno 28] No space left on device" in text, text[-3000:]
        assert "The above exception was the direct cause of the following exception" in text
        assert sha256(out / "run.pth.tar") == before
        assert load_checkpoint(out / "run.pth.tar")["global_step"] == STEPS        # still loads
        assert not [f.name for f in out.iterdir() if ".tmp" in f.name or f.name.startswith(".")], \
            f"temporary files left behind: {sorted(f.name for f in out.iterdir())}"
    finally:
        subprocess.run(["umount", str(out)], check=True)
