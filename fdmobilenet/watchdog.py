"""Hung-rank watchdog: a rank whose training step stops making progress is killed within
``train.step_timeout_s``, so that the launcher ends the job - or, under torchrun ``--max-restarts``, restarts
every rank from the last checkpoint - instead of every other rank waiting out the 30-minute collective
timeout (fdmobilenet.distributed.COLLECTIVE_TIMEOUT).

``start(cfg.train)``, once before the process group and any thread exist, forks a small process that serves
torch.distributed.elastic.timer's FileTimerServer on a private FIFO (in its own ``$TMPDIR/fdm-watchdog-*``
directory, removed when the rank ends). ``timed_steps(range(...))`` wraps the step loop: each iteration - its
batch, the step, the log line, the preemption poll, a step checkpoint - must end within the allowance
(``train.first_step_timeout_s`` for a process's first step: compilation, warm-up), or the watchdog process
SIGKILLs the rank, which works on a stopped rank, one stuck in a C call or in a collective. Why a server per
rank rather than torchrun's own or a shorter collective timeout: docs/design.md.
"""
from __future__ import annotations

import errno
import functools
import os
import signal
import socket
import sys
import tempfile
import time
from typing import Iterable, Iterator, Optional

import torch.distributed as dist
from torch.distributed.elastic.timer import FileTimerClient, FileTimerRequest, FileTimerServer

from fdmobilenet.config import TrainConfig

# How often the watchdog process looks for expired timers (the reaction's granularity).
POLL_S = 0.1
# Signals that end the job are meant for the rank (preemption: SLURM signals every process of the step,
# torchrun forwards); the watchdog process ignores them and ends when the rank does.
_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

_client: Optional[FileTimerClient] = None
_timeouts: tuple[float, float] = (0.0, 0.0)   # (first step, every later step); 0 = not timed
_first_step_done = False


def start(train: TrainConfig) -> None:
    """Fork this rank's watchdog process when ``train.step_timeout_s`` > 0 (else do nothing)."""
    global _client, _timeouts
    if train.step_timeout_s <= 0 or _client is not None:
        return
    fifo = os.path.join(tempfile.mkdtemp(prefix="fdm-watchdog-"), "timer")
    server = FileTimerServer(fifo, run_id=f"rank pid {os.getpid()}", max_interval=POLL_S, daemon=True,
                             log_event=functools.partial(_on_event, fifo))   # makes the FIFO, starts nothing
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        _serve(server, parent, fifo)
    _wait_until_served(fifo, child)
    _client = FileTimerClient(fifo, signal=signal.SIGKILL)
    _timeouts = (train.first_step_timeout_s, train.step_timeout_s)


def _wait_until_served(fifo: str, child: int, limit_s: float = 60) -> None:
    """Return once the watchdog process reads the FIFO. Until then a client's write-open fails (ENXIO) and
    FileTimerClient retries only ten times in 1 s, logging each failure; a first timer sent late would also
    start its countdown late."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return
        except OSError as e:
            if e.errno != errno.ENXIO or os.waitpid(child, os.WNOHANG) != (0, 0) or time.monotonic() > deadline:
                raise RuntimeError(f"the step watchdog process (pid {child}) did not start serving {fifo}: {e}; "
                                   f"set train.step_timeout_s=0 to train without it") from e
        time.sleep(0.01)


def _serve(server: FileTimerServer, parent: int, fifo: str) -> None:
    """The watchdog process: serve the timers until the rank exits (or is killed), then clean up."""
    try:
        for sig in _IGNORED:
            signal.signal(sig, signal.SIG_IGN)
        server.start()
        while os.getppid() == parent:
            time.sleep(0.5)
        server.stop()                          # removes the FIFO
        os.rmdir(os.path.dirname(fifo))
    finally:
        os._exit(0)                            # never return into the rank's code


def _on_event(fifo: str, name: str, request: Optional[FileTimerRequest]) -> None:
    """FileTimerServer's event hook (in the watchdog process): say which rank is killed and why. After the
    kill the server SIGKILLs its own process, so the FIFO is removed here, while it still can be."""
    if name == "timer expired" and request is not None:
        print(f"watchdog on {socket.gethostname()}: {request.scope_id}; killing it (pid {request.worker_pid}) "
              f"with SIGKILL so that the launcher ends or restarts the job", file=sys.stderr, flush=True)
    elif name == "kill worker process" and os.path.exists(fifo):
        os.unlink(fifo)
        os.rmdir(os.path.dirname(fifo))


def timed_steps(steps: Iterable[int]) -> Iterator[int]:
    """Yield ``steps``; from each item to the next (one iteration of the training loop) the rank must make
    progress within the allowance, or the watchdog kills it. Without ``start`` (or with
    train.step_timeout_s 0) a plain pass-through. Leaving the loop - its end, ``break``, an exception -
    releases the timer, so evaluation and the epoch's checkpoint are not timed.

    The timer is re-armed at most every ``rearm`` s (1 s, or a tenth of a short allowance) and then for the
    allowance plus ``rearm``: a pipe write per step could outrun the watchdog's reads on very fast steps
    (the FIFO then refuses the write), and this way a step is never killed before the full allowance and a
    hung one is killed at most ``rearm`` s after it."""
    global _first_step_done
    if _client is None:
        yield from steps
        return
    rank = dist.get_rank() if dist.is_initialized() else 0
    armed, armed_at = None, 0.0
    try:
        for step in steps:
            first = not _first_step_done
            _first_step_done = True
            after = _timeouts[0] if first else _timeouts[1]
            field = "first_step_timeout_s, the first step" if first else "step_timeout_s"
            scope = f"rank {rank} made no progress for {after:g} s (train.{field})"
            rearm, now = min(1.0, after / 10), time.time()
            if after > 0 and (scope != armed or now - armed_at >= rearm):
                # the same scope again replaces the running timer in one request: nothing is ever unarmed
                _client.acquire(scope, now + after + rearm)
                armed_at = now
            if armed not in (None, scope):
                _client.release(armed)
            armed = scope if after > 0 else None
            yield step
    finally:
        if armed is not None:
            _client.release(armed)
