"""Pre-resized copies of an ImageFolder tree: the same files and labels, each image stored no larger than
training needs, so that a decode-bound run decodes fewer pixels per image.

    python -m pipelines.resize SRC DST --short-side N [--quality Q] [--workers W]

SRC is a dataset root (SRC/train, SRC/val) or one split (SRC/<class>/<image>), as for pipelines.verify. DST
gets the same layout: every file the loaders list (torchvision ImageFolder's listing) under the same relative
path, so with the same label, and at the end each split's manifest (pipelines.manifest, the verdicts that
``python -m pipelines.verify DST --manifest`` would write), so that the trainer's check at start reads no image.

One image (:func:`shrink`; ``pipelines.imagenet --short-side`` and ``pipelines.pack --short-side`` run the same
function on their way):

* decoded fully by PIL and made what the loaders see: EXIF orientation applied, CMYK / grayscale / palette /
  alpha converted to RGB (torchvision_loader.upright_rgb, the torchvision loader's own conversion);
* shorter side above N: resized so that it is N, the longer side in proportion (rounded), and saved as a
  baseline JPEG of quality Q with 4:2:0 chroma and no EXIF (its orientation is applied already);
* shorter side N or less: never upscaled. A baseline RGB JPEG that needs no rotation is copied byte for byte;
  anything else (a PNG named .JPEG, CMYK, grayscale, progressive, EXIF-rotated) is saved as above at its own
  size, so that every output is a baseline RGB JPEG that DALI (its hardware decoder included) and PIL decode
  the same way.

The filter is PIL's LANCZOS, a proper low-pass at the 1.2-3x reductions ImageNet's photos need, with
``reducing_gap=3`` (above 6x PIL first averages pixel blocks, so a 4,000 px photo costs little more than a 500 px
one). JPEG DCT scaling (PIL's draft mode) is not used: its result depends on the decoder.

Every output is written to a hidden ``.NAME.partial`` beside it and renamed over NAME when complete, so a
file under its final name is never half-written. A rerun (the same command) takes what is there: files
listed ``ok`` by a manifest that still matches them are kept without reading them, any other existing output
is decoded fully (pipelines.integrity.check_file) and redone unless it passes, missing files are made. DST
records N and Q in ``DST/.resize.json``; a rerun with other values, or a DST this tool did not write, is
refused.

A source file that does not decode is named on one line (stderr), not copied, and the run goes on: a damaged
file among 1.28 M should not cost the hours already spent. At the end the run exits with status 2 and says
to replace or remove those files and run again (done files are kept, so only they are redone); without them
DST has fewer files than SRC, and its manifest lists what DST holds.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from PIL import ExifTags, Image

from fdmobilenet.cli import EXIT_USAGE, UsageError
from pipelines import manifest
from pipelines.imagefolder import list_samples
from pipelines.integrity import check_file, check_image, write_manifest
from pipelines.progress import Progress
from pipelines.splits import split_folders
from pipelines.torchvision_loader import upright_rgb

PARAMS = ".resize.json"      # in DST: the settings it was made with; marks DST as this tool's
FORMAT = 1                   # of shrink's output: raise it when the same input would give other bytes
PARTIAL = ".partial"         # suffix of an output being written (hidden: ".NAME.partial")
# Reading or decoding a source: what PIL and the file system raise for a damaged or unreadable file
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ResizeError(UsageError):
    """The command cannot work as given; the message names the path and what to do."""


# ------------------------------------------------------------------------------------------ one image
def is_plain_jpeg(img: Image.Image) -> bool:
    """A baseline (not progressive) JPEG in RGB that needs no EXIF rotation: the loaders decode it as it is."""
    return (img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
            and img.getexif().get(ExifTags.Base.Orientation, 1) == 1)


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``short_side`` and the aspect kept (the longer side rounded)."""
    scale = short_side / min(width, height)
    return (short_side, max(1, round(height * scale))) if width <= height else \
        (max(1, round(width * scale)), short_side)


def shrink(data: bytes, short_side: int, quality: int = 90) -> tuple[bytes, str]:
    """One image file's bytes as stored in a pre-resized copy: ``(bytes, action)``, action one of 'resized',
    're-encoded' (small enough, but not a plain JPEG) or 'copied' (``data`` itself). What PIL raises for a file
    that does not decode (:data:`DECODE_ERRORS`) passes through."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()                                   # the whole file: a truncated one raises here
        if min(img.size) <= short_side and is_plain_jpeg(img):
            return data, "copied"
        rgb = upright_rgb(img)
    action = "re-encoded"
    if min(rgb.size) > short_side:
        rgb = rgb.resize(target_size(*rgb.size, short_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
        action = "resized"
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality, subsampling="4:2:0", progressive=False, optimize=False)
    return out.getvalue(), action


def broken_reason(path: str, error: BaseException) -> str:
    """Why ``path`` cannot be stored: the full decode's wording (pipelines.integrity.check_image) when it finds
    the fault, else the error itself."""
    problem = check_image(path)
    return problem.reason if problem is not None else f"{type(error).__name__}: {error}"


def write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or what it held before, never a part: written beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}{PARTIAL}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------- many images
@dataclass(frozen=True)
class Task:
    src: str
    out: str
    check_existing: bool = False     # out exists from an earlier run: keep it if it decodes fully


@dataclass(frozen=True)
class Done:
    action: str                      # resized | re-encoded | copied | kept | broken
    src: str
    out: str
    src_bytes: int = 0
    out_bytes: int = 0
    mtime_ns: int = 0
    reason: str = ""                 # broken: why


def convert(task: Task, short_side: int, quality: int) -> Done:
    """One source file into its output (``task.src == task.out``: in place)."""
    if task.check_existing:
        size, mtime_ns, problem = check_file(task.out)
        if problem is None:
            return Done("kept", task.src, task.out, os.path.getsize(task.src), size, mtime_ns)
    try:
        data = Path(task.src).read_bytes()
        image, action = shrink(data, short_side, quality)
    except DECODE_ERRORS as e:
        return Done("broken", task.src, task.out, reason=broken_reason(task.src, e))
    if not (action == "copied" and task.src == task.out):
        write_atomically(Path(task.out), image)
    st = os.stat(task.out)
    return Done(action, task.src, task.out, len(data), st.st_size, st.st_mtime_ns)


_settings: tuple[int, int] = (0, 0)      # (short side, quality) in a worker process


def _init_worker(short_side: int, quality: int) -> None:
    global _settings
    _settings = (short_side, quality)


def _convert_in_worker(task: Task) -> Done:
    return convert(task, *_settings)


class Resizer:
    """:func:`convert` over many files in ``workers`` processes (fork; 1: in this process); one pool for the
    whole run, so a tool that resizes folder after folder (pipelines.imagenet) starts it once."""

    def __init__(self, short_side: int, quality: int = 90, workers: Optional[int] = None):
        check_settings(short_side, quality)
        self.short_side, self.quality = short_side, quality
        self.workers = max(1, workers or len(os.sched_getaffinity(0)))
        self._pool = None

    def __enter__(self) -> "Resizer":
        if self.workers > 1:
            self._pool = mp.get_context("fork").Pool(self.workers, _init_worker, (self.short_side, self.quality))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def run(self, tasks: list[Task]) -> Iterator[Done]:
        """Each task's result, in the order they finish."""
        if self._pool is None:
            return (convert(t, self.short_side, self.quality) for t in tasks)
        chunk = max(1, min(64, len(tasks) // (4 * self.workers)))
        return self._pool.imap_unordered(_convert_in_worker, tasks, chunksize=chunk)

    def in_place(self, folder: Path) -> Iterator[Done]:
        """Every file under ``folder`` replaced by its stored form (pipelines.imagenet's staging folders)."""
        files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
        return self.run([Task(f, f) for f in files])


def check_settings(short_side: int, quality: int) -> None:
    if short_side < 8:
        raise ResizeError(f"--short-side must be at least 8 pixels, got {short_side}")
    if not 1 <= quality <= 100:
        raise ResizeError(f"--quality must be between 1 and 100 (JPEG quality), got {quality}")


# ------------------------------------------------------------------------------------------- the tree
@dataclass
class Summary:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("resized", "re-encoded", "copied", "kept", "broken"), 0))
    src_bytes: int = 0
    out_bytes: int = 0
    broken: list[Done] = field(default_factory=list)
    manifests: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, done: Done) -> None:
        self.counts[done.action] += 1
        self.src_bytes += done.src_bytes
        self.out_bytes += done.out_bytes
        if done.action == "broken":
            self.broken.append(done)

    @property
    def files(self) -> int:
        return sum(self.counts.values())

    def line(self, what: str) -> str:
        seconds = self.seconds
        kinds = ", ".join(f"{n:,} {'kept from an earlier run' if kind == 'kept' else kind}"
                          for kind, n in self.counts.items() if n)
        ratio = f" ({100 * self.out_bytes / self.src_bytes:.0f} %)" if self.src_bytes else ""
        return (f"{what}: {self.files:,} files in {seconds:.1f} s, {self.files / max(seconds, 1e-9):,.0f} files/s "
                f"({kinds}); {mb(self.src_bytes)} -> {mb(self.out_bytes)}{ratio}")


def mb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def claim(dst: Path, params: dict) -> None:
    """DST is new, empty, or was made by this tool with the same settings; then it records them."""
    path = dst / PARAMS
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except json.JSONDecodeError:
            before = None
        if before != params:
            raise ResizeError(f"{dst} was made with {settings(before)}, not {settings(params)}: give the same "
                              f"settings to continue it, or another DST")
        return
    if dst.is_dir() and any(dst.iterdir()):
        raise ResizeError(f"{dst} already holds files that this tool did not write (no {PARAMS}); choose a new "
                          f"or empty DST")
    dst.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (json.dumps(params, sort_keys=True) + "\n").encode())


def settings(params: Optional[dict]) -> str:
    if not isinstance(params, dict) or params.get("format") != FORMAT:
        return f"settings this version cannot continue ({PARAMS}: {params})"
    return f"--short-side {params['short_side']} --quality {params['quality']}"


def trusted(split_dst: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of the outputs that ``split_dst``'s manifest lists as ok."""
    try:
        found = manifest.read(split_dst)
    except ValueError:        # not a complete manifest: trust nothing from it
        return {}
    return found.ok() if found is not None else {}


def plan_split(split_src: Path, split_dst: Path) -> tuple[list[Task], list[Done]]:
    """(tasks, outputs a still-matching manifest lists as ok) for one split; makes DST's class folders."""
    classes, samples = list_samples(split_src, allow_empty=True)
    for c in classes:
        (split_dst / c).mkdir(parents=True, exist_ok=True)
    known = trusted(split_dst)
    prefix = len(str(split_src)) + 1
    tasks, kept = [], []
    for path, _ in samples:
        rel = path[prefix:]
        out = split_dst / rel
        try:
            st = out.stat()
        except FileNotFoundError:
            out.parent.mkdir(parents=True, exist_ok=True)      # a nested folder inside a class
            tasks.append(Task(path, str(out)))
            continue
        if known.get(rel) == (st.st_size, st.st_mtime_ns):
            kept.append(Done("kept", path, str(out), os.path.getsize(path), st.st_size, st.st_mtime_ns))
        else:
            tasks.append(Task(path, str(out), check_existing=True))
    return tasks, kept


def resize_tree(src: str | Path, dst: str | Path, short_side: int, quality: int = 90,
                workers: Optional[int] = None, report=print) -> dict[str, Summary]:
    """Make (or complete) DST from SRC; returns each split's Summary. ``report(line)`` gets each broken source
    file's line as it is found."""
    src, dst = Path(src), Path(dst)
    check_settings(short_side, quality)
    if not src.is_dir():
        raise ResizeError(f"{src}: not a directory (give a dataset root holding train/ and val/, or one split "
                          f"holding <class>/<image> folders)")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise ResizeError(f"DST {dst} and SRC {src} overlap; choose a DST outside SRC")
    splits = split_folders(src)
    if not any(p.is_dir() for p in splits[0].iterdir()):
        raise ResizeError(f"{src} holds no class folders (expected {src}/<class>/<image> or "
                          f"{src}/<split>/<class>/<image>)")
    claim(dst, {"short_side": short_side, "quality": quality, "format": FORMAT})
    summaries = {}
    with Resizer(short_side, quality, workers) as resizer:
        for split in splits:
            split_dst = dst if split == src else dst / split.name
            t0 = time.monotonic()
            tasks, kept = plan_split(split, split_dst)
            summary, checked = Summary(), {}
            progress = Progress(f"resize {split_dst}", len(tasks) + len(kept))
            for done in [*kept, *resizer.run(tasks)]:
                summary.add(done)
                if done.action == "broken":
                    report(f"pipelines.resize: error: {done.src}: {done.reason}; not copied (replace or delete it, "
                           f"then run the same command again)")
                else:
                    checked[done.out] = (done.out_bytes, done.mtime_ns, None)
                progress.update(summary.files, f" files, {summary.files / max(time.monotonic() - t0, 1e-9):,.0f}/s")
            written = write_manifest(split_dst, checked)
            summary.manifests = [written] if written else []
            summary.seconds = time.monotonic() - t0
            summaries[split.name] = summary
    return summaries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.resize", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", metavar="SRC", help="an ImageFolder dataset root (SRC/train, SRC/val) or one split")
    ap.add_argument("dst", metavar="DST", help="where the copy goes (new, or one this tool started)")
    ap.add_argument("--short-side", type=int, required=True, metavar="N",
                    help="images whose shorter side exceeds N are resized to N (aspect kept; never upscaled)")
    ap.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality of what is written (default 90)")
    ap.add_argument("--workers", type=int, default=None, metavar="W", help="processes (default: all usable cores)")
    args = ap.parse_args(argv)
    try:
        summaries = resize_tree(args.src, args.dst, args.short_side, args.quality, args.workers,
                                report=lambda line: print(line, file=sys.stderr, flush=True))
    except (ResizeError, FileNotFoundError) as e:
        print(f"pipelines.resize: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:       # writing DST: a full disk, no permission
        print(f"pipelines.resize: error: {e}; fix it and run the same command again (finished files are kept)",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pipelines.resize: interrupted; run the same command again to continue (finished files are kept)",
              file=sys.stderr)
        return 130
    broken = 0
    for name, summary in summaries.items():
        print(summary.line(f"resize {name}"))
        for m in summary.manifests:
            print(f"manifest: {m}")
        broken += summary.counts["broken"]
    if broken:
        print(f"pipelines.resize: error: {broken} source file(s) could not be decoded and were not copied (named "
              f"above); replace or delete them and run the same command again: only they are redone",
              file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
