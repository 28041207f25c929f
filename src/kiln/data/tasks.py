"""The per-task steps of `kiln prepare`, run by an executor (in-process, worker processes or Ray tasks).

Each step reads its inputs from the work directory, writes its outputs under a temporary name,
and finishes by writing `NNNNN.json` (its counts): that file is the task's completion marker, so
a rerun after a crash or kill skips finished tasks and redoes only the missing ones. Steps:

1. `filter_task`: read → stages before dedup → documents + dedup keys (exact hashes, MinHash signatures)
2. the global dedup as partition / bucket / mask tasks (`kiln.data.sharded_dedup`): a keep-mask per task
3. `post_task`: apply the keep-mask → stages after dedup → final documents, their split and sizes
4. `tokenize_task`: final documents → token ids (BOS first) with HF tokenizers' batch encoding
5. the shuffle into shards as scatter / bucket tasks (`kiln.data.shuffle`)
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.config import DataConfig
from kiln.data.dedup import ExactDedup, MinhashDedup, exact_key
from kiln.data.document import BadInput, Document, StageStats, run_stages
from kiln.data.sources import Task, read_task
from kiln.data.stages import build_stage, split_at_dedup
from kiln.runs import atomic_write, sha256_file

LENGTH_BINS = np.logspace(0, 8, 33)  # document length histograms (characters), summed over tasks


@dataclass
class Job:
    task: Task
    data: DataConfig
    stages: list  # [(name, options)] resolved by the driver
    work: str
    tokenizer: str = ""  # tokenize_task: the tokenizer.json to use
    dtype: str = "uint16"
    keep_first: int = -1  # post_task: keep only the first this many documents the dedup kept (data.max_docs)


def is_validation(doc_id: str, fraction: float) -> bool:
    """Split by document id (a file's path for text inputs), so no document lands in both splits."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def val_mask(work: str | Path, name: str) -> np.ndarray:
    """Which of a task's final documents are validation: by id (`post_task`), with the driver's one
    flip (`split.json`) for a corpus where every document, or none, fell into validation."""
    val = np.load(Path(work) / "post" / f"{name}.val.npy")
    flip = json.loads((Path(work) / "split.json").read_text())
    if flip.get("task") == name:
        val[flip["doc"]] = flip["val"]
    return val


def save_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj).encode()))


def save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr))


def save_docs(path: Path, docs: list[Document]) -> None:
    atomic_write(path, lambda f: pickle.dump([(d.id, d.text, d.meta) for d in docs], f, protocol=5))


def load_docs(path: Path) -> list[Document]:
    with open(path, "rb") as f:
        return [Document(text, i, meta) for i, text, meta in pickle.load(f)]


def _step(job: Job, step: str) -> tuple[Path, str, dict | None]:
    """This task's directory and file stem for `step`, and the result its completion marker holds
    if an earlier run finished it (None otherwise)."""
    d = Path(job.work) / step
    name = f"{job.task.index:05d}"
    marker = d / f"{name}.json"
    if marker.is_file():
        try:
            return d, name, json.loads(marker.read_text())
        except json.JSONDecodeError:
            pass
    return d, name, None


_STAGE_CACHE: dict[str, list] = {}


def _stages(job: Job):
    """The job's stages, built once per worker process (blocklists and eval n-grams are loaded once)."""
    key = json.dumps([job.stages, job.data.min_chars, job.data.max_chars], sort_keys=True, default=str)
    if key not in _STAGE_CACHE:
        _STAGE_CACHE.clear()
        _STAGE_CACHE[key] = [build_stage(n, o, job.data) for n, o in job.stages]
    return split_at_dedup(_STAGE_CACHE[key])


def _stats(stats: dict[str, StageStats]) -> dict:
    return {k: v.to_dict() for k, v in stats.items()}


def _excluded(stats: dict[str, StageStats]) -> list[dict]:
    return [e for st in stats.values() for e in (st.excluded or [])]


def filter_task(job: Job) -> dict:
    """Step 1 for one task: read, run the stages before dedup, keep documents and dedup keys."""
    d, name, done = _step(job, "filter")
    if done is not None:
        return done
    pre, dedup, _ = _stages(job)
    collect = [] if job.data.exclusions else None
    read = StageStats("read", excluded=collect)
    bad = BadInput(read, strict=job.data.strict)
    stats = {"read": read}
    for s in pre:
        stats[s.name] = StageStats(s.name, excluded=[] if collect is not None else None)
    before = []

    def counted(docs):
        for doc in docs:
            read.docs_out += 1
            read.bytes_out += len(doc.text)
            before.append(len(doc.text))
            yield doc

    docs = list(run_stages(counted(read_task(job.task, job.data.reader, bad)), pre, stats))
    read.docs_in = read.docs_out + sum(read.dropped.values())
    key_seconds = {}
    for s in dedup:
        t0 = time.perf_counter()
        if isinstance(s, ExactDedup):
            keys = np.frombuffer(b"".join(exact_key(doc.text) for doc in docs), dtype=np.uint8).reshape(-1, 16)
            save_npy(d / f"{name}.exact.npy", keys)
        elif isinstance(s, MinhashDedup):
            sig, valid = s.hasher.signatures([doc.text for doc in docs])
            save_npy(d / f"{name}.sig.npy", sig)
            save_npy(d / f"{name}.valid.npy", valid)
        key_seconds[s.name] = time.perf_counter() - t0
    save_npy(d / f"{name}.len.npy", np.asarray([len(doc.text) for doc in docs], dtype=np.int64))
    save_docs(d / f"{name}.docs", docs)
    result = {
        "task": name,
        "docs": len(docs),
        "stages": _stats(stats),
        "key_seconds": key_seconds,
        "hist_before": np.histogram(before, LENGTH_BINS)[0].tolist(),
        "messages": bad.messages,
        "reported": dict(bad.reported),
        "excluded": _excluded(stats),
    }
    save_json(d / f"{name}.json", result)
    return result


def post_task(job: Job) -> dict:
    """Step 3 for one task: drop the duplicates the global step found, run the stages after dedup."""
    d, name, done = _step(job, "post")
    if done is not None:
        return done
    _, _, post = _stages(job)
    docs = load_docs(Path(job.work) / "filter" / f"{name}.docs")
    keep = np.load(Path(job.work) / "dedup" / "mask" / f"{name}.keep.npy")
    if job.keep_first >= 0:
        keep[np.flatnonzero(keep)[job.keep_first :]] = False
    docs = [doc for doc, k in zip(docs, keep) if k]
    stats = {s.name: StageStats(s.name, excluded=[] if job.data.exclusions else None) for s in post}
    docs = list(run_stages(docs, post, stats))
    save_docs(d / f"{name}.docs", docs)
    val = np.asarray([is_validation(doc.id, job.data.val_fraction) for doc in docs], dtype=bool)
    save_npy(d / f"{name}.val.npy", val)
    save_npy(d / f"{name}.bytes.npy", np.asarray([len(doc.text.encode("utf-8", "surrogatepass")) for doc in docs],
                                                 dtype=np.int64))
    result = {
        "task": name,
        "docs": len(docs),
        "val": int(val.sum()),
        "stages": _stats(stats),
        "hist_after": np.histogram([len(doc.text) for doc in docs], LENGTH_BINS)[0].tolist(),
        "excluded": _excluded(stats),
    }
    save_json(d / f"{name}.json", result)
    return result


_TOKENIZER: dict[str, object] = {}


def tokenize_task(job: Job, batch: int = 4096) -> dict:
    """Step 4 for one task: token ids of every final document, BOS first (for a tokenizer without
    one, the EOS that separates documents: `ChatFormat.document_start`), concatenated, with lengths."""
    from kiln.data.chat import read_format
    from kiln.data.tokenizer import load_tokenizer

    d, name, done = _step(job, "tokens")
    if done is not None:
        return done
    key = sha256_file(job.tokenizer)  # not the path: a rerun in this process may train another one there
    if key not in _TOKENIZER:
        _TOKENIZER.clear()
        tok = load_tokenizer(job.tokenizer)
        _TOKENIZER[key] = (tok, read_format(job.tokenizer, tok).document_start)
    tok, bos = _TOKENIZER[key]
    texts = [doc.text for doc in load_docs(Path(job.work) / "post" / f"{name}.docs")]
    parts, lens = [], []
    for i in range(0, len(texts), batch):
        # The fast variant skips computing character offsets, which shards never use.
        for enc in tok.encode_batch_fast(texts[i : i + batch], add_special_tokens=False):
            doc_ids = enc.ids
            parts.append(np.asarray([bos, *doc_ids], dtype=job.dtype))
            lens.append(len(doc_ids) + 1)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=job.dtype)
    lens = np.asarray(lens, dtype=np.int64)
    save_npy(d / f"{name}.ids.npy", ids)
    save_npy(d / f"{name}.lens.npy", lens)
    val = val_mask(job.work, name)
    result = {"task": name, "docs": len(lens), "tokens": int(len(ids)), "val_docs": int(val.sum()),
              "val_tokens": int(lens[val].sum())}
    save_json(d / f"{name}.json", result)
    return result
