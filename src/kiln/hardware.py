"""The hardware kiln runs on: process-level tuning, GPU datasheets and assumed prices, and the
matmul peak that MFU is measured against."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.runs import cpu_model, write_json

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def in_fresh_process(fn, *args):
    """`fn(*args)` in a new (spawned) Python process, its result or exception returned here: for a
    decode speed a server would see. A long-lived process that has run torch ops on several threads
    (training, evaluation, a server's engine thread) holds an OpenMP thread pool for each, and then
    libgomp puts every worker to sleep between ops, which costs a small model's decode up to half
    its speed (`kiln.serve.scheduler`). `fn` must be importable (a module-level function)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


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


# Dense datasheet peaks (bf16, TF32; TFLOP/s) of GPUs `kiln plan`'s table (GPUS, the SXM parts)
# does not hold: other form factors of its cards (the PCIe and NVL parts run lower clocks and
# power) and other cards. An A100's figures are the same in PCIe and SXM form.
_OTHER_GPU_TFLOPS: dict[str, tuple[float, float]] = {
    "H100 PCIe": (756, 378), "H100 NVL": (835, 418), "H200 NVL": (835, 418),
    "L40S": (362, 183), "A10": (125, 62.5),
}


def _words(name: str) -> tuple[str, ...]:
    return tuple("".join(c if c.isalnum() else " " for c in name.lower()).split())


def datasheet_peak(gpu_name: str, precision: str = "bf16") -> tuple[float, str] | None:
    """(dense datasheet FLOP/s, the card's key) of the GPU torch names `gpu_name`, for `precision`
    (bf16; fp32 runs on TF32), or None for a card not listed. Keys are matched as whole words and
    the longest match wins: "NVIDIA H100 PCIe" is the PCIe part, not the SXM one "H100" names, and
    "NVIDIA A10G" is no A10."""
    table = {**{k: (g.bf16_tflops, g.tf32_tflops) for k, g in GPUS.items()}, **_OTHER_GPU_TFLOPS}
    words = _words(gpu_name)
    best = None
    for key in table:
        kw = _words(key)
        fits = any(words[i:i + len(kw)] == kw for i in range(len(words) - len(kw) + 1))
        if fits and (best is None or len(kw) > len(_words(best))):
            best = key
    if best is None:
        return None
    bf16, tf32 = table[best]
    return (tf32 if precision == "fp32" else bf16) * 1e12, best


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


# ---- the CPU matmul peak: the best this machine has shown, kept across runs ---------------------------------------
CACHE_DIR_ENV = "KILN_CACHE_DIR"  # where kiln keeps per-machine caches; default $XDG_CACHE_HOME/kiln or ~/.cache/kiln
_PEAK_CACHE: dict = {}  # this process's peaks: (device, shapes, threads) -> (FLOP/s, where it comes from)


def peak_cache_path() -> Path:
    """The JSON file holding the best matmul rate each (CPU, threads, torch, dtype, shape) has reached."""
    base = os.environ.get(CACHE_DIR_ENV)
    if base:
        return Path(base) / "matmul_peaks.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kiln" / "matmul_peaks.json"


def _peak_key(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int]) -> str:
    """What makes one timed peak differ from another: the CPU, threads, device, torch, dtype, shape."""
    m, k, n = shape
    return (f"{cpu_model()} | {torch.get_num_threads()} threads | {device} | torch {torch.__version__} | "
            f"{str(dtype).removeprefix('torch.')} | {m}x{k}x{n}")


def _read_peaks(path: Path) -> tuple[dict[str, float], bool]:
    """(the valid entries of the cache at `path`, whether the file held nothing else). A missing,
    unreadable or corrupt file reads as empty: it costs the memory of earlier runs, never a run."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}, True
    except (OSError, ValueError):  # ValueError: bad JSON or bad UTF-8
        return {}, False
    entries = data.get("peaks") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}, False
    good = {k: float(v) for k, v in entries.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0}
    return good, len(good) == len(entries)


def _save_peaks(path: Path, peaks: dict[str, float]) -> None:
    try:
        write_json(path, {"about": "the best matmul rate (FLOP/s) kiln has timed on this machine; MFU on CPU is "
                                   "measured against it. Safe to delete.", "peaks": peaks})
    except OSError:
        pass  # an unwritable cache dir: this run keeps its peak in memory


def _time_cpu_peak(device: torch.device, shapes: tuple[tuple[int, int, int], ...], again: bool,
                   known: float = 0.0) -> tuple[float, str]:
    """Time fp32 matmuls at 1024³ and at `shapes` (the best of five short stretches each), merge
    the rates into the on-disk cache (each entry only ever rises), and return the higher of what
    was timed now and the best earlier timing on this machine (on disk, or `known` in memory),
    with where it came from."""
    dtype = torch.float32
    timed = {shape: max(measure_matmul_peak(device, shape=shape, dtype=dtype, seconds=0.1) for _ in range(5))
             for shape in dict.fromkeys(((1024, 1024, 1024), *shapes))}
    keys = {shape: _peak_key(device, dtype, shape) for shape in timed}
    path = peak_cache_path()
    cached, clean = _read_peaks(path)
    risen = {keys[s]: rate for s, rate in timed.items() if rate > cached.get(keys[s], 0.0)}
    if risen or not clean:
        _save_peaks(path, {**cached, **risen})
    now = max(timed.values())
    on_disk = max(cached.get(key, 0.0) for key in keys.values())
    before = max(known, on_disk)
    threads = torch.get_num_threads()
    if before > now:
        source = (f"the best of earlier runs on this machine, cached in {path}" if on_disk >= known
                  else "timed earlier in this run")
        return before, (f"fp32 matmul peak on {threads} threads: {source}; {'re-timed' if again else 'measured now'}: "
                        f"{now / 1e9:,.0f} GFLOP/s")
    if again:
        earlier = f"the peak before read {before / 1e9:,.0f} GFLOP/s"
    else:
        earlier = (f"the best of earlier runs on this machine was {before / 1e9:,.0f} GFLOP/s" if before
                   else "the first timing on this machine")
    return now, (f"fp32 matmul peak on {threads} threads, {'re-timed' if again else 'measured now'}; {earlier}; "
                 f"kept as the best in {path}")


def peak_flops(device: torch.device, shapes: tuple[tuple[int, int, int], ...] = (),
               precision: str = "bf16") -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for MFU: on a known GPU the dense datasheet peak of the
    precision the matmuls run in (`bf16`, or `fp32`: TF32 tensor cores, which `kiln.train.parallel.
    use_device` turns on), on another GPU a bf16 or fp32 matmul timed now; on a CPU the best fp32
    matmul rate at 1024³ and at the model's own shapes this machine has shown.

    One short timing reads low whenever the host is busy, which once made a CPU run report an MFU
    of 194%. So each shape takes the best of five stretches, and the best rate ever timed on this
    machine (CPU model, thread count, torch, dtype, shape) is kept on disk (`peak_cache_path`):
    a busy moment can never lower the peak, a quieter one raises it. Timed once per process and
    shape set; `retime_peak` times it again.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = datasheet_peak(name, precision)
        what = "TF32" if precision == "fp32" else "bf16"
        if known is not None:
            return known[0], f"{known[1]} {what} dense datasheet peak"
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        return (measure_matmul_peak(device, 4096, dtype),
                f"{what} matmul peak measured now on {name}, a card without a datasheet entry")
    key = (str(device), tuple(shapes), torch.get_num_threads())
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = _time_cpu_peak(device, tuple(shapes), again=False)
    return _PEAK_CACHE[key]


def retime_peak(device: torch.device, shapes: tuple[tuple[int, int, int], ...] = (),
                precision: str = "bf16") -> tuple[float, str]:
    """`peak_flops` timed again, for when an MFU above 100% shows the peak was timed low: the
    higher of the new timing and the best known (in this process or on disk). GPU datasheet
    peaks are returned as they are."""
    if device.type == "cuda":
        return peak_flops(device, shapes, precision)
    key = (str(device), tuple(shapes), torch.get_num_threads())
    known = _PEAK_CACHE.get(key, (0.0, ""))[0]
    _PEAK_CACHE[key] = _time_cpu_peak(device, tuple(shapes), again=True, known=known)
    return _PEAK_CACHE[key]


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
