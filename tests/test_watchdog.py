"""The hung-rank watchdog (fdmobilenet/watchdog.py: torch.distributed.elastic.timer's FileTimerServer in a
process forked by each rank, FileTimerClient timers around each training-loop iteration):

  * the module itself, in a real process: the first step gets train.first_step_timeout_s, healthy steps
    that last longer than train.step_timeout_s together are not killed (each re-arms the timer), leaving the
    loop stops the timing, a stalled step is SIGKILLed within train.step_timeout_s, nothing is left behind;
  * on one node under torchrun (launch/local.sh): kill -STOP of one worker -> its watchdog kills it within
    train.step_timeout_s -> torchrun (MAX_RESTARTS) restarts both workers -> they resume from the last step
    checkpoint and finish;
  * why not torchrun's own file-timer server: it kills the agent, so torchrun cannot restart.

The same on two real SLURM nodes (torchrun restart, and srun without an agent): test_launch_slurm_2node.py.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fdmobilenet.checkpoint import load_checkpoint
from launch_support import LAUNCH, REPO, build_digits, children, env, global_steps, kill_and_continue, kill_group, \
    run_words, start, tail, wait_for

STEP_TIMEOUT = 10   # train.step_timeout_s of the torchrun test
MARGIN = 5          # the watchdog polls every 0.1 s; the rest is scheduling on a loaded machine and the log

STALL = """
import sys, time
from fdmobilenet import watchdog
from fdmobilenet.config import TrainConfig

watchdog.start(TrainConfig(step_timeout_s=2, first_step_timeout_s=8))
for step in watchdog.timed_steps(range(10)):
    # the first step outlasts step_timeout_s, not first_step_timeout_s; the 9 healthy steps after it take
    # 4.5 s together, more than step_timeout_s: each step has to re-arm the timer
    time.sleep(4 if step == 0 else 0.5)
    print("step", step, flush=True)
time.sleep(4)                             # outside the loop (evaluation, the epoch's checkpoint): not timed
print("evaluated", flush=True)
for step in watchdog.timed_steps(range(2)):
    print("stalled at", time.time(), flush=True)
    time.sleep(60)
"""


AGENT_TIMER_WORKER = """
import os, time
import torch.distributed.elastic.timer as timer

print("worker started, restart", os.environ["TORCHELASTIC_RESTART_COUNT"], flush=True)
timer.configure(timer.FileTimerClient(os.environ["TORCHELASTIC_TIMER_FILE"]))
with timer.expires(after=2):
    time.sleep(60)
"""


def left_running(marker: str, grace: float = 5) -> list[int]:
    """pids whose command line contains ``marker`` once ``grace`` s have passed (a watchdog process notices
    within 0.5 s that its rank has gone)."""
    deadline = time.monotonic() + grace
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_first_step_allowance_untimed_gaps_and_a_stalled_step_killed_within_the_timeout(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env(TMPDIR=str(tmp), PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=120)
    ended = time.time()
    out = p.stdout + p.stderr
    assert p.returncode == -signal.SIGKILL, f"exit {p.returncode}:\n{out}"
    assert "".join(f"step {k}\n" for k in range(10)) + "evaluated\n" in p.stdout, out
    assert re.search(r"watchdog on \S+: rank 0 made no progress for 2 s \(train.step_timeout_s\); killing it "
                     r"\(pid \d+\) with SIGKILL", p.stderr), out
    stalled = float(re.search(r"stalled at (\S+)", p.stdout).group(1))
    print(f"stalled step killed {ended - stalled:.2f} s after it began (train.step_timeout_s=2)")
    assert 2 <= ended - stalled <= 2 + MARGIN
    # the watchdog process ended with the rank and removed its FIFO
    assert not left_running(str(script)) and not list(tmp.glob("fdm-watchdog-*"))


def test_torchruns_own_file_timer_kills_the_agent_so_it_cannot_restart(tmp_path):
    """Why the watchdog serves its timers per rank: torchrun's server (TORCHELASTIC_ENABLE_FILE_TIMER=1) runs
    inside the agent and, after reaping the expired worker, SIGKILLs its own process - the agent - so
    --max-restarts never restarts. Should a torch release change that, this test fails and the agent's server
    becomes an option."""
    script = tmp_path / "worker.py"
    script.write_text(AGENT_TIMER_WORKER)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                        "--max-restarts=1", str(script)], cwd=tmp_path,
                       env=env(TORCHELASTIC_ENABLE_FILE_TIMER="1", TMPDIR=str(tmp_path)),
                       capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == -signal.SIGKILL, f"torchrun exit {p.returncode}:\n{out[-3000:]}"
    assert "worker started, restart 0" in out and "restart 1" not in out, out[-3000:]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("digits"))


@pytest.mark.slow
def test_stopped_worker_is_killed_and_torchrun_restarts_from_the_last_checkpoint(digits, tmp_path):
    steps, save_every = 40, 4
    log, tmp = tmp_path / "hung.log", tmp_path / "tmp"
    tmp.mkdir()
    words = run_words(digits, tmp_path, "hung", f"train.save_every_steps={save_every}",
                      f"train.step_timeout_s={STEP_TIMEOUT}", steps=steps)
    p = start([str(LAUNCH / "local.sh"), *words], log, MAX_RESTARTS="1", NPROC_PER_NODE="2", TMPDIR=str(tmp))
    victim = None
    try:
        wait_for(log, r"epoch 1/1 step 10/", 120, p)
        workers = children(p.pid)          # local.sh execs torchrun: its children are the two workers
        assert len(workers) == 2, f"expected 2 workers under torchrun (pid {p.pid}), found {workers}"
        victim = workers[1]
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(log, rf"watchdog on \S+: rank \d made no progress for {STEP_TIMEOUT} s \(train.step_timeout_s\); "
                      rf"killing it \(pid {victim}\)", STEP_TIMEOUT + 60, p)
        reaction = time.monotonic() - stopped
        wait_for(log, r"resumed from", 120, p)
        resumed = time.monotonic() - stopped
        rc = p.wait(timeout=150)
    finally:
        if victim:
            kill_and_continue([victim])
        if p.poll() is None:
            kill_group(p)
    print(f"stopped worker killed by its watchdog {reaction:.1f} s after kill -STOP "
          f"(train.step_timeout_s={STEP_TIMEOUT}); the restarted workers resumed {resumed:.1f} s after it")
    assert reaction <= STEP_TIMEOUT + MARGIN
    text = log.read_text(errors="replace")
    assert rc == 0, f"torchrun exit {rc} after the restart; log:\n{tail(log)}"
    before, sep, after = text.partition("resumed from")
    assert text.count("resumed from") == 1, "expected exactly one restart"
    resumed_at = int(re.match(r" \S+: epoch 1 step (\d+)", after).group(1))
    assert resumed_at % save_every == 0 and 0 <= max(global_steps(before, steps)) - resumed_at <= save_every
    assert global_steps(after, steps)[0] == resumed_at + 1 and "done: best val top-1" in after
    ck = load_checkpoint(tmp_path / "hung.pth.tar")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 0, steps)
    # every rank's watchdog process ended with its rank (killed or not) and removed its FIFO
    assert not left_running(f"train.output_dir={tmp_path}") and not list(tmp.glob("fdm-watchdog-*"))
