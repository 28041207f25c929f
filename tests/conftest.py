"""Shared fixtures: a small real corpus (a slice of the stdlib) prepared once per session."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

from kiln import cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Real Python source, small enough to prepare in a few seconds.
CORPUS_PACKAGES = ["json", "email", "collections", "html", "http", "urllib", "logging", "importlib"]

TINY_TRAIN = [
    "model.preset=tiny", "train.seq_len=64", "train.batch_size=4", "train.eval_batches=2",
    "train.tensorboard=false", "train.progress=false", "train.warmup_steps=5",
]


def kiln(*args: str) -> int:
    return cli.main(list(args))


@pytest.fixture(scope="session", autouse=True)
def _kiln_cache_outside_home(tmp_path_factory):
    """No test reads or writes the real ~/.cache/kiln (the matmul peaks MFU is measured against):
    the whole session, subprocesses and module-scoped fixtures included, shares one cache under
    pytest's temporary directory. Session-scoped so that it is set before any other fixture runs.
    A test that fakes timings points KILN_CACHE_DIR at its own tmp_path instead."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kiln-cache"))
        yield


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for pkg in CORPUS_PACKAGES:
        for f in sorted((STDLIB / pkg).glob("*.py")):
            shutil.copy(f, d / f"{pkg}_{f.name}")
    return d


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_dir) -> Path:
    """A run directory with data/ and tokenizer/ made by `kiln prepare` (vocab 512)."""
    out = tmp_path_factory.mktemp("prepared") / "run"
    assert kiln("prepare", f"out={out}", f"data.input={corpus_dir}", "data.tokenizer.vocab_size=512",
                "data.val_fraction=0.1") == 0
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, prepared) -> Path:
    """A `tiny` model pretrained for 20 steps on the prepared slice, for tests that only read it
    (generation, serving, token healing)."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    shutil.copytree(prepared, out)
    assert kiln("pretrain", f"out={out}", *TINY_TRAIN, "train.max_steps=20", "train.lr=1e-2") == 0
    return out


@pytest.fixture
def run_dir(tmp_path, prepared) -> Path:
    """A fresh run directory holding a copy of the prepared data and tokenizer."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(prepared / "data", out / "data")
    shutil.copytree(prepared / "tokenizer", out / "tokenizer")
    return out


def check_plan_vs_run(run: Path, partial: bool = False, predicted: bool = True) -> dict:
    """A finished run's `plan_vs_run.json` (what the Trainer predicted before the first step and
    measured by the end) and its report's "Plan vs measured" table: every figure there, the
    prediction marked partial exactly when the planner leaves part of the workload out, or no
    prediction at all (`predicted=False`) with the reason."""
    import json

    data = json.loads((run / "plan_vs_run.json").read_text())
    report = (run / "report.md").read_text()
    assert "### Plan vs measured" in report
    if not predicted:
        assert data["predicted"] is None and data["no_prediction"], data
        assert "No prediction: " in report
        return data
    for key in ("peak_memory_bytes", "step_seconds", "tokens_per_s"):
        assert data["predicted"][key] > 0, key
        assert data["measured"][key] > 0, key  # on CPU: the allocator's peak of the first step, not RSS
        assert key in data["error"], key
    assert bool(data["partial"]) == partial, data["partial"]
    assert ("**partial prediction**" in report) == partial
    return data


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group: what code that runs under torch.distributed needs, in a test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
