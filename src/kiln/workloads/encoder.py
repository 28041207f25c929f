"""`kiln encoder` and `kiln classify`: a BERT-class encoder on the shared Trainer.

`kiln encoder` pretrains the shared Transformer with `causal=False` on prepared token shards
(any text `kiln prepare` made) with the masked-LM objective (`encoder.mask_rate`, 80/10/10
replacement). `kiln classify` fine-tunes an encoder run (`init_from=`) with a classification head
on labelled text (`classify.input`: an embedded stdlib task or a JSONL of {text, label}), then
scores the test split next to the majority class and TF-IDF + logistic regression fitted on the
same training split. Both export a Hugging Face EuroBERT directory (`encoder.export`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from kiln.config import Config
from kiln.data.labelled_text import (
    ClassificationLoader,
    MaskedTokenLoader,
    class_counts,
    encode,
    load_examples,
    mask_tokens,
    ordered_batches,
)
from kiln.data.layout import data_dir
from kiln.data.shards import TokenLoader, open_data
from kiln.data.tokenizer import BOS, PAD
from kiln.errors import KilnError
from kiln.hardware import tune_cpu_allocator
from kiln.infer.load import open_checkpoint
from kiln.model.config import ModelConfig
from kiln.model.encoder import EncoderClassifier
from kiln.model.transformer import Transformer
from kiln.model.weights import model_tensors
from kiln.post.eurobert import export_eurobert
from kiln.report import write_section
from kiln.runs import write_json
from kiln.train import parallel
from kiln.train.checkpoint import CheckpointManager
from kiln.train.objectives import Batch, Objective, model_inputs, token_cross_entropy
from kiln.train.restore import find_checkpoint
from kiln.train.trainer import Trainer
from kiln.workloads.classification import Classification, confusion, latest_metrics, plot_confusion, predict
from kiln.workloads.common import (
    build_trained,
    check_shards_match_tokenizer,
    ensure_data,
    matmul_shapes,
    model_config_for,
    prepare_run_dir,
    resolve_resume,
    validation_batches,
)

MLM, CLASSIFY = "encoder", "classify"
CLASSIFY_EVAL = "classify_eval.json"
MLM_EVAL = "encoder_eval.json"


class MaskedLanguageModeling(Objective):
    """Cross-entropy on the masked positions only (labels -100 elsewhere); logs the share of masked
    tokens predicted right. Runs pipelined too: it needs only the logits and the labels."""

    name = "masked-language-model cross-entropy"

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        logits = model(batch["input_ids"], **model_inputs(batch))
        total, n = token_cross_entropy(logits, batch["labels"])
        hit = ((logits.detach().argmax(-1) == batch["labels"]) & (batch["labels"] != -100)).sum()
        return total / n.clamp(min=1), {"masked_accuracy": hit / n.clamp(min=1)}

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        logits = model(batch["input_ids"], **model_inputs(batch))
        total, n = token_cross_entropy(logits, batch["labels"])
        hit = ((logits.argmax(-1) == batch["labels"]) & (batch["labels"] != -100)).sum()
        return {"val_loss": (float(total), float(n)), "val_accuracy": (float(hit), float(n))}

    @staticmethod
    def pipeline_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, n = token_cross_entropy(output, labels)
        return total / n.clamp(min=1)


def encoder_model_config(cfg: Config, vocab_size: int, base: ModelConfig | None = None) -> ModelConfig:
    """pretrain's model for a tokenizer of `vocab_size` plus the mask token (its first padded row), bidirectional."""
    if cfg.model.causal:
        raise KilnError("an encoder is bidirectional: drop model.causal=true")
    mc = model_config_for(cfg, vocab_size + 1, base)
    return ModelConfig(**{**mc.to_dict(), "causal": False})


def _masker(cfg: Config, mask_id: int, vocab: int):
    ec = cfg.encoder

    def mask(ids: torch.Tensor, gen: torch.Generator):
        return mask_tokens(ids, gen, mask_id=mask_id, vocab=vocab, rate=ec.mask_rate, mask_share=ec.mask_token,
                           random_share=ec.random_token)

    return mask


def _export(cfg: Config, model: nn.Module, mc: ModelConfig, tpath: Path, mask_id: int, workload: str,
            classes: list[str] | None = None) -> Path | None:
    if not cfg.encoder.export:
        return None
    out = Path(cfg.out) / "export" / "hf"
    export_eurobert(model_tensors(model), mc, tpath, out, mask_id=mask_id, classes=classes,
                    pooling=cfg.classify.pooling)
    print(f"{workload}: exported a Hugging Face EuroBERT directory to {out} "
          f"({'EuroBertForSequenceClassification' if classes else 'EuroBertForMaskedLM'})", flush=True)
    return out


def run_encoder(cfg: Config) -> dict:
    ddir = data_dir(cfg)
    ensure_data(cfg, ddir, MLM)
    env = parallel.init_env(cfg)
    if env.device.type == "cpu":
        tune_cpu_allocator()
    man = open_data(ddir)
    tpath = check_shards_match_tokenizer(ddir, man)
    vocab = man["vocab_size"]
    source = find_checkpoint(cfg.init_from) if cfg.init_from else None
    base = ModelConfig.from_dict(CheckpointManager.info(source)["model"]) if source else None
    mc = encoder_model_config(cfg, vocab, base)
    ckpt = CheckpointManager(Path(cfg.out), cfg.train.keep_last)
    start = resolve_resume(cfg, ckpt, mc, MLM)
    notes = []

    model = build_trained(lambda: Transformer(mc), cfg, env, source, start, MLM, notes)
    tc = cfg.train
    mask = _masker(cfg, vocab, vocab)
    loader = MaskedTokenLoader(TokenLoader(ddir, "train", tc.batch_size, tc.seq_len, tc.seed, rank=env.dp_rank,
                                           world=env.dp_world, document_mask=tc.document_mask), mask, tc.seed, env.dp_rank)
    evals, _ = validation_batches(ddir, cfg, env, MLM)
    for i, b in enumerate(evals):  # the same masked positions at every evaluation
        b["input_ids"], b["labels"] = mask(b["input_ids"], torch.Generator().manual_seed(1_000_003 + i))
    prepare_run_dir(cfg, env, tpath, MLM)  # inputs checked: now the run directory
    trainer = Trainer(
        cfg, model, env, loader, MaskedLanguageModeling(), eval_batches=evals,
        flops_per_token=mc.flops_per_token(tc.seq_len),
        meta={"model": mc.to_dict(), "data": str(ddir), "tokenizer_sha256": man["tokenizer_sha256"], "mask_id": vocab,
              **({"init_from": str(source)} if source else {})},
        name=MLM, matmul_shapes=matmul_shapes(mc, tc.batch_size * tc.seq_len),
    )
    for note in notes:
        trainer.say(f"init_from: {note}")
    if start is not None:
        trainer.resume_from(start)
    trainer.say(f"{mc.num_params() / 1e6:.2f}M params, bidirectional; masking {cfg.encoder.mask_rate:.0%} of tokens "
                f"({cfg.encoder.mask_token:.0%} mask / {cfg.encoder.random_token:.0%} random / rest kept), "
                f"{env.describe()}, {tc.max_steps} steps")
    with parallel.peer_failures_as_errors(env, cfg.parallel.timeout_s):
        last = trainer.fit()
    if not env.is_main:
        return last
    targets = torch.cat([b["labels"][b["labels"] != -100] for b in evals]) if evals else torch.zeros(0)
    frequent = float(torch.bincount(targets).max() / max(1, len(targets))) if len(targets) else 0.0
    export = _export(cfg, model, mc, tpath, vocab, MLM) if not env.distributed else None
    if env.distributed:
        trainer.say(f"no Hugging Face export under torchrun: run `kiln encoder out={cfg.out}` once more on one "
                    "process (it finds the run finished, loads its last checkpoint and exports)")
    logged = latest_metrics(Path(cfg.out))
    write_json(Path(cfg.out) / MLM_EVAL, {"steps": trainer.step, "val_loss": logged.get("val_loss"),
                                          "val_accuracy": logged.get("val_accuracy"),
                                          "frequent_token_accuracy": frequent, "export": str(export) if export else None})
    lines = ["## Masked language model", "",
             f"- encoder: {mc.n_layers} layers, d_model {mc.d_model}, {mc.n_heads} heads, bidirectional "
             f"(`causal=false`), vocab {vocab} + the mask token (id {vocab})",
             f"- masking: {cfg.encoder.mask_rate:.0%} of ordinary tokens chosen; of those {cfg.encoder.mask_token:.0%} "
             f"→ mask, {cfg.encoder.random_token:.0%} → a random token, the rest unchanged",
             f"- validation on masked tokens: loss {logged.get('val_loss', float('nan')):.3f} nats, "
             f"**accuracy {100 * logged.get('val_accuracy', 0):.1f}%** vs {100 * frequent:.1f}% for always guessing the "
             "most frequent token"]
    if export:
        lines.append(f"- Hugging Face export: `{export}` (`EuroBertForMaskedLM`; see docs/vision-and-encoders.md)")
    write_section(cfg.out, "encoder", lines)
    return last


# ---- classification ------------------------------------------------------------------------------
def text_baselines(splits: dict, n_classes: int, tokenizer, ids: dict) -> dict[str, float]:
    """Test accuracy of the majority class and of TF-IDF (words and bigrams) + logistic regression,
    fitted on the training split; the texts are the ones the encoder sees (cut to its length)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    def texts(split: str) -> list[str]:
        return tokenizer.decode_batch([x[1:].tolist() for x in ids[split]])

    ytr = np.asarray([e.label for e in splits["train"]])
    yte = np.asarray([e.label for e in splits["test"]])
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b", min_df=1)
    xtr, xte = vec.fit_transform(texts("train")), vec.transform(texts("test"))
    clf = LogisticRegression(max_iter=3000, C=10.0).fit(xtr, ytr)
    return {"majority class": float((yte == np.bincount(ytr, minlength=n_classes).argmax()).mean()),
            "TF-IDF + logistic regression": float((clf.predict(xte) == yte).mean())}


def run_classify(cfg: Config) -> dict:
    if not cfg.init_from:
        raise KilnError("kiln classify fine-tunes an encoder: pass init_from=RUN (a `kiln encoder` run)")
    env = parallel.init_env(cfg)
    if env.device.type == "cpu":
        tune_cpu_allocator()
    ck = open_checkpoint(cfg.init_from, "init_from", f"{CLASSIFY}: init_from={cfg.init_from}")
    if ck.info.get("workload") not in (MLM, CLASSIFY) or ck.model.causal:
        raise KilnError(f"init_from={cfg.init_from} is a {ck.info.get('workload')} run, not an encoder; pretrain one with "
                        "`kiln encoder` first")
    source, tpath, tok = ck.path, ck.tokenizer_file, ck.tokenizer
    vocab = tok.get_vocab_size()
    mc = encoder_model_config(cfg, vocab, ck.model)
    splits, classes, dropped = load_examples(cfg.classify)
    if env.is_main and (dropped.duplicates or dropped.conflicting):
        print(f"{CLASSIFY}: left out before the split: {dropped.describe()}"
              + (f", e.g. {'; '.join(dropped.examples)}" if dropped.examples else ""), flush=True)
    tc = cfg.train
    ids = {s: encode(splits[s], tok, tok.token_to_id(BOS), min(tc.seq_len, mc.max_seq_len)) for s in splits}
    labels = {s: [e.label for e in splits[s]] for s in splits}
    ckpt = CheckpointManager(Path(cfg.out), tc.keep_last)
    start = resolve_resume(cfg, ckpt, mc, CLASSIFY)
    if start is not None and CheckpointManager.info(start).get("classes") != classes:
        raise KilnError(f"'{cfg.out}' was trained on other classes ({CheckpointManager.info(start).get('classes')}); "
                        "choose a new out=")
    notes = []

    model = build_trained(lambda: EncoderClassifier(mc, len(classes), cfg.classify.pooling), cfg, env, source, start,
                          CLASSIFY, notes)
    pad = tok.token_to_id(PAD)
    loader = ClassificationLoader(ids["train"], labels["train"], tc.batch_size, tc.seq_len, pad, tc.seed,
                                  env.dp_rank, env.dp_world)
    objective = Classification(("input_ids", "attention_mask"))
    prepare_run_dir(cfg, env, tpath, CLASSIFY)  # inputs checked: now the run directory
    trainer = Trainer(
        cfg, model, env, loader, objective,
        eval_batches=ordered_batches(ids["val"], labels["val"], tc.batch_size, pad, env.dp_rank, env.dp_world),
        flops_per_token=mc.flops_per_token(tc.seq_len),
        meta={"model": mc.to_dict(), "classes": classes, "pooling": cfg.classify.pooling, "mask_id": vocab,
              "tokenizer_sha256": ck.info.get("tokenizer_sha256"), "init_from": str(source)},
        name=CLASSIFY, matmul_shapes=matmul_shapes(mc, tc.batch_size * tc.seq_len),
    )
    for note in notes:
        trainer.say(f"init_from: {note}")
    if start is not None:
        trainer.resume_from(start)
    counts = {s: len(splits[s]) for s in splits}
    trainer.say(f"classify.input={cfg.classify.input}: {len(classes)} classes, {counts['train']} train / {counts['val']} "
                f"validation / {counts['test']} test examples; {env.describe()}, {tc.max_steps} steps")
    test = ordered_batches(ids["test"], labels["test"], tc.batch_size, pad)
    with parallel.peer_failures_as_errors(env, cfg.parallel.timeout_s):
        last = trainer.fit()
        predicted = predict(model, test, objective, env)
    if not env.is_main:
        return last
    truth = np.asarray(labels["test"])
    matrix = confusion(truth, predicted, len(classes))
    result = {
        "input": cfg.classify.input, "classes": classes, "counts": counts,
        "dropped": {"duplicates": dropped.duplicates, "conflicting": dropped.conflicting,
                    "conflicting_texts": dropped.conflicting_texts, "described": dropped.describe()},
        "per_class": {s: class_counts(splits[s], len(classes)) for s in splits},
        "steps": trainer.step, "elapsed_s": round(trainer.elapsed, 1),
        "val_accuracy": latest_metrics(Path(cfg.out)).get("val_accuracy"),
        "test_accuracy": float((predicted == truth).mean()), "confusion": matrix.tolist(),
        "baselines": text_baselines(splits, len(classes), tok, ids), "seq_len": tc.seq_len,
    }
    out = Path(cfg.out)
    write_json(out / CLASSIFY_EVAL, result)
    result["export"] = str(_export(cfg, model, mc, tpath, vocab, CLASSIFY, classes)) if not env.distributed else None
    write_classify_report(out, result)
    base = ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["baselines"].items())
    trainer.say(f"test accuracy {100 * result['test_accuracy']:.1f}% ({base}); report {out / 'report.md'}")
    return {**last, "test_accuracy": result["test_accuracy"], "baselines": result["baselines"]}


def write_classify_report(out: Path, r: dict) -> Path:
    plot_confusion(np.asarray(r["confusion"]), r["classes"], out / "confusion.png",
                   f"test confusion matrix ({100 * r['test_accuracy']:.1f}% correct)")
    rows = [("fine-tuned encoder (this run)", r["test_accuracy"]), *r["baselines"].items()]
    lines = ["## Classification", "",
             f"- task: `{r['input']}`, {len(r['classes'])} classes ({', '.join(r['classes'][:12])}); "
             + ", ".join(f"{s} {n:,}" for s, n in r["counts"].items()) + " examples (stratified by seed); "
             f"inputs cut to {r['seq_len']} tokens, the baselines read the same text",
             f"- left out before the split: {r.get('dropped', {}).get('described', 'none')}",
             f"- {r['steps']:,} fine-tuning steps in {r['elapsed_s']:.0f} s"
             + (f"; last validation accuracy {100 * r['val_accuracy']:.1f}%" if r.get("val_accuracy") is not None else ""),
             "", "| model (same split) | test accuracy |", "|---|---:|",
             *[f"| {name} | {100 * acc:.1f}% |" for name, acc in rows], "",
             "![test confusion matrix](confusion.png)", ""]
    if r.get("export"):
        lines.append(f"Hugging Face export: `{r['export']}` (`EuroBertForSequenceClassification`).")
    return write_section(out, "classify", lines)
