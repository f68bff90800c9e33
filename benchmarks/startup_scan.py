"""Start-up cost of the data pre-flight (pipelines.preflight.check_split) on an ImageFolder train split of
100,000 files: per rank with 1 and 2 ranks, with and without a manifest; the launcher's pre-flight; writing
the manifest; and what each per-file check costs.

The tree: ``{work}/tree/train/class0000 .. class0999``, ``--files / 1000`` files each, hard links to a few
hundred real-photo JPEGs (pipelines.photo_set, 200x150, q90, about 11 KB). Names, sizes and directory entries
are those of a real tree; the bytes come from the page cache (every read is of the same few hundred files), so
these are warm-cache numbers - a network file system adds a round trip per file read or stat.

Variants, alternating round by round (A B C ... A B C ...: the machine is shared, so load spreads over all
of them); each is a fresh process (2 ranks: torchrun, gloo) that times check_split only - on 2 ranks the
slowest rank's time:

* ``scan``: no manifest, every rank checks its 1/world share of the files (headers and end marker);
* ``manifest``: a matching manifest in place - list, stat the rank's share, compare;
* ``launcher``: ``check_split(scan=False)`` in one process, what ``train_ddp.py --check`` runs per split;
* ``verify --manifest``: what ``python -m pipelines.verify --manifest`` does (check_file of every file, a full
  decode, then the manifest) in threads, as the command runs it, vs the same calls in fork processes; once per
  round, on ``--verify-files`` files.

Per-file costs (one process, ``--cost-files`` files): os.stat, the pre-flight's check (file_damage), PIL's
header parse (Image.open), a full decode (pipelines.verify.check_image).

    python benchmarks/startup_scan.py [--files 100000] [--rounds 5] [--json out.json] [--record]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import describe, environment, interleave, markdown_table, record, write_json

REPO = Path(__file__).resolve().parents[1]
SECTION = "Start-up data check"
CLASSES = 1000


# ------------------------------------------------------------------------------------------------- the data
def build_tree(work: Path, files: int) -> Path:
    """``work/tree`` with ``files`` hard links under ``train/`` (kept between runs when complete)."""
    from pipelines.photo_set import build_photo_set
    build_photo_set(work / "photos", num_train=300, num_val=0, num_classes=10, size=(200, 150), quality=90)
    tree, done = work / "tree", work / "tree" / f".complete-{files}"
    if done.is_file():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    sources = sorted((work / "photos" / "train").rglob("*.jpg"))
    per_class = max(1, files // CLASSES)
    for i in range(files):
        folder = tree / "train" / f"class{i // per_class:04d}"
        if i % per_class == 0:
            folder.mkdir(parents=True)
        os.link(sources[i % len(sources)], folder / f"img_{i:07d}.jpg")
    done.touch()
    return tree


def data_config(tree: Path, files: int):
    from fdmobilenet.config import DataConfig
    return DataConfig(root=str(tree), num_classes=-(-files // max(1, files // CLASSES)))


# ------------------------------------------------------------------------------------------ the workers
def worker(tree: Path, files: int, scan: bool) -> None:
    """One rank (or the only process): time check_split of the train split; rank 0 prints the JSON."""
    import torch.distributed as dist

    from pipelines.preflight import check_split
    world = int(os.environ.get("WORLD_SIZE", 1))
    group = None
    if world > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
        dist.barrier()
    rank = dist.get_rank() if group is not None else 0
    start = time.perf_counter()
    checked = check_split(data_config(tree, files), "train", rank=rank, world_size=world, group=group, scan=scan)
    mine = {"seconds": time.perf_counter() - start, "checked": checked.checked}
    results = [None] * world if rank == 0 else None
    if group is not None:
        dist.gather_object(mine, results, dst=0)
        dist.destroy_process_group()
    else:
        results = [mine]
    if rank == 0:
        print("RESULT " + json.dumps({"seconds": max(r["seconds"] for r in results), "ranks": results}), flush=True)


def verify_worker(tree: Path, files: int, processes: bool) -> None:
    """pipelines.verify's work on the first ``files`` files: check_file for each (threads: check_tree as the
    command runs it; processes: the same calls in a fork Pool, the alternative), then the manifest."""
    from pipelines.verify import check_file, check_tree, scan, write_manifest
    subset = tree.parent / f"verify-{files}"
    if not subset.is_dir():   # the first `files` of the tree, linked again (a dataset root of its own)
        for path in sorted((tree / "train").rglob("*.jpg"))[:files]:
            dst = subset / "train" / path.parent.name / path.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, dst)
    cores = len(os.sched_getaffinity(0))
    start = time.perf_counter()
    if processes:
        images, _ = scan(subset)
        with mp.get_context("fork").Pool(cores) as pool:
            results = pool.map(check_file, images, chunksize=64)
        n, written = len(images), [write_manifest(subset / "train", dict(zip(images, results)))]
    else:
        n, _, written = check_tree(subset, cores, write_manifests=True)
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - start, "files": n, "manifests": len(written)}),
          flush=True)


def costs(tree: Path, files: int) -> list[dict]:
    """µs per file of each check, on the first ``files`` files (the full decode on a tenth of them)."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    from pipelines.preflight import file_damage
    from pipelines.verify import check_image
    start = time.perf_counter()
    _, class_to_idx = find_classes(str(tree / "train"))
    listed = make_dataset(str(tree / "train"), class_to_idx, extensions=IMG_EXTENSIONS)
    listing = (time.perf_counter() - start) / len(listed)
    paths = [p for p, _ in listed][:files]

    def headers(path):
        with Image.open(path):
            pass

    rows = [{"check": "listing (torchvision find_classes + make_dataset)", "us": round(listing * 1e6, 1),
             "files": len(listed)}]
    for name, fn, subset in (("os.stat", os.stat, paths), ("pre-flight check (file_damage: headers + end marker)",
                                                           file_damage, paths),
                             ("PIL header parse (Image.open)", headers, paths),
                             ("full decode (pipelines.verify.check_image)", check_image, paths[:max(1, files // 10)])):
        start = time.perf_counter()
        for path in subset:
            fn(path)
        rows.append({"check": name, "us": round((time.perf_counter() - start) / len(subset) * 1e6, 1),
                     "files": len(subset)})
    return rows


# --------------------------------------------------------------------------------------------- the driver
def result_of(cmd: list[str]) -> dict:
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000, help="files in the train split (default 100,000)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--verify-files", type=int, default=20_000, help="files decoded by each verify variant")
    ap.add_argument("--cost-files", type=int, default=20_000, help="files of the per-file cost table")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fdmobilenet-bench" / "startup-scan"))
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--record", action="store_true", help=f"append to benchmarks/RESULTS.md, section '{SECTION}'")
    ap.add_argument("--worker", choices=["scan", "launcher", "verify-processes", "verify-threads"],
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    work = Path(args.work)
    if args.worker in ("scan", "launcher"):
        return worker(work / "tree", args.files, scan=args.worker == "scan")
    if args.worker:
        return verify_worker(work / "tree", args.verify_files, processes=args.worker == "verify-processes")

    from pipelines import verify
    from pipelines.manifest import NAME
    tree = build_tree(work, args.files)
    env = environment(sys.argv if argv is None else ["benchmarks/startup_scan.py", *argv])
    train, saved = tree / "train", work / f"manifest-{args.files}.tsv"
    if not saved.is_file():       # written once by the command itself, kept beside the tree
        assert verify.main([str(train), "--manifest", "--workers", str(len(os.sched_getaffinity(0)))]) == 0
        shutil.move(train / NAME, saved)
    me = [sys.executable, str(Path(__file__).resolve()), "--files", str(args.files), "--work", str(work),
          "--verify-files", str(args.verify_files)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def with_manifest(on: bool, cmd: list[str]):
        def run() -> dict:
            (train / NAME).unlink(missing_ok=True)
            if on:
                shutil.copyfile(saved, train / NAME)
            return result_of(cmd)
        return run

    variants = {
        "scan, 1 rank": with_manifest(False, [*me, "--worker", "scan"]),
        "scan, 2 ranks": with_manifest(False, [*torchrun, *me[1:], "--worker", "scan"]),
        "manifest, 1 rank": with_manifest(True, [*me, "--worker", "scan"]),
        "manifest, 2 ranks": with_manifest(True, [*torchrun, *me[1:], "--worker", "scan"]),
        "launcher pre-flight, no manifest": with_manifest(False, [*me, "--worker", "launcher"]),
        "launcher pre-flight, manifest": with_manifest(True, [*me, "--worker", "launcher"]),
        f"verify --manifest, {args.verify_files:,} files, threads (the command)": lambda: result_of(
            [*me, "--worker", "verify-threads"]),
        f"verify --manifest, {args.verify_files:,} files, fork processes": lambda: result_of(
            [*me, "--worker", "verify-processes"]),
    }
    results = interleave(variants, args.rounds)
    (train / NAME).unlink(missing_ok=True)
    per_file = costs(tree, args.cost_files)
    load_after = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for name, runs in results.items():
        seconds = [r["seconds"] for r in runs]
        row = {"variant": name, "s": round(statistics.median(seconds), 3), "rounds": [round(s, 3) for s in seconds]}
        if "ranks" in runs[0]:
            row["checked"] = " + ".join(f"{r['checked']:,}" for r in runs[0]["ranks"])
        rows.append(row)
    cores = env["cores"]
    table = markdown_table(rows, (("variant", "variant"), ("s", "seconds (median)"), ("rounds", "rounds (s)"),
                                  ("checked", "files read per rank")))
    cost_table = markdown_table(per_file, (("check", "per file"), ("us", "µs"), ("files", "files timed")))
    text = (f"{describe(env)}\n\nload average after: {' / '.join(map(str, load_after))} · train split of "
            f"{args.files:,} files (1,000 class folders; hard links to 300 photo_set JPEGs of 200x150, about 11 KB; "
            f"warm page cache), {cores} cores, {args.rounds} rounds, variants alternating; each a fresh process "
            f"timing check_split (2 ranks: torchrun + gloo, the slower rank)\n\n{table}\n\n"
            f"Per-file cost of each check, one process:\n\n{cost_table}\n")
    print(text)
    if args.json:
        write_json(args.json, {"meta": env, "load_avg_after": load_after, "rows": rows, "per_file": per_file})
    if args.record:
        record(SECTION, text)


if __name__ == "__main__":
    main()
