"""Elastic restart: `torchrun --max-restarts` (launch/local.sh, MAX_RESTARTS) plus the trainer's auto-resume.

A worker killed with SIGKILL mid-epoch (no handler can run: the hard case) makes torchrun stop the other
worker and start the whole group again; the new workers find checkpoints/{label}.pth.tar, continue from the
last step checkpoint and finish the run. Real torchrun, real gloo, real DALI on real JPEGs.
"""
from __future__ import annotations

import os
import re
import signal

import pytest

from fdmobilenet.checkpoint import load_checkpoint
from launch_support import LAUNCH, build_digits, children, global_steps, kill_group, run_words, start, tail, \
    wait_for

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
