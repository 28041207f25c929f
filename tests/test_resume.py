"""Checkpoints: SIGKILL at a random step then resume=auto gives bit-identical weights; damage is detected."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY_TRAIN, kiln

ARGS = [*TINY_TRAIN, "train.max_steps=40", "train.ckpt_every=4", "train.log_every=1", "train.eval_every=20",
        "train.keep_last=3"]


def run_cli(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "kiln.cli", "pretrain", f"out={out}", *ARGS, *extra],
                       capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def final_weights(out: Path) -> dict:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return load_file(out / "checkpoints" / latest / "model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert bool((a[k] == b[k]).all()), f"{k} differs"


def last_logged_step(out: Path) -> int:
    p = out / "metrics.jsonl"
    if not p.exists():
        return 0
    steps = [0]
    for line in p.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return max(steps)


@pytest.fixture
def reference(tmp_path, run_dir) -> dict:
    ref = tmp_path / "reference"
    shutil.copytree(run_dir, ref)
    run_cli(ref)
    return final_weights(ref)


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(run_dir, reference):
    kill_at = random.Random(os.getpid()).randint(5, 34)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "pretrain", f"out={run_dir}", *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while last_logged_step(run_dir) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last_logged_step(run_dir) < 40, "the run finished before it could be killed"
    p = run_cli(run_dir)
    assert "resumed from" in p.stdout
    assert_identical(final_weights(run_dir), reference)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # the replayed steps are not logged twice


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(run_dir, reference):
    run_cli(run_dir)
    bad = run_dir / "checkpoints" / "step_0000040" / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    p = run_cli(run_dir)
    assert f"{bad} is corrupt" in p.stderr and "falling back to the previous checkpoint" in p.stderr
    assert "step_0000036 (step 36)" in p.stdout
    assert_identical(final_weights(run_dir), reference)


def test_truncated_checkpoint_is_named_and_skipped(run_dir):
    run_cli(run_dir, "train.max_steps=8")
    bad = run_dir / "checkpoints" / "step_0000008" / "optimizer.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    p = run_cli(run_dir, "train.max_steps=9")
    assert f"{bad} is truncated" in p.stderr
    assert "resumed from" in p.stdout and "step_0000004" in p.stdout


def test_interrupted_save_leaves_no_checkpoint_that_looks_complete(run_dir):
    run_cli(run_dir, "train.max_steps=4")
    ckpts = run_dir / "checkpoints"
    half = ckpts / ".step_0000008.abc.tmp"  # what a kill during a save leaves behind
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    p = run_cli(run_dir, "train.max_steps=5")
    assert "step_0000004 (step 4)" in p.stdout
    assert not half.exists()


def test_resume_never_refuses_to_overwrite_existing_checkpoints(run_dir, capsys):
    run_cli(run_dir, "train.max_steps=4")
    assert kiln("pretrain", f"out={run_dir}", *ARGS, "resume=never") == 2
    assert "already has checkpoints; pass resume=auto" in capsys.readouterr().err
