"""Training metrics: throughput, MFU against a peak, and the JSONL / TensorBoard / stdout sinks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# Dense bf16 datasheet peaks (FLOP/s) of GPUs `kiln plan`'s table (kiln.plan.GPUS) does not hold.
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
        from kiln.plan import GPUS

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


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def allocation_peak(fn) -> int:
    """Most bytes the CPU allocator had handed out at once while `fn()` ran, beyond what was live before.

    Read from the profiler's memory events: exact for every tensor, whichever layer allocated it.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl, mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, tensorboard: bool = True, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                self.tb = None

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old lines."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        self.path.write_text("".join(k + "\n" for k in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
