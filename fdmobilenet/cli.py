"""How the command-line tools fail: a user's mistake is one line and exit code 2; anything else is a
traceback and exit code 1.

A mistake - a wrong path, key, value or class count, a checkpoint that is missing or does not fit, a batch
that does not divide over the ranks - is reported as ``prog: message`` on stderr, once, without a traceback,
and the process exits with ``EXIT_USAGE`` (2, argparse's code for a bad command line). The same command
would fail the same way again, so nothing should restart it: torchrun with --max-restarts > 0 restarts a
worker whatever its exit code, which is why the launchers run ``train_ddp.py --check`` in one plain process
before torchrun / srun and stop on its exit code. Any other exception is a bug or a crash: its traceback is
printed and the exit code is 1. A Ctrl-C (SIGINT) that stops a tool is one line and exit code
``EXIT_INTERRUPTED`` (130); the trainer first saves a checkpoint (fdmobilenet.engine.PreemptionFlag).

The user errors are defined here, where every tool and both packages can import them without torch.
"""
from __future__ import annotations

import contextlib
import os
import sys

from fdmobilenet.config import ConfigError

EXIT_USAGE = 2
# 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C, so that a script or `&&` chain stops too
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A command that cannot work as given (e.g. a batch that does not divide over the ranks, --evaluate of a
    label that was never trained); the message says what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or applied; the message names the file and what to do."""


class DataError(ValueError):
    """The data on disk is not what the config promises; the message names the path and the fix."""


class CorruptImageError(RuntimeError):
    """An image could not be decoded; the message names the file."""


USER_ERRORS: tuple[type[Exception], ...] = (UsageError, ConfigError, CheckpointError, DataError, CorruptImageError)


def report(prog: str, error: BaseException) -> None:
    """The one line of a user error, on stderr."""
    print(f"{prog}: {error}", file=sys.stderr, flush=True)


def is_main_rank() -> bool:
    """Rank 0 by the launcher's RANK / SLURM_PROCID (before the process group exists)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


@contextlib.contextmanager
def exit_on_interrupt(prog: str):
    """For what a tool does before its ranks' work starts (config, checkpoint header, joining the process
    group): a Ctrl-C there has nothing to save; one line from rank 0, exit 130, no traceback."""
    try:
        yield
    except KeyboardInterrupt:
        if is_main_rank():
            report(prog, "stopped by SIGINT before it started")
        sys.exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def exit_on_user_error(prog: str):
    """For the part of a tool that runs before the process group exists (config, checkpoint header): every
    rank finds the same mistake, so only rank 0 (by the launcher's RANK / SLURM_PROCID) reports it; exit 2."""
    try:
        yield
    except USER_ERRORS as e:
        if is_main_rank():
            report(prog, e)
        sys.exit(EXIT_USAGE)
