"""Training-pipeline throughput: DALI vs torchvision's DataLoader on the same JPEG folder and augmentation.

    python benchmarks/pipeline_throughput.py [--data ROOT] [--json FILE] [--batch B] [--threads T ...]
        [--device cpu|cuda] [--hw-decoder-load L ...] [--rounds R] [--steps S] [--quick] [--record]

ROOT holds an ImageFolder ``train/`` split; without --data an ImageNet-like set (real photos, 500x375,
JPEG q90, pipelines.photo_set) is built once and cached. Every loader is built by ``pipelines.build_loader``
from one data config (default imagenet-aggressive: RandomResizedCrop 224, scale 0.36-1, flip, normalise),
so they decode the same files and do the same work; only data.loader / num_threads / hw_decoder_load differ.

Method: each loader first runs ``--warmup`` batches; then rounds alternate the variants (A B A B ...). In a
round a variant first drains the batches its prefetch queue filled while another variant ran (untimed), then
``--steps`` batches are timed (CUDA synchronised). Reported: the median over rounds of images/s; --json is
rewritten after every round (medians of the rounds so far), so a run cut short keeps its finished rounds. On
CUDA, NVML samples the hardware JPEG engines while each DALI variant's batches are timed (pipelines.hw_decoder).

CPU (default without a GPU): DALI's CPU pipeline with T threads vs the DataLoader with T workers
(T = --threads, default: all usable cores). CUDA: DALI mixed decode for every --hw-decoder-load
(0, 0.65, 0.99) x --threads (4, 8), vs the DataLoader with --workers (default: all usable cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Callable, Iterator, Optional

import torch

from common import describe, endless, environment, interleave, markdown_table, publish, timed, write_json
from fdmobilenet.config import DataConfig, load_family
from pipelines import build_loader, resolve_loader_defaults
from pipelines.hw_decoder import JpegEngineSampler
from pipelines.photo_set import build_photo_set

SECTION = "Pipeline throughput"


@dataclasses.dataclass
class Variant:
    loader: str                     # dali | torchvision
    threads: int                    # DALI threads or DataLoader workers
    hw_decoder_load: Optional[float] = None

    def label(self, device: torch.device) -> str:
        if self.loader == "torchvision":
            return f"torchvision DataLoader, {self.threads} workers"
        decode = "mixed" if device.type == "cuda" else "cpu"
        hw = f", hw_decoder_load {self.hw_decoder_load}" if device.type == "cuda" else ""
        return f"DALI {decode} decode, {self.threads} threads{hw}"



def pull(batches: Iterator, n: int) -> None:
    for _ in range(n):
        next(batches)


def timed_rounds(cfg: DataConfig, batch: int, steps: int, warmup: int, device: torch.device,
                 jpeg_samples: Optional[list] = None) -> tuple[Callable[[], float], int]:
    """Build ``cfg``'s train loader (knobs resolved) and warm it up; returns (one round: images/s of ``steps``
    batches, the loader's batches per epoch). A round first drains, untimed, the batches its prefetch queue
    filled while other variants ran, so that only steady-state batches are timed. ``jpeg_samples``: a list
    that gets the GPU's JPEG-engine utilisation sampled during each timed round (pipelines.hw_decoder)."""
    loader = build_loader(cfg, "train", batch, device=device)
    stream = endless(loader)
    pull(stream, warmup)
    queue = cfg.prefetch_queue_depth * (cfg.num_threads if cfg.loader == "torchvision" else 1) + 1

    def one_round() -> float:
        pull(stream, queue)
        with JpegEngineSampler((device.index or 0) if jpeg_samples is not None else None) as use:
            seconds = timed(lambda: pull(stream, steps), device)
        if jpeg_samples is not None:
            jpeg_samples.extend(use.samples)
        return steps * batch / seconds
    return one_round, len(loader)


def default_data_root(num_images: int, name: str = "photos") -> Path:
    """Where a benchmark caches the photo set it builds (``name``-``num_images``)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path(tempfile.gettempdir()))) / "fdmobilenet-bench"
    return cache / f"{name}-{num_images}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="dataset root with an ImageFolder train/ (default: build a photo set)")
    ap.add_argument("--data-config", default="imagenet-aggressive", help="augmentation to run (data config)")
    ap.add_argument("--num-images", type=int, default=None,
                    help="size of the self-built set (default 640; 5000 on CUDA; 96 with --quick)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--record", action="store_true",
                    help=f"append the table to benchmarks/RESULTS.md, section '{SECTION} (CPU|GPU)'")
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

    env = environment(sys.argv if argv is None else ["benchmarks/pipeline_throughput.py", *argv])
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
    rounds, jpeg_samples = {}, {}
    for v in variants:
        cfg = resolve_loader_defaults(dataclasses.replace(
            base, loader=v.loader, num_threads=v.threads,
            hw_decoder_load=base.hw_decoder_load if v.hw_decoder_load is None else v.hw_decoder_load), device)[0]
        sampled = jpeg_samples.setdefault(v.label(device), []) if gpu and v.loader == "dali" else None
        rounds[v.label(device)], per_epoch = timed_rounds(cfg, batch, steps, warmup, device, sampled)
        print(f"ready: {v.label(device)} ({per_epoch} batches of {batch} per epoch)", flush=True)

    def summary(rates: dict[str, list[float]]) -> dict:
        reference = median(rates[variants[0].label(device)])
        results = []
        for v in variants:
            r = rates[v.label(device)]
            jpeg = jpeg_samples.get(v.label(device))
            results.append({"variant": v.label(device), "loader": v.loader,
                            "decode": ("mixed" if gpu else "cpu") if v.loader == "dali" else "pil",
                            "device": device.type, "threads_or_workers": v.threads,
                            "hw_decoder_load": v.hw_decoder_load, "batch": batch,
                            "images_per_s": round(median(r), 1), "rounds": [round(x, 1) for x in r],
                            "ratio_to_torchvision": round(median(r) / reference, 2),
                            "jpeg_engine_max_pct": max(jpeg) if jpeg else "n/a"})
        return {"environment": env, "load_avg_after": [round(x, 2) for x in os.getloadavg()], "data": str(root),
                "data_config": args.data_config, "crop_size": base.crop_size, "steps_per_round": steps,
                "warmup": warmup, "rounds": args.rounds, "rounds_done": min(map(len, rates.values())),
                "results": results}

    rates: dict[str, list[float]] = {label: [] for label in rounds}
    for _ in range(args.rounds):
        for label, rate in interleave(rounds, 1).items():
            rates[label] += rate
        report = summary(rates)
        if args.json:
            write_json(args.json, report)
    results, load_after = report["results"], report["load_avg_after"]

    text = (f"{describe(env)}\n\nload average after: {' / '.join(map(str, load_after))} · data {root} · "
            f"{args.data_config} train pipeline ({base.crop_size}x{base.crop_size}), batch {batch}, median of "
            f"{args.rounds} rounds x {steps} batches (after {warmup} warm-up batches per loader)\n\n"
            + markdown_table(results, (("variant", "loader"), ("images_per_s", "img/s"),
                                       ("rounds", "rounds (img/s)"), ("ratio_to_torchvision", "x torchvision"))
                             + ((("jpeg_engine_max_pct", "JPEG engines max %"),) if gpu else ())))
    publish(text, SECTION, args.record, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
