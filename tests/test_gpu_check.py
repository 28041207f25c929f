"""`bench/gpu_check.py`, the first thing to run on a GPU, keeps working: its CPU mode runs every check
at tiny shapes (as a subprocess, the way it is run), none fails, the JSON table holds each check, and
every figure that only a GPU can give says so."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


def checks_listed() -> list[str]:
    spec = importlib.util.spec_from_file_location("kiln_bench_gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # stdlib imports only: the checks import torch and kiln in the worker
    return list(mod.CHECKS)


def test_the_gpu_check_runs_every_check_in_its_cpu_mode(tmp_path):
    table = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, "-P", str(SCRIPT), "--cpu", "--quick", "--out", str(tmp_path / "runs"),
                        "--json", str(table)], capture_output=True, text=True, timeout=900)
    assert table.is_file(), f"no table (exit {p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    result = json.loads(table.read_text())
    assert result["mode"] == "cpu"
    checks = {c["check"]: c for c in result["checks"]}
    assert list(checks) == checks_listed()
    bad = {n: (c["result"], c["figures"], c["error"][-1500:]) for n, c in checks.items()
           if c["result"] not in ("ok", "skipped (needs GPU)")}
    assert not bad, json.dumps(bad, indent=1)
    assert checks["tf32"]["result"] == "skipped (needs GPU)"  # CUDA only
    unmarked = [n for n, c in checks.items() if "needs GPU" not in c["figures"]]
    assert not unmarked, f"checks whose figures do not say what needs a GPU: {unmarked}"
    assert p.returncode == 0
    assert "| check | result | figures |" in p.stdout and f"{len(checks)} of {len(checks)} checks ok" in p.stdout
