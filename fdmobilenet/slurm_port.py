"""The port of a SLURM job's rendezvous / process-group store: 29500 + (job id mod 10000), so that two jobs
sharing a node do not collide.

The one copy of the rule, for fdmobilenet.distributed and the sbatch scripts: launch/common.sh runs
``python -m fdmobilenet.slurm_port``, which imports no torch - a job's start does not pay for it.
"""
import os

DEFAULT_PORT = 29500


def slurm_job_port() -> int:
    return DEFAULT_PORT + int(os.environ.get("SLURM_JOB_ID", "0")) % 10000


if __name__ == "__main__":
    print(slurm_job_port())
