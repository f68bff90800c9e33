"""Preemption: SIGTERM / SIGUSR1 mid-epoch -> every rank stops at the next agreed step boundary, rank 0 writes
a checkpoint that records the step, the processes exit cleanly; the next run of the same command resumes at
that step. Real torchrun (launch/local.sh), real gloo, real DALI on real JPEGs. Ctrl-C (SIGINT to the process
group, as a terminal sends it) does the same, in one process and under launch/local.sh, and exits 130; a
second Ctrl-C stops at once and leaves the last checkpoint as it was.

Exit codes (docs/launching.md): the workers exit 0 after a preemption checkpoint. torchrun itself, when it
was signalled too (SLURM signals every process of the step; the test signals the whole process group), raises
its SignalException once the workers are done; the launchers' launch/torchrun.py turns that into one line and
exit 128 + the signal's number, no traceback. The SLURM requeue path is tested in test_launch_slurm.py.
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import sys
import time

import pytest
import torch

from fdmobilenet.checkpoint import load_checkpoint
from launch_support import LAUNCH, REPO, assert_same_state, build_digits, children, global_steps, kill_group, run, \
    run_words, sha256, start, tail, wait_for, worker_ranks

STEPS = 80   # a long enough epoch that the signal lands mid-epoch (the ranks poll the flag every 10 steps)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("digits"))


LOCAL = [str(LAUNCH / "local.sh")]                   # 2 ranks under torchrun
# the same arithmetic in every run (deterministic kernels, one DALI thread), with an EMA: exact resumes
EXACT = ["train.deterministic=true", "data.num_threads=1", "optim.ema_decay=0.9"]
ONE_PROCESS = [sys.executable, str(REPO / "train_ddp.py")]


def signal_mid_epoch(digits, tmp_path, label: str, send, *extra: str, launcher=LOCAL) -> tuple[int, float, str]:
    """Start a run (``launcher``: 2 ranks through launch/local.sh, or one process), wait until it trains, call
    ``send(proc)``; returns (exit code, seconds from the signal to the end of the job, log)."""
    log = tmp_path / f"{label}.log"
    p = start([*launcher, *run_words(digits, tmp_path, label, *extra, steps=STEPS)], log, NPROC_PER_NODE="2")
    try:
        wait_for(log, r"epoch 1/1 step 3/", 120, p)
        sent = time.monotonic()
        send(p)
        rc = p.wait(timeout=60)            # the checkpoint must be written well within SLURM's 120 s notice
        return rc, time.monotonic() - sent, log.read_text(errors="replace")
    finally:
        if p.poll() is None:
            kill_group(p)


def assert_preempted_checkpoint(text: str, tmp_path, label: str, signame: str, stop: str = "preempted") -> int:
    m = re.search(rf"{stop} \({signame}\) at epoch 1 step (\d+), checkpoint saved to ([^\s;]+)", text)
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
    assert rc == 128 + signal.SIGTERM and "torchrun: stopped by SIGTERM" in text   # torchrun's own exit, see above
    assert "Traceback" not in text
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

    def to_rank_1(p):
        ranks = worker_ranks(p.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGUSR1)
    rc, seconds, text = signal_mid_epoch(digits, tmp_path, "one", to_rank_1, *EXACT)
    assert rc == 0 and seconds < 60, tail(tmp_path / "one.log")
    step = assert_preempted_checkpoint(text, tmp_path, "one", "signal on another rank")
    ck = load_checkpoint(tmp_path / "one.pth.tar")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert [state["steps_done"] for state in ck["loader"]] == [step, step]    # both ranks stopped there

    words = run_words(digits, tmp_path, "one", *EXACT, steps=STEPS)
    rc, text = run([str(LAUNCH / "local.sh"), *words], tmp_path / "one-resume.log", timeout=180, NPROC_PER_NODE="2")
    assert rc == 0 and f"epoch 1 step {step}, global step {step}" in text, text[-3000:]
    assert global_steps(text, STEPS) == list(range(step + 1, STEPS + 1))
    rc, text = run([str(LAUNCH / "local.sh"), *run_words(digits, tmp_path, "straight", *EXACT, steps=STEPS)],
                   tmp_path / "straight.log", timeout=180, NPROC_PER_NODE="2")
    assert rc == 0, text[-3000:]
    assert_same_state(tmp_path / "straight.pth.tar", tmp_path / "one.pth.tar")


def test_ctrl_c_in_one_process_saves_at_a_step_a_second_one_stops_at_once_and_the_resume_is_exact(digits, tmp_path):
    """One plain process, Ctrl-C as a terminal sends it (SIGINT to the process group: the trainer, its
    watchdog process): it saves at the next agreed step, says so in one line and exits 130. Run again, it
    resumes; a Ctrl-C and a second one while that checkpoint is being written (a slow filesystem) stop it at
    once, the file left as it was. Run again, it ends in the uninterrupted run's state exactly."""
    ckpt = tmp_path / "ctrl-c.pth.tar"
    rc, seconds, text = signal_mid_epoch(digits, tmp_path, "ctrl-c", lambda p: os.killpg(p.pid, signal.SIGINT),
                                         *EXACT, launcher=ONE_PROCESS)
    assert rc == 130 and seconds < 60, text[-3000:]
    step = assert_preempted_checkpoint(text, tmp_path, "ctrl-c", "SIGINT", stop="interrupted")
    assert text.rstrip().endswith(f"interrupted (SIGINT) at epoch 1 step {step}, checkpoint saved to {ckpt}; the "
                                  f"same command continues from there"), text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text

    saved, log = sha256(ckpt), tmp_path / "twice.log"
    p = start([*ONE_PROCESS, *run_words(digits, tmp_path, "ctrl-c", *EXACT, steps=STEPS)], log,
              faults={"slow_save_s": 60})
    try:
        wait_for(log, rf"epoch 1/1 step {step + 2}/", 120, p)
        os.killpg(p.pid, signal.SIGINT)
        wait_for(log, r"fault plugin: slow checkpoint write", 60, p)
        os.killpg(p.pid, signal.SIGINT)
        rc = p.wait(timeout=10)             # not the 60 s of the write
    finally:
        if p.poll() is None:
            kill_group(p)
    text = log.read_text(errors="replace")
    assert rc == 130 and text.rstrip().endswith(
        "train_ddp.py: stopped by SIGINT: a second one, so at once, without a checkpoint (the last one written is "
        "unchanged)"), text[-3000:]
    assert "Traceback" not in text and sha256(ckpt) == saved and sorted(tmp_path.glob(".ctrl-c*")) == []

    rc, text = run([*ONE_PROCESS, *run_words(digits, tmp_path, "ctrl-c", *EXACT, steps=STEPS)],
                   tmp_path / "resume.log", timeout=180)
    assert rc == 0 and f"resumed from {ckpt}: epoch 1 step {step}, global step {step}" in text, text[-3000:]
    assert global_steps(text, STEPS) == list(range(step + 1, STEPS + 1))
    rc, text = run([*ONE_PROCESS, *run_words(digits, tmp_path, "straight", *EXACT, steps=STEPS)],
                   tmp_path / "straight.log", timeout=180)
    assert rc == 0, text[-3000:]
    assert_same_state(tmp_path / "straight.pth.tar", ckpt)


def test_ctrl_c_under_local_sh_checkpoints_once_without_a_worker_traceback(digits, tmp_path):
    """Ctrl-C to launch/local.sh as a terminal sends it: SIGINT to the foreground process group, which holds
    torchrun (local.sh execs it) but not the workers (torchrun starts each in a process group of its own); torchrun
    forwards it to each worker once. The workers save at one agreed step and exit 130; torchrun, signalled
    itself, then stops with one line (launch/torchrun.py) and the launcher exits 130: no traceback at all."""
    rc, seconds, text = signal_mid_epoch(digits, tmp_path, "int", lambda p: os.killpg(p.pid, signal.SIGINT))
    assert seconds < 60, text[-3000:]
    assert_preempted_checkpoint(text, tmp_path, "int", "SIGINT", stop="interrupted")
    assert text.count("interrupted (SIGINT)") == 1 and "training failed" not in text and "KeyboardInterrupt" not in text
    assert rc == 130 and "Traceback" not in text, text[-3000:]
    assert text.rstrip().endswith("torchrun: stopped by SIGINT; its workers' lines above say what they saved")


def test_sigterm_right_after_a_change_of_resolution_resumes_to_the_uninterrupted_weights(digits, tmp_path):
    """data.train_res: epoch 1 at 32 px, epoch 2 at 64 px (the DALI pipeline rebuilt at the change). SIGTERM to
    a plain process early in epoch 2: it stops at the next agreed step and saves; the same command resumes
    there, at 64 px, and ends with the weights, EMA and optimizer of a run never stopped. The header and the
    per-epoch CSV name each epoch's size."""
    steps = 40
    exact = ["optim.epochs=2", "data.crop_size=64", "data.train_res={start_res: 32, ramp_start: 1, ramp_end: 2}",
             "train.deterministic=true", "data.num_threads=1", "optim.ema_decay=0.9"]

    def words(label):
        return [sys.executable, "train_ddp.py", *run_words(digits, tmp_path, label, *exact, steps=steps)]
    log = tmp_path / "ramp.log"
    p = start(words("ramp"), log)
    try:
        wait_for(log, r"epoch 2/2 step 2/", 180, p)
        os.kill(p.pid, signal.SIGTERM)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            kill_group(p)
    text = log.read_text(errors="replace")
    assert rc == 0 and "train 32 px (epoch 1), 64 px (epoch 2), val 32 px (resize 36)" in text, text[-3000:]
    m = re.search(r"preempted \(SIGTERM\) at epoch 2 step (\d+), checkpoint saved", text)
    assert m and 2 < int(m.group(1)) < steps, text[-3000:]
    step = int(m.group(1))
    ck = load_checkpoint(tmp_path / "ramp.pth.tar")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, step, steps + step)

    rc, text = run(words("ramp"), tmp_path / "ramp-resume.log", timeout=180)
    assert rc == 0 and f"resumed from {tmp_path / 'ramp.pth.tar'}: epoch 2 step {step}" in text, text[-3000:]
    assert global_steps(text, steps) == list(range(steps + step + 1, 2 * steps + 1))
    rc, text = run(words("straight"), tmp_path / "straight.log", timeout=180)
    assert rc == 0, text[-3000:]
    assert_same_state(tmp_path / "straight.pth.tar", tmp_path / "ramp.pth.tar")
    for label in ("ramp", "straight"):
        rows = list(csv.DictReader(open(tmp_path / f"{label}.csv")))
        assert [row["train_res"] for row in rows] == ["32", "64"]


# ------------------------------------------------------------------------------------ during an evaluation
VAL_STEPS = 1000   # val batches per rank (train.val_steps): an evaluation of several seconds


def eval_words(tmp_path, label: str) -> list[str]:
    """2 epochs of 4 steps on synthetic batches, each followed by an evaluation of VAL_STEPS batches of 8
    per rank (larger images than in training, so that it takes a while)."""
    return ["--config", "demo", f"--label={label}", "data.loader=synthetic", "data.crop_size=32",
            "data.val_crop=96", "optim.batch_size=16", "optim.epochs=2", "train.steps_per_epoch=4",
            f"train.val_steps={VAL_STEPS}", "train.print_freq=10", f"train.output_dir={tmp_path}",
            "train.plot=false"]


def test_a_signal_during_evaluation_stops_it_saves_the_epoch_and_the_resume_evaluates_it(tmp_path):
    """SIGUSR1 to both workers while epoch 1 is being evaluated: the ranks agree at an evaluation batch, the
    trained epoch is saved (step 4 of 4, its evaluation pending) and the job exits 0. Run again, the job
    evaluates epoch 1 first and goes on; its log rows and final weights are those of a run never stopped."""
    log = tmp_path / "eval.log"
    p = start([str(LAUNCH / "local.sh"), *eval_words(tmp_path, "stopped")], log, NPROC_PER_NODE="2")
    try:
        wait_for(log, rf"eval batch 20/{VAL_STEPS} ", 180, p)
        for pid in children(p.pid):
            os.kill(pid, signal.SIGUSR1)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            kill_group(p)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    ckpt_path = tmp_path / "stopped.pth.tar"
    assert (f"preempted (SIGUSR1) at epoch 1 step 4, checkpoint saved to {ckpt_path} (the epoch's evaluation "
            f"runs first on resume)") in text, text[-3000:]
    evaluated = [int(n) for n in re.findall(rf"eval batch (\d+)/{VAL_STEPS} ", text)]
    assert 20 <= max(evaluated) < VAL_STEPS                  # abandoned within a few polls, not finished
    assert evaluated == list(range(10, max(evaluated) + 1, 10))   # progress every print_freq batches, rank 0 only
    assert "epoch 1 done" not in text and "epoch 2/2 step" not in text
    ck = load_checkpoint(ckpt_path)
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (0, 4, 4)
    assert not (tmp_path / "stopped.jsonl").exists()         # no row for the unevaluated epoch

    rc, text = run([str(LAUNCH / "local.sh"), *eval_words(tmp_path, "stopped")], tmp_path / "resume.log",
                   timeout=240, NPROC_PER_NODE="2")
    assert rc == 0, text[-3000:]
    assert (f"resumed from {ckpt_path}: epoch 1 step 4, global step 4, best top-1 0.00% (its steps are done: "
            f"evaluation first)") in text
    assert "epoch 1/2 step" not in text and "epoch 2/2 step 4/4" in text and "done: best val top-1" in text
    assert f"{VAL_STEPS * 8} val images on rank 0" in text          # train.val_steps caps the synthetic val set

    rc, text = run([str(LAUNCH / "local.sh"), *eval_words(tmp_path, "straight")], tmp_path / "straight.log",
                   timeout=240, NPROC_PER_NODE="2")
    assert rc == 0, text[-3000:]
    rows = {label: [json.loads(line) for line in (tmp_path / f"{label}.jsonl").read_text().splitlines()]
            for label in ("stopped", "straight")}
    timing = ("img_s", "epoch_time_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows["stopped"]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in rows["straight"]]
    assert [r["val_images"] for r in rows["straight"]] == [2 * VAL_STEPS * 8] * 2
    a, b = load_checkpoint(ckpt_path), load_checkpoint(tmp_path / "straight.pth.tar")
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


EVAL_WORKER = """
import os, signal, sys
import pipelines
from fdmobilenet.config import DataConfig
from fdmobilenet.distributed import init_distributed, shutdown
from fdmobilenet.engine import Preempted, PreemptionFlag, evaluate
from fdmobilenet.model import FDMobileNet

info = init_distributed("cpu")
data = DataConfig(root=sys.argv[1], num_classes=3, loader="torchvision", num_threads=0, val_resize=40, val_crop=32)
loader = pipelines.build_loader(data, "val", 1, rank=info.rank, world_size=info.world_size, device=info.device)
model = FDMobileNet(0.25, num_classes=3)
preempt = PreemptionFlag(poll_every=2)
m = evaluate(model, loader, info, preempt=preempt)
print(f"rank {info.rank}: {len(loader)} batches, {m['val_images']} images", flush=True)
if info.rank == 1:
    os.kill(os.getpid(), signal.SIGUSR1)          # the signal reaches one rank only
try:
    evaluate(model, loader, info, preempt=preempt)
    print(f"rank {info.rank}: not stopped", flush=True)
except Preempted as p:
    print(f"rank {info.rank}: stopped ({p.signal_name})", flush=True)
shutdown()
"""


def test_evaluation_polls_only_at_batches_every_rank_reaches(photo_root, tmp_path):
    """7 val images over 2 ranks at batch 1: 3 batches on rank 0, 4 on rank 1. With a poll every 2 batches,
    a poll at batch 4 would wait for rank 0 forever (it is already summing up); the polls stop at the
    smallest count. A signal on rank 1 alone stops both at batch 2."""
    import subprocess
    import sys
    worker = tmp_path / "eval_worker.py"
    worker.write_text(EVAL_WORKER)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(worker), str(photo_root)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    for line in ("rank 0: 3 batches, 7 images", "rank 1: 4 batches, 7 images",
                 "rank 0: stopped (signal on another rank)", "rank 1: stopped (SIGUSR1)"):
        assert line in p.stdout, p.stdout + p.stderr
