"""ImageNet (ILSVRC2012) from its official archives into the ImageFolder tree the trainer reads.

    python -m pipelines.imagenet --archives DIR --out data/imagenet [--verify | --manifest] [--pack DST]
        [--short-side N [--quality Q] [--workers W]]

DIR holds the three files of image-net.org's ILSVRC2012 download page (names and md5 sums from torchvision's
``torchvision.datasets.imagenet.ARCHIVE_META``):

    ILSVRC2012_img_train.tar       a tar of 1,000 per-class tars (n01440764.tar, ...)
    ILSVRC2012_img_val.tar         50,000 images in one flat folder
    ILSVRC2012_devkit_t12.tar.gz   data/meta.mat (the synsets) and data/ILSVRC2012_validation_ground_truth.txt

Output (class index = sorted wnids, as torchvision's ImageFolder and the authors' released weights use):

    OUT/train/<wnid>/*.JPEG    OUT/val/<wnid>/*.JPEG
    OUT/meta.bin               torchvision's summary of the devkit: torchvision.datasets.ImageNet(OUT) reads the tree

Steps, each kept when it is done, so the same command continues after an interruption:

1. Every archive's md5 against torchvision's table (torchvision's calculate_md5; a verified archive is
   remembered in OUT/.imagenet.json by size and mtime, so a rerun does not read 138 GB again).
2. devkit: torchvision's ``parse_devkit_archive`` (scipy.io.loadmat of meta.mat: the 1,000 leaf synsets, and
   each val image's wnid from the ground-truth file) -> OUT/meta.bin.
3. val: torchvision's ``parse_val_archive`` into a staging folder, which becomes OUT/val when complete.
4. train: each class tar is read straight out of the train tar into a staging folder that becomes
   OUT/train/<wnid> when complete; finished classes are skipped on a rerun. torchvision's
   ``parse_train_archive`` is not used here: it first writes all 1,000 class tars (another 138 GB) next to the
   output, and after an interruption it cannot go on (it then hands the already-extracted class folders to
   extract_archive, which refuses a name without a suffix).
   With ``--short-side N`` the images of each staging folder (the val split, one class of train) are stored
   as ``python -m pipelines.resize --short-side N`` stores them (its ``shrink``, in W processes) before the
   folder is renamed into place, so the full-size tree is never written: at most one class (or val) is on
   disk at full size. OUT/.imagenet.json records N and Q; a rerun with other values is refused.
5. The counts, against the official ones (1,281,167 train / 50,000 val images, 1,000 classes): a difference is
   reported. Train and val must have the same classes (or the class indices would differ): an error otherwise.
6. Optionally ``python -m pipelines.verify OUT`` (--verify; with --manifest: ``... OUT --manifest``, which also
   writes OUT/train/.manifest.tsv and OUT/val/.manifest.tsv: training starts then read no image to check it) and
   ``python -m pipelines.pack`` of both splits into DST/train (shuffled, seed 0) and DST/val (--pack DST),
   each run in this process through its ``main``.

Every archive member goes through tarfile's "data" extraction filter, stricter still for absolute names: a
member that would land outside its destination folder (``../``, an absolute path, a link pointing out, a
device file) stops the step with an error naming the archive and the member, and is not written. torchvision
extracts without a filter argument, so for its two steps the filter is installed as tarfile's default
(``TarFile.extraction_filter``) for the duration of the call.

Exit codes: 0 built; 2 what the user must fix - an archive missing, truncated or not the official file, an
output folder this tool did not write, too little disk space, a failed --verify / --pack (one line); 130
interrupted (run the same command again); 1 anything else (a traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import posixpath
import shlex
import shutil
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

from fdmobilenet import cli
from pipelines.imagefolder import list_samples
from pipelines.progress import Progress
from pipelines.resize import Resizer, ResizeError, Summary, write_atomically
from pipelines.splits import IMAGENET_CLASSES, IMAGENET_IMAGES

STATE = ".imagenet.json"     # verified archives; its presence marks OUT as written by this tool
STAGING = ".partial"         # steps in progress; a rerun deletes what is left there and redoes it


class ImageNetError(Exception):
    """An archive or output problem; the message names the file and what to do."""


# ------------------------------------------------------------------------------------ safe extraction
class MemberGuard:
    """Extraction filter: tarfile's ``data_filter`` (nothing outside the destination, no links pointing out or
    to absolute paths, no device files; sane permissions), and absolute member names refused outright (the
    data filter would strip the leading '/' and write them inside). Counts the members it passes."""

    def __init__(self, on_member: Callable[[int], None] | None = None):
        self.count = 0
        self.on_member = on_member

    def __call__(self, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        if member.name.startswith("/") or os.path.isabs(member.name):
            raise tarfile.AbsolutePathError(member)
        member = tarfile.data_filter(member, dest)
        self.count += 1
        if self.on_member is not None:
            self.on_member(self.count)
        return member


@contextlib.contextmanager
def default_extraction_filter(guard: MemberGuard):
    """Make ``guard`` tarfile's default filter while torchvision extracts (its extract_archive passes none)."""
    saved = vars(tarfile.TarFile)["extraction_filter"]
    tarfile.TarFile.extraction_filter = staticmethod(guard)
    try:
        yield
    finally:
        tarfile.TarFile.extraction_filter = saved


@contextlib.contextmanager
def reading(archive: Path, inner: str = ""):
    """Turn what can go wrong while reading ``archive`` into one ImageNetError naming it (and the class tar)."""
    where = f"{archive}" + (f" (member {inner})" if inner else "")
    try:
        yield
    except tarfile.FilterError as e:
        raise ImageNetError(f"{where}: member {e.tarinfo.name!r} refused and not written: {e}. The official "
                            f"archives hold no such member: this file is not the official one") from e
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ImageNetError(f"{where} cannot be read ({type(e).__name__}: {e}): truncated or corrupt; "
                            f"download it again") from e


# --------------------------------------------------------------------------------------------- state
def read_state(out: Path) -> dict:
    path = out / STATE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass   # written atomically, so only a hand edit gets here: verify the archives again
        return {"verified": {}}
    written = [p.name for p in (out / "train", out / "val", out / "meta.bin") if p.exists()]
    if written:
        raise ImageNetError(f"{out} already holds {', '.join(written)} that this tool did not write (no {STATE}); "
                            f"remove them or choose another --out")
    return {"verified": {}}


def write_state(out: Path, state: dict) -> None:
    write_atomically(out / STATE, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())


def size(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def need_space(out: Path, nbytes: int, what: str) -> None:
    """The images take at least their archive members' bytes: refuse to start a step that cannot fit."""
    free = shutil.disk_usage(out).free
    if free < nbytes:
        raise ImageNetError(f"{what} need at least {size(nbytes)} but {out}'s filesystem has {size(free)} free; "
                            f"free space or choose another --out")


# ----------------------------------------------------------------------------------------------- steps
def find_archives(archives: Path) -> dict[str, Path]:
    """{split: absolute path} for train, val and devkit; all missing ones named in one error."""
    from torchvision.datasets.imagenet import ARCHIVE_META
    paths = {split: (archives / name).resolve() for split, (name, _) in ARCHIVE_META.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise ImageNetError(f"{archives}: {', '.join(missing)} not found (the ILSVRC2012 files from "
                            f"image-net.org's download page; --archives names the folder holding all three)")
    return paths


def verify_md5(paths: dict[str, Path], out: Path, state: dict) -> None:
    """Each archive's md5 against torchvision's table; verified ones are remembered by size and mtime."""
    from torchvision.datasets.imagenet import ARCHIVE_META
    from torchvision.datasets.utils import calculate_md5
    for split, path in paths.items():
        md5 = ARCHIVE_META[split][1]
        st = path.stat()
        record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": md5}
        if state["verified"].get(path.name) == record:
            print(f"md5 {path.name}: verified before (same size and mtime)")
            continue
        print(f"md5 {path.name} ({size(st.st_size)}): reading the whole file ...", flush=True)
        t0 = time.monotonic()
        found = calculate_md5(path)
        if found != md5:
            raise ImageNetError(f"{path}: md5 {found} is not the official {md5} ({st.st_size:,} bytes): the "
                                f"download is truncated or corrupt; download it again")
        print(f"md5 {path.name}: ok ({time.monotonic() - t0:.0f} s)")
        state["verified"][path.name] = record
        write_state(out, state)


def parse_devkit(archive: Path, out: Path) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """torchvision's devkit parsing -> OUT/meta.bin; returns (wnid -> class names, wnid of each val image)."""
    from torchvision.datasets.imagenet import META_FILE, load_meta_file, parse_devkit_archive
    if not (out / META_FILE).is_file():
        staging = out / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        with reading(archive), default_extraction_filter(MemberGuard()):
            parse_devkit_archive(str(staging), file=str(archive))
        os.replace(staging / META_FILE, out / META_FILE)
        print(f"devkit: {out / META_FILE}")
    wnid_to_classes, val_wnids = load_meta_file(str(out))
    if not wnid_to_classes or not val_wnids:
        raise ImageNetError(f"{archive}: the devkit lists {len(wnid_to_classes)} classes and {len(val_wnids)} "
                            f"val labels; it is not the ILSVRC2012 devkit")
    return wnid_to_classes, val_wnids


class Shrinking:
    """--short-side: every image of a staging folder replaced by its stored form (pipelines.resize) before the
    folder is renamed into place; ``summary`` counts what was done."""

    def __init__(self, resizer: Resizer):
        self.resizer, self.summary = resizer, Summary()

    def __call__(self, folder: Path, archive: Path) -> None:
        t0 = time.monotonic()
        for done in self.resizer.in_place(folder):
            if done.action == "broken":
                raise ImageNetError(f"{archive}: {Path(done.src).name} does not decode ({done.reason}); the "
                                    f"official archives hold no such image: download the archive again")
            self.summary.add(done)
        self.summary.seconds += time.monotonic() - t0


def stored_as(short_side: Optional[int], quality: int) -> dict:
    """How OUT stores its images, as .imagenet.json records it."""
    return {"short_side": short_side, "quality": quality if short_side else None}


def describe_stored(stored: dict) -> str:
    return (f"with --short-side {stored['short_side']} --quality {stored['quality']}" if stored["short_side"]
            else "at full size (no --short-side)")


def extract_val(archive: Path, out: Path, val_wnids: list[str], shrinking: Optional[Shrinking] = None) -> None:
    """torchvision's val sorting (the i-th file by name gets the i-th ground-truth wnid) into OUT/.partial/val,
    which becomes OUT/val once every image is in its class folder (and, with --short-side, stored resized)."""
    from torchvision.datasets.imagenet import parse_val_archive
    if (out / "val").is_dir():
        print("val: done before")
        return
    staging = out / STAGING / "val"
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    need_space(out, archive.stat().st_size, "the val images")
    progress = Progress("val", len(val_wnids))
    guard = MemberGuard(lambda n: progress.update(n, " images"))
    try:
        with reading(archive), default_extraction_filter(guard):
            parse_val_archive(str(staging.parent), file=str(archive), wnids=val_wnids, folder=staging.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)   # nothing half-done stays behind (a rerun redoes the step)
        raise
    loose = sorted(p.name for p in staging.iterdir() if not p.is_dir())
    if loose or guard.count != len(val_wnids):
        shutil.rmtree(staging)
        raise ImageNetError(f"{archive} holds {guard.count} members but the devkit's ground truth labels "
                            f"{len(val_wnids)} images ({len(loose)} left without a label, e.g. {loose[:3]}): "
                            f"truncated or corrupt, or the archive and the devkit do not belong together")
    if shrinking is not None:
        print(f"val: storing the images with shorter side at most {shrinking.resizer.short_side} ...", flush=True)
        try:
            shrinking(staging, archive)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    os.replace(staging, out / "val")


def class_archives(outer: tarfile.TarFile, archive: Path) -> list[tuple[str, tarfile.TarInfo]]:
    """(wnid, member) for the per-class tars of the train archive; anything else in it is refused."""
    found, size = [], archive.stat().st_size
    for m in outer:
        name = posixpath.normpath(m.name)
        if m.isdir() and name == ".":
            continue
        if not m.isfile() or m.name.startswith("/") or "/" in name or not name.endswith(".tar") or name == ".tar":
            raise ImageNetError(f"{archive}: member {m.name!r} refused and not written: the official train "
                                f"archive holds only per-class tars named <wnid>.tar")
        if m.offset_data + m.size > size:   # tarfile itself would only notice when it gets there
            raise ImageNetError(f"{archive} cannot be read (member {m.name} ends at byte {m.offset_data + m.size:,}, "
                                f"the file has {size:,}): truncated or corrupt; download it again")
        found.append((name[:-len(".tar")], m))
    return found


def extract_train(archive: Path, out: Path, wnids: set[str], shrinking: Optional[Shrinking] = None) -> None:
    """Each class tar straight from the train tar into OUT/.partial/train/<wnid> (with --short-side its images
    then stored resized), then renamed to OUT/train/<wnid>; classes already there are complete (the rename is
    the last step) and skipped."""
    train, staging = out / "train", out / STAGING / "train"
    with reading(archive), tarfile.open(archive, "r:") as outer:
        members = class_archives(outer, archive)
        classes = {w for w, _ in members}
        if classes != wnids:
            raise ImageNetError(f"{archive}: its {len(classes)} classes are not the devkit's {len(wnids)} val "
                                f"classes (only in train: {sorted(classes - wnids)[:5]}, only in val: "
                                f"{sorted(wnids - classes)[:5]}); the class indices would differ")
        todo = [(w, m) for w, m in members if not (train / w).is_dir()]
        print(f"train: {len(members) - len(todo)} of {len(members)} classes done before")
        shutil.rmtree(staging, ignore_errors=True)
        train.mkdir(parents=True, exist_ok=True)
        total = sum(m.size for _, m in todo)
        if shrinking is None:
            need_space(out, total, f"the {len(todo)} train classes left")
        elif todo:   # resized, the images take less than the archive; one class is staged at full size
            need_space(out, max(m.size for _, m in todo), "the largest train class left, staged at full size")
        progress, done = Progress("train", total, size), 0
        for k, (wnid, member) in enumerate(todo, 1):
            dest = staging / wnid
            dest.mkdir(parents=True)
            try:
                with reading(archive, member.name), \
                        tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                    inner.extractall(dest, filter=MemberGuard())
                if shrinking is not None:
                    shrinking(dest, archive)
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)   # no half class stays behind (a rerun redoes it)
                raise
            os.replace(dest, train / wnid)
            done += member.size
            progress.update(done, f", {k} of {len(todo)} classes")


def count_tree(out: Path) -> dict[str, tuple[list[str], int]]:
    """{split: (classes, images)} as torchvision's ImageFolder lists them."""
    counts = {}
    for split in IMAGENET_IMAGES:
        classes, samples = list_samples(out / split)
        counts[split] = (classes, len(samples))
    return counts


def report_counts(counts: dict[str, tuple[list[str], int]]) -> str:
    """One line: the counts, and whether they are the official ones (and what differs if not)."""
    (train_classes, _), (val_classes, _) = counts["train"], counts["val"]
    if train_classes != val_classes:
        raise ImageNetError(f"train has {len(train_classes)} classes, val {len(val_classes)}: they differ, so "
                            f"the class indices would not match")
    line = ", ".join(f"{split} {n:,} images" for split, (_, n) in counts.items()) + f", {len(train_classes):,} classes"
    differs = [f"{split} {n:,} images (official {IMAGENET_IMAGES[split]:,})"
               for split, (_, n) in counts.items() if n != IMAGENET_IMAGES[split]]
    if len(train_classes) != IMAGENET_CLASSES:
        differs.append(f"{len(train_classes):,} classes (official {IMAGENET_CLASSES:,})")
    if differs:
        return f"counts: {line}; differs from the official ILSVRC2012 counts: {'; '.join(differs)}"
    return f"counts: {line}: the official ILSVRC2012 counts"


# ------------------------------------------------------------------------------------------ follow-ons
def run_tool(module: str, argv: list[str]) -> None:
    """``python -m pipelines.<module> ARGV``, run in this process (the line is printed first)."""
    import importlib
    print(f"$ {shlex.join([sys.executable, '-m', f'pipelines.{module}', *argv])}", flush=True)
    try:
        rc = importlib.import_module(f"pipelines.{module}").main(argv)
    except (OSError, ValueError) as e:
        raise ImageNetError(f"pipelines.{module}: {e}") from e
    if rc:
        raise ImageNetError(f"pipelines.{module} {shlex.join(argv)} failed (exit {rc}); see its output above")


def pack_splits(out: Path, dst: Path, shard_size: int) -> None:
    """Both splits into webdataset shards; a split whose classes.json (pack writes it last) exists is done."""
    for split, shuffle in (("train", ["--shuffle", "0"]), ("val", [])):
        if (dst / split / "classes.json").is_file():
            print(f"pack {split}: done before ({dst / split})")
            continue
        run_tool("pack", ["--src", str(out / split), "--dst", str(dst / split), "--shard-size", str(shard_size),
                          "--overwrite", *shuffle])


# ------------------------------------------------------------------------------------------------ main
def build(archives: Path, out: Path, shrinking: Optional[Shrinking] = None) -> str:
    """Steps 1-5; returns the counts line."""
    if not hasattr(tarfile, "data_filter"):
        raise ImageNetError(f"Python {sys.version.split()[0]} has no tarfile extraction filters; use 3.10.12+, "
                            f"3.11.4+ or 3.12+ (they refuse members that would land outside the output)")
    paths = find_archives(archives)
    out.mkdir(parents=True, exist_ok=True)
    state = read_state(out)
    stored = stored_as(shrinking.resizer.short_side if shrinking else None,
                       shrinking.resizer.quality if shrinking else 0)
    before = state.get("stored", stored_as(None, 0))
    if before != stored and any((out / split).exists() for split in IMAGENET_IMAGES):
        raise ImageNetError(f"{out} holds images stored {describe_stored(before)}, and this command asks for "
                            f"them {describe_stored(stored)}: give the same settings to continue, or another --out")
    state["stored"] = stored
    write_state(out, state)   # from here on OUT is marked as this tool's
    verify_md5(paths, out, state)
    wnid_to_classes, val_wnids = parse_devkit(paths["devkit"], out)
    extract_val(paths["val"], out, val_wnids, shrinking)
    extract_train(paths["train"], out, set(val_wnids), shrinking)
    shutil.rmtree(out / STAGING, ignore_errors=True)
    return report_counts(count_tree(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.imagenet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--archives", required=True, type=Path,
                    help="folder with ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz")
    ap.add_argument("--out", default=Path("data/imagenet"), type=Path,
                    help="output root: OUT/train/<wnid>/, OUT/val/<wnid>/ (default data/imagenet, data.root's default)")
    ap.add_argument("--verify", action="store_true", help="then decode every image (python -m pipelines.verify OUT)")
    ap.add_argument("--manifest", action="store_true",
                    help="then python -m pipelines.verify OUT --manifest: the decode of --verify, and each split's "
                         "manifest for the loaders' start-up check (implies --verify)")
    ap.add_argument("--pack", type=Path, metavar="DST",
                    help="then pack DST/train (shuffled, seed 0) and DST/val as webdataset shards")
    ap.add_argument("--shard-size", type=int, default=1000, help="images per shard for --pack (default 1000)")
    ap.add_argument("--short-side", type=int, default=None, metavar="N",
                    help="store every image as `python -m pipelines.resize --short-side N` does: shorter side at most "
                         "N (default: the archives' images as they are)")
    ap.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality for --short-side (default 90)")
    ap.add_argument("--workers", type=int, default=None, metavar="W",
                    help="processes for --short-side (default: all usable cores)")
    args = ap.parse_args(argv)
    try:
        t0 = time.monotonic()
        with contextlib.ExitStack() as stack:
            shrinking = None
            if args.short_side is not None:
                shrinking = Shrinking(stack.enter_context(Resizer(args.short_side, args.quality, args.workers)))
            print(build(args.archives, args.out, shrinking))
        if shrinking is not None:
            print(shrinking.summary.line(f"stored with shorter side at most {args.short_side}"))
        print(f"ImageFolder tree: {args.out}/train, {args.out}/val ({(time.monotonic() - t0) / 60:.1f} min)")
        if args.verify or args.manifest:
            run_tool("verify", [str(args.out), *(["--manifest"] * args.manifest)])
        if args.pack:
            pack_splits(args.out, args.pack, args.shard_size)
        return 0
    except (ImageNetError, ResizeError) as e:
        print(f"pipelines.imagenet: error: {e}", file=sys.stderr)
        return cli.EXIT_USAGE
    except KeyboardInterrupt:
        print("pipelines.imagenet: interrupted; run the same command again to continue (finished steps are kept)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
