"""The SLURM launch scripts on a real two-node SLURM cluster on this machine (launch/slurm_2node/: two slurmd,
each in its own network + UTS + mount namespace with its own hostname - node1, node2 -, IP and hosts file,
joined by a private bridge; one slurmctld, one munged), training the demo across both nodes on gloo:

  * slurm.sbatch -N2 (one torchrun per node, c10d on node1) and slurm_srun.sbatch -N2 --ntasks-per-node=2
    (one task per rank) give a world of 4 whose final weights are those of 4 processes on one node;
  * SIGUSR1 to the batch shell -> every rank stops at the agreed step, checkpoint -> requeue -> resume;
  * node2 lost mid-epoch (kill -9 of every training process there): the job ends non-zero within a minute,
    the last checkpoint is intact;
  * a hung worker on node2 (kill -STOP): its watchdog kills it within train.step_timeout_s; torchrun restarts
    both nodes from the last checkpoint (slurm.sbatch), or the step ends (slurm_srun.sbatch: no agent);
  * names and interfaces: a node that cannot resolve the rendezvous host, whose own name resolves to
    loopback, or that lacks the GLOO_SOCKET_IFNAME interface ends the job at once with one line naming it.

Needs root (apt-get, namespaces, the daemons). In CI (CI=true) a cluster that cannot start FAILS the tests;
elsewhere they are skipped with the reason. Machine-wide singleton: run under `flock /tmp/slurm2.lock`.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fdmobilenet.checkpoint import load_checkpoint
from launch_support import (LAUNCH, assert_same_training, build_digits, global_steps, kill_and_continue, run,
                            run_words, sha256, wait_for)
from slurm_support import job_output, running_cluster, usr1_requeue_resume

pytestmark = pytest.mark.slurm

CLUSTER = LAUNCH / "slurm_2node"
STATE = Path("/tmp/slurm2n")
STEP_TIMEOUT = 10   # train.step_timeout_s of the hung-worker tests
MARGIN = 5          # the watchdog polls every 0.1 s; the rest is the log line travelling through srun


@pytest.fixture(scope="module")
def slurm():
    """A running two-node cluster for this module's tests; stopped (jobs cancelled, daemons, namespaces and
    bridge gone) after."""
    yield from running_cluster(CLUSTER / "start.sh", CLUSTER / "stop.sh", conf=str(STATE / "etc/slurm.conf"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("digits"))


# ------------------------------------------------------------------------------------------ node plumbing
def node_processes(node: str) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process in ``node``'s network namespace."""
    pids = subprocess.run(["ip", "netns", "pids", f"s2n-{node}"], capture_output=True, text=True,
                          check=True).stdout.split()
    procs = {}
    for pid in map(int, pids):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            procs[pid] = (ppid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError):
            pass
    return procs


def training_processes(node: str) -> dict[str, list[int]]:
    """The node's torchrun agents, its workers (torchrun's children) and its ranks' watchdog processes."""
    procs = node_processes(node)
    agents = [p for p, (_, cmd) in procs.items() if "torch.distributed.run" in cmd or "launch/torchrun.py" in cmd]
    ranks = [p for p, (_, cmd) in procs.items() if "train_ddp.py" in cmd and p not in agents]
    watchdogs = [p for p in ranks if procs[p][0] in ranks]       # forked by a rank
    workers = [p for p in ranks if p not in watchdogs]
    return {"agents": agents, "workers": workers, "watchdogs": watchdogs}


def wait_for_workers(node: str, count: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = training_processes(node)["workers"]
        if len(workers) >= count:
            return sorted(workers)
        time.sleep(0.2)
    raise AssertionError(f"{count} worker(s) did not appear on {node}: {node_processes(node)}")


def bridge_bytes(node: str) -> int:
    """Bytes that crossed ``node``'s veth (the node's only way to the others), both directions."""
    stats = Path(f"/sys/class/net/s2n-v{node[-1]}/statistics")
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


class HostsFile:
    """node's /etc/hosts (a bind mount of STATE/<node>/hosts), rewritten in place for one test: the mount
    follows the inode, so the file is truncated and written, never replaced."""

    def __init__(self, node: str):
        self.path = STATE / node / "hosts"
        self.original = self.path.read_text()

    def drop(self, name: str) -> None:
        self.path.write_text("".join(line for line in self.original.splitlines(keepends=True)
                                     if name not in line.split()[1:]))

    def map(self, name: str, address: str) -> None:
        self.drop(name)
        with open(self.path, "a") as f:
            f.write(f"{address} {name}\n")

    def restore(self) -> None:
        self.path.write_text(self.original)


# ------------------------------------------------------------------------------------------------ training
STEPS = 6


@pytest.fixture(scope="module")
def one_node_of_four(digits, tmp_path_factory):
    """The reference: the same run as 4 processes on one node (launch/local.sh)."""
    out = tmp_path_factory.mktemp("one-node")
    rc, text = run([str(LAUNCH / "local.sh"), *run_words(digits, out, "one-node", steps=STEPS)],
                   out / "one-node.log", timeout=180, NPROC_PER_NODE="4")
    assert rc == 0 and "4 rank(s) on cpu, batch 4/rank = 16 global" in text, text[-3000:]
    return out / "one-node.pth.tar"


@pytest.mark.parametrize("script, options, extra_env, node_lines", [
    # GLOO_SOCKET_IFNAME set (every node's interface is eth0) for one, unset for the other: both must work
    ("slurm.sbatch", ("-N2",), {"GLOO_SOCKET_IFNAME": "eth0"},
     ("2 node(s), rendezvous node1:", "node1: torchrun with 2 worker(s)", "node2: torchrun with 2 worker(s)")),
    ("slurm_srun.sbatch", ("-N2", "--ntasks-per-node=2"), {}, ("4 task(s) on 2 node(s), master node1:",)),
])
def test_two_nodes_train_to_the_weights_of_one_node_of_four(slurm, digits, one_node_of_four, tmp_path, script,
                                                            options, extra_env, node_lines):
    crossed = bridge_bytes("node2")
    job = slurm.sbatch(script, tmp_path, *run_words(digits, tmp_path, "two-nodes", steps=STEPS), options=options,
                       **extra_env)
    state = slurm.wait(job)
    out = job_output(tmp_path, job)
    assert state == f"job {job} COMPLETED ExitCode=0:0", f"{state}\n{out[-4000:]}"
    assert all(line in out for line in node_lines), out[-4000:]
    assert "4 rank(s) on cpu, batch 4/rank = 16 global" in out and "done: best val top-1" in out
    # the gradients crossed between the nodes: at least one model's worth of float32 per step through node2's
    # only link (128,730 parameters at 0.25x)
    crossed = bridge_bytes("node2") - crossed
    assert crossed > 128_730 * 4 * STEPS, f"only {crossed} bytes crossed node2's link"
    assert_same_training(tmp_path / "two-nodes.pth.tar", one_node_of_four, STEPS)
    print(f"{script}: {crossed / 1e6:.1f} MB crossed node2's link")


def test_usr1_on_two_nodes_checkpoints_every_rank_requeues_and_resumes(slurm, digits, tmp_path):
    first, second = usr1_requeue_resume(slurm, digits, tmp_path, options=("-N2",), steps=40)
    for run_output in (first, second):
        assert "node1: torchrun with 2 worker(s)" in run_output and "node2: torchrun with 2 worker(s)" in run_output
        assert "4 rank(s) on cpu" in run_output
    assert load_checkpoint(tmp_path / "requeue.pth.tar")["world_size"] == 4


# ------------------------------------------------------------------------------------------------- faults
def test_node2_lost_mid_epoch_ends_the_job_in_bounded_time_and_the_checkpoint_survives(slurm, digits, tmp_path):
    # a step checkpoint every 20 steps: the kill at step >= 23 lands far from the next write
    words = run_words(digits, tmp_path, "lost", "train.save_every_steps=20", steps=400)
    # TMPDIR: the watchdog processes killed with node2 cannot remove their FIFOs (fdm-watchdog-*); keep them here
    job = slurm.sbatch("slurm.sbatch", tmp_path, *words, options=("-N2",), TMPDIR=str(tmp_path))
    out_file = tmp_path / f"fdmobilenet-{job}.out"
    wait_for(out_file, r"epoch 1/1 step 23/", 150)
    before = sha256(tmp_path / "lost.pth.tar")
    victims = [p for group in training_processes("node2").values() for p in group]
    assert victims, node_processes("node2")
    killed = time.monotonic()
    kill_and_continue(victims)
    state = slurm.wait(job, timeout=120)
    seconds = time.monotonic() - killed
    out = out_file.read_text(errors="replace")
    print(f"node2 lost ({len(victims)} processes killed): job ended {seconds:.1f} s later: {state}")
    assert state.startswith(f"job {job} FAILED"), f"{state}\n{out[-4000:]}"
    assert seconds < 60, f"the job took {seconds:.1f} s to end after node2 was lost"
    assert "done: best val top-1" not in out
    assert sha256(tmp_path / "lost.pth.tar") == before
    ck = load_checkpoint(tmp_path / "lost.pth.tar")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"], ck["world_size"]) == (0, 20, 20, 4)


def stop_a_worker_on_node2(out_file: Path, workers: int) -> tuple[int, float, re.Match]:
    """kill -STOP one of node2's workers once the job trains; returns (its pid, when, the watchdog's line
    about it)."""
    wait_for(out_file, r"epoch 1/1 step 10/", 150)
    victim = wait_for_workers("node2", workers)[-1]
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    m = wait_for(out_file, rf"watchdog on node2: rank (\d) made no progress for {STEP_TIMEOUT} s "
                           rf"\(train.step_timeout_s\); killing it \(pid {victim}\)", STEP_TIMEOUT + 60)
    return victim, stopped, m


@pytest.mark.parametrize("script, options", [("slurm.sbatch", ("-N2",)),
                                             ("slurm_srun.sbatch", ("-N2", "--ntasks-per-node=2"))])
def test_hung_worker_on_node2_is_killed_within_the_step_timeout(slurm, digits, tmp_path, script, options):
    """slurm.sbatch (torchrun, MAX_RESTARTS 3 by default): both nodes restart from the last step checkpoint
    and finish. slurm_srun.sbatch (no agent to restart): the step, and the job, end."""
    steps, save_every = 30, 4
    words = run_words(digits, tmp_path, "hung", f"train.save_every_steps={save_every}",
                      f"train.step_timeout_s={STEP_TIMEOUT}", steps=steps)
    job = slurm.sbatch(script, tmp_path, *words, options=options)
    out_file = tmp_path / f"{'fdmobilenet' if script == 'slurm.sbatch' else 'fdmobilenet-srun'}-{job}.out"
    victim = None
    try:
        victim, stopped, m = stop_a_worker_on_node2(out_file, workers=2)
        reaction = time.monotonic() - stopped
        state = slurm.wait(job, timeout=240)
        ended = time.monotonic() - stopped
    finally:
        if victim:
            kill_and_continue([victim])
    out = out_file.read_text(errors="replace")
    print(f"{script}: worker (rank {m.group(1)}, pid {victim}) on node2 stopped -> killed by its watchdog "
          f"{reaction:.1f} s later (train.step_timeout_s={STEP_TIMEOUT}); {state}, {ended:.1f} s after the stop")
    assert reaction <= STEP_TIMEOUT + MARGIN
    if script == "slurm_srun.sbatch":
        assert state.startswith(f"job {job} FAILED"), f"{state}\n{out[-4000:]}"
        return
    assert state == f"job {job} COMPLETED ExitCode=0:0", f"{state}\n{out[-4000:]}"
    before, sep, after = out.partition("resumed from")
    assert sep and out.count("resumed from") == 1, out[-4000:]
    resumed_at = int(re.match(r" \S+: epoch 1 step (\d+)", after).group(1))
    assert resumed_at % save_every == 0 and 0 <= max(global_steps(before, steps)) - resumed_at <= save_every
    assert global_steps(after, steps)[0] == resumed_at + 1 and "4 rank(s) on cpu" in after
    ck = load_checkpoint(tmp_path / "hung.pth.tar")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"], ck["world_size"]) == (1, 0, steps, 4)


# ---------------------------------------------------------------------------------- names and interfaces
@pytest.mark.parametrize("script, break_it, message", [
    pytest.param("slurm.sbatch", lambda hosts, env: hosts.drop("node1"),
                 "node2: cannot resolve 'node1', the rendezvous host of this job", id="rendezvous-host-unknown"),
    pytest.param("slurm_srun.sbatch", lambda hosts, env: hosts.map("node2", "127.0.1.1"),
                 "node2: its own name 'node2' resolves only to loopback (127.0.1.1)", id="own-name-loopback"),
    pytest.param("slurm.sbatch", lambda hosts, env: env.update(GLOO_SOCKET_IFNAME="ib0"),
                 "GLOO_SOCKET_IFNAME=ib0 names 'ib0', which this node does not have (it has: eth0 lo)",
                 id="no-such-interface"),
])
def test_a_node_without_the_names_or_interfaces_ends_the_job_naming_them(slurm, digits, tmp_path, script,
                                                                         break_it, message):
    hosts, extra_env = HostsFile("node2"), {}
    break_it(hosts, extra_env)
    try:
        started = time.monotonic()
        job = slurm.sbatch(script, tmp_path, *run_words(digits, tmp_path, "names"), options=("-N2",), **extra_env)
        state = slurm.wait(job, timeout=60)
        seconds = time.monotonic() - started
    finally:
        hosts.restore()
    out = job_output(tmp_path, job)
    print(f"{message!r}: {state}, {seconds:.1f} s after submission")
    assert state.startswith(f"job {job} FAILED"), f"{state}\n{out[-4000:]}"
    assert message in out, out[-4000:]
    assert "Traceback" not in out and not (tmp_path / "names.pth.tar").exists()
