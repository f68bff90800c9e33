"""Find the files in an ImageFolder tree that would stop (or silently change) training, before training.

    python -m pipelines.verify DIR [DIR ...] [--workers N] [--manifest]

DIR is one split (DIR/<class>/<image>) or a dataset root whose sub-folders are splits (DIR/train, DIR/val).
Every image is fully decoded with PIL (not just its header), so truncated and corrupt files are found.

Exit codes: 0 no errors; 1 errors found; 2 a mistake in the command (a DIR that is not a directory, a
manifest that cannot be written: one line).

Errors (exit status 1): empty (0-byte) files, unreadable files, files that are not a decodable image,
truncated/corrupt image data, empty class folders (torchvision's ImageFolder refuses them), a split with no
class folders. Warnings (listed, exit 0): images that decode but are not JPEG (e.g. a PNG named .jpg - DALI
and PIL decode it by content, but it is not what a .jpg promises), files the loaders skip because their
extension is not an image extension, and files lying directly in a split (not in a class folder).

``--manifest`` also writes each split's manifest (pipelines.manifest: every listed image's relative path,
size, mtime, label and verdict, with CHECK_VERSION) from the same pass; a loader that finds it matching its
split uses these verdicts instead of checking the files at every start (pipelines.preflight).

``find_bad_files(root)`` is the library entry point. Files are checked in threads, by the command as by the
library: PIL decodes with the GIL released, and threads were faster than fork processes here (medians of two
runs, benchmarks/RESULTS.md, "Start-up data check"). Inside a training process a fork would not even be safe:
it copies locks that other threads (DALI's, torch's) hold, and the child can wait on them forever.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from fdmobilenet import cli
from pipelines import manifest
from pipelines.imagefolder import list_samples

# Every JPEG file starts with the start-of-image marker and (unless cut short) ends with the end-of-image one.
JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
# The version of check_image's verdicts that a manifest records: raise it when check_image finds other files
# than before, so that manifests written by the older check are not trusted.
CHECK_VERSION = 1

T, R = TypeVar("T"), TypeVar("R")


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
            head = f.read(len(JPEG_SOI))
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
    if head != JPEG_SOI:
        return Problem(path, f"not a JPEG: the content is {fmt} (decodes, but the name/format differ)", "warning")
    return None


def check_file(path: str) -> tuple[int, int, Problem | None]:
    """(size, mtime_ns, :func:`check_image`'s verdict). The stat comes first, so a file changed while or after
    it is decoded has another mtime than its manifest line and no longer matches it."""
    try:
        st = os.stat(path)
    except OSError as e:
        return -1, -1, Problem(path, f"unreadable: {e}")
    return st.st_size, st.st_mtime_ns, check_image(path)


def map_files(fn: Callable[[T], R], items: list[T], workers: int, chunk: int = 64) -> list[R]:
    """``[fn(x) for x in items]`` in ``workers`` threads, ``chunk`` items per task."""
    workers = max(1, min(workers, -(-len(items) // chunk)))
    if workers == 1:
        return [fn(x) for x in items]
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [r for part in pool.map(lambda c: [fn(x) for x in c], chunks) for r in part]


def _is_split_file(path: Path) -> bool:
    return path.is_file() and path.name != manifest.NAME


def split_folders(root: Path) -> list[Path]:
    """``root`` itself when it is a split, else its sub-folders (a dataset root with train/, val/)."""
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir()]
    is_dataset_root = subdirs and all(
        any(c.is_dir() for c in d.iterdir()) and not any(_is_split_file(c) for c in d.iterdir()) for d in subdirs)
    return subdirs if is_dataset_root else [root]


def scan(root: str | Path) -> tuple[list[str], list[Problem]]:
    """List the image files to decode and the structural problems (no decoding)."""
    root = Path(root)
    if not root.is_dir():
        return [], [Problem(str(root), "not a directory")]
    images, problems = [], []
    for split in split_folders(root):
        classes = [d for d in sorted(split.iterdir()) if d.is_dir()]
        if not classes:
            problems.append(Problem(str(split), "no class folders (expected SPLIT/<class>/<image files>)"))
        for f in sorted(p for p in split.iterdir() if _is_split_file(p)):
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


def write_manifest(split: Path, checked: dict[str, tuple[int, int, Problem | None]]) -> Path | None:
    """The manifest of ``split`` in its loader's listing order, from ``checked`` (path -> check_file's
    result); None for a split without class folders (reported as an error already)."""
    try:
        _, samples = list_samples(split, allow_empty=True)
    except FileNotFoundError:
        return None
    prefix = len(str(split)) + 1
    entries = []
    for path, label in samples:
        size, mtime_ns, problem = checked[path] if path in checked else check_file(path)
        entries.append((path[prefix:], size, mtime_ns, label, problem.severity if problem else "ok",
                        problem.reason if problem else ""))
    return manifest.write(split, entries, CHECK_VERSION)


def check_tree(root: str | Path, workers: int | None = None,
               write_manifests: bool = False) -> tuple[int, list[Problem], list[Path]]:
    """(number of image files, every problem under ``root`` sorted by path, the manifests written);
    ``root`` is a split or a dataset root. ``write_manifests``: one per split, from the same decode."""
    images, problems = scan(root)
    results = map_files(check_file, images, workers or len(os.sched_getaffinity(0)))
    problems += [problem for _, _, problem in results if problem is not None]
    written = []
    if write_manifests and Path(root).is_dir():
        checked = dict(zip(images, results))
        written = [m for m in (write_manifest(split, checked) for split in split_folders(Path(root))) if m]
    return len(images), sorted(problems, key=lambda p: p.path), written


def find_bad_files(root: str | Path, workers: int | None = None) -> list[Problem]:
    """Every problem under ``root`` (errors and warnings), sorted by path."""
    return check_tree(root, workers)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="a split (DIR/<class>/...) or a dataset root")
    ap.add_argument("--workers", type=int, default=None, help="decode threads (default: all usable cores)")
    ap.add_argument("--manifest", action="store_true",
                    help=f"also write each split's {manifest.NAME} (path, size, mtime, label, verdict) for the "
                         f"loaders' start-up check")
    args = ap.parse_args(argv)
    not_dirs = [d for d in args.dirs if not Path(d).is_dir()]
    if not_dirs:
        print(f"pipelines.verify: error: {', '.join(not_dirs)}: not a directory (give an ImageFolder split "
              f"DIR/<class>/<image> or a dataset root holding such splits, e.g. DIR/train, DIR/val)", file=sys.stderr)
        return cli.EXIT_USAGE
    t0 = time.perf_counter()
    n_files, problems, written = 0, [], []
    for d in args.dirs:
        try:
            n, found, manifests = check_tree(d, args.workers, write_manifests=args.manifest)
        except (OSError, ValueError) as e:   # a manifest that cannot be written: the message names the file
            print(f"pipelines.verify: error: {e}", file=sys.stderr)
            return cli.EXIT_USAGE
        n_files += n
        problems += found
        written += manifests
    for p in problems:
        print(p)
    for m in written:
        print(f"manifest: {m}")
    errors = sum(p.severity == "error" for p in problems)
    print(f"checked {n_files} image files in {time.perf_counter() - t0:.1f} s: {errors} errors, "
          f"{len(problems) - errors} warnings")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
