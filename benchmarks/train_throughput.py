"""Training throughput of FD-MobileNet: the model's compute ceiling and end-to-end rates with real loaders.

A step is the trainer's own (fdmobilenet.engine.Trainer.step: forward, loss, backward, SGD step, lr schedule
step) on a model prepared by engine.prepare_model (device, channels_last, torch.compile, DDP), so what is timed
here is what train_ddp.py runs.

* model-only (``--variants``): synthetic, device-resident batches (random values, two buffers in turn) - the
  ceiling no loader can beat. Variants: eager_fp32_nchw, channels_last, channels_last_bf16 (+ AMP bf16),
  compiled (+ torch.compile). They run interleaved (A B C D A B C D ...), one window each per round.
* end to end (``--loaders dali,torchvision``): pipelines.build_loader over the JPEGs under ``--data-root``,
  trained with ``--e2e-variant``, beside that variant's synthetic ceiling measured in the same process:
  e2e / ceiling says how data-bound training is. Loaders run one after the other, not interleaved: their
  queues fill while idle, and a window that starts on a full queue would time prefetched batches.

Timing: warm-up steps first (cuDNN autotuning, compilation; a compiled variant's first step is reported as
``first_step_s``), then ``--windows`` windows of wall time between device synchronisations; each window has
enough steps to last ``--window-s`` (from the warm-up step time). Reported: median img/s over the windows and
their spread, step time, peak device memory (torch.cuda.max_memory_allocated; n/a on CPU), and MFU = 3 x
forward FLOPs/image x img/s / the device's dense bf16 peak.

Under torchrun with ``--ddp`` every rank trains its own ``--batch-sizes`` batch in DistributedDataParallel and
rank 0 reports the slowest rank's windows (global img/s = world size x batch / step).

    python benchmarks/train_throughput.py --widths 1,0.5,0.25 --batch-sizes 256 --json out.json
    python benchmarks/train_throughput.py --variants none --loaders torchvision,dali --data-root data/photos
    torchrun --nproc_per_node 2 benchmarks/train_throughput.py --ddp --variants channels_last --threads 1
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from common import describe, environment, interleave, markdown_table, median, record, timed, write_json
from fdmobilenet.config import OptimConfig, SchedConfig, TrainConfig, choices, load_experiment
from fdmobilenet.distributed import DistInfo, init_distributed, resolve_device, shutdown
from fdmobilenet.engine import Trainer, make_grad_scaler, prepare_model, resolve_amp, setup_backends
from fdmobilenet.flops import count_macs
from fdmobilenet.model import FDMobileNet
from fdmobilenet.optim import build_optimizer, build_scheduler

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s. First match of the device name.
PEAK_BF16_DENSE = (("H100 PCIe", 756e12), ("H100 NVL", 835.5e12), ("H100", 989.4e12), ("H200 NVL", 835.5e12),
                   ("H200", 989.4e12), ("A100", 312e12))


@dataclass(frozen=True)
class Variant:
    channels_last: bool
    amp: bool
    compile: bool


VARIANTS = {
    "eager_fp32_nchw": Variant(channels_last=False, amp=False, compile=False),
    "channels_last": Variant(channels_last=True, amp=False, compile=False),
    "channels_last_bf16": Variant(channels_last=True, amp=True, compile=False),
    "compiled": Variant(channels_last=True, amp=True, compile=True),
}


def peak_bf16(device: torch.device) -> tuple[Optional[float], str]:
    if device.type != "cuda":
        return None, "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_DENSE:
        if key in name:
            return peak, f"{peak / 1e12:.1f} TFLOP/s dense bf16 ({key} datasheet)"
    return None, f"n/a (no datasheet peak known for {name})"


def matmul_bf16_rate(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matrix-product rate (FLOP/s, random operands, median of ``reps``): the attainable peak."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = [timed(lambda: a @ b, device) for _ in range(reps)]
    return 2 * n ** 3 / median(times)


# ------------------------------------------------------------------------------------------ model and step
def prepare(module: nn.Module, variant: Variant, info: DistInfo, backend: str) -> nn.Module:
    """engine.prepare_model with the variant's switches (``backend``: aot_eager for the --cpu smoke run,
    where inductor's C++ builds take minutes on 2 cores)."""
    cfg = TrainConfig(channels_last=variant.channels_last, compile="on" if variant.compile else "off",
                      compile_backend=backend)
    return prepare_model(module, cfg, info)[0]


def build_trainer(width: float, variant: Variant, info: DistInfo, backend: str) -> Trainer:
    """The paper's SGD (Nesterov, wd 4e-5, lr 0.1 per 256) and step schedule, as train_ddp.py builds them."""
    module = FDMobileNet(width_mult=width)
    model = prepare(module, variant, info, backend)
    optim_cfg = OptimConfig()
    optimizer = build_optimizer(module, optim_cfg, info.device)
    amp_dtype = resolve_amp("bf16" if variant.amp else "off", info.device)
    return Trainer(model=model, module=module, optimizer=optimizer,
                   scheduler=build_scheduler(optimizer, optim_cfg, SchedConfig(), steps_per_epoch=10_000),
                   criterion=nn.CrossEntropyLoss(), info=info, amp_dtype=amp_dtype,
                   scaler=make_grad_scaler(info.device, amp_dtype))


def synthetic_batches(batch: int, size: int, dtype: torch.dtype, channels_last: bool,
                      device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Two random device-resident batches in turn (random, not zeros: zeros can run faster than data)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pool = [(torch.randn(batch, 3, size, size, device=device).to(dtype).contiguous(memory_format=fmt),
             torch.randint(0, 1000, (batch,), device=device)) for _ in range(2)]
    i = 0
    while True:
        yield pool[i % 2]
        i += 1


def endless(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches across epoch boundaries, calling set_epoch as the trainer does."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class Runner:
    """One trainer on one batch source: warm-up, then timed windows (each a callable for interleave)."""

    def __init__(self, trainer: Trainer, batches: Iterator, batch: int, info: DistInfo):
        self.t, self.batches, self.batch, self.info = trainer, batches, batch, info
        self.steps = 1
        self.first_step_s: Optional[float] = None
        self.loss = None
        self.peak_bytes = 0

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.loss, _ = self.t.step(*next(self.batches))

    def warm_up(self, steps: int, window_s: float) -> None:
        self.first_step_s = timed(lambda: self.run(1), self.info.device)
        self.run(max(0, steps - 2))
        step_s = timed(lambda: self.run(1), self.info.device)
        wanted = torch.tensor(float(min(200, max(2, math.ceil(window_s / step_s)))))
        if self.info.distributed:    # every rank must run the same number of steps
            dist.all_reduce(wanted, op=dist.ReduceOp.MAX, group=self.info.control_group)
        self.steps = int(wanted.item())

    def window(self) -> float:
        device = self.info.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if self.info.distributed:
            dist.barrier(group=self.info.control_group)
        seconds = timed(lambda: self.run(self.steps), device)
        if self.info.distributed:    # the slowest rank sets the pace
            s = torch.tensor(seconds)
            dist.all_reduce(s, op=dist.ReduceOp.MAX, group=self.info.control_group)
            seconds = float(s.item())
        if device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(device))
        return seconds

    def result(self, windows: list[float], fwd_flops: int, peak: Optional[float]) -> dict:
        loss = float(self.loss.item())
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite training loss {loss} while benchmarking: the numbers are void")
        rates = [self.batch * self.steps * self.info.world_size / w for w in windows]
        img_s = median(rates)
        row = {"img_s": round(img_s, 1), "step_ms": round(1e3 * median(windows) / self.steps, 3),
               "steps_per_window": self.steps, "windows_img_s": [round(r, 1) for r in rates],
               "spread_pct": round(100 * (max(rates) - min(rates)) / img_s, 1),
               "peak_mem_mib": round(self.peak_bytes / 2**20) if self.info.device.type == "cuda" else "n/a",
               "mfu_pct": round(100 * 3 * fwd_flops * img_s / peak, 2) if peak else "n/a",
               "first_step_s": round(self.first_step_s, 2), "loss": round(loss, 3)}
        return row


# ------------------------------------------------------------------------------------------------ phases
def model_only(args, info: DistInfo, width: float, batch: int, fwd_flops: int, peak: Optional[float]) -> list:
    runners = {}
    for name in args.variants:
        v = VARIANTS[name]
        # the dtype a loader hands over under AMP on CUDA (float16); fp32 variants take fp32 images
        dtype = torch.float16 if (v.amp and info.device.type == "cuda") else torch.float32
        r = Runner(build_trainer(width, v, info, args.compile_backend),
                   synthetic_batches(batch, args.image_size, dtype, v.channels_last, info.device), batch, info)
        r.warm_up(args.warmup, args.window_s)
        runners[name] = r
    windows = interleave({name: r.window for name, r in runners.items()}, args.windows)
    rows = []
    for name, r in runners.items():
        row = r.result(windows[name], fwd_flops, peak)
        if VARIANTS[name].compile:   # the first step's excess over a steady step
            row["compile_s"] = round(row["first_step_s"] - row["step_ms"] / 1e3, 2)
        rows.append({"mode": "ddp" if args.ddp else "model-only", "width": width, "batch": batch,
                     "world_size": info.world_size, "variant": name, "data": "synthetic", **row})
        if info.distributed:
            rows[-1]["allreduce_ms"] = round(1e3 * allreduce_seconds(r.t.module, info), 3)
    return rows


def allreduce_seconds(module: nn.Module, info: DistInfo, reps: int = 20) -> float:
    """Median time of one all-reduce of all gradients as one fp32 buffer (what DDP's buckets carry per step,
    without overlap with the backward pass)."""
    grads = torch.randn(sum(p.numel() for p in module.parameters()), device=info.device)
    for _ in range(3):
        dist.all_reduce(grads)
    times = []
    for _ in range(reps):
        dist.barrier()
        times.append(timed(lambda: dist.all_reduce(grads), info.device))
    return median(times)


def end_to_end(args, info: DistInfo, width: float, batch: int, fwd_flops: int, peak: Optional[float],
               flush: Callable[[dict], None]) -> None:
    """The e2e variant's synthetic ceiling, then each loader in turn feeding that same trainer. Loaders are
    built per width and closed after it: the ceiling runs while no loader's workers or threads compete for
    the CPU, and each width's rows are flushed before the next width starts."""
    import pipelines
    from pipelines.base import image_dtype

    def data_config(loader_name: str):
        return load_experiment(overrides=[
            f"data.root={args.data_root}", f"data.loader={loader_name}", f"data.crop_size={args.image_size}",
            f"data.num_threads={args.loader_threads}", *args.set]).data

    v = VARIANTS[args.e2e_variant]
    dtype = image_dtype(data_config(args.loaders[0]), info.device)   # what the loaders hand over
    ceiling = Runner(build_trainer(width, v, info, args.compile_backend),
                     synthetic_batches(batch, args.image_size, dtype, v.channels_last, info.device), batch, info)
    ceiling.warm_up(args.warmup, args.window_s)
    c = ceiling.result([ceiling.window() for _ in range(args.windows)], fwd_flops, peak)
    for loader_name in args.loaders:
        data = data_config(loader_name)
        started = time.perf_counter()
        loader = pipelines.build_loader(data, "train", batch, rank=info.rank, world_size=info.world_size,
                                        local_rank=info.local_rank, device=info.device)
        batches = endless(loader)
        next(batches)
        start_s = time.perf_counter() - started
        # batches queued while the warm-up starts (DataLoader: workers x prefetch factor; DALI: queue depth)
        # are drained by it, so that no timed window starts on a full queue
        queued = data.prefetch_queue_depth * (data.num_threads if loader_name == "torchvision" else 1)
        e2e = Runner(ceiling.t, batches, batch, info)
        e2e.warm_up(args.warmup + queued, args.window_s)
        row = e2e.result([e2e.window() for _ in range(args.windows)], fwd_flops, peak)
        row.update({"mode": "end-to-end", "width": width, "batch": batch, "world_size": info.world_size,
                    "variant": args.e2e_variant, "data": loader_name, "loader_threads": data.num_threads,
                    "loader_start_s": round(start_s, 2), "ceiling_img_s": c["img_s"],
                    "e2e_vs_ceiling": round(row["img_s"] / c["img_s"], 3)})
        flush(row)
        batches.close()
        del loader, batches, e2e
        gc.collect()   # ends the DataLoader's persistent workers / the DALI pipeline before the next loader


# ------------------------------------------------------------------------------------------------ output
COLUMNS = (("mode", "mode"), ("width", "width"), ("batch", "batch/rank"), ("world_size", "ranks"),
           ("variant", "variant"), ("data", "data"), ("img_s", "img/s"), ("step_ms", "step ms"),
           ("spread_pct", "spread %"), ("peak_mem_mib", "peak MiB"), ("mfu_pct", "MFU %"),
           ("first_step_s", "1st step s"), ("compile_s", "compile s"), ("ceiling_img_s", "ceiling img/s"),
           ("e2e_vs_ceiling", "e2e/ceiling"), ("allreduce_ms", "all-reduce ms"))


def report_markdown(result: dict) -> str:
    m = result["meta"]
    lines = [describe(m), "",
             f"MFU peak: {result['peak']}; measured bf16 matmul: {result.get('matmul_bf16_tflops', 'n/a')} "
             f"TFLOP/s. Forward MACs/image: "
             + ", ".join(f"{w}x {macs:,}" for w, macs in result["macs_per_image"].items())
             + f". Windows: {result['settings']['windows']} x ~{result['settings']['window_s']} s, median. "
               f"fp32 variants run with TF32 allowed on CUDA (the trainer's setup_backends). "
               f"Peak RSS {result.get('peak_rss_mib', '?')} MiB.", "",
             markdown_table(result["rows"], COLUMNS)]
    if result.get("errors"):
        lines += ["", "Errors: " + "; ".join(result["errors"])]
    return "\n".join(lines)


def csv_list(kind):
    def parse(text: str):
        return [] if text in ("", "none") else [kind(x) for x in text.split(",")]
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--widths", type=csv_list(float), default=[1.0, 0.5, 0.25])
    ap.add_argument("--batch-sizes", type=csv_list(int), default=[256], help="per rank, comma-separated")
    ap.add_argument("--variants", type=csv_list(str), default=list(VARIANTS),
                    help=f"model-only variants, comma-separated, or none ({', '.join(VARIANTS)})")
    ap.add_argument("--loaders", type=csv_list(str), default=[],
                    help="end-to-end loaders, run in this order: torchvision, dali (comma-separated; default "
                         "none). torchvision first: its workers fork before DALI starts threads")
    ap.add_argument("--e2e-widths", type=csv_list(float), default=None, help="default: --widths")
    ap.add_argument("--e2e-variant", default="auto",
                    help="variant for end to end; auto = the trainer's defaults (compiled on CUDA, "
                         "channels_last fp32 on CPU)")
    ap.add_argument("--data-root", help="ImageFolder root holding train/ (for --loaders)")
    ap.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE",
                    help="extra config overrides for the loaders (repeatable)")
    ap.add_argument("--loader-threads", type=int, default=0,
                    help="data.num_threads (DALI threads / DataLoader workers); default: all usable cores")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps per variant (default 5)")
    ap.add_argument("--windows", type=int, default=3, help="timed windows per variant (default 3)")
    ap.add_argument("--window-s", type=float, default=0.5, help="target seconds per window (default 0.5)")
    ap.add_argument("--compile-backend", default="inductor", choices=choices(TrainConfig, "compile_backend"),
                    help="torch.compile backend (default inductor)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--ddp", action="store_true", help="under torchrun: DDP across the ranks (model-only)")
    ap.add_argument("--json", help="write the results here (rewritten after every width)")
    ap.add_argument("--md", help="write the markdown table here")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    for name in args.variants + ([args.e2e_variant] if args.e2e_variant != "auto" else []):
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    for name in args.loaders:
        if name not in ("dali", "torchvision"):
            ap.error(f"unknown loader {name!r}; choose dali or torchvision")
    if args.loaders and not args.data_root:
        ap.error("--loaders needs --data-root (an ImageFolder root with train/)")
    if args.ddp and args.loaders:
        ap.error("--ddp measures model-only steps; end to end under DDP is train_ddp.py's job")
    if args.loaders and not args.loader_threads:
        args.loader_threads = len(os.sched_getaffinity(0))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed(args.device) if args.ddp else DistInfo(0, 0, 1, resolve_device(args.device, 0))
    if args.e2e_variant == "auto":
        args.e2e_variant = "compiled" if info.device.type == "cuda" else "channels_last"
    setup_backends(info.device, deterministic=False)
    peak, peak_text = peak_bf16(info.device)
    widths = sorted(set(args.widths + (args.e2e_widths or [])), reverse=True)
    command_argv = sys.argv if argv is None else [sys.argv[0], *argv]
    result = {"meta": environment(command_argv), "peak": peak_text,
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "md", "record")},
              "macs_per_image": {w: count_macs(FDMobileNet(w), args.image_size) for w in widths},
              "rows": [], "errors": []}
    if "LOCAL_WORLD_SIZE" in os.environ:   # started by torchrun: record the command that starts all ranks
        local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
        result["meta"]["command"] = shlex.join([sys.executable, "-m", "torch.distributed.run",
                                                f"--nproc_per_node={local}", f"--nnodes={world // local}",
                                                *command_argv])
    flops = {w: 2 * macs for w, macs in result["macs_per_image"].items()}
    if info.device.type == "cuda":
        result["matmul_bf16_tflops"] = round(matmul_bf16_rate(info.device) / 1e12, 1)

    def flush(row: Optional[dict] = None) -> None:
        if row is not None:
            result["rows"].append(row)
            if info.is_main:
                table = markdown_table([row], COLUMNS).splitlines()
                print("\n".join(table if len(result["rows"]) == 1 else table[-1:]), flush=True)
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if args.json and info.is_main:
            write_json(args.json, result)

    def attempt(what: str, fn: Callable[[], None]) -> None:
        """A failing width or loader is recorded and the others still run (partial results beat none)."""
        try:
            fn()
        except Exception as e:
            if info.distributed:
                raise   # the other ranks would wait in a collective: fail the whole job
            result["errors"].append(f"{what}: {type(e).__name__}: {e}")
            traceback.print_exc()
        if info.device.type == "cuda":
            torch.cuda.empty_cache()

    try:
        for batch in args.batch_sizes:
            for width in args.widths if args.variants else []:
                attempt(f"model-only {width}x batch {batch}",
                        lambda: [flush(row) for row in model_only(args, info, width, batch, flops[width], peak)])
            for width in args.e2e_widths or args.widths if args.loaders else []:
                attempt(f"end-to-end {width}x batch {batch}",
                        lambda: end_to_end(args, info, width, batch, flops[width], peak, flush))
    finally:
        flush()
        shutdown()
    if info.is_main:
        text = report_markdown(result)
        print(text)
        if args.md:
            Path(args.md).write_text(text + "\n")
        if args.record:
            kind = "GPU" if info.device.type == "cuda" else "CPU"
            record(f"Training throughput ({kind})", text)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
