"""The global dedup at growing corpus sizes: the driver's peak memory and wall time of kiln's sharded
dedup (partition / bucket / cluster / mask tasks) beside today's single-process path, in the same run.

Corpus: synthetic JSONL documents (40-60 words from a 50,000-word made-up vocabulary, so unrelated
documents share no 5-gram), with planted exact copies and near copies (one word in fifty changed)
at known rates, each copy placed after its original. The global steps see only fixed-size keys and
signatures, so their costs do not depend on document length; short documents keep the per-task
signature step (run once per size, then reused from the work directory) affordable here.

Each size is measured in fresh processes, one per path, so each driver starts from the same
baseline; a path's figure is its peak resident memory above its resident memory at the start
(Linux VmHWM, reset at the start; see kiln.data.meter). The single-process path is the dedup step
`kiln prepare` ran before the sharded one: every key and one band of signatures (widened to
uint64) in memory at once, `np.unique` for exact first occurrences, `lsh_clusters` (union-find)
for MinHash. Both paths must make the same decisions; the script checks that they do.

It then times the shuffle into shards (`kiln.data.shuffle`) of as many documents of about 100 tokens,
made directly as the tokenize step leaves them, with one shuffle bucket and with buckets of 10M
tokens, and reports the driver's memory the same way.

    python bench/dedup_scale.py --docs 100000 300000 1000000 [--workers 2] [--root /tmp/kiln-dedup-scale]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kiln.config import DataConfig, ExecutorConfig
from kiln.data.dedup import cluster_sizes, lsh_clusters
from kiln.data.executor import Executor
from kiln.data.meter import StepMeter
from kiln.data.sharded_dedup import DedupJob, bucket_task, global_dedup, partition_task
from kiln.data.shuffle import write_shards
from kiln.data.sources import input_files, plan_tasks
from kiln.data.stages import stage_entries
from kiln.data.tasks import Job, filter_task

PER_FILE = 25_000
STAGES = ["exact_dedup", "minhash_dedup"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def vocabulary(n: int = 50_000) -> list[str]:
    rng = random.Random(1)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def text(vocab: list[str], seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(40, 60))) + "."


def generate(d: Path, n: int, exact_rate: float, near_rate: float) -> dict:
    """`n` documents in JSONL files of PER_FILE; a copy names a random earlier original by its seed."""
    if (d / "planted.json").is_file():
        return json.loads((d / "planted.json").read_text())
    d.mkdir(parents=True, exist_ok=True)
    vocab, rng, seeds = vocabulary(), random.Random(0), []
    planted = {"exact": 0, "near": 0}
    for f in range(0, n, PER_FILE):
        with open(d / f"part{f // PER_FILE:04d}.jsonl", "w") as out:
            for i in range(f, min(n, f + PER_FILE)):
                r = rng.random()
                if seeds and r < exact_rate + near_rate:
                    t = text(vocab, rng.choice(seeds))
                    if r >= exact_rate:
                        words = t.split(" ")
                        words[rng.randrange(len(words))] = "planted"
                        t = " ".join(words)
                    planted["exact" if r < exact_rate else "near"] += 1
                else:
                    seeds.append(i)
                    t = text(vocab, i)
                out.write(json.dumps({"text": t, "id": f"doc{i}"}) + "\n")
    (d / "planted.json").write_text(json.dumps(planted))
    return planted


def setup(root: Path, n: int) -> tuple[DataConfig, list, Path]:
    src, work = root / f"in-{n}", root / f"work-{n}"
    cfg = DataConfig(input=str(src), stages=STAGES, min_chars=0)
    entries = stage_entries(cfg, input_files(cfg.input))
    jobs = [Job(t, cfg, entries, str(work)) for t in plan_tasks(cfg.input, cfg.reader, 1 << 20)]
    return cfg, jobs, work


def single_process(work: Path, jobs: list, n_per: list[int]) -> tuple[np.ndarray, dict]:
    """The dedup step as `kiln prepare` ran it in its driver before the sharded path."""
    names = [f"{j.task.index:05d}" for j in jobs]
    n = sum(n_per)
    keep = np.ones(n, dtype=bool)
    keys = np.concatenate([np.load(work / "filter" / f"{m}.exact.npy") for m in names])
    keys = np.ascontiguousarray(keys).view(np.dtype((np.void, 16))).ravel()
    live = np.flatnonzero(keep)
    _, first = np.unique(keys[live], return_index=True)
    is_first = np.zeros(n, dtype=bool)
    is_first[live[first]] = True
    keep &= is_first
    del keys, live, first, is_first
    sigs = [np.load(work / "filter" / f"{m}.sig.npy", mmap_mode="r") for m in names]
    valid = np.concatenate([np.load(work / "filter" / f"{m}.valid.npy") for m in names]) & keep

    def band(b):
        return np.concatenate([s[:, b * 8 : (b + 1) * 8] for s in sigs])

    roots = lsh_clusters(band, n, 14, 8, valid, 1)
    keep &= roots == np.arange(n)
    return keep, {"cluster_sizes": {str(k): v for k, v in cluster_sizes(roots).items()}}


def measure(root: Path, n: int, mode: str, workers: int, bucket_bytes: int) -> dict:
    """One path over the filtered corpus of size `n`, in this (fresh) process."""
    cfg, jobs, work = setup(root, n)
    cfg.dedup_bucket_bytes = bucket_bytes
    filtered = [filter_task(j) for j in jobs]  # the markers of `prepare_inputs`: read back, not recomputed
    n_per = [r["docs"] for r in filtered]
    meter = StepMeter()
    out: dict = {"docs": sum(n_per), "mode": mode}
    if mode == "single":
        with meter.step("dedup"):
            keep, info = single_process(work, jobs, n_per)
    else:
        shutil.rmtree(work / "dedup", ignore_errors=True)
        with Executor(ExecutorConfig(workers=workers)) as ex, meter.step("dedup"):
            result = global_dedup(ex, cfg, work, jobs, filtered, meter)
        keep = np.concatenate([np.load(work / "dedup" / "mask" / f"{j.task.index:05d}.keep.npy") for j in jobs])
        info = result["info"]["minhash"] | {"buckets": result["info"]["buckets"],
                                            "wall_seconds": result["info"]["wall_seconds"]}
        out["task_seconds"] = result["info"]["task_seconds"]  # partition + bucket (+ cluster), summed over tasks
        out["worker_peak_mb"] = worker_peaks(cfg, work, jobs, n_per, result["info"]["buckets"])
        out["disk_mb"] = {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 1)
                          for p in sorted((work / "dedup").iterdir()) if p.is_dir()}
        out["driver_steps"] = meter.steps
    s = meter.steps["dedup"]
    out |= {"seconds": s["seconds"], "rss_start_mb": s["rss_start_mb"], "rss_peak_mb": s["rss_peak_mb"],
            "added_mb": round(s["rss_peak_mb"] - s["rss_start_mb"], 1), "removed": int((~keep).sum()),
            "keep_sha": hashlib.sha256(np.packbits(keep).tobytes()).hexdigest()[:16],
            "cluster_sizes_sha": hashlib.sha256(json.dumps(info["cluster_sizes"], sort_keys=True).encode()).hexdigest()[:16],
            "info": {k: v for k, v in info.items() if k != "cluster_sizes"}}
    return out


def worker_peaks(cfg: DataConfig, work: Path, jobs: list, n_per: list[int], buckets: dict) -> dict:
    """Peak memory of one MinHash partition task and one MinHash bucket task, rerun here with the meter."""
    first = int(np.argmax(n_per))
    earlier = [("exact_dedup", buckets["exact_dedup"])]
    options = {"bands": 14, "rows": 8, "seed": 1}
    part = DedupJob(str(work), first, "minhash_dedup", options, buckets["minhash_dedup"],
                    first_doc=int(sum(n_per[:first])), docs=n_per[first], earlier=earlier)
    bucket = DedupJob(str(work), 0, "minhash_dedup", options, buckets["minhash_dedup"], tasks=len(jobs))
    peaks = {}
    for name, fn, job, marker in (
            ("partition", partition_task, part, f"part/{first:05d}.json"),
            ("bucket", bucket_task, bucket, "bucket/00000.json")):
        (work / "dedup" / "minhash_dedup" / marker).unlink()
        meter = StepMeter()
        with meter.step(name):
            fn(job)
        peaks[name] = round(meter.steps[name]["rss_peak_mb"] - meter.steps[name]["rss_start_mb"], 1)
    return peaks


def shuffle_inputs(root: Path, n: int, vocab: int = 32_768) -> tuple[Path, list[dict]]:
    """What tokenize_task leaves for `n` documents (about 100 tokens each, 2% validation), made directly."""
    work = root / f"tokens-{n}"
    done = work / "toks.json"
    if done.is_file():
        return work, json.loads(done.read_text())
    rng = np.random.default_rng(0)
    (work / "tokens").mkdir(parents=True, exist_ok=True)
    (work / "post").mkdir(exist_ok=True)
    (work / "split.json").write_text("{}")
    toks = []
    for t, a in enumerate(range(0, n, PER_FILE)):
        lens = rng.integers(20, 181, size=min(n, a + PER_FILE) - a)
        val = rng.random(len(lens)) < 0.02
        np.save(work / "tokens" / f"{t:05d}.ids.npy", rng.integers(0, vocab, size=int(lens.sum()), dtype=np.uint16))
        np.save(work / "tokens" / f"{t:05d}.lens.npy", lens)
        np.save(work / "post" / f"{t:05d}.val.npy", val)
        np.save(work / "post" / f"{t:05d}.bytes.npy", lens * 4)
        toks.append({"docs": len(lens), "tokens": int(lens.sum()), "val_docs": int(val.sum()),
                     "val_tokens": int(lens[val].sum())})
    done.write_text(json.dumps(toks))
    return work, toks


def measure_shuffle(root: Path, n: int, bucket_tokens: int, workers: int) -> dict:
    """The shuffle and shard writing of `n` documents, in this (fresh) process."""
    work, toks = shuffle_inputs(root, n)
    shutil.rmtree(work / "shuffle", ignore_errors=True)
    out = root / f"shards-{n}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    meter = StepMeter()
    with Executor(ExecutorConfig(workers=workers)) as ex, meter.step("shards"):
        splits, _ = write_shards(ex, DataConfig(shuffle_bucket_tokens=bucket_tokens), work, toks, out, "uint16",
                                 32_768)
    s = meter.steps["shards"]
    markers = [json.loads(p.read_text()) for p in (work / "shuffle" / "train").glob("*.json")]
    shutil.rmtree(out)
    return {"docs": n, "tokens": sum(r["tokens"] for r in toks), "buckets": len(markers),
            "shards": len(splits["train"]["shards"]) + len(splits["val"]["shards"]), "seconds": s["seconds"],
            "added_mb": round(s["rss_peak_mb"] - s["rss_start_mb"], 1),
            "scatter_mb": round(sum(p.stat().st_size for p in (work / "shuffle" / "scatter").glob("*.rec.npy")) / 2**20, 1)}


def prepare_inputs(root: Path, n: int, workers: int, exact_rate: float, near_rate: float) -> dict:
    planted = generate(root / f"in-{n}", n, exact_rate, near_rate)
    cfg, jobs, work = setup(root, n)
    t0 = time.perf_counter()
    with Executor(ExecutorConfig(workers=workers)) as ex:
        ex.map(filter_task, jobs, f"filter {n:,} docs")
    return {"planted": planted, "filter_seconds": round(time.perf_counter() - t0, 1), "tasks": len(jobs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--root", default="/tmp/kiln-dedup-scale")
    ap.add_argument("--exact-rate", type=float, default=0.05)
    ap.add_argument("--near-rate", type=float, default=0.05)
    ap.add_argument("--bucket-bytes", type=int, default=DataConfig().dedup_bucket_bytes)
    ap.add_argument("--measure", choices=["single", "sharded", "shuffle"], help=argparse.SUPPRESS)
    ap.add_argument("--shuffle-tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.root)
    if args.measure == "shuffle":
        print(json.dumps(measure_shuffle(root, args.docs[0], args.shuffle_tokens, args.workers)))
        return
    if args.measure:
        print(json.dumps(measure(root, args.docs[0], args.measure, args.workers, args.bucket_bytes)))
        return
    rows = []
    for n in args.docs:
        prep = prepare_inputs(root, n, args.workers, args.exact_rate, args.near_rate)
        for mode in ("single", "sharded"):
            cmd = [sys.executable, __file__, "--measure", mode, "--docs", str(n), "--workers", str(args.workers),
                   "--root", str(root), "--bucket-bytes", str(args.bucket_bytes)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append(res | prep | {"n": n})
            print(json.dumps(rows[-1]), flush=True)
    shuffles = []
    for n in args.docs:
        # The default bucket size (one bucket at these sizes), then buckets of about 10M tokens.
        for tokens in (DataConfig().shuffle_bucket_tokens, 10_000_000):
            cmd = [sys.executable, __file__, "--measure", "shuffle", "--docs", str(n), "--workers", str(args.workers),
                   "--root", str(root), "--shuffle-tokens", str(tokens)]
            shuffles.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
            print(json.dumps(shuffles[-1]), flush=True)
    print("\n| docs | path | wall s | driver peak above start (MB) | removed | same decisions |")
    print("|---:|---|---:|---:|---:|---|")
    for r in rows:
        same = r["keep_sha"] == next(x["keep_sha"] for x in rows if x["n"] == r["n"] and x["mode"] == "single")
        print(f"| {r['n']:,} | {r['mode']} | {r['seconds']:.1f} | {r['added_mb']:.1f} | {r['removed']:,} | "
              f"{'yes' if same else 'NO'} |")
    for r in rows:
        if r["mode"] == "sharded":
            print(f"{r['n']:,} docs: buckets {r['info']['buckets']}, pairs {r['info']['pairs']:,} over "
                  f"{r['info']['docs_in_clusters']:,} docs; task seconds {r['task_seconds']}; "
                  f"worker peaks above start (MB) {r['worker_peak_mb']}; disk (MB) {r['disk_mb']}")

    print("\n| docs | tokens | shuffle buckets | shards | wall s | driver peak above start (MB) | scatter records (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in shuffles:
        print(f"| {r['docs']:,} | {r['tokens']:,} | {r['buckets']} | {r['shards']} | {r['seconds']:.1f} | "
              f"{r['added_mb']:.1f} | {r['scatter_mb']:.1f} |")


if __name__ == "__main__":
    main()
