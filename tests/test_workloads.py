"""The shared loop's interfaces: objectives for any loss, several models, init_from vs resume,
frozen parameters, document masks, runs that talk when not on a terminal, cumulative metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_TRAIN, kiln
from kiln.config import Config, load
from kiln.data.shards import TokenLoader
from kiln.errors import KilnError
from kiln.model.transformer import Transformer
from kiln.train import parallel
from kiln.train.objectives import LanguageModeling, Objective, next_token_loss
from kiln.train.trainer import SpikeGuard, Trainer
from kiln.workloads.common import model_config_for

FAST = [*TINY_TRAIN, "train.eval_every=1000", "train.ckpt_every=1000"]


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def latest_weights(run) -> dict:
    name = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(run / "checkpoints" / name / "model.safetensors")


# ---- objectives ----------------------------------------------------------------------------------
def test_an_all_masked_batch_gives_zero_loss_and_zero_gradient_not_nan():
    m = Transformer(model_config_for(load(Config, None, ["model.preset=tiny"]), 300))
    m.init_weights(0)
    x = torch.randint(0, 300, (2, 16))
    loss = next_token_loss(m, {"input_ids": x, "labels": torch.full_like(x, -100)})
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in m.parameters() if p.grad is not None)


def test_spike_guard_works_for_negative_and_near_zero_losses():
    g = SpikeGuard(factor=4.0, window=50, max_in_row=5)
    for i in range(30):
        g.record(-2.0 + 0.01 * (i % 3), None, i)
    assert g.bad(-1.98, 1.0) is None  # ordinary noise around -2
    assert g.bad(5.0, 1.0) is not None  # a jump of 7 on a spread of 0.01
    near_zero = SpikeGuard(factor=4.0, window=50, max_in_row=5)
    for i in range(30):
        near_zero.record(0.002 * (i % 5), None, i)
    assert near_zero.bad(0.009, 1.0) is None and near_zero.bad(0.5, 1.0) is not None
    positive = SpikeGuard(factor=4.0, window=50, max_in_row=5)
    for i in range(30):
        positive.record(3.0, None, i)
    assert positive.bad(11.0, 1.0) is None and positive.bad(13.0, 1.0) is not None  # the usual 4× the mean


def _trainer(run_dir, overrides, objective=None) -> Trainer:
    cfg = load(Config, None, [f"out={run_dir}", *FAST, *overrides])
    env = parallel.init_env(cfg)
    mc = model_config_for(cfg, 512)
    model = parallel.build_model(lambda: Transformer(mc), cfg, env, lambda m: m.init_weights(0))
    loader = TokenLoader(run_dir / "data", "train", cfg.train.batch_size, cfg.train.seq_len, 0)
    return Trainer(cfg, model, env, loader, objective or LanguageModeling())


def test_a_custom_objective_is_what_the_loop_optimizes_and_logs(run_dir):
    class PushLogitsDown(Objective):
        name = "push logits down"

        def loss(self, model, batch):
            mean = model(batch["input_ids"]).mean()
            return mean, {"mean_logit": mean.detach()}

    tr = _trainer(run_dir, ["train.max_steps=6", "train.log_every=1", "train.lr=1e-2"], PushLogitsDown())
    tr.fit()
    m = metrics(run_dir)
    assert [r["mean_logit"] for r in m if "mean_logit" in r][-1] < m[0]["mean_logit"]  # logged, and it went down
    assert m[-1]["loss"] == pytest.approx(m[-1]["mean_logit"])


def test_frozen_models_are_placed_but_not_trained(run_dir):
    cfg = load(Config, None, [f"out={run_dir}", *FAST])
    env = parallel.init_env(cfg)
    mc = model_config_for(cfg, 512)
    trained = parallel.build_model(lambda: Transformer(mc), cfg, env, lambda m: m.init_weights(0))
    reference = parallel.build_model(lambda: Transformer(mc), cfg, env, lambda m: m.init_weights(0), frozen=True)
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    assert env.pipeline is None and all(p.requires_grad for p in trained.parameters())


def test_train_freeze_keeps_matching_weights_fixed(run_dir):
    assert kiln("pretrain", f"out={run_dir}", *FAST, "train.max_steps=4", "train.lr=1e-2",
                "train.freeze=[tok_emb.*, layers.0.*]") == 0
    after = latest_weights(run_dir)
    torch.manual_seed(0)
    init = Transformer(model_config_for(load(Config, None, FAST), 512))
    init.init_weights(0)
    assert torch.equal(after["tok_emb.weight"], init.tok_emb.weight.detach())
    assert torch.equal(after["layers.0.attn.wq.weight"], init.layers["0"].attn.wq.weight.detach())
    assert not torch.equal(after["layers.1.attn.wq.weight"], init.layers["1"].attn.wq.weight.detach())
    assert kiln("pretrain", f"out={run_dir}-x", f"data.path={run_dir / 'data'}", *FAST, "train.freeze=[nothing.*]") == 2


# ---- init_from vs resume -------------------------------------------------------------------------
def test_init_from_starts_a_new_run_from_another_runs_weights(run_dir, tmp_path):
    assert kiln("pretrain", f"out={run_dir}", *FAST, "train.max_steps=6", "train.lr=1e-2") == 0
    source = latest_weights(run_dir)
    new = tmp_path / "new"
    assert kiln("pretrain", f"out={new}", f"data.path={run_dir / 'data'}", f"init_from={run_dir}", *FAST,
                "train.max_steps=2", "train.lr=1e-9", "train.warmup_steps=0", "train.weight_decay=0") == 0
    got = latest_weights(new)
    assert all(torch.allclose(got[k], source[k], atol=1e-6) for k in source)  # lr 1e-9: still the source's weights
    info = json.loads((new / "checkpoints" / "step_0000002" / "checkpoint.json").read_text())
    assert info["init_from"].startswith(str(run_dir)) and metrics(new)[-1]["step"] == 2  # counts from 0 again


def test_init_from_takes_subsets_and_supersets_and_refuses_anything_else(run_dir, tmp_path):
    from kiln.train.restore import load_init_weights

    mc = model_config_for(load(Config, None, FAST), 512)
    src = Transformer(mc)
    src.init_weights(1)
    full = {k: v.contiguous() for k, v in src.state_dict().items() if k != "lm_head.weight"}

    def ckpt(name, tensors):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, d / "model.safetensors")
        return d

    target = Transformer(mc)
    target.init_weights(0)
    note = load_init_weights(target, ckpt("super", {**full, "score_head.weight": torch.zeros(1, mc.d_model)}), "test")
    assert "1 not used" in note and torch.equal(target.norm.weight, src.norm.weight)
    target.init_weights(0)
    note = load_init_weights(target, ckpt("sub", {"norm.weight": torch.full((mc.d_model,), 2.0)}), "test")
    assert "new ones keep their initialization" in note and float(target.norm.weight[0].detach()) == 2.0
    with pytest.raises(KilnError, match="does not fit this model"):
        load_init_weights(target, ckpt("other", {"norm.weight": full["norm.weight"], "other.weight": torch.zeros(3)}),
                          "test")
    with pytest.raises(KilnError, match="shape"):
        load_init_weights(target, ckpt("shape", {"norm.weight": torch.zeros(3)}), "test")


def test_init_from_a_path_that_is_not_a_run_is_one_line(run_dir, tmp_path):
    assert kiln("pretrain", f"out={tmp_path / 'x'}", f"data.path={run_dir / 'data'}", f"init_from={tmp_path}", *FAST) == 2


# ---- document masks ------------------------------------------------------------------------------
def test_document_mask_batches_follow_the_shards_document_offsets(run_dir):
    loader = TokenLoader(run_dir / "data", "train", 4, 64, 0, document_mask=True)
    batch = loader.next_batch()
    bos = 0  # every document starts with BOS (id 0)
    ids, docs, pos = batch["input_ids"], batch["document_ids"], batch["positions"]
    starts = (ids == bos)
    starts[:, 0] = True
    assert torch.equal(torch.cumsum(starts[:, 1:].long(), 1), docs[:, 1:] - docs[:, :1])  # a new id at each BOS
    assert bool((pos[starts] == 0).all()) and bool((pos[~starts] > 0).all())
    assert kiln("pretrain", f"out={run_dir}", *FAST, "train.max_steps=3", "train.document_mask=true") == 0


# ---- runs that talk ------------------------------------------------------------------------------
def test_pretrain_prints_log_lines_validation_and_a_summary_when_not_a_terminal(run_dir):
    p = subprocess.run([sys.executable, "-m", "kiln", "pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=20",
                        "train.log_every=5", "train.eval_every=10", "train.progress=true"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    logs = [line for line in lines if line.startswith("pretrain: step ") and "| loss " in line]
    assert [line.split()[2] for line in logs] == ["5/20", "10/20", "15/20", "20/20"]
    assert all("tok/s" in line and "MFU" in line and "ETA" in line for line in logs)
    assert sum("validation: val_loss" in line for line in lines) == 3  # steps 0, 10, 20
    assert lines[-1].startswith("pretrain: done: 20 steps") and "report.md" in lines[-1]
    assert "GFLOP/s" in p.stdout  # the peak MFU is measured against is printed
    assert (run_dir / "report.md").is_file() and (run_dir / "loss.png").is_file()


def test_metrics_stay_cumulative_across_resume(run_dir):
    args = [f"out={run_dir}", *TINY_TRAIN, "train.log_every=1", "train.eval_every=1000", "train.ckpt_every=5"]
    assert kiln("pretrain", *args, "train.max_steps=5") == 0
    first = metrics(run_dir)[-1]
    assert kiln("pretrain", *args, "train.max_steps=10") == 0
    m = metrics(run_dir)
    assert m[-1]["tokens"] == 10 * 4 * 64 and m[-1]["elapsed_s"] > first["elapsed_s"]
    assert [r["elapsed_s"] for r in m if "elapsed_s" in r] == sorted(r["elapsed_s"] for r in m if "elapsed_s" in r)


def test_warmup_longer_than_the_run_is_said(run_dir, capsys):
    assert kiln("pretrain", f"out={run_dir}", *FAST, "train.max_steps=3", "train.warmup_steps=10") == 0
    assert "stays in warmup" in capsys.readouterr().out


def test_pretrain_prepares_the_default_data_when_there_is_none(tmp_path, corpus_dir):
    out = tmp_path / "fresh"
    assert kiln("pretrain", f"out={out}", f"data.input={corpus_dir}", "data.tokenizer.vocab_size=400",
                *FAST, "train.max_steps=2") == 0
    assert (out / "data" / "manifest.json").is_file() and (out / "checkpoints" / "step_0000002").is_dir()
    # an explicit data.path is never prepared behind the user's back
    assert kiln("pretrain", f"out={tmp_path / 'b'}", f"data.path={tmp_path / 'nowhere'}", *FAST) == 2


def test_a_run_of_another_workload_is_not_continued_by_pretrain(run_dir):
    assert kiln("pretrain", f"out={run_dir}", *FAST, "train.max_steps=2") == 0
    ck = run_dir / "checkpoints" / "step_0000002" / "checkpoint.json"
    info = json.loads(ck.read_text())
    info["workload"] = "sft"
    ck.write_text(json.dumps(info))
    from kiln.train.checkpoint import CheckpointManager
    from kiln.workloads.common import resolve_resume

    cfg = load(Config, None, [f"out={run_dir}", *FAST])
    with pytest.raises(KilnError, match="holds a sft run"):
        resolve_resume(cfg, CheckpointManager(run_dir), model_config_for(cfg, 512), "pretrain")
    shutil.rmtree(run_dir / "checkpoints")


def test_the_report_calls_an_mfu_above_100_percent_a_measurement_error(tmp_path):
    from kiln.train.report import push_training_section  # what the Trainer does at the end of a run

    run = tmp_path / "r"
    run.mkdir()
    rows = [{"step": s, "loss": 3.0, "tokens_per_s": 1000.0, "mfu": 1.05, "peak_flops": 1e11} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = push_training_section(run).read_text()
    assert "MFU median 105.0% of 100 GFLOP/s" in text and "measurement error, not a result" in text
    rows = [{**r, "mfu": 0.8} for r in rows]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "measurement error" not in push_training_section(run).read_text()


@pytest.fixture(scope="module")
def short_held_out(tmp_path_factory):
    """Prepared data whose held-out split is one document of about a thousand tokens."""
    import sysconfig
    from pathlib import Path

    d = tmp_path_factory.mktemp("short_val")
    lib = Path(sysconfig.get_paths()["stdlib"])
    (d / "in").mkdir()
    for f in [*sorted((lib / "email" / "mime").glob("*.py")), *sorted((lib / "json").glob("*.py"))]:
        shutil.copy(f, d / "in" / f"{f.parent.name}_{f.name}")
    assert kiln("prepare", f"out={d / 'run'}", f"data.input={d / 'in'}", "data.tokenizer.vocab_size=300",
                "data.val_fraction=0.01") == 0
    val = json.loads((d / "run" / "data" / "manifest.json").read_text())["splits"]["val"]
    assert val["docs"] == 1 and val["tokens"] < 1500
    return d / "run", val["tokens"]


@pytest.mark.parametrize("verb", ["pretrain", "distill"])
def test_a_held_out_split_shorter_than_a_window_is_validated_in_a_shorter_one_and_said(
        short_held_out, tmp_path, capsys, verb):
    data, tokens = short_held_out
    long = ["model.preset=tiny", "train.seq_len=1536", "model.max_seq_len=1536", "train.batch_size=2",
            "train.max_steps=2", "train.eval_every=2", "train.tensorboard=false", "train.progress=false",
            "train.warmup_steps=1", f"data.path={data / 'data'}"]
    teacher = tmp_path / "teacher"
    out = teacher if verb == "pretrain" else tmp_path / "student"
    assert kiln("pretrain", f"out={teacher}", *long) == 0
    if verb == "distill":
        capsys.readouterr()
        assert kiln("distill", f"out={out}", f"distill.teacher={teacher}", *long, "model.d_model=32") == 0
    said = capsys.readouterr().out
    assert f"shorter than one window of 1537 tokens; validating on windows of {tokens - 1} tokens" in said
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if "val_bpb" in m][-1]
    assert val["step"] == 2
    assert f"final validation on 1 window of {tokens - 1} tokens" in (out / "report.md").read_text()
    if verb == "pretrain":  # quantize and eval score the same short windows: one figure, no refusal
        assert kiln("quantize", f"source={out}", f"out={tmp_path / 'q'}") == 0
        assert kiln("eval", f"out={out}", "eval.tasks=false") == 0
        said = capsys.readouterr().out
        assert f"held-out bits/byte {val['val_bpb']:.4f} → " in said
        assert f"held-out bits/byte {val['val_bpb']:.4f} " in said.split("eval: ")[1]
