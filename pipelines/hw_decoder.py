"""Is the GPU's hardware JPEG decoder usable from this process, and is it busy?

DALI's ``mixed`` decode sends ``data.hw_decoder_load`` of the JPEGs to the hardware decoder through
nvImageCodec, which registers that decoder only if ``nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE, ...)``
succeeds and gives it no share when ``nvjpegGetHardwareDecoderInfo`` fails - both said only in its debug log
(nvImageCodec, extensions/nvjpeg/hw_decoder.cpp). A container started without the driver's ``video``
capability hits exactly that on an H100: every image then goes to the CUDA decoder, at less than half the
rate, and nothing fails. Two checks make it visible:

* :func:`probe`: the same two nvJPEG calls, through ctypes on the libnvjpeg that nvImageCodec loads
  (``nvidia/nvjpeg/lib`` or, for the CUDA 13 wheels, ``nvidia/cu13/lib``, beside ``nvidia/nvimgcodec``: its
  extension's RUNPATH), before DALI starts.
* :class:`JpegEngineSampler`: NVML's ``nvmlDeviceGetJpgUtilization`` (the share of time the JPEG engines were
  busy over the driver's sampling period) polled in a thread while DALI decodes, through ctypes on the
  driver's libnvidia-ml.

Neither calls torch (nor creates more than nvJPEG's own CUDA context). Where there is no NVIDIA driver
(libcuda.so.1 does not load) or no device, each says so in one line instead of failing.
``python -m pipelines.hw_decoder [--json FILE]`` (or ``python pipelines/hw_decoder.py``) prints the probe as
one row; its exit status is 1 when the GPU is one that carries the decoder
(pipelines.defaults.has_hw_jpeg_decoder, what ``hw_decoder_load: auto`` goes by) and nvJPEG cannot use it, 0
otherwise.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean
from typing import Optional

# nvjpeg.h: nvjpegBackend_t, nvjpegStatus_t; library_types.h: libraryPropertyType
NVJPEG_BACKEND_DEFAULT, NVJPEG_BACKEND_HARDWARE = 0, 3
NVJPEG_STATUS = ("SUCCESS", "NOT_INITIALIZED", "INVALID_PARAMETER", "BAD_JPEG", "JPEG_NOT_SUPPORTED",
                 "ALLOCATOR_FAILURE", "EXECUTION_FAILED", "ARCH_MISMATCH", "INTERNAL_ERROR",
                 "IMPLEMENTATION_NOT_SUPPORTED", "INCOMPLETE_BITSTREAM")
MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL = 0, 1, 2
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 75, 76   # cuda.h
NVML_SUCCESS = 0
SAMPLE_EVERY_S = 0.1    # NVML's own sampling period is 1/6 s to 1 s, depending on the product
NO_HARDWARE_BACKEND_HINT = ("nvImageCodec then sends every JPEG to the CUDA decoder; in a container the "
                            "driver's video capability is needed (NVIDIA_DRIVER_CAPABILITIES=compute,utility,video)")


def nvjpeg_status(code: int) -> str:
    return f"NVJPEG_STATUS_{NVJPEG_STATUS[code]}" if 0 <= code < len(NVJPEG_STATUS) else f"status {code}"


def nvjpeg_library() -> tuple[Optional[ctypes.CDLL], str]:
    """(the libnvjpeg nvImageCodec loads - the RUNPATH of its JPEG extension - and its path) or (None, why
    not)."""
    candidates = []
    # nvImageCodec's JPEG extension looks in ../../nvjpeg/lib (CUDA 12 wheels) and ../../cu13/lib (CUDA 13)
    for package, relative in (("nvidia.nvimgcodec", "../nvjpeg/lib"), ("nvidia.nvimgcodec", "../cu13/lib"),
                              ("nvidia.nvjpeg", "lib")):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates += sorted((Path(location) / relative).resolve().glob("libnvjpeg.so.*"))
    tried = []
    for name in [str(p) for p in candidates] + ["libnvjpeg.so.12", "libnvjpeg.so"]:
        try:
            return ctypes.CDLL(name), name
        except OSError as e:
            tried.append(f"{name}: {e}")
    return None, "libnvjpeg not found (nvidia-nvjpeg-cu12 / nvidia-nvjpeg, installed with DALI's nvImageCodec): " + \
        "; ".join(tried)


def cuda_device() -> tuple[Optional[str], Optional[tuple[int, int]], str]:
    """(name, compute capability) of CUDA device 0 through the driver's libcuda.so.1, or (None, None, why
    there is none)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return None, None, f"no NVIDIA driver ({e})"
    count, device = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuInit(0) != 0:
        return None, None, "the NVIDIA driver is there but cuInit failed (no usable device)"
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0 or cuda.cuDeviceGet(ctypes.byref(device), 0):
        return None, None, "the NVIDIA driver shows no CUDA device"
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, device)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)
    return name.value.decode(), (major.value, minor.value), ""


@dataclass
class Probe:
    """What nvJPEG says about the hardware decoder of CUDA device 0 (the process's current device)."""
    gpu: Optional[str]                           # the device's name; None: no GPU
    status: str                                  # one line: the verdict
    expected: bool = False                       # the device is one that carries the decoder (by its die)
    library: str = ""                            # the libnvjpeg that answered
    nvjpeg_version: str = ""
    default_backend: str = ""                    # nvjpegCreateEx(DEFAULT): does nvJPEG work at all here
    hardware_backend: str = ""                   # nvjpegCreateEx(HARDWARE)
    hardware_decoder_info: str = ""              # nvjpegGetHardwareDecoderInfo
    engines: Optional[int] = None
    cores_per_engine: Optional[int] = None

    @property
    def usable(self) -> bool:
        """True when nvImageCodec would give the hardware decoder its share (see the module docstring)."""
        return bool(self.engines)

    @property
    def missing(self) -> bool:
        """The device carries the decoder and nvJPEG cannot use it: hw_decoder_load goes nowhere."""
        return self.expected and not self.usable


def _create(lib: ctypes.CDLL, backend: int) -> tuple[int, ctypes.c_void_p]:
    handle = ctypes.c_void_p()
    code = lib.nvjpegCreateEx(ctypes.c_int(backend), None, None, ctypes.c_uint(0), ctypes.byref(handle))
    return code, handle


def probe() -> Probe:
    """nvjpegCreateEx with the default and the hardware backend, then nvjpegGetHardwareDecoderInfo."""
    lib, where = nvjpeg_library()
    version = ""
    if lib is not None:
        parts = []
        for prop in (MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL):
            value = ctypes.c_int(-1)
            lib.nvjpegGetProperty(ctypes.c_int(prop), ctypes.byref(value))
            parts.append(str(value.value))
        version = ".".join(parts)
    name, capability, why = cuda_device()
    if name is None:
        return Probe(None, f"no GPU: {why}; the hardware JPEG decoder was not probed", library=where if lib else "",
                     nvjpeg_version=version)
    from pipelines.defaults import has_hw_jpeg_decoder
    expected = has_hw_jpeg_decoder(name, capability)
    if lib is None:
        return Probe(name, f"not probed: {where}", expected)
    result = Probe(name, "", expected, where, version)
    code, handle = _create(lib, NVJPEG_BACKEND_DEFAULT)
    result.default_backend = nvjpeg_status(code)
    if code == 0:
        lib.nvjpegDestroy(handle)
    code, handle = _create(lib, NVJPEG_BACKEND_HARDWARE)
    result.hardware_backend = nvjpeg_status(code)
    if code != 0:
        result.status = (f"no hardware JPEG decoder: nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE) returned "
                         f"{result.hardware_backend}; " + (NO_HARDWARE_BACKEND_HINT if expected else
                                                           f"{name} is not a GPU known to carry one"))
        return result
    engines, cores = ctypes.c_uint(0), ctypes.c_uint(0)
    code = lib.nvjpegGetHardwareDecoderInfo(handle, ctypes.byref(engines), ctypes.byref(cores))
    lib.nvjpegDestroy(handle)
    result.hardware_decoder_info = nvjpeg_status(code)
    if code != 0:
        result.status = (f"hardware backend created, but nvjpegGetHardwareDecoderInfo returned "
                         f"{result.hardware_decoder_info}: nvImageCodec gives it no share")
        return result
    result.engines, result.cores_per_engine = engines.value, cores.value
    result.status = (f"hardware JPEG decoder usable: {engines.value} engine(s) x {cores.value} core(s)"
                     if engines.value else "the hardware backend reports 0 engines: nvImageCodec gives it no share")
    return result


# ------------------------------------------------------------------------------------------------- NVML
class Nvml:
    """The few NVML calls the sampler needs, on the device that CUDA calls ``cuda_index`` (matched by PCI
    bus id: NVML counts all of the machine's devices, CUDA only the visible ones)."""

    def __init__(self, cuda_index: int = 0):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self.lib.nvmlErrorString.restype = ctypes.c_char_p
        self._check(self.lib.nvmlInit_v2(), "nvmlInit_v2")
        self.device = ctypes.c_void_p()
        bus_id = ctypes.create_string_buffer(64)
        cuda = ctypes.CDLL("libcuda.so.1")
        cuda.cuInit(0)
        cu_device = ctypes.c_int()
        if (cuda.cuDeviceGet(ctypes.byref(cu_device), cuda_index) == 0
                and cuda.cuDeviceGetPCIBusId(bus_id, 64, cu_device) == 0):
            self._check(self.lib.nvmlDeviceGetHandleByPciBusId_v2(bus_id, ctypes.byref(self.device)),
                        "nvmlDeviceGetHandleByPciBusId_v2")
        else:
            self._check(self.lib.nvmlDeviceGetHandleByIndex_v2(cuda_index, ctypes.byref(self.device)),
                        "nvmlDeviceGetHandleByIndex_v2")

    def _check(self, code: int, call: str) -> None:
        if code != NVML_SUCCESS:
            raise OSError(f"{call}: {self.lib.nvmlErrorString(code).decode()}")

    def jpeg_utilization(self) -> tuple[int, int]:
        """(percent of the last sampling period the JPEG engines were busy, that period in microseconds)."""
        util, period = ctypes.c_uint(), ctypes.c_uint()
        self._check(self.lib.nvmlDeviceGetJpgUtilization(self.device, ctypes.byref(util), ctypes.byref(period)),
                    "nvmlDeviceGetJpgUtilization")
        return util.value, period.value

    def close(self) -> None:
        self.lib.nvmlShutdown()


@dataclass
class JpegEngineUse:
    """What the sampler saw: the JPEG engines' busy percentages over a stretch of work."""
    status: str                     # 'sampled', or why there are no samples
    samples: list[int] = field(default_factory=list)
    sampling_period_us: Optional[int] = None

    def summary(self) -> str:
        if not self.samples:
            return self.status
        return (f"max {max(self.samples)} %, mean {mean(self.samples):.0f} % over {len(self.samples)} samples "
                f"(NVML period {self.sampling_period_us} us)")


class JpegEngineSampler:
    """``with JpegEngineSampler(cuda_index) as use: ...``: polls nvmlDeviceGetJpgUtilization every
    SAMPLE_EVERY_S seconds in a thread while the block runs; ``use`` is filled in when it ends. Without a GPU,
    NVML or the query (older drivers, GPUs without JPEG engines) ``use.status`` says why and nothing is polled."""

    def __init__(self, cuda_index: Optional[int] = 0):
        self.cuda_index = cuda_index
        self.use = JpegEngineUse("not sampled")
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._nvml: Optional[Nvml] = None

    def __enter__(self) -> JpegEngineUse:
        if self.cuda_index is None:
            self.use.status = "n/a (no GPU)"
            return self.use
        try:
            self._nvml = Nvml(self.cuda_index)
            _, self.use.sampling_period_us = self._nvml.jpeg_utilization()
        except (OSError, AttributeError) as e:   # AttributeError: an NVML without the call
            self.use.status = f"not sampled: {e}"
            if self._nvml is not None:
                self._nvml.close()
                self._nvml = None
            return self.use
        self._thread = threading.Thread(target=self._poll, name="jpeg-engine-sampler", daemon=True)
        self._thread.start()
        return self.use

    def _poll(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                self.use.samples.append(self._nvml.jpeg_utilization()[0])
            except OSError as e:
                self.use.status = f"sampling stopped: {e}"
                return

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self.use.samples:
                self.use.status = "sampled"
        if self._nvml is not None:
            self._nvml.close()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the probe here")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    result = probe()
    row = {**asdict(result), "usable": result.usable, "missing": result.missing,
           "seconds": round(time.perf_counter() - started, 3)}
    print(f"hardware JPEG decoder{f' of {result.gpu}' if result.gpu else ''}: {result.status}")
    for key in ("library", "nvjpeg_version", "default_backend", "hardware_backend", "hardware_decoder_info"):
        if row[key]:
            print(f"  {key}: {row[key]}")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")
    if result.missing:
        print(f"{result.gpu} carries the hardware JPEG decoder, but nvJPEG cannot use it: hw_decoder_load "
              f"sends nothing there", file=sys.stderr)
    return 1 if result.missing else 0


if __name__ == "__main__":
    sys.exit(main())
