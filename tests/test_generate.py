"""Generation from a trained run: KV-cache decoding, sampling controls, determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TINY_TRAIN, kiln
from kiln.config import SampleConfig
from kiln.data.tokenizer import BOS
from kiln.errors import KilnError
from kiln.infer.engine import sample_next
from kiln.infer.generate import Engine


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared):
    import shutil

    out = tmp_path_factory.mktemp("gen") / "run"
    shutil.copytree(prepared, out)
    assert kiln("pretrain", f"out={out}", *TINY_TRAIN, "train.max_steps=30", "train.lr=1e-2") == 0
    return out


def test_greedy_decoding_with_the_cache_equals_recomputing_everything(trained):
    eng = Engine.from_run(trained, "cpu")
    sc = SampleConfig(prompt="def ", max_new_tokens=12, temperature=0.0, heal=False)  # the prompt as encoded
    (text,) = eng.generate(sc.prompt, sc)
    ids = [eng.tokenizer.token_to_id(BOS), *eng.tokenizer.encode(sc.prompt, add_special_tokens=False).ids]
    want = []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(eng.model(torch.tensor([ids]))[0, -1, : eng.tokenizer.get_vocab_size()].argmax())
            if nxt in (eng.tokenizer.token_to_id(BOS), eng.tokenizer.token_to_id("<|eos|>")):
                break
            ids.append(nxt)
            want.append(nxt)
    assert text == eng.tokenizer.decode(want)


def test_same_seed_same_samples_and_different_seed_differs(trained):
    eng = Engine.from_run(trained, "cpu")
    sc = SampleConfig(prompt="import ", max_new_tokens=20, temperature=1.0, top_k=0, num_samples=3, seed=1)
    a, b = eng.generate(sc.prompt, sc), eng.generate(sc.prompt, sc)
    c = eng.generate(sc.prompt, dataclasses.replace(sc, seed=2))
    assert a == b and a != c


def test_top_k_and_top_p_only_ever_pick_allowed_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]])
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, 2, 1.0, gen)) for _ in range(200)}
    assert picks == {1, 2}
    picks = {int(sample_next(logits, 1.0, 0, 0.5, gen)) for _ in range(200)}
    assert picks == {1}  # token 1 alone holds more than half the mass
    assert int(sample_next(logits, 0.0, 0, 1.0, gen)) == 1


def test_generate_cli_streams_what_the_engine_generates(trained, capsys):
    assert kiln("generate", f"out={trained}", "prompt=def fibonacci(n):", "max_new_tokens=8", "temperature=0") == 0
    printed = capsys.readouterr().out
    sc = SampleConfig(prompt="def fibonacci(n):", max_new_tokens=8, temperature=0.0)
    (want,) = Engine.from_run(trained, "cpu").generate(sc.prompt, sc)
    assert want and printed == "def fibonacci(n):" + want + "\n"


def test_first_new_tokens_do_not_depend_on_max_new_tokens(trained):
    """The whole prompt is kept whatever the budget: near and past the context end included."""
    eng = Engine.from_run(trained, "cpu")
    ctx = eng.model.cfg.max_seq_len
    prompt = "import os\n" * 4
    outs = {}
    for budget in (10, ctx - 20, ctx + 50):
        sc = SampleConfig(prompt=prompt, max_new_tokens=budget, temperature=0.0)
        outs[budget] = eng.generate(prompt, sc)[0]
        ids = eng.tokenizer.encode(outs[budget], add_special_tokens=False).ids
        assert len(eng.encode_prompt(prompt)) + len(ids) <= ctx + 2  # never past the context (re-encoding may merge)
    short = outs[10]
    assert all(o.startswith(short) for o in outs.values()), outs
    assert any("context" in n for n in eng.notes)  # the last call ran into the context end and said so


def test_a_prompt_longer_than_the_context_is_refused_in_one_line(trained):
    eng = Engine.from_run(trained, "cpu")
    with pytest.raises(KilnError, match="shorten the prompt"):
        eng.generate("x = 1\n" * 400, SampleConfig(max_new_tokens=4))


def test_a_split_multibyte_character_streams_whole(trained):
    from kiln.infer.engine import StreamDecoder

    eng = Engine.from_run(trained, "cpu")
    text = "naïve — 東京 ✓"
    ids = eng.tokenizer.encode(text, add_special_tokens=False).ids
    dec = StreamDecoder(eng.tokenizer)
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_generate_refuses_a_run_whose_tokenizer_was_replaced(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    tok = run / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|pad|>"', '"<|pad2|>"'))
    with pytest.raises(KilnError, match="not the tokenizer this checkpoint was trained with"):
        Engine.from_run(run, "cpu")


def test_speedrun_writes_a_report_with_plot_and_samples(tmp_path, corpus_dir):
    out = tmp_path / "sr"
    assert kiln("speedrun", f"out={out}", f"data.input={corpus_dir}", "data.tokenizer.vocab_size=400",
                *TINY_TRAIN, "train.max_steps=20", "train.eval_every=10", "sample.max_new_tokens=8",
                "speedrun.stages=") == 0
    report = (out / "report.md").read_text()
    assert "![training loss and validation bits per byte](loss.png)" in report and (out / "loss.png").stat().st_size > 0
    assert "bits/byte** vs the unigram baseline" in report
    assert "def fibonacci(n):" in report and "## Samples" in report
    assert "## Post-training" not in report and not (out / "sft").exists()


POST = ["speedrun.sft_steps=3", "speedrun.dpo_steps=2", "speedrun.dpo_pairs=40", "speedrun.rl_steps=1",
        "sft.default_max_chars=200", "sft.eval_prompts=2", "sft.eval_max_new_tokens=4", "rl.group_size=2",
        "rl.prompts_per_step=2", "rl.max_new_tokens=8", "rl.eval_prompts=2", "rl.max_prompts=40",
        "eval.windows=8", "eval.num_examples=2", "eval.max_new_tokens=8", "speedrun.distill_steps=2",
        "speedrun.student=preset=tiny,d_model=32,n_heads=2,n_kv_heads=1", "quantize.calib_seq_len=32"]


def test_speedrun_post_training_chain_reports_each_stage(tmp_path, corpus_dir, capsys):
    """SFT, DPO and GRPO run chained (each from the one before), then evaluation and serving; the
    report shows each stage's held-out figure at its start and end, and a rerun keeps them."""
    import json

    out = tmp_path / "sr"
    args = ["speedrun", f"out={out}", f"data.input={corpus_dir}", "data.tokenizer.vocab_size=400", *TINY_TRAIN,
            "train.seq_len=128", "train.max_steps=10", "train.eval_every=10", "sample.max_new_tokens=4", *POST]
    assert kiln(*args) == 0
    for stage, parent in (("sft", out), ("dpo", out / "sft"), ("rl", out / "dpo")):
        info = json.loads(sorted((out / stage / "checkpoints").glob("step_*/checkpoint.json"))[-1].read_text())
        assert info["workload"] == stage and info["init_from"].startswith(str(parent / "checkpoints"))
        assert (out / stage / "report.md").is_file()
    report = (out / "report.md").read_text()
    post = report[report.index("## Post-training"):]
    assert "[SFT](sft/report.md) | 3 |" in post and "[DPO](dpo/report.md) | 2 |" in post
    assert "[GRPO](rl/report.md) | 1 |" in post and "](rl/rl_reward.png)" in post
    assert "held-out implicit-reward accuracy | 50.0% |" in post  # DPO's step 0: the policy is its reference
    assert "## Evaluation" in report and "## Serving" in report and "per query**" in report
    runs = json.loads((out / "post_training.json").read_text())
    assert [r["stage"] for r in runs["stages"]] == ["sft", "dpo", "rl", "eval", "serve", "quantize int8",
                                                    "quantize int4-g64-gptq", "distill"]
    assert runs["serving"]["latency_s"] > 0 and runs["serving"]["usd_per_query"] > 0
    models = {m["model"]: m for m in runs["models"]}
    assert list(models) == ["pretrained", "int8", "int4-g64-gptq", "student (distilled)"]
    assert models["int8"]["fp16_share"] < 0.6 and models["pretrained"]["fp16_share"] == pytest.approx(2.0, abs=0.05)
    assert models["int4-g64-gptq"]["bytes"] < models["int8"]["bytes"]
    assert models["student (distilled)"]["params"] < models["pretrained"]["params"]
    assert all(m["bpb"] > 0 and m["decode_tokens_per_s"] > 0 for m in models.values())
    assert "## Compression" in report and "| student (distilled) |" in report
    plans = post[post.index("### Plan vs measured, every stage"):].split("\n\n")[2].splitlines()[2:]
    names = [row.split("|")[1].strip() for row in plans]
    assert [n.removesuffix(" (partial¹)") for n in names] == [
        "[pretrain](./report.md)", "[SFT](sft/report.md)", "[DPO](dpo/report.md)", "[GRPO](rl/report.md)",
        "[distill](student/report.md)"]
    assert names[-1].endswith("(partial¹)") and not names[0].endswith("(partial¹)")  # the teacher is not planned
    for row in plans:  # predicted / measured and the error of memory, step time and tokens/s, for every stage
        cells = [c.strip() for c in row.split("|")[2:-1]]
        assert all(" / " in c and "–" not in c for c in cells[0:6:2]) and all(c.endswith("%") for c in cells[1:6:2]), row
    capsys.readouterr()
    assert kiln(*args, "speedrun.stages=sft,dpo") == 0  # a rerun keeps the finished stages
    assert capsys.readouterr().out.count("already holds its final checkpoint") == 2


# ---- the one generation function ------------------------------------------------------------------
def test_generate_keeps_each_rows_budget_stop_and_test_and_admits_rows_as_others_finish():
    from kiln.infer.engine import SamplingParams
    from kiln.infer.generate import generate, greedy
    from kiln.model.config import preset
    from kiln.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=96))
    model.init_weights(5)
    model.eval()
    prompts = [[1, 5, 9], [1, 7, 8, 20, 30, 4, 2], [1, 40], [1, 2, 3, 4]]
    budgets = [3, 9, 5, 7]
    alone = [generate(model, [p], greedy(n), stop_ids=set())[0].tokens for p, n in zip(prompts, budgets)]
    for rows in (None, 1, 2):  # all at once, or fewer rows than prompts (a row is reused when its prompt ends)
        seqs = generate(model, prompts, [greedy(n) for n in budgets], stop_ids=set(), rows=rows)
        assert [s.tokens for s in seqs] == alone and [len(s.tokens) for s in seqs] == budgets
        assert {s.ended_by for s in seqs} == {"length"}
    # an end token stops a row and is recorded apart; `until` ends a row once its tokens say so
    first = alone[1][0]
    seq = generate(model, [prompts[1]], greedy(9), stop_ids={first})[0]
    assert seq.tokens == [] and seq.stop_token == first and seq.ended_by == "end"
    seq = generate(model, [prompts[1]], greedy(9), stop_ids=set(), until=lambda i, ids: len(ids) == 2)[0]
    assert seq.tokens == alone[1][:2] and seq.ended_by == "until"
    # sampling is seeded per row: the same seed draws the same tokens in any batch
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed="s")
    together = generate(model, prompts, [sampled] * 4, stop_ids=set())
    assert together[0].tokens == generate(model, prompts[:1], sampled, stop_ids=set())[0].tokens
    assert len({tuple(s.tokens) for s in together}) > 1
