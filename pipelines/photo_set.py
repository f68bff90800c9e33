"""An ImageNet-like JPEG set for loader benchmarks, made from the real photos that scikit-image ships.

Decode cost depends on what is in a JPEG: random noise compresses badly and decodes unlike a photo. So every
image here is a view of a real photograph (skimage.data's bundled files; none needs a download): a random crop
(30-100 % of the area, aspect near the target's), rescaled to the target size, maybe mirrored, with a small
per-channel colour shift, saved at JPEG quality ~90 - the size and entropy of a typical ImageNet JPEG.

Class ``c`` draws from photo ``c mod n_photos`` around its own anchor point, so labels are not pure noise.

    python -m pipelines.photo_set data/photos --num-train 20000 --num-val 1000 --classes 100 \\
        [--size 500x375] [--quality 90] [--seed 0] [--workers N]

Layout: DIR/train/class0000/train_00000000.jpg ..., DIR/val/class0000/val_00000000.jpg ... (ImageFolder).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fdmobilenet import cli
from pipelines.imagefolder import build_once

COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina")
GREY_PHOTOS = ("camera", "coins", "moon", "brick", "grass", "gravel", "cell", "clock")

_photos: list[Image.Image] = []   # per worker process, filled by _load_photos


def _load_photos() -> None:
    import skimage.data
    _photos[:] = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
                  for name in COLOUR_PHOTOS + GREY_PHOTOS]


def class_name(c: int) -> str:
    """Zero-padded so that sorted folder names are in label order."""
    return f"class{c:04d}"


def render(label: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One random view of the photo that belongs to ``label``."""
    photo = _photos[label % len(_photos)]
    pw, ph = photo.size
    # each class has its own anchor inside its photo; crops wander around it
    anchor = np.random.default_rng(label).uniform(0.25, 0.75, size=2)
    area = rng.uniform(0.3, 1.0) * pw * ph
    aspect = size[0] / size[1] * np.exp(rng.uniform(-0.2, 0.2))
    w = min(pw, np.sqrt(area * aspect))
    h = min(ph, w / aspect)
    cx = np.clip(anchor[0] * pw + rng.normal(0, 0.1) * pw, w / 2, pw - w / 2)
    cy = np.clip(anchor[1] * ph + rng.normal(0, 0.1) * ph, h / 2, ph - h / 2)
    img = photo.resize(size, Image.Resampling.BILINEAR, box=(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gains = 1 + rng.normal(0, 0.06, size=3)
    ramp = np.arange(256)
    lut = np.concatenate([np.clip(ramp * g, 0, 255) for g in gains]).astype(np.uint8)
    return img.point(lut.tolist())


def _write_chunk(task: tuple[str, str, int, int, int, int, tuple[int, int], int]) -> int:
    root, split, start, stop, num_classes, seed, size, quality = task
    if not _photos:
        _load_photos()
    for i in range(start, stop):
        label = i % num_classes
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        path = Path(root) / split / class_name(label) / f"{split}_{i:08d}.jpg"
        render(label, rng, size).save(path, quality=quality)
    return stop - start


def write_photo_set(root: Path, counts: dict[str, int], num_classes: int, size: tuple[int, int],
                    quality: int, seed: int, workers: int) -> None:
    tasks = []
    for split, n in counts.items():
        for c in range(min(num_classes, n)):
            (root / split / class_name(c)).mkdir(parents=True, exist_ok=True)
        chunk = max(1, min(256, n // (4 * workers) or 1))
        tasks += [(str(root), split, s, min(n, s + chunk), num_classes, seed, size, quality)
                  for s in range(0, n, chunk)]
    if workers <= 1:
        for t in tasks:
            _write_chunk(t)
        return
    with mp.get_context("fork").Pool(workers, initializer=_load_photos) as pool:
        for _ in pool.imap_unordered(_write_chunk, tasks):
            pass


def build_photo_set(root: str | Path, num_train: int, num_val: int, num_classes: int,
                    size: tuple[int, int] = (500, 375), quality: int = 90, seed: int = 0,
                    workers: int | None = None) -> bool:
    """Write the set under ``root`` unless it is already there with the same settings; True when it wrote.
    Image ``i`` of a split has label ``i % num_classes`` (balanced classes)."""
    if num_classes < 1 or num_train < num_classes:
        raise cli.UsageError(f"need at least one train image per class: --num-train {num_train}, --classes "
                             f"{num_classes}")
    if num_val < 0 or not 1 <= quality <= 100 or min(size) < 8:
        raise cli.UsageError(f"--num-val must be 0 or more, --quality 1-100, --size at least 8x8; got {num_val}, "
                             f"{quality}, {size[0]}x{size[1]}")
    workers = workers or len(os.sched_getaffinity(0))
    params = {"dataset": "skimage-photos", "num_train": num_train, "num_val": num_val, "classes": num_classes,
              "size": list(size), "quality": quality, "seed": seed}
    counts = {"train": num_train, "val": num_val}
    return build_once(root, params,
                      lambda r: write_photo_set(r, counts, num_classes, size, quality, seed, workers))


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 500x375 (width x height), got {text!r}")
    return w, h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.photo_set", description=__doc__.split("\n\n")[0],
                                 epilog="Exit codes: 0 built (or already there); 2 a mistake (one line).")
    ap.add_argument("dir")
    ap.add_argument("--num-train", type=int, required=True)
    ap.add_argument("--num-val", type=int, required=True)
    ap.add_argument("--classes", type=int, required=True)
    ap.add_argument("--size", type=parse_size, default=(500, 375), help="WIDTHxHEIGHT (default 500x375)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all usable cores)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        built = build_photo_set(args.dir, args.num_train, args.num_val, args.classes, args.size, args.quality,
                                args.seed, args.workers)
    except (*cli.USER_ERRORS, OSError) as e:   # OSError: DIR holds a tree this tool did not write, no space, ...
        cli.report("pipelines.photo_set", e)
        return cli.EXIT_USAGE
    dt = time.perf_counter() - t0
    n = args.num_train + args.num_val
    rate = f", {n / dt:.0f} images/s" if built else ""
    print(f"{'built' if built else 'already complete:'} {args.dir}: {args.num_train} train + {args.num_val} val "
          f"JPEGs, {args.classes} classes, {args.size[0]}x{args.size[1]} q{args.quality} ({dt:.2f} s{rate})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
