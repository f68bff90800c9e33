"""Real SLURM clusters for the launch tests (test_launch_slurm: one node on localhost; test_launch_slurm_2node:
two nodes in network namespaces): start one for a test module, submit the launch scripts to it, wait for
the jobs, read their output; and the requeue check that both clusters run.

Needs root (apt-get, the daemons). In CI (CI=true) a cluster that cannot start FAILS the tests; elsewhere
they are skipped with the reason.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

from fdmobilenet.checkpoint import load_checkpoint
from launch_support import LAUNCH, REPO, env, global_steps, run_words, wait_for

WAIT_JOB = LAUNCH / "slurm_localhost" / "wait_job.sh"


@dataclass
class Cluster:
    conf: Optional[str] = None   # SLURM_CONF for every client command; None: the default /etc/slurm/slurm.conf

    def env(self, faults: dict | None = None, **extra: str) -> dict:
        return env(faults, **extra, **({"SLURM_CONF": self.conf} if self.conf else {}))

    def sbatch(self, script: str, out_dir: Path, *words: str, options: tuple[str, ...] = (),
               faults: dict | None = None, **env_extra: str) -> int:
        """Submit from the repository root (the scripts find it through SLURM_SUBMIT_DIR); 5-minute limit.
        ``env_extra`` and ``faults`` (the test-only fault plugin, see launch_support.env) reach the job
        (sbatch exports the environment)."""
        p = subprocess.run(["sbatch", "--parsable", "-t", "5", "-o", f"{out_dir}/%x-%j.out", *options,
                            str(LAUNCH / script), *words], cwd=REPO, env=self.env(faults, **env_extra),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"sbatch failed: {p.stderr}"
        return int(p.stdout.strip().split(";")[0])

    def wait(self, job: int, timeout: int = 150) -> str:
        """'job J STATE ExitCode=X:Y' once the job has ended (launch/slurm_localhost/wait_job.sh)."""
        p = subprocess.run(["bash", str(WAIT_JOB), str(job), str(timeout)], env=self.env(), capture_output=True,
                           text=True, timeout=timeout + 60)
        return p.stdout.strip() + (f" (exit {p.returncode})" if p.returncode else "")

    def scancel(self, *args: str) -> None:
        subprocess.run(["scancel", *args], env=self.env(), check=True, timeout=30)


def running_cluster(start: Path, stop: Path, conf: Optional[str] = None) -> Iterator[Cluster]:
    """For a module-scoped fixture: start the cluster with ``start``, yield it, stop it with ``stop``."""
    why = None
    if os.geteuid() != 0:
        why = "starting a SLURM cluster needs root (apt-get install, slurmctld/slurmd/munged)"
    else:
        p = subprocess.run(["bash", str(start)], capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            why = f"{start.relative_to(REPO)} failed (exit {p.returncode}):\n{p.stdout}\n{p.stderr}"
        else:
            print(p.stdout.strip())
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must test the SLURM launch scripts, but the cluster did not start: {why}")
        pytest.skip(why)
    try:
        yield Cluster(conf)
    finally:
        subprocess.run(["bash", str(stop)], capture_output=True, timeout=120)


def job_output(out_dir: Path, job: int) -> str:
    files = list(out_dir.glob(f"*-{job}.out"))
    return files[0].read_text(errors="replace") if files else "(no output file)"


def output_file(out_dir: Path, job: int) -> Path:
    """The job's output file (sbatch -o %x-%j.out); it appears once the job starts."""
    deadline = time.monotonic() + 150
    while not (files := list(out_dir.glob(f"*-{job}.out"))):
        assert time.monotonic() < deadline, f"job {job} wrote no output file in {out_dir} within 150 s"
        time.sleep(0.2)
    return files[0]


def usr1_requeue_resume(cluster: Cluster, digits: Path, out_dir: Path, script: str = "slurm.sbatch",
                        options: tuple[str, ...] = (), steps: int = 80,
                        slow_save_s: float = 0) -> tuple[str, str]:
    """``script`` trains; SIGUSR1 to its batch shell (what `--signal=B:USR1@120` sends before the time limit)
    -> the trap forwards it to the step -> every rank stops at the agreed step and rank 0 checkpoints -> the
    step ends -> `scontrol requeue` -> the same job runs again and resumes there, to the end of the epoch.

    ``slow_save_s`` makes every checkpoint write that much slower (the test-only fault plugin): the batch
    shell must then say "step ended" only after the write, and requeue after that; a shell that requeued
    while the step still ran would log "step ended" first (and the requeue's kill could cut the write short).
    Returns the output of the first and the second run."""
    job = cluster.sbatch(script, out_dir, *run_words(digits, out_dir, "requeue", steps=steps), options=options,
                         faults={"slow_save_s": slow_save_s} if slow_save_s else None)
    out_file = output_file(out_dir, job)
    wait_for(out_file, r"epoch 1/1 step 3/", 150)
    cluster.scancel("--signal=USR1", "--batch", str(job))
    state = cluster.wait(job, timeout=200 + 4 * slow_save_s)
    out = out_file.read_text(errors="replace")
    assert state == f"job {job} COMPLETED ExitCode=0:0", f"{state}\n{out[-4000:]}"

    first, sep, second = out.partition(f"job {job} (restart 1)")
    assert sep, f"the job did not run a second time:\n{out[-4000:]}"
    assert "batch shell: SIGUSR1 -> step" in first and f"requeueing job {job}" in first
    m = re.search(r"preempted \(SIGUSR1\) at epoch 1 step (\d+), checkpoint saved", first)
    assert m, first[-4000:]
    step = int(m.group(1))
    ckpt = out_dir / "requeue.pth.tar"
    ended, requeued = first.find("step ended with exit code"), first.find(f"requeueing job {job}")
    assert m.start() < ended < requeued, first[-4000:]
    if slow_save_s:
        slow = first.find(f"fault plugin: slow checkpoint write, {slow_save_s:g} s before writing {ckpt}")
        written = first.find(f"fault plugin: checkpoint {ckpt} written")
        assert 0 <= slow < written < ended, first[-4000:]
    assert f"epoch 1 step {step}, global step {step}" in second                 # resumed there
    assert global_steps(second, steps) == list(range(step + 1, steps + 1))
    ck = load_checkpoint(ckpt)
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 0, steps)
    return first, second
