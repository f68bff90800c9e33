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
size, mtime, label and verdict, with pipelines.integrity.CHECK_VERSION) from the same pass; a loader that finds
it matching its split uses these verdicts instead of checking the files at every start (pipelines.splits).

``check_tree(root)`` is the library entry point. Files are decoded in threads (PIL releases the GIL; threads
beat fork processes: benchmarks/RESULTS.md, "Start-up data check").
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from fdmobilenet import cli
from pipelines import manifest
from pipelines.imagefolder import list_samples
from pipelines.integrity import Problem, check_file, map_files, write_manifest
from pipelines.splits import empty_classes, is_split_file, split_folders


def scan(root: str | Path) -> tuple[list[str], list[Problem]]:
    """List the image files to decode (the loaders' listing) and the structural problems (no decoding)."""
    root = Path(root)
    if not root.is_dir():
        return [], [Problem(str(root), "not a directory")]
    images, problems = [], []
    for split in split_folders(root):
        for f in sorted(p for p in split.iterdir() if is_split_file(p)):
            problems.append(Problem(str(f), "file outside any class folder (ignored by the loaders)", "warning"))
        try:
            classes, samples = list_samples(split, allow_empty=True)
        except FileNotFoundError:
            problems.append(Problem(str(split), "no class folders (expected SPLIT/<class>/<image files>)"))
            continue
        images += [path for path, _ in samples]
        for c in classes:
            for dirpath, _, files in sorted(os.walk(split / c, followlinks=True)):
                problems += [Problem(os.path.join(dirpath, name), "not an image extension (ignored by the loaders)",
                                     "warning") for name in sorted(files) if not name.lower().endswith(IMG_EXTENSIONS)]
        problems += [Problem(str(split / c), "empty class folder (no image files; ImageFolder refuses it)")
                     for c in empty_classes(classes, [label for _, label in samples])]
    return images, problems


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
