"""`kiln prepare`: readers → stages → global dedup → stages → tokenizer → tokenize → shuffled shards, resumable.

The driver plans tasks (by input file; large files by byte range or row group), runs the
per-task steps of `kiln.data.tasks` through an executor (in-process, local processes or Ray),
runs the global steps itself (duplicate clustering, tokenizer training, the corpus-wide shuffle
into shards), and writes the data directory with its manifest plus `prepare_report.md`.
Intermediate results live in `<data>.work/` with a completion marker per task, so a killed
run, rerun, redoes only the missing tasks and writes byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
import tracemalloc
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from kiln.config import Config
from kiln.data.dedup import ExactDedup, MinhashDedup, cluster_sizes, lsh_clusters
from kiln.data.document import StageStats
from kiln.data.executor import Executor
from kiln.data.shards import TokenShardWriter
from kiln.data.sources import HTML_SUFFIXES, file_format, input_files, listing_fingerprint, plan_tasks
from kiln.data.stages import DEDUP_STAGES, build_stage, split_at_dedup, stage_entries
from kiln.data.tasks import Job, filter_task, load_docs, post_task, save_npy, tokenize_task
from kiln.data.tokenizer import load_tokenizer, token_dtype, train_tokenizer
from kiln.errors import KilnError
from kiln.runs import (
    atomic_dir,
    atomic_write_text,
    clean_stale_temps,
    fingerprint,
    manifest,
    read_manifest,
    sha256_file,
    write_json,
)


def is_validation(doc_id: str, fraction: float) -> bool:
    """Split by document id (a file's path for text inputs), so no document lands in both splits."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def data_dir(cfg: Config) -> Path:
    return Path(cfg.data.path) if cfg.data.path else Path(cfg.out) / "data"


def work_dir(ddir: Path) -> Path:
    return ddir.with_name(ddir.name + ".work")


def _resolved_stages(cfg: Config, files: list[Path]) -> list:
    """The recipe's stages as (name, options), checked now (unknown names or options fail before any work)."""
    r = cfg.data.reader
    html = r.html == "always" or (r.html == "auto" and any(
        f.name.lower().endswith(HTML_SUFFIXES) or file_format(f, r) == "warc" for f in files))
    entries = stage_entries(cfg.data, files, html)
    split_at_dedup([build_stage(n, o, cfg.data) for n, o in entries])
    return entries


def run_prepare(cfg: Config) -> dict:
    out = Path(cfg.out)
    ddir, tdir = data_dir(cfg), out / "tokenizer"
    clean_stale_temps(ddir.parent)
    clean_stale_temps(out)
    files = input_files(cfg.data.input)
    # What the output depends on: the input files and the data config, not where it runs.
    inputs = fingerprint({"files": listing_fingerprint(files),
                          "data": {k: v for k, v in asdict(cfg.data).items() if k != "executor"}})
    old = read_manifest(ddir)
    if old and old.get("inputs") == inputs and (tdir / "tokenizer.json").is_file():
        if old.get("tokenizer_sha256") == sha256_file(tdir / "tokenizer.json"):
            print(f"prepare: {ddir} is up to date with its inputs, skipping")
            return old
    entries = _resolved_stages(cfg, files)
    work = work_dir(ddir)
    if (work / "inputs").is_file() and (work / "inputs").read_text() != inputs:
        shutil.rmtree(work)
    resumed = sum(1 for _ in (work / "filter").glob("*.json")) if work.is_dir() else 0
    work.mkdir(parents=True, exist_ok=True)
    (work / "inputs").write_text(inputs)

    with Executor(cfg.data.executor) as ex:
        target = max(1 << 20, min(cfg.data.reader.task_bytes, sum(f.stat().st_size for f in files) // (4 * ex.workers)))
        tasks = plan_tasks(cfg.data.input, cfg.data.reader, target)
        print(f"prepare: {len(files)} files in {len(tasks)} tasks on {ex.label}; stages: "
              + " → ".join(n for n, _ in entries) + (f"; resuming ({resumed} tasks already filtered)" if resumed else ""))
        jobs = [Job(t, cfg.data, entries, str(work)) for t in tasks]
        timing: dict[str, float] = {}

        t = time.perf_counter()
        filtered = ex.map(filter_task, jobs, "prepare: read+filter")
        timing["read_filter"] = time.perf_counter() - t
        messages = _print_skips(filtered)

        t = time.perf_counter()
        dedup = _global_dedup(cfg, work, jobs, filtered)
        timing["dedup"] = time.perf_counter() - t

        t = time.perf_counter()
        posted = ex.map(post_task, jobs, "prepare: after-dedup stages")
        timing["post"] = time.perf_counter() - t
        ids = [i for r in posted for i in r["ids"]]
        doc_bytes = np.asarray([b for r in posted for b in r["bytes"]], dtype=np.int64)
        stats = _merge_stats(filtered, dedup["stats"], posted)
        if not ids:
            dropped = {r: n for s in stats.values() for r, n in s["dropped"].items()}
            raise KilnError(
                f"no documents left from data.input '{cfg.data.input}' ({len(files)} files; dropped: {dropped or 'none'}); "
                "point data.input at non-empty text, lower data.min_chars or loosen data.stages"
            )
        is_val = np.asarray([is_validation(i, cfg.data.val_fraction) for i in ids])
        if not is_val.any():  # a tiny corpus: hold out its last document rather than have no validation set
            is_val[-1] = True
        if is_val.all():
            if len(ids) == 1:
                raise KilnError("the corpus has a single document; give at least two so one can be held out for validation")
            is_val[0] = False

        # Tokenizer: the given one, or trained on the training split only (in corpus order).
        t = time.perf_counter()
        tok_file = work / "tokenizer.json"
        if cfg.data.tokenizer.path:
            tok = load_tokenizer(cfg.data.tokenizer.path)
            tok_file = Path(cfg.data.tokenizer.path)
            tok_file = tok_file / "tokenizer.json" if tok_file.is_dir() else tok_file
        elif tok_file.is_file():
            tok = load_tokenizer(tok_file)
        else:
            texts = _budget(_split_texts(work, jobs, is_val, want_val=False), cfg.data.tokenizer.train_bytes)
            print(f"prepare: training a {cfg.data.tokenizer.vocab_size}-token BPE on {sum(map(len, texts)) / 1e6:.1f} MB")
            tok = train_tokenizer(texts, cfg.data.tokenizer.vocab_size, length=len(texts))
            del texts
            atomic_write_text(tok_file, tok.to_str())
        timing["tokenizer"] = time.perf_counter() - t
        vocab = tok.get_vocab_size()
        dtype = token_dtype(vocab)

        t = time.perf_counter()
        tjobs = [replace(j, tokenizer=str(tok_file), dtype=dtype) for j in jobs]
        toks = ex.map(tokenize_task, tjobs, "prepare: tokenize", threaded=True)
        timing["tokenize"] = time.perf_counter() - t

    with atomic_dir(tdir) as tmp:
        shutil.copyfile(tok_file, tmp / "tokenizer.json")
        write_json(tmp / "manifest.json", manifest("tokenizer", asdict(cfg.data.tokenizer), inputs, vocab_size=vocab))
    tok_hash = sha256_file(tdir / "tokenizer.json")

    # The corpus-wide shuffle of training documents into shards; validation in corpus order.
    t = time.perf_counter()
    arrays = [np.load(work / "tokens" / f"{j.task.index:05d}.ids.npy", mmap_mode="r") for j in jobs]
    lens = np.concatenate([np.load(work / "tokens" / f"{j.task.index:05d}.lens.npy") for j in jobs])
    per_task = [r["docs"] for r in toks]
    task_of = np.repeat(np.arange(len(jobs)), per_task)
    tok_base = np.concatenate([[0], np.cumsum([r["tokens"] for r in toks])[:-1]]).astype(np.int64)
    starts = np.cumsum(lens) - lens - tok_base[task_of]
    train_idx = np.flatnonzero(~is_val)
    order = train_idx[np.random.default_rng(cfg.data.seed).permutation(len(train_idx))]
    counts = np.zeros(vocab, dtype=np.int64)
    for k, (a, b) in enumerate(zip(np.cumsum([0, *per_task[:-1]]), np.cumsum(per_task))):
        counts += np.bincount(arrays[k][np.repeat(~is_val[a:b], lens[a:b])], minlength=vocab)
    splits = {}
    val_ids = []
    with atomic_dir(ddir) as tmp:
        for split, idx in (("train", order), ("val", np.flatnonzero(is_val))):
            writer = TokenShardWriter(tmp, split, dtype, cfg.data.shard_tokens)
            for i in idx:
                ids_ = np.asarray(arrays[task_of[i]][starts[i] : starts[i] + lens[i]])
                writer.add(ids_)
                if split == "val":
                    val_ids.append(ids_)
            splits[split] = {"shards": writer.close(), "tokens": int(lens[idx].sum()), "bytes": int(doc_bytes[idx].sum()),
                             "docs": len(idx)}
        unigram_bpb = _unigram_bpb(counts, np.concatenate(val_ids), splits["val"]["bytes"])
        timing["shards"] = time.perf_counter() - t
        excluded = _write_exclusions(tmp, work, filtered, dedup, posted) if cfg.data.exclusions else None
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
            tasks=len(tasks),
            executor=ex.label,
            stage_order=["read", *[n for n, _ in entries]],
            stages=stats,
            dedup=dedup["info"],
            histograms={"bins": [float(b) for b in _bins()], "before": _sum_lists(filtered, "hist_before"),
                        "after": _sum_lists(posted, "hist_after")},
            messages=messages,
            exclusions=excluded,
            seconds={k: round(v, 2) for k, v in timing.items()},
        )
        write_json(tmp / "manifest.json", man)
    from kiln.data.report import write_prepare_report

    write_prepare_report(out, man)
    shutil.rmtree(work, ignore_errors=True)
    tr, va = splits["train"], splits["val"]
    print(
        f"prepare: {tr['docs']} train docs ({tr['tokens']:,} tokens), {va['docs']} val docs ({va['tokens']:,} tokens), "
        f"vocab {vocab}, {tr['bytes'] / max(tr['tokens'], 1):.2f} bytes/token, unigram baseline {unigram_bpb:.3f} bits/byte"
    )
    return man


def _print_skips(filtered: list[dict], per_reason: int = 3) -> list[str]:
    """Print the first few skipped-input messages of each reason and how many more there were."""
    counts: dict[str, int] = {}
    for r in filtered:
        for reason, n in r["stages"]["read"]["dropped"].items():
            counts[reason] = counts.get(reason, 0) + n
    shown: dict[str, int] = {}
    kept = []
    for r in filtered:
        for reason, line in r["messages"]:
            if shown.get(reason, 0) < per_reason:
                shown[reason] = shown.get(reason, 0) + 1
                kept.append(line)
                print(f"prepare: skipped {line}", file=sys.stderr)
    for reason, n in shown.items():
        if counts.get(reason, 0) > n:
            print(f"prepare: ... and {counts[reason] - n} more skipped [{reason}]", file=sys.stderr)
    return kept


def _bins():
    from kiln.data.tasks import LENGTH_BINS

    return LENGTH_BINS


def _sum_lists(results: list[dict], key: str) -> list[int]:
    return np.sum([r[key] for r in results], axis=0).astype(int).tolist() if results else []


def _split_texts(work: Path, jobs: list[Job], is_val: np.ndarray, want_val: bool):
    i = 0
    for j in jobs:
        for doc in load_docs(work / "post" / f"{j.task.index:05d}.docs"):
            if bool(is_val[i]) == want_val:
                yield doc.text
            i += 1


def _global_dedup(cfg: Config, work: Path, jobs: list[Job], filtered: list[dict]) -> dict:
    """Exact and MinHash dedup over the whole corpus: one keep-mask per task, counts and cluster sizes."""
    dedup = [build_stage(n, o, cfg.data) for n, o in (jobs[0].stages if jobs else []) if n in DEDUP_STAGES]
    d = work / "dedup"
    d.mkdir(exist_ok=True)
    marker = d / "dedup.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    names = [f"{j.task.index:05d}" for j in jobs]
    n_per = [r["docs"] for r in filtered]
    n = sum(n_per)
    lengths = np.concatenate([np.load(work / "filter" / f"{m}.len.npy") for m in names]) if names else np.zeros(0)
    keep = np.ones(n, dtype=bool)
    stats: dict[str, dict] = {}
    info: dict = {"docs": n}
    tracemalloc.start()
    for stage in dedup:
        t0 = time.perf_counter()
        st = StageStats(stage.name, docs_in=int(keep.sum()), bytes_in=int(lengths[keep].sum()))
        if isinstance(stage, ExactDedup):
            keys = np.concatenate([np.load(work / "filter" / f"{m}.exact.npy") for m in names])
            keys = np.ascontiguousarray(keys).view(np.dtype((np.void, 16))).ravel()
            live = np.flatnonzero(keep)
            _, first = np.unique(keys[live], return_index=True)
            is_first = np.zeros(n, dtype=bool)
            is_first[live[first]] = True
            st.dropped["exact_duplicate"] = int((keep & ~is_first).sum())
            keep &= is_first
        elif isinstance(stage, MinhashDedup):
            sigs = [np.load(work / "filter" / f"{m}.sig.npy", mmap_mode="r") for m in names]
            valid = np.concatenate([np.load(work / "filter" / f"{m}.valid.npy") for m in names]) & keep
            rows = stage.rows

            def band(b, sigs=sigs, rows=rows):
                return np.concatenate([s[:, b * rows : (b + 1) * rows] for s in sigs])

            roots = lsh_clusters(band, n, stage.bands, rows, valid, stage.seed)
            near = roots != np.arange(n)
            st.dropped["near_duplicate"] = int((keep & near).sum())
            keep &= ~near
            info["minhash"] = {"n_grams": stage.n_grams, "bands": stage.bands, "rows": rows,
                               "cluster_sizes": cluster_sizes(roots),
                               "signature_bytes": n * stage.bands * rows * 4,
                               "bytes_per_doc_clustering": rows * 4 + 40}
        st.docs_out, st.bytes_out = int(keep.sum()), int(lengths[keep].sum())
        st.seconds = time.perf_counter() - t0 + sum(r.get("key_seconds", {}).get(stage.name, 0.0) for r in filtered)
        stats[stage.name] = st.to_dict()
    info["peak_memory_bytes"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if cfg.data.max_docs and keep.sum() > cfg.data.max_docs:
        st = StageStats("max_docs", docs_in=int(keep.sum()), bytes_in=int(lengths[keep].sum()))
        cut = np.flatnonzero(keep)[cfg.data.max_docs]
        st.dropped["max_docs"] = int(keep[cut:].sum())
        keep[cut:] = False
        st.docs_out, st.bytes_out = int(keep.sum()), int(lengths[keep].sum())
        stats["max_docs"] = st.to_dict()
    removed = []
    for m, a, b in zip(names, np.cumsum([0, *n_per[:-1]]), np.cumsum(n_per)):
        save_npy(d / f"{m}.keep.npy", keep[a:b])
        if cfg.data.exclusions:
            removed.extend(int(i) for i in np.flatnonzero(~keep[a:b]) + a)
    result = {"stats": stats, "info": info, "removed": removed}
    tmp = d / ".dedup.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(marker)
    return result


def _merge_stats(filtered: list[dict], dedup_stats: dict, posted: list[dict]) -> dict:
    merged: dict[str, StageStats] = {}
    for results in (filtered, [{"stages": dedup_stats}], posted):
        for r in results:
            for name, s in r["stages"].items():
                merged.setdefault(name, StageStats(name)).merge(s)
    return {k: v.to_dict() for k, v in merged.items()}


def _write_exclusions(directory: Path, work: Path, filtered: list[dict], dedup: dict, posted: list[dict]) -> int:
    """Every dropped document's id, stage and reason, one JSON object per line."""
    lines = [json.dumps({"id": i, "stage": s, "reason": r}) for res in filtered for i, s, r in res["excluded"]]
    if dedup["removed"]:
        ids = [doc.id for res in filtered for doc in load_docs(work / "filter" / f"{res['task']}.docs")]
        lines += [json.dumps({"id": ids[i], "stage": "dedup", "reason": "duplicate"}) for i in dedup["removed"]]
    lines += [json.dumps({"id": i, "stage": s, "reason": r}) for res in posted for i, s, r in res["excluded"]]
    (directory / "exclusions.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def _budget(texts, max_bytes: int) -> list[str]:
    out, n = [], 0
    for t in texts:
        if max_bytes and n >= max_bytes:
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
