"""Training-pipeline throughput: DALI vs torchvision's DataLoader on the same JPEG folder and augmentation.

    python benchmarks/pipeline_throughput.py [--data ROOT] [--json FILE] [--batch B] [--threads T ...]
        [--device cpu|cuda] [--hw-decoder-load L ...] [--rounds R] [--steps S] [--quick]

ROOT holds an ImageFolder ``train/`` split; without --data an ImageNet-like set (real photos, 500x375,
JPEG q90, pipelines.photo_set) is built once and cached. Every loader is built by ``pipelines.build_loader``
from one data config (default imagenet-aggressive: RandomResizedCrop 224, scale 0.36-1, flip, normalise),
so they decode the same files and do the same work; only data.loader / num_threads / hw_decoder_load differ.

Method: each loader first runs ``--warmup`` batches; then rounds alternate the variants (A B A B ...). In a
round a variant first drains the batches its prefetch queue filled while another variant ran (untimed), then
``--steps`` batches are timed (CUDA synchronised). Reported: the median over rounds of images/s.

CPU (default without a GPU): DALI's CPU pipeline with T threads vs the DataLoader with T workers
(T = --threads, default: all usable cores). CUDA: DALI mixed decode for every --hw-decoder-load
(0, 0.65, 0.99) x --threads (4, 8), vs the DataLoader with --workers (default: all usable cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from fdmobilenet.config import load_family
from pipelines import build_loader
from pipelines.photo_set import build_photo_set

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Variant:
    loader: str                     # dali | torchvision
    threads: int                    # DALI threads or DataLoader workers
    hw_decoder_load: Optional[float] = None
    rates: list[float] = dataclasses.field(default_factory=list)

    def label(self, device: torch.device) -> str:
        if self.loader == "torchvision":
            return f"torchvision DataLoader, {self.threads} workers"
        decode = "mixed" if device.type == "cuda" else "cpu"
        hw = f", hw_decoder_load {self.hw_decoder_load}" if device.type == "cuda" else ""
        return f"DALI {decode} decode, {self.threads} threads{hw}"


def endless(loader) -> Iterator:
    """Batches across epoch boundaries (set_epoch before each epoch, as a trainer does)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def timed_batches(batches: Iterator, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` batches, the last one finished on the device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        images, labels = next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def default_data_root(num_images: int) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path(tempfile.gettempdir()))) / "fdmobilenet-bench"
    return cache / f"photos-{num_images}"


def environment(device: torch.device) -> dict:
    import nvidia.dali
    import PIL
    import torchvision

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    env = {"machine": f"{platform.node()} ({cpu})", "nproc": len(os.sched_getaffinity(0)),
           "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "dali": nvidia.dali.__version__, "pillow": PIL.__version__,
           "commit": git("rev-parse", "--short", "HEAD") + (" (dirty)" if git("status", "--porcelain",
                                                                              "--untracked-files=no") else ""),
           "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
           "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="dataset root with an ImageFolder train/ (default: build a photo set)")
    ap.add_argument("--data-config", default="imagenet-aggressive", help="augmentation to run (data config)")
    ap.add_argument("--num-images", type=int, default=None,
                    help="size of the self-built set (default 640; 5000 on CUDA; 96 with --quick)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 64 CPU, 256 CUDA)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="DALI thread counts (default: all usable cores on CPU; 4 8 on CUDA)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers (default: the DALI threads on CPU; all usable cores on CUDA)")
    ap.add_argument("--hw-decoder-load", type=float, nargs="+", default=[0.0, 0.65, 0.99],
                    help="CUDA only: shares of JPEGs for the hardware decoder to sweep")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (at least 3)")
    ap.add_argument("--steps", type=int, default=None, help="timed batches per round (default 8 CPU, 40 CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed batches per variant first (default 3)")
    ap.add_argument("--quick", action="store_true", help="tiny set, batch 16, 2 steps: checks the script runs")
    args = ap.parse_args(argv)
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (the median of fewer is not a median)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    cores = len(os.sched_getaffinity(0))
    gpu = device.type == "cuda"
    batch = args.batch or (16 if args.quick else 256 if gpu else 64)
    steps = args.steps or (2 if args.quick else 40 if gpu else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    threads = args.threads or ([4, 8] if gpu else [cores])
    workers = args.workers or (cores if gpu else threads[0])

    env = environment(device)
    if args.data:
        root = Path(args.data)
    else:
        n = args.num_images or (96 if args.quick else 5000 if gpu else 640)
        root = default_data_root(n)
        t0 = time.perf_counter()
        built = build_photo_set(root, num_train=n, num_val=0, num_classes=10)
        print(f"photo set {root}: {n} JPEGs 500x375 q90 "
              f"({'built in %.1f s' % (time.perf_counter() - t0) if built else 'cached'})", flush=True)
    num_classes = sum(1 for p in (root / "train").iterdir() if p.is_dir()) if (root / "train").is_dir() else 0
    base = dataclasses.replace(load_family("data", args.data_config), root=str(root), train_split="train",
                               num_classes=num_classes, layout="folder", dtype="auto", on_corrupt="error")

    # torchvision first: its workers fork before DALI starts threads in this process
    variants = [Variant("torchvision", workers)]
    variants += [Variant("dali", t, hw) for hw in (args.hw_decoder_load if gpu else [None]) for t in threads]
    streams = []
    for v in variants:
        cfg = dataclasses.replace(base, loader=v.loader, num_threads=v.threads,
                                  hw_decoder_load=v.hw_decoder_load if v.hw_decoder_load is not None
                                  else base.hw_decoder_load)
        loader = build_loader(cfg, "train", batch, device=device)
        # batches a variant's prefetch queue holds when it gets its turn: drained untimed
        queue = cfg.prefetch_queue_depth * (v.threads if v.loader == "torchvision" else 1) + 1
        stream = endless(loader)
        timed_batches(stream, warmup, device)
        streams.append((stream, queue))
        print(f"ready: {v.label(device)} ({len(loader)} batches of {batch} per epoch)", flush=True)

    for r in range(args.rounds):
        for v, (stream, queue) in zip(variants, streams):
            timed_batches(stream, queue, device)
            v.rates.append(steps * batch / timed_batches(stream, steps, device))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v.rates[-1]:.0f}" for v in variants), flush=True)

    env["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    reference = statistics.median(variants[0].rates)
    results = [{"loader": v.loader, "decode": ("mixed" if gpu else "cpu") if v.loader == "dali" else "pil",
                "device": device.type, "threads_or_workers": v.threads, "hw_decoder_load": v.hw_decoder_load,
                "batch": batch, "images_per_s": round(statistics.median(v.rates), 1),
                "rounds": [round(x, 1) for x in v.rates],
                "ratio_to_torchvision": round(statistics.median(v.rates) / reference, 2)} for v in variants]
    report = {**env, "data": str(root), "data_config": args.data_config, "crop_size": base.crop_size,
              "steps_per_round": steps, "warmup": warmup, "results": results}

    print(f"\n{env['machine']}, nproc {env['nproc']}, torch {env['torch']}, torchvision {env['torchvision']}, "
          f"DALI {env['dali']}{', GPU ' + env['gpu'] if gpu else ''}, commit {env['commit']}")
    print(f"load average before/after: {env['load_average_before']} / {env['load_average_after']}")
    print(f"{args.data_config} train pipeline ({base.crop_size}x{base.crop_size}), batch {batch}, "
          f"median of {args.rounds} rounds x {steps} batches\n")
    header = f"| {'loader':<50} | {'img/s':>8} | {'x torchvision':>13} |"
    print(header + "\n|" + "-" * 52 + "|" + "-" * 10 + "|" + "-" * 15 + "|")
    for v, res in zip(variants, results):
        print(f"| {v.label(device):<50} | {res['images_per_s']:>8.1f} | {res['ratio_to_torchvision']:>13.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
