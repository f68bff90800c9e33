"""Training throughput of FD-MobileNet: the model's compute ceiling and end-to-end rates with real loaders.

A step is the trainer's own (fdmobilenet.engine.Trainer.step: forward, loss, backward, SGD step, lr schedule
step, or fdmobilenet.cuda_graph.GraphedStep for the graphed variant) on a model prepared by
engine.prepare_model (device, channels_last, torch.compile, DDP), so what is timed here is what train_ddp.py
runs.

* model-only (``--variants``): synthetic, device-resident batches (random values, two buffers in turn) - the
  ceiling no loader can beat. Variants: eager_fp32_nchw, channels_last, channels_last_bf16 (+ AMP bf16),
  compiled (+ torch.compile), and on CUDA compiled_cuda_graphs (compiled + the whole step as one CUDA graph,
  train.cuda_graphs=on) and reduce_overhead (torch.compile(mode="reduce-overhead"): inductor's own CUDA graphs
  of forward and backward, the optimizer eager). They run interleaved (A B C ... A B C ...), one window each
  per round.
* end to end (``--loaders dali,torchvision``): pipelines.build_loader over the JPEGs under ``--data-root``,
  trained with ``--e2e-variant``, beside that variant's synthetic ceiling measured in the same process:
  e2e / ceiling says how data-bound training is. The loaders get the trainer's ``auto`` settings unless
  ``--loader-threads`` or ``--dali-settings 0.65:4,0.99:auto`` (CUDA: DALI once per hw_decoder_load:threads
  pair) say otherwise. Loaders run one after the other, not interleaved: their queues fill while idle, and a
  window that starts on a full queue would time prefetched batches. While a DALI row's windows run on CUDA,
  NVML samples the hardware JPEG engines' utilisation (pipelines.hw_decoder): the proof that
  hw_decoder_load reached them.

Compilation: every torch.compile here is ``dynamic=False`` (each measurement's shapes are fixed: a second
batch size gets its own static graph, not a dynamic-shape one), dynamo's recompile limit is raised to
RECOMPILE_LIMIT and reaching it is an error instead of dynamo's silent fall-back to eager code. Each
compiled row reports the graphs dynamo compiled for it, inductor's FX-graph cache hits and misses (one cache
directory, TORCHINDUCTOR_CACHE_DIR, serves every process of benchmarks/run_gpu.sh), graph breaks, and the
graphs compiled inside its timed windows, which must be 0: a row that compiled while timed is an error.

Timing: warm-up steps first (cuDNN autotuning, compilation, graph capture; a compiled variant's first step is
reported as ``first_step_s``), then ``--windows`` windows of wall time between device synchronisations; each
window has enough steps to last ``--window-s`` (from the warm-up step time). Reported: median img/s over the
windows and their spread, step time, the share of the window spent waiting for the next batch (data wait),
peak memory (torch's peak allocation, and the device's used memory - torch's reserve, DALI's pools, the CUDA
context - from cudaMemGetInfo after each window; n/a on CPU), MFU = 3 x forward FLOPs/image x img/s / the
device's dense bf16 peak, and the activation traffic rate: fdmobilenet.flops' model of the bytes a step
moves per image x img/s, against the datasheet bandwidth and a measured device-to-device copy.

Under torchrun with ``--ddp`` every rank trains its own ``--batch-sizes`` batch in DistributedDataParallel and
rank 0 reports the slowest rank's windows (global img/s = world size x batch / step).

    python benchmarks/train_throughput.py --widths 1,0.5,0.25 --batch-sizes 256,512 --json out.json
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
from statistics import median
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from common import describe, endless, environment, interleave, markdown_table, publish, timed, write_json
from fdmobilenet.config import OptimConfig, SchedConfig, TrainConfig, choices, load_experiment
from fdmobilenet.cuda_graph import GraphedStep
from fdmobilenet.distributed import DistInfo, init_distributed, resolve_device, shutdown
from fdmobilenet.engine import Trainer, make_grad_scaler, prepare_model, resolve_amp, setup_backends
from fdmobilenet.flops import ACTIVATION_ACCESSES, activation_elements, count_macs
from fdmobilenet.model import FDMobileNet
from fdmobilenet.optim import build_optimizer, build_scheduler

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s. First match of the device name.
PEAK_BF16_DENSE = (("H100 PCIe", 756e12), ("H100 NVL", 835.5e12), ("H100", 989.4e12), ("H200 NVL", 835.5e12),
                   ("H200", 989.4e12), ("A100", 312e12))
# Memory bandwidth from the same datasheets, bytes/s. First match of the device name.
PEAK_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12),
                  ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12))


@dataclass(frozen=True)
class Variant:
    channels_last: bool
    amp: bool
    compile: bool
    compile_mode: str = "default"
    cuda_graphs: bool = False       # the whole step as one CUDA graph (fdmobilenet.cuda_graph)


VARIANTS = {
    "eager_fp32_nchw": Variant(channels_last=False, amp=False, compile=False),
    "channels_last": Variant(channels_last=True, amp=False, compile=False),
    "channels_last_bf16": Variant(channels_last=True, amp=True, compile=False),
    "compiled": Variant(channels_last=True, amp=True, compile=True),
    "compiled_cuda_graphs": Variant(channels_last=True, amp=True, compile=True, cuda_graphs=True),
    "reduce_overhead": Variant(channels_last=True, amp=True, compile=True, compile_mode="reduce-overhead"),
}
GPU_ONLY = ("compiled_cuda_graphs", "reduce_overhead")   # CUDA graphs, of either kind


def datasheet(table, device: torch.device, unit: float, what: str) -> tuple[Optional[float], str]:
    """First entry of ``table`` whose key is in the device's name: (value, description)."""
    if device.type != "cuda":
        return None, "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, value in table:
        if key in name:
            return value, f"{value / unit:g} {what} ({key} datasheet)"
    return None, f"n/a (no datasheet figure known for {name})"


def peak_bf16(device: torch.device) -> tuple[Optional[float], str]:
    return datasheet(PEAK_BF16_DENSE, device, 1e12, "TFLOP/s dense bf16")


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Measured device-to-device copy rate (bytes read + written per second, median of ``reps``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return 2 * nbytes / median([timed(lambda: dst.copy_(src), device) for _ in range(reps)])


def matmul_bf16_rate(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matrix-product rate (FLOP/s, random operands, median of ``reps``): the attainable peak."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = [timed(lambda: a @ b, device) for _ in range(reps)]
    return 2 * n ** 3 / median(times)


# ------------------------------------------------------------------------------------------ model and step
def prepare(module: nn.Module, variant: Variant, info: DistInfo, backend: str) -> nn.Module:
    """engine.prepare_model with the variant's switches, static shapes (``backend``: aot_eager for the --cpu
    smoke run, where inductor's C++ builds take minutes on 2 cores)."""
    cfg = TrainConfig(channels_last=variant.channels_last, compile="on" if variant.compile else "off",
                      compile_backend=backend, compile_mode=variant.compile_mode, compile_dynamic="off")
    return prepare_model(module, cfg, info)[0]


# ------------------------------------------------------------------------------------------ compilation
RECOMPILE_LIMIT = 64   # dynamo's default is 8 per code object; each width x batch x compile mode is one entry


def refuse_eager_fallback() -> dict:
    """Raise dynamo's recompile limit above what one process here compiles, and make reaching it an error:
    by default dynamo then runs the frame eagerly with a warning, and a 'compiled' row would time eager code.
    Returns the settings, for the results."""
    import torch._dynamo.config as dynamo
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"   # before 2.6
    fail = next((name for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")
                 if hasattr(dynamo, name)), None)
    setattr(dynamo, limit, RECOMPILE_LIMIT)
    if fail:
        setattr(dynamo, fail, True)
    return {"recompile_limit": RECOMPILE_LIMIT, "limit_hit_is_an_error": fail is not None,
            "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(torch's default)")}


def compile_counters() -> dict[str, int]:
    """dynamo's and inductor's process-wide counters of what was compiled, and from where."""
    from torch._dynamo.utils import counters
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "fx_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
            "fx_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def counted_since(before: dict[str, int]) -> dict[str, int]:
    return {key: value - before[key] for key, value in compile_counters().items()}


def compile_columns(built: dict[str, int], in_windows: dict[str, int]) -> dict:
    """A compiled row's columns: what its build and warm-up compiled, and what its timed windows did."""
    return {"graphs": built["graphs"], "graph_breaks": built["graph_breaks"],
            "fx_cache": f"{built['fx_cache_hits']} hit / {built['fx_cache_misses']} miss",
            "graphs_in_windows": in_windows["graphs"]}


def step_of(trainer: Trainer, variant: Variant):
    """The step function train_ddp.py would run for this variant."""
    return GraphedStep(trainer).step if variant.cuda_graphs else trainer.step


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


def synthetic_dtype(variant: Variant, device: torch.device) -> torch.dtype:
    """The dtype a loader hands over under AMP on CUDA (float16); fp32 variants take fp32 images."""
    return torch.float16 if (variant.amp and device.type == "cuda") else torch.float32


def loader_config(data_root: str, loader: str, image_size: int, overrides: list[str], device: torch.device):
    """(data config, the knobs 'auto' resolved) of ``loader`` over the ImageFolder ``data_root``."""
    import pipelines
    data = load_experiment(overrides=[f"data.root={data_root}", f"data.loader={loader}",
                                      f"data.crop_size={image_size}", *overrides]).data
    return pipelines.resolve_loader_defaults(data, device)


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



@dataclass
class Cost:
    """Per-image work of one width and variant: what MFU and the activation traffic rate are made of."""
    fwd_flops: int
    activation_bytes: int         # ACTIVATION_ACCESSES x activation elements x element size
    peak_flops: Optional[float]
    peak_bandwidth: Optional[float]

    def rates(self, img_s: float) -> dict:
        traffic = self.activation_bytes * img_s
        return {"mfu_pct": round(100 * 3 * self.fwd_flops * img_s / self.peak_flops, 2) if self.peak_flops else "n/a",
                "act_mb_img": round(self.activation_bytes / 1e6, 2), "act_tb_s": round(traffic / 1e12, 3),
                "bw_pct": round(100 * traffic / self.peak_bandwidth, 1) if self.peak_bandwidth else "n/a"}


class Runner:
    """One step function on one batch source: warm-up, then timed windows (each a callable for interleave)."""

    def __init__(self, step: Callable, batches: Iterator, batch: int, info: DistInfo):
        self.step, self.batches, self.batch, self.info = step, batches, batch, info
        self.steps = 1
        self.first_step_s: Optional[float] = None
        self.loss = None
        self.peak_bytes = self.device_used = 0
        self.waited = 0.0
        self.wait_shares: list[float] = []

    def run(self, steps: int) -> None:
        for _ in range(steps):
            fetch = time.perf_counter()
            batch = next(self.batches)
            self.waited += time.perf_counter() - fetch
            self.loss, _ = self.step(*batch)

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
        self.waited = 0.0
        seconds = timed(lambda: self.run(self.steps), device)
        self.wait_shares.append(self.waited / seconds)
        if self.info.distributed:    # the slowest rank sets the pace
            s = torch.tensor(seconds)
            dist.all_reduce(s, op=dist.ReduceOp.MAX, group=self.info.control_group)
            seconds = float(s.item())
        if device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(device))
            free, total = torch.cuda.mem_get_info(device)
            self.device_used = max(self.device_used, total - free)
        return seconds

    def result(self, windows: list[float], cost: Cost) -> dict:
        loss = float(self.loss.item())
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite training loss {loss} while benchmarking: the numbers are void")
        rates = [self.batch * self.steps * self.info.world_size / w for w in windows]
        img_s = median(rates)
        cuda = self.info.device.type == "cuda"
        row = {"img_s": round(img_s, 1), "step_ms": round(1e3 * median(windows) / self.steps, 3),
               "steps_per_window": self.steps, "windows_img_s": [round(r, 1) for r in rates],
               "spread_pct": round(100 * (max(rates) - min(rates)) / img_s, 1),
               "data_wait_pct": round(100 * median(self.wait_shares[-len(windows):]), 1),
               "peak_mem_mib": round(self.peak_bytes / 2**20) if cuda else "n/a",
               "device_used_mib": round(self.device_used / 2**20) if cuda else "n/a",
               "first_step_s": round(self.first_step_s, 2), "loss": round(loss, 3)}
        return {**row, **cost.rates(img_s)}


# ------------------------------------------------------------------------------------------------ phases
def model_only(args, info: DistInfo, width: float, batch: int, cost: Callable[[Variant], Cost]) -> list:
    trainers, runners, built = {}, {}, {}
    for name in args.variants:
        v = VARIANTS[name]
        dtype = synthetic_dtype(v, info.device)
        before = compile_counters()
        trainers[name] = t = build_trainer(width, v, info, args.compile_backend)
        r = Runner(step_of(t, v), synthetic_batches(batch, args.image_size, dtype, v.channels_last, info.device),
                   batch, info)
        r.warm_up(args.warmup, args.window_s)
        runners[name] = r
        built[name] = counted_since(before)
    before = compile_counters()
    windows = interleave({name: r.window for name, r in runners.items()}, args.windows)
    in_windows = counted_since(before)
    rows = []
    for name, r in runners.items():
        row = r.result(windows[name], cost(VARIANTS[name]))
        if VARIANTS[name].compile:   # the first step's excess over a steady step
            row["compile_s"] = round(row["first_step_s"] - row["step_ms"] / 1e3, 2)
            row.update(compile_columns(built[name], in_windows))
        if VARIANTS[name].compile_mode == "reduce-overhead":   # inductor falls back to no graph when it must
            row["cudagraph_skips"] = built[name]["cudagraph_skips"]
        rows.append({"mode": "ddp" if args.ddp else "model-only", "width": width, "batch": batch,
                     "world_size": info.world_size, "variant": name, "data": "synthetic", **row})
        if info.distributed:
            rows[-1]["allreduce_ms"] = round(1e3 * allreduce_seconds(trainers[name].module, info), 3)
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


def loader_settings(args, device: torch.device) -> list[tuple[str, str, list[str]]]:
    """(loader, row label, config overrides) of every end-to-end row, in --loaders order."""
    settings = []
    for name in args.loaders:
        if name == "dali" and device.type == "cuda" and args.dali_settings:
            settings += [("dali", f"dali hw {hw:g}, {threads} thr",
                          [f"data.hw_decoder_load={hw}", f"data.num_threads={threads}"])
                         for hw, threads in args.dali_settings]
        else:
            settings.append((name, name, [f"data.num_threads={args.loader_threads}"]))
    return settings


def jpeg_engine_columns(use) -> dict:
    """A DALI row's NVML samples of the hardware JPEG engines (pipelines.hw_decoder.JpegEngineUse)."""
    return {"jpeg_engine_max_pct": max(use.samples) if use.samples else "n/a", "jpeg_engines": use.summary()}


def end_to_end(args, info: DistInfo, width: float, batch: int, cost: Cost, flush: Callable[[dict], None]) -> None:
    """The e2e variant's synthetic ceiling, then each loader setting in turn feeding that same trainer.
    Loaders are built per width and closed after it: the ceiling runs while no loader's workers or threads
    compete for the CPU, and each row is flushed before the next loader starts."""
    import pipelines
    from pipelines.base import image_dtype
    from pipelines.hw_decoder import JpegEngineSampler

    def data_config(loader_name: str, overrides: list[str]):
        return loader_config(args.data_root, loader_name, args.image_size, [*overrides, *args.set], info.device)[0]

    v = VARIANTS[args.e2e_variant]
    settings = loader_settings(args, info.device)
    dtype = image_dtype(data_config(*settings[0][::2]), info.device)   # what the loaders hand over
    before = compile_counters()
    trainer = build_trainer(width, v, info, args.compile_backend)
    step = step_of(trainer, v)
    ceiling = Runner(step, synthetic_batches(batch, args.image_size, dtype, v.channels_last, info.device),
                     batch, info)
    ceiling.warm_up(args.warmup, args.window_s)
    built = counted_since(before)
    before = compile_counters()
    c = ceiling.result([ceiling.window() for _ in range(args.windows)], cost)
    ceiling_compile = compile_columns(built, counted_since(before)) if v.compile else {}
    cuda_index = (info.device.index or 0) if info.device.type == "cuda" else None
    for loader_name, label, overrides in settings:
        data = data_config(loader_name, overrides)
        started = time.perf_counter()
        loader = pipelines.build_loader(data, "train", batch, rank=info.rank, world_size=info.world_size,
                                        local_rank=info.local_rank, device=info.device)
        batches = endless(loader)
        next(batches)
        start_s = time.perf_counter() - started
        # batches queued while the warm-up starts (DataLoader: workers x prefetch factor; DALI: queue depth)
        # are drained by it, so that no timed window starts on a full queue
        queued = data.prefetch_queue_depth * (data.num_threads if loader_name == "torchvision" else 1)
        e2e = Runner(step, batches, batch, info)
        before = compile_counters()
        e2e.warm_up(args.warmup + queued, args.window_s)
        built = counted_since(before)
        before = compile_counters()
        with JpegEngineSampler(cuda_index if loader_name == "dali" else None) as jpeg_use:
            windows = [e2e.window() for _ in range(args.windows)]
        row = e2e.result(windows, cost)
        row.update({"mode": "end-to-end", "width": width, "batch": batch, "world_size": info.world_size,
                    "variant": args.e2e_variant, "data": label, "loader": loader_name,
                    "loader_threads": data.num_threads, "prefetch": data.prefetch_queue_depth,
                    "hw_decoder_load": data.hw_decoder_load if loader_name == "dali" else "-",
                    "loader_start_s": round(start_s, 2), "ceiling_img_s": c["img_s"],
                    "e2e_vs_ceiling": round(row["img_s"] / c["img_s"], 3), "ceiling_compile": ceiling_compile,
                    **(compile_columns(built, counted_since(before)) if v.compile else {}),
                    **(jpeg_engine_columns(jpeg_use) if loader_name == "dali" else {})})
        flush(row)
        batches.close()
        del loader, batches, e2e
        gc.collect()   # ends the DataLoader's persistent workers / the DALI pipeline before the next loader


# ------------------------------------------------------------------------------------------------ output
COLUMNS = (("mode", "mode"), ("width", "width"), ("batch", "batch/rank"), ("world_size", "ranks"),
           ("variant", "variant"), ("data", "data"), ("img_s", "img/s"), ("step_ms", "step ms"),
           ("spread_pct", "spread %"), ("data_wait_pct", "data wait %"), ("peak_mem_mib", "peak MiB"),
           ("device_used_mib", "device used MiB"), ("mfu_pct", "MFU %"), ("act_tb_s", "act. TB/s"),
           ("bw_pct", "% of bandwidth"), ("first_step_s", "1st step s"), ("compile_s", "compile s"),
           ("cudagraph_skips", "graph skips"), ("graphs", "graphs compiled"), ("fx_cache", "FX cache"),
           ("graph_breaks", "graph breaks"), ("graphs_in_windows", "graphs in windows"),
           ("ceiling_img_s", "ceiling img/s"), ("e2e_vs_ceiling", "e2e/ceiling"),
           ("jpeg_engine_max_pct", "JPEG engines max %"), ("allreduce_ms", "all-reduce ms"))


def report_markdown(result: dict) -> str:
    m = result["meta"]
    lines = [describe(m), "",
             f"MFU peak: {result['peak']}; measured bf16 matmul: {result.get('matmul_bf16_tflops', 'n/a')} "
             f"TFLOP/s. Bandwidth: {result['bandwidth']}; measured device-to-device copy: "
             f"{result.get('copy_tb_s', 'n/a')} TB/s. Forward MACs/image: "
             + ", ".join(f"{w}x {macs:,}" for w, macs in result["macs_per_image"].items())
             + f". Activation traffic model (fdmobilenet.flops): {ACTIVATION_ACCESSES} accesses x "
             + ", ".join(f"{w}x {n:,}" for w, n in result["activation_elements"].items())
             + f" elements/image x 2 bytes (bf16 variants) or 4 (fp32). Windows: {result['settings']['windows']} x "
               f"~{result['settings']['window_s']} s, median. "
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


def hw_threads(text: str) -> tuple[float, int | str]:
    hw, threads = text.split(":")
    return float(hw), threads if threads == "auto" else int(threads)


def threads_or_auto(text: str) -> int | str:
    return text if text == "auto" else int(text)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--widths", type=csv_list(float), default=[1.0, 0.5, 0.25])
    ap.add_argument("--batch-sizes", type=csv_list(int), default=[256], help="per rank, comma-separated")
    ap.add_argument("--variants", type=csv_list(str), default=None,
                    help=f"model-only variants, comma-separated, or none ({', '.join(VARIANTS)}; default: all, "
                         f"on CPU all but {', '.join(GPU_ONLY)})")
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
    ap.add_argument("--loader-threads", type=threads_or_auto, default="auto",
                    help="data.num_threads (DALI threads / DataLoader workers); default auto: the trainer's rule "
                         "(pipelines.defaults)")
    ap.add_argument("--dali-settings", type=csv_list(hw_threads), default=[], metavar="HW:THREADS,...",
                    help="CUDA: DALI end to end once per hw_decoder_load:num_threads pair, e.g. 0.65:4,0.99:auto "
                         "(default: one DALI row with --loader-threads and the auto hw_decoder_load)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps per variant (default 5)")
    ap.add_argument("--windows", type=int, default=3, help="timed windows per variant (default 3)")
    ap.add_argument("--window-s", type=float, default=0.5, help="target seconds per window (default 0.5)")
    ap.add_argument("--compile-backend", default="inductor", choices=choices(TrainConfig, "compile_backend"),
                    help="torch.compile backend (default inductor)")
    ap.add_argument("--device", default="auto", choices=choices(TrainConfig, "device"))
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--ddp", action="store_true", help="under torchrun: DDP across the ranks (model-only)")
    ap.add_argument("--json", help="write the results here (rewritten after every width)")
    ap.add_argument("--md", help="write the markdown table here")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if args.variants is None:
        args.variants = [name for name, v in VARIANTS.items()
                         if (cuda or name not in GPU_ONLY) and not (args.ddp and v.cuda_graphs)]
    for name in args.variants + ([args.e2e_variant] if args.e2e_variant != "auto" else []):
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        if name in GPU_ONLY and not cuda:
            ap.error(f"variant {name} uses CUDA graphs and needs a GPU")
        if args.ddp and VARIANTS[name].cuda_graphs:   # what train.cuda_graphs=on refuses (use_cuda_graphs)
            ap.error(f"variant {name} is one-GPU only: DDP's all-reduce is not captured")
    for name in args.loaders:
        if name not in ("dali", "torchvision"):
            ap.error(f"unknown loader {name!r}; choose dali or torchvision")
    if args.loaders and not args.data_root:
        ap.error("--loaders needs --data-root (an ImageFolder root with train/)")
    if args.ddp and args.loaders:
        ap.error("--ddp measures model-only steps; end to end under DDP is train_ddp.py's job")
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
    bandwidth, bandwidth_text = datasheet(PEAK_BANDWIDTH, info.device, 1e12, "TB/s")
    widths = sorted(set(args.widths + (args.e2e_widths or [])), reverse=True)
    command_argv = sys.argv if argv is None else [sys.argv[0], *argv]
    result = {"meta": environment(command_argv), "peak": peak_text, "bandwidth": bandwidth_text,
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "md", "record")},
              "macs_per_image": {w: count_macs(FDMobileNet(w), args.image_size) for w in widths},
              "activation_elements": {w: activation_elements(FDMobileNet(w), args.image_size) for w in widths},
              "rows": [], "errors": []}
    if "LOCAL_WORLD_SIZE" in os.environ:   # started by torchrun: record the command that starts all ranks
        local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
        result["meta"]["command"] = shlex.join(["python", "-m", "torch.distributed.run",
                                                f"--nproc_per_node={local}", f"--nnodes={world // local}",
                                                *command_argv])
    if any(VARIANTS[name].compile for name in args.variants) or (args.loaders and VARIANTS[args.e2e_variant].compile):
        result["compile_check"] = refuse_eager_fallback()
    if info.device.type == "cuda":
        result["matmul_bf16_tflops"] = round(matmul_bf16_rate(info.device) / 1e12, 1)
        result["copy_tb_s"] = round(copy_bandwidth(info.device) / 1e12, 2)

    def cost(width: float, variant: Variant) -> Cost:
        element_bytes = 2 if variant.amp else 4
        return Cost(2 * result["macs_per_image"][width],
                    ACTIVATION_ACCESSES * result["activation_elements"][width] * element_bytes, peak, bandwidth)

    def flush(row: Optional[dict] = None) -> None:
        if row is not None:
            result["rows"].append(row)
            if row.get("graphs_in_windows"):
                result["errors"].append(f"{row['width']}x batch {row['batch']} {row['variant']} {row['data']}: "
                                        f"{row['graphs_in_windows']} graph(s) compiled inside the timed windows")
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
                        lambda: [flush(row) for row in model_only(args, info, width, batch,
                                                                  lambda v: cost(width, v))])
            for width in args.e2e_widths or args.widths if args.loaders else []:
                attempt(f"end-to-end {width}x batch {batch}",
                        lambda: end_to_end(args, info, width, batch, cost(width, VARIANTS[args.e2e_variant]),
                                           flush))
    finally:
        flush()
        shutdown()
    if info.is_main:
        text = report_markdown(result)
        if args.md:
            Path(args.md).write_text(text + "\n")
        publish(text, "Training throughput", args.record, info.device)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
