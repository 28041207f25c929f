"""Training with `train.compile=on`: compiled blocks give the eager model's losses and gradients,
several models of different shapes compile side by side in one process (as `kiln speedrun` runs
them) without reaching dynamo's recompile limit, and a model whose blocks are compiled decodes
(on-policy distillation, GRPO rollouts) through its plain modules.

On this CPU the blocks are compiled with dynamo's `eager` backend: the same tracing, guards and
cache entries as inductor, without generating code."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch

from conftest import TINY_TRAIN, kiln
from kiln.infer.engine import SamplingParams
from kiln.infer.generate import generate
from kiln.model.config import preset
from kiln.model.transformer import Transformer
from kiln.train import parallel

# d_model, n_layers, n_heads, n_kv_heads: six models, every one a different shape
SHAPES = [(64, 2, 4, 2), (32, 2, 2, 1), (48, 3, 3, 1), (96, 1, 4, 4), (64, 3, 4, 1), (80, 2, 5, 5)]


@pytest.fixture
def eager_backend(monkeypatch):
    """Blocks compile with the eager backend, from an empty dynamo cache."""
    monkeypatch.setattr(parallel, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab: int = 128) -> Transformer:
    cfg = dataclasses.replace(preset("tiny", vocab_size=vocab), d_model=d_model, n_layers=n_layers,
                              n_heads=n_heads, n_kv_heads=n_kv_heads)
    model = Transformer(cfg)
    model.init_weights(0)
    return model


def compiled(model: Transformer) -> Transformer:
    parallel.apply_compile(model)
    return model


def test_models_of_different_shapes_train_and_evaluate_side_by_side(eager_backend):
    """Six models, each trained a step, evaluated without gradients, and (as a DPO reference or a
    distillation teacher) run frozen: more cache entries than dynamo keeps for one function, none
    of which may make a later model fail."""
    torch.manual_seed(0)
    for shape in SHAPES:
        model, frozen = compiled(tiny(*shape)), compiled(tiny(*shape).requires_grad_(False).eval())
        ids = torch.randint(0, 128, (2, 16))
        model(ids).logsumexp(-1).mean().backward()
        assert all(p.grad is not None for p in model.parameters())
        with torch.no_grad():
            model.eval()
            model(ids, attention_mask=torch.ones_like(ids))
            frozen(ids)
            frozen(ids[:, :8])


def test_a_model_compiles_once_for_all_its_widths_and_leaves_other_models_static(monkeypatch):
    """Padded widths that change from batch to batch (DPO, GRPO): a static graph for the first,
    then one with the sequence length dynamic for every later one. A model of another shape
    compiled next gets static shapes: what varied in the first is that model's own business."""
    graphs: list[bool] = []  # per graph compiled: whether any size in it is symbolic

    def counting(gm, example_inputs):
        graphs.append(any(isinstance(x, torch.SymInt) for x in example_inputs))
        return gm.forward

    monkeypatch.setattr(parallel, "COMPILE_BACKEND", counting)
    torch._dynamo.reset()
    policy = compiled(tiny(64, 2, 4, 2))
    for width in (32, 64, 96, 128, 64):
        ids = torch.randint(0, 128, (2, width))
        mask = torch.ones_like(ids)
        mask[0, -5:] = 0
        policy(ids, attention_mask=mask).logsumexp(-1).mean().backward()
    assert graphs == [False, True]
    graphs.clear()
    other = compiled(tiny(32, 2, 2, 1))
    other(torch.randint(0, 128, (2, 48))).logsumexp(-1).mean().backward()
    assert graphs == [False]
    torch._dynamo.reset()


def test_compiled_blocks_give_the_eager_losses_and_gradients(eager_backend):
    torch.manual_seed(0)
    plain, comp = tiny(64, 2, 4, 2), compiled(tiny(64, 2, 4, 2))
    ids = torch.randint(0, 128, (2, 16))
    docs = torch.tensor([[0] * 8 + [1] * 8, [0] * 16])
    for model in (plain, comp):
        model(ids, document_ids=docs).logsumexp(-1).mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), comp.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_a_model_with_compiled_blocks_decodes_through_its_plain_modules(eager_backend):
    """Generation (a KV cache, one row at its own position each) never enters the compiled blocks:
    the same tokens as the plain model, for a model of more layers than dynamo keeps entries
    for one function (a KV cache through a compiled block would cost one per layer)."""
    torch.manual_seed(0)
    plain, comp = tiny(32, 10, 2, 1), compiled(tiny(32, 10, 2, 1))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    params = [SamplingParams(6, temperature=0.0)] * 2
    for fused in (True, False):
        want = [s.tokens for s in generate(plain, prompts, params, stop_ids=set(), fused=fused)]
        got = [s.tokens for s in generate(comp, prompts, params, stop_ids=set(), fused=fused, inference=False)]
        assert got == want


def test_pretrain_then_distill_on_policy_with_compile_on(eager_backend, tmp_path, prepared):
    """A teacher pretrained with compiled blocks, then a student of another shape distilled from it
    in the same process, half of its batches sampled from itself through its compiled blocks."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    shutil.copytree(prepared / "data", teacher / "data")
    shutil.copytree(prepared / "tokenizer", teacher / "tokenizer")
    assert kiln("pretrain", f"out={teacher}", *TINY_TRAIN, "train.compile=on", "train.max_steps=6",
                "train.lr=1e-2", "train.eval_every=3", "train.ckpt_every=1000") == 0
    student = tmp_path / "student"
    assert kiln("distill", f"out={student}", f"data.path={teacher / 'data'}", f"distill.teacher={teacher}",
                *TINY_TRAIN, "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=10",
                "train.compile=on",
                "distill.on_policy=0.5", "distill.prompt_len=8", "train.max_steps=4", "train.eval_every=2",
                "train.log_every=1") == 0
    rows = [line for line in (student / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(rows) == 4 and all(math.isfinite(float(r.split('"loss": ')[1].split(",")[0])) for r in rows)

