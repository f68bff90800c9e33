"""A small real dataset for demos and tests: scikit-learn's handwritten digits as an ImageFolder of JPEGs.

``load_digits`` ships 1,797 real 8x8 scans of handwritten digits (10 classes) inside scikit-learn, so no
network is needed. Each one is upscaled (bicubic) to ``size`` x ``size``, kept as white ink on black (as in
MNIST), made RGB (the model takes 3 channels) and saved as a quality-95 JPEG into

    DIR/train/<0..9>/<index>.jpg     DIR/val/<0..9>/<index>.jpg

with a stratified, seeded split. Class folders are "0".."9" so ImageFolder's sorted order is the label order.

    python -m pipelines.demo_data data/digits [--size 64] [--val-fraction 0.2] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fdmobilenet import cli
from pipelines.imagefolder import build_once, list_samples

JPEG_QUALITY = 95


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """One 8x8 digit (ink 0..16) as a ``size`` x ``size`` RGB image, white ink on black."""
    grey = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
    return grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation samples: ``val_fraction`` of each class, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        is_val[idx[:round(len(idx) * val_fraction)]] = True
    return is_val


def write_digits(root: Path, size: int, val_fraction: float, seed: int) -> None:
    from sklearn.datasets import load_digits
    digits = load_digits()
    is_val = stratified_split(digits.target, val_fraction, seed)
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / ("val" if is_val[i] else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        digit_image(pixels, size).save(folder / f"{i:04d}.jpg", quality=JPEG_QUALITY)


def build_digits(root: str | Path, size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> bool:
    """Write the digits tree under ``root`` unless it is already there with the same settings.
    Returns True when it wrote it."""
    if not 0 < val_fraction < 1:
        raise cli.UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if size < 8:
        raise cli.UsageError(f"--size must be at least 8 (the digits are 8x8), got {size}")
    params = {"dataset": "sklearn-digits", "size": size, "val_fraction": val_fraction, "seed": seed,
              "quality": JPEG_QUALITY}
    return build_once(root, params, lambda r: write_digits(r, size, val_fraction, seed))


def channel_stats(split_dir: str | Path) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale) of the decoded JPEGs in ``split_dir``: the numbers for the
    data config's ``mean`` / ``std``."""
    _, samples = list_samples(split_dir)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255 for p, _ in samples])
    return pixels.mean(axis=(0, 1, 2)).tolist(), pixels.std(axis=(0, 1, 2)).tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.demo_data", description=__doc__.split("\n\n")[0],
                                 epilog="Exit codes: 0 built (or already there); 2 a mistake (one line).")
    ap.add_argument("dir", help="output directory (gets train/ and val/)")
    ap.add_argument("--size", type=int, default=64, help="side of the square JPEGs (default 64)")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="share of each class for val (default 0.2)")
    ap.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    ap.add_argument("--stats", action="store_true", help="also print the train split's channel mean/std")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        built = build_digits(args.dir, args.size, args.val_fraction, args.seed)
    except (*cli.USER_ERRORS, OSError) as e:   # OSError: DIR holds a tree this tool did not write, no space, ...
        cli.report("pipelines.demo_data", e)
        return cli.EXIT_USAGE
    counts = {s: len(list_samples(Path(args.dir) / s)[1]) for s in ("train", "val")}
    print(f"{'built' if built else 'already complete:'} {args.dir}: {counts['train']} train + {counts['val']} "
          f"val JPEGs, 10 classes, {args.size}x{args.size} ({time.perf_counter() - t0:.2f} s)")
    if args.stats:
        mean, std = channel_stats(Path(args.dir) / "train")
        print(f"mean: [{', '.join(f'{m:.4f}' for m in mean)}]  std: [{', '.join(f'{s:.4f}' for s in std)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
