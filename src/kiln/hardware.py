"""The hardware kiln runs on: process-level tuning, GPU datasheets and assumed prices, and the
matmul peak that MFU is measured against."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from dataclasses import dataclass

import torch

from kiln.errors import KilnError

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_cpu_allocator(threshold: int = 1 << 30) -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the kernel.

    Training allocates the same activation sizes every step; by default glibc serves each large
    block with a fresh mmap, so every step page-faults and zero-fills its activations again
    (~5% of a CPU step, seen as system time). Raising the mmap and trim thresholds lets the
    blocks be reused. A no-op outside glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


# ---- GPUs: datasheets and assumed prices ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPUSpec:
    """Datasheet numbers for one SXM GPU; TFLOPS are dense (no 2:4 sparsity)."""

    name: str
    memory_gb: float
    bf16_tflops: float  # fp16 is the same on all of these
    fp8_tflops: float | None  # None: no fp8 tensor cores
    tf32_tflops: float  # what fp32 training runs on
    hbm_tbps: float
    nvlink_gbps: float  # per GPU, both directions

    def peak_flops(self, precision: str) -> float:
        """Dense tensor-core FLOP/s for `precision`; fp8 without fp8 cores falls back to bf16."""
        tflops = {"fp32": self.tf32_tflops, "fp8": self.fp8_tflops or self.bf16_tflops}.get(precision, self.bf16_tflops)
        return tflops * 1e12


GPUS: dict[str, GPUSpec] = {
    "A100": GPUSpec("A100", 80, 312, None, 156, 2.0, 600),  # A100 80GB SXM
    "H100": GPUSpec("H100", 80, 989, 1979, 495, 3.35, 900),  # H100 SXM
    "H200": GPUSpec("H200", 141, 989, 1979, 495, 4.8, 900),  # H100 compute, bigger and faster HBM
    # B200: 180 GB is what HGX/DGX B200 expose per GPU (the HBM3e stacks hold 192 GB).
    "B200": GPUSpec("B200", 180, 2250, 4500, 1100, 8.0, 1800),
}


def gpu_spec(name: str) -> GPUSpec:
    """The GPU named `name` (any case), or a KilnError listing the known ones."""
    spec = GPUS.get(name.upper())
    if spec is None:
        raise KilnError(f"unknown gpu={name!r}; choose one of {', '.join(GPUS)}")
    return spec


# Dense bf16 datasheet peaks (FLOP/s) of GPUs `kiln plan`'s table (GPUS) does not hold.
_OTHER_GPU_PEAK_FLOPS = {"L40S": 362e12, "A10": 125e12}


def measure_matmul_peak(device: torch.device, n: int = 1024, dtype=torch.float32, seconds: float = 0.3,
                        shape: tuple[int, int, int] | None = None) -> float:
    """FLOP/s of one timed stretch of (m×k)·(k×n) matmuls (n×n×n by default) on `device`."""
    m, k, n = shape or (n, n, n)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        _sync(device)
    return 2.0 * m * k * n * iters / (time.perf_counter() - t0)


_PEAK_CACHE: dict = {}


def peak_flops(device: torch.device, shapes: tuple[tuple[int, int, int], ...] = ()) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for MFU: the bf16 datasheet peak of a known GPU, else the
    best of several timed runs of fp32 matmuls at 1024³ and at the model's own shapes.

    One short timing reads low whenever the host is busy for a moment, which once made a CPU run
    report an MFU above 100%; the best of five stretches per shape is robust to that. Measured
    once per process and shape set.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = {**{k: spec.peak_flops("bf16") for k, spec in GPUS.items()}, **_OTHER_GPU_PEAK_FLOPS}
        for key, flops in peaks.items():
            if key in name:
                return flops, f"{key} bf16 dense datasheet peak"
        return measure_matmul_peak(device, 4096, torch.bfloat16), "measured bf16 matmul peak"
    key = (str(device), tuple(shapes), torch.get_num_threads())
    if key not in _PEAK_CACHE:
        best = 0.0
        for shape in ((1024, 1024, 1024), *shapes):
            best = max(best, *(measure_matmul_peak(device, shape=shape, seconds=0.1) for _ in range(5)))
        _PEAK_CACHE[key] = best
    return _PEAK_CACHE[key], f"best measured fp32 matmul rate on {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)




# $ per GPU-hour: assumptions (typical 2025 cloud on-demand rates), not quotes. `kiln plan`'s
# prices.* defaults and the serving cost figures read them from here.
GPU_PRICES = {"a100": 1.8, "h100": 2.5, "h200": 3.5, "b200": 5.5}
CPU_HOST_PRICE = 0.10  # $ per hour assumed for a CPU host


def usd_per_hour(setting: float, device: torch.device) -> float:
    """The configured price of a machine, or (0 = auto) the assumed price of the GPU in use, or
    $0.10/hour for a CPU host (both assumptions, not quotes)."""
    if setting > 0:
        return setting
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for gpu, price in GPU_PRICES.items():
            if gpu in name:
                return price
    return CPU_HOST_PRICE
