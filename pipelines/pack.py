"""Pack one ImageFolder split into webdataset tar shards with DALI index files.

    python -m pipelines.pack --src data/x/train --dst data/x-wds/train --shard-size 1000 --shuffle 0
    python -m pipelines.pack --src data/x/val --dst data/x-wds/val --shard-size 1000

Output layout (what the webdataset loader reads):

    DST/{prefix}-000000.tar   members 00000000.jpg 00000000.cls 00000001.jpg ... (ImageFolder order, or shuffled)
    DST/{prefix}-000000.idx   DALI's index for that shard (format v1.2, what DALI's wds2idx tool writes)
    DST/classes.json          JSON list of class names; position = class index

Keys are the sample's position in torchvision's ImageFolder listing of SRC (8 digits, so no dots and they
sort in order across shards); ``.cls`` holds the class index as ASCII digits, the index ImageFolder gives
(sorted folder names). The first line of each ``.idx`` is ``v1.2 <samples in shard>``. The ``.jpg`` member
is the source file's bytes unchanged (a PNG that is named .jpg stays a PNG: the decoders read content, not
names; ``python -m pipelines.verify`` lists such files).

``--short-side N [--quality Q]`` stores each image as ``python -m pipelines.resize`` would (its ``shrink``: the
shorter side at most N, a baseline RGB JPEG of quality Q, or the file's own bytes when it is one already and
small enough), without writing a resized folder first. A file that then does not decode is named on one line
and left out (its key is missing from the shards), and the command exits with status 2 once the rest is packed.

Pack a *training* split with ``--shuffle SEED``: DALI's webdataset reader shuffles only the order of whole
shards and mixes samples in a buffer (``initial_fill``), so shards written in class order would give batches of
one or two classes. Shuffling reorders the samples across shards once, seeded; keys stay the ImageFolder
positions, so every sample keeps its name and label.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import sys
import tarfile
import time
from pathlib import Path

from fdmobilenet import cli
from pipelines.imagefolder import list_samples
from pipelines.integrity import JPEG_SOI
from pipelines.resize import DECODE_ERRORS, broken_reason, check_settings, shrink


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> str:
    """Append one member; returns its index entry ``"<ext> <data offset> <size> <name>"``."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0   # fixed metadata: same input, same bytes
    tar.addfile(info, io.BytesIO(data))
    # tar.offset is now past the data, which is padded to whole 512-byte blocks
    offset = tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return f"{name.split('.', 1)[1]} {offset} {len(data)} {name}"


def write_shard(task: tuple[str, str, list[tuple[int, str, int]], tuple[int, int] | None]
                ) -> tuple[str, int, list[str], list[tuple[str, str]]]:
    """Write one ``.tar`` and its ``.idx``; returns (tar path, samples, paths that are not JPEG, (path, reason)
    of the files left out because they do not decode). ``resize``: (short side, quality), or None.

    The index is written from the offsets known while writing, in DALI's format v1.2: a line
    ``v1.2 <samples>``, then per sample its members as ``<ext> <offset> <size> <name>``, space-separated.
    (DALI's wds2idx tool computes the same by running ``tar --list`` twice; the GPU images lack it.)"""
    tar_path, idx_path, samples, resize = task
    not_jpeg, lines, broken = [], [], []
    with tarfile.open(tar_path + ".tmp", "w", format=tarfile.GNU_FORMAT) as tar:
        for position, path, label in samples:
            data = Path(path).read_bytes()
            if resize is not None:
                try:
                    data = shrink(data, *resize)[0]
                except DECODE_ERRORS as e:
                    broken.append((path, broken_reason(path, e)))
                    continue
            if not data.startswith(JPEG_SOI):
                not_jpeg.append(path)
            key = f"{position:08d}"
            lines.append(" ".join([_add_member(tar, f"{key}.jpg", data),
                                   _add_member(tar, f"{key}.cls", str(label).encode("ascii"))]))
    Path(idx_path).write_text(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
    os.replace(tar_path + ".tmp", tar_path)
    return tar_path, len(lines), not_jpeg, broken


def pack(src: str | Path, dst: str | Path, shard_size: int, prefix: str | None = None,
         workers: int | None = None, overwrite: bool = False, shuffle_seed: int | None = None,
         short_side: int | None = None, quality: int = 90) -> dict:
    """Pack ImageFolder split ``src`` into shards under ``dst``; returns a summary dict. ``shuffle_seed``:
    write the samples in a seeded random order (for training splits) instead of ImageFolder order;
    ``short_side``: store each image as pipelines.resize does (see the module docstring)."""
    src, dst = Path(src), Path(dst)
    if shard_size < 1:
        raise cli.UsageError(f"--shard-size must be at least 1, got {shard_size}")
    resize = None
    if short_side is not None:
        check_settings(short_side, quality)
        resize = (short_side, quality)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory (give one split of an ImageFolder tree, e.g. "
                                f"data/x/train)")
    prefix = prefix or src.name
    classes, samples = list_samples(src)
    dst.mkdir(parents=True, exist_ok=True)
    old = sorted(dst.glob(f"{prefix}-*.tar")) + sorted(dst.glob(f"{prefix}-*.idx"))
    if old and not overwrite:
        raise FileExistsError(f"{dst} already holds {len(old)} shard/index files named {prefix}-*; "
                              f"remove them or pass --overwrite")
    for f in old:
        f.unlink()
    keyed = [(position, path, label) for position, (path, label) in enumerate(samples)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(keyed)
    tasks = [(str(dst / f"{prefix}-{n:06d}.tar"), str(dst / f"{prefix}-{n:06d}.idx"),
              keyed[start:start + shard_size], resize)
             for n, start in enumerate(range(0, len(samples), shard_size))]
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(tasks)))
    if workers == 1:
        results = [write_shard(t) for t in tasks]
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(write_shard, tasks, chunksize=1)
    (dst / "classes.json").write_text(json.dumps(classes) + "\n")
    return {"shards": [r[0] for r in results], "samples": sum(r[1] for r in results), "classes": len(classes),
            "not_jpeg": [p for r in results for p in r[2]], "broken": [b for r in results for b in r[3]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.pack", description=__doc__.split("\n\n")[0],
                                 epilog="Exit codes: 0 packed; 2 a mistake (one line: a missing or non-ImageFolder "
                                        "--src, shards already in --dst, ...).")
    ap.add_argument("--src", required=True, help="one ImageFolder split, e.g. data/x/train")
    ap.add_argument("--dst", required=True, help="output directory for the shards, e.g. data/x-wds/train")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    ap.add_argument("--prefix", default=None, help="shard name prefix (default: SRC's folder name)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all usable cores)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing shards with this prefix")
    ap.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                    help="write samples in a seeded random order (use it for training splits)")
    ap.add_argument("--short-side", type=int, default=None, metavar="N",
                    help="store images as `python -m pipelines.resize --short-side N` does (default: as they are)")
    ap.add_argument("--quality", type=int, default=90, metavar="Q",
                    help="JPEG quality of the images --short-side writes (default 90)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        summary = pack(args.src, args.dst, args.shard_size, args.prefix, args.workers, args.overwrite,
                       args.shuffle, args.short_side, args.quality)
    except (*cli.USER_ERRORS, OSError) as e:   # OSError: a missing --src, shards in --dst, no space, ...
        cli.report("pipelines.pack", e)
        return cli.EXIT_USAGE
    for p in summary["not_jpeg"]:
        print(f"warning: {p}: not a JPEG (packed unchanged; the decoders read it by content)", file=sys.stderr)
    for path, reason in summary["broken"]:
        print(f"pipelines.pack: error: {path}: {reason}; left out (replace or delete it, then pack again with "
              f"--overwrite)", file=sys.stderr)
    print(f"packed {summary['samples']} samples, {summary['classes']} classes into {len(summary['shards'])} "
          f"shards under {args.dst} ({time.perf_counter() - t0:.2f} s)")
    return cli.EXIT_USAGE if summary["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
