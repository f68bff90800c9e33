"""The SLURM launch scripts on a real one-node SLURM cluster on localhost (launch/slurm_localhost/: Debian's
slurmctld + slurmd + munge, installed by apt-get when missing, ~10-20 s), training the demo on CPU (gloo):

  * launch/slurm.sbatch: one srun task per node running torchrun (c10d rendezvous on the first node);
  * launch/slurm_srun.sbatch: one srun task per rank, no torchrun (ranks from SLURM_PROCID & co.);
  * the requeue path: SIGUSR1 to the batch shell (what `--signal=B:USR1@120` sends before the time limit)
    -> its trap forwards it to the step -> the workers checkpoint and stop -> `scontrol requeue` -> the same
    job runs again and resumes from the checkpoint.

Needs root (apt-get, the daemons). In CI (CI=true) a cluster that cannot start FAILS the tests; elsewhere
they are skipped with the reason. The same scripts on two real nodes: test_launch_slurm_2node.py.
"""
from __future__ import annotations

import pytest

from fdmobilenet.checkpoint import load_checkpoint
from launch_support import LAUNCH, build_digits, global_steps, run_words
from slurm_support import job_output, running_cluster, usr1_requeue_resume

CLUSTER = LAUNCH / "slurm_localhost"
SLOW_SAVE_S = 5   # each checkpoint write takes this much longer: far more than the batch shell needs to react
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm():
    """A running one-node cluster for this module's tests; stopped (jobs cancelled, daemons down) after."""
    yield from running_cluster(CLUSTER / "slurm-start.sh", CLUSTER / "slurm-stop.sh")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("digits"))


@pytest.mark.parametrize("script, ranks_lines", [
    ("slurm.sbatch", ("1 node(s), rendezvous localhost:", "localhost: torchrun with 2 worker(s)")),
    ("slurm_srun.sbatch", ("2 task(s) on 1 node(s), master localhost:",)),
])
def test_sbatch_script_trains_the_demo(slurm, digits, tmp_path, script, ranks_lines):
    job = slurm.sbatch(script, tmp_path, *run_words(digits, tmp_path, "slurm", steps=4))
    state = slurm.wait(job)
    out = job_output(tmp_path, job)
    assert state == f"job {job} COMPLETED ExitCode=0:0", f"{state}\n{out[-4000:]}"
    assert all(line in out for line in ranks_lines), out[-4000:]
    assert "2 rank(s) on cpu, batch 8/rank = 16 global" in out and "done: best val top-1" in out
    assert global_steps(out, 4) == [1, 2, 3, 4]
    ck = load_checkpoint(tmp_path / "slurm.pth.tar")
    assert (ck["epoch"], ck["global_step"], ck["world_size"]) == (1, 4, 2)


@pytest.mark.parametrize("script", ["slurm.sbatch", "slurm_srun.sbatch"])
def test_usr1_to_the_batch_shell_checkpoints_requeues_and_the_requeued_job_resumes(slurm, digits, tmp_path, script):
    """The requeue waits for the step: with a slow checkpoint write (SLOW_SAVE_S, the test-only fault plugin)
    "step ended" is logged after the checkpoint is written and before "requeueing", and the requeued job
    resumes at the saved step (see slurm_support.usr1_requeue_resume)."""
    usr1_requeue_resume(slurm, digits, tmp_path, script, slow_save_s=SLOW_SAVE_S)


@pytest.mark.parametrize("script", ["slurm.sbatch", "slurm_srun.sbatch"])
def test_a_mistake_ends_the_job_in_the_preflight_with_exit_2(slurm, tmp_path, script):
    """A data root that does not exist: the batch shell's pre-flight (train_ddp.py --check) says so in one
    line and the job fails with exit code 2 before any step - no torchrun, no restart, no requeue."""
    missing = tmp_path / "no-such-dir"
    job = slurm.sbatch(script, tmp_path, *run_words(missing, tmp_path, "bad", steps=4))
    state = slurm.wait(job)
    out = job_output(tmp_path, job)
    assert state == f"job {job} FAILED ExitCode=2:0 (exit 1)", f"{state}\n{out[-4000:]}"
    assert out.count(f"train_ddp.py: data folder {missing}") == 1, out[-4000:]
    assert "step ended" not in out and "(restart 1)" not in out and "Traceback" not in out
