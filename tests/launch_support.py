"""Helpers for the launch / fault tests (test_launch_*, test_elastic, test_preemption, test_bad_input,
test_train_runs): short real training runs of train_ddp.py on scikit-learn's digits, started through the
project's launch scripts, the process plumbing to watch and signal them (log lines, process groups,
torchrun's children via /proc), and the comparison of two runs' checkpoints.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from fault_plugin import fault_env
from fdmobilenet.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def build_digits(root: Path) -> Path:
    """The demo data set (1,797 real handwritten digits), at 32 px so a training step takes milliseconds."""
    from pipelines.demo_data import build_digits as build
    build(root, size=32)
    return root


def run_words(digits: Path, out: Path, label: str, *extra: str, steps: int = 4, batch: int = 16) -> list[str]:
    """train_ddp.py arguments for a short run of the demo experiment (DALI, as the demo) on CPU: one epoch of
    ``steps`` steps at a global batch of ``batch``, a log line per step, everything under ``out``."""
    return ["--config", "demo", f"--label={label}", f"data.root={digits}", "data.crop_size=32",
            "data.val_resize=36", "data.val_crop=32", f"optim.batch_size={batch}", "optim.epochs=1",
            f"train.steps_per_epoch={steps}", "train.print_freq=1", f"train.output_dir={out}",
            "train.plot=false", *extra]


def free_port() -> int:
    """A TCP port free on the loopback now (a rendezvous endpoint; other jobs on the machine use theirs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(faults: dict | None = None, **extra: str) -> dict:
    """The environment of a test's subprocess: ``faults`` (keywords of fault_plugin.fault_env, e.g.
    ``{"raise_at_step": 9}``) switch the test-only fault plugin on; no fault is inherited from outside."""
    return {**fault_env(**(faults or {})), "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", **extra}


def start(cmd: list[str], log: Path, faults: dict | None = None, **env_extra: str) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so the test can signal its whole process group, as SLURM does),
    stdout and stderr into ``log``."""
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env(faults, **env_extra), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def run(cmd: list[str], log: Path, timeout: float, faults: dict | None = None, **env_extra: str) -> tuple[int, str]:
    """Run ``cmd`` to the end (bounded); returns (exit code, log text)."""
    p = start(cmd, log, faults, **env_extra)
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        raise AssertionError(f"{' '.join(map(str, cmd))} did not end within {timeout} s; log:\n{tail(log)}")
    return rc, log.read_text(errors="replace")


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def kill_group(p: subprocess.Popen) -> None:
    """Clean-up after a failed test: the process group AND every descendant (torchrun starts each worker in
    a process group of its own, out of reach of a signal to its group)."""
    for pid in [*descendants(p.pid), p.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def kill_and_continue(pids) -> None:
    """Clean-up after kill -STOP (and for processes that may be stopped): SIGKILL, and SIGCONT so that
    nothing stays stopped."""
    for pid in pids:
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def wait_for(log: Path, pattern: str, timeout: float, proc: subprocess.Popen | None = None) -> re.Match:
    """Poll ``log`` until ``pattern`` (a regex) appears; fails early if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        m = rx.search(log.read_text(errors="replace")) if log.exists() else None
        if m:
            return m
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before /{pattern}/; log:\n{tail(log)}")
        time.sleep(0.1)
    raise AssertionError(f"no /{pattern}/ within {timeout} s; log:\n{tail(log)}")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc (torchrun's workers are its children)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return sorted(kids)


def worker_ranks(pid: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's workers (children of ``pid``), from each worker's environment."""
    ranks = {}
    for kid in children(pid):
        environ = dict(item.split("=", 1) for item in
                       (Path("/proc") / str(kid) / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in item)
        ranks[int(environ["RANK"])] = kid
    return ranks


def global_steps(text: str, steps_per_epoch: int) -> list[int]:
    """Global steps of the trainer's per-step lines ``epoch E/N step s/S``."""
    return [(int(e) - 1) * steps_per_epoch + int(s) for e, s in re.findall(r"epoch (\d+)/\d+ step (\d+)/\d+", text)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_state(a: Path, b: Path) -> None:
    """Two checkpoints hold the same training state exactly: weights, EMA, optimizer, scheduler."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["global_step"] == cb["global_step"] and ca["epoch"] == cb["epoch"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), f"{key} differs between {a.name} and {b.name}"
    for key, value in ca["ema"].items():
        assert torch.equal(value, cb["ema"][key]), f"EMA {key} differs between {a.name} and {b.name}"
    assert ca["ema_n_averaged"] == cb["ema_n_averaged"] == ca["global_step"]
    for key, value in ca["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], cb["optimizer"]["state"][key]["momentum_buffer"])
    # the lr the next step would use (optimizer) and the schedule's position (scheduler: last_epoch, _last_lr)
    assert ca["optimizer"]["param_groups"] == cb["optimizer"]["param_groups"]
    assert ca["scheduler"] == cb["scheduler"] and ca["scheduler"]["last_epoch"] == ca["global_step"]


def assert_same_training(a: Path, b: Path, steps: int) -> None:
    """Two checkpoints of the same run on different layouts of the same ranks (see test_launch_multinode.py
    for why they must agree): the same weights and SGD momentum buffers up to the order of the floating-point
    additions inside the all-reduce, after ``steps`` steps that really trained."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["global_step"] == cb["global_step"] == steps
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key, value in cb["state_dict"].items():
        torch.testing.assert_close(ca["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # the steps really trained: the momentum buffers (the running sum of the averaged gradients) are non-zero
    # and the same in both runs
    for key, state in cb["optimizer"]["state"].items():
        assert state["momentum_buffer"].abs().sum() > 0
        torch.testing.assert_close(ca["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=1e-4, atol=1e-6)
