"""Preemption: SIGTERM / SIGUSR1 mid-epoch -> every rank stops at the next agreed step boundary, rank 0 writes
a checkpoint that records the step, the processes exit cleanly; the next run of the same command resumes at
that step. Real torchrun (launch/local.sh), real gloo, real DALI on real JPEGs.

Exit codes (documented in the README): the workers exit 0 after a preemption checkpoint. torchrun itself, when
it was signalled too (SLURM signals every process of the step; the test signals the whole process group),
re-raises the signal as its SignalException and exits 1 — the "preempted ... checkpoint saved" line is what
tells a preemption from a failure. The SLURM requeue path is tested in test_launch_slurm.py.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from fdmobilenet.checkpoint import load_checkpoint
from launch_support import LAUNCH, assert_same_state, build_digits, children, global_steps, kill_group, run, \
    run_words, start, tail, wait_for, worker_ranks

STEPS = 80   # a long enough epoch that the signal lands mid-epoch (the ranks poll the flag every 10 steps)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("digits"))


def signal_mid_epoch(digits, tmp_path, label: str, send, *extra: str) -> tuple[int, float, str]:
    """Start a 2-rank run, wait until it trains, call ``send(proc)``; returns (exit code, seconds from the
    signal to the end of the job, log)."""
    log = tmp_path / f"{label}.log"
    p = start([str(LAUNCH / "local.sh"), *run_words(digits, tmp_path, label, *extra, steps=STEPS)], log,
              NPROC_PER_NODE="2")
    try:
        wait_for(log, r"epoch 1/1 step 3/", 120, p)
        sent = time.monotonic()
        send(p)
        rc = p.wait(timeout=60)            # the checkpoint must be written well within SLURM's 120 s notice
        return rc, time.monotonic() - sent, log.read_text(errors="replace")
    finally:
        if p.poll() is None:
            kill_group(p)


def assert_preempted_checkpoint(text: str, tmp_path, label: str, signame: str) -> int:
    m = re.search(rf"preempted \({signame}\) at epoch 1 step (\d+), checkpoint saved to (\S+)", text)
    assert m, f"no preemption line for {signame}; log:\n{text[-3000:]}"
    step = int(m.group(1))
    assert 3 <= step < STEPS and m.group(2) == str(tmp_path / f"{label}.pth.tar")
    ck = load_checkpoint(tmp_path / f"{label}.pth.tar")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (0, step, step)
    assert max(global_steps(text, STEPS)) <= step        # no step after the agreed stop
    return step


def test_sigterm_to_the_job_checkpoints_at_a_step_boundary_and_the_next_run_resumes_there(digits, tmp_path):
    # SIGTERM to torchrun's process group: torchrun and both workers get it, as from SLURM at preemption
    rc, seconds, text = signal_mid_epoch(digits, tmp_path, "term", lambda p: os.killpg(p.pid, signal.SIGTERM))
    step = assert_preempted_checkpoint(text, tmp_path, "term", "SIGTERM")
    print(f"SIGTERM at step >= 3 -> checkpoint at step {step}, job ended {seconds:.1f} s after the signal")
    assert seconds < 60
    assert rc == 1 and "SignalException" in text and "got signal: 15" in text   # torchrun's own exit, see above
    assert "training failed" not in text

    # the same command again: auto-resume at the step, then the rest of the epoch, nothing repeated
    rc, text = run([str(LAUNCH / "local.sh"), *run_words(digits, tmp_path, "term", steps=STEPS)],
                   tmp_path / "term-resume.log", timeout=120, NPROC_PER_NODE="2")
    assert rc == 0, text[-3000:]
    assert f"resumed from {tmp_path / 'term.pth.tar'}: epoch 1 step {step}, global step {step}" in text
    assert global_steps(text, STEPS) == list(range(step + 1, STEPS + 1))
    ck = load_checkpoint(tmp_path / "term.pth.tar")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 0, STEPS)


def test_sigusr1_to_the_workers_only_stops_them_with_exit_0(digits, tmp_path):
    # SIGUSR1 to the two workers only (what `#SBATCH --signal=USR1@T` without B: reaches, or a user's kill):
    # they checkpoint and exit 0, so torchrun ends with 0 and does not restart them.
    def to_workers(p):
        workers = children(p.pid)
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGUSR1)
    rc, seconds, text = signal_mid_epoch(digits, tmp_path, "usr1", to_workers)
    assert_preempted_checkpoint(text, tmp_path, "usr1", "SIGUSR1")
    assert rc == 0 and seconds < 60, tail(tmp_path / "usr1.log")


def test_sigusr1_to_one_worker_stops_both_at_one_step_and_the_resumed_run_ends_as_an_uninterrupted_one(
        digits, tmp_path):
    """Only rank 1 gets SIGUSR1 (a user's kill, a scheduler that signals one process): rank 0 learns of it
    through the agreement all-reduce, both stop at the same step and take part in its checkpoint (each
    rank's reader state there says how far that rank got), and torchrun ends with 0. The same command then
    finishes the epoch, to the uninterrupted run's weights, EMA and optimizer state exactly: deterministic
    kernels and one DALI thread make both runs the same arithmetic."""
    exact = ["train.deterministic=true", "data.num_threads=1", "optim.ema_decay=0.9"]

    def to_rank_1(p):
        ranks = worker_ranks(p.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGUSR1)
    rc, seconds, text = signal_mid_epoch(digits, tmp_path, "one", to_rank_1, *exact)
    assert rc == 0 and seconds < 60, tail(tmp_path / "one.log")
    step = assert_preempted_checkpoint(text, tmp_path, "one", "signal on another rank")
    ck = load_checkpoint(tmp_path / "one.pth.tar")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert [state["steps_done"] for state in ck["loader"]] == [step, step]    # both ranks stopped there

    words = run_words(digits, tmp_path, "one", *exact, steps=STEPS)
    rc, text = run([str(LAUNCH / "local.sh"), *words], tmp_path / "one-resume.log", timeout=180, NPROC_PER_NODE="2")
    assert rc == 0 and f"epoch 1 step {step}, global step {step}" in text, text[-3000:]
    assert global_steps(text, STEPS) == list(range(step + 1, STEPS + 1))
    rc, text = run([str(LAUNCH / "local.sh"), *run_words(digits, tmp_path, "straight", *exact, steps=STEPS)],
                   tmp_path / "straight.log", timeout=180, NPROC_PER_NODE="2")
    assert rc == 0, text[-3000:]
    assert_same_state(tmp_path / "straight.pth.tar", tmp_path / "one.pth.tar")
