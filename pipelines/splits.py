"""A split as its loader reads it: listed and checked once, before the loader reads a batch.

Both file loaders (DALI, torchvision) start from :func:`check_split`, and so does the launchers' pre-flight
(``train_ddp.py --check``), without the scan. In order:

1. **Listing**: the ImageFolder tree (torchvision's ``find_classes`` / ``make_dataset``, so order and labels are
   ImageFolder's) or the webdataset shards with their DALI index files; folders, class count, empty classes and
   index headers are checked, and a mistake is a DataError naming the path and the fix.
2. **Content** (pipelines.integrity): a manifest of the split that matches the listing serves its verdicts
   (folder layout), otherwise the ranks scan the files, each its share; rank 0 says what the scan cost and
   how to write the manifest.
3. **Verdicts**: ``on_corrupt=error`` refuses the damaged files in one DamagedFiles error that names them;
   ``skip`` drops them, and rank 0 lists them in one line.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from fdmobilenet.cli import CorruptImageError, DataError
from fdmobilenet.config import DataConfig
from pipelines import integrity, manifest
from pipelines.base import split_dir
from pipelines.imagefolder import list_samples

T = TypeVar("T")
# ILSVRC-2012's official sizes: what pipelines.imagenet checks a built tree against, and synthetic data's
IMAGENET_IMAGES = {"train": 1_281_167, "val": 50_000}
IMAGENET_CLASSES = 1000


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


def empty_classes(classes: list[str], labels: list[int]) -> list[str]:
    """The classes that no label names (their folders hold no image), in class order."""
    counts = [0] * len(classes)
    for label in labels:
        counts[label] += 1
    return [classes[i] for i, n in enumerate(counts) if n == 0]


def check_classes(folder: Path, classes: list[str], labels: list[int], num_classes: int) -> None:
    """Every class folder holds at least one image, and the class count matches data.num_classes."""
    empty = empty_classes(classes, labels)
    if empty:
        raise DataError(f"empty class folder(s) in {folder}: {', '.join(str(folder / c) for c in empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''} ({len(empty)} of {len(classes)}); "
                        f"{_expected(folder)} with extensions {', '.join(IMG_EXTENSIONS)}. Add images or "
                        f"remove the folder (the class indices are the sorted folder names)")
    if len(classes) != num_classes:
        raise DataError(f"{folder} has {len(classes)} class folders but data.num_classes is {num_classes}; "
                        f"set data.num_classes={len(classes)} (labels are indices of the sorted folder names)")


def is_split_file(path: Path) -> bool:
    """A file lying directly in a split (not in a class folder), other than its manifest."""
    return path.is_file() and path.name != manifest.NAME


def split_folders(root: Path) -> list[Path]:
    """``root`` itself when it is a split, else its sub-folders (a dataset root with train/, val/)."""
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir()]
    is_dataset_root = subdirs and all(
        any(c.is_dir() for c in d.iterdir()) and not any(is_split_file(c) for c in d.iterdir()) for d in subdirs)
    return subdirs if is_dataset_root else [root]


def list_folder(data: DataConfig, folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(path, label), ...])`` of an ImageFolder split, in torchvision's order and labelling."""
    check_split_folder(folder)
    classes, samples = list_samples(folder, allow_empty=True)
    check_classes(folder, classes, [label for _, label in samples], data.num_classes)
    return classes, samples


def list_shards(data: DataConfig, folder: Path) -> tuple[list[str], list[str], int, list[integrity.Member]]:
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
    count = len(names) if names is not None else IMAGENET_CLASSES
    return dataclasses.replace(data, num_classes=count), Classes(count, names, where)


# ---------------------------------------------------------------------------------------------- verdicts
class DamagedFiles(CorruptImageError):
    """Damaged image files: which and what is wrong (``found``), and what to do (``fix``); the message is both.
    Raised before the first batch for what the check found, and by the loaders for a file a decoder fails on
    (:meth:`undecodable`). One argument is a whole message: how torch re-raises a DataLoader worker's error."""

    def __init__(self, found: str, fix: str = ""):
        super().__init__(f"{found}; {fix}" if fix else found)
        self.found, self.fix = found, fix

    @classmethod
    def undecodable(cls, path: str, what: str, folder, fix: str = "") -> DamagedFiles:
        """A file of split ``folder`` that a decoder failed on while reading; ``fix``: what to do, when not the
        folder layout's (replace or delete the file, or skip such files)."""
        return cls(f"cannot decode {path} ({what}) while reading {folder}",
                   fix or f"replace or delete it, or set data.on_corrupt=skip; `python -m pipelines.verify "
                          f"{folder}` lists every bad file")


def _refuse(bad: list[tuple[str, str]], where: Path, fix: str) -> None:
    if bad:
        kinds = {kind: [name for name, k in bad if k == kind] for kind in integrity.DAMAGE}
        raise DamagedFiles("; ".join(f"{len(names)} {integrity.DAMAGE[kind]} in {where}: {', '.join(names[:10])}"
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
        print(f"pipelines.splits: data.on_corrupt=skip: dropped {len(names)} unreadable file(s) from {folder}: "
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
            bad, checked.checked, seconds = integrity.shared_scan(members, integrity.member_damage, folder, rank,
                                                                  world_size, group, integrity.SCAN_THREADS)
            checked.how = f"{len(members):,} members checked in {seconds:.1f} s"
            _refuse(bad, folder, "check the packed ImageFolder with `python -m pipelines.verify`, fix it and "
                                 "pack again")
        return checked

    classes, samples = list_folder(data, folder)
    found, why = integrity.matching_manifest(folder, samples, rank, world_size, group)
    checked = CheckedSplit(split, folder, 0, {}, samples)
    skip = data.on_corrupt == "skip"
    fix = "replace or delete them, or set data.on_corrupt=skip"
    if found is not None:
        bad = [(str(folder / relpath), "undecodable") for relpath, _ in found.errors()]
        checked.how = f"the verdicts of {found.path}"
        fix += f"; {found.path} gives each reason (write it again once the files are fixed)"
    elif scan:
        bad, checked.checked, seconds = integrity.shared_scan(
            [(path, path, 0, None) for path, _ in samples],
            integrity.decode_damage if skip else integrity.member_damage, folder, rank, world_size, group,
            max(1, data.num_threads) if skip else integrity.SCAN_THREADS)
        checked.how = (f"{len(samples):,} files {'decoded' if skip else 'checked'} in {seconds:.1f} s"
                       + (f", 1/{world_size} on each rank" if group is not None and world_size > 1 else ""))
        fix += f"; `python -m pipelines.verify {folder}` lists every bad file with the reason"
        if rank == 0:
            print(f"pipelines.splits: {folder}: {checked.how} ({why}); `python -m pipelines.verify {folder} "
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
