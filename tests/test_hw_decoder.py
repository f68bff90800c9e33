"""pipelines.hw_decoder: the nvJPEG probe and the NVML sampler, without a GPU.

On this machine the probe is a clean "no GPU" row (no libcuda.so.1). Its GPU path is checked against stand-in
driver libraries compiled here from C (libcuda.so.1, libnvidia-ml.so.1 and a libnvjpeg with the same entry
points and signatures as nvjpeg.h, cuda.h and nvml.h declare), whose answers the test sets through
environment variables: the ctypes calls, the verdicts and the exit status are real; what a real H100 answers
is for the gpu test in test_pipelines_dali.py.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_DRIVER = r"""
#include <stdlib.h>
#include <string.h>
static int env(const char *name, int fallback) { const char *v = getenv(name); return v ? atoi(v) : fallback; }
/* libcuda.so.1 */
int cuInit(unsigned flags) { return 0; }
int cuDeviceGetCount(int *n) { *n = 1; return 0; }
int cuDeviceGet(int *device, int ordinal) { *device = ordinal; return 0; }
int cuDeviceGetName(char *name, int len, int device) { strncpy(name, getenv("FAKE_GPU"), len); return 0; }
int cuDeviceGetAttribute(int *value, int attribute, int device) {
  *value = attribute == 75 ? env("FAKE_CC_MAJOR", 9) : env("FAKE_CC_MINOR", 0); return 0; }
int cuDeviceGetPCIBusId(char *bus_id, int len, int device) { strncpy(bus_id, "0000:1B:00.0", len); return 0; }
"""
FAKE_NVJPEG = r"""
#include <stdlib.h>
static int env(const char *name, int fallback) { const char *v = getenv(name); return v ? atoi(v) : fallback; }
static int handle_object;
int nvjpegGetProperty(int type, int *value) { *value = type == 0 ? 12 : type == 1 ? 4 : 0; return 0; }
int nvjpegCreateEx(int backend, void *dev_allocator, void *pinned_allocator, unsigned flags, void **handle) {
  if (dev_allocator || pinned_allocator || flags) return 2;   /* INVALID_PARAMETER: the probe passes none */
  if (backend == 3 && env("FAKE_HW_STATUS", 0)) return env("FAKE_HW_STATUS", 0);
  *handle = &handle_object; return 0; }
int nvjpegDestroy(void *handle) { return handle == &handle_object ? 0 : 2; }
int nvjpegGetHardwareDecoderInfo(void *handle, unsigned *engines, unsigned *cores) {
  if (handle != &handle_object) return 2;
  *engines = env("FAKE_ENGINES", 7); *cores = 5; return env("FAKE_INFO_STATUS", 0); }
"""
FAKE_NVML = r"""
#include <string.h>
static int calls;
int nvmlInit_v2(void) { return 0; }
int nvmlShutdown(void) { return 0; }
const char *nvmlErrorString(int code) { return "Not Supported"; }
int nvmlDeviceGetHandleByPciBusId_v2(const char *bus_id, void **device) {
  static int dev; *device = &dev; return strcmp(bus_id, "0000:1B:00.0") ? 2 : 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned index, void **device) { return 2; }
int nvmlDeviceGetJpgUtilization(void *device, unsigned *util, unsigned *period) {
  *util = 30 + 10 * (calls++ % 2); *period = 166667; return 0; }
"""

# runs in a fresh interpreter, with LD_LIBRARY_PATH on the stand-ins: one JSON line per case
PROBE_CASES = r"""
import ctypes, json, os, sys, time
sys.path.insert(0, sys.argv[1])
import pipelines.hw_decoder as h
fake = os.path.join(sys.argv[2], "libnvjpeg.so.12")
h.nvjpeg_library = lambda: (ctypes.CDLL(fake), fake)
cases = {"h100": {"FAKE_GPU": "NVIDIA H100 80GB HBM3"},
         "h100 without video capability": {"FAKE_GPU": "NVIDIA H100 80GB HBM3", "FAKE_HW_STATUS": "7"},
         "h100, no decoder info": {"FAKE_GPU": "NVIDIA H100 80GB HBM3", "FAKE_INFO_STATUS": "9"},
         "l4": {"FAKE_GPU": "NVIDIA L4", "FAKE_CC_MAJOR": "8", "FAKE_CC_MINOR": "9", "FAKE_HW_STATUS": "9"}}
for name, env in cases.items():
    for key in ("FAKE_HW_STATUS", "FAKE_INFO_STATUS", "FAKE_CC_MAJOR", "FAKE_CC_MINOR"):
        os.environ.pop(key, None)
    os.environ.update(env)
    p = h.probe()
    print(json.dumps({"case": name, "gpu": p.gpu, "status": p.status, "usable": p.usable, "missing": p.missing,
                      "engines": p.engines, "hardware_backend": p.hardware_backend,
                      "exit": h.main([])}))
with h.JpegEngineSampler(0) as use:
    time.sleep(0.45)
print(json.dumps({"case": "sampler", "status": use.status, "samples": use.samples, "summary": use.summary()}))
"""


def compile_fakes(folder: Path) -> None:
    for name, source in (("libcuda.so.1", FAKE_DRIVER), ("libnvjpeg.so.12", FAKE_NVJPEG),
                         ("libnvidia-ml.so.1", FAKE_NVML)):
        c = folder / (name.split(".")[0] + ".c")
        c.write_text(source)
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(folder / name), str(c)], check=True, timeout=60)


def test_probe_without_a_driver_is_a_clean_no_gpu_row(tmp_path):
    """This machine has no NVIDIA driver: the probe says so in its one line, still names the libnvjpeg it
    found and that library's version (read through ctypes), and exits 0."""
    out = tmp_path / "probe.json"
    p = subprocess.run([sys.executable, str(REPO / "pipelines" / "hw_decoder.py"), "--json", str(out)],
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stdout + p.stderr
    row = json.loads(out.read_text())
    assert row["gpu"] is None and row["status"].startswith("no GPU: no NVIDIA driver")
    assert not row["usable"] and not row["missing"] and row["engines"] is None
    assert p.stdout.startswith("hardware JPEG decoder: no GPU")
    if row["library"]:   # DALI's nvimgcodec brings libnvjpeg: its version answered through ctypes
        assert row["nvjpeg_version"].split(".")[0].isdigit()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the stand-in driver libraries")
def test_probe_and_sampler_against_stand_in_driver_libraries(tmp_path):
    """The GPU path through ctypes: nvjpegCreateEx(HARDWARE) failing on an H100 (a container without the
    video capability) is a missing decoder and exit 1; a failing nvjpegGetHardwareDecoderInfo too (nvImageCodec
    then gives the decoder no share); an L4 without one is not missing; NVML samples arrive from the device
    that CUDA's PCI bus id names."""
    compile_fakes(tmp_path)
    p = subprocess.run([sys.executable, "-c", PROBE_CASES, str(REPO), str(tmp_path)], capture_output=True,
                       text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(tmp_path)})
    assert p.returncode == 0, p.stdout + p.stderr
    cases = {c["case"]: c for c in map(json.loads, (line for line in p.stdout.splitlines() if line.startswith("{")))}
    ok = cases["h100"]
    assert ok["gpu"] == "NVIDIA H100 80GB HBM3" and ok["usable"] and not ok["missing"] and ok["exit"] == 0
    assert ok["engines"] == 7 and ok["status"] == "hardware JPEG decoder usable: 7 engine(s) x 5 core(s)"
    cut = cases["h100 without video capability"]
    assert cut["missing"] and cut["exit"] == 1 and cut["hardware_backend"] == "NVJPEG_STATUS_ARCH_MISMATCH"
    assert "NVIDIA_DRIVER_CAPABILITIES" in cut["status"]
    info = cases["h100, no decoder info"]
    assert info["missing"] and info["exit"] == 1 and "IMPLEMENTATION_NOT_SUPPORTED" in info["status"]
    l4 = cases["l4"]
    assert not l4["usable"] and not l4["missing"] and l4["exit"] == 0
    sampler = cases["sampler"]
    assert sampler["status"] == "sampled" and set(sampler["samples"]) <= {30, 40} and len(sampler["samples"]) >= 2
    assert sampler["summary"].startswith("max 40 %") and "NVML period 166667 us" in sampler["summary"]


def test_sampler_without_a_gpu_says_so():
    from pipelines.hw_decoder import JpegEngineSampler
    with JpegEngineSampler(None) as use:
        pass
    assert use.samples == [] and use.summary() == "n/a (no GPU)"
