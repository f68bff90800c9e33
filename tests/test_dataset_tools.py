"""Dataset tools on real data: the sklearn digits set, skimage photo set, webdataset packing, verification."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.demo_data import build_digits
from pipelines.imagefolder import MARKER, build_once, list_samples
from pipelines.integrity import CHECK_VERSION
from pipelines.manifest import NAME
from pipelines.pack import pack
from pipelines.photo_set import build_photo_set
from pipelines.verify import check_tree, main as verify_main


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    assert build_digits(root) is True
    return root


def test_digits_build_complete_stratified_and_idempotent(digits):
    classes, train = list_samples(digits / "train")
    _, val = list_samples(digits / "val")
    assert classes == [str(c) for c in range(10)]
    assert len(train) + len(val) == 1797
    val_counts = np.bincount([y for _, y in val], minlength=10)
    all_counts = val_counts + np.bincount([y for _, y in train], minlength=10)
    assert np.all(np.abs(val_counts - 0.2 * all_counts) <= 1)          # stratified: 20 % of every class
    assert Image.open(train[0][0]).size == (64, 64) and Image.open(train[0][0]).mode == "RGB"
    assert build_digits(digits) is False                                # complete: skipped
    assert json.loads((digits / MARKER).read_text())["size"] == 64


def test_digits_are_real_labelled_images(digits):
    """A linear classifier on the decoded JPEGs (shrunk back to the scans' own 8x8) generalises: images and
    labels are real and aligned (measured 0.95; with shuffled labels it gets ~0.06)."""
    from sklearn.linear_model import LogisticRegression

    def load(split):
        _, samples = list_samples(digits / split)
        small = [Image.open(p).convert("L").resize((8, 8), Image.Resampling.BOX) for p, _ in samples]
        x = np.stack([np.asarray(im, dtype=np.float32).ravel() / 255 for im in small])
        return x, np.array([y for _, y in samples])

    (xt, yt), (xv, yv) = load("train"), load("val")
    accuracy = LogisticRegression(max_iter=1000).fit(xt, yt).score(xv, yv)
    assert accuracy > 0.85, accuracy


def test_build_once_never_deletes_a_tree_it_did_not_create(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "keep.jpg").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        build_once(tmp_path, {"x": 1}, lambda r: None)
    assert (tmp_path / "train" / "a" / "keep.jpg").exists()


def test_photo_set_has_requested_sizes_and_photo_like_entropy(tmp_path):
    root = tmp_path / "photos"
    assert build_photo_set(root, num_train=24, num_val=8, num_classes=4, size=(200, 150), quality=90,
                           workers=2) is True
    classes, train = list_samples(root / "train")
    _, val = list_samples(root / "val")
    assert classes == [f"class{c:04d}" for c in range(4)]
    assert len(train) == 24 and len(val) == 8
    assert np.bincount([y for _, y in train]).tolist() == [6, 6, 6, 6]
    sizes = {Image.open(p).size for p, _ in train + val}
    assert sizes == {(200, 150)}
    assert len({Path(p).read_bytes() for p, _ in train}) == 24          # every view differs
    # Not noise: a JPEG of uniform noise at the same size and quality is several times larger.
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="JPEG", quality=90)
    photo_bytes = np.mean([Path(p).stat().st_size for p, _ in train])
    assert photo_bytes < 0.4 * buf.tell(), (photo_bytes, buf.tell())


def test_pack_round_trip_matches_imagefolder_and_dali_reads_it(digits, tmp_path):
    classes, samples = list_samples(digits / "val")
    dst = tmp_path / "wds" / "val"
    summary = pack(digits / "val", dst, shard_size=100, workers=2)
    tars = sorted(dst.glob("val-*.tar"))
    assert [t.name for t in tars] == [f"val-{n:06d}.tar" for n in range(4)]      # 359 samples / 100
    assert summary["samples"] == len(samples) and summary["not_jpeg"] == []
    assert json.loads((dst / "classes.json").read_text()) == classes

    packed = []
    for t in tars:
        with tarfile.open(t) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            assert names[0::2] == [n.replace(".cls", ".jpg") for n in names[1::2]]
            for jpg, cls in zip(members[0::2], members[1::2]):
                packed.append((jpg.name, tar.extractfile(jpg).read(), int(tar.extractfile(cls).read())))
        assert t.with_suffix(".idx").read_text().splitlines()[0] == f"v1.2 {len(members) // 2}"
    assert [name for name, _, _ in packed] == [f"{i:08d}.jpg" for i in range(len(samples))]
    assert [(data, label) for _, data, label in packed] == [(Path(p).read_bytes(), y) for p, y in samples]

    # DALI's own webdataset reader accepts the shards + indices and yields the same labels in order.
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(samples), num_threads=1, device_id=None)
    def read():
        _, cls = fn.readers.webdataset(paths=[str(t) for t in tars],
                                       index_paths=[str(t.with_suffix(".idx")) for t in tars],
                                       ext=["jpg", "cls"], random_shuffle=False)
        return cls

    pipe = read()
    pipe.build()
    (cls,) = pipe.run()
    assert [int(bytes(np.array(c)).decode()) for c in cls] == [y for _, y in samples]


def test_pack_shuffle_mixes_classes_and_keeps_names_and_labels(digits, tmp_path):
    """--shuffle: one seeded order across all shards (DALI shuffles only whole shards + a buffer), every key still
    the sample's ImageFolder position with its own bytes and label; the same seed gives the same shards."""
    _, samples = list_samples(digits / "train")

    def read(dst):
        out = []
        for t in sorted(dst.glob("train-*.tar")):
            with tarfile.open(t) as tar:
                members = tar.getmembers()
                for jpg, cls in zip(members[0::2], members[1::2]):
                    out.append((int(jpg.name[:8]), tar.extractfile(jpg).read(), int(tar.extractfile(cls).read())))
        return out

    pack(digits / "train", tmp_path / "a", shard_size=200, workers=1, shuffle_seed=0)
    pack(digits / "train", tmp_path / "b", shard_size=200, workers=1, shuffle_seed=0)
    packed = read(tmp_path / "a")
    assert packed == read(tmp_path / "b")
    assert sorted(k for k, _, _ in packed) == list(range(len(samples)))           # a permutation of all samples
    assert [k for k, _, _ in packed] != list(range(len(samples)))
    for key, data, label in packed[:50]:
        assert (data, label) == (Path(samples[key][0]).read_bytes(), samples[key][1])
    first_shard_labels = {label for _, _, label in packed[:200]}
    assert len(first_shard_labels) == 10                                           # ImageFolder order: 1-2 classes


def test_pack_index_is_byte_identical_to_dalis_wds2idx(digits, tmp_path):
    """pack writes the .idx itself (GPU images lack wds2idx); DALI's own indexer must agree byte for byte."""
    index_creator = pytest.importorskip("wds2idx", reason="DALI's wds2idx module is not installed here; "
                                        "the DALI reader test above still checks the index").IndexCreator
    pack(digits / "train", tmp_path, shard_size=500, workers=1)
    tars = sorted(tmp_path.glob("train-*.tar"))
    assert len(tars) == 3
    for t in tars:
        reference = tmp_path / f"{t.stem}.reference"
        with index_creator(str(t), str(reference), verbose=False) as creator:
            creator.create_index()
        assert t.with_suffix(".idx").read_bytes() == reference.read_bytes(), t


def test_pack_refuses_to_mix_with_existing_shards(digits, tmp_path):
    pack(digits / "val", tmp_path, shard_size=400, workers=1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        pack(digits / "val", tmp_path, shard_size=400, workers=1)


def test_verify_lists_each_planted_problem(digits, tmp_path, capsys):
    split = tmp_path / "train"
    shutil.copytree(digits / "train", split)
    good = sorted((split / "3").glob("*.jpg"))
    data = good[0].read_bytes()
    (split / "3" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (split / "3" / "zero.jpg").write_bytes(b"")
    (split / "3" / "text.jpg").write_text("not an image\n")
    (split / "3" / "notes.txt").write_text("a note\n")
    Image.open(good[1]).save(split / "4" / "png_named.jpg", format="PNG")
    (split / "empty_class").mkdir()

    found = {(Path(p.path).relative_to(split).as_posix(), p.severity): p.reason for p in check_tree(split)[1]}
    assert set(found) == {("3/truncated.jpg", "error"), ("3/zero.jpg", "error"), ("3/text.jpg", "error"),
                          ("empty_class", "error"),
                          ("4/png_named.jpg", "warning"),    # DALI/PIL decode it; it is just not a JPEG
                          ("3/notes.txt", "warning")}        # loaders skip non-image extensions
    assert "truncated" in found[("3/truncated.jpg", "error")]
    assert "0 bytes" in found[("3/zero.jpg", "error")]
    assert "not an image" in found[("3/text.jpg", "error")]
    assert "PNG" in found[("4/png_named.jpg", "warning")]

    assert verify_main([str(tmp_path)]) == 1                            # dataset root: finds the split
    out = capsys.readouterr().out
    assert f"{split / '3' / 'zero.jpg'}: empty file" in out
    assert "4 errors, 2 warnings" in out
    assert verify_main([str(digits)]) == 0                              # the clean digits set
    assert "0 errors, 0 warnings" in capsys.readouterr().out


def test_verify_manifest_records_every_listed_file_and_its_verdict(digits, tmp_path, capsys):
    """``--manifest``: one line per file of the loader's listing (torchvision ImageFolder's order and labels)
    with its size, mtime and the full decode's verdict, under a header naming the check's version; written
    atomically, and a file name it cannot record leaves the previous manifest as it was."""
    split = tmp_path / "train"
    shutil.copytree(digits / "train", split)
    good = sorted((split / "3").glob("*.jpg"))
    data = good[0].read_bytes()
    (split / "3" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.open(good[1]).save(split / "4" / "png_named.jpg", format="PNG")
    assert verify_main([str(split), "--manifest"]) == 1
    assert f"manifest: {split / NAME}" in capsys.readouterr().out
    lines = (split / NAME).read_text().splitlines()
    _, samples = list_samples(split)
    assert json.loads(lines[0]) == {"manifest": 1, "check_version": CHECK_VERSION, "files": len(samples)}
    rows = [line.split("\t") for line in lines[1:]]
    assert [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows] == [
        (str(Path(p).relative_to(split)), os.stat(p).st_size, os.stat(p).st_mtime_ns, label) for p, label in samples]
    assert {r[0]: r[4] for r in rows if r[4] != "ok"} == {"3/truncated.jpg": "error", "4/png_named.jpg": "warning"}
    assert "truncated image data" in next(r[5] for r in rows if r[0] == "3/truncated.jpg")
    before = (split / NAME).read_bytes()
    (split / "5" / "tab\tname.jpg").write_bytes(good[2].read_bytes())
    assert verify_main([str(split), "--manifest"]) == 2      # a file name to change: one line, exit 2
    assert "tab or line break in the file name cannot be recorded" in capsys.readouterr().err
    assert (split / NAME).read_bytes() == before and not (split / (NAME + ".tmp")).exists()


def test_pipeline_throughput_benchmark_runs_both_loaders(tmp_path):
    """The benchmark script end to end at toy size (real DALI CPU pipeline and DataLoader workers); it
    checks the report's shape, never a speed."""
    import subprocess
    import sys

    build_photo_set(tmp_path / "photos", num_train=40, num_val=0, num_classes=4, size=(200, 150), workers=1)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline_throughput.py"
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu", "--threads", "1",
                    "--data", str(tmp_path / "photos"), "--json", str(out)], check=True, timeout=120)
    report = json.loads(out.read_text())
    assert [(r["loader"], r["threads_or_workers"], len(r["rounds"])) for r in report["results"]] == \
        [("torchvision", 1, 3), ("dali", 1, 3)]
    assert all(x > 0 for r in report["results"] for x in r["rounds"])
    assert report["results"][0]["ratio_to_torchvision"] == 1.0
    assert {"versions", "git_commit", "command", "cores"} <= set(report["environment"])
