"""`kiln eval`: bits per byte, code task metrics, sample dumps, eval.json, the report, and the
lm-evaluation-harness adapter run on tasks defined here (no download)."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_TRAIN, kiln
from kiln.config import EvalConfig
from kiln.eval.evaluate import evaluate_run, function_body, next_line_examples, parses, predicted_line, summary_lines
from kiln.eval.scoring import greedy_generate, rolling_windows
from kiln.infer.load import load
from kiln.model.transformer import Transformer
from kiln.report import write_report


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepared):
    out = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(prepared, out)
    assert kiln("pretrain", f"out={out}", *TINY_TRAIN, "train.max_steps=6", "train.lr=1e-2", "train.eval_every=6") == 0
    return out


FAST = dict(num_examples=4, max_new_tokens=24, windows=8)


def plain_logprob(model, ids: list[int], n_vocab: int) -> float:
    """log P(ids[1:] | ids[0]) from one forward pass, with no windows, cache or batching."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0, :-1, :n_vocab], -1)
    return float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())


def test_heldout_bits_per_byte_is_trainings_validation_figure(run):
    """By default eval scores the windows training validated on (recorded in checkpoint.json), in
    its own batches, and gives training's val_bpb."""
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_bpb" in line][-1]
    res = evaluate_run(run, EvalConfig(batch_size=3, tasks=False), "cpu", write=False)
    assert res["step"] == 6 and res["heldout"]["tokens"] == 2 * 4 * 64 and res["heldout"]["as_validated"]
    assert abs(res["heldout"]["bpb"] - last["val_bpb"]) < 1e-5
    assert "the windows training validated on" in summary_lines(res)[0] and "8 windows of 64 tokens" in summary_lines(res)[0]


def test_one_held_out_figure_per_model_in_training_eval_quantize_and_the_model_table(run, tmp_path, capsys):
    """The figure make demo's report gave as three different numbers for one checkpoint (training's
    validation, `kiln eval`, `kiln quantize`'s "before") and the speedrun's model table: one
    definition, the same windows, one number."""
    from kiln.eval.compare import format_rows, model_row

    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_bpb" in line][-1]
    evaluated = evaluate_run(run, EvalConfig(tasks=False), "cpu", write=False)["heldout"]["bpb"]
    assert kiln("quantize", f"source={run}", f"out={tmp_path / 'q'}", "format=int8") == 0
    printed = capsys.readouterr().out
    q = json.loads((tmp_path / "q" / "quantize.json").read_text())
    row = model_row(run, "float", tokens_per_s=1.0)
    for figure in (evaluated, q["bpb_before"], row["bpb"]):
        assert abs(figure - val["val_bpb"]) < 1e-5
    assert "8 windows of 64 tokens" in printed and "8 windows of 64 tokens" in format_rows([row])
    # the quantized run keeps the windows: evaluating it gives quantize's "after"
    after = evaluate_run(tmp_path / "q", EvalConfig(tasks=False), "cpu", write=False)["heldout"]
    assert after["as_validated"] and abs(after["bpb"] - q["bpb_after"]) < 1e-5


def test_padded_vocabulary_rows_are_no_tokens_in_any_loss_or_bits_per_byte(run):
    """Logits of the rows a vocabulary padded to a multiple of 64 adds change no figure: not
    training's loss or validation, not eval's held-out bits per byte (they once differed, 0.4856
    against 0.4881 on the same window)."""
    from kiln.data.shards import eval_batches
    from kiln.eval.scoring import heldout_bits_per_byte, run_windows
    from kiln.train.objectives import LanguageModeling

    lm = load(run, "cpu")
    cfg = lm.model.cfg
    padded = Transformer(dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 64))  # 64 rows past the tokenizer's
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    loud = torch.full((64, cfg.d_model), float(state["lm_head.weight"].abs().max()) * 3)
    for k in ("tok_emb.weight", "lm_head.weight"):
        state[k] = torch.cat([state[k], loud])
    padded.load_state_dict(state)
    padded.init_buffers()
    objective = LanguageModeling(vocab=lm.n_vocab)
    batch = eval_batches(lm.data, 4, 64, 1)[0]

    def figures(model):
        with torch.no_grad():
            return (float(objective.loss(model, batch)[0]), objective.eval_step(model, batch)["val_loss"][0],
                    heldout_bits_per_byte(model, lm.data, run_windows(lm), lm.n_vocab)["bpb"])

    assert figures(padded.eval()) == pytest.approx(figures(lm.model), rel=1e-5)


def test_a_text_files_bits_per_byte_counts_every_byte_once(run, tmp_path):
    short = tmp_path / "short.py"
    short.write_text("def área(r):\n    return 3.14 * r * r\n")  # a two-byte character counts as two bytes
    lm = load(run, "cpu")
    ids = [lm.bos, *lm.encode(short.read_text())]
    want = -plain_logprob(lm.model, ids, lm.n_vocab) / math.log(2) / len(short.read_text().encode())
    res = evaluate_run(run, EvalConfig(text=[str(short)], tasks=False, windows=1), "cpu", write=False)
    assert abs(res["text"][str(short)]["bpb"] - want) < 1e-4
    assert res["text"][str(short)]["bytes"] == len(short.read_text()) + 1


def test_rolling_windows_match_lm_evaluation_harness():
    utils = pytest.importorskip("lm_eval.utils")
    for n in (1, 3, 4, 5, 9, 10, 17):
        tokens = list(range(100, 100 + n))
        theirs = list(utils.get_rolling_token_windows(tokens, prefix_token=0, max_seq_len=4, context_len=1))
        assert rolling_windows(tokens, 0, 4) == [(list(a), list(b)) for a, b in theirs]
        assert [t for _, tg in rolling_windows(tokens, 0, 4) for t in tg] == tokens  # each token once


def test_batched_greedy_generation_with_the_cache_equals_one_forward_per_token(run):
    lm = load(run, "cpu")
    prompts = [[lm.bos, *lm.encode(p)] for p in ("def ", "import os\nimport sys\n\nclass Foo(", "x")]
    got = greedy_generate(lm, prompts, 10, batch_size=3)
    for prompt, (ids, _) in zip(prompts, got):
        seq, want = list(prompt), []
        with torch.no_grad():
            for _ in range(10):
                nxt = int(lm.model(torch.tensor([seq]))[0, -1, : lm.n_vocab].argmax())
                if nxt in (lm.bos, lm.tokenizer.token_to_id("<|eos|>")):
                    break
                seq.append(nxt)
                want.append(nxt)
        assert ids == want


SOURCE = '''import os


def area(r):
    """Area of a circle."""
    return 3.14 * r * r


class Box:
    def size(self,
             scale=1):
        return self.w * scale
'''


def test_what_counts_as_the_next_line_and_as_a_function_that_parses():
    examples = next_line_examples([(SOURCE, ast.parse(SOURCE))], 50, random.Random(0))
    assert len(examples) == 7  # every non-blank line after the first
    for prompt, want in examples:
        assert SOURCE.startswith(prompt) and not prompt.endswith(("\n", " "))
        rest = SOURCE[len(prompt):].lstrip("\n ")  # the blank lines between are the model's to write
        assert want.strip() == rest.splitlines()[0].strip()
    assert predicted_line("\n\n    return x\n") == "    return x"
    assert predicted_line("\n\n    return x") is None  # not whole yet
    assert predicted_line("\n\n    return x", final=True) == "    return x"
    assert predicted_line(" + 1\n") == " + 1"  # the model went on with the prompt's own line: a miss
    header = "    def size(self,\n             scale=1):"
    assert function_body("\n        return 1\n    def other(self):", 4) == "\n        return 1"
    assert function_body("\n        return 1\n", 4) is None  # may go on
    assert parses(header, "\n        return 1")
    assert not parses(header, "")  # a header alone is no function
    assert not parses(header, "\n        return (1,")


def test_eval_writes_results_samples_and_one_report_section(run):
    res = evaluate_run(run, EvalConfig(**FAST), "cpu")
    saved = json.loads((run / "eval.json").read_text())
    assert saved["heldout"]["bpb"] == res["heldout"]["bpb"] and saved["step"] == 6
    for name in ("next_line_exact_match", "function_parse_rate"):
        assert res["tasks"][name]["n"] == 4 and 0 <= res["tasks"][name]["score"] <= 1
    samples = [json.loads(s) for s in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["task"] for s in samples] == ["next_line"] * 4 + ["function_completion"] * 4
    assert sum(s["match"] for s in samples[:4]) / 4 == res["tasks"]["next_line_exact_match"]["score"]
    assert all(s["parses"] == parses(s["header"], s["completion"]) for s in samples[4:])
    evaluate_run(run, EvalConfig(tasks=False, windows=4), "cpu")  # again: the section is replaced, not repeated
    report = (run / "report.md").read_text()
    assert report.count("## Evaluation") == 1 and "held-out bits/byte" in report
    write_report(run)  # what every training verb does at its end keeps the section
    assert (run / "report.md").read_text().count("## Evaluation") == 1


def test_an_export_scores_as_its_run_and_keeps_its_results_beside_it(run):
    from kiln.post.export import export_hf

    exp = export_hf(run, run / "export" / "hf")
    ec = EvalConfig(data_path=str(run / "data"), tasks=False, windows=8, seq_len=64)
    a = evaluate_run(run, ec, "cpu", write=False)
    b = evaluate_run(exp, ec, "cpu")
    assert b["kind"] == "hf" and abs(a["heldout"]["bpb"] - b["heldout"]["bpb"]) < 1e-5
    assert (exp / "eval.json").is_file()


def test_bad_eval_input_is_one_line(run, tmp_path, capsys):
    def err(*args) -> str:
        assert kiln("eval", *args) == 2
        text = capsys.readouterr().err
        assert len(text.splitlines()) == 1 and "Traceback" not in text, text
        return text

    assert "does not exist" in err(f"out={run}", f"path={tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    assert "is not a run (checkpoints/), a checkpoint" in err(f"out={run}", f"path={tmp_path / 'empty'}")
    shutil.copytree(run / "tokenizer", tmp_path / "untrained" / "tokenizer")
    assert "holds no checkpoint yet; train one first" in err(f"out={tmp_path / 'untrained'}")
    assert "'missing.txt' does not exist" in err(f"out={run}", "text=missing.txt", "tasks=false")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    assert "is not readable UTF-8 text" in err(f"out={run}", f"text={tmp_path / 'bin'}", "tasks=false")
    from kiln.post.export import export_hf

    inc = export_hf(run, tmp_path / "incomplete")
    (inc / "model.safetensors").unlink()
    assert "is incomplete: it holds no weights" in err(f"out={run}", f"path={inc}", f"data_path={run / 'data'}")


# ---- lm-evaluation-harness ---------------------------------------------------------------------------
TASKS = {
    "kiln_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
    "kiln_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                 "metric_list": [{"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}]},
    "kiln_gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                 "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
                 "metric_list": [{"metric": "exact_match"}]},
}


def test_lm_evaluation_harness_runs_kiln_models_on_local_tasks(run, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    yaml = pytest.importorskip("yaml")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    lm = load(run, "cpu")
    mc = [{"question": "def add(a, b):\n    return", "choices": [" a + b", " def", " ]]"], "answer": 0},
          {"question": "import", "choices": [" os", "(((", " return"], "answer": 1}]
    ppl = [{"text": "for i in range(10):\n    print(i)\n"}, {"text": "class A:\n    pass\n"}]
    gen = []
    for prompt in ("def main(", "import "):  # targets: the model's own greedy line, from plain forwards
        seq, out = [lm.bos, *lm.encode(prompt)], []
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(lm.model(torch.tensor([seq]))[0, -1, : lm.n_vocab].argmax()))
                out.append(seq[-1])
        gen.append({"prompt": prompt, "target": lm.tokenizer.decode(out).split("\n")[0]})
    for name, rows in (("kiln_mc", mc), ("kiln_ppl", ppl), ("kiln_gen", gen)):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **TASKS[name]}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))

    res = evaluate_run(run, EvalConfig(harness_tasks=list(TASKS), harness_include=str(tmp_path), tasks=False,
                                       windows=4), "cpu", write=False)["harness"]

    def choice_logprob(q, c):
        ctx = [lm.bos, *lm.encode(q)]
        return plain_logprob(lm.model, ctx + lm.encode(c), lm.n_vocab) - plain_logprob(lm.model, ctx, lm.n_vocab)

    acc = sum(max(range(3), key=lambda i, d=d: choice_logprob(d["question"], d["choices"][i])) == d["answer"]
              for d in mc) / 2
    assert res["kiln_mc"]["acc"] == acc
    nats = sum(-plain_logprob(lm.model, [lm.bos, *lm.encode(d["text"])], lm.n_vocab) for d in ppl)
    assert abs(res["kiln_ppl"]["bits_per_byte"] - nats / math.log(2) / sum(len(d["text"]) for d in ppl)) < 1e-4
    assert res["kiln_gen"]["exact_match"] == 1.0


def test_the_adapter_answers_each_request_shape(run):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from kiln.eval.harness import KilnLM

    lm = KilnLM(str(run), device="cpu", batch_size=2)
    reqs = [Instance("loglikelihood", {}, ("def f(x):", " return x"), 0),
            Instance("loglikelihood", {}, ("", "import os"), 1)]
    (a, greedy_a), (b, _) = lm.loglikelihood(reqs)
    ctx = [lm.lm.bos, *lm.lm.encode("def f(x):")]
    want = plain_logprob(lm.lm.model, ctx + lm.lm.encode(" return x"), lm.lm.n_vocab) - plain_logprob(
        lm.lm.model, ctx, lm.lm.n_vocab)
    assert abs(a - want) < 1e-4 and isinstance(greedy_a, bool)
    assert abs(b - plain_logprob(lm.lm.model, [lm.lm.bos, *lm.lm.encode("import os")], lm.lm.n_vocab)) < 1e-4
    long = "x = 1\n" * 200  # longer than the context of 128: rolled, every token scored once
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long,), 0)])
    assert total < 0 and math.isfinite(total)
    (text,) = lm.generate_until([Instance("generate_until", {}, ("def ", {"until": ["("], "max_gen_toks": 8}), 0)])
    assert "(" not in text
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|bos|><|user|>hi<|end|><|assistant|>"


def test_the_adapter_scores_as_the_harness_hf_model_on_the_export_and_hides_no_model(run, tmp_path):
    """Contexts ending in whitespace (code's indentation) score as the harness's own `hf` model scores
    kiln's Hugging Face export; importing kiln's adapter leaves the built-in models registered."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # the harness's `hf` model needs it
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from kiln.eval.harness import KilnLM
    from kiln.post.export import export_hf

    exported = export_hf(run, tmp_path / "hf")
    hf = get_model("hf")(pretrained=str(exported), device="cpu", batch_size=1, dtype="float32")
    kiln_lm = get_model("kiln")(pretrained=str(run), device="cpu", batch_size=2)
    assert isinstance(kiln_lm, KilnLM)
    pairs = [("def f(x):\n    ", "return x"), ("import os\nimport ", "sys"), ("x = 1 ", "+ 2"),
             ("class A:\n\t", "pass"), ("def f(x):", " return x"), ("", "import os")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    ours, theirs = kiln_lm.loglikelihood(reqs), hf.loglikelihood(reqs)
    for pair, (a, greedy_a), (b, greedy_b) in zip(pairs, ours, theirs):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b, (pair, a, b)
