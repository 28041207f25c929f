"""`kiln prepare`: reader → stages → tokenizer → token-shard writer, with a manifest and skip-on-rerun."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kiln.config import Config, DataConfig
from kiln.data.document import Document, Stage, StageStats, run_stages
from kiln.data.shards import TokenShardWriter
from kiln.data.sources import documents, input_files, listing_fingerprint
from kiln.data.stages import ExactDedup, LengthFilter, Normalize
from kiln.data.tokenizer import BOS, load_tokenizer, token_dtype, train_tokenizer
from kiln.errors import KilnError
from kiln.runs import atomic_dir, clean_stale_temps, fingerprint, manifest, read_manifest, sha256_file, write_json


def build_stages(data: DataConfig) -> list[Stage]:
    return [Normalize(), LengthFilter(data.min_chars, data.max_chars), ExactDedup()]


def is_validation(doc_id: str, fraction: float) -> bool:
    """Split by document (file) id, so no file's text lands in both splits."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def data_dir(cfg: Config) -> Path:
    return Path(cfg.data.path) if cfg.data.path else Path(cfg.out) / "data"


def run_prepare(cfg: Config) -> dict:
    out = Path(cfg.out)
    ddir, tdir = data_dir(cfg), out / "tokenizer"
    clean_stale_temps(ddir.parent)
    clean_stale_temps(out)
    files = input_files(cfg.data.input)
    inputs = fingerprint({"files": listing_fingerprint(files), "data": asdict(cfg.data)})
    old = read_manifest(ddir)
    if old and old.get("inputs") == inputs and (tdir / "tokenizer.json").is_file():
        if old.get("tokenizer_sha256") == sha256_file(tdir / "tokenizer.json"):
            print(f"prepare: {ddir} is up to date with its inputs, skipping")
            return old
    t0 = time.perf_counter()
    stats: dict[str, StageStats] = {}
    train_docs: list[Document] = []
    val_docs: list[Document] = []
    source = documents(cfg.data.input)
    bar = tqdm(total=len(files), desc="prepare: read+filter", unit="file", disable=None)
    n_read = 0
    for doc in run_stages(_counted(source, bar), build_stages(cfg.data), stats):
        (val_docs if is_validation(doc.id, cfg.data.val_fraction) else train_docs).append(doc)
        n_read += 1
        if cfg.data.max_docs and n_read >= cfg.data.max_docs:
            break
    bar.close()
    if not train_docs and not val_docs:
        dropped = {r: n for s in stats.values() for r, n in s.dropped.items()}
        raise KilnError(
            f"no documents left from data.input '{cfg.data.input}' ({len(files)} files; dropped: {dropped or 'none'}); "
            "point data.input at non-empty text or lower data.min_chars"
        )
    if not val_docs:  # a tiny corpus: hold out its last file rather than have no validation set
        val_docs.append(train_docs.pop())
    if not train_docs:
        train_docs.append(val_docs.pop())
    if not val_docs:
        raise KilnError("the corpus has a single document; give at least two so one can be held out for validation")

    # Tokenizer: the given one, or trained on the training split only.
    t1 = time.perf_counter()
    if cfg.data.tokenizer.path:
        tok = load_tokenizer(cfg.data.tokenizer.path)
    else:
        texts = _budget([d.text for d in train_docs], cfg.data.tokenizer.train_bytes)
        print(f"prepare: training a {cfg.data.tokenizer.vocab_size}-token BPE on {sum(map(len, texts)) / 1e6:.1f} MB")
        tok = train_tokenizer(texts, cfg.data.tokenizer.vocab_size, length=len(texts))
    tok_seconds = time.perf_counter() - t1
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    with atomic_dir(tdir) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "manifest.json", manifest("tokenizer", asdict(cfg.data.tokenizer), inputs, vocab_size=vocab))
    tok_hash = sha256_file(tdir / "tokenizer.json")

    # Tokenize and write shards; the training documents in a seeded shuffle.
    t2 = time.perf_counter()
    bos = tok.token_to_id(BOS)
    order = np.random.default_rng(cfg.data.seed).permutation(len(train_docs))
    splits = {}
    counts = np.zeros(vocab, dtype=np.int64)
    with atomic_dir(ddir) as tmp:
        for split, docs in (("train", [train_docs[i] for i in order]), ("val", val_docs)):
            writer = TokenShardWriter(tmp, split, dtype, cfg.data.shard_tokens)
            n_tokens, n_bytes = 0, 0
            val_ids = []
            for i in tqdm(range(0, len(docs), 512), desc=f"prepare: tokenize {split}", disable=None):
                batch = docs[i : i + 512]
                for doc, enc in zip(batch, tok.encode_batch([d.text for d in batch], add_special_tokens=False)):
                    ids = np.asarray([bos, *enc.ids], dtype=np.int64)
                    writer.add(ids)
                    n_tokens += len(ids)
                    n_bytes += len(doc.text.encode("utf-8"))
                    if split == "train":
                        counts += np.bincount(ids, minlength=vocab)
                    else:
                        val_ids.append(ids)
            splits[split] = {"shards": writer.close(), "tokens": n_tokens, "bytes": n_bytes, "docs": len(docs)}
        unigram_bpb = _unigram_bpb(counts, np.concatenate(val_ids), splits["val"]["bytes"])
        man = manifest(
            "prepare",
            asdict(cfg.data),
            inputs,
            dtype=dtype,
            vocab_size=vocab,
            tokenizer="../tokenizer/tokenizer.json" if not cfg.data.path else str(tdir / "tokenizer.json"),
            tokenizer_sha256=tok_hash,
            splits=splits,
            unigram_bpb=unigram_bpb,
            files=len(files),
            stages={k: v.to_dict() for k, v in stats.items()},
            seconds={"read_filter": round(t1 - t0, 2), "tokenizer": round(tok_seconds, 2),
                     "tokenize": round(time.perf_counter() - t2, 2)},
        )
        write_json(tmp / "manifest.json", man)
    tr, va = splits["train"], splits["val"]
    print(
        f"prepare: {tr['docs']} train docs ({tr['tokens']:,} tokens), {va['docs']} val docs ({va['tokens']:,} tokens), "
        f"vocab {vocab}, {tr['bytes'] / max(tr['tokens'], 1):.2f} bytes/token, unigram baseline {unigram_bpb:.3f} bits/byte"
    )
    return man


def _counted(docs, bar):
    for d in docs:
        bar.update(1)
        yield d


def _budget(texts: list[str], max_bytes: int) -> list[str]:
    if not max_bytes:
        return texts
    out, n = [], 0
    for t in texts:
        if n >= max_bytes:
            break
        out.append(t)
        n += len(t)
    return out


def _unigram_bpb(train_counts: np.ndarray, val_ids: np.ndarray, val_bytes: int) -> float:
    """Bits per byte of the validation split under the training split's token frequencies (add-one)."""
    p = (train_counts + 1) / (train_counts.sum() + len(train_counts))
    bits = -np.log2(p[val_ids]).sum()
    return float(bits / max(val_bytes, 1)) if math.isfinite(bits) else float("nan")


def tokenizer_path(data_path: Path, man: dict) -> Path:
    """Where the tokenizer a data directory was made with lives."""
    return (data_path / man["tokenizer"]).resolve()
