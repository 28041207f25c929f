"""`kiln reward`: the Bradley–Terry loss by hand, the scalar head read at the last real token, the
preference JSONL formats and their bad rows, the default stdlib pairs, and a run that learns a
preference and reports its held-out accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN, check_plan_vs_run, kiln
from kiln.data.preference_data import (
    IDENTICAL,
    MALFORMED,
    PROMPT_TOO_LONG,
    PairStats,
    normalize_row,
    read_pairs,
    tokenize_pairs,
)
from kiln.data.tokenizer import load_tokenizer
from kiln.errors import KilnError
from kiln.model.config import preset
from kiln.model.heads import ScalarHeadModel, sequence_scores
from kiln.workloads.preference import accuracy_of
from kiln.workloads.reward import bradley_terry_loss

FAST = [*TINY_TRAIN, "train.ckpt_every=1000", "train.log_every=5"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def easy_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs a tiny model can learn in a few dozen steps: the chosen reply agrees, the rejected refuses."""
    import random

    rng = random.Random(seed)
    topics = ["parse the file", "sort the list", "open the socket", "read the header", "merge the dicts",
              "count the words", "split the path", "join the lines", "quote the url", "decode the bytes"]
    rows = []
    for i in range(n):
        t = rng.choice(topics)
        rows.append({"prompt": f"Please {t} ({i}).", "chosen": f"Sure, here is how to {t}.",
                     "rejected": f"No. I will not {t}."})
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory, prepared):
    """A tiny pretrained run to start alignment runs from."""
    out = tmp_path_factory.mktemp("base") / "run"
    out.mkdir()
    for sub in ("data", "tokenizer"):
        shutil.copytree(prepared / sub, out / sub)
    assert kiln("pretrain", f"out={out}", *FAST, "train.max_steps=2") == 0
    return out


# ---- the loss and the head ---------------------------------------------------------------------
def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log σ(1) = 0.3132616875, -log σ(-1) = 1.3132616875
    assert float(bradley_terry_loss(chosen, rejected)) == pytest.approx(0.8132616875, abs=1e-6)
    assert float(accuracy_of(torch.tensor([1.0, 0.0, -1.0]))) == pytest.approx(0.5)  # a tie counts half


@torch.no_grad()
def test_the_head_reads_each_sequence_at_its_last_real_token():
    torch.manual_seed(0)
    m = ScalarHeadModel(preset("tiny", vocab_size=64))
    m.init_weights(0)
    assert float(sequence_scores(m, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))) == 0.0  # zero head
    torch.nn.init.normal_(m.score.weight)
    short, long = [5, 6, 7], [9, 8, 7, 6, 5]
    alone = [float(sequence_scores(m, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))) for s in (short, long)]
    ids = torch.tensor([short + [0, 0], long])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = sequence_scores(m, ids, mask).tolist()
    assert padded == pytest.approx(alone, abs=1e-5)
    assert alone[0] != alone[1]


# ---- the data ------------------------------------------------------------------------------------
def test_text_conversational_and_implicit_prompt_rows_render_the_same(prepared):
    tok = load_tokenizer(prepared / "tokenizer")
    text = {"prompt": "Add two numbers.", "chosen": "def add(a, b): return a + b", "rejected": "print('hi')"}
    conv = {"prompt": [{"role": "user", "content": "Add two numbers."}],
            "chosen": [{"role": "assistant", "content": "def add(a, b): return a + b"}],
            "rejected": [{"role": "assistant", "content": "print('hi')"}]}
    implicit = {"chosen": conv["prompt"] + conv["chosen"], "rejected": conv["prompt"] + conv["rejected"]}
    pairs = [tokenize_pairs(tok, [normalize_row(r, "row")], 64, PairStats())[0] for r in (text, conv, implicit)]
    assert pairs[0] == pairs[1] == pairs[2]
    p = pairs[0]
    # the completion starts right after the shared prompt and its <|assistant|> marker
    assert p.chosen[: p.prompt_len] == p.rejected[: p.prompt_len]
    assert tok.decode(p.chosen[p.prompt_len:]).startswith("def add")


def test_bad_rows_are_skipped_and_counted(tmp_path, prepared):
    tok = load_tokenizer(prepared / "tokenizer")
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hi.", "chosen": "Hello there.", "rejected": "Go away."},
        "{not json",
        {"prompt": "Hi.", "chosen": "Hello."},  # no rejected
        {"prompt": "Hi.", "chosen": "", "rejected": "Go."},  # empty
        {"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},  # identical
        {"prompt": "word " * 200, "chosen": "A.", "rejected": "B."},  # prompt longer than the context
        {"prompt": "Long?", "chosen": "x " * 300, "rejected": "y " * 300},  # cut, still different
    ])
    stats = PairStats()
    rows = read_pairs(path, stats)
    assert stats.rows == 8 and stats.skipped[MALFORMED] == 4 and "line 2" in stats.first[MALFORMED]
    pairs = tokenize_pairs(tok, rows, 64, stats)
    assert stats.skipped[IDENTICAL] == 1 and stats.skipped[PROMPT_TOO_LONG] == 1
    assert stats.truncated == 1 and len(pairs) == 2 and stats.kept == 2
    assert all(len(p.chosen) <= 64 and len(p.rejected) <= 64 for p in pairs)
    with pytest.raises(KilnError, match=r"line 2 is not JSON; fix the row or drop preference.strict"):
        read_pairs(path, PairStats(), strict=True)


def test_default_pairs_prefer_the_real_docstring_and_hold_out_whole_modules():
    from kiln.data.preference_default import default_pairs

    train, val = default_pairs(120, 0.2, seed=0)
    assert len(train) > 60 and len(val) >= 8
    assert not {r["source"].split(":")[0] for r in train} & {r["source"].split(":")[0] for r in val}
    for r in train[:20]:
        name = r["source"].split(":")[1]
        assert f"def {name}(" in r["prompt"]
        assert r["chosen"] != r["rejected"]
        assert r["chosen"] not in r["prompt"]  # the docstring is taken out of the code
    shuffled = [r for r in train if sorted(r["chosen"].split()) == sorted(r["rejected"].split())]
    mismatched = [r for r in train if sorted(r["chosen"].split()) != sorted(r["rejected"].split())]
    assert shuffled and mismatched  # both kinds of negative, each row saying which (accuracy by kind)
    assert {r["kind"] for r in shuffled} == {"shuffled"} and {r["kind"] for r in mismatched} == {"mismatched"}


# ---- runs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, base):
    d = tmp_path_factory.mktemp("reward")
    rows = [{**r, "kind": "even" if i % 2 == 0 else "odd"} for i, r in enumerate(easy_pairs(120))]
    data = write_jsonl(d / "pairs.jsonl", rows)
    out = d / "run"
    assert kiln("reward", f"out={out}", f"init_from={base}", *FAST, "train.batch_size=8", "train.max_steps=20",
                "train.eval_every=10", "train.eval_batches=4", "train.lr=3e-3", f"preference.data={data}",
                "preference.val_fraction=0.2") == 0
    return out


def test_a_reward_model_learns_the_preference_and_reports_held_out_accuracy(reward_run):
    evals = [json.loads(line) for line in (reward_run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in evals if "val_accuracy" in m]
    assert evals[0]["step"] == 0 and evals[0]["val_accuracy"] == 0.5  # a zero head ties every pair
    assert evals[-1]["val_accuracy"] >= 0.9 and evals[-1]["val_margin"] > 0
    last = evals[-1]  # rows with a "kind" are also scored by kind
    assert {"val_accuracy_even", "val_accuracy_odd"} <= set(last)
    assert min(last["val_accuracy_even"], last["val_accuracy_odd"]) <= last["val_accuracy"] <= \
        max(last["val_accuracy_even"], last["val_accuracy_odd"])
    report = (reward_run / "report.md").read_text()
    assert "## Reward model" in report and "held-out pairwise accuracy | 50.0% |" in report
    assert "held-out pairwise accuracy, even pairs | 50.0% |" in report
    info = json.loads(next((reward_run / "checkpoints").glob("step_*/checkpoint.json")).read_text())
    assert info["head"] == "scalar" and info["workload"] == "reward"
    check_plan_vs_run(reward_run, partial=True)  # the scalar head computes no vocabulary logits


def test_a_resumed_reward_run_keeps_every_section_of_its_report(tmp_path, reward_run):
    """Every stage pushes its own report section: a run that resumes and finishes (rebuilding the
    report) keeps the sections other stages wrote, here `kiln eval`'s, and replaces its own."""
    run = tmp_path / "run"
    shutil.copytree(reward_run, run)
    assert kiln("eval", f"out={run}", "eval.text=" + str(Path(__file__)), "eval.tasks=false") == 0
    sections = ("## Training", "## Reward model", "## Evaluation")
    assert all(s in (run / "report.md").read_text() for s in sections)
    assert kiln("reward", f"out={run}", "resume=auto", "train.max_steps=24") == 0  # 4 more steps
    report = (run / "report.md").read_text()
    assert [report.count(s) for s in sections] == [1, 1, 1], report
    assert "| start (step 0) | end (step 24) |" in report  # its own section, replaced


def constant_reward(prompt: str, completion: str, **_) -> float:
    """A reward for runs that only need one (`rl.reward=test_reward:constant_reward`)."""
    return 1.0


def _inputs(d) -> dict[str, list[str]]:
    """Good inputs of each training verb, started from the module's base run."""
    pairs = write_jsonl(d / "pairs.jsonl", easy_pairs(40))
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": f"def f{i}(x):\n"} for i in range(8)])
    chats = write_jsonl(d / "chats.jsonl", [{"messages": [{"role": "user", "content": f"Say {i}."},
                                                          {"role": "assistant", "content": f"{i}."}]} for i in range(40)])
    return {"reward": [f"preference.data={pairs}"], "dpo": [f"preference.data={pairs}"],
            "rl": [f"rl.prompts={prompts}", "rl.reward=test_reward:constant_reward", "rl.prompts_per_step=2",
                   "rl.group_size=2", "rl.max_new_tokens=4", "rl.eval_prompts=2"],
            "sft": [f"sft.data={chats}", "sft.eval_prompts=0"], "pretrain": []}


# A mistake each verb only finds after reading its settings: a missing input file, or a window
# longer than the data holds.
MISTAKES = {"reward": "preference.data=nowhere.jsonl", "dpo": "preference.data=nowhere.jsonl",
            "rl": "rl.prompts=nowhere.jsonl", "sft": "sft.data=nowhere.jsonl", "pretrain": "train.seq_len=1000000"}


@pytest.mark.parametrize("verb", list(MISTAKES))
def test_a_failed_launch_leaves_no_run_and_its_settings_do_not_carry_over(tmp_path, base, verb, capsys):
    """Every training verb checks its inputs before it writes the run directory, so a launch that
    fails leaves nothing behind, and the corrected rerun starts fresh with its own settings."""
    out = tmp_path / "run"
    source = [f"data.path={base / 'data'}"] if verb == "pretrain" else [f"init_from={base}"]
    good = _inputs(tmp_path)[verb]
    assert kiln(verb, f"out={out}", *source, *FAST, *good, MISTAKES[verb], "train.lr=0.5") == 2
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert kiln(verb, f"out={out}", *source, *FAST, *good, "train.max_steps=2", "train.eval_every=1000") == 0
    assert "continuing the run" not in capsys.readouterr().out
    assert "lr: 0.5" not in (out / "config.yaml").read_text()


def test_a_run_directory_without_a_checkpoint_is_not_a_run_to_continue(tmp_path, base, capsys):
    """Settings left in `out/config.yaml` by a launch that never saved a checkpoint (an older kiln
    wrote it before checking its inputs) are not taken over."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("train:\n  lr: 0.5\n  seq_len: 100000\n")
    assert kiln("pretrain", f"out={out}", f"init_from={base}", f"data.path={base / 'data'}", *FAST,
                "train.max_steps=2", "train.eval_every=1000") == 0
    assert "continuing the run" not in capsys.readouterr().out
    assert "lr: 0.5" not in (out / "config.yaml").read_text()


def test_a_policy_can_start_from_a_reward_run_leaving_the_head_out(tmp_path, reward_run):
    from kiln.model.transformer import Transformer
    from kiln.train.restore import find_checkpoint, load_init_weights

    ckpt = find_checkpoint(str(reward_run))
    info = json.loads((ckpt / "checkpoint.json").read_text())
    from kiln.model.config import ModelConfig

    m = Transformer(ModelConfig.from_dict(info["model"]))
    note = load_init_weights(m, ckpt, "test")
    assert "2 not used by this model (score.bias, score.weight)" in note


def test_reward_needs_init_from_and_refuses_a_run_whose_tokenizer_was_replaced(tmp_path, base):
    with pytest.raises(KilnError, match="pass init_from=RUN"):
        from kiln.config import Config, load
        from kiln.workloads.reward import run_reward

        run_reward(load(Config, None, [f"out={tmp_path / 'r'}", *FAST]))
    other = tmp_path / "other"
    shutil.copytree(base, other)
    tok = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|start|>"  # another tokenizer in the run's place
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(KilnError, match="is not the tokenizer this checkpoint was trained with"):
        run_reward(load(Config, None, [f"out={tmp_path / 'r2'}", f"init_from={other}", *FAST]))
    assert not (tmp_path / "r2").exists()


def test_prompts_longer_than_the_context_leave_no_usable_pair(tmp_path, base):
    data = write_jsonl(tmp_path / "long.jsonl",
                       [{"prompt": "word " * 300 + str(i), "chosen": "A.", "rejected": "B."} for i in range(10)])
    from kiln.config import Config, load
    from kiln.workloads.reward import run_reward

    with pytest.raises(KilnError, match=r"no usable training pair \(0 of 9 pairs kept; 9 skipped: prompt_too_long"):
        run_reward(load(Config, None, [f"out={tmp_path / 'r'}", f"init_from={base}", *FAST, f"preference.data={data}"]))


@pytest.mark.parametrize("verb, key", [("reward", "preference.data"), ("dpo", "preference.data"),
                                       ("sft", "sft.data"), ("rl", "rl.prompts")])
def test_an_empty_input_file_is_said_to_be_empty(tmp_path, base, capsys, verb, key):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    good = [a for a in _inputs(tmp_path)[verb] if not a.startswith(key + "=")]
    assert kiln(verb, f"out={tmp_path / 'run'}", f"init_from={base}", *FAST, *good, f"{key}={empty}") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and (f"'{empty}' is empty" in err or f"'{empty}' are empty" in err), err
    assert not (tmp_path / "run").exists()
