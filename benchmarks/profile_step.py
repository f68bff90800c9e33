"""A few training steps under torch.profiler: where a step's time goes, kernel by kernel.

    python benchmarks/profile_step.py --width 1 --out DIR [--data-root ROOT] [--json FILE]

The trainer's step (train_throughput.py's build_trainer / step_of, so the same code train_ddp.py runs) for
``--variant`` (default: compiled on CUDA, channels_last on CPU), profiled twice with the same trainer: fed by
synthetic device-resident batches (``ceiling``: the model-only ceiling) and, with ``--data-root``, by the
DALI loader over those JPEGs with the loader's auto settings (``e2e_dali``: end to end). Each time ``--warmup``
steps run first, then ``--steps`` steps are profiled (CPU and CUDA activity).

Writes DIR/trace_{ceiling,e2e_dali}.json.gz (Chrome traces: chrome://tracing or ui.perfetto.dev) and, to
--json, for each the kernel table: the top ``--top`` GPU kernels by their own time over the profiled steps -
name, microseconds per step, share of the step's wall time, launches per step - and the GPU's busy share (all
kernel time over wall time; on a CPU run the table lists CPU operators instead). DALI's kernels (nvJPEG,
resize) appear too: CUPTI sees every kernel of the process. Steps run somewhat slower under the profiler.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from common import environment, write_json
from fdmobilenet.config import TrainConfig, choices
from fdmobilenet.distributed import DistInfo, resolve_device
from fdmobilenet.engine import setup_backends, sync
from train_throughput import VARIANTS, build_trainer, endless, loader_config, step_of, synthetic_batches, synthetic_dtype

MAX_TRACE_BYTES = 15 << 20   # the GPU host returns files of at most 16 MiB


def kernel_table(prof, steps: int, step_us: float, cuda: bool, top: int) -> tuple[list[dict], float]:
    """(top rows, busy share): device kernels (CUDA) or CPU operators by their own time."""
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
    own = {e.key: e.self_device_time_total if cuda else e.self_cpu_time_total for e in events}
    events = [e for e in events if own[e.key] > 0]
    ranked = sorted(events, key=lambda e: own[e.key], reverse=True)
    rows = [{"name": e.key if len(e.key) <= 100 else e.key[:97] + "...",
             "us_per_step": round(own[e.key] / steps, 1), "pct_of_step": round(100 * own[e.key] / steps / step_us, 1),
             "calls_per_step": round(e.count / steps, 1)} for e in ranked[:top]]
    busy = sum(own.values()) / steps / step_us if cuda else None
    return rows, busy


def profiled(name: str, step, batches, args, info: DistInfo, out: Path, described: dict) -> dict:
    """Warm up, profile ``args.steps`` steps, write trace_NAME.json.gz; the table and its context."""
    cuda = info.device.type == "cuda"
    for _ in range(args.warmup):
        step(*next(batches))
    sync(info.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step(*next(batches))
        sync(info.device)
        wall = time.perf_counter() - start
    step_us = 1e6 * wall / args.steps
    rows, busy = kernel_table(prof, args.steps, step_us, cuda, args.top)
    trace = out / f"trace_{name}.json.gz"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
    if trace.stat().st_size > MAX_TRACE_BYTES:
        os.unlink(trace)
        trace_note = f"trace over {MAX_TRACE_BYTES >> 20} MiB gzipped: not kept"
    else:
        trace_note = f"{trace.name} ({trace.stat().st_size / 2**20:.1f} MiB)"
    run = {"name": name, **described, "steps": args.steps, "step_ms": round(step_us / 1e3, 3),
           "img_s_under_profiler": round(args.batch / (step_us / 1e6), 1),
           "gpu_busy_pct": round(100 * busy, 1) if busy is not None else "n/a",
           "table_of": "GPU kernels" if cuda else "CPU operators", "rows": rows, "trace": trace_note}
    print(f"{name}: {run['variant']}, {run['data']}, {args.steps} steps of {run['step_ms']} ms, GPU busy "
          f"{run['gpu_busy_pct']} %; {trace_note}")
    for r in rows:
        print(f"  {r['pct_of_step']:5.1f} %  {r['us_per_step']:9.1f} us  x{r['calls_per_step']:<5}  {r['name']}")
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--variant", default="auto", help=f"one of {', '.join(VARIANTS)} (auto: compiled on CUDA, "
                                                      f"channels_last on CPU)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--data-root", help="also profile end to end from the DALI loader over this ImageFolder root")
    ap.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE", help="loader overrides")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--device", default="auto", choices=choices(TrainConfig, "device"))
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--out", required=True, help="folder for the traces")
    ap.add_argument("--json", help="write the tables here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = DistInfo(0, 0, 1, resolve_device(args.device, 0))
    cuda = info.device.type == "cuda"
    name = ("compiled" if cuda else "channels_last") if args.variant == "auto" else args.variant
    variant = VARIANTS[name]
    setup_backends(info.device, deterministic=False)
    step = step_of(build_trainer(args.width, variant, info, args.compile_backend), variant)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    described = {"variant": name, "width": args.width, "batch": args.batch}
    command_argv = sys.argv if argv is None else [sys.argv[0], *argv]
    result = {"meta": environment(command_argv), "runs": []}

    synthetic = synthetic_batches(args.batch, args.image_size, synthetic_dtype(variant, info.device),
                                  variant.channels_last, info.device)
    result["runs"].append(profiled("ceiling", step, synthetic, args, info, out, {**described, "data": "synthetic"}))
    if args.json:
        write_json(args.json, result)
    if args.data_root:
        import pipelines
        data, resolved = loader_config(args.data_root, "dali", args.image_size, args.set, info.device)
        batches = endless(pipelines.build_loader(data, "train", args.batch, device=info.device))
        source = f"DALI ({', '.join(f'{k}={getattr(data, k)}' for k in resolved) or 'explicit settings'})"
        result["runs"].append(profiled("e2e_dali", step, batches, args, info, out, {**described, "data": source}))
        if args.json:
            write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
