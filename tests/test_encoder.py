"""The BERT-class encoder: 80/10/10 masking, masked-LM pretraining on the prepared token shards, a
fine-tuned classifier that clearly beats the majority class and TF-IDF + logistic regression on the
same split, exports that transformers loads with matching outputs, and bad input in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN, check_plan_vs_run, kiln
from kiln.data.labelled_text import mask_tokens
from kiln.data.tokenizer import SPECIAL_TOKENS
from kiln.model.config import ModelConfig
from kiln.model.encoder import EncoderClassifier
from kiln.model.transformer import Transformer
from kiln.train.checkpoint import CheckpointManager

QUIET = ["train.tensorboard=false", "train.progress=false", "train.log_every=50", "train.ckpt_every=100000"]
MLM_ARGS = ["model.preset=tiny", "train.seq_len=128", "train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=20",
            "train.max_steps=120", "train.eval_every=120", "train.eval_batches=4", *QUIET]
# The embedded order task, test-sized: 300 functions per label from three packages.
CLASSIFY_ARGS = ["classify.packages=asyncio,email,logging", "classify.max_per_class=300", "train.seq_len=128",
                 "train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=20", "train.max_steps=160",
                 "train.eval_every=160", *QUIET]


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, prepared) -> Path:
    """`kiln encoder` (masked LM) on the session's prepared stdlib slice."""
    out = tmp_path_factory.mktemp("encoder") / "run"
    out.mkdir()
    shutil.copytree(prepared / "data", out / "data")
    shutil.copytree(prepared / "tokenizer", out / "tokenizer")
    assert kiln("encoder", f"out={out}", *MLM_ARGS) == 0
    return out


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, encoder_run) -> Path:
    out = tmp_path_factory.mktemp("classify") / "run"
    assert kiln("classify", f"out={out}", f"init_from={encoder_run}", *CLASSIFY_ARGS) == 0
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _latest(run: Path) -> Path:
    return CheckpointManager(run).latest_intact()


# ---- masking ---------------------------------------------------------------------------------------
def test_masking_chooses_the_rate_and_replaces_80_10_10():
    n_special, vocab, mask_id = len(SPECIAL_TOKENS), 512, 512
    ids = torch.randint(n_special, vocab, (64, 1024))
    ids[:, ::16] = 0  # BOS tokens: never chosen
    inputs, labels = mask_tokens(ids, torch.Generator().manual_seed(0), mask_id=mask_id, vocab=vocab, rate=0.15)
    chosen = labels != -100
    ordinary = ids >= n_special
    assert not (chosen & ~ordinary).any() and torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.sum() / ordinary.sum() - 0.15) < 0.01
    masked = (inputs == mask_id) & chosen
    kept = (inputs == ids) & chosen
    swapped = chosen & ~masked & ~kept
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(swapped.sum() / n - 0.1) < 0.02  # a random token (1 in 505 draws its own id: counted as kept)
    assert abs(kept.sum() / n - 0.1) < 0.02
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert (inputs[swapped] >= n_special).all() and (inputs[swapped] < vocab).all()
    again, _ = mask_tokens(ids, torch.Generator().manual_seed(0), mask_id=mask_id, vocab=vocab, rate=0.15)
    assert torch.equal(again, inputs)


# ---- masked-LM pretraining -------------------------------------------------------------------------
def test_the_encoder_learns_masked_tokens_bidirectionally(encoder_run):
    info = CheckpointManager.info(_latest(encoder_run))
    assert info["workload"] == "encoder" and info["model"]["causal"] is False
    assert info["mask_id"] == 512 and info["model"]["vocab_size"] == 576  # 512 tokens + mask, padded to 64
    val = [m for m in _metrics(encoder_run) if "val_loss" in m]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.0
    result = json.loads((encoder_run / "encoder_eval.json").read_text())
    assert result["val_accuracy"] > result["frequent_token_accuracy"] + 0.03
    assert "## Masked language model" in (encoder_run / "report.md").read_text()
    check_plan_vs_run(encoder_run)  # logits over the vocabulary at every position, as the planner counts


def test_the_encoder_exports_to_transformers_eurobert_with_matching_outputs(encoder_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = _latest(encoder_run)
    model = Transformer(ModelConfig.from_dict(CheckpointManager.info(path)["model"]))
    CheckpointManager.load(path, model)
    model.eval()
    hf = AutoModelForMaskedLM.from_pretrained(encoder_run / "export" / "hf").eval()
    assert type(hf).__name__ == "EuroBertForMaskedLM"
    tok = AutoTokenizer.from_pretrained(encoder_run / "export" / "hf")
    assert tok.mask_token_id == 512 == hf.config.mask_token_id
    ids = tok("def parse(text):\n    return json.loads(text)", return_tensors="pt")["input_ids"]
    ids = torch.cat([ids, ids.flip(-1)])
    pad = torch.ones_like(ids)
    pad[1, -3:] = 0
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(input_ids=ids).logits, atol=1e-4)
        ours = model(ids, attention_mask=pad)
        theirs = hf(input_ids=ids, attention_mask=pad).logits
    assert torch.allclose(ours[pad.bool()], theirs[pad.bool()], atol=1e-4)


# ---- fine-tuning -----------------------------------------------------------------------------------
def test_the_classification_loader_counts_the_positions_it_pads_to():
    """Rows are padded to their batch's longest, not to train.seq_len, and the trainer's tokens/s
    and MFU count what the batch holds (`batch_tokens`), not batch_size × seq_len."""
    import numpy as np

    from kiln.data.labelled_text import ClassificationLoader

    ids = [np.arange(1, n + 1) for n in (3, 9, 5, 4, 7, 2)]
    loader = ClassificationLoader(ids, [0, 1, 0, 1, 0, 1], batch_size=2, seq_len=128, pad_id=0)
    for _ in range(3):
        batch = loader.next_batch()
        longest = int(batch["attention_mask"].sum(1).max())
        assert batch["input_ids"].shape == (2, longest) and loader.batch_tokens == 2 * longest < 2 * 128


def test_the_fine_tuned_classifier_clearly_beats_both_baselines(classify_run):
    result = json.loads((classify_run / "classify_eval.json").read_text())
    assert result["classes"] == ["original", "shuffled"] and result["counts"]["test"] >= 100
    baselines = result["baselines"]
    assert result["test_accuracy"] > max(baselines.values()) + 0.15, result
    report = (classify_run / "report.md").read_text()
    assert "## Classification" in report and "TF-IDF + logistic regression" in report
    check_plan_vs_run(classify_run, partial=True)  # a pooled head: no vocabulary logits


def test_the_classifier_starts_from_the_encoder_and_exports_with_matching_outputs(classify_run, encoder_run):
    from transformers import AutoModelForSequenceClassification

    info = CheckpointManager.info(_latest(classify_run))
    assert info["workload"] == "classify" and Path(info["init_from"]).parent.parent == encoder_run
    model = EncoderClassifier(ModelConfig.from_dict(info["model"]), len(info["classes"]), info["pooling"])
    CheckpointManager.load(_latest(classify_run), model)
    model.eval()
    hf = AutoModelForSequenceClassification.from_pretrained(classify_run / "export" / "hf").eval()
    assert type(hf).__name__ == "EuroBertForSequenceClassification"
    assert hf.config.id2label == {0: "original", 1: "shuffled"}
    ids = torch.randint(len(SPECIAL_TOKENS), 512, (3, 40))
    mask = torch.ones_like(ids)
    mask[2, 25:] = 0
    with torch.no_grad():
        assert torch.allclose(model(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask).logits, atol=1e-4)


# ---- bad input -------------------------------------------------------------------------------------
def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_classify_without_an_encoder_to_start_from_is_one_line(tmp_path, capsys, run_dir):
    assert kiln("classify", f"out={tmp_path / 'a'}", *CLASSIFY_ARGS) == 2
    assert "pass init_from=RUN" in _error(capsys)
    assert kiln("pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=1", *QUIET) == 0
    capsys.readouterr()
    assert kiln("classify", f"out={tmp_path / 'b'}", f"init_from={run_dir}", *CLASSIFY_ARGS) == 2
    assert "is a pretrain run, not an encoder" in _error(capsys)


def test_a_labelled_row_without_a_label_is_one_line_naming_it(tmp_path, capsys, encoder_run):
    data = tmp_path / "labels.jsonl"
    data.write_text('{"text": "def f(): pass", "label": "a"}\n{"text": "x = 1"}\n')
    assert kiln("classify", f"out={tmp_path / 'c'}", f"init_from={encoder_run}", f"classify.input={data}",
                *CLASSIFY_ARGS) == 2
    line = _error(capsys)
    assert f"{data}:2 lacks a non-empty 'text' or 'label'" in line
    assert not (tmp_path / "c").exists()


def test_repeated_and_conflicting_texts_are_left_out_counted_and_said(tmp_path, capsys, encoder_run):
    """300 rows, 150 per class, where many texts repeat and some carry both labels: one copy of a
    repeated text is kept, a text labelled both ways is left out entirely, and the run says so."""
    from kiln.config import ClassifyConfig
    from kiln.data.labelled_text import load_examples

    rows = []
    for i in range(60):  # 60 distinct texts per class, each written twice (240 rows)
        rows += [{"text": f"def good_{i}(x):\n    return x + {i}\n", "label": "a"}] * 2
        rows += [{"text": f"def bad_{i}(x):\n    return x - {i}\n", "label": "b"}] * 2
    for i in range(30):  # 30 texts labelled both ways (60 rows)
        rows += [{"text": f"def both_{i}(y):\n    pass\n", "label": "a"}, {"text": f"def both_{i}(y):\n    pass\n", "label": "b"}]
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits, classes, dropped = load_examples(ClassifyConfig(input=str(data)))
    kept = [e for s in splits.values() for e in s]
    assert (dropped.duplicates, dropped.conflicting, dropped.conflicting_texts) == (120, 60, 30)
    assert len(kept) == 120 and len({e.text for e in kept}) == 120
    assert not any(e.text.startswith("def both_") for e in kept)
    out = tmp_path / "c"
    assert kiln("classify", f"out={out}", f"init_from={encoder_run}", f"classify.input={data}",
                *CLASSIFY_ARGS, "train.max_steps=2", "train.eval_every=2") == 0
    said = capsys.readouterr().out
    assert "left out before the split: 120 repeated text(s)" in said and "30 text(s) labelled more than one way" in said
    assert "left out before the split: 120 repeated text(s)" in (out / "report.md").read_text()
