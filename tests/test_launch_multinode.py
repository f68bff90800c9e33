"""Two "nodes" on one machine: two launch/multinode.sh (torchrun --nnodes=2 --nproc-per-node=2, c10d
rendezvous on 127.0.0.1) make a world of 4 that trains the demo to the same weights as one launch/local.sh
with 4 processes.

Why the two runs must agree: the global batch (16) and the world size (4) are the same, the ranks are
0..3 in both (the two agents get node ranks 0 and 1 in either order: each node's workers are then ranks
2*node_rank + local_rank, and rank r reads shard r of the data with the DALI seed of rank r), DDP starts
every rank from rank 0's weights and averages the same four gradients, and BatchNorm statistics are per rank
(the same 4-image batches) with DDP broadcasting rank 0's buffers. Only the order of the floating-point
additions inside the all-reduce could differ, hence a float tolerance rather than equality (over 6 steps:
with BatchNorm on 4 images per rank, those differences grow chaotically over a few dozen steps).

A kill -9 of one worker after a step checkpoint makes torchrun restart every worker on both nodes
(MAX_RESTARTS), and the job continues from that checkpoint and finishes.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from launch_support import (LAUNCH, assert_same_training, build_digits, children, free_port, global_steps,
                            kill_group, run, run_words, start, tail)

STEPS = 6
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("digits"))


def test_two_nodes_of_two_equal_one_node_of_four(digits, tmp_path):
    words = run_words(digits, tmp_path, "two-nodes", steps=STEPS)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [start([str(LAUNCH / "multinode.sh"), "--nnodes", "2", "--endpoint", endpoint,
                    "--job-id", "test-two-nodes", "--nproc-per-node", "2", "--", *words],
                   tmp_path / f"node{i}.log", MAX_RESTARTS="0") for i in (0, 1)]
    try:
        codes = [n.wait(timeout=180) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                kill_group(n)
    logs = [(tmp_path / f"node{i}.log").read_text(errors="replace") for i in (0, 1)]
    assert codes == [0, 0], f"exit codes {codes}\n{tail(tmp_path / 'node0.log')}\n{tail(tmp_path / 'node1.log')}"
    main_log = next(text for text in logs if "rank(s) on cpu" in text)    # rank 0's node
    assert "4 rank(s) on cpu, batch 4/rank = 16 global" in main_log and "done: best val top-1" in main_log

    rc, text = run([str(LAUNCH / "local.sh"), *run_words(digits, tmp_path, "one-node", steps=STEPS)],
                   tmp_path / "one-node.log", timeout=180, NPROC_PER_NODE="4")
    assert rc == 0 and "4 rank(s) on cpu, batch 4/rank = 16 global" in text, text[-3000:]

    assert_same_training(tmp_path / "two-nodes.pth.tar", tmp_path / "one-node.pth.tar", STEPS)


def test_kill_9_of_a_worker_restarts_both_nodes_from_the_last_step_checkpoint(digits, tmp_path):
    steps, save_every = 40, 4
    words = run_words(digits, tmp_path, "restart", f"train.save_every_steps={save_every}", steps=steps)
    endpoint, logs = f"127.0.0.1:{free_port()}", [tmp_path / f"node{i}.log" for i in (0, 1)]
    nodes = [start([str(LAUNCH / "multinode.sh"), "--nnodes", "2", "--endpoint", endpoint, "--job-id",
                    "test-restart", "--nproc-per-node", "2", "--", *words], logs[i], MAX_RESTARTS="1")
             for i in (0, 1)]
    try:
        # rank 0's node logs the steps (either node may be that one): kill once a step checkpoint is written
        deadline = time.monotonic() + 180
        while max([0, *global_steps("".join(log.read_text(errors="replace") for log in logs if log.exists()),
                                    steps)]) < 2 * save_every + 1:
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), \
                f"no step {2 * save_every + 1} logged\n{tail(logs[0])}\n{tail(logs[1])}"
            time.sleep(0.1)
        workers = children(nodes[1].pid)       # multinode.sh execs torchrun: its children are the node's workers
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        codes = [n.wait(timeout=180) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                kill_group(n)
    texts = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], f"exit codes {codes}\n{tail(logs[0])}\n{tail(logs[1])}"
    text = next(t for t in texts if "resumed from" in t)   # rank 0's node after the restart
    before, _, after = text.partition("resumed from")
    resumed_at = int(re.match(r" \S+: epoch 1 step (\d+)", after).group(1))
    assert resumed_at % save_every == 0 and resumed_at >= 2 * save_every, text[-3000:]
    assert global_steps(after, steps) == list(range(resumed_at + 1, steps + 1)) and "done: best val top-1" in after
    assert "warning: torchrun" not in "".join(texts)    # multinode.sh opts out of torchrun's shared store


def test_a_batch_the_world_cannot_share_is_refused_before_the_rendezvous(digits, tmp_path):
    """2 nodes x 2 workers (or 1 to 3 nodes: every size is checked) and a global batch of 6: the pre-flight
    says so and exits 2 on its own, without waiting for the other node at the rendezvous."""
    for nnodes, needle in (("2", "over 4 ranks"), ("1:3", "over 4 ranks")):
        words = run_words(digits, tmp_path, "odd", steps=STEPS, batch=6)
        rc, text = run([str(LAUNCH / "multinode.sh"), "--nnodes", nnodes, "--endpoint", f"127.0.0.1:{free_port()}",
                        "--job-id", "test-odd", "--nproc-per-node", "2", "--", *words], tmp_path / "odd.log",
                       timeout=120)
        assert rc == 2 and f"train_ddp.py: optim.batch_size=6 (global) must divide evenly {needle}" in text, text
        assert "torch.distributed" not in text
