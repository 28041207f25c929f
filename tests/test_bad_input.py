"""Bad input gets one line naming the problem and the fix, no traceback, and nothing half-written."""

from __future__ import annotations

import json
import shutil

import numpy as np

from conftest import TINY_TRAIN, kiln
from kiln.data.tokenizer import train_tokenizer


def error_of(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("kiln ")]
    assert len(lines) == 1, err
    return lines[0]


def test_out_pointing_at_a_run_of_a_different_model(run_dir, capsys):
    assert kiln("pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=2") == 0
    capsys.readouterr()
    assert kiln("pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=4", "model.d_model=128") == 2
    msg = error_of(capsys)
    assert "holds a run of a different model (d_model: 64 there, 128 here" in msg and "choose a new out=" in msg
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000002"  # untouched


def test_shards_whose_vocab_does_not_match_the_tokenizer(run_dir, capsys, corpus_dir):
    other = train_tokenizer([p.read_text() for p in sorted(corpus_dir.glob("json_*.py"))], 300)
    other.save(str(run_dir / "tokenizer" / "tokenizer.json"))
    assert kiln("pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=2") == 2
    msg = error_of(capsys)
    assert "were written with a different tokenizer (vocab 512)" in msg and "re-run `kiln prepare`" in msg
    assert not (run_dir / "checkpoints").exists()


def test_shard_ids_beyond_the_vocab_are_caught(run_dir, capsys):
    man = json.loads((run_dir / "data" / "manifest.json").read_text())
    shard = run_dir / "data" / man["splits"]["train"]["shards"][0]["file"]
    ids = np.fromfile(shard, dtype=man["dtype"])
    ids[10] = 60000
    ids.tofile(shard)
    assert kiln("pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=2") == 2
    assert "holds id 60000 ≥ the vocab size 512" in error_of(capsys)


def test_truncated_shard_is_named(run_dir, capsys):
    man = json.loads((run_dir / "data" / "manifest.json").read_text())
    shard = run_dir / "data" / man["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:1000])
    assert kiln("pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=2") == 2
    assert f"token shard '{shard}' is missing or truncated" in error_of(capsys)


def test_empty_corpus_leaves_no_output(tmp_path, capsys):
    src = tmp_path / "empty"
    src.mkdir()
    (src / "a.txt").write_text("")
    (src / "b.txt").write_text("   \n")
    out = tmp_path / "run"
    assert kiln("prepare", f"out={out}", f"data.input={src}", "data.tokenizer.vocab_size=300") == 2
    msg = error_of(capsys)
    assert "no documents" in msg and str(src) in msg
    assert not (out / "data").exists() and not (out / "tokenizer").exists()


def test_missing_input_path(tmp_path, capsys):
    assert kiln("prepare", f"out={tmp_path / 'run'}", f"data.input={tmp_path / 'nowhere'}") == 2
    assert "matches no files" in error_of(capsys)


def test_pretrain_without_prepared_data(tmp_path, capsys):
    """pretrain prepares data.input itself when nothing is prepared; a data.path it is pointed at must exist."""
    assert kiln("pretrain", f"out={tmp_path / 'run'}", f"data.path={tmp_path / 'none'}", *TINY_TRAIN) == 2
    assert f"'{tmp_path / 'none'}' holds no prepared data" in error_of(capsys)
    assert kiln("pretrain", f"out={tmp_path / 'run'}", f"data.input={tmp_path / 'nowhere'}", *TINY_TRAIN) == 2
    assert "matches no files" in error_of(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_generate_without_a_checkpoint(run_dir, capsys):
    assert kiln("generate", f"out={run_dir}", "prompt=def f(") == 2
    assert "has no intact checkpoint" in error_of(capsys)


def test_missing_recipe_file(capsys):
    assert kiln("speedrun", "-c", "recipes/does-not-exist.yaml") == 2
    assert "recipe file 'recipes/does-not-exist.yaml' does not exist" in error_of(capsys)


def test_resume_from_a_checkpoint_of_a_different_model(run_dir, tmp_path, capsys):
    assert kiln("pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=2") == 0
    other = tmp_path / "other"
    shutil.copytree(run_dir / "data", other / "data")
    shutil.copytree(run_dir / "tokenizer", other / "tokenizer")
    capsys.readouterr()
    ck = run_dir / "checkpoints" / "step_0000002"
    assert kiln("pretrain", f"out={other}", *TINY_TRAIN, "train.max_steps=4", "model.n_layers=3", f"resume={ck}") == 2
    assert "holds a run of a different model (n_layers: 2 there, 3 here" in error_of(capsys)
