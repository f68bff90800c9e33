"""torch.compile under a training-resolution ramp: static shapes (a graph per size) against dynamic shapes.

A run with data.train_res trains a few epochs at each of a few sizes and evaluates at data.val_crop after
each. This replays that sequence - per training size ``--steps`` steps of the trainer's own step
(fdmobilenet.engine.Trainer.step on a model from engine.prepare_model), then ``--steps`` evaluation batches
at ``--val-size`` - once per train.compile_dynamic setting, and eagerly for reference:

* off:  torch.compile(dynamic=False), one static graph per shape: a compilation at every new size;
* on:   torch.compile(dynamic=True), one graph with symbolic sizes for every shape;
* auto: torch's default (dynamic=None): static at first, recompiled with dynamic sizes after a shape changes.

Each variant runs in a fresh process with an empty inductor cache (compilation state is per process and
inductor would otherwise reuse another variant's kernels from disk); the variants alternate in a rotated
order each round. Reported per variant, medians over the rounds: the seconds of each phase's first batch
(compilation included), the median step time of each size after it, the whole sequence's seconds, and the
graphs dynamo compiled.

    python benchmarks/compile_resolutions.py --width 0.25 --batch 32 --sizes 128,160,192 --val-size 224
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from common import describe, environment, fill, markdown_table, publish

VARIANTS = ("eager", "off", "on", "auto")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sizes", default="128,160,192", help="training sizes, in the ramp's order")
    ap.add_argument("--val-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=8, help="steps per training size, and evaluation batches")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick smoke run)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def child(args: argparse.Namespace) -> dict:
    """One variant's whole sequence, in this process."""
    import torch
    from torch import nn
    from torch._dynamo.utils import counters

    from fdmobilenet.config import OptimConfig, SchedConfig, TrainConfig
    from fdmobilenet.distributed import DistInfo
    from fdmobilenet.engine import Trainer, prepare_model
    from fdmobilenet.model import FDMobileNet
    from fdmobilenet.optim import build_optimizer, build_scheduler

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = DistInfo(0, 0, 1, torch.device("cpu"))
    cfg = TrainConfig(compile="off" if args.child == "eager" else "on", compile_backend=args.backend,
                      compile_dynamic="off" if args.child == "eager" else args.child)
    module = FDMobileNet(args.width)
    model = prepare_model(module, cfg, info)[0]
    optim_cfg = OptimConfig(batch_size=args.batch, base_batch_size=args.batch)
    optimizer = build_optimizer(module, optim_cfg, info.device)
    trainer = Trainer(model=model, module=module, optimizer=optimizer,
                      scheduler=build_scheduler(optimizer, optim_cfg, SchedConfig(), steps_per_epoch=10_000),
                      criterion=nn.CrossEntropyLoss(), info=info)

    def batch(size: int):
        return (torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 1000, (args.batch,)))

    def phase(kind: str, size: int) -> dict:
        images, labels = batch(size)
        if kind == "train":
            module.train()
            run = lambda: trainer.step(images, labels)     # noqa: E731
        else:
            module.eval()
            run = lambda: torch.no_grad()(model)(images)   # noqa: E731
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return {"phase": f"{kind} {size}", "first_s": times[0], "step_s": median(times[1:])}

    start = time.perf_counter()
    phases = []
    for size in [int(s) for s in args.sizes.split(",")]:
        phases += [phase("train", size), phase("eval", args.val_size)]
    return {"variant": args.child, "total_s": time.perf_counter() - start, "phases": phases,
            "graphs": counters["stats"]["unique_graphs"]}


def run_child(args: argparse.Namespace, variant: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
               "TORCHINDUCTOR_AUTOGRAD_CACHE": "0", "OMP_NUM_THREADS": str(args.threads)}
        words = [a for a in sys.argv[1:] if a not in ("--record",)]
        p = subprocess.run([sys.executable, __file__, *words, "--child", variant], env=env, capture_output=True,
                           text=True)
    if p.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for variant, results in runs.items():
        row = {"variant": variant, "total_s": f"{median(r['total_s'] for r in results):.1f}",
               "graphs": "/".join(str(r["graphs"]) for r in results)}
        for i in range(len(results[0]["phases"])):
            row[f"first {i}"] = f"{median(r['phases'][i]['first_s'] for r in results):.2f}"
            row[f"step {i}"] = f"{1000 * median(r['phases'][i]['step_s'] for r in results):.0f}"
        rows.append(row)
    return rows


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    meta = environment(sys.argv)
    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:   # rotated each round
            runs[v].append(run_child(args, v))
            print(f"round {r + 1}: {v} {runs[v][-1]['total_s']:.1f} s", flush=True)
    rows = summarize(runs)
    phases = [ph["phase"] for ph in runs[variants[0]][0]["phases"]]
    columns = [("variant", "compile_dynamic"), ("total_s", "total s"), ("graphs", "graphs")]
    columns += [(f"first {i}", f"1st {p} s") for i, p in enumerate(phases)]
    columns += [(f"step {i}", f"{p.split()[1]} ms/step") for i, p in enumerate(phases) if p.startswith("train")]
    table = markdown_table(rows, columns)
    meta["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    text = (f"{describe(meta)}\n\nFD-MobileNet {args.width:g}x, batch {args.batch}, {args.threads} torch thread(s), "
            f"backend {args.backend}: train sizes {args.sizes} ({args.steps} steps each), each followed by "
            f"{args.steps} eval batches at {args.val_size}; median of {args.rounds} rounds (fresh process and "
            f"inductor cache per variant and round); load average after: "
            f"{' / '.join(map(str, meta['load_avg_after']))}\n\n{table}\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    publish(fill(text), "torch.compile across training resolutions", args.record, "cpu")


if __name__ == "__main__":
    main()
