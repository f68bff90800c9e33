"""Progress of a long dataset tool (pipelines.imagenet, pipelines.resize): ``what: done / total`` with the
elapsed time and an ETA, redrawn in place on a terminal, else one line at most every PROGRESS_EVERY_S seconds
(and always the last), so that a log file stays short."""
from __future__ import annotations

import sys
import time
from typing import Callable

PROGRESS_EVERY_S = 10.0


class Progress:
    def __init__(self, what: str, total: float, fmt: Callable[[float], str] = "{:,.0f}".format):
        self.what, self.total, self.fmt = what, total, fmt
        self.t0 = self.last = time.monotonic()
        self.tty = sys.stdout.isatty()

    def update(self, done: float, note: str = "") -> None:
        now = time.monotonic()
        final = done >= self.total
        if not (self.tty or final or now - self.last >= PROGRESS_EVERY_S):
            return
        self.last = now
        elapsed = now - self.t0
        eta = f", ETA {elapsed * (self.total - done) / done / 60:.1f} min" if 0 < done < self.total else ""
        line = f"{self.what}: {self.fmt(done)} / {self.fmt(self.total)}{note} ({elapsed:.0f} s{eta})"
        print(("\r\033[K" + line) if self.tty else line, end="\n" if final or not self.tty else "", flush=True)
