"""Seconds and peak resident memory of the `kiln prepare` driver, step by step.

The peak of one step is the process's resident-set high-water mark, reset when the step starts
(Linux: writing 5 to /proc/self/clear_refs resets VmHWM). Where that cannot be reset the figure
is the process's peak so far (`ru_maxrss`), and the manifest says so. Under the local executor
with one worker, tasks run inside the driver, so their memory counts here too.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class StepMeter:
    """Use `with meter.step(name):` around each step; `steps` then holds, per step in order,
    seconds, resident memory at its start and its peak (MB). Steps may nest."""

    def __init__(self) -> None:
        self.steps: dict[str, dict] = {}
        self._open: list[dict] = []
        self.per_step = _status_kb("VmHWM") is not None and _reset_peak()
        self.method = ("peak resident set of each step (Linux VmHWM, reset at the step's start)" if self.per_step
                       else "peak resident set of the process so far (ru_maxrss)")

    def _peak(self) -> int:
        kb = _status_kb("VmHWM") if self.per_step else None
        return kb * 1024 if kb is not None else _max_rss_bytes()

    def _now(self) -> int:
        kb = _status_kb("VmRSS")
        return kb * 1024 if kb is not None else _max_rss_bytes()

    def _fold_peak(self) -> None:
        peak = self._peak()
        for s in self._open:
            s["peak"] = max(s["peak"], peak)

    @contextmanager
    def step(self, name: str):
        self._fold_peak()  # an enclosing step keeps the peak reached before this one resets it
        if self.per_step:
            _reset_peak()
        rec = {"start": self._now(), "peak": 0, "t0": time.perf_counter()}
        self._open.append(rec)
        self.steps[name] = {}  # listed in the order steps start: an enclosing step before the steps in it
        try:
            yield
        finally:
            self._fold_peak()
            self._open.pop()
            self.steps[name].update(seconds=round(time.perf_counter() - rec["t0"], 2),
                                    rss_start_mb=round(rec["start"] / 2**20, 1),
                                    rss_peak_mb=round(max(rec["peak"], rec["start"]) / 2**20, 1))

    def seconds(self, names: list[str]) -> dict[str, float]:
        return {n: self.steps[n]["seconds"] for n in names if n in self.steps}

    def to_dict(self) -> dict:
        return {"method": self.method, "steps": self.steps}
