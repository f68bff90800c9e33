"""The environment that turns the fault plugin (``sitecustomize.py`` here) on for a subprocess."""
from __future__ import annotations

import os
from pathlib import Path

from fault_plugin.sitecustomize import NAN_AT_STEP, RAISE_AT_STEP, RAISE_RANK, SLOW_SAVE_S, VARIABLES

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def fault_env(base: dict | None = None, *, raise_at_step: int | None = None, raise_rank: int | None = None,
              nan_at_step: int | None = None, slow_save_s: float | None = None) -> dict:
    """A copy of ``base`` (default os.environ) with every fault variable removed, then the requested ones
    set and, if any, this folder first on PYTHONPATH (then the repository, so the workers import this
    checkout). Every test subprocess environment goes through here, so no fault leaks in from outside."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in VARIABLES}
    faults = {RAISE_AT_STEP: raise_at_step, RAISE_RANK: raise_rank, NAN_AT_STEP: nan_at_step,
              SLOW_SAVE_S: slow_save_s}
    faults = {k: str(v) for k, v in faults.items() if v is not None}
    if faults:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(REPO), env.get("PYTHONPATH")) if p)
        env.update(faults)
    return env
