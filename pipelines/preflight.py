"""The data pre-flight: one split listed and checked once, before its loader reads a batch.

Both file loaders (DALI, torchvision) start from :func:`check_split`, and so does the launchers' pre-flight
(``train_ddp.py --check``, train_check.py), without the scan. In order:

1. **Listing**: the ImageFolder tree (torchvision's ``find_classes`` / ``make_dataset``, so order and labels are
   ImageFolder's) or the webdataset shards with their DALI index files; folders, class count, empty classes and
   index headers are checked, and a mistake is a DataError naming the path and the fix.
2. **Content**, one of two ways:

   * a manifest of the split (pipelines.manifest, written by ``python -m pipelines.verify ROOT --manifest``)
     that matches the listing - same files, labels, sizes and mtimes: its full-decode verdicts are used and no
     file is read (folder layout);
   * otherwise a scan, split across the ranks: rank r checks the r-th 1/world of the files and the findings
     are combined over ``group`` (the host-side gloo group), so that every rank reaches the same answer. Rank 0
     says what it cost and how to write the manifest. The scan reads each file's first and last bytes
     (:func:`file_damage`) for what DALI's decoders fail on without naming the file - headers they cannot
     parse, content that is no image - and what the GPU decoders decode without any error, grey where the
     data is missing: a truncated JPEG. ``data.on_corrupt=skip`` decodes every file fully instead
     (pipelines.verify.check_image), as it must to drop every undecodable one.

3. **Verdicts**: ``on_corrupt=error`` refuses the damaged files in one CorruptImageError that names them;
   ``skip`` drops them, and rank 0 lists them in one line.

Everything parallel here runs in threads: this runs inside the training process, where a fork copies locks
that DALI's and torch's threads hold, and the child can wait on them forever.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from fdmobilenet.cli import CorruptImageError, DataError
from fdmobilenet.config import DataConfig
from pipelines import manifest
from pipelines.base import shard_bounds, split_dir
from pipelines.imagefolder import list_samples
from pipelines.verify import CHECK_VERSION, JPEG_EOI, JPEG_SOI, check_image, map_files

T = TypeVar("T")
Member = tuple[str, str, int, "int | None"]   # (name for messages, file, byte offset, size or None = whole file)
TAIL_BYTES = 64          # room for the zero padding some writers put after the end-of-image marker
HEADER_BYTES = 1 << 16   # JPEG headers (tables, frame, EXIF) nearly always fit; longer ones are read whole
SCAN_THREADS = 16        # the scan waits on reads (a network file system most): more threads than cores
# frame headers (SOF0-15): C4 (DHT), C8 (reserved) and CC (DAC) share the range but are not frames
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
DAMAGE = {"empty": "empty file(s) (0 bytes)", "truncated": "truncated JPEG(s)",
          "headers": "JPEG(s) whose headers cannot be parsed", "not an image": "file(s) that are not an image",
          "undecodable": "undecodable file(s)", "unreadable": "unreadable file(s) (cannot be opened or read)"}


@dataclass
class CheckedSplit:
    """A split as its loader reads it: listed, and its files checked (see the module docstring)."""
    name: str                   # 'train' | 'val'
    folder: Path
    total: int                  # samples per epoch (on_corrupt=skip: what is left after dropping)
    reader: dict                # DALI reader input: files + labels (folder) or tars + indices (webdataset)
    samples: list[tuple[str, int]] = field(default_factory=list)   # (path, label): folder layout only
    checked: int = 0            # files this process read to check them (0: a manifest's verdicts served)
    how: str = ""               # how the content was checked, one phrase for logs and the pre-flight


# ---------------------------------------------------------------------------------------------- listing
def _expected(folder: Path) -> str:
    return f"expected {folder}/<class>/<image>.jpg (one sub-folder per class, as torchvision ImageFolder)"


def check_split_folder(folder: Path) -> None:
    """The split folder exists and holds class sub-folders; errors say what was expected and what to do."""
    if not folder.is_dir():
        hint = ("the data root does not exist" if not folder.parent.is_dir()
                else f"it holds {sorted(p.name for p in folder.parent.iterdir())[:10]}")
        raise DataError(f"data folder {folder} not found ({hint}); {_expected(folder)}. Set data.root / "
                        f"data.train_split / data.val_split, or make a small demo set with "
                        f"`python -m pipelines.demo_data`")
    if not any(p.is_dir() for p in folder.iterdir()):
        raise DataError(f"data folder {folder} has no class sub-folders; {_expected(folder)}")


def check_classes(folder: Path, classes: list[str], labels: list[int], num_classes: int) -> None:
    """Every class folder holds at least one image, and the class count matches data.num_classes."""
    counts = [0] * len(classes)
    for label in labels:
        counts[label] += 1
    empty = [classes[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"empty class folder(s) in {folder}: {', '.join(str(folder / c) for c in empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''} ({len(empty)} of {len(classes)}); "
                        f"{_expected(folder)} with extensions {', '.join(IMG_EXTENSIONS)}. Add images or "
                        f"remove the folder (the class indices are the sorted folder names)")
    if len(classes) != num_classes:
        raise DataError(f"{folder} has {len(classes)} class folders but data.num_classes is {num_classes}; "
                        f"set data.num_classes={len(classes)} (labels are indices of the sorted folder names)")


def list_folder(data: DataConfig, folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(path, label), ...])`` of an ImageFolder split, in torchvision's order and labelling."""
    check_split_folder(folder)
    classes, samples = list_samples(folder, allow_empty=True)
    check_classes(folder, classes, [label for _, label in samples], data.num_classes)
    return classes, samples


def list_shards(data: DataConfig, folder: Path) -> tuple[list[str], list[str], int, list[Member]]:
    """``(tars, index files, samples, jpg members)`` of a split written by ``python -m pipelines.pack``; a
    member is named ``TAR:OFFSET:KEY.jpg`` as DALI names it."""
    made_by = (f"expected {folder}/<prefix>-NNNNNN.tar each with its DALI index <prefix>-NNNNNN.idx, made by "
               f"`python -m pipelines.pack --src <ImageFolder split> --dst {folder}`")
    tars = sorted(folder.glob("*.tar")) if folder.is_dir() else []
    if not tars:
        raise DataError(f"no webdataset shards in {folder} ({'missing folder' if not folder.is_dir() else 'no .tar'}"
                        f"); {made_by}, or set data.layout=folder")
    total, indices, members = 0, [], []
    for tar in tars:
        idx = tar.with_suffix(".idx")
        if not idx.is_file():
            raise DataError(f"{tar} has no index file {idx}; {made_by} (or DALI's `wds2idx {tar} {idx}`)")
        lines = idx.read_text().splitlines()
        header = lines[0].split() if lines else []
        if len(header) != 2 or header[0] != "v1.2" or not header[1].isdigit():
            raise DataError(f"{idx}: first line is {' '.join(header)!r}, expected 'v1.2 <samples>'; {made_by}")
        total += int(header[1])
        indices.append(str(idx))
        members += [(f"{tar}:{offset}:{name}", str(tar), int(offset), int(size))
                    for line in lines[1:] for ext, offset, size, name in zip(*[iter(line.split())] * 4)
                    if ext == "jpg"]
    classes_file = folder / "classes.json"
    if classes_file.is_file():
        n_classes = len(json.loads(classes_file.read_text()))
        if n_classes != data.num_classes:
            raise DataError(f"{classes_file} lists {n_classes} classes but data.num_classes is "
                            f"{data.num_classes}; set data.num_classes={n_classes}")
    return [str(t) for t in tars], indices, total, members


@dataclass
class Classes:
    """A run's classes: their names in label order (None where the data names none) and where the count
    comes from, for the trainer's header ('10 classes (class folders in data/x/train)')."""
    count: int
    names: Optional[list[str]]
    source: str

    def __str__(self) -> str:
        return f"{self.count} classes ({self.source})"


def resolve_classes(data: DataConfig, split: str = "train") -> tuple[DataConfig, Classes]:
    """``data`` with ``num_classes: auto`` replaced by the number of classes of ``split`` (a run's labels are
    its train split's), and the classes: the sorted class folders (folder layout, labelled as ImageFolder
    labels them), the classes.json that pipelines.pack writes beside the shards, or ImageNet's 1000 for
    synthetic data. A configured number passes through; the listing checks it against the folders later."""
    folder = split_dir(data, split)
    if data.loader == "synthetic":
        names, where = None, "synthetic data: ImageNet's"
    elif data.layout == "webdataset":
        listed = folder / "classes.json"
        names = json.loads(listed.read_text()) if listed.is_file() else None
        where = str(listed)
    else:
        check_split_folder(folder)
        names, where = list(find_classes(str(folder))[0]), f"class folders in {folder}"
    if data.num_classes != "auto":
        return data, Classes(data.num_classes, names, "data.num_classes")
    if names is None and data.loader != "synthetic":
        raise DataError(f"data.num_classes=auto counts the classes in {where}, which does not exist; set "
                        f"data.num_classes to the number of classes of the shards")
    count = len(names) if names is not None else 1000
    return dataclasses.replace(data, num_classes=count), Classes(count, names, where)


# ------------------------------------------------------------------------------------------- one file
def _decodes(data: bytes, headers_only: bool = False) -> bool:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:   # open() parses every marker up to the scan data
            if not headers_only:
                im.load()
        return True
    except Exception:    # any failure to decode is the answer, whatever PIL calls it
        return False


def jpeg_headers(data: bytes) -> Optional[bool]:
    """Whether the marker segments after a JPEG's start-of-image chain up to a start-of-scan, with a frame
    header before it: what a decoder parses before the first pixel; None when ``data`` ends before the scan.
    Walks the segments' length fields only: PIL's header parse alone costs about twice the whole check per
    file (benchmarks/RESULTS.md, "Start-up data check")."""
    i, frame = 2, False
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:               # fill bytes before a marker
            i += 1
            continue
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD9:   # stuffing, TEM, RSTn, SOI, EOI: not headers
            return False
        if marker == 0xDA:
            return frame
        frame |= marker in SOF_MARKERS
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return False
        i += 2 + length
    return None


def file_damage(path: str, offset: int = 0, size: Optional[int] = None) -> Optional[str]:
    """What is wrong with an image (``size`` bytes at ``offset`` of ``path``; the whole file by default) as far
    as its first and last bytes tell: None, or a key of DAMAGE. A JPEG must have parsable headers
    (:func:`jpeg_headers`) and end with its end-of-image marker - when the marker is missing a full decode
    decides (trailing data is rare); other content must be an image PIL identifies (PNG, ...). Damage inside
    the compressed data is left to the decoders, which name the file."""
    with open(path, "rb") as f:
        if size is None:
            size = os.fstat(f.fileno()).st_size
        if size == 0:
            return "empty"
        f.seek(offset)
        head = f.read(min(size, HEADER_BYTES))
        if not head.startswith(JPEG_SOI):
            if _decodes(head, headers_only=True):
                return None
            f.seek(offset)
            return None if len(head) < size and _decodes(f.read(size), headers_only=True) else "not an image"
        headers = jpeg_headers(head)
        if headers is None and len(head) < size:     # headers longer than the first piece: read it all
            f.seek(offset)
            headers = jpeg_headers(f.read(size))
        if headers is None:
            return "truncated"                       # the data ends inside the headers
        if not headers:
            return "headers"
        f.seek(offset + max(2, size - TAIL_BYTES))
        if f.read(min(TAIL_BYTES, size - 2)).rstrip(b"\x00\r\n\t ").endswith(JPEG_EOI):
            return None
        f.seek(offset)                  # no marker at the end: decode it to be sure (rare: trailing data)
        return None if _decodes(f.read(size)) else "truncated"


def _member_damage(item: Member) -> Optional[str]:
    try:
        return file_damage(*item[1:])
    except OSError:          # gone since the listing, no permission, an I/O error
        return "unreadable"


def _decode_damage(item: Member) -> Optional[str]:
    """on_corrupt=skip's check: a full decode; only errors count (a PNG named .jpg decodes)."""
    problem = check_image(item[1])
    return "undecodable" if problem is not None and problem.severity == "error" else None


# ---------------------------------------------------------------------------------------- the ranks
def _my_share(n: int, rank: int, world_size: int, group) -> tuple[int, int]:
    """[begin, end) of the ``n`` items this process checks: its 1/world share when the ranks combine their
    findings over ``group``, else all of them."""
    return shard_bounds(n, rank, world_size) if group is not None else (0, n)


def _stat(path: str) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except OSError:
        return None


def _combined(obj: Any, world_size: int, group) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``group``: the gloo group; None: this process only)."""
    if group is None or world_size == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def _scan(items: list[Member], damage, where: Path, rank: int, world_size: int, group, threads: int
          ) -> tuple[list[tuple[str, str]], int, float]:
    """(name, damage) of every damaged item, found by every rank checking its share; (that list, items this
    process checked, seconds)."""
    begin, end = _my_share(len(items), rank, world_size, group)
    start = time.perf_counter()
    found = map_files(damage, items[begin:end], threads, chunk=512)
    mine = [(item[0], d) for item, d in zip(items[begin:end], found) if d is not None]
    combined = _combined((len(items), mine), world_size, group)
    if len({n for n, _ in combined}) > 1:
        raise DataError(f"the ranks list different numbers of files in {where} "
                        f"({', '.join(str(n) for n, _ in combined)}): do they all see the same data.root?")
    return sorted(b for _, bad in combined for b in bad), end - begin, time.perf_counter() - start


def _manifest(folder: Path, samples: list[tuple[str, int]], rank: int, world_size: int, group
              ) -> tuple[Optional[manifest.Manifest], str]:
    """The split's manifest when it matches the listing on every rank (each rank stats its share of the
    files), else None and why not."""
    try:
        found = manifest.read(folder)
    except ValueError as e:
        found, why = None, str(e)
    else:
        why = f"no manifest {folder / manifest.NAME}" if found is None else ""
    if found is not None and found.check_version != CHECK_VERSION:
        why = (f"{found.path} holds the verdicts of check version {found.check_version}, this is "
               f"{CHECK_VERSION}; write it again")
    elif found is not None:
        begin, end = _my_share(len(samples), rank, world_size, group)
        stats = map_files(_stat, [path for path, _ in samples[begin:end]], SCAN_THREADS, chunk=512)
        diff = found.mismatch(str(folder), samples, stats, begin)
        why = f"{found.path} does not match the folder: {diff}; write it again" if diff else ""
    whys = [w for w in _combined(why, world_size, group) if w]
    return (found, "") if not whys else (None, whys[0])


# ---------------------------------------------------------------------------------------------- verdicts
class DamagedFiles(CorruptImageError):
    """The damaged files the pre-flight found in one or more splits (``found``) and what to do (``fix``)."""

    def __init__(self, found: str, fix: str):
        super().__init__(f"{found}; {fix}")
        self.found, self.fix = found, fix


def _refuse(bad: list[tuple[str, str]], where: Path, fix: str) -> None:
    if bad:
        kinds = {kind: [name for name, k in bad if k == kind] for kind in DAMAGE}
        raise DamagedFiles("; ".join(f"{len(names)} {DAMAGE[kind]} in {where}: {', '.join(names[:10])}"
                                     f"{' ...' if len(names) > 10 else ''}" for kind, names in kinds.items()
                                     if names), fix)


def each_split(splits: Sequence[str], check: Callable[[str], T]) -> list[T]:
    """``[check(split) for split in splits]``, with the damaged files of every split reported together in one
    DamagedFiles (a start reports the train split's along with the val split's, not on the next start).
    Every rank gets the same verdicts (the scan combines them), so every rank runs every check."""
    done, damaged = [], []
    for split in splits:
        try:
            done.append(check(split))
        except DamagedFiles as e:
            damaged.append(e)
    if damaged:
        fixes = dict.fromkeys(part for e in damaged for part in e.fix.split("; "))   # each advice once, in order
        raise DamagedFiles("; ".join(e.found for e in damaged), "; ".join(fixes))
    return done


def _drop(samples: list[tuple[str, int]], bad: list[tuple[str, str]], folder: Path,
          rank: int) -> list[tuple[str, int]]:
    """``samples`` without the ``bad`` files; rank 0 says which, in one line (every rank drops the same)."""
    dropped = {name for name, _ in bad}
    if dropped and rank == 0:
        names = sorted(dropped)
        print(f"pipelines.preflight: data.on_corrupt=skip: dropped {len(names)} unreadable file(s) from {folder}: "
              f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}", file=sys.stderr, flush=True)
    return [s for s in samples if s[0] not in dropped]


def check_split(data: DataConfig, split: str, *, rank: int = 0, world_size: int = 1, group=None,
                scan: bool = True) -> CheckedSplit:
    """List and check ``split`` ('train' | 'val') of ``data`` (see the module docstring). ``group``: the process
    group over which the ``world_size`` ranks share the work (every rank must call this at the same point);
    None: this process checks every file itself. ``scan=False``: listing and manifest only (the launcher's
    pre-flight; without a usable manifest the files are left to the ranks)."""
    folder = split_dir(data, split)
    if data.layout == "webdataset":
        if data.on_corrupt == "skip":
            raise DataError("data.on_corrupt=skip works for data.layout=folder only: the shards cannot be "
                            "filtered while reading; run `python -m pipelines.verify` on the ImageFolder and "
                            "pack again without the bad files")
        tars, indices, total, members = list_shards(data, folder)
        checked = CheckedSplit(split, folder, total, dict(tars=tars, indices=indices),
                               how="shards: the ranks check their members at start")
        if scan:
            bad, checked.checked, seconds = _scan(members, _member_damage, folder, rank, world_size, group,
                                                  SCAN_THREADS)
            checked.how = f"{len(members):,} members checked in {seconds:.1f} s"
            _refuse(bad, folder, "check the packed ImageFolder with `python -m pipelines.verify`, fix it and "
                                 "pack again")
        return checked

    classes, samples = list_folder(data, folder)
    found, why = _manifest(folder, samples, rank, world_size, group)
    checked = CheckedSplit(split, folder, 0, {}, samples)
    skip = data.on_corrupt == "skip"
    fix = "replace or delete them, or set data.on_corrupt=skip"
    if found is not None:
        bad = [(str(folder / relpath), "undecodable") for relpath, _ in found.errors()]
        checked.how = f"the verdicts of {found.path}"
        fix += f"; {found.path} gives each reason (write it again once the files are fixed)"
    elif scan:
        bad, checked.checked, seconds = _scan([(path, path, 0, None) for path, _ in samples],
                                              _decode_damage if skip else _member_damage, folder, rank,
                                              world_size, group, max(1, data.num_threads) if skip else SCAN_THREADS)
        checked.how = (f"{len(samples):,} files {'decoded' if skip else 'checked'} in {seconds:.1f} s"
                       + (f", 1/{world_size} on each rank" if group is not None and world_size > 1 else ""))
        fix += f"; `python -m pipelines.verify {folder}` lists every bad file with the reason"
        if rank == 0:
            print(f"pipelines.preflight: {folder}: {checked.how} ({why}); `python -m pipelines.verify {folder} "
                  f"--manifest` writes the manifest once, and later starts compare only sizes and mtimes",
                  file=sys.stderr, flush=True)
    else:
        bad, checked.how = [], f"{why}: the ranks check the files at start, each its share"
    if skip:
        checked.samples = _drop(samples, bad, folder, rank)
        check_classes(folder, classes, [label for _, label in checked.samples], data.num_classes)
    else:
        _refuse(bad, folder, fix)
    checked.total = len(checked.samples)
    checked.reader = dict(files=[p for p, _ in checked.samples], labels=[label for _, label in checked.samples])
    return checked
