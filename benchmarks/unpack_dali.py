#!/usr/bin/env python3
"""Put back the DALI tree that benchmarks/pack_dali.sh split into parts, on the GPU host (Python stdlib only).

usage: python3 benchmarks/unpack_dali.py [PARTS_DIR] [--target DIR] [--no-import]

PARTS_DIR (default /tmp/dali-parts) collects dali.tar.xz.part-NN, which arrive over several device calls, and
SHA256SUMS. Each run checks the parts that are there; once all are, it streams them through lzma + tarfile
into DIR (default /tmp/dali-site), makes sure ``import nvidia.dali`` resolves there, and prints the PYTHONPATH
to export and how long the extraction took. Any part count works (benchmarks/run_gpu.sh's header: one call
per part, the box in the call of the last one).
Exit: 0 unpacked (or already was), 3 parts still missing, 1 error (bad checksum, import failed).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

class Concat(io.RawIOBase):
    """The parts, read one after another as a single stream."""

    def __init__(self, paths):
        self.paths, self.f = list(paths), None

    def readable(self):
        return True

    def readinto(self, buf):
        while True:
            if self.f is None:
                if not self.paths:
                    return 0
                self.f = open(self.paths.pop(0), "rb")
            n = self.f.readinto(buf)
            if n:
                return n
            self.f.close()
            self.f = None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def with_target(target: str) -> dict:
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != target]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([target] + old))


def nvidia_path(target: str) -> list[str]:
    """nvidia.__path__ as a fresh interpreter sees it with ``target`` first on PYTHONPATH."""
    code = "import json, nvidia; print(json.dumps([str(p) for p in nvidia.__path__]))"
    r = subprocess.run([sys.executable, "-c", code], env=with_target(target), capture_output=True, text=True)
    return [os.path.realpath(p) for p in json.loads(r.stdout)] if r.returncode == 0 else []


def extract(paths: list[str], target: str) -> None:
    os.makedirs(target, exist_ok=True)
    with tarfile.open(fileobj=io.BufferedReader(Concat(paths), 1 << 20), mode="r|xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
        else:
            tar.extractall(target)
    ns = nvidia_path(target)
    mine = os.path.join(target, "nvidia")
    if mine not in ns and ns:
        # another `nvidia` package (a regular one, without pkgutil.extend_path) is found before ours: move our
        # files into it instead (root on the GPU host), file by file, so that a folder both have (cu13/lib,
        # torch's CUDA 13 libraries and the pack's libnvjpeg) gets the pack's files beside its own
        dest = ns[0]
        print(f"{mine} is shadowed by {dest}; moving DALI's files there")
        for folder, _, files in os.walk(mine):
            for name in files:
                src = os.path.join(folder, name)
                dst = os.path.join(dest, os.path.relpath(src, mine))
                if os.path.exists(dst):
                    print(f"  {dst} exists already, kept as is")
                    continue
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.move(src, dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts_dir", nargs="?", default="/tmp/dali-parts")
    ap.add_argument("--target", default="/tmp/dali-site")
    ap.add_argument("--no-import", action="store_true", help="skip the final `import nvidia.dali` check")
    a = ap.parse_args(argv)
    target = os.path.realpath(a.target)
    sums = os.path.join(a.parts_dir, "SHA256SUMS")
    if not os.path.exists(sums):
        print(f"no SHA256SUMS in {a.parts_dir}", file=sys.stderr)
        return 1
    with open(sums) as f:
        listed = [(h, n.lstrip("*")) for h, n in (line.split() for line in f if line.strip())]
    with open(sums, "rb") as f:
        stamp = hashlib.sha256(f.read()).hexdigest()
    marker = os.path.join(target, ".dali-unpacked")

    if os.path.exists(marker) and open(marker).read().strip() == stamp:
        print(f"already unpacked in {target}")
    else:
        missing, bad = [], []
        for h, name in listed:
            p = os.path.join(a.parts_dir, name)
            if not os.path.exists(p):
                missing.append(name)
            elif sha256(p) != h:
                bad.append(name)
        print(f"{len(listed) - len(missing)}/{len(listed)} parts in {a.parts_dir}"
              + (f"; missing: {' '.join(missing)}" if missing else "")
              + (f"; BAD CHECKSUM: {' '.join(bad)}" if bad else ""))
        if bad:
            return 1
        if missing:
            return 3
        print(f"extracting into {target} ...", flush=True)
        started = time.perf_counter()
        extract([os.path.join(a.parts_dir, n) for _, n in listed], target)
        print(f"extracted in {time.perf_counter() - started:.1f} s")
        with open(marker, "w") as f:
            f.write(stamp + "\n")
    print("nvidia.__path__:", " ".join(nvidia_path(target)) or "(cannot import nvidia)")
    if not a.no_import:
        code = "import nvidia.dali as d; print('nvidia.dali', d.__version__, 'from', d.__file__)"
        r = subprocess.run([sys.executable, "-c", code], env=with_target(target), capture_output=True, text=True)
        print((r.stdout + r.stderr).strip())
        if r.returncode:
            return 1
    print(f"export PYTHONPATH={target}${{PYTHONPATH:+:$PYTHONPATH}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
