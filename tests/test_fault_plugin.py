"""The test-only fault plugin (tests/fault_plugin): idle unless asked, never in a normal environment, and
each fault does what the tests that use it rely on. Real subprocesses, as the plugin is loaded by Python's
start-up (``sitecustomize``)."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys

from fault_plugin import HERE as PLUGIN, REPO, fault_env
from fault_plugin.sitecustomize import VARIABLES

# What a subprocess reports about the plugin and two functions it may patch (GraphedStep.step: GRAPHED below).
PROBE = """
import sys
import fdmobilenet.checkpoint as checkpoint, fdmobilenet.engine as engine
from fdmobilenet.checkpoint import save_checkpoint
site = sys.modules.get("sitecustomize")
print("sitecustomize", getattr(site, "__file__", None))
print("step", engine.Trainer.step.__module__, engine.Trainer.step.__qualname__)
print("save", save_checkpoint.__module__, save_checkpoint is checkpoint.save_checkpoint)
print("hooks", [type(f).__name__ for f in sys.meta_path if type(f).__module__ == "sitecustomize"])
"""

# A tiny trainer taking real steps and writing a real checkpoint under the faults in its environment.
FAULTS = """
import sys, torch
from torch import nn
from fdmobilenet.checkpoint import save_checkpoint
from fdmobilenet.config import OptimConfig, SchedConfig
from fdmobilenet.distributed import init_distributed
from fdmobilenet.engine import Trainer
from fdmobilenet.optim import build_optimizer, build_scheduler
info = init_distributed("cpu")
model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
opt = build_optimizer(model, OptimConfig(), info.device)
t = Trainer(model, model, opt, build_scheduler(opt, OptimConfig(), SchedConfig(), 10), nn.CrossEntropyLoss(), info)
images, labels = torch.ones(2, 3, 2, 2), torch.tensor([0, 1])
for _ in range(3):
    try:
        loss, _ = t.step(images, labels)
        print("step", t.global_step - 1, "loss finite", bool(torch.isfinite(loss)))
    except RuntimeError as e:
        print("step", t.global_step, "raised:", e)
        t.global_step += 1
save_checkpoint({"w": model[1].weight}, sys.argv[1])
print("saved")
"""

# The same faults in a CUDA-graphed step (fdmobilenet.cuda_graph): one warm-up step through Trainer.step, then
# replays, which do not go through it. No CUDA here: the capture is a stand-in that replays by calling the
# captured function (as tests/test_cuda_graph.py's orchestration tests do).
GRAPHED = """
import torch
from torch import nn
from fdmobilenet.config import OptimConfig, SchedConfig
from fdmobilenet.cuda_graph import GraphedStep
from fdmobilenet.distributed import init_distributed
from fdmobilenet.engine import NonFiniteLossError, Trainer
from fdmobilenet.optim import build_optimizer, build_scheduler
info = init_distributed("cpu")
model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
opt = build_optimizer(model, OptimConfig(impl="fused"), info.device)
t = Trainer(model, model, opt, build_scheduler(opt, OptimConfig(), SchedConfig(), 10), nn.CrossEntropyLoss(), info)
graphed = GraphedStep(t, warmup_steps=1, capture=lambda body, stream: body)
images, labels = torch.ones(2, 3, 2, 2), torch.tensor([0, 1])
for _ in range(4):
    try:
        loss, _ = graphed.step(images, labels)
        print("step", t.global_step - 1, "replayed" if graphed._replay else "warm-up", bool(torch.isfinite(loss)))
    except RuntimeError as e:
        print("step", t.global_step, "raised:", e)
        t.global_step += 1
try:
    t.check_finite(0)
except NonFiniteLossError as e:
    print("marker:", e)
"""


def python(code: str, env: dict, *args: str) -> str:
    """Run ``code``; its stdout and stderr as one text, in the order written."""
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"},
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:]
    return p.stdout


def test_idle_without_its_variables():
    """On PYTHONPATH but no variable set: loaded, yet no import hook and nothing patched."""
    env = {**fault_env(), "PYTHONPATH": os.pathsep.join([str(PLUGIN), str(REPO)])}
    out = python(PROBE, env)
    assert f"sitecustomize {PLUGIN / 'sitecustomize.py'}" in out
    assert "step fdmobilenet.engine Trainer.step" in out and "save fdmobilenet.checkpoint True" in out
    assert "hooks []" in out


def test_never_in_a_normal_environment():
    """Without fault_env's faults the plugin is not on the path, and no fault variable passes through from
    the caller's environment; nor does the package ship it (setup.cfg packages: fdmobilenet, pipelines)."""
    env = fault_env({**os.environ, **{name: "1" for name in VARIABLES}})
    assert not set(VARIABLES) & set(env) and str(PLUGIN) not in env.get("PYTHONPATH", "")
    out = python(PROBE, env)
    assert "sitecustomize None" in out and "step fdmobilenet.engine Trainer.step" in out
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup["options.packages.find"]["include"].split() == ["fdmobilenet", "fdmobilenet.*", "pipelines",
                                                                 "pipelines.*"]


def test_each_fault(tmp_path):
    env = fault_env(raise_at_step=1, raise_rank=0, nan_at_step=2, slow_save_s=0.5)
    out = python(PROBE, env)
    assert "step sitecustomize faulty_step.<locals>.patched" in out
    assert "save sitecustomize True" in out          # a later `from ... import save_checkpoint` gets the patch
    out = python(FAULTS, env, str(tmp_path / "c.pt"))
    assert "step 0 loss finite True" in out
    assert "step 1 raised: injected failure on rank 0 at global step 1" in out
    assert "step 2 loss finite False" in out
    assert out.index("fault plugin: slow checkpoint write, 0.5 s before writing") < \
        out.index(f"fault plugin: checkpoint {tmp_path / 'c.pt'} written") < out.index("saved")
    assert (tmp_path / "c.pt").is_file()


def test_step_faults_reach_a_cuda_graphed_step():
    out = python(GRAPHED, fault_env(raise_at_step=2, nan_at_step=3))
    assert "step 0 warm-up True" in out and "step 1 replayed True" in out
    assert "step 2 raised: injected failure on rank 0 at global step 2" in out
    assert "step 3 replayed False" in out and "marker: training loss is NaN/Inf in epoch 1, at global step 3" in out
