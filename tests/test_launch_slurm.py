"""The SLURM launch scripts on a real one-node SLURM cluster on localhost (launch/slurm_localhost/: Debian's
slurmctld + slurmd + munge, installed by apt-get when missing, ~10-20 s), training the demo on CPU (gloo):

  * launch/slurm.sbatch: one srun task per node running torchrun (c10d rendezvous on the first node);
  * launch/slurm_srun.sbatch: one srun task per rank, no torchrun (ranks from SLURM_PROCID & co.);
  * the requeue path: SIGUSR1 to the batch shell (what `--signal=B:USR1@120` sends before the time limit)
    -> its trap forwards it to the step -> the workers checkpoint and stop -> `scontrol requeue` -> the same
    job runs again and resumes from the checkpoint.

Needs root (apt-get, the daemons). In CI (CI=true) a cluster that cannot start FAILS the tests; elsewhere
they are skipped with the reason.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from fdmobilenet.checkpoint import load_checkpoint
from launch_support import LAUNCH, REPO, build_digits, env, global_steps, run_words, wait_for

CLUSTER = LAUNCH / "slurm_localhost"


@pytest.fixture(scope="module")
def slurm():
    """A running one-node cluster for this module's tests; stopped (jobs cancelled, daemons down) after."""
    why = None
    if os.geteuid() != 0:
        why = "starting a SLURM cluster needs root (apt-get install, slurmctld/slurmd/munged)"
    else:
        p = subprocess.run(["bash", str(CLUSTER / "slurm-start.sh")], capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            why = f"launch/slurm_localhost/slurm-start.sh failed (exit {p.returncode}):\n{p.stdout}\n{p.stderr}"
        else:
            print(p.stdout.strip())
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must test the SLURM launch scripts, but the cluster did not start: {why}")
        pytest.skip(why)
    yield
    subprocess.run(["bash", str(CLUSTER / "slurm-stop.sh")], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("digits"))


def sbatch(script: str, out_dir, *words: str) -> int:
    """Submit from the repository root (the scripts find it through SLURM_SUBMIT_DIR); 5-minute limit."""
    p = subprocess.run(["sbatch", "--parsable", "-t", "5", "-o", f"{out_dir}/%x-%j.out", str(LAUNCH / script),
                        *words], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, f"sbatch failed: {p.stderr}"
    return int(p.stdout.strip().split(";")[0])


def wait_job(job: int, timeout: int = 150) -> str:
    p = subprocess.run(["bash", str(CLUSTER / "wait_job.sh"), str(job), str(timeout)], capture_output=True,
                       text=True, timeout=timeout + 60)
    return p.stdout.strip() + (f" (exit {p.returncode})" if p.returncode else "")


def job_output(out_dir, job: int) -> str:
    files = list(out_dir.glob(f"*-{job}.out"))
    return files[0].read_text(errors="replace") if files else "(no output file)"


@pytest.mark.parametrize("script, ranks_line", [
    ("slurm.sbatch", "1 node(s) x 2 worker(s), rendezvous localhost:"),
    ("slurm_srun.sbatch", "2 task(s) on 1 node(s), master localhost:"),
])
def test_sbatch_script_trains_the_demo(slurm, digits, tmp_path, script, ranks_line):
    job = sbatch(script, tmp_path, *run_words(digits, tmp_path, "slurm", steps=4))
    state = wait_job(job)
    out = job_output(tmp_path, job)
    assert state == f"job {job} COMPLETED ExitCode=0:0", f"{state}\n{out[-4000:]}"
    assert ranks_line in out
    assert "2 rank(s) on cpu, batch 8/rank = 16 global" in out and "done: best val top-1" in out
    assert global_steps(out, 4) == [1, 2, 3, 4]
    ck = load_checkpoint(tmp_path / "slurm.pth.tar")
    assert (ck["epoch"], ck["global_step"], ck["world_size"]) == (1, 4, 2)


def test_usr1_to_the_batch_shell_checkpoints_requeues_and_the_requeued_job_resumes(slurm, digits, tmp_path):
    steps = 80
    job = sbatch("slurm.sbatch", tmp_path, *run_words(digits, tmp_path, "requeue", steps=steps))
    out_file = tmp_path / f"fdmobilenet-{job}.out"
    wait_for(out_file, r"epoch 1/1 step 3/", 150)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, timeout=30)
    state = wait_job(job, timeout=200)
    out = out_file.read_text(errors="replace")
    assert state == f"job {job} COMPLETED ExitCode=0:0", f"{state}\n{out[-4000:]}"

    first, sep, second = out.partition(f"job {job} (restart 1)")
    assert sep, f"the job did not run a second time:\n{out[-4000:]}"
    assert "batch shell: SIGUSR1 -> step" in first and f"requeueing job {job}" in first
    m = re.search(r"preempted \(SIGUSR1\) at epoch 1 step (\d+), checkpoint saved", first)
    assert m, first[-4000:]
    step = int(m.group(1))
    assert f"epoch 1 step {step}, global step {step}" in second                 # resumed there
    assert global_steps(second, steps) == list(range(step + 1, steps + 1))
    ck = load_checkpoint(tmp_path / "requeue.pth.tar")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 0, steps)


@pytest.mark.parametrize("script", ["slurm.sbatch", "slurm_srun.sbatch"])
def test_a_mistake_ends_the_job_in_the_preflight_with_exit_2(slurm, tmp_path, script):
    """A data root that does not exist: the batch shell's pre-flight (train_ddp.py --check) says so in one
    line and the job fails with exit code 2 before any step - no torchrun, no restart, no requeue."""
    missing = tmp_path / "no-such-dir"
    job = sbatch(script, tmp_path, *run_words(missing, tmp_path, "bad", steps=4))
    state = wait_job(job)
    out = job_output(tmp_path, job)
    assert state == f"job {job} FAILED ExitCode=2:0 (exit 1)", f"{state}\n{out[-4000:]}"
    assert out.count(f"train_ddp.py: data folder {missing}") == 1, out[-4000:]
    assert "step ended" not in out and "(restart 1)" not in out and "Traceback" not in out
