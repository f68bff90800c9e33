"""Run train_ddp.py (under torchrun) for a number of steps, stop it the way a preemption does, and summarise
its step lines.

    python benchmarks/train_steps.py --steps 150 --steps-per-epoch 78 --json OUT.json -- \\
        python -m torch.distributed.run --standalone --nproc_per_node 1 train_ddp.py ...

The command's output passes through. Once its step lines (``epoch E/N step s/S ... N img/s  data wait P%``,
fdmobilenet.logs) show ``--steps`` global steps, SIGUSR1 goes to the command's child processes (torchrun's
workers; the command itself when it has none): train_ddp.py stops at the next step boundary the ranks agree
on, writes its checkpoint and exits 0, so the final evaluation never runs inside the time box. The summary:
every print window's img/s (global, between synchronised log points) and data-wait share, and their medians
over the windows after the first (which holds compilation and warm-up), written to --json after every step
line and once more when the command ends (its exit code then). Exit code: the command's.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys

from common import STEP_LINE, write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, required=True, help="global steps after which to stop the run")
    ap.add_argument("--steps-per-epoch", type=int, required=True, help="train.steps_per_epoch of the run")
    ap.add_argument("--json", required=True)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    windows, stopped_at, preempted = [], None, None

    def summary(rc):
        steady = windows[1:]
        return {"command": command, "exit_code": rc, "stop_requested_at_step": stopped_at, "preempted": preempted,
                "windows": windows,
                "median_img_s": statistics.median(w["img_s"] for w in steady) if steady else None,
                "median_data_wait_pct": statistics.median(w["data_wait_pct"] for w in steady) if steady else None}

    for line in proc.stdout:
        sys.stdout.write(line)
        m = STEP_LINE.search(line)
        if m:
            epoch, step, img_s, wait = int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4))
            windows.append({"global_step": (epoch - 1) * args.steps_per_epoch + step,
                            "img_s": float(img_s.replace(",", "")), "data_wait_pct": wait})
            write_json(args.json, summary(None))
            if stopped_at is None and windows[-1]["global_step"] >= args.steps:
                stopped_at = windows[-1]["global_step"]
                children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
                for pid in [int(p) for p in children.split()] or [proc.pid]:
                    signal_quietly(pid)
        elif line.startswith("preempted"):
            preempted = line.strip()
    rc = proc.wait()
    result = summary(rc)
    write_json(args.json, result)
    print(f"train_steps: {len(windows)} log windows, stop requested at global step {stopped_at}; median after "
          f"the first window: {result['median_img_s']} img/s, data wait {result['median_data_wait_pct']} %")
    return rc


def signal_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:   # ended meanwhile
        pass


if __name__ == "__main__":
    sys.exit(main())
