"""Find the files in an ImageFolder tree that would stop (or silently change) training, before training.

    python -m pipelines.verify DIR [DIR ...] [--workers N]

DIR is one split (DIR/<class>/<image>) or a dataset root whose sub-folders are splits (DIR/train, DIR/val).
Every image is fully decoded with PIL (not just its header), so truncated and corrupt files are found.

Errors (exit status 1): empty (0-byte) files, unreadable files, files that are not a decodable image,
truncated/corrupt image data, empty class folders (torchvision's ImageFolder refuses them), a split with no
class folders. Warnings (listed, exit 0): images that decode but are not JPEG (e.g. a PNG named .jpg - DALI
and PIL decode it by content, but it is not what a .jpg promises), files the loaders skip because their
extension is not an image extension, and files lying directly in a split (not in a class folder).

``find_bad_files(root)`` is the library entry point; a loader with ``on_corrupt: skip`` drops the paths of
the problems whose ``severity == "error"``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from torchvision.datasets.folder import IMG_EXTENSIONS

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str
    severity: str = "error"   # error: the loaders cannot use it | warning: usable, but not what it claims

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.reason}"


def check_image(path: str) -> Problem | None:
    """Fully decode one file; None when it is a good JPEG."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return Problem(path, "empty file (0 bytes)")
        with open(path, "rb") as f:
            head = f.read(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # EXIF/ICC noise is not our concern; decode failures raise
            with Image.open(path) as im:
                fmt = im.format
                im.load()
    except Image.DecompressionBombError as e:
        return Problem(path, f"too large to decode safely: {e}")
    except Image.UnidentifiedImageError:
        return Problem(path, "not an image (PIL cannot identify the content)")
    except (OSError, SyntaxError, ValueError) as e:
        if "truncated" in str(e):
            return Problem(path, f"truncated image data ({e})")
        return Problem(path, f"unreadable or corrupt: {type(e).__name__}: {e}")
    if head != JPEG_MAGIC:
        return Problem(path, f"not a JPEG: the content is {fmt} (decodes, but the name/format differ)", "warning")
    return None


def _splits(root: Path) -> list[Path]:
    """``root`` itself when it is a split, else its sub-folders (a dataset root with train/, val/)."""
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir()]
    is_dataset_root = subdirs and all(
        any(c.is_dir() for c in d.iterdir()) and not any(c.is_file() for c in d.iterdir()) for d in subdirs)
    return subdirs if is_dataset_root else [root]


def scan(root: str | Path) -> tuple[list[str], list[Problem]]:
    """List the image files to decode and the structural problems (no decoding)."""
    root = Path(root)
    if not root.is_dir():
        return [], [Problem(str(root), "not a directory")]
    images, problems = [], []
    for split in _splits(root):
        classes = [d for d in sorted(split.iterdir()) if d.is_dir()]
        if not classes:
            problems.append(Problem(str(split), "no class folders (expected SPLIT/<class>/<image files>)"))
        for f in sorted(p for p in split.iterdir() if p.is_file()):
            problems.append(Problem(str(f), "file outside any class folder (ignored by the loaders)", "warning"))
        for c in classes:
            n_images = 0
            for dirpath, _, files in sorted(os.walk(c, followlinks=True)):
                for name in sorted(files):
                    path = os.path.join(dirpath, name)
                    if name.lower().endswith(IMG_EXTENSIONS):
                        images.append(path)
                        n_images += 1
                    else:
                        problems.append(Problem(path, "not an image extension (ignored by the loaders)",
                                                "warning"))
            if n_images == 0:
                problems.append(Problem(str(c), "empty class folder (no image files; ImageFolder refuses it)"))
    return images, problems


def check_tree(root: str | Path, workers: int | None = None) -> tuple[int, list[Problem]]:
    """(number of image files, every problem under ``root`` sorted by path); ``root`` is a split or a
    dataset root."""
    images, problems = scan(root)
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(images) // 64))
    if workers == 1:
        found = [check_image(p) for p in images]
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            found = pool.map(check_image, images, chunksize=64)
    problems += [p for p in found if p is not None]
    return len(images), sorted(problems, key=lambda p: p.path)


def find_bad_files(root: str | Path, workers: int | None = None) -> list[Problem]:
    """Every problem under ``root`` (errors and warnings), sorted by path."""
    return check_tree(root, workers)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="a split (DIR/<class>/...) or a dataset root")
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: all usable cores)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    n_files, problems = 0, []
    for d in args.dirs:
        n, found = check_tree(d, args.workers)
        n_files += n
        problems += found
    for p in problems:
        print(p)
    errors = sum(p.severity == "error" for p in problems)
    print(f"checked {n_files} image files in {time.perf_counter() - t0:.1f} s: {errors} errors, "
          f"{len(problems) - errors} warnings")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
