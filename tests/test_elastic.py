"""Elastic restart: `torchrun --max-restarts` (launch/local.sh, MAX_RESTARTS) plus the trainer's auto-resume.

A worker killed with SIGKILL mid-epoch (no handler can run: the hard case) makes torchrun stop the other
worker and start the whole group again; the new workers find checkpoints/{label}.pth.tar, continue from the
last step checkpoint and finish the run. Real torchrun, real gloo, real DALI on real JPEGs.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from fdmobilenet.checkpoint import load_checkpoint
from launch_support import (LAUNCH, REPO, build_digits, children, env, global_steps, kill_group, run_words, start,
                            tail, wait_for)

STEPS = 40          # one epoch of 40 steps of 16 images (8 per rank)
SAVE_EVERY = 4      # train.save_every_steps: at most this many steps may be lost
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("digits"))


def test_kill_9_of_one_worker_restarts_the_group_and_resumes_from_the_last_step_checkpoint(digits, tmp_path):
    log = tmp_path / "elastic.log"
    words = run_words(digits, tmp_path, "elastic", f"train.save_every_steps={SAVE_EVERY}", steps=STEPS)
    p = start([str(LAUNCH / "local.sh"), *words], log, MAX_RESTARTS="2", NPROC_PER_NODE="2")
    try:
        wait_for(log, r"epoch 1/1 step 10/", 120, p)
        workers = children(p.pid)          # local.sh execs torchrun: its children are the two workers
        assert len(workers) == 2, f"expected 2 workers under torchrun (pid {p.pid}), found {workers}"
        os.kill(workers[1], signal.SIGKILL)
        rc = p.wait(timeout=150)
    finally:
        if p.poll() is None:
            kill_group(p)
    text = log.read_text(errors="replace")
    assert rc == 0, f"torchrun exit {rc} after the restart; log:\n{tail(log)}"

    before, sep, after = text.partition("resumed from")
    assert sep, f"the restarted workers did not resume; log:\n{tail(log)}"
    assert "failed (exitcode" in before, "torchrun reported no worker failure before the restart"
    assert text.count("resumed from") == 1, "expected exactly one restart"
    resumed_at = int(re.match(r" \S+: epoch 1 step (\d+)", after).group(1))
    last_before = max(global_steps(before, STEPS))
    # resumed from the last step checkpoint: a multiple of SAVE_EVERY, at most SAVE_EVERY steps lost
    assert resumed_at % SAVE_EVERY == 0 and 0 <= last_before - resumed_at <= SAVE_EVERY, (resumed_at, last_before)
    assert global_steps(after, STEPS)[0] == resumed_at + 1      # continues at the next step, none skipped
    assert "done: best val top-1" in after

    ck = load_checkpoint(tmp_path / "elastic.pth.tar")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 0, STEPS)   # the whole epoch, once


@pytest.mark.parametrize("restart_variable", ["TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"])
def test_fresh_starts_over_on_a_first_start_only(digits, tmp_path, restart_variable):
    """`--fresh` in a job that torchrun restarts (MAX_RESTARTS) or SLURM requeues comes again with every
    restart: the restarted command continues from the job's checkpoint instead of starting over once more.
    A first start with --fresh (no restart count) does start over."""
    def train(epochs: int, **extra: str) -> str:
        words = run_words(digits, tmp_path, "fresh", f"optim.epochs={epochs}", "--fresh", steps=2)
        p = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), *words], cwd=REPO, env=env(**extra),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout
    train(1)
    restarted = train(2, **{restart_variable: "1"})
    assert f"resumed from {tmp_path / 'fresh.pth.tar'}: epoch 2 step 0, global step 2" in restarted
    assert global_steps(restarted, 2) == [3, 4]
    again = train(1)
    assert "resumed from" not in again and global_steps(again, 2) == [1, 2]
    assert load_checkpoint(tmp_path / "fresh.pth.tar")["global_step"] == 2
