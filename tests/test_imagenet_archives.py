"""pipelines.imagenet on archives in exactly the official ILSVRC2012 layout, made here from real photos
(scikit-image's): ILSVRC2012_img_train.tar of per-class tars (n02124075.tar, ...), a flat
ILSVRC2012_img_val.tar (ILSVRC2012_val_00000001.JPEG, ...) and ILSVRC2012_devkit_t12.tar.gz holding a real
data/meta.mat (written by scipy.io.savemat in the synsets structure of the official file, leaves and a parent)
and data/ILSVRC2012_validation_ground_truth.txt. The devkit's ILSVRC2012_IDs are deliberately not in sorted
wnid order, as in the official devkit, so a val image filed by ID instead of by wnid would get a wrong label.

md5: these archives are not the official files, so torchvision's md5 table is replaced by the fixtures' own
md5 sums (``use_fixture_md5``) wherever a test needs the build to pass; the check itself still runs (a
truncated fixture fails it). One test keeps the official sums and sees the fixtures refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from torchvision.datasets import ImageFolder, ImageNet
from torchvision.datasets import imagenet as tv_imagenet

from conftest import make_image_folder
from pipelines.imagenet import main

REPO = Path(__file__).resolve().parents[1]
# ILSVRC2012_ID, WNID, words, num_children, children: three leaves and one parent (not a class), IDs in the
# devkit's own order (espresso first), as the official meta.mat's 1,000 leaves + 860 parents.
SYNSETS = [(1, "n07920052", "espresso", 0, []), (2, "n02124075", "Egyptian cat", 0, []),
           (3, "n03773504", "missile", 0, []), (4, "n00021939", "artifact, artefact", 2, [1, 3])]
PHOTO = {"n02124075": 1, "n07920052": 2, "n03773504": 3}   # index into conftest.PHOTOS: chelsea, coffee, rocket
TRAIN_COUNTS = {"n02124075": 4, "n03773504": 3, "n07920052": 2}
VAL_IDS = [3, 2, 2, 1, 3, 2]          # ground truth of ILSVRC2012_val_00000001..6.JPEG
WNIDS = sorted(TRAIN_COUNTS)           # ImageFolder's class indices
ID_TO_WNID = {i: w for i, w, _, n, _ in SYNSETS if n == 0}
NAMES = {split: name for split, (name, _) in tv_imagenet.ARCHIVE_META.items()}


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, list[bytes]]:
    """JPEG bytes per wnid, crops of its photo: the train images first, then enough for val."""
    root = tmp_path_factory.mktemp("crops")
    need = {w: TRAIN_COUNTS[w] + sum(ID_TO_WNID[i] == w for i in VAL_IDS) for w in WNIDS}
    counts = [0] * 4
    for w, n in need.items():
        counts[PHOTO[w]] = n
    make_image_folder(root, counts, seed=7)
    return {w: [p.read_bytes() for p in sorted((root / f"c{PHOTO[w]:02d}").iterdir())] for w in WNIDS}


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", *, symlink_to: str | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 1_300_000_000
    if symlink_to is not None:
        info.type, info.linkname = tarfile.SYMTYPE, symlink_to
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))


def meta_mat() -> bytes:
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.empty((len(SYNSETS), 1), dtype=[(f, "O") for f in fields])
    for k, (i, wnid, words, n_children, children) in enumerate(SYNSETS):
        synsets[k, 0] = (i, wnid, words, f"gloss of {words}", n_children, np.array(children, dtype=np.uint16),
                         1 if n_children else 0, TRAIN_COUNTS.get(wnid, 0))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def make_archives(d: Path, photos: dict[str, list[bytes]], poison: tuple[str, dict] | None = None) -> dict:
    """The three archives in ``d``; ``poison = (where, add() kwargs)`` adds one member to the n02124075 class
    tar ('train'), the val tar ('val'), the devkit ('devkit') or the train tar itself ('train-outer').
    Returns {'files': {split: path}, 'train': {wnid: {name: bytes}}, 'val': {name: (wnid, bytes)}}."""
    d.mkdir(parents=True, exist_ok=True)
    extra = poison[1] if poison else None
    train = {w: {f"{w}_{k + 1}.JPEG": photos[w][k] for k in range(n)} for w, n in TRAIN_COUNTS.items()}
    with tarfile.open(d / NAMES["train"], "w") as outer:
        for wnid, files in train.items():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for name, data in files.items():
                    add(inner, name, data)
                if poison and poison[0] == "train" and wnid == "n02124075":
                    add(inner, **extra)
            add(outer, f"{wnid}.tar", buf.getvalue())
        if poison and poison[0] == "train-outer":
            add(outer, **extra)
    next_photo = {w: TRAIN_COUNTS[w] for w in WNIDS}
    val = {}
    with tarfile.open(d / NAMES["val"], "w") as tar:
        for k, i in enumerate(VAL_IDS, 1):
            wnid = ID_TO_WNID[i]
            val[f"ILSVRC2012_val_{k:08d}.JPEG"] = (wnid, photos[wnid][next_photo[wnid]])
            next_photo[wnid] += 1
            add(tar, f"ILSVRC2012_val_{k:08d}.JPEG", val[f"ILSVRC2012_val_{k:08d}.JPEG"][1])
        if poison and poison[0] == "val":
            add(tar, **extra)
    with tarfile.open(d / NAMES["devkit"], "w:gz") as tar:
        add(tar, "ILSVRC2012_devkit_t12/COPYING", b"devkit terms\n")
        add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta_mat())
        add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
            "".join(f"{i}\n" for i in VAL_IDS).encode())
        if poison and poison[0] == "devkit":
            add(tar, **extra)
    return {"files": {s: d / n for s, n in NAMES.items()}, "train": train, "val": val}


def fixture_md5(files: dict[str, Path]) -> dict[str, tuple[str, str]]:
    return {s: (p.name, hashlib.md5(p.read_bytes()).hexdigest()) for s, p in files.items()}


@pytest.fixture
def use_fixture_md5(monkeypatch):
    """Replace torchvision's official md5 sums by those of the given fixture archives (the check still runs)."""
    def use(files: dict[str, Path]) -> None:
        for split, entry in fixture_md5(files).items():
            monkeypatch.setitem(tv_imagenet.ARCHIVE_META, split, entry)
    return use


# The command as a user runs it (its errors: no md5 replacement needed).
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.imagenet", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expected_tree(made: dict) -> dict[str, bytes]:
    tree = {f"train/{w}/{name}": data for w, files in made["train"].items() for name, data in files.items()}
    tree.update({f"val/{w}/{name}": data for name, (w, data) in made["val"].items()})
    return tree


COUNTS_LINE = ("counts: train 9 images, val 6 images, 3 classes; differs from the official ILSVRC2012 counts: "
               "train 9 images (official 1,281,167); val 6 images (official 50,000); 3 classes (official 1,000)")


# ---------------------------------------------------------------------------------------------- tests
def test_official_layout_becomes_the_imagefolder_tree_with_the_right_labels(tmp_path, photos, use_fixture_md5,
                                                                          capsys):
    made = make_archives(tmp_path / "archives", photos)
    use_fixture_md5(made["files"])
    out = tmp_path / "out"
    assert main(["--archives", str(tmp_path / "archives"), "--out", str(out)]) == 0
    log = capsys.readouterr().out

    images = {k: v for k, v in files_under(out).items() if k.startswith(("train/", "val/"))}
    assert images == expected_tree(made)                         # every image, byte for byte, in its folder
    assert sorted(p.name for p in out.iterdir()) == [".imagenet.json", "meta.bin", "train", "val"]
    for split in ("train", "val"):                               # class index = sorted wnids (not devkit IDs)
        ds = ImageFolder(str(out / split))
        assert ds.classes == WNIDS
        for path, label in ds.samples:
            name = Path(path).name
            wnid = made["val"][name][0] if split == "val" else name.split("_")[0]
            assert label == WNIDS.index(wnid), path
    val = ImageFolder(str(out / "val"))
    by_name = sorted(val.samples, key=lambda s: Path(s[0]).name)               # val_00000001, ...
    assert [WNIDS[y] for _, y in by_name] == [ID_TO_WNID[i] for i in VAL_IDS]
    tv = ImageNet(str(out), split="val")                          # torchvision's own ImageNet reads the tree
    assert tv.wnids == WNIDS and tv.classes == [("Egyptian cat",), ("missile",), ("espresso",)]
    assert COUNTS_LINE in log.splitlines()
    assert "val: 6 / 6 images (" in log and ", 3 of 3 classes (" in log    # progress: the last line always shown

    assert main(["--archives", str(tmp_path / "archives"), "--out", str(out)]) == 0    # complete: all kept
    again = capsys.readouterr().out
    assert again.count("verified before (same size and mtime)") == 3
    assert "val: done before" in again and "train: 3 of 3 classes done before" in again
    assert COUNTS_LINE in again.splitlines()
    assert {k: v for k, v in files_under(out).items() if k.startswith(("train/", "val/"))} == expected_tree(made)


def test_resumes_after_an_interruption(tmp_path, photos, use_fixture_md5, monkeypatch, capsys):
    """Ctrl-C in the middle of the second class tar (a KeyboardInterrupt raised from tarfile's data filter,
    i.e. between two members): the first class stays, the half class is not left in train/; what a kill -9
    would leave in the staging folder is cleared by the rerun, which skips the md5 reads and the done steps."""
    made = make_archives(tmp_path / "archives", photos)
    use_fixture_md5(made["files"])
    out, argv = tmp_path / "out", ["--archives", str(tmp_path / "archives"), "--out", str(tmp_path / "out")]
    real_filter, seen = tarfile.data_filter, []

    def interrupt_in_second_class(member, dest):
        if "/train/" in str(dest):
            seen.append(dest)
            if len(set(seen)) == 2 and seen.count(dest) == 2:
                raise KeyboardInterrupt
        return real_filter(member, dest)

    monkeypatch.setattr(tarfile, "data_filter", interrupt_in_second_class)
    assert main(argv) == 130
    assert "interrupted; run the same command again" in capsys.readouterr().err
    monkeypatch.setattr(tarfile, "data_filter", real_filter)
    first = WNIDS[0]
    assert sorted(p.name for p in (out / "train").iterdir()) == [first]
    inode = (out / "train" / first / f"{first}_1.JPEG").stat().st_ino
    stale = out / ".partial" / "train" / WNIDS[1] / "left-by-kill-9.JPEG"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")

    assert main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("verified before") == 3 and "val: done before" in log
    assert "train: 1 of 3 classes done before" in log
    assert (out / "train" / first / f"{first}_1.JPEG").stat().st_ino == inode   # not extracted again
    assert not (out / ".partial").exists()
    assert {k: v for k, v in files_under(out).items() if k.startswith(("train/", "val/"))} == expected_tree(made)


def test_goes_on_to_verify_and_pack(tmp_path, photos, use_fixture_md5, capfd):
    made = make_archives(tmp_path / "archives", photos)
    use_fixture_md5(made["files"])
    assert main(["--archives", str(tmp_path / "archives"), "--out", str(tmp_path / "out"), "--verify",
                 "--pack", str(tmp_path / "wds"), "--shard-size", "4"]) == 0
    log = capfd.readouterr().out
    assert COUNTS_LINE in log.splitlines()
    assert f"$ {sys.executable} -m pipelines.verify {tmp_path / 'out'}" in log
    assert "checked 15 image files" in log and ": 0 errors" in log
    assert "packed 9 samples, 3 classes into 3 shards" in log and "packed 6 samples, 3 classes into 2" in log
    for split in ("train", "val"):
        assert json.loads((tmp_path / "wds" / split / "classes.json").read_text()) == WNIDS


def test_manifest_goes_to_verify_and_the_loaders_use_it(tmp_path, photos, use_fixture_md5, capfd):
    """``--manifest`` runs ``python -m pipelines.verify OUT --manifest``: one manifest per split, a line per
    image in the loader's order with its label, and the data pre-flight of both splits uses them (reads no
    image)."""
    from fdmobilenet.config import DataConfig
    from pipelines.manifest import NAME
    from pipelines.splits import check_split
    made = make_archives(tmp_path / "archives", photos)
    use_fixture_md5(made["files"])
    out = tmp_path / "out"
    rc = main(["--archives", str(tmp_path / "archives"), "--out", str(out), "--manifest"])
    log, err = capfd.readouterr()
    assert rc == 0, log + err
    assert f"$ {sys.executable} -m pipelines.verify {out} --manifest" in log
    assert f"manifest: {out / 'train' / NAME}" in log and f"manifest: {out / 'val' / NAME}" in log
    assert "checked 15 image files" in log and ": 0 errors" in log
    for split, n in (("train", 9), ("val", 6)):
        lines = (out / split / NAME).read_text().splitlines()
        ds = ImageFolder(str(out / split))
        assert [line.split("\t")[0] for line in lines[1:]] == [str(Path(p).relative_to(out / split)) for p, _ in ds.samples]
        assert [int(line.split("\t")[3]) for line in lines[1:]] == ds.targets and len(ds.targets) == n
        assert {line.split("\t")[4] for line in lines[1:]} == {"ok"}
        checked = check_split(DataConfig(root=str(out), num_classes=3), split)
        assert checked.checked == 0 and checked.how == f"the verdicts of {out / split / NAME}"


def test_short_side_stores_what_resize_stores(tmp_path, photos, use_fixture_md5, capsys):
    """--short-side 96 (the crops are 64-160 px: some resized, some copied): the tree is byte for byte what
    ``python -m pipelines.resize`` makes of the full-size tree; a rerun with another size is refused."""
    from pipelines.resize import resize_tree
    made = make_archives(tmp_path / "archives", photos)
    use_fixture_md5(made["files"])
    argv = ["--archives", str(tmp_path / "archives"), "--out", str(tmp_path / "small")]
    assert main([*argv, "--short-side", "96", "--workers", "2"]) == 0
    log = capsys.readouterr().out
    assert COUNTS_LINE in log.splitlines() and "stored with shorter side at most 96: 15 files in " in log
    assert main(["--archives", str(tmp_path / "archives"), "--out", str(tmp_path / "full")]) == 0
    resize_tree(tmp_path / "full", tmp_path / "resized", 96, workers=1)
    small = {k: v for k, v in files_under(tmp_path / "small").items() if k.startswith(("train/", "val/"))}
    resized = {k: v for k, v in files_under(tmp_path / "resized").items()
               if k.startswith(("train/", "val/")) and not k.endswith(".manifest.tsv")}
    assert small == resized and small != expected_tree(made)
    capsys.readouterr()
    assert main([*argv, "--short-side", "128"]) == 2
    assert (f"{tmp_path / 'small'} holds images stored with --short-side 96 --quality 90, and this command asks "
            f"for them with --short-side 128 --quality 90" in capsys.readouterr().err)


def test_missing_archives_are_named_in_one_error(tmp_path, photos):
    made = make_archives(tmp_path / "archives", photos)
    made["files"]["val"].unlink()
    made["files"]["devkit"].unlink()
    p = cli("--archives", str(tmp_path / "archives"), "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"pipelines.imagenet: error: {tmp_path / 'archives'}: ILSVRC2012_img_val.tar, "
                                f"ILSVRC2012_devkit_t12.tar.gz not found (the ILSVRC2012 files from image-net.org's "
                                f"download page; --archives names the folder holding all three)")
    assert not (tmp_path / "out").exists()


def test_official_md5_sums_refuse_other_files(tmp_path, photos):
    """No md5 replaced: the fixture train tar is not the official file, and nothing is extracted."""
    make_archives(tmp_path / "archives", photos)
    p = cli("--archives", str(tmp_path / "archives"), "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    official = tv_imagenet.ARCHIVE_META["train"][1]
    assert f"{tmp_path / 'archives' / NAMES['train']}: md5 " in p.stderr
    assert f"is not the official {official}" in p.stderr and "truncated or corrupt; download it again" in p.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".imagenet.json"]


@pytest.mark.parametrize("split", ["train", "val", "devkit"])
def test_truncated_archive_is_named(tmp_path, photos, use_fixture_md5, capsys, split):
    """Cut to 60 %: the md5 check names the file; with the md5 of the cut file itself (as if the check were not
    there) reading it fails, and the error names it too."""
    made = make_archives(tmp_path / "archives", photos)
    use_fixture_md5(made["files"])
    path = made["files"][split]
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * 0.6)])
    argv = ["--archives", str(tmp_path / "archives"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path}: md5 " in err and "truncated or corrupt; download it again" in err
    use_fixture_md5(made["files"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pipelines.imagenet: error: {path}") and "truncated or corrupt" in err, err
    assert not (tmp_path / "out" / split).exists()


OUTSIDE = "outside.JPEG"


@pytest.mark.parametrize("where", ["train", "val", "devkit", "train-outer"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_members_that_would_land_outside_are_refused_and_not_written(tmp_path, photos, use_fixture_md5, capsys,
                                                                     monkeypatch, where, kind):
    """A member named with enough ../ to reach tmp_path (the output's parent), one with tmp_path's absolute
    path, or a symlink pointing there, in a class tar, the val tar, the devkit or the train tar itself."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))   # torchvision unpacks the devkit there
    (tmp_path / "tmp").mkdir()
    # destination depth below tmp_path: out/.partial/train/<wnid>, out/.partial/val, tmp/<mkdtemp>, out/.partial/train
    up = {"train": 4, "val": 3, "devkit": 2, "train-outer": 3}[where] * "../"
    name = OUTSIDE if where != "train-outer" else "n09999999.tar"
    member = {"dotdot": {"name": up + name, "data": b"x"},
              "absolute": {"name": str(tmp_path / name), "data": b"x"},
              "symlink": {"name": "n09999999.tar" if where == "train-outer" else "link.JPEG",
                          "symlink_to": up + name}}[kind]
    made = make_archives(tmp_path / "archives", photos, poison=(where, member))
    use_fixture_md5(made["files"])
    assert main(["--archives", str(tmp_path / "archives"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    archive = made["files"]["devkit" if where == "devkit" else "val" if where == "val" else "train"]
    assert err.startswith(f"pipelines.imagenet: error: {archive}") and "Traceback" not in err, err
    assert f"member {member['name']!r} refused and not written" in err, err
    assert not any(p.name in (OUTSIDE, "link.JPEG", "n09999999.tar") or p.is_symlink()
                   for p in tmp_path.rglob("*") if "archives" not in p.parts), sorted(tmp_path.rglob("*"))
    assert not (tmp_path / "out" / ("val" if where == "val" else "train") / "n02124075").exists()


def test_an_output_folder_this_tool_did_not_write_is_left_alone(tmp_path, photos, use_fixture_md5, capsys):
    made = make_archives(tmp_path / "archives", photos)
    use_fixture_md5(made["files"])
    (tmp_path / "out" / "train" / "mine").mkdir(parents=True)
    assert main(["--archives", str(tmp_path / "archives"), "--out", str(tmp_path / "out")]) == 2
    assert (f"{tmp_path / 'out'} already holds train that this tool did not write (no .imagenet.json)"
            in capsys.readouterr().err)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train"]
