"""What ``auto`` means for the loader knobs (pipelines.defaults), on real inputs: the names and compute
capabilities real GPUs report, CPU affinity masks, torchrun's and SLURM's variables as those tools set them;
then the trainer's header and config.yaml, from a real run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fdmobilenet.config import DataConfig, load_experiment
from launch_support import build_digits, env, run_words
from pipelines import defaults
from pipelines.defaults import Host, has_hw_jpeg_decoder, resolve, slurm_tasks_on_node

REPO = Path(__file__).resolve().parents[1]


def host(affinity: int = 16, node_cpus: int = 16, gpu: tuple[str, tuple[int, int]] | None = None, **env) -> Host:
    name, capability = gpu or (None, None)
    return Host(name, capability, affinity, node_cpus, env)


# (what torch.cuda.get_device_name / get_device_capability return on these parts)
@pytest.mark.parametrize("name, capability, expected", [
    ("NVIDIA H200", (9, 0), 0.99),
    ("NVIDIA H100 80GB HBM3", (9, 0), 0.99),
    ("NVIDIA H100 PCIe", (9, 0), 0.99),
    ("NVIDIA GH200 480GB", (9, 0), 0.99),
    ("NVIDIA A100-SXM4-80GB", (8, 0), 0.99),
    ("NVIDIA A100-PCIE-40GB", (8, 0), 0.99),
    ("NVIDIA A30", (8, 0), 0.99),
    ("NVIDIA B200", (10, 0), 0.99),
    ("Tesla T4", (7, 5), 0.0),
    ("Tesla V100-SXM2-32GB", (7, 0), 0.0),
    ("NVIDIA A10", (8, 6), 0.0),
    ("NVIDIA L4", (8, 9), 0.0),
    ("NVIDIA GeForce RTX 4090", (8, 9), 0.0),
    ("NVIDIA GeForce RTX 3090", (8, 6), 0.0),
])
def test_hw_decoder_load_by_name_and_capability(name, capability, expected):
    value, why = defaults.hw_decoder_load(host(gpu=(name, capability)))
    assert value == expected and name in why
    assert has_hw_jpeg_decoder(name, capability) == (expected > 0)


def test_no_gpu_means_no_hardware_decoder():
    assert defaults.hw_decoder_load(host())[0] == 0.0


@pytest.mark.parametrize("affinity, node_cpus, env, dali, torchvision", [
    (16, 16, {}, 8, 16),                                              # one process on the H200 host: capped
    (4, 16, {}, 4, 4),                                                # taskset -c 0-3
    (2, 2, {"LOCAL_WORLD_SIZE": "2"}, 1, 1),                          # this VM, 2 torchrun ranks
    (16, 16, {"LOCAL_WORLD_SIZE": "8"}, 2, 2),                        # 8 ranks share 16 cores
    (128, 128, {"LOCAL_WORLD_SIZE": "8"}, 8, 16),                     # 8 GPUs, 128 cores
    # launch/slurm.sbatch: one task per node (--cpus-per-task=64, bound), torchrun with 8 workers in it
    (64, 128, {"SLURM_CPUS_PER_TASK": "64", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "LOCAL_WORLD_SIZE": "8"},
     8, 8),
    # the same without CPU binding (affinity = the whole node): SLURM's count still caps it
    (128, 128, {"SLURM_CPUS_PER_TASK": "32", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "LOCAL_WORLD_SIZE": "8"},
     4, 4),
    # launch/slurm_srun.sbatch: one task per GPU, --cpus-per-task=6, bound: each task's own 6
    (6, 128, {"SLURM_CPUS_PER_TASK": "6", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16",
              "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "1"}, 6, 6),
    # srun with 8 tasks per node and neither --cpus-per-task nor binding: they share the node
    (96, 96, {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
              "SLURM_NODEID": "1"}, 8, 12),
    # the batch shell's own variables outside a step do not count as tasks
    (16, 16, {"SLURM_NTASKS": "16", "SLURM_TASKS_PER_NODE": "8(x2)"}, 8, 16),
])
def test_num_threads_is_this_ranks_share_of_the_cpus(affinity, node_cpus, env, dali, torchvision):
    h = host(affinity, node_cpus, **env)
    assert defaults.num_threads("dali", h)[0] == dali
    assert defaults.num_threads("torchvision", h)[0] == torchvision


def test_slurm_tasks_per_node_format():
    env = {"SLURM_STEP_TASKS_PER_NODE": "4(x2),2"}
    assert [slurm_tasks_on_node({**env, "SLURM_NODEID": str(n)}) for n in range(3)] == [4, 4, 2]
    assert slurm_tasks_on_node({"SLURM_TASKS_PER_NODE": "3", "SLURM_NODEID": "0"}) == 3
    with pytest.raises(ValueError, match="'4x2'"):
        slurm_tasks_on_node({"SLURM_TASKS_PER_NODE": "4x2"})


def test_prefetch_depth():
    gpu = host(gpu=("NVIDIA H200", (9, 0)))
    assert defaults.prefetch_queue_depth("dali", gpu)[0] == 3
    assert defaults.prefetch_queue_depth("dali", host())[0] == 2
    assert defaults.prefetch_queue_depth("torchvision", gpu)[0] == 2


def test_resolve_replaces_only_auto_and_says_why():
    h = host(16, 16, gpu=("NVIDIA H200", (9, 0)))
    data, why = resolve(DataConfig(), h)                      # the defaults are auto
    assert (data.hw_decoder_load, data.num_threads, data.prefetch_queue_depth) == (0.99, 8, 3)
    assert set(why) == {"hw_decoder_load", "num_threads", "prefetch_queue_depth"}
    assert why["num_threads"].startswith("8 (16 CPUs in the affinity mask")
    explicit = DataConfig(hw_decoder_load=0.65, num_threads=4, prefetch_queue_depth=2)
    assert resolve(explicit, h) == (explicit, {})
    assert resolve(DataConfig(num_threads=3), h)[0].num_threads == 3


def test_shipped_imagenet_configs_are_auto_and_numbers_still_parse():
    cfg = load_experiment("1x-FDMobileNet-224")
    assert (cfg.data.hw_decoder_load, cfg.data.num_threads, cfg.data.prefetch_queue_depth) == ("auto",) * 3
    cfg = load_experiment("1x-FDMobileNet-224", overrides=["data.hw_decoder_load=1", "data.num_threads=6",
                                                           "data.prefetch_queue_depth=4"])
    assert (cfg.data.hw_decoder_load, cfg.data.num_threads, cfg.data.prefetch_queue_depth) == (1.0, 6, 4)


def test_a_real_affinity_mask_decides_the_thread_count():
    """A child process pinned to one CPU (os.sched_setaffinity, what taskset does) gets one DALI thread."""
    code = ("import os, torch; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from fdmobilenet.config import DataConfig; from pipelines import resolve_loader_defaults; "
            "d, why = resolve_loader_defaults(DataConfig(), torch.device('cpu')); "
            "print(d.num_threads, why['num_threads'])")
    launchers = ("LOCAL_WORLD_SIZE", "SLURM_CPUS_PER_TASK", "SLURM_STEP_ID")
    clean = {k: v for k, v in os.environ.items() if k not in launchers}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.startswith("1 1 (1 CPUs in the affinity mask / 1 (this process alone) = 1)"), out


def test_the_trainer_prints_and_records_the_resolved_values(tmp_path):
    digits = build_digits(tmp_path / "digits")
    words = run_words(digits, tmp_path, "auto", "data.num_threads=auto", steps=2)
    p = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), *words], cwd=REPO, capture_output=True,
                       text=True, timeout=180, env=env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    threads = defaults.rank_cpus(defaults.probe(torch.device("cpu")))[0]
    header = next(line for line in p.stdout.splitlines() if line.startswith("FD-MobileNet"))
    assert f"loader auto: hw_decoder_load=0.0, num_threads={threads}, prefetch_queue_depth=2 |" in header
    assert "cuda graphs auto -> off (this run is on the cpu" in header
    saved = yaml.safe_load((tmp_path / "auto.config.yaml").read_text())
    assert (saved["data"]["num_threads"], saved["data"]["prefetch_queue_depth"]) == (threads, 2)
    assert saved["run"]["data_auto"]["num_threads"].startswith(f"{threads} (")
    assert saved["run"]["cuda_graphs"].startswith("auto -> off (this run is on the cpu")
    # evaluate.py splits the CPU between torch and the loader too: it resolves 'auto' first
    p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(tmp_path / "auto.pth.tar"),
                        "data.num_threads=auto", "data.val_resize=36", "data.val_crop=32"], cwd=REPO,
                       capture_output=True, text=True, timeout=180, env=env())
    assert p.returncode == 0 and "top-1" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
