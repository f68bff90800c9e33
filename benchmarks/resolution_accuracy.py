"""Accuracy at a fixed training resolution against a training-resolution ramp tested higher, on a small set.

Two recipes that differ only in resolution, each trained with train_ddp.py (one CPU process, DALI) for every
seed, the runs alternating between the recipes:

* ``fixed``: every epoch at ``--fixed-res`` (data.crop_size), tested at the same size (the paper's way);
* ``ramp``:  data.train_res from ``--start-res`` to ``--end-res`` over the last epochs (the fast recipe's
  shape: the last ~25 % of the epochs at the end size), tested at ``--test-res``.

``--recipes`` picks which run, ``--scale`` sets both recipes' RandomResizedCrop area range (the paper's
0.36-1 by default; FixRes' train-test discrepancy grows as the crops get smaller). Then every final
checkpoint is scored by evaluate.py on the whole val split at each of ``--sweep`` test sizes
(shorter side resized to size / 0.875, centre crop), so the table shows where each model tests best (FixRes:
a model trained on random crops at low resolution tests best higher). Reported per recipe: the training
seconds (the trainer's per-epoch times, summed), val top-1 per seed at each test size, and the mean.

    python -m pipelines.photo_set data/photos30 --num-train 3000 --num-val 1500 --classes 30
    python benchmarks/resolution_accuracy.py --data data/photos30 --out runs/res --epochs 10 --seeds 0,1
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from statistics import mean

from common import describe, environment, fill, markdown_table, publish

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    ap.add_argument("--out", required=True, help="folder for the runs' checkpoints and logs")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.2, help="at --batch (cosine schedule, 1 warm-up epoch)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--fixed-res", type=int, default=224)
    ap.add_argument("--start-res", type=int, default=160)
    ap.add_argument("--end-res", type=int, default=192)
    ap.add_argument("--test-res", type=int, default=224, help="the ramp's evaluation size during training")
    ap.add_argument("--sweep", default="160,192,224,256,288", help="test sizes for the final checkpoints")
    ap.add_argument("--scale", default="0.36,1.0", help="RandomResizedCrop area range (FFCV and timm: 0.08,1.0)")
    ap.add_argument("--recipes", default="fixed,ramp")
    ap.add_argument("--threads", type=int, default=2, help="DALI threads")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    return ap.parse_args(argv)


def resize_for(size: int) -> int:
    return round(size / 0.875)


def recipes(args: argparse.Namespace) -> dict[str, list[str]]:
    """The overrides of each recipe; everything else is shared."""
    ramp_start = round(args.epochs * 0.7)
    every = {
        "fixed": [f"data.crop_size={args.fixed_res}", f"data.val_crop={args.fixed_res}",
                  f"data.val_resize={resize_for(args.fixed_res)}"],
        "ramp": [f"data.crop_size={args.end_res}", f"data.val_crop={args.test_res}",
                 f"data.val_resize={resize_for(args.test_res)}",
                 f"data.train_res={{start_res: {args.start_res}, ramp_start: {ramp_start}, ramp_end: {ramp_start + 2}}}"],
    }
    return {name: [*every[name], f"data.scale=[{args.scale}]"] for name in args.recipes.split(",")}


def train(args: argparse.Namespace, recipe: str, words: list[str], seed: int, classes: int) -> Path:
    label = f"{recipe}-seed{seed}"
    # the demo's optimizer and schedule (lr 0.2 at batch 64, 1 warm-up epoch, cosine), the paper's augmentation
    common = ["--config", "demo", "--data", "imagenet-aggressive", f"--label={label}", "--fresh",
              f"data.root={args.data}", f"data.num_classes={classes}", f"data.num_threads={args.threads}",
              f"data.seed={seed}", f"train.seed={seed}",
              f"model.width_mult={args.width}", f"optim.epochs={args.epochs}", f"optim.batch_size={args.batch}",
              f"optim.base_batch_size={args.batch}", f"optim.lr={args.lr}", f"train.output_dir={args.out}",
              "train.plot=false", "train.print_freq=1000"]
    p = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), *common, *words], cwd=REPO, text=True,
                       capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return Path(args.out) / label


def score(checkpoint: Path, size: int) -> float:
    p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(checkpoint),
                        f"data.val_crop={size}", f"data.val_resize={resize_for(size)}"], cwd=REPO, text=True,
                       capture_output=True)
    m = re.search(r"top-1 ([\d.]+)%", p.stdout)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"evaluate.py {checkpoint} at {size} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return float(m.group(1))


def main() -> None:
    args = parse_args()
    meta = environment(sys.argv)
    classes = len([d for d in os.scandir(Path(args.data) / "train") if d.is_dir()])
    seeds = [int(s) for s in args.seeds.split(",")]
    sweep = [int(s) for s in args.sweep.split(",")]
    results: dict[str, list[dict]] = {name: [] for name in recipes(args)}
    for i, seed in enumerate(seeds):
        order = list(recipes(args).items())
        for name, words in (order if i % 2 == 0 else order[::-1]):     # alternate which recipe goes first
            base = train(args, name, words, seed, classes)
            rows = [json.loads(line) for line in base.with_suffix(".jsonl").read_text().splitlines()]
            run = {"seed": seed, "train_s": sum(r["epoch_time_s"] for r in rows),
                   "train_res": [r["train_res"] for r in rows], "logged_top1": rows[-1]["val_top1"],
                   "sweep": {size: score(base.with_suffix(".pth.tar"), size) for size in sweep}}
            results[name].append(run)
            print(f"{name} seed {seed}: {run}", flush=True)
    table_rows = []
    for name, runs in results.items():
        row = {"recipe": name, "res": " ".join(str(r) for r in runs[0]["train_res"]),
               "train_s": " / ".join(f"{r['train_s']:.0f}" for r in runs)}
        for size in sweep:
            row[size] = " / ".join(f"{r['sweep'][size]:.1f}" for r in runs) + \
                f" (mean {mean(r['sweep'][size] for r in runs):.1f})"
        table_rows.append(row)
    table = markdown_table(table_rows, [("recipe", "recipe"), ("res", "train res per epoch"),
                                        ("train_s", "training s per seed")] +
                           [(size, f"top-1 % at test {size}") for size in sweep])
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    text = (f"{describe(meta)}\n\nFD-MobileNet {args.width:g}x, {args.data} ({classes} classes), {args.epochs} epochs, "
            f"batch {args.batch}, lr {args.lr} cosine, 1 warm-up epoch, RandomResizedCrop area {args.scale}, flip; one CPU "
            f"process, DALI CPU graph, {args.threads} threads; seeds {args.seeds} (values per seed, in that order); "
            f"test: shorter side size / 0.875, centre crop; load average after: {load}\n\n{table}\n")
    Path(args.out, "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    publish(fill(text), "Training-resolution schedule: accuracy on a small photo set", args.record, "cpu")


if __name__ == "__main__":
    main()
