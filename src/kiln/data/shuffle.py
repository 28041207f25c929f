"""The corpus-wide shuffle into token shards, as tasks: no process holds the corpus's token ids.

Training documents, numbered in corpus order, each go to a bucket drawn from (`data.seed`, their
number) by a counter-based hash. A scatter task per input task writes where its training
documents' tokens are (offset, length, bytes), sorted by bucket; a bucket task per bucket
gathers its documents in corpus order, permutes them with a generator seeded by (`data.seed`,
bucket) and writes them as shards of at most `data.shard_tokens` tokens, holding one shard at a
time. A uniform bucket per document followed by a uniform permutation inside each bucket is a
uniform permutation of the whole corpus, and with one bucket (up to
`data.shuffle_bucket_tokens` training tokens) it is exactly `default_rng(seed).permutation`
of the training documents. Validation documents stay in corpus order: a val task writes the
documents of a run of consecutive input tasks.

The number of buckets follows from the data and the config alone, so the shards are
byte-identical whatever the executor, and a killed run redoes only the tasks without a marker.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.data.dedup import mix64
from kiln.data.shards import TokenShardWriter
from kiln.data.tasks import val_mask
from kiln.runs import atomic_dir, atomic_write

SCATTER_RECORD = np.dtype([("start", "<i8"), ("len", "<i8"), ("bytes", "<i8")])
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class ShuffleJob:
    work: str
    kind: str  # "scatter" (an input task), "train" (a bucket) or "val" (a run of input tasks)
    index: int
    buckets: int  # training buckets
    tasks: int  # input tasks
    seed: int
    first: int = 0  # scatter: number of the task's first training document; val: first input task
    last: int = 0  # val: one past the last input task
    shard_tokens: int = 0
    dtype: str = "uint16"
    vocab: int = 0


def bucket_of(numbers: np.ndarray, seed: int, buckets: int) -> np.ndarray:
    """The bucket of the training documents numbered `numbers`: a splitmix64 stream seeded by `seed`, at those counters."""
    state = mix64(np.asarray([seed], dtype=np.uint64)) + (numbers.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    return (mix64(state) % np.uint64(buckets)).astype(np.int64)


def _done(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _finish(marker: Path, result: dict) -> dict:
    """Write a task's completion marker; the result as a rerun reads it back (JSON: string keys)."""
    text = json.dumps(result)
    atomic_write(marker, lambda f: f.write(text.encode()))
    return json.loads(text)


def _save(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr))


def scatter_task(job: ShuffleJob) -> dict:
    """Where one input task's training documents go: (offset, length, bytes) records sorted by bucket."""
    d = Path(job.work) / "shuffle" / "scatter"
    name = f"{job.index:05d}"
    if (done := _done(d / f"{name}.json")) is not None:
        return done
    work = Path(job.work)
    lens = np.load(work / "tokens" / f"{name}.lens.npy")
    nbytes = np.load(work / "post" / f"{name}.bytes.npy")
    train = np.flatnonzero(~val_mask(work, name))
    bucket = bucket_of(job.first + np.arange(len(train)), job.seed, job.buckets)
    order = np.argsort(bucket, kind="stable")
    rec = np.empty(len(train), SCATTER_RECORD)
    rec["start"] = (np.cumsum(lens) - lens)[train][order]
    rec["len"], rec["bytes"] = lens[train][order], nbytes[train][order]
    _save(d / f"{name}.rec.npy", rec)
    _save(d / f"{name}.off.npy", np.searchsorted(bucket[order], np.arange(job.buckets + 1)).astype(np.int64))
    return _finish(d / f"{name}.json", {"docs": len(train)})


def _ids(work: Path, task: int) -> np.ndarray:
    # A plain view of the memory map: slicing it per document is several times faster than a memmap's.
    return np.load(work / "tokens" / f"{task:05d}.ids.npy", mmap_mode="r").view(np.ndarray)


def _gather(work: Path, src: np.ndarray, start: np.ndarray, length: np.ndarray, dtype: str) -> np.ndarray:
    """The tokens of documents (input task, offset, length), in the given order, one task's file at a time."""
    dst = np.cumsum(length) - length
    out = np.empty(int(length.sum()), dtype=dtype)
    order = np.argsort(src, kind="stable")
    cuts = np.flatnonzero(np.diff(src[order])) + 1
    for group in np.split(order, cuts):
        ids = _ids(work, int(src[group[0]]))
        for j in group.tolist():
            out[dst[j] : dst[j] + length[j]] = ids[start[j] : start[j] + length[j]]
    return out


def _train_bucket(job: ShuffleJob, tmp: Path) -> dict:
    work = Path(job.work)
    scatter = work / "shuffle" / "scatter"
    recs, srcs = [], []
    for t in range(job.tasks):
        lo, hi = np.load(scatter / f"{t:05d}.off.npy", mmap_mode="r")[job.index : job.index + 2]  # one page
        if hi > lo:
            recs.append(np.asarray(np.load(scatter / f"{t:05d}.rec.npy", mmap_mode="r")[lo:hi]))
            srcs.append(np.full(hi - lo, t, dtype=np.int64))
    rec = np.concatenate(recs) if recs else np.zeros(0, SCATTER_RECORD)
    src = np.concatenate(srcs) if srcs else np.zeros(0, np.int64)
    perm = np.random.default_rng([job.seed, job.index]).permutation(len(rec))
    rec, src = rec[perm], src[perm]
    writer = TokenShardWriter(tmp, "train", job.dtype, job.shard_tokens)
    counts = np.zeros(job.vocab, dtype=np.int64)
    cuts = TokenShardWriter.bounds(rec["len"], job.shard_tokens)
    for a, b in zip(cuts[:-1], cuts[1:]):
        tokens = _gather(work, src[a:b], rec["start"][a:b], rec["len"][a:b], job.dtype)
        writer.add_shard(tokens, np.cumsum(rec["len"][a:b]) - rec["len"][a:b])
        counts += np.bincount(tokens, minlength=job.vocab)
    np.save(tmp / "counts.npy", counts)
    return {"shards": writer.close(), "docs": len(rec), "tokens": int(rec["len"].sum()),
            "bytes": int(rec["bytes"].sum())}


def _val_run(job: ShuffleJob, tmp: Path) -> dict:
    work = Path(job.work)
    writer = TokenShardWriter(tmp, "val", job.dtype, job.shard_tokens)
    counts = np.zeros(job.vocab, dtype=np.int64)
    docs = tokens = nbytes = 0
    for t in range(job.first, job.last):
        name = f"{t:05d}"
        val = val_mask(work, name)
        if not val.any():
            continue
        ids, lens = _ids(work, t), np.load(work / "tokens" / f"{name}.lens.npy")
        starts = np.cumsum(lens) - lens
        for i in np.flatnonzero(val).tolist():
            writer.add(ids[starts[i] : starts[i] + lens[i]])
        counts += np.bincount(ids[np.repeat(val, lens)], minlength=job.vocab)
        docs, tokens = docs + int(val.sum()), tokens + int(lens[val].sum())
        nbytes += int(np.load(work / "post" / f"{name}.bytes.npy")[val].sum())
    np.save(tmp / "counts.npy", counts)
    return {"shards": writer.close(), "docs": docs, "tokens": tokens, "bytes": nbytes}


def shard_task(job: ShuffleJob) -> dict:
    """One training bucket, or one run of validation documents, written as shards under the work directory."""
    out = Path(job.work) / "shuffle" / job.kind / f"{job.index:05d}"
    marker = out.with_suffix(".json")
    if (done := _done(marker)) is not None:
        return done
    with atomic_dir(out) as tmp:
        result = _train_bucket(job, tmp) if job.kind == "train" else _val_run(job, tmp)
    return _finish(marker, result)


def _val_runs(toks: list[dict], target: int) -> list[tuple[int, int]]:
    """Consecutive input tasks grouped into runs of about `target` validation tokens (at least one run)."""
    runs, first, n = [], 0, 0
    for t, r in enumerate(toks):
        n += r["val_tokens"]
        if n >= target:
            runs.append((first, t + 1))
            first, n = t + 1, 0
    if first < len(toks) or not runs:
        runs.append((first, len(toks)))
    return runs


def write_shards(ex, data, work: Path, toks: list[dict], directory: Path, dtype: str, vocab: int) -> tuple[dict, float]:
    """The shuffled training shards and the validation shards, as tasks on `ex`, linked into `directory`:
    the manifest's `splits` and the unigram baseline (bits per byte of validation under the training
    split's token frequencies, add-one)."""
    train_docs = [r["docs"] - r["val_docs"] for r in toks]
    train_tokens = sum(r["tokens"] - r["val_tokens"] for r in toks)
    buckets = max(1, math.ceil(train_tokens / data.shuffle_bucket_tokens))
    first = np.concatenate([[0], np.cumsum(train_docs)[:-1]]).astype(int).tolist()
    common = dict(work=str(work), buckets=buckets, tasks=len(toks), seed=data.seed, shard_tokens=data.shard_tokens,
                  dtype=dtype, vocab=vocab)
    ex.map(scatter_task, [ShuffleJob(kind="scatter", index=t, first=first[t], **common) for t in range(len(toks))],
           "prepare: shuffle (scatter)")
    runs = _val_runs(toks, data.shuffle_bucket_tokens)
    jobs = [ShuffleJob(kind="train", index=b, **common) for b in range(buckets)]
    jobs += [ShuffleJob(kind="val", index=v, first=a, last=b, **common) for v, (a, b) in enumerate(runs)]
    results = ex.map(shard_task, jobs, "prepare: shuffle (shards)")
    splits = {}
    counts = {}
    for split in ("train", "val"):
        shards = []
        split_counts = np.zeros(vocab, dtype=np.int64)
        mine = [(j, r) for j, r in zip(jobs, results) if j.kind == split]
        for j, r in mine:
            src = work / "shuffle" / split / f"{j.index:05d}"
            for s in r["shards"]:
                name = f"{split}_{len(shards):05d}"
                _link(src / s["file"], directory / f"{name}.bin")
                _link(src / s["file"].replace(".bin", ".idx.npy"), directory / f"{name}.idx.npy")
                shards.append({**s, "file": f"{name}.bin"})
            split_counts += np.load(src / "counts.npy")
        counts[split] = split_counts
        splits[split] = {"shards": shards, "tokens": sum(r["tokens"] for _, r in mine),
                         "bytes": sum(r["bytes"] for _, r in mine), "docs": sum(r["docs"] for _, r in mine)}
    p = (counts["train"] + 1) / (counts["train"].sum() + vocab)
    bits = -(counts["val"] * np.log2(p)).sum()
    bpb = float(bits / max(splits["val"]["bytes"], 1)) if math.isfinite(bits) else float("nan")
    return splits, bpb


def _link(src: Path, dst: Path) -> None:
    """A second name for a shard the work directory holds (a copy where hard links are not possible)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
