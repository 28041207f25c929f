"""The global steps of `kiln prepare` as tasks (README "At scale"): sharded exact and MinHash dedup make the
single-process clustering's decisions for any bucket count, the shuffle is a permutation of the corpus that
no executor or rerun changes, a prepare killed in the middle of the bucket step resumes to the same bytes,
and the driver's memory per step reaches the manifest and the report."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_data_helpers import prose, write_jsonl
from test_data_pipeline import shard_bytes, web_inputs

from conftest import kiln
from kiln.config import DataConfig, ExecutorConfig
from kiln.data.dedup import UnionFind, cluster_sizes, lsh_clusters, pair_components
from kiln.data.executor import Executor
from kiln.data.meter import StepMeter
from kiln.data.sharded_dedup import global_dedup
from kiln.data.shards import TokenLoader, TokenShardWriter
from kiln.data.shuffle import write_shards
from kiln.data.sources import input_files, plan_tasks
from kiln.data.stages import PRESETS, build_stage, stage_entries
from kiln.data.tasks import Job, filter_task

DEDUP = ["exact_dedup", "minhash_dedup"]


def near_copy(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, len(words) // 60)):
        words[i] = "changed"
    return " ".join(words)


def planted_corpus(d: Path, files: int = 5, per_file: int = 16, seed: int = 0) -> Path:
    """Prose documents over several files, with exact copies (some re-spaced), near copies, chains of
    near copies (a copy of a copy) and documents too short to have shingles."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    docs = [prose(seed * 1000 + i, 2) for i in range(files * per_file)]
    for k in range(files * per_file // 4):
        src = docs[rng.randrange(len(docs))]
        kind = k % 4
        if kind == 3:
            first = near_copy(src, rng)
            copies = [first, near_copy(first, rng)]
        else:
            copies = [[src, src.replace(". ", ".   "), near_copy(src, rng)][kind]]
        for c in copies:
            docs.insert(rng.randrange(len(docs) + 1), c)
    docs += ["Tiny words only.", "Tiny words only."]
    n = len(docs) // files + 1
    for f in range(files):
        write_jsonl(d / f"part{f}.jsonl", [{"text": t, "id": f"d{f * n + i}"} for i, t in enumerate(docs[f * n:(f + 1) * n])])
    return d


def filtered_work(src: Path, work: Path, stages: list, html: bool = False, **data) -> tuple[DataConfig, list, list]:
    """The per-task filter step of a prepare: documents, exact keys and MinHash signatures under `work`."""
    cfg = DataConfig(input=str(src), stages=stages, **{"min_chars": 0, **data})
    entries = stage_entries(cfg, input_files(cfg.input), html)
    jobs = [Job(t, cfg, entries, str(work)) for t in plan_tasks(cfg.input, cfg.reader, 1 << 20)]
    return cfg, jobs, [filter_task(j) for j in jobs]


def reference_keep(cfg: DataConfig, work: Path, jobs: list) -> tuple[np.ndarray, dict]:
    """Today's single-process decisions: the whole corpus's keys in memory, np.unique for exact
    first occurrences, `lsh_clusters` (union-find one band at a time) for MinHash."""
    names = [f"{j.task.index:05d}" for j in jobs]
    n = sum(len(np.load(work / "filter" / f"{m}.len.npy")) for m in names)
    keep, sizes = np.ones(n, dtype=bool), {}
    for name, opts in jobs[0].stages:
        if name == "exact_dedup":
            keys = np.concatenate([np.load(work / "filter" / f"{m}.exact.npy") for m in names])
            keys = np.ascontiguousarray(keys).view(np.dtype((np.void, 16))).ravel()
            live = np.flatnonzero(keep)
            first = np.zeros(n, dtype=bool)
            first[live[np.unique(keys[live], return_index=True)[1]]] = True
            keep &= first
        elif name == "minhash_dedup":
            st = build_stage(name, opts, cfg)
            sig = np.concatenate([np.load(work / "filter" / f"{m}.sig.npy") for m in names])
            valid = np.concatenate([np.load(work / "filter" / f"{m}.valid.npy") for m in names])
            roots = lsh_clusters(lambda b, sig=sig, r=st.rows: sig[:, b * r:(b + 1) * r], n, st.bands, st.rows,
                                 valid & keep, st.seed)
            sizes = cluster_sizes(roots)
            keep &= roots == np.arange(n)
    return keep, sizes


def sharded_keep(cfg: DataConfig, work: Path, jobs: list, filtered: list, workers: int = 1) -> tuple[np.ndarray, dict]:
    shutil.rmtree(work / "dedup", ignore_errors=True)
    with Executor(ExecutorConfig(workers=workers)) as ex:
        result = global_dedup(ex, cfg, work, jobs, filtered, StepMeter())
    keep = np.concatenate([np.load(work / "dedup" / "mask" / f"{j.task.index:05d}.keep.npy") for j in jobs])
    return keep, result


@pytest.mark.parametrize("order", [DEDUP, DEDUP[::-1]])
def test_sharded_dedup_decides_as_the_single_process_clustering(tmp_path, order):
    src, work = planted_corpus(tmp_path / "in"), tmp_path / "work"
    cfg, jobs, filtered = filtered_work(src, work, order)
    want, sizes = reference_keep(cfg, work, jobs)
    assert len(jobs) == 5 and (~want).sum() >= 15  # copies of both kinds are there to find
    assert max(sizes) >= 3  # a chain of near copies: one cluster
    for bucket_bytes, workers in ((1 << 30, 1), (700, 2)):  # one bucket; then dozens, on two processes
        cfg.dedup_bucket_bytes = bucket_bytes
        got, result = sharded_keep(cfg, work, jobs, filtered, workers)
        assert np.array_equal(got, want), bucket_bytes
        buckets = result["info"]["buckets"]
        assert (buckets["minhash_dedup"] == 1) == (bucket_bytes == 1 << 30) and buckets["exact_dedup"] >= 1
        if order[0] == "exact_dedup":  # the reference's clusters hold live documents only in this order
            assert result["info"]["minhash"]["cluster_sizes"] == {str(k): v for k, v in sizes.items()}
        dropped = sum(n for st in result["stats"].values() for n in st["dropped"].values())
        assert dropped == (~want).sum() and result["limits"] == [-1] * len(jobs)


def test_existing_corpora_get_identical_keep_masks(tmp_path, corpus_dir):
    """The web test corpus (WARC + JSONL + Parquet, an exact and a near copy) and the stdlib slice."""
    web = web_inputs(tmp_path / "web", n=12)
    for src, stages, html in ((web, PRESETS["web"], True), (corpus_dir, PRESETS["code"], False)):
        work = tmp_path / f"work-{src.name}"
        cfg, jobs, filtered = filtered_work(src, work, stages, html, min_chars=64)
        want, _ = reference_keep(cfg, work, jobs)
        cfg.dedup_bucket_bytes = 2000
        got, result = sharded_keep(cfg, work, jobs, filtered)
        assert np.array_equal(got, want) and result["info"]["buckets"]["minhash_dedup"] > 1
        if src == web:
            assert (~want).sum() == 2  # the exact copy of page 0 and the near copy of j0


def test_max_docs_keeps_the_first_documents_across_tasks(tmp_path):
    src, work = planted_corpus(tmp_path / "in"), tmp_path / "work"
    cfg, jobs, filtered = filtered_work(src, work, DEDUP, exclusions=True)
    want, _ = reference_keep(cfg, work, jobs)
    cfg.max_docs = int(want.sum()) // 2
    got, result = sharded_keep(cfg, work, jobs, filtered)
    assert np.array_equal(got, want)  # the masks are the dedup's; the cut is applied by post_task
    per_task = np.cumsum([0, *(r["docs"] for r in filtered)])
    kept_by_limit = []
    for t, limit in enumerate(result["limits"]):
        idx = np.flatnonzero(got[per_task[t]:per_task[t + 1]]) + per_task[t]
        kept_by_limit += list(idx if limit < 0 else idx[:limit])
    assert kept_by_limit == list(np.flatnonzero(want)[:cfg.max_docs])
    st = result["stats"]["max_docs"]
    assert (st["docs_in"], st["docs_out"], st["dropped"]) == (want.sum(), cfg.max_docs,
                                                              {"max_docs": int(want.sum()) - cfg.max_docs})
    reasons = Counter(r for rows in result["removed"].values() for _, _, r in rows)
    assert reasons["max_docs"] == want.sum() - cfg.max_docs
    assert reasons["exact_duplicate"] + reasons["near_duplicate"] == (~want).sum()


def test_equal_keys_pair_only_within_a_band_and_a_full_hash(tmp_path):
    """64-bit keys that collide across bands (or exact hashes equal in one half) must not make duplicates."""
    from kiln.data.sharded_dedup import EXACT_RECORD, MINHASH_RECORD, DedupJob, bucket_task

    def run(stage, dtype, rows):
        part = tmp_path / "dedup" / stage / "part"
        part.mkdir(parents=True)
        np.save(part / "00000.rec.npy", np.array(rows, dtype=dtype))
        np.save(part / "00000.off.npy", np.array([0, len(rows)], dtype=np.int64))
        bucket_task(DedupJob(str(tmp_path), 0, stage, buckets=1, tasks=1))
        return tmp_path / "dedup" / stage / "bucket"

    # (band, key, doc): band 0 pairs 9 with 5; band 1 pairs 7 with 3; key 11 also in band 1 (doc 7) and 2 (doc 1)
    out = run("minhash_dedup", MINHASH_RECORD, [(0, 11, 9), (1, 11, 7), (0, 11, 5), (1, 12, 7), (1, 12, 3), (2, 11, 1)])
    assert np.load(out / "00000.pairs.npy").tolist() == [[3, 7], [5, 9]]
    # (k0, k1, doc): 4 and 2 share the whole hash; 6 shares only its first half
    out = run("exact_dedup", EXACT_RECORD, [(1, 2, 4), (1, 3, 6), (1, 2, 2), (5, 5, 0)])
    assert np.load(out / "00000.removed.npy").tolist() == [4]


def test_pair_components_are_union_find_clusters():
    rng = np.random.default_rng(0)
    docs = rng.choice(10_000, size=300, replace=False)
    pairs = np.sort(docs[rng.integers(0, 300, size=(250, 2))], axis=1)
    pairs = np.concatenate([pairs, [[docs[0], docs[1]], [docs[1], docs[2]], [docs[2], docs[3]]]])  # a chain
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    uf = UnionFind(10_000)
    for a, b in pairs:
        uf.union(int(a), int(b))
    members, roots = pair_components(pairs)
    assert members.tolist() == sorted(set(pairs.ravel().tolist()))
    assert roots.tolist() == [uf.find(int(m)) for m in members]


def synthetic_tokens(work: Path, tasks: int = 5, per_task: int = 40, vocab: int = 300, seed: int = 0) -> list[dict]:
    """What tokenize_task leaves for the shuffle: each document's tokens are BOS then its own number in
    base (vocab - 1) digits plus filler, so every document can be told apart in the shards."""
    rng = np.random.default_rng(seed)
    (work / "tokens").mkdir(parents=True)
    (work / "post").mkdir()
    (work / "split.json").write_text("{}")
    results, k = [], 0
    for t in range(tasks):
        lens, parts = [], []
        for _ in range(per_task):
            n = int(rng.integers(4, 60))
            parts.append(np.concatenate([[0], [1 + k // (vocab - 1), 1 + k % (vocab - 1)], rng.integers(1, vocab, n)]))
            lens.append(len(parts[-1]))
            k += 1
        val = rng.random(per_task) < 0.1
        np.save(work / "tokens" / f"{t:05d}.ids.npy", np.concatenate(parts).astype("uint16"))
        np.save(work / "tokens" / f"{t:05d}.lens.npy", np.asarray(lens, dtype=np.int64))
        np.save(work / "post" / f"{t:05d}.val.npy", val)
        np.save(work / "post" / f"{t:05d}.bytes.npy", np.asarray(lens, dtype=np.int64) * 3)
        lens = np.asarray(lens)
        results.append({"docs": per_task, "tokens": int(lens.sum()), "val_docs": int(val.sum()),
                        "val_tokens": int(lens[val].sum())})
    return results


def read_docs(directory: Path, split: str, splits: dict) -> list[tuple]:
    docs = []
    for s in splits[split]["shards"]:
        tokens = np.fromfile(directory / s["file"], dtype="uint16")
        starts = np.load(directory / s["file"].replace(".bin", ".idx.npy"))
        assert len(starts) == s["docs"] and len(tokens) == s["tokens"]
        docs += [tuple(d.tolist()) for d in np.split(tokens, starts[1:])]
    return docs


def shuffled(work: Path, out: Path, toks: list[dict], workers: int = 1, **data) -> tuple[dict, float]:
    out.mkdir()
    with Executor(ExecutorConfig(workers=workers)) as ex:
        return write_shards(ex, DataConfig(**data), work, toks, out, "uint16", 300)


def test_sharded_shuffle_is_a_deterministic_permutation_of_the_corpus(tmp_path):
    base = tmp_path / "base"
    toks = synthetic_tokens(base)
    corpus, is_val = [], []
    for t in range(len(toks)):
        ids, lens = np.load(base / "tokens" / f"{t:05d}.ids.npy"), np.load(base / "tokens" / f"{t:05d}.lens.npy")
        corpus += [tuple(d.tolist()) for d in np.split(ids, np.cumsum(lens)[:-1])]
        is_val += np.load(base / "post" / f"{t:05d}.val.npy").tolist()
    train = [d for d, v in zip(corpus, is_val) if not v]
    val = [d for d, v in zip(corpus, is_val) if v]
    total = sum(map(len, train))
    for name in ("one", "many", "two", "other"):
        shutil.copytree(base, tmp_path / f"work-{name}")
    opts = {"shard_tokens": 400, "seed": 3}

    s1, bpb1 = shuffled(tmp_path / "work-one", tmp_path / "one", toks, **opts)
    # One bucket: today's whole-corpus permutation, written in shards of at most shard_tokens.
    assert read_docs(tmp_path / "one", "train", s1) == [train[i] for i in np.random.default_rng(3).permutation(len(train))]
    assert read_docs(tmp_path / "one", "val", s1) == val and s1["val"]["docs"] == len(val)
    opts["shuffle_bucket_tokens"] = total // 6
    s2, bpb2 = shuffled(tmp_path / "work-many", tmp_path / "many", toks, **opts)
    got = read_docs(tmp_path / "many", "train", s2)
    assert sorted(got) == sorted(train) and got != read_docs(tmp_path / "one", "train", s1)  # each once, reordered
    buckets = sorted((tmp_path / "work-many" / "shuffle" / "train").glob("*.json"))
    assert len(buckets) == 7 and all(s["tokens"] <= 400 for s in s2["train"]["shards"])
    assert read_docs(tmp_path / "many", "val", s2) == val and bpb1 == bpb2
    assert (s2["train"]["tokens"], s2["train"]["bytes"]) == (total, 3 * total)
    # The same bytes from two worker processes, and from a rerun that finds some buckets done.
    s3, _ = shuffled(tmp_path / "work-two", tmp_path / "two", toks, workers=2, **opts)
    assert s3 == s2 and shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "many")
    for marker in buckets[::2]:
        shutil.rmtree(marker.with_suffix(""))
        marker.unlink()
    s4, _ = shuffled(tmp_path / "work-many", tmp_path / "again", toks, **opts)
    assert s4 == s2 and shard_bytes(tmp_path / "again") == shard_bytes(tmp_path / "many")
    s5, _ = shuffled(tmp_path / "work-other", tmp_path / "other", toks, **{**opts, "seed": 4})
    other = read_docs(tmp_path / "other", "train", s5)
    assert other != got and sorted(other) == sorted(train)


def test_shard_cuts_are_the_cuts_of_the_one_by_one_writer(tmp_path):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 120, size=200)
    lengths[[5, 50]] = 500  # longer than a shard: a shard of its own
    w = TokenShardWriter(tmp_path, "t", "uint16", 300)
    for n in lengths:
        w.add(np.zeros(n, dtype=np.uint16))
    docs = np.cumsum([0, *(s["docs"] for s in w.close())])
    assert TokenShardWriter.bounds(lengths, 300).tolist() == docs.tolist()


def prepare_args(src: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", f"out={out}", f"data.input={src}", "data.tokenizer.vocab_size=300", "data.shard_tokens=3000",
            "data.shuffle_bucket_tokens=8000", "data.stages=[clean, length, exact_dedup, minhash_dedup]",
            "data.min_chars=0", *extra]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted prepare (one dedup bucket, several shuffle buckets) of a planted corpus."""
    root = tmp_path_factory.mktemp("scale")
    src = planted_corpus(root / "in", files=6, per_file=20)
    assert kiln(*prepare_args(src, root / "ref", "data.executor.workers=1")) == 0
    return src, root / "ref"


def test_prepare_killed_in_the_bucket_step_resumes_to_identical_output(tmp_path, reference_run):
    src, ref = reference_run
    out = tmp_path / "run"
    many = ["data.dedup_bucket_bytes=400"]  # about 70 MinHash buckets: a window to kill in
    cmd = [sys.executable, "-c", "import sys; from kiln.cli import main; sys.exit(main(sys.argv[1:]))",
           *prepare_args(src, out, "data.executor.workers=1", *many)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    markers = out / "data.work" / "dedup" / "minhash_dedup" / "bucket"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 3 and proc.poll() is None:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(markers.glob("*.json")))
    assert done >= 3 and not (out / "data" / "manifest.json").exists()
    assert not (out / "data.work" / "dedup" / "minhash_dedup" / "cluster.json").exists()
    assert kiln(*prepare_args(src, out, "data.executor.workers=2", *many)) == 0
    man, want = (json.loads((d / "data" / "manifest.json").read_text()) for d in (out, ref))
    assert done < man["dedup"]["buckets"]["minhash_dedup"] and want["dedup"]["buckets"]["minhash_dedup"] == 1
    # Other bucket counts, another executor, a kill: the same documents, tokens and shards.
    assert shard_bytes(out / "data") == shard_bytes(ref / "data") and len(want["splits"]["train"]["shards"]) > 2
    assert man["stages"]["exact_dedup"]["dropped"] == want["stages"]["exact_dedup"]["dropped"] != {}
    assert man["dedup"]["minhash"]["cluster_sizes"] == want["dedup"]["minhash"]["cluster_sizes"] != {}
    assert TokenLoader(out / "data", "train", batch_size=2, seq_len=32).next_batch()["input_ids"].shape == (2, 32)


def test_driver_memory_per_step_in_the_manifest_and_report(reference_run):
    _, ref = reference_run
    man = json.loads((ref / "data" / "manifest.json").read_text())
    steps = man["driver"]["steps"]
    assert {"read_filter", "dedup", "dedup: exact_dedup", "dedup: minhash_dedup", "dedup: mask", "post",
            "tokenizer", "tokenize", "shards"} <= set(steps)
    for s in steps.values():
        assert 10 < s["rss_start_mb"] <= s["rss_peak_mb"] < 4000 and s["seconds"] >= 0
    if sys.platform == "linux":
        assert "VmHWM" in man["driver"]["method"]
    report = (ref / "prepare_report.md").read_text()
    assert "## Driver memory per step" in report and man["driver"]["method"] in report
    assert f"| dedup: minhash_dedup | {steps['dedup: minhash_dedup']['seconds']:.2f} |" in report


def test_bucket_sizes_out_of_range_are_one_line_errors(tmp_path, capsys):
    for key in ("data.dedup_bucket_bytes=0", "data.shuffle_bucket_tokens=-1"):
        assert kiln("prepare", f"out={tmp_path}", key) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key.split("=")[0] in err[0] and "≥ 1" in err[0], err
