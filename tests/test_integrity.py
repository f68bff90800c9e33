"""The check of a split's files at start (pipelines.splits.check_split, pipelines.integrity) and the manifests
it reads (pipelines.verify --manifest), on real photo JPEGs: a matching manifest replaces the scan, one that
does not match is not trusted, the ranks share the scan over a real gloo group under torchrun, the launcher's
pre-flight reports a damaged file once before torchrun starts, and nothing in the training process forks."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loader_support
from launch_support import LAUNCH, REPO, build_digits, env, run, run_words
from fdmobilenet.cli import CorruptImageError
from pipelines import build_loader
from pipelines.manifest import NAME
from pipelines.splits import check_split
from pipelines.verify import main as verify_main

small = loader_support.small


@pytest.fixture()
def photos(photo_root, tmp_path) -> Path:
    root = tmp_path / "photos"
    shutil.copytree(photo_root, root)
    return root


def test_a_matching_manifest_replaces_the_scan(photos, capsys):
    assert verify_main([str(photos), "--manifest"]) == 0
    assert (photos / "train" / NAME).is_file() and (photos / "val" / NAME).is_file()
    data = small(photos, 3, loader="dali")
    checked = check_split(data, "train")
    assert (checked.checked, checked.total) == (0, 11) and checked.how == f"the verdicts of {photos / 'train' / NAME}"
    assert "pipelines.splits" not in capsys.readouterr().err        # nothing to say: nothing was read
    assert verify_main([str(photos)]) == 0                              # the manifests are no stray files
    assert "0 errors, 0 warnings" in capsys.readouterr().out


@pytest.mark.parametrize("change", ["touched", "added", "check version", "garbled"])
def test_a_manifest_that_does_not_match_is_not_trusted(photos, capsys, change):
    """Any difference between the manifest and the folder: the files are scanned instead, and the message
    says why and how to write the manifest again."""
    assert verify_main([str(photos / "train"), "--manifest"]) == 0
    capsys.readouterr()
    victim = sorted((photos / "train" / "c01").iterdir())[2]
    manifest = photos / "train" / NAME
    if change == "touched":                     # rewritten since: same size, another mtime
        os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 1))
        why = f"{manifest} does not match the folder: {victim} differs"
    elif change == "added":
        shutil.copy(victim, victim.with_name("new.jpg"))
        why = f"{manifest} does not match the folder: it lists 11 files, the folder holds 12"
    elif change == "check version":
        manifest.write_text(manifest.read_text().replace('"check_version": 1', '"check_version": 0', 1))
        why = f"{manifest} holds the verdicts of check version 0, this is 1; write it again"
    else:
        manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:-2]))   # lines lost
        why = f"{manifest} is not a complete manifest of format 1"
    checked = check_split(small(photos, 3, loader="dali"), "train")
    assert checked.checked == checked.total == 11 + (change == "added")
    err = capsys.readouterr().err
    assert why in err and f"`python -m pipelines.verify {photos / 'train'} --manifest` writes the manifest once" in err


def test_manifest_verdicts_refuse_or_drop_without_reading_the_files(photos, capsys):
    """The manifest holds the full decode's verdicts, which see more than the start-up scan: a PNG cut in
    half under a .jpg name (its header parses; only the decode fails) is refused before any batch when the
    manifest says so, or dropped with on_corrupt=skip."""
    from PIL import Image
    victim = photos / "train" / "c00" / "half_png.jpg"
    Image.open(sorted((photos / "train" / "c00").iterdir())[0]).save(victim, format="PNG")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    data = small(photos, 3, loader="dali")
    assert check_split(data, "train").checked == 12                     # the scan lets it through
    assert verify_main([str(photos), "--manifest"]) == 1                # the decode does not
    with pytest.raises(CorruptImageError) as e:
        build_loader(data, "train", 2, device=torch.device("cpu"))
    assert str(e.value) == (f"1 undecodable file(s) in {photos / 'train'}: {victim}; replace or delete them, or "
                            f"set data.on_corrupt=skip; {photos / 'train' / NAME} gives each reason (write it "
                            f"again once the files are fixed)")
    checked = check_split(small(photos, 3, loader="dali", on_corrupt="skip"), "train")
    assert f"dropped 1 unreadable file(s) from {photos / 'train'}: {victim}\n" in capsys.readouterr().err
    assert checked.checked == 0 and checked.total == 11 and str(victim) not in checked.reader["files"]


def test_on_corrupt_skip_decodes_in_threads_without_forking(photos, monkeypatch):
    """The training process never forks for the data check (a fork there copied locks of DALI's and torch's
    threads and the child waited forever): with fork made to fail, on_corrupt=skip's full decode still runs,
    in data.num_threads threads, and drops the truncated file."""
    victim = sorted((photos / "train" / "c02").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:300])

    def no_fork():
        raise AssertionError("the check at start forked")
    monkeypatch.setattr(os, "fork", no_fork)
    checked = check_split(small(photos, 3, loader="dali", on_corrupt="skip", num_threads=2), "train")
    assert checked.total == 10 and checked.checked == 11


SHARED_CHECK = """
import sys, torch.distributed as dist
from fdmobilenet.cli import CorruptImageError
from fdmobilenet.config import DataConfig
from pipelines.splits import check_split
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
try:
    checked = check_split(DataConfig(root=sys.argv[1], num_classes=3), "train", rank=rank, world_size=world,
                          group=dist.group.WORLD)
    print(f"rank {rank}: checked {checked.checked} of {checked.total}", flush=True)
except CorruptImageError as e:
    print(f"rank {rank}: {e}", flush=True)
dist.destroy_process_group()
"""


def test_two_ranks_share_the_scan_and_agree(photos, tmp_path):
    """torchrun, 2 ranks, gloo: each rank reads its half of the 11 files, and a truncated file in rank 1's
    half is refused by both ranks alike; rank 0 alone prints the cost and the manifest advice. With a matching
    manifest neither rank reads a file."""
    worker = tmp_path / "worker.py"
    worker.write_text(SHARED_CHECK)

    def torchrun() -> str:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(worker), str(photos)], cwd=REPO, env=env(OMP_NUM_THREADS="1"), capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout + p.stderr

    out = torchrun()
    assert "rank 0: checked 5 of 11" in out and "rank 1: checked 6 of 11" in out
    assert out.count("pipelines.splits: ") == 1 and "11 files checked in " in out and "1/2 on each rank" in out
    victim = sorted((photos / "train").rglob("*.jpg"))[-1]              # the last file: rank 1's share
    victim.write_bytes(victim.read_bytes()[:-500])
    out = torchrun()
    refused = f"1 truncated JPEG(s) in {photos / 'train'}: {victim}; replace or delete them"
    assert f"rank 0: {refused}" in out and f"rank 1: {refused}" in out
    victim.unlink()
    assert verify_main([str(photos), "--manifest"]) == 0
    out = torchrun()
    assert "rank 0: checked 0 of 10" in out and "rank 1: checked 0 of 10" in out and "pipelines.splits: " not in out


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return build_digits(tmp_path_factory.mktemp("digits"))


def preflight(root: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train_ddp.py"), "--check", "--world-size", "2",
                           *run_words(root, out, "run")], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=120)


def test_launcher_preflight_reads_the_manifest_and_reports_a_damaged_file_once(digits, tmp_path):
    """`train_ddp.py --check` lists both splits and checks their manifests, reading no image: without a
    manifest it says the ranks will check the files; with one it applies its verdicts, so a damaged file stops
    the launcher once (exit 2, one line), before torchrun starts - MAX_RESTARTS=3 restarts nothing."""
    root = tmp_path / "digits"
    shutil.copytree(digits, root)
    p = preflight(root, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (f"train 1,438 images, no manifest {root / 'train' / NAME}: the ranks check the files at start, each "
            f"its share; val 359 images, no manifest") in p.stdout
    victim = sorted((root / "val" / "4").iterdir())[0]
    victim.write_bytes(os.urandom(victim.stat().st_size))
    assert verify_main([str(root), "--manifest"]) == 1
    p = preflight(root, tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stdout + p.stderr
    line = f"train_ddp.py: 1 undecodable file(s) in {root / 'val'}: {victim}; replace or delete them"
    assert [x for x in p.stderr.splitlines() if x.startswith("train_ddp.py: ")][0].startswith(line)
    rc, text = run([str(LAUNCH / "local.sh"), *run_words(root, tmp_path, "run")], tmp_path / "launch.log",
                   timeout=120, MAX_RESTARTS="3", NPROC_PER_NODE="2")
    assert rc == 2 and text.count(line) == 1 and "torch.distributed" not in text, text[-3000:]
    victim.unlink()
    assert verify_main([str(root), "--manifest"]) == 0
    p = preflight(root, tmp_path)
    assert p.returncode == 0 and f"train 1,438 images, the verdicts of {root / 'train' / NAME}; val 358 images, " \
                                 f"the verdicts of {root / 'val' / NAME}" in p.stdout, p.stdout + p.stderr
