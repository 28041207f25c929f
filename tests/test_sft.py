"""`kiln sft`: the chat data loader (assistant-only loss, packing that keeps conversations apart,
bad records counted or refused), LoRA (starts as its base, trains only adapters, merges exactly,
saves the adapters alone), full and LoRA runs that beat their base on held-out data, resume
exactly, serve through `kiln generate`, and compose with FSDP2 / DDP on 2 gloo ranks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TRAIN, check_plan_vs_run, kiln
from kiln.config import LoRAConfig
from kiln.data.chat import IGNORE
from kiln.data.chat_data import (
    ChatStats,
    PackedChatLoader,
    packed_batch,
    packed_eval_batches,
    read_conversations,
    tokenize,
)
from kiln.data.sft_default import build_default_task
from kiln.data.tokenizer import END, PAD, load_tokenizer
from kiln.errors import KilnError
from kiln.model.config import preset
from kiln.model.lora import (
    ADAPTER_FILE,
    LoRALinear,
    apply_lora,
    init_lora,
    load_adapter,
    merge_lora,
    read_adapter,
)
from kiln.model.transformer import Transformer
from kiln.plan import lora_layer_params
from kiln.train.objectives import LanguageModeling

HERE = Path(__file__).resolve()
SEQ = 128  # the tiny preset's context
SFT = [*TINY_TRAIN, f"train.seq_len={SEQ}", "train.batch_size=4", "train.warmup_steps=2", "train.log_every=1",
       "train.eval_batches=2", "sft.default_max_chars=200", "sft.eval_prompts=12"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def tiny(vocab: int = 512, seed: int = 0) -> Transformer:
    m = Transformer(preset("tiny", vocab_size=vocab))
    m.init_weights(seed)
    return m


@pytest.fixture(scope="module")
def tok(prepared):
    return load_tokenizer(prepared / "tokenizer")


@pytest.fixture(scope="module")
def base(tmp_path_factory, prepared) -> Path:
    """A briefly pretrained tiny model: the run every fine-tuning here starts from."""
    out = tmp_path_factory.mktemp("sft") / "base"
    assert kiln("pretrain", f"out={out}", f"data.path={prepared / 'data'}", *TINY_TRAIN, "train.max_steps=20",
                "train.lr=1e-2", "train.eval_every=1000", "train.ckpt_every=1000", "train.log_every=20") == 0
    shutil.copytree(prepared / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpus_dir) -> Path:
    """Python files the default task is built from (a slice of the stdlib: seconds, not a minute)."""
    d = tmp_path_factory.mktemp("pysrc")
    for f in sorted(corpus_dir.glob("*.py"))[:40]:
        shutil.copy(f, d / f.name)
    return d


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


CONVS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Square of 3?"},
     {"role": "assistant", "content": "9"}, {"role": "user", "content": "And of 4?"},
     {"role": "assistant", "content": "16, of course"}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}],
    [{"role": "user", "content": "def f(x): return x"}, {"role": "assistant", "content": "The identity function."}],
]


# ---- the loader ------------------------------------------------------------------------------------
def test_loss_is_only_on_assistant_tokens_counted_in_the_packed_batch(tok):
    stats = ChatStats()
    examples = tokenize(tok, CONVS, SEQ, stats)
    batch = packed_batch(examples, [[0, 1, 2]], SEQ, tok.token_to_id(PAD))
    labelled = batch["labels"][batch["labels"] != IGNORE]
    replies = [m["content"] for c in CONVS for m in c if m["role"] == "assistant"]
    # each reply's own tokens plus its closing <|end|>, and nothing else
    assert len(labelled) == sum(len(tok.encode(r, add_special_tokens=False).ids) + 1 for r in replies)
    assert stats.target_tokens == len(labelled)
    text = tok.decode(labelled.tolist(), skip_special_tokens=False)
    assert text == "".join(r + END for r in replies)
    # every label is the next input token of its own conversation (the shift is right); a
    # conversation's last label is its closing <|end|>, which no input of it follows
    ids, labels, docs = batch["input_ids"][0], batch["labels"][0], batch["document_ids"][0]
    at = (labels != IGNORE).nonzero().flatten()
    inside = at[docs[at] == docs[at + 1]]
    assert torch.equal(labels[inside], ids[inside + 1])
    assert len(at) - len(inside) == len(CONVS) and (labels[at[docs[at] != docs[at + 1]]] == tok.token_to_id(END)).all()


def test_packed_conversations_do_not_see_each_other(tok):
    """Each conversation's logits in a packed row equal its logits alone: attention stops at the boundary."""
    examples = tokenize(tok, CONVS, SEQ, ChatStats())
    batch = packed_batch(examples, [[0, 1, 2]], SEQ, tok.token_to_id(PAD))
    assert batch["positions"][0, examples[0].length] == 0 and batch["document_ids"][0, -1] == 3  # padding: its own
    model = tiny().eval()
    with torch.no_grad():
        packed = model(batch["input_ids"], positions=batch["positions"], document_ids=batch["document_ids"])
        t = 0
        for ex in examples:
            alone = model(torch.as_tensor(ex.ids[:-1])[None])
            assert (packed[0, t : t + ex.length] - alone[0]).abs().max() < 1e-5
            t += ex.length
        mixed = model(batch["input_ids"])  # without the document keys the later ones would see the first
        assert (mixed[0, examples[0].length] - packed[0, examples[0].length]).abs().max() > 1e-3


def test_a_batch_with_every_assistant_turn_cut_off_gives_zero_loss_not_nan(tok, tmp_path):
    long_prompt = "word " * 400
    f = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_prompt, "completion": "short"}] * 4)
    dropped = ChatStats()
    assert tokenize(tok, read_conversations(f, dropped), SEQ, dropped, too_long="drop") == []
    assert dropped.skipped["longer than the context"] == 4
    cut = ChatStats()
    examples = tokenize(tok, read_conversations(f, cut), SEQ, cut, too_long="truncate")
    assert cut.truncated == cut.truncated_to_no_target == 4 and "4 truncated" in cut.describe()
    batch = PackedChatLoader(examples, 4, SEQ, tok.token_to_id(PAD)).next_batch()
    assert (batch["labels"] == IGNORE).all()
    model = tiny()
    loss, _ = LanguageModeling().loss(model, batch)
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_malformed_records_are_counted_by_reason_or_refused_under_strict(tmp_path):
    f = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": CONVS[1]},
        "{not json",
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        {"prompt": "Hi", "completion": ""},
        {"text": "plain pretraining text"},
        {"messages": [{"role": "user", "content": "no reply"}]},
        {"prompt": "Hi", "completion": "Hello."},
    ])
    stats = ChatStats()
    convs = read_conversations(f, stats)
    assert len(convs) == 2 and stats.records == 9
    assert stats.skipped == {"not JSON": 1, "malformed messages": 4, "neither messages nor prompt/completion": 1,
                             "no assistant turn": 1}
    assert "line 3: message 0 has unknown role 'robot'" in stats.first_problem["malformed messages"]
    assert "line 2 is not JSON" in stats.describe()
    with pytest.raises(KilnError, match=r"mixed.jsonl line 2 is not JSON.*sft.strict"):
        read_conversations(f, ChatStats(), strict=True)
    tail = write_jsonl(tmp_path / "tail.jsonl", [{"messages": CONVS[1]}, {"messages": [{"role": "user", "content": ""}]}])
    with pytest.raises(KilnError, match="line 2: message 0 .user. has empty or non-text content"):
        read_conversations(tail, ChatStats(), strict=True)


def test_the_loader_resumes_exactly_and_ranks_split_the_global_batch(tok):
    convs = [[{"role": "user", "content": f"Count to {i}."}, {"role": "assistant", "content": " ".join(map(str, range(i)))}]
             for i in range(1, 40)]
    examples = tokenize(tok, convs, 64, ChatStats())
    pad = tok.token_to_id(PAD)
    a = PackedChatLoader(examples, 2, 64, pad, seed=3)
    for _ in range(5):
        a.next_batch()
    b = PackedChatLoader(examples, 2, 64, pad, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(8):  # across an epoch boundary
        x, y = a.next_batch(), b.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)
    whole = PackedChatLoader(examples, 4, 64, pad, seed=3).next_batch()
    parts = [PackedChatLoader(examples, 2, 64, pad, seed=3, rank=r, world=2).next_batch() for r in range(2)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), whole["input_ids"])
    # held-out batches: every rank as many (under FSDP a forward is a collective), padding carries no loss
    one = packed_eval_batches(examples[:3], 2, 64, pad)
    ranks = [packed_eval_batches(examples[:3], 2, 64, pad, rank=r, world=2) for r in range(2)]
    assert len(one) == 1 and [len(b) for b in ranks] == [1, 1] and torch.equal(ranks[0][0]["labels"], one[0]["labels"])
    assert (ranks[1][0]["labels"] == IGNORE).all()


def test_the_default_task_is_deterministic_and_never_trains_on_a_held_out_function(source, tmp_path):
    one = build_default_task(tmp_path / "a", str(source), 300, 0.2)
    build_default_task(tmp_path / "b", str(source), 300, 0.2)
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    assert one["conversations"]["train"] > 50 and one["conversations"]["val"] > 5

    def codes(split):
        rows = [json.loads(line)["messages"] for line in (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()]
        return {m[1]["content"] for m in rows if m[0]["content"].startswith("Write the Python function")}, rows

    (train, _), (val, rows) = codes("train"), codes("val")
    assert val and not train & val
    doc = next(m for m in rows if m[0]["content"].startswith("Write the docstring"))
    assert doc[0]["content"].count('"""') == 0 and doc[1]["content"] in json.dumps(rows)  # docstring removed from the code


def test_the_task_metric_decodes_batched_prompts_as_one_by_one_and_scores_word_overlap(tok):
    from kiln.infer.generate import generate, greedy
    from kiln.workloads.sft import word_f1

    model = tiny().eval()
    prompts = [tok.encode(t).ids for t in ("def f(x):", "import os\nimport sys\n", "class A:\n    pass")]
    end = {tok.token_to_id(END)}

    def replies(ps: list[list[int]]) -> list[list[int]]:
        return [s.tokens for s in generate(model, ps, greedy(10), stop_ids=end, vocab=tok.get_vocab_size())]

    together = replies(prompts)
    assert together == [replies([p])[0] for p in prompts]
    assert word_f1("Return the value.", "Return the key") == pytest.approx(2 / 3)
    assert word_f1("the the the the", "The cat") == pytest.approx(2 * (1 / 4) * (1 / 2) / (1 / 4 + 1 / 2))
    assert word_f1("", "x") == 0.0 and word_f1("Same words", "same, WORDS") == 1.0


# ---- LoRA --------------------------------------------------------------------------------------------
def test_lora_starts_as_its_base_and_trains_only_adapters():
    base = tiny()
    model = apply_lora(tiny(), LoRAConfig(rank=4))
    init_lora(model, seed=1)
    x = torch.randint(0, 512, (2, 24))
    assert torch.equal(model(x), base(x))  # B = 0: exactly the base, not merely close
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    cfg = preset("tiny", vocab_size=512)
    assert sum(model.get_parameter(n).numel() for n in trainable) == cfg.n_layers * lora_layer_params(cfg, 4)
    assert set(base.state_dict()) < set(model.state_dict())  # base weights keep their names: base checkpoints load


def test_merged_model_matches_the_adapted_one_and_adapters_load_onto_the_base(tmp_path):
    from kiln.model.lora import adapter_tensors, save_adapter

    spec = LoRAConfig(rank=4, alpha=8, targets=["wq", "wv", "w2"])
    model = apply_lora(tiny(), spec)
    init_lora(model, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    x = torch.randint(0, 512, (2, 24))
    want = model(x)
    save_adapter(tmp_path / ADAPTER_FILE, adapter_tensors(model.state_dict()), spec)
    assert read_adapter(tmp_path)[1] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["wq", "wv", "w2"]}
    onto_base = load_adapter(tiny(), tmp_path / ADAPTER_FILE)
    assert torch.equal(onto_base(x), want)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(tiny().state_dict())
    assert (merged(x) - want).abs().max() < 1e-5
    dropped = apply_lora(tiny(), LoRAConfig(rank=4, dropout=0.5))
    with torch.no_grad():
        for name, p in dropped.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.2)
    eval_out = dropped.eval()(x)
    assert not torch.equal(dropped.train()(x), eval_out)  # dropout on the adapters' input, while training only
    assert (merge_lora(dropped).eval()(x) - eval_out).abs().max() < 1e-5
    with pytest.raises(KilnError, match="do not fit this model"):
        load_adapter(apply_lora(tiny(), LoRAConfig(rank=4, targets=["wq"])), tmp_path / ADAPTER_FILE)


# ---- runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base, source) -> Path:
    out = tmp_path_factory.mktemp("sft") / "lora"
    assert kiln("sft", f"out={out}", f"init_from={base}", f"sft.default_source={source}", *SFT, "lora.rank=8",
                "lora.alpha=16", "train.max_steps=8", "train.ckpt_every=4", "train.eval_every=8", "train.lr=2e-2") == 0
    return out


def test_lora_run_keeps_the_base_bit_for_bit_and_saves_small_adapters(lora_run, base):
    ck = checkpoint(lora_run, 8)
    adapters, spec = read_adapter(ck / ADAPTER_FILE)
    assert spec["rank"] == 8 and all(t.abs().max() > 0 for k, t in adapters.items() if k.endswith("lora_b"))
    merged = load_file(ck / "model.safetensors")
    before = load_file(checkpoint(base, 20) / "model.safetensors")
    assert set(merged) == set(before)  # a plain model: generate, export and init_from read it as is
    for k, w in before.items():
        stem = k.removesuffix(".weight")
        if f"{stem}.lora_a" in adapters:  # the frozen base plus exactly its adapter's update
            want = (w.float() + (adapters[f"{stem}.lora_b"].float() @ adapters[f"{stem}.lora_a"].float()) * (16 / 8))
            assert torch.equal(merged[k], want), k
            assert not torch.equal(merged[k], w)
        else:
            assert torch.equal(merged[k], w), k  # embeddings, norms: untouched
    assert (ck / ADAPTER_FILE).stat().st_size < (ck / "model.safetensors").stat().st_size / 4
    assert json.loads((ck / "checkpoint.json").read_text())["init_from"] == str(checkpoint(base, 20))


def test_lora_run_on_the_default_task_beats_its_base_and_reports_it(lora_run):
    """A 20-step base's frozen embeddings allow logits of about ±1 only, so LoRA moves its
    held-out loss a little in 8 steps (full fine-tuning, below, a lot); it must still move down."""
    assert (lora_run / "sft_data" / "manifest.json").is_file()  # no sft.data: the default task, built into the run
    m = metrics(lora_run)
    val = [r for r in m if "val_loss" in r]
    assert val[0]["step"] == 0 and val[-1]["step"] == 8 and val[-1]["val_loss"] < val[0]["val_loss"] - 0.01
    task = next(r for r in m if "task_f1" in r)
    assert task["step"] == 8 and task["task_prompts"] > 0 and 0 <= task["base_task_f1"] <= 1
    report = (lora_run / "report.md").read_text()
    assert "## Supervised fine-tuning" in report and "LoRA rank 8" in report and "held-out loss on assistant" in report
    planned = check_plan_vs_run(lora_run)  # the planner models LoRA on all seven projections
    assert planned["predicted"]["memory"]["optimizer"] < planned["predicted"]["memory"]["weights"]


def test_generate_serves_the_merged_model_equal_to_adapters_on_the_base(lora_run, base, capsys):
    from kiln.config import SampleConfig
    from kiln.infer.generate import Engine

    sc = SampleConfig(prompt="def ", max_new_tokens=12, temperature=0.0)
    (served,) = Engine.from_run(lora_run, "cpu").generate(sc.prompt, sc)
    engine = Engine.from_run(base, "cpu")
    model = load_adapter(engine.model, checkpoint(lora_run, 8))
    engine.model = merge_lora(model).eval()
    (rebuilt,) = engine.generate(sc.prompt, sc)
    assert served == rebuilt
    assert kiln("generate", f"out={lora_run}", "prompt=def ", "max_new_tokens=4") == 0


def test_generate_on_a_chat_run_replies_to_the_prompt_as_the_user_turn(lora_run, base, tmp_path, capsys):
    """`kiln generate` on an SFT run speaks its chat format (as the server's chat endpoint does), says
    so, and sample.chat=off completes raw text; a quantized copy keeps chat mode; a pretrained run
    completes text."""
    from kiln.data.chat import prompt_ids
    from kiln.infer.engine import end_ids
    from kiln.infer.generate import generate, greedy
    from kiln.infer.load import load

    lm = load(lora_run, "cpu")
    want_ids = prompt_ids(lm.tokenizer, [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Write a docstring."}])
    (want,) = generate(lm.model, [want_ids], greedy(6), stop_ids=end_ids(lm.tokenizer), tokenizer=lm.tokenizer)
    capsys.readouterr()
    args = ["prompt=Write a docstring.", "max_new_tokens=6", "temperature=0"]
    assert kiln("generate", f"out={lora_run}", *args, "system=Be brief.") == 0
    out, err = capsys.readouterr()
    assert out == want.text + "\n" and "chat mode (a sft run)" in err
    assert kiln("generate", f"out={lora_run}", *args, "chat=off") == 0
    out, err = capsys.readouterr()
    assert out.startswith("Write a docstring.") and "chat mode" not in err
    assert kiln("quantize", f"source={lora_run}", f"out={tmp_path / 'q'}", "evaluate=false") == 0
    capsys.readouterr()
    assert kiln("generate", f"out={tmp_path / 'q'}", *args) == 0
    assert "chat mode" in capsys.readouterr().err
    assert kiln("generate", f"out={base}", *args, "system=Be brief.") == 2
    assert "sample.system is a chat setting" in capsys.readouterr().err


def test_lora_resume_reaches_the_same_adapters(lora_run, base, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(lora_run, out)
    shutil.rmtree(checkpoint(out, 8))
    (out / "checkpoints" / "latest").write_text("step_0000004\n")
    assert kiln("sft", f"out={out}") == 0  # everything else from the run's config.yaml
    want, got = metrics(lora_run), metrics(out)
    assert [r["loss"] for r in got if "loss" in r] == [r["loss"] for r in want if "loss" in r]
    a, b = read_adapter(checkpoint(lora_run, 8))[0], read_adapter(checkpoint(out, 8))[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # continuing with other adapters, or without the exact base, is refused in one line
    assert kiln("sft", f"out={out}", "train.max_steps=10", "lora.rank=4") == 2
    assert "holds a LoRA rank 8 (alpha 16, dropout 0, on wq,wk,wv,wo,w1,w2,w3) run, this launch asks for LoRA rank 4" \
        in capsys.readouterr().err
    info_file = checkpoint(out, 8) / "checkpoint.json"
    info_file.write_text(info_file.read_text().replace(str(checkpoint(base, 20)), str(tmp_path / "gone")))
    assert kiln("sft", f"out={out}", "train.max_steps=10") == 2
    assert "base checkpoint" in capsys.readouterr().err


def describe_item(i: int) -> list[dict]:
    color, animal = COLORS[i % 8], ANIMALS[(3 * i + i // 8) % 8]
    return [{"role": "user", "content": f"Describe item {i}: a {color} {animal}."},
            {"role": "assistant", "content": f"The {animal} is {color}."}]


COLORS = ["red", "blue", "green", "black", "white", "small", "large", "old"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "mouse", "cow", "goat"]


def test_full_sft_from_user_jsonl_raises_the_held_out_task_metric(base, tmp_path):
    convs = [describe_item(i) for i in range(80)]
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in convs[:56]]
                       + [{"prompt": c[0]["content"], "completion": c[1]["content"]} for c in convs[56:64]])
    val = write_jsonl(tmp_path / "val.jsonl", [{"messages": c} for c in convs[64:]])
    out = tmp_path / "full"
    assert kiln("sft", f"out={out}", f"init_from={base}", f"sft.data={data}", f"sft.val_data={val}", *SFT,
                "train.max_steps=12", "train.eval_every=12", "train.lr=1e-2") == 0
    m = metrics(out)
    val_loss = [r["val_loss"] for r in m if "val_loss" in r]
    assert val_loss[-1] < val_loss[0] - 1.0
    task = next(r for r in m if "task_f1" in r)
    assert task["task_prompts"] == 12 and task["task_f1"] > task["base_task_f1"]
    ck = checkpoint(out, 12)
    assert not (ck / ADAPTER_FILE).exists()
    assert set(load_file(ck / "model.safetensors")) == set(load_file(checkpoint(base, 20) / "model.safetensors"))
    check_plan_vs_run(out)


def test_bad_setups_get_one_line(base, tmp_path, capsys, prepared):
    from tokenizers import Tokenizer

    other = tmp_path / "other-tokenizer.json"
    tok = Tokenizer.from_file(str(prepared / "tokenizer" / "tokenizer.json"))
    tok.add_tokens(["an extra token"])
    tok.save(str(other))
    garbage = write_jsonl(tmp_path / "garbage.jsonl", ["this is not json", "{still not", "[1, 2"])
    cases = [
        ([f"init_from={base}", f"data.tokenizer.path={other}"], "was trained with a different tokenizer"),
        (["lora.rank=4"], "lora.rank > 0 adapts a pretrained model: set init_from"),
        ([f"init_from={base}", "lora.rank=4", "parallel.tp=2"], "LoRA does not run under tensor parallelism"),
        ([f"init_from={base}", "parallel.pp=2"], "set parallel.pp=1"),
        ([f"init_from={base}", f"sft.data={garbage}"], "garbage.jsonl has no usable conversation"),
        ([f"init_from={base}", f"sft.data={tmp_path / 'missing.jsonl'}"], "missing.jsonl' does not exist"),
        ([f"init_from={tmp_path}"], "is neither a run directory with checkpoints nor a checkpoint directory"),
    ]
    for i, (args, msg) in enumerate(cases):
        capsys.readouterr()
        assert kiln("sft", f"out={tmp_path / f'bad{i}'}", *SFT, *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kiln sft: error:") and msg in err[0], (args, err)
        assert not (tmp_path / f"bad{i}" / "checkpoints").exists()


# ---- 2 gloo ranks -----------------------------------------------------------------------------------
def test_lora_under_fsdp2_and_ddp_and_full_sft_under_tp_on_two_ranks(base, tmp_path):
    """One torchrun launch: LoRA under FSDP2 and under DDP train the same (same per-rank batches),
    leave the sharded base bit-for-bit unchanged, and publish the merged model; full fine-tuning
    under TP trains to a single process's losses."""
    from kiln.train import distributed_checkpoint

    data = write_jsonl(tmp_path / "data.jsonl", [{"messages": describe_item(i)} for i in range(48)])
    common = [f"init_from={base}", f"sft.data={data}", *SFT, "train.batch_size=2", "train.max_steps=4",
              "train.eval_every=4", "train.ckpt_every=4", "sft.eval_prompts=0", "train.lr=2e-2"]
    lora = [*common, "lora.rank=4"]
    runs = [{"name": "fsdp", "args": [f"out={tmp_path / 'fsdp'}", *lora, "parallel.dp_shard=2"]},
            {"name": "ddp", "args": [f"out={tmp_path / 'ddp'}", *lora, "parallel.dp_replicate=2", "parallel.dp_shard=1"]},
            {"name": "tp", "args": [f"out={tmp_path / 'tp'}", *common, "parallel.tp=2"]}]
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HERE),
                        str(spec)], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(spec.with_suffix(".out").read_text())
    for name in ("fsdp", "ddp", "tp"):
        assert res[name]["rc"] == 0, res[name]["err"]
    fsdp, ddp = metrics(tmp_path / "fsdp"), metrics(tmp_path / "ddp")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(fsdp, ddp) if "loss" in a) < 5e-6
    assert kiln("sft", f"out={tmp_path / 'single'}", *common) == 0
    tp, single = metrics(tmp_path / "tp"), metrics(tmp_path / "single")
    assert len(tp) == len(single) and max(abs(a["loss"] - b["loss"]) for a, b in zip(tp, single) if "loss" in a) < 5e-6
    before = load_file(checkpoint(base, 20) / "model.safetensors")
    ck = checkpoint(tmp_path / "fsdp", 4)
    state = distributed_checkpoint.read_tensors(ck)
    assert all(torch.equal(state[k], before[k]) for k in before)  # the frozen base, from every rank's shards
    adapters, _ = read_adapter(ck / ADAPTER_FILE)
    assert adapters.keys() == {k for k in state if k.endswith(("lora_a", "lora_b"))}
    assert all(torch.equal(adapters[k], state[k]) for k in adapters)
    assert set(load_file(ck / "model.safetensors")) == set(before)


def driver(spec: Path) -> None:
    """Inside torchrun: `kiln sft` for each run in turn, recording exit codes and errors (rank 0 writes)."""
    from kiln import cli

    results = {}
    for run in json.loads(spec.read_text()):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.main(["sft", *run["args"]])
        results[run["name"]] = {"rc": rc, "err": err.getvalue()}
    if int(os.environ["RANK"]) == 0:
        spec.with_suffix(".out").write_text(json.dumps(results))


if __name__ == "__main__":
    driver(Path(sys.argv[1]))
