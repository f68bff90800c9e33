"""One plain `python train_ddp.py` process on the CPU: torch's default thread count vs the trainer's own
choice (engine.set_cpu_threads: the cores left after the loader's threads) vs one thread.

Each variant is a whole train_ddp.py run of the demo (FD-MobileNet 0.25x on the 64 px digits, DALI CPU
pipeline with the demo's data.num_threads), differing only in OMP_NUM_THREADS:

* ``torch default``: OMP_NUM_THREADS = what torch picks in a fresh process without it (one thread per
  core), i.e. what a plain run did before the trainer chose;
* ``trainer's choice``: OMP_NUM_THREADS unset, so the trainer picks;
* ``1 thread``: OMP_NUM_THREADS=1.

The variants alternate (A B C A B C ...) so that load from other processes spreads over all of them; a run's
rate is the median img/s of its step lines after the first (warm-up); reported: the median over rounds, every
round's rate, and the load average before and after.

    python benchmarks/cpu_threads.py [--rounds 5] [--steps 40] [--json out.json] [--record]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

from common import STEP_LINE, describe, environment, interleave, markdown_table, record, write_json

REPO = Path(__file__).resolve().parents[1]
SECTION = "Trainer CPU threads (one process)"


def default_threads() -> int:
    """torch's intra-op thread count in a fresh process without OMP_NUM_THREADS."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def train_rate(words: list[str], omp: str | None) -> dict:
    """One train_ddp.py run; its median step-line img/s after the first line, and the thread choice it
    printed."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update({"OMP_NUM_THREADS": omp} if omp is not None else {})
    p = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), *words], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"train_ddp.py failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    rates = [float(m.group(3).replace(",", "")) for m in STEP_LINE.finditer(p.stdout)]
    threads = re.search(r"torch threads (\d+ \([^)]*\))", p.stdout).group(1)
    return {"img_s": median(rates[1:]), "threads": threads}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="training steps per run (log line every 10)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fdmobilenet-bench" / "cpu-threads"))
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--record", action="store_true", help=f"append to benchmarks/RESULTS.md, section '{SECTION}'")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from pipelines.demo_data import build_digits
    work = Path(args.work)
    build_digits(work / "digits")
    env = environment(sys.argv if argv is None else ["benchmarks/cpu_threads.py", *argv])
    words = ["--config", "demo", "--fresh", f"data.root={work / 'digits'}", "optim.epochs=1",
             f"train.steps_per_epoch={args.steps}", "train.print_freq=10", "train.val_steps=1", "train.plot=false",
             f"train.output_dir={work / 'out'}"]
    n = default_threads()
    variants = {f"torch default (OMP_NUM_THREADS={n})": str(n), "trainer's choice (OMP_NUM_THREADS unset)": None,
                "1 thread (OMP_NUM_THREADS=1)": "1"}
    results = interleave({name: (lambda omp=omp, i=i: train_rate([*words, f"--label=threads{i}"], omp))
                          for i, (name, omp) in enumerate(variants.items())}, args.rounds)
    load_after = [round(x, 2) for x in os.getloadavg()]
    rows = [{"variant": name, "threads": runs[0]["threads"], "img_s": round(median([r["img_s"] for r in runs]), 1),
             "rounds": [round(r["img_s"], 1) for r in runs]} for name, runs in results.items()]
    base = rows[0]["img_s"]
    for row in rows:
        row["x_default"] = round(row["img_s"] / base, 2)
    table = markdown_table(rows, (("variant", "variant"), ("threads", "torch threads (as the header printed)"),
                                  ("img_s", "img/s (median)"), ("rounds", "rounds (img/s)"),
                                  ("x_default", "x torch default")))
    text = (f"{describe(env)}\n\nload average after: {' / '.join(map(str, load_after))} · one `train_ddp.py` process, "
            f"demo config (0.25x, 64 px digits, DALI CPU, data.num_threads from the config), {args.steps} steps per "
            f"run, median of its step lines after the first; {args.rounds} rounds, variants alternating\n\n{table}\n")
    print(text)
    if args.json:
        write_json(args.json, {"meta": env, "load_avg_after": load_after, "rows": rows})
    if args.record:
        record(SECTION, text)


if __name__ == "__main__":
    main()
