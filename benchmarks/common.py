"""Shared helpers of the benchmark scripts: what machine and code produced a number, timing, and RESULTS.md.

Benchmark scripts import it as ``from common import ...`` (a script's own folder is on sys.path). The API:

* ``environment(argv)``: fdmobilenet.logs.run_metadata (commit, dirty flag, versions), the command as a user
  types it (``typed_command``), plus the machine:
  CPU model, usable cores, load average, and on CUDA the GPU, driver and CUDA runtime.
* ``typed_command(argv)``: the command for a record, with ``python`` for the interpreter's path; ``fill(text)``:
  its prose wrapped so that no line of RESULTS.md runs long.
* ``timed(fn, device)``: wall seconds of ``fn()`` between two device synchronisations (fdmobilenet.engine.sync).
* ``endless(loader)``: batches across epoch boundaries, set_epoch before each epoch.
* ``interleave(fns, rounds)``: runs A B C A B C ... and returns each variant's list of results, so drift of the
  machine (clocks, other load) spreads over every variant instead of biasing the one that ran last.
* ``stored_size_columns``, ``stored_bytes``: stored_size.py's table and sizes, also in run_gpu.sh's results.
* ``markdown_table``, ``write_json`` (whole file replaced at once, so a reader never sees half).
* ``record(section, text, path=RESULTS)``: appends ``text`` at the end of ``## section`` of RESULTS.md (the
  section and the file are created when missing); other sections are left byte for byte as they were.
* ``publish(text, section, record_it, device=None)``: prints a script's tables, and records them under
  ``section`` when asked (--record), with `` (GPU)`` or `` (CPU)`` after it when a device is given.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    import torch

# torch (and fdmobilenet, which imports it) load inside the functions that need them: collect_results.py,
# which run_gpu.sh re-runs within a second of every new row, imports only the table and file helpers.

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# The trainer's step line (fdmobilenet.logs.RunLogger.step, without a tty): epoch, step, img/s, data wait %
STEP_LINE = re.compile(r"epoch (\d+)/\d+ step (\d+)/\d+ .* ([\d,]+) img/s  data wait +(\d+)%")
RESULTS_HEADER = ("# Benchmark results\n\nMeasured numbers only. Each entry names its machine, device, versions, "
                  "commit and command.\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(argv: Sequence[str]) -> dict:
    """Everything a number needs beside it: code (commit, command), versions, machine and device."""
    import torch
    from fdmobilenet.logs import run_metadata
    meta = run_metadata(list(argv))
    meta["command"] = typed_command(argv)
    meta["cpu"] = _cpu_model()
    meta["cores"] = len(os.sched_getaffinity(0))
    meta["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
        meta["driver"] = _nvidia_driver()
        meta["cuda_runtime"] = torch.version.cuda
    else:
        meta["gpu"] = None
    return meta


def typed_command(argv: Sequence[str]) -> str:
    """The command as a user types it in the repository root: ``python`` instead of this interpreter's path."""
    import shlex
    return shlex.join(["python", *argv])


def fill(text: str, width: int = 118) -> str:
    """``text`` with its prose paragraphs wrapped at ``width`` (RESULTS.md keeps its lines short); a command
    (a paragraph in backquotes) and table rows stay whole."""
    import textwrap
    return "\n\n".join(p if p.startswith(("`", "|")) else textwrap.fill(p, width, break_on_hyphens=False)
                       for p in text.split("\n\n"))


def describe(meta: dict) -> str:
    """One markdown line naming machine, device, versions, commit and command."""
    v = meta.get("versions", {})
    dev = (f"{meta['gpu']} (driver {meta.get('driver')}, CUDA {meta.get('cuda_runtime')})" if meta.get("gpu")
           else "no GPU")
    dirty = " + uncommitted changes" if meta.get("git_dirty") else ""
    return (f"{meta.get('started_utc')} · host {meta.get('host')}: {meta.get('cpu')}, {meta.get('cores')} cores "
            f"(load avg {' / '.join(map(str, meta.get('load_avg_1_5_15', [])))}) · device: {dev} · "
            f"torch {v.get('torch')}, torchvision {v.get('torchvision', '-')}, DALI {v.get('nvidia.dali', '-')}, "
            f"Python {v.get('python')} · commit {meta.get('git_commit', 'unknown')[:10]}{dirty}\n\n"
            f"`{meta.get('command')}`")


def endless(loader) -> Iterator:
    """Batches across epoch boundaries, calling set_epoch before each epoch as the trainer does."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of ``fn()``, with the device idle at both ends (queued GPU work is counted, not skipped)."""
    from fdmobilenet.engine import sync
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleave(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list]:
    """Each function once per round, in order (A B C A B C ...); returns {name: [result per round]}."""
    out: dict[str, list] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(fn())
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; missing keys print as '-'."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join(" --- " for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(k, "-")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def stored_size_columns(resolutions: Sequence[int]) -> tuple[tuple[str, str], ...]:
    """The columns of a stored_size.py row (loader x stored shorter side x training resolution), for its own
    report and run_gpu.sh's (collect_results.py)."""
    return (("loader", "loader"), ("stored", "stored shorter side"), ("res", "res"), ("img_s", "img/s"),
            ("rounds", "rounds (img/s)"), ("x_ref", f"x original @ {max(resolutions)}"))


def stored_bytes(per_image: dict[str, float]) -> str:
    """stored_size.py's mean bytes on disk per image, one clause per stored size."""
    return ", ".join(f"{k} {v / 1e3:.1f} KB" for k, v in per_image.items())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def publish(text: str, section: str, record_it: bool, device: torch.device | str | None = None) -> None:
    print("\n" + text, flush=True)
    if record_it:
        kind = "" if device is None else f" ({'GPU' if getattr(device, 'type', device) == 'cuda' else 'CPU'})"
        record(section + kind, text)


def record(section: str, text: str, path: str | os.PathLike = RESULTS) -> None:
    """Append ``text`` at the end of section ``## {section}``, creating the section (at the end of the file)
    or the file (with RESULTS_HEADER) when missing. Nothing else in the file changes."""
    path = Path(path)
    content = path.read_text() if path.exists() else RESULTS_HEADER
    lines = content.splitlines(keepends=True)
    heading = f"## {section}"
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    block = text.rstrip("\n") + "\n"
    if start is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines += ["\n", heading + "\n", "\n", block]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        while end > start + 1 and not lines[end - 1].strip():   # insert before the blank lines that end it
            end -= 1
        gap = ["\n"] if end < len(lines) and lines[end].strip() else []   # keep a blank line before the next
        lines[end:end] = ["\n", block, *gap]
    path.write_text("".join(lines))
