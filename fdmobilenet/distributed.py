"""Process-group setup for torchrun, SLURM (srun) and a plain single process; rank-aware helpers.

One process per accelerator. The rank layout comes from, in order:
  * torchrun's RANK / LOCAL_RANK / WORLD_SIZE (+ MASTER_ADDR / MASTER_PORT, set by torchrun itself);
  * SLURM's SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS when the job runs one task per GPU under ``srun``
    without torchrun (``srun -n 8 --kill-on-bad-exit=1 python train_ddp.py ...``). The master is the first host of ``scontrol show hostnames $SLURM_JOB_NODELIST`` unless
    MASTER_ADDR is set, and the port is 29500 + (job id mod 10000) unless MASTER_PORT is set, so two jobs
    sharing a node do not collide;
  * neither: a single process, no process group at all (collectives below become no-ops).

Backend: NCCL when the process drives a CUDA device, gloo on CPU. A second, gloo, group carries the small
host-side control messages (the preemption flag): polling it needs no CUDA synchronisation.
"""
from __future__ import annotations

import datetime
import os
import random
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from fdmobilenet import cli
from fdmobilenet.slurm_port import slurm_job_port
# Long on purpose: before the first all-reduce every rank compiles the model on its own (minutes with
# compile_mode=max-autotune), and a rank that finished early must not time out waiting. A dead peer does not
# rely on this timeout: the launcher ends the job (torchrun stops the other workers when one exits non-zero;
# srun --kill-on-bad-exit=1), and gloo peers see the closed connection at once.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# How long a rank other than 0 waits before it exits on a start-up mistake that rank 0 reports (run_rank).
REPORT_GRACE_S = 10


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    control_group: Optional[Any] = None   # gloo group for host-side flags; None on a single process
    # False while every rank does the same setup from the same inputs (config, data listing, checkpoint): a
    # mistake found there is every rank's, and rank 0 alone reports it. Set once the ranks start working on
    # their own shards: then an error can be one rank's own (an undecodable JPEG), and that rank reports it.
    report_own_errors: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: set MASTER_ADDR to the first "
                           "node's address, or launch with torchrun")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"could not expand SLURM_JOB_NODELIST={nodelist!r} with 'scontrol show hostnames' "
                           f"({e}); set MASTER_ADDR yourself") from e
    return out[0]


def _env_from_slurm() -> None:
    """Translate srun's task variables into the ones torch.distributed's env:// reads."""
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
    os.environ.setdefault("MASTER_PORT", str(slurm_job_port()))


def resolve_device(preference: str, local_rank: int) -> torch.device:
    """``auto`` takes this rank's GPU when CUDA is there, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device; use train.device=auto or cpu")
    visible = torch.cuda.device_count()
    # One visible GPU: the launcher bound this process to it (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES).
    index = 0 if visible == 1 else local_rank
    if index >= visible:
        raise RuntimeError(f"local rank {local_rank} has no GPU: only {visible} visible; start at most that "
                           f"many processes per node (--nproc_per_node), or bind one GPU per process")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def restart_store(world_size: int) -> Optional[dist.Store]:
    """The store the process group starts from when torchrun's workers share its agent's store; None
    elsewhere (init_process_group then reads MASTER_ADDR / MASTER_PORT itself).

    torchrun hands its workers the address of a store its agent keeps for the whole job
    (TORCHELASTIC_USE_AGENT_STORE=True: the static rendezvous always, c10d - also --standalone and a plain
    ``torchrun --nproc_per_node=N`` - unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and torch opens it
    without a prefix per restart (torch/distributed/rendezvous.py ``_create_c10d_store``). So
    after a restart the new workers find the killed ones' keys, gloo's and NCCL's addresses among them, and
    a worker that reads a peer's key before the peer has rewritten it connects to a dead port ("Gloo
    connectFullMesh failed ... Connection refused"; pytorch/pytorch#135712; docs/restarts.md). On one node
    the workers of a restart share one TORCHELASTIC_RESTART_COUNT, so its keys go under a prefix of its own.
    Across nodes every agent counts its own restarts (they can disagree), so there the launchers opt out of
    the sharing instead, and a job that did not is warned (:func:`restart_warning`)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("GROUP_WORLD_SIZE", 1)) != 1:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=COLLECTIVE_TIMEOUT)
    return dist.PrefixStore(f"fdmobilenet/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def restart_warning() -> Optional[str]:
    """One line for a multi-node torchrun job that may restart but whose workers share the agents' store
    (see :func:`restart_store`): its restarts can fail, and what to run instead."""
    restarts, nodes = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"), os.environ.get("GROUP_WORLD_SIZE", "1")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or nodes == "1" or restarts == "0":
        return None
    return (f"warning: torchrun --max-restarts={restarts} over {nodes} nodes whose workers share torchrun's "
            f"store: a restart can fail ('Gloo connectFullMesh failed ... Connection refused', "
            f"pytorch/pytorch#135712). Use --rdzv-backend=c10d with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 set "
            f"for torchrun on every node (launch/multinode.sh and launch/slurm.sbatch do both)")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by the environment (see module docstring)."""
    # SLURM_STEP_ID: only inside an srun step are the task variables this process's own; the batch shell
    # also carries SLURM_PROCID=0 / SLURM_NTASKS=N, and a plain python there is one process, not rank 0 of N.
    if ("RANK" not in os.environ and "SLURM_STEP_ID" in os.environ
            and int(os.environ.get("SLURM_NTASKS", 1)) > 1):
        _env_from_slurm()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    if world_size == 1:
        return DistInfo(rank, local_rank, 1, dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    warning = restart_warning()
    if warning and rank == 0:
        print(warning, file=sys.stderr, flush=True)
    store = restart_store(world_size)
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT,
                            device_id=dev if dev.type == "cuda" else None,
                            **({"store": store, "rank": rank, "world_size": world_size} if store else {}))
    control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return DistInfo(rank, local_rank, world_size, dev, control)


def shutdown() -> None:
    """Leave the process group cleanly (the normal end of a run; an error path exits without it). The barrier
    first: a rank that tears gloo down while a peer is still using its connections (rank 0 writing a last
    checkpoint, say) can abort that peer ('terminate called without an active exception', seen in tests)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_rank(work: Callable[[], Optional[int]], info: DistInfo, prog: str, what: str) -> None:
    """Run this rank's ``work``, leave the process group, and exit with the code ``work`` returns (None: 0).
    A user's mistake (fdmobilenet.cli) prints one line ``prog: message`` and exits 2; a KeyboardInterrupt
    (Ctrl-C that nothing else handles: before training, during an evaluation-only run, or a second one,
    engine.PreemptionFlag) one line and 130; any other error its traceback and 1. In these three cases the
    exit is immediate: the normal exit path (atexit, destroy_process_group, loader threads) can block waiting
    for peers that are still inside a collective. torchrun sees the non-zero code and stops the other ranks;
    under srun, --kill-on-bad-exit does - so one failing rank ends the job instead of hanging it."""
    try:
        code = work()
        shutdown()      # inside: a second Ctrl-C may come while a peer still writes the checkpoint
    except cli.USER_ERRORS as e:
        if info.is_main or info.report_own_errors:
            cli.report(prog if info.is_main else f"[rank {info.rank}] {prog}", e)
        else:
            # Every rank finds a start-up mistake and rank 0 reports it: a rank that exited first would have
            # torchrun stop rank 0 before its line is out. Rank 0's own exit ends the wait.
            time.sleep(REPORT_GRACE_S)
        sys.stdout.flush()
        os._exit(cli.EXIT_USAGE)
    except KeyboardInterrupt as e:
        if info.is_main:
            cli.report(prog, f"stopped by SIGINT{f': {e}' if e.args else ''}")
        sys.stdout.flush()
        os._exit(cli.EXIT_INTERRUPTED)
    except BaseException:
        sys.stderr.write(f"[rank {info.rank}] {what} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
    if code:
        sys.exit(code)


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank seeds: same model init is guaranteed by DDP's broadcast, not by the seed, and different
    ranks must not draw the same random numbers (dropout, any host-side augmentation)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict:
    """This process's random generators (numpy's as plain lists: weights_only loading accepts no arrays)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    return {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np_state["state"]["key"] = np.array(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). Parameters are equal on every rank
    by DDP's construction; buffers are not: each rank's forward updates its own from its own batch."""
    if info.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _host_all_reduce(value: int, op: dist.ReduceOp, info: DistInfo) -> int:
    """``value`` reduced with ``op`` over the ranks, on every rank. Host-only (gloo control group)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=op, group=info.control_group)
    return int(t.item())


def max_over_ranks(value: int, info: DistInfo) -> int:
    """The largest ``value`` of all ranks, on every rank."""
    return _host_all_reduce(value, dist.ReduceOp.MAX, info)


def min_over_ranks(value: int, info: DistInfo) -> int:
    """The smallest ``value`` of all ranks, on every rank."""
    return _host_all_reduce(value, dist.ReduceOp.MIN, info)


def gather_to_main(obj: Any, info: DistInfo) -> Optional[list]:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere), over the host-side control group."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0, group=info.control_group)
    return out

