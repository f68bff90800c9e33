"""benchmarks/unpack_dali.py, as the GPU host runs it once per device call: parts arriving one call at a time,
the extraction once all are there, the import check, a damaged part. The tree is a stand-in with the pack's
layout (an extend_path ``nvidia`` package holding ``nvidia/dali``), split as benchmarks/pack_dali.sh splits."""
from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNPACK = REPO / "benchmarks" / "unpack_dali.py"


def pack(tmp_path: Path, parts: int) -> list[Path]:
    """A tar.xz of nvidia/__init__.py (extend_path) + nvidia/dali/__init__.py, in ``parts`` pieces, each with
    SHA256SUMS in its own upload folder NN/."""
    buf = io.BytesIO()
    files = {"nvidia/__init__.py": "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n",
             "nvidia/dali/__init__.py": "__version__ = '0.0-stand-in'\n"}
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    size = -(-len(blob) // parts)
    chunks = [blob[i * size:(i + 1) * size] for i in range(parts)]
    names = [f"dali.tar.xz.part-{k:02d}" for k in range(parts)]
    sums = "".join(f"{hashlib.sha256(c).hexdigest()}  {n}\n" for c, n in zip(chunks, names))
    folders = []
    for k, (chunk, name) in enumerate(zip(chunks, names)):
        folder = tmp_path / "upload" / f"{k:02d}"
        folder.mkdir(parents=True)
        (folder / name).write_bytes(chunk)
        (folder / "SHA256SUMS").write_text(sums)
        folders.append(folder)
    return folders


def unpack(parts_dir: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(UNPACK), str(parts_dir), "--target", str(target)],
                          capture_output=True, text=True, timeout=120)


def arrive(folder: Path, parts_dir: Path) -> None:
    """What a device call's command does with its upload folder: mv NN/* into the parts folder."""
    parts_dir.mkdir(exist_ok=True)
    for f in folder.iterdir():
        f.replace(parts_dir / f.name)


@pytest.mark.parametrize("parts", [3, 4])
def test_parts_arrive_one_call_at_a_time_then_extract_and_import(tmp_path, parts):
    folders = pack(tmp_path, parts)
    parts_dir, target = tmp_path / "dali-parts", tmp_path / "dali-site"
    for k, folder in enumerate(folders[:-1], start=1):
        arrive(folder, parts_dir)
        p = unpack(parts_dir, target)
        assert p.returncode == 3 and p.stdout.startswith(f"{k}/{parts} parts"), p.stdout + p.stderr
    arrive(folders[-1], parts_dir)
    p = unpack(parts_dir, target)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{parts}/{parts} parts" in p.stdout and "extracted in " in p.stdout
    assert "nvidia.dali 0.0-stand-in from " + str(target) in p.stdout
    assert f"export PYTHONPATH={target}" in p.stdout
    again = unpack(parts_dir, target)
    assert again.returncode == 0 and again.stdout.startswith("already unpacked")


def test_a_damaged_part_is_refused(tmp_path):
    folders = pack(tmp_path, 3)
    parts_dir = tmp_path / "dali-parts"
    for folder in folders:
        arrive(folder, parts_dir)
    part = parts_dir / "dali.tar.xz.part-01"
    part.write_bytes(part.read_bytes()[:-1] + b"\0")
    p = unpack(parts_dir, tmp_path / "dali-site")
    assert p.returncode == 1 and "BAD CHECKSUM: dali.tar.xz.part-01" in p.stdout
    assert not (tmp_path / "dali-site").exists()
