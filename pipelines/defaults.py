"""What ``auto`` means for the loader knobs ``data.hw_decoder_load``, ``data.num_threads`` and
``data.prefetch_queue_depth`` on the machine a rank runs on.

The rules are pure functions of what the machine reports - the GPU's name and compute capability, the CPUs
this process may run on, SLURM's and torchrun's variables - so they are tested on real device names and real
SLURM values. :func:`probe` reads those facts for this process; :func:`resolve` turns a DataConfig with
``auto`` fields into one with numbers, plus a line per field saying why. Explicit numbers pass through.

**hw_decoder_load**: the share of JPEGs DALI's ``mixed`` decode sends to the GPU's hardware JPEG decoder
(DALI documents it for the data-centre dies that carry one: GA100, GH100, Blackwell's B100/B200/B300). 0.99 on
those, by compute capability or name - the fastest share measured (benchmarks/RESULTS.md, "Pipeline
throughput (GPU)") - and 0 elsewhere (T4, A10/A40, L4/L40, GeForce/RTX): there the share has no decoder to go to.

**num_threads**: the CPU cores this rank may use - the affinity mask, capped by ``SLURM_CPUS_PER_TASK``, over
the ranks that share it (torchrun's ``LOCAL_WORLD_SIZE`` workers inherit one mask; so do srun tasks that
SLURM bound to no CPUs of their own) - and at most 8 for DALI, beyond which DALI gained little with the
hardware decoder (benchmarks/RESULTS.md). The DataLoader gets all of them as workers (PIL decodes on the host).

**prefetch_queue_depth**: DALI on a GPU 3, from the 3-5 range of NVIDIA's MLPerf training configs (not
measured here); DALI on the CPU and the DataLoader's prefetch factor 2.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

if TYPE_CHECKING:
    from fdmobilenet.config import DataConfig

AUTO = "auto"
HW_DECODER_SHARE = 0.99
MAX_DALI_THREADS = 8
PREFETCH_DALI_GPU = 3
PREFETCH_DEFAULT = 2
# Dies with the hardware JPEG decoder, by compute capability, and the names of the parts built on them.
HW_JPEG_CAPABILITIES = {(8, 0): "GA100", (9, 0): "GH100", (10, 0): "GB100/GB200", (10, 3): "GB300"}
HW_JPEG_NAMES = re.compile(r"\b(A100|A30|A800|H100|H200|H800|H20|GH200|B100|B200|GB200|B300|GB300)\b")


@dataclass(frozen=True)
class Host:
    """What the rules look at. ``gpu_name``/``capability`` are None when the loader runs on the CPU."""
    gpu_name: Optional[str]
    capability: Optional[tuple[int, int]]
    affinity: int                  # CPUs in this process's affinity mask
    node_cpus: int                 # CPUs of the machine (os.cpu_count())
    env: Mapping[str, str]         # torchrun's and SLURM's variables (os.environ)


def probe(device) -> Host:
    """This process's facts; ``device``: the torch.device the loader delivers to."""
    name = capability = None
    if device.type == "cuda":
        import torch
        name = torch.cuda.get_device_name(device)
        capability = tuple(torch.cuda.get_device_capability(device))
    return Host(name, capability, len(os.sched_getaffinity(0)), os.cpu_count() or 1, dict(os.environ))


# ------------------------------------------------------------------------------------------------ rules
def has_hw_jpeg_decoder(name: str, capability: tuple[int, int]) -> bool:
    """True for the parts whose die carries the hardware JPEG decoder (see the module docstring)."""
    return tuple(capability) in HW_JPEG_CAPABILITIES or HW_JPEG_NAMES.search(name) is not None


def hw_decoder_load(host: Host) -> tuple[float, str]:
    if host.gpu_name is None:
        return 0.0, "no GPU: DALI decodes on the CPU"
    major, minor = host.capability
    if has_hw_jpeg_decoder(host.gpu_name, host.capability):
        die = HW_JPEG_CAPABILITIES.get((major, minor), "a data-centre die")
        return HW_DECODER_SHARE, f"{host.gpu_name} (sm_{major}{minor}, {die}) has the hardware JPEG decoder"
    return 0.0, f"{host.gpu_name} (sm_{major}{minor}) has no hardware JPEG decoder DALI is known to use"


def slurm_tasks_on_node(env: Mapping[str, str]) -> int:
    """This node's task count from SLURM's compressed list (``SLURM_STEP_TASKS_PER_NODE`` inside a step,
    else ``SLURM_TASKS_PER_NODE``): "4(x2),2" means 4 tasks on each of the first two nodes, 2 on the third;
    ``SLURM_NODEID`` picks this node's entry."""
    text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    counts = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if m is None:
            raise ValueError(f"cannot read SLURM's tasks per node {text!r} (expected e.g. '4(x2),2')")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else counts[-1]


def rank_cpus(host: Host) -> tuple[int, str]:
    """CPU cores this rank may use: the affinity mask, capped by SLURM_CPUS_PER_TASK, over the ranks that
    share it (see the module docstring)."""
    env = host.env
    cpus, where = host.affinity, f"{host.affinity} CPUs in the affinity mask"
    per_task = env.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) < cpus:
        cpus, where = int(per_task), f"SLURM_CPUS_PER_TASK={per_task}"
    if "LOCAL_WORLD_SIZE" in env:
        sharing, who = int(env["LOCAL_WORLD_SIZE"]), "torchrun workers on this node"
    elif per_task.isdigit():
        sharing, who = 1, "this SLURM task's own"
    elif "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and host.affinity >= host.node_cpus:
        sharing, who = slurm_tasks_on_node(env), "SLURM tasks on this node, none bound to its own CPUs"
    else:
        sharing, who = 1, "this process alone"
    share = max(1, cpus // max(1, sharing))
    return share, f"{where} / {sharing} ({who}) = {share}"


def num_threads(loader: str, host: Host) -> tuple[int, str]:
    cores, why = rank_cpus(host)
    if loader == "dali" and cores > MAX_DALI_THREADS:
        return MAX_DALI_THREADS, f"{why}, capped at {MAX_DALI_THREADS} for DALI"
    return cores, why


def prefetch_queue_depth(loader: str, host: Host) -> tuple[int, str]:
    if loader == "dali" and host.gpu_name is not None:
        return PREFETCH_DALI_GPU, "DALI on a GPU (from NVIDIA's MLPerf configs' 3-5; not yet measured here)"
    return PREFETCH_DEFAULT, "the CPU / DataLoader default"


def resolve(data: DataConfig, host: Host) -> tuple[DataConfig, dict[str, str]]:
    """``data`` with every ``auto`` knob replaced by its number for ``host``, and {key: 'value (why)'} for
    the ones that were ``auto``."""
    rules = {"hw_decoder_load": lambda: hw_decoder_load(host),
             "num_threads": lambda: num_threads(data.loader, host),
             "prefetch_queue_depth": lambda: prefetch_queue_depth(data.loader, host)}
    values, why = {}, {}
    for key, rule in rules.items():
        if getattr(data, key) == AUTO:
            values[key], reason = rule()
            why[key] = f"{values[key]} ({reason})"
    return dataclasses.replace(data, **values), why


def resolve_loader_defaults(data: DataConfig, device) -> tuple[DataConfig, dict[str, str]]:
    """:func:`resolve` for this process (probes the machine only when some knob is ``auto``)."""
    if AUTO not in (data.hw_decoder_load, data.num_threads, data.prefetch_queue_depth):
        return data, {}
    return resolve(data, probe(device))
