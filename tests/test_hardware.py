"""The matmul peak MFU is measured against on CPU: the best this machine has shown, kept on disk
across runs, so one timing taken while the host was busy cannot lower it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln import hardware

CPU = torch.device("cpu")
SHAPES = ((256, 512, 1536),)


@pytest.fixture
def timings(tmp_path, monkeypatch):
    """A fresh process's view (no in-memory peak), a cache in tmp_path, and matmul timings that
    read `rate[0]` FLOP/s (set it to what the next measurement should see)."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "_PEAK_CACHE", {})
    rate = [0.0]
    monkeypatch.setattr(hardware, "measure_matmul_peak", lambda device, *a, **kw: rate[0])
    return rate


def _new_process_peak(monkeypatch, rate: list[float], value: float) -> tuple[float, str]:
    """peak_flops as a new process sees it: nothing in memory, timings that read `value`."""
    monkeypatch.setattr(hardware, "_PEAK_CACHE", {})
    rate[0] = value
    return hardware.peak_flops(CPU, SHAPES)


def test_the_cpu_peak_is_the_best_this_machine_has_shown(timings, monkeypatch, tmp_path):
    peak, note = _new_process_peak(monkeypatch, timings, 280e9)
    assert peak == 280e9 and "measured now" in note
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["matmul_peaks.json"]  # nothing but the cache

    # a busy moment: the timing reads 42 GFLOP/s, the peak stays the best of earlier runs, and says so
    peak, note = _new_process_peak(monkeypatch, timings, 42e9)
    assert peak == 280e9
    assert "cached" in note and "earlier runs on this machine" in note and "42 GFLOP/s" in note

    # a quieter moment than ever before raises it
    peak, note = _new_process_peak(monkeypatch, timings, 300e9)
    assert peak == 300e9 and "measured now" in note
    assert _new_process_peak(monkeypatch, timings, 10e9)[0] == 300e9


def test_the_cached_peak_survives_a_new_process(timings, monkeypatch, tmp_path):
    _new_process_peak(monkeypatch, timings, 280e9)
    code = ("import torch; from kiln import hardware\n"
            "hardware.measure_matmul_peak = lambda device, *a, **kw: 42e9\n"
            f"print(hardware.peak_flops(torch.device('cpu'), {SHAPES!r})[0])\n")
    # the same thread count as here: the peak is kept per thread count
    code = f"import torch; torch.set_num_threads({torch.get_num_threads()})\n" + code
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert float(p.stdout) == 280e9


def test_the_peak_is_kept_per_thread_count_dtype_and_shape(timings, monkeypatch, tmp_path):
    _new_process_peak(monkeypatch, timings, 280e9)
    entries = json.loads((tmp_path / "cache" / "matmul_peaks.json").read_text())["peaks"]
    keys = list(entries)
    assert len(keys) == 2  # 1024³ and the model's own shape
    assert any("1024x1024x1024" in k for k in keys) and any("256x512x1536" in k for k in keys)
    assert all(f"{torch.get_num_threads()} threads" in k and "float32" in k and torch.__version__ in k for k in keys)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert _new_process_peak(monkeypatch, timings, 42e9)[0] == 42e9  # another thread count: its own peak
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"peaks": {"k": "fast"}}', b""])
def test_a_corrupt_cache_is_ignored_and_replaced(timings, monkeypatch, tmp_path, content):
    _new_process_peak(monkeypatch, timings, 280e9)
    path = tmp_path / "cache" / "matmul_peaks.json"
    path.write_bytes(content)
    peak, note = _new_process_peak(monkeypatch, timings, 100e9)
    assert peak == 100e9 and "measured now" in note
    entries = json.loads(path.read_text())["peaks"]  # a good cache again
    assert sorted(entries.values()) == [100e9, 100e9]
    assert _new_process_peak(monkeypatch, timings, 42e9)[0] == 100e9


def test_an_unwritable_cache_does_not_stop_a_run(timings, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KILN_CACHE_DIR", str(blocker / "kiln"))  # a directory inside a file cannot be made
    assert _new_process_peak(monkeypatch, timings, 42e9)[0] == 42e9


def test_a_retime_keeps_the_higher_peak(timings, monkeypatch):
    assert _new_process_peak(monkeypatch, timings, 42e9)[0] == 42e9
    timings[0] = 280e9
    peak, note = hardware.retime_peak(CPU, SHAPES)
    assert peak == 280e9 and "re-timed" in note
    assert hardware.peak_flops(CPU, SHAPES)[0] == 280e9  # the process keeps the new peak
    timings[0] = 10e9
    assert hardware.retime_peak(CPU, SHAPES)[0] == 280e9
    assert _new_process_peak(monkeypatch, timings, 42e9)[0] == 280e9  # and so does the next run


def test_the_cache_lives_in_the_user_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("KILN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hardware.peak_cache_path() == tmp_path / "xdg" / "kiln" / "matmul_peaks.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hardware.peak_cache_path() == tmp_path / "home" / ".cache" / "kiln" / "matmul_peaks.json"


@pytest.fixture(scope="module")
def cache_dir_seen_by_a_module_fixture() -> str | None:
    return os.environ.get("KILN_CACHE_DIR")


def test_no_test_writes_the_real_cache(cache_dir_seen_by_a_module_fixture, tmp_path_factory):
    """Module-scoped fixtures train models too: they must see the test cache, not ~/.cache/kiln."""
    seen = cache_dir_seen_by_a_module_fixture
    assert seen and Path(seen).is_relative_to(tmp_path_factory.getbasetemp())


# ---- GPUs: the datasheet peak of the card and of the precision trained in ---------------------------
GPU = torch.device("cuda", 0)


@pytest.mark.parametrize("name,precision,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H100 PCIe", "bf16", 756), ("NVIDIA H100 NVL", "bf16", 835),
    ("NVIDIA H100 80GB HBM3", "fp32", 495), ("NVIDIA H100 PCIe", "fp32", 378), ("NVIDIA H100 NVL", "fp32", 418),
    ("NVIDIA H200", "bf16", 989), ("NVIDIA H200 NVL", "bf16", 835), ("NVIDIA A100-SXM4-80GB", "bf16", 312),
    ("NVIDIA A100 80GB PCIe", "fp32", 156), ("NVIDIA A10", "bf16", 125), ("NVIDIA L40S", "fp32", 183),
])
def test_a_gpus_peak_is_the_datasheet_figure_of_its_most_specific_name(monkeypatch, name, precision, tflops):
    """Matched by whole words, the longest name that fits: H100 PCIe and NVL are not the SXM part
    (whose figure read their MFU 16-24% low), an A100 is not an A10; fp32 training runs on TF32."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(hardware, "measure_matmul_peak", lambda *a, **kw: pytest.fail("a known card is not timed"))
    peak, note = hardware.peak_flops(GPU, precision=precision)
    assert peak == pytest.approx(tflops * 1e12, rel=2e-3)
    assert ("TF32" if precision == "fp32" else "bf16") in note and "datasheet" in note


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_an_unknown_gpu_is_timed_in_the_precision_trained_in(monkeypatch, precision, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")  # not an A10
    timed = []
    monkeypatch.setattr(hardware, "measure_matmul_peak", lambda device, n, dt: timed.append(dt) or 70e12)
    peak, note = hardware.peak_flops(GPU, precision=precision)
    assert peak == 70e12 and timed == [dtype] and "measured" in note
