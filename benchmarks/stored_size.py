"""Stored image size x training resolution: what a pre-resized copy (pipelines.resize) buys, on the loaders
alone and end to end through the trainer.

    python benchmarks/stored_size.py [--stored original,320,256,192,160] [--res 224,192,160]
        [--loaders torchvision,dali] [--num-images 1280] [--quality 90] [--rounds 3] [--e2e-rounds 2] [--no-e2e]
        [--stages] [--device cpu|cuda] [--out DIR] [--json PATH] [--record] [--quick]

Data: a photo set (pipelines.photo_set: real photos, 500x375, JPEG q90; cached) and its copies made by
``python -m pipelines.resize --short-side N`` for every N of --stored ('original' is the set itself, shorter
side 375). Bytes on disk per image are read from each copy.

* Pipeline alone: the imagenet-aggressive train pipeline (RandomResizedCrop to R, flip, normalise) of every
  loader x stored size x resolution R, built once, warmed up, then timed in rounds that alternate all the
  variants (pipeline_throughput.timed_rounds: each round drains the variant's prefetch queue untimed, then
  times --steps batches). Reported: the median img/s over --rounds.
* Stages (--stages; DALI on the CPU, the largest --res): where a batch's time goes, stored size by stored
  size - the imagenet-aggressive train graph of pipelines/dali.py cut after its random-crop (ROI) decode,
  after the resize to res x res, and whole (+ crop_mirror_normalize), alternating rounds as above. The
  decode's share shrinks with the stored pixels; the resize's output and the normalisation do not.
* End to end: ``train_ddp.py`` as a user runs it (one rank under torchrun, FD-MobileNet 0.25x, batch
  --batch, data.crop_size=R, the trainer's defaults otherwise) through benchmarks/train_steps.py, which stops
  it by its preemption signal after --e2e-steps steps and takes the median img/s of its log windows after
  the first. Every variant once per round, --e2e-rounds rounds alternating; reported: the median of the
  rounds' medians, and the data-wait share.

On --device cuda (the default where there is a GPU; benchmarks/run_gpu.sh runs the pipelines alone this way)
DALI decodes on the GPU (mixed, the hardware decoder's share as data.hw_decoder_load resolves) and the
DataLoader's batches are copied to it.

Writes OUT/stored_size.json (also to --json, after the pipeline rows and again at the end), OUT/stored_size.md
and OUT/stored_size.png (img/s against stored size, a line per loader and resolution). --quick: a toy run (48 photos, stored original and 160, resolution 128, batch
8) that checks the script end to end; it measures nothing worth keeping.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

from common import (describe, environment, interleave, markdown_table, publish, stored_bytes, stored_size_columns,
                    write_json)
from fdmobilenet.config import load_family
from pipeline_throughput import default_data_root, timed_rounds
from pipelines import manifest, resolve_loader_defaults
from pipelines.imagefolder import list_samples
from pipelines.photo_set import build_photo_set
from pipelines.resize import resize_tree
from pipelines.verify import check_tree

REPO = Path(__file__).resolve().parents[1]
SECTION = "Stored image size x training resolution"
ORIGINAL = "original"
PHOTO_SIZE = (500, 375)
CLASSES = 10


def csv(kind):
    def parse(text: str) -> list:
        return [kind(x) for x in text.split(",") if x]
    return parse


def stored_size(text: str):
    return text if text == ORIGINAL else int(text)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stored", type=csv(stored_size), default=None,
                    help="stored shorter sides, 'original' for the photos as built (default original,320,256,192,160)")
    ap.add_argument("--res", type=csv(int), default=None, help="training resolutions (default 224,192,160)")
    ap.add_argument("--loaders", type=csv(str), default=["torchvision", "dali"],
                    help="torchvision, dali (torchvision first: its workers fork before DALI starts threads)")
    ap.add_argument("--num-images", type=int, default=None, help="training photos (default 1280; --quick 48)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the resized copies (default 90)")
    ap.add_argument("--threads", type=int, default=None, help="DALI threads / DataLoader workers (default: all cores)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 64; --quick 8)")
    ap.add_argument("--rounds", type=int, default=3, help="pipeline-alone rounds (at least 3)")
    ap.add_argument("--steps", type=int, default=None, help="timed batches per pipeline round (default 8; --quick 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed batches per pipeline variant first (default 3)")
    ap.add_argument("--e2e-rounds", type=int, default=None, help="end-to-end rounds (default 2; --quick 1)")
    ap.add_argument("--e2e-steps", type=int, default=None,
                    help="trainer steps per end-to-end run (default 30, log windows of 5; --quick 6, windows of 2)")
    ap.add_argument("--no-e2e", action="store_true", help="only the pipelines alone")
    ap.add_argument("--stages", action="store_true",
                    help="also time DALI's CPU train graph cut after decode, resize and normalise")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("stored_size"), help="where the json, md and png go")
    ap.add_argument("--json", type=Path, default=None, help="also write the json here")
    ap.add_argument("--record", action="store_true",
                    help=f"append the tables to benchmarks/RESULTS.md ('{SECTION} (CPU|GPU)')")
    ap.add_argument("--quick", action="store_true", help="toy size: checks that the script runs")
    args = ap.parse_args(argv)
    quick = args.quick
    args.stored = args.stored or ([ORIGINAL, 160] if quick else [ORIGINAL, 320, 256, 192, 160])
    args.res = args.res or ([128] if quick else [224, 192, 160])
    args.num_images = args.num_images or (48 if quick else 1280)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.batch = args.batch or (8 if quick else 64)
    args.steps = args.steps or (1 if quick else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.e2e_rounds = args.e2e_rounds or (1 if quick else 2)
    args.e2e_steps = args.e2e_steps or (6 if quick else 30)
    args.print_freq = 2 if quick else 5
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (the median of fewer is not a median)")
    for name in args.loaders:
        if name not in ("torchvision", "dali"):
            ap.error(f"unknown loader {name!r}; choose torchvision or dali")
    return args


# -------------------------------------------------------------------------------------------------- data
def make_data(args) -> dict:
    """{stored size: dataset root}, each built once (the photo set, then its resized copies)."""
    base = default_data_root(args.num_images, "stored-size-photos")
    t0 = time.perf_counter()
    built = build_photo_set(base, num_train=args.num_images, num_val=max(2 * CLASSES, args.num_images // 20),
                            num_classes=CLASSES, size=PHOTO_SIZE)
    if built or not (base / "train" / manifest.NAME).is_file():   # as the copies have: no image read at start
        check_tree(base, write_manifests=True)
    print(f"photo set {base}: {'built' if built else 'cached'} ({time.perf_counter() - t0:.1f} s)", flush=True)
    roots = {}
    for n in args.stored:
        if n == ORIGINAL:
            roots[n] = base
            continue
        roots[n] = base.with_name(f"{base.name}-s{n}" + (f"-q{args.quality}" if args.quality != 90 else ""))
        t0 = time.perf_counter()
        summaries = resize_tree(base, roots[n], n, args.quality, report=print)
        done = sum(s.files - s.counts["kept"] for s in summaries.values())
        print(f"stored {n}: {roots[n]} ({done} files resized or copied in {time.perf_counter() - t0:.1f} s)",
              flush=True)
    return roots


def bytes_per_image(root: Path) -> tuple[int, float]:
    """(training images, mean bytes on disk per image)."""
    _, samples = list_samples(root / "train")
    return len(samples), sum(os.path.getsize(p) for p, _ in samples) / len(samples)


def label(n) -> str:
    return f"original ({min(PHOTO_SIZE)})" if n == ORIGINAL else str(n)


# --------------------------------------------------------------------------------------- pipeline alone
def pipeline_alone(args, roots: dict) -> list[dict]:
    device = torch.device(args.device)
    base = load_family("data", "imagenet-aggressive")
    variants = [(loader, n, r) for loader in args.loaders for n in args.stored for r in args.res]
    rounds = {}
    for loader, n, r in variants:
        cfg = resolve_loader_defaults(dataclasses.replace(
            base, root=str(roots[n]), num_classes=CLASSES, loader=loader, num_threads=args.threads, crop_size=r,
            dtype="auto"), device)[0]
        rounds[(loader, n, r)], _ = timed_rounds(cfg, args.batch, args.steps, args.warmup, device)
        print(f"ready: {loader}, stored {label(n)}, res {r}", flush=True)
    rates = interleave(rounds, args.rounds)
    return [{"loader": loader, "stored": label(n), "res": r, "img_s": round(median(rates[(loader, n, r)]), 1),
             "rounds": [round(x, 1) for x in rates[(loader, n, r)]]} for loader, n, r in variants]


# ------------------------------------------------------------------------------------------------ stages
STAGES = ("ROI decode", "+ resize", "+ normalise")


def stage_pipeline(data, files: list[str], stage: str, size: int, batch: int, threads: int):
    """pipelines.dali's train graph (random_resized crop, CPU) up to ``stage``: the reader, the random-crop
    decode, the resize to ``size`` x ``size``, crop_mirror_normalize - with the same data settings."""
    from nvidia.dali import fn, pipeline_def, types

    from pipelines.dali import normalise, random_crop_decode

    @pipeline_def
    def graph():
        jpegs, _ = fn.readers.file(files=files, random_shuffle=True)
        images = random_crop_decode(jpegs, data, dict(device="cpu", output_type=types.RGB))
        if stage != STAGES[0]:
            images = fn.resize(images, resize_x=size, resize_y=size)
        if stage == STAGES[2]:
            images = normalise(images, data, types.FLOAT, mirror=True)
        return images

    # synchronous: each run() computes its own batch, so no batch prepared while another variant ran is timed
    pipe = graph(batch_size=batch, num_threads=threads, device_id=None, seed=data.seed, prefetch_queue_depth=1,
                 exec_async=False, exec_pipelined=False)
    pipe.build()
    return pipe


def stages(args, roots: dict) -> list[dict]:
    base, size = load_family("data", "imagenet-aggressive"), max(args.res)
    runs = {}
    for n in args.stored:
        files = [path for path, _ in list_samples(roots[n] / "train")[1]]
        for stage in STAGES:
            pipe = stage_pipeline(base, files, stage, size, args.batch, args.threads)
            for _ in range(args.warmup):
                pipe.run()

            def one_round(pipe=pipe) -> float:
                start = time.perf_counter()
                for _ in range(args.steps):
                    pipe.run()
                return args.steps * args.batch / (time.perf_counter() - start)
            runs[(n, stage)] = one_round
    rates = interleave(runs, args.rounds)
    rows = []
    for n, stage in runs:
        img_s = median(rates[(n, stage)])
        ref = median(rates[(ORIGINAL, stage)]) if ORIGINAL in args.stored else None
        rows.append({"stored": label(n), "stage": stage, "res": size, "img_s": round(img_s, 1),
                     "ms_per_img": round(1000 / img_s, 3), "rounds": [round(x, 1) for x in rates[(n, stage)]],
                     "x_original": round(img_s / ref, 2) if ref else "-"})
    return rows


# ---------------------------------------------------------------------------------------- end to end
def trainer_run(args, root: Path, loader: str, res: int, work: Path, tag: str) -> dict:
    """One train_ddp.py run through train_steps.py; its summary (median img/s and data wait of the windows)."""
    steps_per_epoch = args.num_images // args.batch
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(REPO / "train_ddp.py"), "--data", "imagenet-aggressive", "--model", "0.25", "--label", tag,
               "--fresh", f"data.root={root}", f"data.num_classes={CLASSES}", f"data.loader={loader}",
               f"data.crop_size={res}", f"optim.batch_size={args.batch}", "optim.epochs=1000",
               f"train.print_freq={args.print_freq}", "train.eval_every=0", "train.plot=false",
               f"train.device={args.device}", f"train.output_dir={work}"]
    summary = work / f"{tag}.steps.json"
    with open(work / f"{tag}.log", "w") as log:
        rc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_steps.py"), "--steps",
                             str(args.e2e_steps), "--steps-per-epoch", str(steps_per_epoch), "--json", str(summary),
                             "--", *command], cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    result = json.loads(summary.read_text())
    if rc != 0 or result["median_img_s"] is None:
        raise RuntimeError(f"train_ddp.py run {tag} failed (exit {rc}); its output: {work / f'{tag}.log'}")
    return result


def end_to_end(args, roots: dict) -> list[dict]:
    work = args.out / "e2e"
    work.mkdir(parents=True, exist_ok=True)
    variants = [(loader, n, r) for loader in args.loaders for n in args.stored for r in args.res]
    runs: dict = {v: [] for v in variants}
    for k in range(args.e2e_rounds):
        for loader, n, r in variants:
            runs[(loader, n, r)].append(trainer_run(args, roots[n], loader, r, work, f"{loader}-s{n}-r{r}"))
            print(f"end to end, round {k + 1}: {loader}, stored {label(n)}, res {r}: "
                  f"{runs[(loader, n, r)][-1]['median_img_s']:,.0f} img/s", flush=True)
    return [{"loader": loader, "stored": label(n), "res": r,
             "img_s": round(median(x["median_img_s"] for x in runs[(loader, n, r)]), 1),
             "rounds": [round(x["median_img_s"], 1) for x in runs[(loader, n, r)]],
             "data_wait_pct": median(x["median_data_wait_pct"] for x in runs[(loader, n, r)])}
            for loader, n, r in variants]


# ------------------------------------------------------------------------------------------------ report
def ratios(rows: list[dict], reference: tuple[str, int]) -> None:
    """Each row's img/s over its loader's row at ``reference`` (stored label, resolution)."""
    ref = {r["loader"]: r["img_s"] for r in rows if (r["stored"], r["res"]) == reference}
    for r in rows:
        r["x_ref"] = round(r["img_s"] / ref[r["loader"]], 2) if ref.get(r["loader"]) else "-"


def chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(k, t) for k, t in (("pipeline", "pipeline alone"), ("end_to_end", "end to end, train_ddp.py 0.25x"))
              if result.get(k)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    order = [label(n) for n in result["settings"]["stored"]]
    for ax, (key, title) in zip(axes[0], panels):
        for loader in result["settings"]["loaders"]:
            for k, res in enumerate(result["settings"]["res"]):    # colour: resolution; line style: loader
                rows = {r["stored"]: r["img_s"] for r in result[key] if (r["loader"], r["res"]) == (loader, res)}
                ax.plot(range(len(order)), [rows[s] for s in order], marker="o", color=f"C{k}",
                        linestyle="-" if loader == "dali" else "--", label=f"{loader}, res {res}")
        ax.set_xticks(range(len(order)), [f"{s}\n{result['bytes'][s] / 1e3:.0f} KB" for s in order])
        ax.set_xlabel("stored shorter side (mean bytes per image)")
        ax.set_ylabel("img/s (median)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    env = result["environment"]
    fig.suptitle(f"{env['cpu']}, {env['cores']} cores, load average {env['load_avg_1_5_15'][0]} before, "
                 f"{result['load_avg_after'][0]} after; batch {result['settings']['batch']}; commit "
                 f"{env.get('git_commit', '?')[:7]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(result: dict) -> str:
    s = result["settings"]
    cols = stored_size_columns(s["res"])
    # RESULTS.md keeps its lines under 200 characters: one clause per line (markdown joins them)
    lines = [describe(result["environment"]).replace(" · device:", " ·\ndevice:"), "",
             f"load average after: {' / '.join(map(str, result['load_avg_after']))} ·",
             f"{s['num_images']} training photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} q90 (pipelines.photo_set) and their "
             f"copies by pipelines.resize (q{s['quality']}) ·",
             f"batch {s['batch']} · {s['threads']} DALI threads / DataLoader workers · device {s['device']}", "",
             f"Bytes on disk per image: {stored_bytes(result['bytes'])}", "",
             "Pipeline alone (imagenet-aggressive train pipeline at res;",
             f"median of {s['rounds']} alternating rounds x {s['steps']} batches after {s['warmup']} warm-up "
             f"batches):", "", markdown_table(result["pipeline"], cols)]
    if result.get("stages"):
        lines += ["", f"Stages (DALI CPU train graph cut after each op, res {max(s['res'])}; median of {s['rounds']} "
                  f"alternating rounds x {s['steps']} batches):", "",
                  markdown_table(result["stages"], (("stored", "stored shorter side"), ("stage", "graph up to"),
                                                    ("img_s", "img/s"), ("ms_per_img", "ms per image"),
                                                    ("rounds", "rounds (img/s)"), ("x_original", "x original")))]
    if result.get("end_to_end"):
        lines += ["", "End to end (train_ddp.py, one rank under torchrun, 0.25x, data.crop_size=res, the trainer's "
                  "defaults otherwise;", f"median of {s['e2e_rounds']} alternating rounds, each the median of the "
                  f"log windows after the first of {s['e2e_steps']} steps):", "",
                  markdown_table(result["end_to_end"], cols[:4] + (("data_wait_pct", "data wait %"),) + cols[4:])]
    if result.get("targets"):
        lines += ["", "Targets (issue 22, reported, not asserted):", "", *(f"- {t}" for t in result["targets"])]
    return "\n".join(lines)


def check_targets(result: dict) -> list[str]:
    """The two acceptance ratios of issue 22, as measured (reported, not asserted): the ratio of the medians,
    and the ratio within each round (the two variants ran minutes apart there, under the same other load)."""
    orig = label(ORIGINAL)

    def ratio(rows: list[dict], loader: str, fast: tuple[str, int], slow: tuple[str, int], target: float,
              what: str) -> list[str]:
        pick = {(r["stored"], r["res"]): r for r in rows if r["loader"] == loader}
        if fast not in pick or slow not in pick:
            return []
        a, b = pick[fast], pick[slow]
        per_round = [round(x / y, 2) for x, y in zip(a["rounds"], b["rounds"])]
        x = a["img_s"] / b["img_s"]
        return [f"{what} ({loader}), stored {fast[0]} / res {fast[1]} = {x:.2f}x stored {slow[0]} / res {slow[1]} "
                f"(per round {per_round}, median {median(per_round):.2f}); target >= {target}x: "
                f"{'reached' if x >= target else 'not reached'}"]
    out = ratio(result["pipeline"], "dali", ("256", 224), (orig, 224), 2.0, "pipeline alone")
    for loader in result["settings"]["loaders"]:
        out += ratio(result.get("end_to_end", []), loader, ("160", 160), (orig, 224), 1.8, "end to end")
    return out


def save(args, result: dict) -> None:
    for path in filter(None, (args.out / "stored_size.json", args.json)):
        write_json(path, result)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(sys.argv if argv is None else ["benchmarks/stored_size.py", *argv])
    roots = make_data(args)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"environment": env, "settings": settings,
              "data": {label(n): str(r) for n, r in roots.items()},
              "bytes": {label(n): round(bytes_per_image(r)[1]) for n, r in roots.items()}}
    result["pipeline"] = pipeline_alone(args, roots)
    ratios(result["pipeline"], (label(ORIGINAL), max(args.res)))
    save(args, result)
    if args.stages:
        result["stages"] = stages(args, roots)
        save(args, result)
    if not args.no_e2e:
        result["end_to_end"] = end_to_end(args, roots)
        ratios(result["end_to_end"], (label(ORIGINAL), max(args.res)))
    result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["targets"] = check_targets(result)
    save(args, result)
    chart(result, args.out / "stored_size.png")
    text = markdown(result)
    (args.out / "stored_size.md").write_text(text + "\n")
    publish(text, SECTION, args.record, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
