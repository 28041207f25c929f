"""Global dedup as tasks over buckets on disk: no process holds per-document arrays for the corpus.

datatrove's shape, on kiln's executors (in-process, local processes, Ray). For each dedup stage,
in the recipe's order:

1. partition, a task per input task: the keys of the task's live documents (not removed by an
   earlier dedup stage) as records (key, global document index), sorted by bucket (a slice of
   the key space) into one file, with the bucket offsets beside it. Exact dedup: the 16-byte
   text hash; MinHash: a (band, band key) record per band, for documents with shingles.
2. bucket, a task per bucket: the bucket's slice of every partition file, sorted by key, then
   document. Exact dedup: every record after the first of its key is a duplicate; MinHash: each
   group of equal (band, key) gives pairs (the group's first document, each other one).
3. cluster (MinHash), in the driver: connected components of the pairs; every document but the
   first of its component is removed. Its memory follows the documents that have a near
   duplicate, not the corpus.
4. mask, a task per input task, after the last stage: the task's keep-mask and counts.

A document's global index is its corpus position (input task, then place in the task), so "the
first" never depends on the executor or the bucket count, and the decisions are those of the
single-process clustering (`kiln.data.dedup.lsh_clusters`). Removals are sorted arrays of global
indices; a task reads its own range by binary search. Every task leaves a completion marker, so
a killed run redoes only the missing tasks.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.data.dedup import MinhashDedup, band_keys, band_multipliers, pair_components
from kiln.data.document import StageStats
from kiln.data.stages import DEDUP_STAGES, build_stage
from kiln.runs import atomic_write

EXACT_RECORD = np.dtype([("k0", "<u8"), ("k1", "<u8"), ("doc", "<i8")])
MINHASH_RECORD = np.dtype([("band", "<u4"), ("key", "<u8"), ("doc", "<i8")])
REASONS = {"exact_dedup": "exact_duplicate", "minhash_dedup": "near_duplicate"}


@dataclass
class DedupJob:
    work: str
    index: int  # the input task (partition, mask) or the bucket
    stage: str = ""  # partition, bucket: the dedup stage
    options: dict = field(default_factory=dict)  # the stage's options (MinHash: n_grams, bands, rows, seed)
    buckets: int = 1
    tasks: int = 0  # bucket: how many input tasks wrote partition files
    first_doc: int = 0  # partition, mask: global index of the task's first document
    docs: int = 0  # partition, mask: the task's documents
    earlier: list = field(default_factory=list)  # [(stage, buckets)] whose removals apply first (all of them: mask)
    exclusions: bool = False  # mask: list what each stage removed, for exclusions.jsonl


def _save(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr))


def _finish(marker: Path, result: dict) -> dict:
    """Write a task's completion marker; the result as a rerun reads it back (JSON: string keys)."""
    text = json.dumps(result)
    atomic_write(marker, lambda f: f.write(text.encode()))
    return json.loads(text)


def _done(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def stage_dir(work: str | Path, stage: str) -> Path:
    return Path(work) / "dedup" / stage


def removal_files(work: str | Path, stage: str, buckets: int) -> list[Path]:
    """The sorted global indices a stage removed: one file per bucket (exact), one file (MinHash)."""
    d = stage_dir(work, stage)
    if stage == "minhash_dedup":
        return [d / "removed.npy"]
    return [d / "bucket" / f"{b:05d}.removed.npy" for b in range(buckets)]


def removed_in(files: list[Path], lo: int, hi: int) -> np.ndarray:
    """Local indices (in [0, hi - lo)) of the documents in [lo, hi) that `files` list, sorted."""
    parts = []
    for f in files:
        arr = np.load(f, mmap_mode="r")
        i, j = np.searchsorted(arr, [lo, hi])
        if j > i:
            parts.append(np.asarray(arr[i:j]) - lo)
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _live(job: DedupJob) -> np.ndarray:
    live = np.ones(job.docs, dtype=bool)
    for stage, buckets in job.earlier:
        live[removed_in(removal_files(job.work, stage, buckets), job.first_doc, job.first_doc + job.docs)] = False
    return live


def partition_task(job: DedupJob) -> dict:
    """Step 1 for one input task and stage: its live documents' key records, by bucket."""
    d = stage_dir(job.work, job.stage) / "part"
    name = f"{job.index:05d}"
    if (done := _done(d / f"{name}.json")) is not None:
        return done
    t0 = time.perf_counter()
    filt = Path(job.work) / "filter"
    live = _live(job)
    if job.stage == "exact_dedup":
        idx = np.flatnonzero(live)
        keys = np.ascontiguousarray(np.load(filt / f"{name}.exact.npy")[idx]).view("<u8").reshape(-1, 2)
        rec = np.empty(len(idx), EXACT_RECORD)
        rec["k0"], rec["k1"], rec["doc"] = keys[:, 0], keys[:, 1], idx + job.first_doc
        bucket = rec["k0"] % np.uint64(job.buckets)
    else:
        bands, rows, seed = job.options["bands"], job.options["rows"], job.options["seed"]
        sig = np.load(filt / f"{name}.sig.npy", mmap_mode="r")
        idx = np.flatnonzero(live & np.load(filt / f"{name}.valid.npy"))
        cols = np.asarray(sig[idx])
        mult = band_multipliers(rows, seed)
        rec = np.empty((bands, len(idx)), MINHASH_RECORD)
        for band in range(bands):
            rec[band]["band"] = band
            rec[band]["key"] = band_keys(cols[:, band * rows : (band + 1) * rows], band, mult)
            rec[band]["doc"] = idx + job.first_doc
        rec = rec.ravel()
        bucket = rec["key"] % np.uint64(job.buckets)
    order = np.argsort(bucket, kind="stable")
    offsets = np.searchsorted(bucket[order], np.arange(job.buckets + 1, dtype=np.uint64)).astype(np.int64)
    _save(d / f"{name}.rec.npy", rec[order])
    _save(d / f"{name}.off.npy", offsets)
    return _finish(d / f"{name}.json", {"records": len(rec), "seconds": time.perf_counter() - t0})


def _bucket_records(job: DedupJob) -> np.ndarray:
    part = stage_dir(job.work, job.stage) / "part"
    parts = []
    for t in range(job.tasks):
        # two entries of the offsets, read through a memory map: one page, however many buckets
        lo, hi = np.load(part / f"{t:05d}.off.npy", mmap_mode="r")[job.index : job.index + 2]
        if hi > lo:
            parts.append(np.asarray(np.load(part / f"{t:05d}.rec.npy", mmap_mode="r")[lo:hi]))
    dtype = EXACT_RECORD if job.stage == "exact_dedup" else MINHASH_RECORD
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _group_first(doc: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Each record's group minimum, where a group is a run of records each `same` as the one before."""
    if not len(doc):
        return doc
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    return np.repeat(np.minimum.reduceat(doc, starts), np.diff(np.append(starts, len(doc))))


def bucket_task(job: DedupJob) -> dict:
    """Step 2 for one bucket: exact dedup's duplicates (sorted global indices), or MinHash's candidate pairs."""
    d = stage_dir(job.work, job.stage) / "bucket"
    name = f"{job.index:05d}"
    if (done := _done(d / f"{name}.json")) is not None:
        return done
    t0 = time.perf_counter()
    rec = _bucket_records(job)
    n = len(rec)
    key, tie = ("k0", "k1") if job.stage == "exact_dedup" else ("key", "band")
    # Sort by the 64-bit key alone (several times faster than by all fields; the order inside a group does
    # not matter, its first is found by minimum); equal keys that differ in the other field (odds 2**-64
    # a pair) send the bucket to the exact sort by both.
    order = np.argsort(rec[key])
    k, other_field, doc = rec[key][order], rec[tie][order], rec["doc"][order]
    same = k[1:] == k[:-1]
    if (other_field[1:][same] != other_field[:-1][same]).any():
        order = np.lexsort((rec[tie], rec[key]))
        k, other_field, doc = rec[key][order], rec[tie][order], rec["doc"][order]
        same = (k[1:] == k[:-1]) & (other_field[1:] == other_field[:-1])
    del rec, order, k, other_field  # the rest needs the documents only: a bucket task's peak is the sort's
    first = _group_first(doc, same)
    other = doc != first  # every document of a group but its first in corpus order
    if job.stage == "exact_dedup":
        removed = np.sort(doc[other])
        _save(d / f"{name}.removed.npy", removed)
        result = {"records": n, "removed": len(removed)}
    else:
        pairs = np.empty(int(other.sum()), dtype=[("a", "<i8"), ("b", "<i8")])
        pairs["a"], pairs["b"] = first[other], doc[other]
        pairs = np.unique(pairs)  # the same pair agrees on several bands
        _save(d / f"{name}.pairs.npy", pairs.view("<i8").reshape(-1, 2))
        result = {"records": n, "pairs": len(pairs)}
    return _finish(d / f"{name}.json", {**result, "seconds": time.perf_counter() - t0})


def cluster(work: Path, buckets: int) -> dict:
    """Step 3 (MinHash, in the driver): components of every bucket's pairs; all but each one's first are removed."""
    d = stage_dir(work, "minhash_dedup")
    if (done := _done(d / "cluster.json")) is not None:
        return done
    t0 = time.perf_counter()
    pairs = np.concatenate([np.load(d / "bucket" / f"{b:05d}.pairs.npy") for b in range(buckets)])
    docs, roots = pair_components(pairs) if len(pairs) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    _save(d / "removed.npy", docs[roots != docs])
    sizes = Counter(np.unique(roots, return_counts=True)[1].tolist())
    return _finish(d / "cluster.json", {"pairs": len(pairs), "docs_in_clusters": len(docs),
                                        "cluster_sizes": {int(k): int(v) for k, v in sorted(sizes.items())},
                                        "seconds": time.perf_counter() - t0})


def mask_task(job: DedupJob) -> dict:
    """Step 4 for one input task: its keep-mask after every dedup stage, and what each stage removed."""
    d = Path(job.work) / "dedup" / "mask"
    name = f"{job.index:05d}"
    if (done := _done(d / f"{name}.json")) is not None:
        return done
    lengths = np.load(Path(job.work) / "filter" / f"{name}.len.npy")
    keep = np.ones(job.docs, dtype=bool)
    stages, removed = {}, []
    for stage, buckets in job.earlier:
        gone = np.zeros(job.docs, dtype=bool)
        gone[removed_in(removal_files(job.work, stage, buckets), job.first_doc, job.first_doc + job.docs)] = True
        gone &= keep
        st = StageStats(stage, docs_in=int(keep.sum()), bytes_in=int(lengths[keep].sum()))
        keep &= ~gone
        st.docs_out, st.bytes_out = int(keep.sum()), int(lengths[keep].sum())
        if gone.any():
            st.dropped[REASONS[stage]] = int(gone.sum())
            if job.exclusions:
                removed += [[int(i), stage, REASONS[stage]] for i in np.flatnonzero(gone)]
        stages[stage] = st.to_dict()
    _save(d / f"{name}.keep.npy", keep)
    return _finish(d / f"{name}.json", {"stages": stages, "removed": sorted(removed), "kept": int(keep.sum()),
                                        "kept_bytes": int(lengths[keep].sum())})


def _bucket_plan(d: Path, stages: list, n: int, bucket_bytes: int, workers: int) -> dict[str, int]:
    """Buckets per stage: about `bucket_bytes` of key records each (a bucket task holds about 2.5 times
    that, to sort them), and at least one per worker, so no bucket task runs inside the driver. The
    decisions do not depend on it. The first run's plan is kept: a rerun on another executor resumes
    the same partition files."""
    plan_file = d / "plan.json"
    if (plan := _done(plan_file)) is not None:
        return plan
    plan = {}
    for stage in stages:
        per_doc = stage.bands * MINHASH_RECORD.itemsize if isinstance(stage, MinhashDedup) else EXACT_RECORD.itemsize
        plan[stage.name] = max(workers, math.ceil(n * per_doc / bucket_bytes), 1)
    return _finish(plan_file, plan)


def global_dedup(ex, data, work: Path, jobs: list, filtered: list[dict], meter) -> dict:
    """The dedup stages over the whole corpus as partition / bucket / cluster / mask tasks on `ex`,
    then `data.max_docs`: per-stage counts, what the report shows, and `limits` (how many of the
    documents dedup kept each task keeps: the max_docs cut; -1 = all). Keep-masks:
    `<work>/dedup/mask/NNNNN.keep.npy`."""
    d = work / "dedup"
    marker = d / "dedup.json"
    if (done := _done(marker)) is not None:
        return done
    stages = [build_stage(n, o, data) for n, o in (jobs[0].stages if jobs else []) if n in DEDUP_STAGES]
    n_per = [r["docs"] for r in filtered]
    first = np.concatenate([[0], np.cumsum(n_per)[:-1]]).astype(int).tolist() if n_per else []
    n = sum(n_per)
    info: dict = {"docs": n, "buckets": _bucket_plan(d, stages, n, data.dedup_bucket_bytes, ex.workers)}
    seconds: dict[str, float] = {}
    earlier: list = []
    for stage in stages:
        with meter.step(f"dedup: {stage.name}"):
            t0 = time.perf_counter()
            options = {"bands": stage.bands, "rows": stage.rows, "seed": stage.seed} if isinstance(
                stage, MinhashDedup) else {}
            buckets = info["buckets"][stage.name]
            parts = ex.map(partition_task, [
                DedupJob(str(work), t, stage.name, options, buckets, first_doc=first[t], docs=n_per[t],
                         earlier=list(earlier)) for t in range(len(jobs))], f"prepare: {stage.name} partition")
            done = ex.map(bucket_task, [DedupJob(str(work), b, stage.name, options, buckets, tasks=len(jobs))
                                        for b in range(buckets)], f"prepare: {stage.name} buckets")
            task_seconds = sum(r["seconds"] for r in parts + done)
            if isinstance(stage, MinhashDedup):
                clusters = cluster(work, buckets)
                task_seconds += clusters["seconds"]
                info["minhash"] = {"n_grams": stage.n_grams, "bands": stage.bands, "rows": stage.rows,
                                   "cluster_sizes": clusters["cluster_sizes"],
                                   "signature_bytes": n * stage.bands * stage.rows * 4,
                                   "record_bytes": sum(r["records"] for r in parts) * MINHASH_RECORD.itemsize,
                                   "pairs": clusters["pairs"], "docs_in_clusters": clusters["docs_in_clusters"]}
            info.setdefault("task_seconds", {})[stage.name] = round(task_seconds, 3)
            seconds[stage.name] = task_seconds + sum(r.get("key_seconds", {}).get(stage.name, 0.0) for r in filtered)
            info.setdefault("wall_seconds", {})[stage.name] = round(time.perf_counter() - t0, 3)
        earlier.append((stage.name, buckets))
    with meter.step("dedup: mask"):
        masks = ex.map(mask_task, [DedupJob(str(work), t, first_doc=first[t], docs=n_per[t], earlier=earlier,
                                            exclusions=data.exclusions) for t in range(len(jobs))],
                       "prepare: dedup masks")
    stats: dict[str, dict] = {}
    for stage in stages:
        st = StageStats(stage.name)
        for r in masks:
            st.merge(r["stages"][stage.name])
        st.seconds = seconds[stage.name]
        stats[stage.name] = st.to_dict()
    names = [f"{j.task.index:05d}" for j in jobs]
    removed = {m: r["removed"] for m, r in zip(names, masks) if data.exclusions}
    limits = [-1] * len(jobs)
    kept = sum(r["kept"] for r in masks)
    if data.max_docs and kept > data.max_docs:
        stats["max_docs"] = _max_docs(work, data, names, masks, limits, removed)
    return _finish(marker, {"stats": stats, "info": info, "removed": removed, "limits": limits})


def _max_docs(work: Path, data, names: list[str], masks: list[dict], limits: list[int], removed: dict) -> dict:
    """Keep the first `data.max_docs` documents the dedup kept: `limits` per task, and the counts."""
    st = StageStats("max_docs", docs_in=sum(r["kept"] for r in masks), bytes_in=sum(r["kept_bytes"] for r in masks))
    left = data.max_docs
    for t, (name, r) in enumerate(zip(names, masks)):
        if left >= r["kept"]:
            left -= r["kept"]
            st.bytes_out += r["kept_bytes"]
            continue
        kept_idx = np.flatnonzero(np.load(work / "dedup" / "mask" / f"{name}.keep.npy"))
        limits[t] = left
        st.bytes_out += int(np.load(work / "filter" / f"{name}.len.npy")[kept_idx[:left]].sum())
        if data.exclusions:
            removed[name] = sorted(removed[name] + [[int(i), "max_docs", "max_docs"] for i in kept_idx[left:]])
        left = 0
    st.docs_out = data.max_docs
    st.dropped["max_docs"] = st.docs_in - st.docs_out
    return st.to_dict()
