"""`kiln distill`: the divergences against hand-computed values, the student learning from a frozen
teacher on the shared loop, the on-disk top-k cache, on-policy batches, exact resume, and bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TRAIN, check_plan_vs_run, kiln
from kiln.runs import sha256_file
from kiln.workloads.distill import WindowLoader, token_divergence, topk_forward_kl

STUDENT = ["model.preset=tiny", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1"]


# ---- the divergences ---------------------------------------------------------------------------
def test_divergences_match_hand_computed_values():
    teacher = torch.tensor([0.5, 0.5]).log()
    student = torch.tensor([0.9, 0.1]).log()
    # KL(p‖q) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1); KL(q‖p) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5);
    # JSD with m = (0.7, 0.3): ½[0.5 ln(0.5/0.7) + 0.5 ln(0.5/0.3)] + ½[0.9 ln(0.9/0.7) + 0.1 ln(0.1/0.3)]
    assert float(token_divergence(student, teacher, "forward_kl")) == pytest.approx(0.5108256, abs=1e-6)
    assert float(token_divergence(student, teacher, "reverse_kl")) == pytest.approx(0.3680642, abs=1e-6)
    assert float(token_divergence(student, teacher, "jsd", beta=0.5)) == pytest.approx(0.1017492, abs=1e-6)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert float(token_divergence(teacher, teacher, kind)) == pytest.approx(0.0, abs=1e-7)
        # a high temperature flattens both distributions toward the same uniform one
        assert float(token_divergence(student, teacher, kind, temperature=100.0)) < 1e-4
    disjoint = token_divergence(torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0]), "jsd", beta=0.5)
    assert float(disjoint) == pytest.approx(math.log(2), abs=1e-5)  # JSD's ceiling


def test_top_k_forward_kl_is_the_full_one_when_the_teacher_lives_on_its_top_k():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 40, generator=g)
    teacher = torch.randn(3, 5, 40, generator=g)
    full = token_divergence(student, teacher, "forward_kl", temperature=2.0)
    logp = teacher.log_softmax(-1)
    top = logp.topk(40, dim=-1)
    assert torch.allclose(topk_forward_kl(student, top.indices, top.values, 2.0), full, atol=1e-5)
    peaked = teacher.clone()
    peaked[..., 8:] = -1e4  # no mass outside 8 tokens
    top8 = peaked.log_softmax(-1).topk(8, dim=-1)
    assert torch.allclose(topk_forward_kl(student, top8.indices, top8.values),
                          token_divergence(student, peaked, "forward_kl"), atol=1e-5)


# ---- runs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory, prepared):
    out = tmp_path_factory.mktemp("distill") / "teacher"
    out.mkdir()
    shutil.copytree(prepared / "data", out / "data")
    shutil.copytree(prepared / "tokenizer", out / "tokenizer")
    assert kiln("pretrain", f"out={out}", *TINY_TRAIN, "train.max_steps=40", "train.lr=1e-2", "train.eval_every=1000",
                "train.ckpt_every=1000") == 0
    return out


def args(teacher, out, *extra):
    return [f"out={out}", f"data.path={teacher / 'data'}", f"distill.teacher={teacher}", *TINY_TRAIN, *STUDENT,
            "train.lr=1e-2", *extra]


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_student_learns_from_the_frozen_teacher(teacher, tmp_path):
    before = sha256_file(teacher / "checkpoints" / "step_0000040" / "model.safetensors")
    out = tmp_path / "student"
    assert kiln("distill", *args(teacher, out, "train.max_steps=12", "train.eval_every=12", "train.log_every=4")) == 0
    rows = metrics(out)
    evals = [r for r in rows if "val_kd" in r]
    assert evals[-1]["val_kd"] < 0.8 * evals[0]["val_kd"] and evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    assert evals[0]["val_teacher_bpb"] == evals[-1]["val_teacher_bpb"] < evals[-1]["val_bpb"]
    assert all("ce" in r and "kd" in r for r in rows if "loss" in r)
    info = json.loads((out / "checkpoints" / "step_0000012" / "checkpoint.json").read_text())
    assert info["workload"] == "distill" and info["teacher"].endswith("step_0000040")
    assert info["model"]["d_model"] == 32 and info["distill"]["divergence"] == "forward_kl"
    assert sha256_file(teacher / "checkpoints" / "step_0000040" / "model.safetensors") == before
    assert "## Distillation" in (out / "report.md").read_text()
    planned = check_plan_vs_run(out, partial=True)  # the teacher's logits are not planned, its weights are
    assert planned["predicted"]["memory"]["frozen_weights"] > 0


def test_window_ids_name_the_windows_each_batch_holds(teacher):
    loader = WindowLoader(teacher / "data", "train", 4, 64, seed=3)
    for _ in range(3):
        batch = loader.next_batch()
        for row, w in zip(batch["input_ids"], batch["window_ids"].tolist()):
            assert torch.equal(row, torch.from_numpy(loader._window(w)[0][:-1].astype("int64")))


def test_the_cache_holds_the_teachers_top_k_and_serves_a_second_student(teacher, tmp_path):
    from kiln.infer.load import load

    cache = tmp_path / "cache"
    common = ["distill.teacher_logits=cached", "distill.top_k=8", f"distill.cache_dir={cache}", "train.max_steps=4"]
    assert kiln("distill", *args(teacher, tmp_path / "a", *common)) == 0
    filled = __import__("numpy").load(cache / "filled.npy")
    assert int(filled.sum()) == 16  # 4 steps × 4 windows, each scored once
    w = int(filled.nonzero()[0][0])
    model = load(teacher, "cpu").model
    window = WindowLoader(teacher / "data", "train", 4, 64, seed=0)._window(w)[0][:-1].astype("int64")
    with torch.no_grad():
        logp = model(torch.from_numpy(window)[None])[0, :, :512].log_softmax(-1)
    ids = torch.from_numpy(__import__("numpy").load(cache / "ids.npy", mmap_mode="r")[w].astype("int64"))
    cached = torch.from_numpy(__import__("numpy").load(cache / "logp.npy", mmap_mode="r")[w].astype("float32"))
    assert torch.allclose(logp.gather(-1, ids), cached, atol=2e-2)
    assert torch.allclose(logp.topk(8).values[:, -1], cached[:, -1], atol=2e-2)  # the k largest, no other
    assert kiln("distill", *args(teacher, tmp_path / "b", *common, "model.d_model=64")) == 0
    assert "16 windows read, 0 scored by the teacher" in (tmp_path / "b" / "report.md").read_text()


def test_on_policy_batches_are_written_by_the_student(teacher, tmp_path):
    from kiln.model.config import preset
    from kiln.model.transformer import Transformer
    from kiln.workloads.distill import Distillation

    mc = preset("tiny", vocab_size=512)
    student = Transformer(mc)
    student.init_weights(0)
    objective = Distillation(student, mc, 500, prompt_len=5)
    ids = torch.randint(0, 500, (2, 12))
    batch = objective.student_batch(student, {"input_ids": ids, "labels": ids})
    assert batch["input_ids"].shape == (2, 12) and torch.equal(batch["input_ids"][:, :5], ids[:, :5])
    assert bool((batch["labels"][:, :4] == -100).all()) and bool((batch["labels"][:, 4:] < 500).all())
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:].masked_fill(batch["labels"][:, :-1] == -100, -100))
    out = tmp_path / "on-policy"
    assert kiln("distill", *args(teacher, out, "distill.on_policy=1", "train.max_steps=2", "train.log_every=1")) == 0
    rows = [r for r in metrics(out) if "loss" in r]
    assert all(r["on_policy"] == 1.0 and "ce" not in r and math.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("mode", [[], ["distill.teacher_logits=cached", "distill.on_policy=0.5"]],
                         ids=["online", "cached-on-policy"])
def test_resume_reaches_the_same_weights(teacher, tmp_path, mode):
    straight = tmp_path / "straight"
    common = [*mode, "train.max_steps=6", "train.ckpt_every=3", "train.eval_every=1000"]
    assert kiln("distill", *args(teacher, straight, *common)) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("teacher_cache"))
    shutil.rmtree(resumed / "checkpoints" / "step_0000006")
    (resumed / "checkpoints" / "latest").write_text("step_0000003\n")
    assert kiln("distill", *args(teacher, resumed, *common)) == 0
    a = load_file(straight / "checkpoints" / "step_0000006" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_0000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_refused_in_one_line(teacher, tmp_path, capsys):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(teacher, other, ignore=shutil.ignore_patterns("data"))
    ck = other / "checkpoints" / "step_0000040"
    info = json.loads((ck / "checkpoint.json").read_text())
    # what a run on another tokenizer records (its SHA-256) is what the check reads
    (ck / "checkpoint.json").write_text(json.dumps({**info, "tokenizer_sha256": "0" * 64}))
    quantized = tmp_path / "q"
    assert kiln("quantize", f"source={teacher}", f"out={quantized}", "evaluate=false") == 0
    cases = [
        (args(teacher, tmp_path / "a", f"distill.teacher={other}"), "different tokenizer than the data"),
        (args(teacher, tmp_path / "b", f"distill.teacher={quantized}"), "is a quantized checkpoint"),
        (args(teacher, tmp_path / "c", "distill.teacher_logits=cached", "distill.divergence=reverse_kl"),
         "the top-k cache serves forward_kl only"),
        (args(teacher, tmp_path / "d", "distill.teacher="), "distill.teacher is empty"),
        (args(teacher, tmp_path / "e", "train.seq_len=200", "model.max_seq_len=256"), "exceeds the teacher's context"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert kiln("distill", *argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "a" / "checkpoints").exists()
