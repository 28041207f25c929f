"""What made a run (`provenance.json`, written by every training verb) and `kiln diff`, which says
what differs between two runs and where their losses part."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from conftest import TINY_TRAIN, kiln
from kiln import __version__, provenance

REPO = Path(__file__).resolve().parent.parent
SHORT = [*TINY_TRAIN, "train.log_every=1"]
# Stands in for the checkout's state: other work may edit the tree between two runs of one test.
FIXED_CODE = {"source": "git", "kiln_version": __version__, "commit": "c" * 40, "dirty": False, "diff_sha256": None}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def newer_numpy(monkeypatch) -> None:
    """The version reader as on a machine with another numpy."""
    real = provenance.package_versions
    monkeypatch.setattr(provenance, "package_versions", lambda: {**real(), "numpy": "0.0-test"})


def test_the_code_is_this_checkouts_commit_or_the_installed_version(monkeypatch):
    code = provenance.code_version()
    assert code["kiln_version"] == __version__
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True) \
        if shutil.which("git") else None
    if head is not None and head.returncode == 0:  # a git checkout: its commit, and whether it was dirty
        assert code["source"] == "git" and code["commit"] == head.stdout.strip()
        assert isinstance(code["dirty"], bool) and bool(code["diff_sha256"]) == code["dirty"]
    else:
        assert code["source"] == "installed"
    monkeypatch.setenv("PATH", "")  # git cannot be found: no error, kiln's version instead
    assert provenance.code_version() == {"source": "installed", "kiln_version": __version__}


def test_a_training_run_records_what_made_it_and_a_resume_keeps_the_session_before(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(provenance, "code_version", lambda: dict(FIXED_CODE))
    assert kiln("pretrain", f"out={run_dir}", *SHORT, "train.max_steps=2", "train.seed=7") == 0
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["workload"] == "pretrain" and rec["format"] == 1
    assert rec["code"] == FIXED_CODE
    pk = rec["packages"]
    assert pk["python"] == ".".join(map(str, sys.version_info[:3]))
    for name in ("torch", "numpy", "tokenizers", "safetensors"):
        assert pk[name], name
    hw = rec["hardware"]
    assert hw["cpu"] and hw["cpu_count"] >= 1 and hw["memory_gib"] > 0 and hw["cpu_threads"] >= 1
    assert "torch_cuda" in hw and isinstance(hw["gpus"], list)
    assert rec["seeds"]["train.seed"] == 7
    assert rec["config"] == {"file": "config.yaml", "sha256": sha256(run_dir / "config.yaml")}
    data = rec["data"]["data.path"]
    assert data["manifest_sha256"] == sha256(run_dir / "data" / "manifest.json")
    assert data["splits"]["train"]["tokens"] > 0
    assert rec["data"]["tokenizer"]["sha256"] == sha256(run_dir / "tokenizer" / "tokenizer.json")
    assert rec["parallel"]["world_size"] == 1 and rec["parallel"]["device"] == "cpu"
    assert rec["resumed_at_step"] is None and rec["history"] == [] and rec["changed"] == []

    newer_numpy(monkeypatch)  # the run continues after an upgrade: provenance.json says what changed
    capsys.readouterr()
    assert kiln("pretrain", f"out={run_dir}", "train.max_steps=4") == 0
    assert "this session continues the run on changed packages.numpy (the sessions before it" in capsys.readouterr().out
    again = json.loads((run_dir / "provenance.json").read_text())
    assert again["resumed_at_step"] == 2
    assert [h["started"] for h in again["history"]] == [rec["started"]]
    assert again["history"][0]["packages"]["numpy"] == pk["numpy"]
    changed = {(c["section"], c["key"]): (c["a"], c["b"]) for c in again["changed"]}
    assert changed[("packages", "numpy")] == (pk["numpy"], "0.0-test")
    assert changed[("config", "train.max_steps")] == (2, 4)


def test_kiln_diff_names_the_config_key_the_data_and_the_package_that_differ(tmp_path, prepared, monkeypatch,
                                                                              capsys):
    monkeypatch.setattr(provenance, "code_version", lambda: dict(FIXED_CODE))
    other = tmp_path / "other"  # the same prepared data, its manifest edited: data that differs
    shutil.copytree(prepared / "data", other / "data")
    shutil.copytree(prepared / "tokenizer", other / "tokenizer")
    manifest = json.loads((other / "data" / "manifest.json").read_text())
    (other / "data" / "manifest.json").write_text(json.dumps({**manifest, "note": "edited"}))
    a, b = tmp_path / "a", tmp_path / "b"
    assert kiln("pretrain", f"out={a}", f"data.path={prepared / 'data'}", *SHORT, "train.max_steps=3") == 0
    newer_numpy(monkeypatch)
    assert kiln("pretrain", f"out={b}", f"data.path={other / 'data'}", *SHORT, "train.max_steps=3",
                "train.lr=1e-3") == 0
    capsys.readouterr()

    assert kiln("diff", str(a), str(b), "--json") == 0
    d = json.loads(capsys.readouterr().out)
    assert [(c["key"], c["a"], c["b"]) for c in d["config"]] == [("train.lr", 3e-3, 1e-3)]  # not out, not data.path
    assert [x["key"] for x in d["data"]] == ["data.path"]
    assert d["data"][0]["a"]["manifest_sha256"] != d["data"][0]["b"]["manifest_sha256"]
    assert [(p["key"], p["b"]) for p in d["packages"]] == [("numpy", "0.0-test")]
    assert d["code"] == d["hardware"] == d["parallel"] == []
    # Step 1's loss comes before any update; the learning rates part them at step 2.
    assert d["losses"]["identical_through"] == 1 and d["losses"]["first_difference"]["step"] == 2

    assert kiln("diff", str(a), str(b)) == 0
    lines = capsys.readouterr().out.splitlines()
    named = [ln for ln in lines if re.match(r"(config|data|code|packages|hardware|parallel) ", ln)]
    assert len(named) == 3, lines
    assert named[0] == "config    train.lr: 0.003 → 0.001"
    assert named[1].startswith(f"data      data.path: {prepared / 'data'} (manifest.json sha256 ")
    assert named[2].startswith("packages  numpy: ") and named[2].endswith(" → 0.0-test")
    first = d["losses"]["first_difference"]
    assert f"losses    identical through step 1; first differ at step 2: {first['a']:.9g} vs {first['b']:.9g}" in lines
    assert "same      code, hardware, parallel" in lines


def test_input_files_are_recorded_by_size_and_hash(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": []}\n')
    out = tmp_path / "run"
    assert provenance.input_record("sft.data", str(chats), out) == {
        "value": str(chats), "bytes": chats.stat().st_size, "sha256": sha256(chats)}
    assert provenance.input_record("sft.val_data", "", out) is None  # held out of the training file
    assert provenance.input_record("preference.data", "", out) == {"value": "", "default": True}
    (out / "sft_data").mkdir(parents=True)
    (out / "sft_data" / "train.jsonl").write_text("{}\n")
    assert provenance.input_record("sft.data", "", out)["sha256"] == sha256(out / "sft_data" / "train.jsonl")
    ckpt = tmp_path / "base" / "checkpoints" / "step_0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.json").write_text('{"step": 4}')
    assert provenance.input_record("init_from", str(tmp_path / "base"), out) == {
        "value": str(tmp_path / "base"), "checkpoint": str(ckpt), "step": 4,
        "checkpoint_sha256": sha256(ckpt / "checkpoint.json")}


def test_where_losses_part():
    part = provenance.loss_parting
    same = {1: 5.0, 2: 4.0, 3: 3.0}
    assert part(same, {**same, 4: 2.0})["identical_through"] == 3
    assert part(same, {1: 5.0, 2: 4.0 * (1 + 1e-7), 3: 3.5}) == {
        "rtol": 1e-6, "steps_a": [1, 3], "steps_b": [1, 3], "common_steps": 3, "identical_through": 2,
        "first_difference": {"step": 3, "a": 3.0, "b": 3.5}}
    assert part(same, {1: 5.5})["first_difference"] == {"step": 1, "a": 5.0, "b": 5.5}
    assert part(same, {1: 5.5})["identical_through"] is None
    assert part({1: float("nan")}, {1: float("nan")})["identical_through"] == 1
    apart = part(same, {7: 1.0, 8: 1.0})
    assert apart["common_steps"] == 0 and provenance._loss_line(apart) == "no common steps (A: steps 1-3, B: steps 7-8)"
    assert provenance._loss_line(part(same, same)).startswith("identical through step 3 (3 common steps")


def fake_run(path: Path, lr: float, numpy_version: str, losses: list[float]) -> Path:
    """A run directory as a training verb leaves it, written by hand (no training)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"out: {path}\ntrain:\n  lr: {lr}\n  seed: 0\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": x}) + "\n"
                                                for i, x in enumerate(losses)))
    (path / "provenance.json").write_text(json.dumps({
        "format": 1, "workload": "pretrain", "code": FIXED_CODE, "packages": {"python": "3.11.7", "numpy": numpy_version},
        "hardware": {"cpu": "x"}, "parallel": {"world_size": 1}, "data": {}, "history": [], "changed": []}))
    return path


def probe(*argv: str) -> subprocess.CompletedProcess:
    """`kiln.cli.main(argv)` in a fresh interpreter; its last line of stdout says whether torch was imported."""
    code = "import sys\nfrom kiln.cli import main\nrc = main(sys.argv[1:])\nprint('torch' in sys.modules)\nsys.exit(rc)"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_kiln_diff_reads_files_only_and_a_missing_run_is_one_line(tmp_path):
    a = fake_run(tmp_path / "a", 0.1, "2.0.0", [5.0, 4.0, 3.0])
    b = fake_run(tmp_path / "b", 0.2, "2.1.0", [5.0, 4.5])
    p = probe("diff", str(a), str(b))
    assert p.returncode == 0, p.stderr
    *text, imported = p.stdout.splitlines()
    assert imported == "False"  # torch was never imported
    assert "config    train.lr: 0.1 → 0.2" in text
    assert "packages  numpy: 2.0.0 → 2.1.0" in text
    assert "losses    identical through step 1; first differ at step 2: 4 vs 4.5" in text

    p = probe("diff", str(tmp_path / "missing"), str(a))
    assert p.returncode == 2 and p.stdout.split() == ["False"]
    assert p.stderr.splitlines() == [f"kiln diff: error: '{tmp_path / 'missing'}' does not exist; name two training "
                                     "runs: kiln diff runs/A runs/B"]
    p = probe("diff", str(a), str(tmp_path))
    assert p.returncode == 2
    assert p.stderr.splitlines() == [f"kiln diff: error: '{tmp_path}' is not a training run (no config.yaml or "
                                     "provenance.json); name a directory a training verb wrote, e.g. runs/NAME"]


def test_the_gpus_are_named_with_their_memory_and_driver(monkeypatch):
    """What a CUDA process records (torch stood in for: the test runs anywhere)."""
    props = SimpleNamespace(total_memory=80 * 2**30, major=9, minor=0)
    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                           get_device_name=lambda i: "NVIDIA H100 80GB HBM3", get_device_properties=lambda i: props)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(version=SimpleNamespace(cuda="12.4"), cuda=cuda,
                                                              get_num_threads=lambda: 8))
    monkeypatch.setattr(provenance, "_nvidia_driver", lambda: "550.54.15")
    hw = provenance.hardware()
    assert hw["gpus"] == ["NVIDIA H100 80GB HBM3"] * 2 and hw["gpu_memory_gib"] == 80.0
    assert (hw["gpu_capability"], hw["gpu_driver"], hw["torch_cuda"], hw["cpu_threads"]) == ("9.0", "550.54.15", "12.4", 8)
    assert provenance._short(hw["gpus"]) == "2 × NVIDIA H100 80GB HBM3"
    assert provenance.driver_in("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 2023") \
        == "535.104.05"
    assert provenance.driver_in("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release") \
        == "550.54.15"
