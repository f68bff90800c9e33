"""What a change of training resolution costs the DALI train loader (pipelines/dali.py rebuilds its pipeline at
the new size from a DALI checkpoint of the old one).

Per round, three fresh loaders over the same JPEGs each read one epoch and then start the next: ``change``
goes from ``--from-size`` to ``--to-size`` (data.train_res: a rebuild); the other two stay at one size, one at
each (no rebuild). Timed: from ``set_epoch`` to the new epoch's first batch, and the rest of that epoch (img/s),
so a cost that lasted beyond the first batch would show beside the fixed size's rate. The variants alternate
(the first of each round rotates); medians over the rounds.

    python benchmarks/resolution_change.py --data data/photos --from-size 160 --to-size 192 --batch 64 --threads 2
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from statistics import median

import torch

from common import describe, environment, fill, markdown_table, publish
from fdmobilenet.config import ResolutionRamp, load_experiment
from pipelines import build_loader

VARIANTS = ("from", "to", "change")   # epoch 0 -> epoch 1: from -> from, to -> to, from -> to


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="an ImageFolder root with train/ (e.g. python -m pipelines.photo_set)")
    ap.add_argument("--from-size", type=int, default=160)
    ap.add_argument("--to-size", type=int, default=192)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="DALI threads")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    return ap.parse_args(argv)


def one(args: argparse.Namespace, variant: str) -> dict:
    base = load_experiment(overrides=[f"data.root={args.data}", f"data.num_threads={args.threads}"]).data
    classes = len([d for d in os.scandir(os.path.join(args.data, "train")) if d.is_dir()])
    data = dataclasses.replace(base, num_classes=classes, crop_size=args.from_size if variant == "from" else args.to_size,
                               train_res=ResolutionRamp(args.from_size, 1, 2) if variant == "change" else None)
    loader = build_loader(data, "train", args.batch, device=torch.device("cpu"))
    loader.set_epoch(0)
    for images, _ in loader:                           # epoch 0; DALI prefetches into epoch 1
        pass
    size0 = images.shape[-1]
    start = time.perf_counter()
    loader.set_epoch(1)
    batches = iter(loader)
    images, _ = next(batches)
    first = time.perf_counter() - start
    start, n = time.perf_counter(), 0
    for images, _ in batches:
        n += images.shape[0]
    return {"first_batch_s": first, "rest_img_s": n / (time.perf_counter() - start), "sizes": f"{size0} -> {images.shape[-1]}"}


def main() -> None:
    args = parse_args()
    meta = environment(sys.argv)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
            runs[v].append(one(args, v))
    rows = [{"variant": runs[v][0]["sizes"] + (" (rebuild)" if v == "change" else ""),
             "first": f"{median(x['first_batch_s'] for x in runs[v]):.3f}",
             "first_range": f"{min(x['first_batch_s'] for x in runs[v]):.3f}-{max(x['first_batch_s'] for x in runs[v]):.3f}",
             "rest": f"{median(x['rest_img_s'] for x in runs[v]):.0f}"} for v in VARIANTS]
    table = markdown_table(rows, [("variant", "next epoch"), ("first", "set_epoch to 1st batch, s (median)"),
                                  ("first_range", "range, s"), ("rest", "rest of the epoch, img/s")])
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    text = (f"{describe(meta)}\n\nDALI CPU graph, {args.threads} threads, batch {args.batch}, imagenet-aggressive "
            f"augmentation over {args.data}; median of {args.rounds} alternating rounds; load average after: "
            f"{load}\n\n{table}\n")
    publish(fill(text), "Training-resolution schedule", args.record)


if __name__ == "__main__":
    main()
