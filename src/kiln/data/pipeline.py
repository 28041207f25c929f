"""`kiln prepare`: readers → stages → global dedup → stages → tokenizer → tokenize → shuffled shards, resumable.

The driver plans tasks (by input file; large files by byte range or row group) and runs them
through an executor (in-process, local processes or Ray): the per-document steps of
`kiln.data.tasks`, and the global steps as tasks too (`kiln.data.sharded_dedup`,
`kiln.data.shuffle`), so it never holds per-document arrays for the corpus. It keeps for itself
MinHash's cluster step (memory per duplicated document), tokenizer training (streamed texts) and
the data directory's manifest, `metadata.jsonl` and `prepare_report.md`, with its own memory and
seconds per step (`kiln.data.meter`). Intermediate results live in `<data>.work/` with a
completion marker per task, so a killed run, rerun, redoes only the missing tasks and writes
byte-identical shards.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from kiln.config import Config
from kiln.data.chat import copy_format
from kiln.data.document import StageStats, doc_record
from kiln.data.executor import Executor
from kiln.data.layout import check_not_a_trained_run, data_dir, tokenizer_path, work_dir
from kiln.data.meter import StepMeter
from kiln.data.sharded_dedup import global_dedup
from kiln.data.shuffle import write_shards
from kiln.data.sources import HTML_SUFFIXES, file_format, input_files, listing_fingerprint, plan_tasks
from kiln.data.stages import build_stage, split_at_dedup, stage_entries
from kiln.data.tasks import Job, filter_task, is_validation, load_docs, post_task, tokenize_task, val_mask
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

__all__ = ["is_validation", "run_prepare"]
STEPS = ["read_filter", "dedup", "post", "tokenizer", "tokenize", "shards", "records"]


@dataclass
class _Prepare:
    """One text prepare: what it reads, where it writes, and what its output depends on."""

    cfg: Config
    out: Path  # the run directory (prepare_report.md, and the run's tokenizer unless data.path)
    ddir: Path  # the data directory
    tok_out: Path  # where the tokenizer lands: out/tokenizer, or inside data.path
    files: list[Path]
    inputs: str  # the fingerprint of the input files and the data config
    work: Path  # intermediate results, one completion marker per task


@dataclass
class _Kept:
    """What the per-document stages and the global dedup kept, per task in task order."""

    jobs: list[Job]  # each with its dedup limit (keep_first)
    tasks: int
    filtered: list[dict]  # reading and the stages before dedup
    dedup: dict  # global_dedup's limits, stats, info and removed documents
    posted: list[dict]  # the stages after dedup
    messages: list[str]  # the first skipped-input messages

    @property
    def n_docs(self) -> int:
        return sum(r["docs"] for r in self.posted)


def _resolved_stages(cfg: Config, files: list[Path]) -> list:
    """The recipe's stages as (name, options), checked now (unknown names or options fail before any work)."""
    r = cfg.data.reader
    html = r.html == "always" or (r.html == "auto" and any(
        f.name.lower().endswith(HTML_SUFFIXES) or file_format(f, r) == "warc" for f in files))
    entries = stage_entries(cfg.data, files, html)
    split_at_dedup([build_stage(n, o, cfg.data) for n, o in entries])
    return entries


def run_prepare(cfg: Config) -> dict:
    """`kiln prepare`: text (the stages below) or labelled images (`kiln.data.image_prep`), then the
    data section of the run's report when the data is the run's own (`out/data`)."""
    from kiln.data.report import push_data_section

    if cfg.data.kind == "images":
        from kiln.data.image_prep import prepare_images

        man = prepare_images(cfg)
    else:
        man = _prepare_text(cfg)
    push_data_section(Path(cfg.out))  # does nothing when out/ holds no prepared data of its own
    return man


def _prepare_text(cfg: Config) -> dict:
    p = _plan(cfg)
    old = _up_to_date(p)
    if old:
        return old
    check_not_a_trained_run(cfg, p.out, p.ddir)
    entries = _resolved_stages(cfg, p.files)
    resumed = _open_work(p)

    meter = StepMeter()
    with Executor(cfg.data.executor) as ex:
        kept = _filter_and_dedup(p, ex, entries, resumed, meter)
        # What the report shows whether or not the run gets to write shards.
        summary = _summary(p, ex, entries, kept)
        _check_enough_docs(p, kept, summary, meter)
        n_val = _fix_split(p.work, kept.jobs, kept.posted)
        tok_file, vocab, want = _tokenizer(p, kept, n_val, meter)
        man = _write_data(p, ex, kept, summary, tok_file, vocab, want, meter)
    from kiln.data.report import write_prepare_report

    report = write_prepare_report(p.out, man)
    shutil.rmtree(p.work, ignore_errors=True)
    tr, va = man["splits"]["train"], man["splits"]["val"]
    print(
        f"prepare: {tr['docs']} train docs ({tr['tokens']:,} tokens), {va['docs']} val docs "
        f"({va['tokens']:,} tokens), vocab {vocab}, {tr['bytes'] / max(tr['tokens'], 1):.2f} bytes/token, "
        f"unigram baseline {man['unigram_bpb']:.3f} bits/byte"
    )
    for line in drop_lines(man.get("stages", {}), report):
        print(line)
    return man


def drop_lines(stages: dict, report: Path) -> list[str]:
    """What the stages removed, for the closing lines: the largest drops by reason with the report's
    path, and a warning for a stage that removed most of what reached it."""
    reasons = sorted(((n, why, k) for n, s in stages.items() for why, k in s.get("dropped", {}).items() if k),
                     key=lambda r: -r[2])
    if not reasons:
        return []
    read = stages.get("read", {}).get("docs_in", 0)
    top = ", ".join(f"{why} ({name}) {k:,}" for name, why, k in reasons[:3])
    lines = [f"prepare: dropped {sum(k for *_, k in reasons):,} of {read:,} documents read, most by {top}; "
             f"every stage's counts: {report}"]
    for name, s in stages.items():
        if s.get("docs_in", 0) >= 10 and s.get("docs_out", 0) < 0.5 * s["docs_in"]:
            lines.append(f"prepare: warning: stage {name} removed {s['docs_in'] - s['docs_out']:,} of the "
                         f"{s['docs_in']:,} documents that reached it; if that is not what you want, loosen or "
                         f"remove it in data.stages")
    return lines


# ---- the steps of run_prepare, in order ----------------------------------------------------------
def _plan(cfg: Config) -> _Prepare:
    """Where this prepare writes, its input files, and the fingerprint its output depends on."""
    out = Path(cfg.out)
    ddir = data_dir(cfg)
    # The run's tokenizer is out/tokenizer; data prepared elsewhere (data.path) keeps its own inside it.
    tok_out = ddir / "tokenizer.json" if cfg.data.path else out / "tokenizer" / "tokenizer.json"
    clean_stale_temps(ddir.parent)
    clean_stale_temps(out)
    files = input_files(cfg.data.input)
    # What the output depends on: the input files and the data config, not where it runs.
    inputs = fingerprint({"files": listing_fingerprint(files),
                          "data": {k: v for k, v in asdict(cfg.data).items() if k != "executor"}})
    return _Prepare(cfg, out, ddir, tok_out, files, inputs, work_dir(ddir))


def _up_to_date(p: _Prepare) -> dict | None:
    """The data directory's manifest when it was made from these inputs with the tokenizer it names, else None."""
    old = read_manifest(p.ddir)
    if old and old.get("inputs") == p.inputs:
        tpath = tokenizer_path(p.ddir, old)
        if tpath.is_file() and old.get("tokenizer_sha256") == sha256_file(tpath):
            print(f"prepare: {p.ddir} is up to date with its inputs, skipping")
            return old
    return None


def _open_work(p: _Prepare) -> int:
    """The work directory for these inputs (one left by other inputs is removed first); returns the
    number of tasks a killed earlier run already filtered."""
    work = p.work
    if (work / "inputs").is_file() and (work / "inputs").read_text() != p.inputs:
        shutil.rmtree(work)
    resumed = sum(1 for _ in (work / "filter").glob("*.json")) if work.is_dir() else 0
    work.mkdir(parents=True, exist_ok=True)
    (work / "inputs").write_text(p.inputs)
    return resumed


def _filter_and_dedup(p: _Prepare, ex: Executor, entries: list, resumed: int, meter: StepMeter) -> _Kept:
    """Plan the tasks, then run them through reading and the stages before dedup, the global dedup,
    and the stages after it."""
    cfg, files = p.cfg, p.files
    target = max(1 << 20, min(cfg.data.reader.task_bytes, sum(f.stat().st_size for f in files) // (4 * ex.workers)))
    tasks = plan_tasks(cfg.data.input, cfg.data.reader, target)
    print(f"prepare: {len(files)} files in {len(tasks)} tasks on {ex.label}; stages: "
          + " → ".join(n for n, _ in entries) + (f"; resuming ({resumed} tasks already filtered)" if resumed else ""))
    jobs = [Job(t, cfg.data, entries, str(p.work)) for t in tasks]

    with meter.step("read_filter"):
        filtered = ex.map(filter_task, jobs, "prepare: read+filter")
    messages = _print_skips(filtered)

    with meter.step("dedup"):
        dedup = global_dedup(ex, cfg.data, p.work, jobs, filtered, meter)

    with meter.step("post"):
        jobs = [replace(j, keep_first=k) for j, k in zip(jobs, dedup["limits"])]
        posted = ex.map(post_task, jobs, "prepare: after-dedup stages")
    return _Kept(jobs, len(tasks), filtered, dedup, posted, messages)


def _summary(p: _Prepare, ex: Executor, entries: list, kept: _Kept) -> dict:
    """The manifest's account of the stages: counts per stage, dedup, skipped input, length histograms."""
    stats = _merge_stats(kept.filtered, kept.dedup["stats"], kept.posted)
    return dict(files=len(p.files), tasks=kept.tasks, executor=ex.label, stage_order=["read", *[n for n, _ in entries]],
                stages=stats, dedup=kept.dedup["info"], messages=kept.messages,
                histograms={"bins": [float(b) for b in _bins()], "before": _sum_lists(kept.filtered, "hist_before"),
                            "after": _sum_lists(kept.posted, "hist_after")})


def _check_enough_docs(p: _Prepare, kept: _Kept, summary: dict, meter: StepMeter) -> None:
    """Stop (with the report of what each stage dropped) unless at least two documents are left."""
    n_docs, cfg = kept.n_docs, p.cfg
    if n_docs >= 2:
        return
    partial = manifest("prepare", asdict(cfg.data), p.inputs, **summary, seconds=meter.seconds(STEPS),
                       driver=meter.to_dict())
    if not n_docs:
        dropped = {r: n for s in summary["stages"].values() for r, n in s["dropped"].items() if n}
        _stop(p.out, partial,
              f"no documents left from data.input '{cfg.data.input}' ({len(p.files)} files; dropped: "
              f"{dropped or 'none'}); point data.input at non-empty text, lower data.min_chars or loosen "
              "data.stages")
    _stop(p.out, partial, "the corpus has a single document after the stages; give at least two so one can be "
                          "held out for validation, or loosen data.stages")


def _tokenizer(p: _Prepare, kept: _Kept, n_val: int, meter: StepMeter) -> tuple[Path, int, int]:
    """The given tokenizer, or one trained on the training split only (in corpus order).
    Returns (its file, its vocabulary size, the vocabulary size asked for)."""
    cfg, work = p.cfg, p.work
    with meter.step("tokenizer"):
        tok_file = work / "tokenizer.json"
        want = cfg.data.tokenizer.vocab_size
        if cfg.data.tokenizer.path:
            tok = load_tokenizer(cfg.data.tokenizer.path)
            tok_file = Path(cfg.data.tokenizer.path)
            tok_file = tok_file / "tokenizer.json" if tok_file.is_dir() else tok_file
            want = tok.get_vocab_size()
        elif tok_file.is_file():
            tok = load_tokenizer(tok_file)
        else:
            budget = cfg.data.tokenizer.train_bytes
            print(f"prepare: training a {want}-token BPE on {kept.n_docs - n_val:,} training documents"
                  + (f" (their first {budget / 1e6:.1f} MB)" if budget else ""))
            tok = train_tokenizer(_budget(_split_texts(work, kept.jobs, want_val=False), budget), want)
            atomic_write_text(tok_file, tok.to_str())
    vocab = tok.get_vocab_size()
    if vocab < want:
        print(f"prepare: note: the tokenizer has {vocab} tokens, not the {want} of data.tokenizer.vocab_size: "
              "the corpus has no more pairs to merge; models take the smaller vocabulary (give more text for more)")
    return tok_file, vocab, want


def _write_data(p: _Prepare, ex: Executor, kept: _Kept, summary: dict, tok_file: Path, vocab: int, want: int,
                meter: StepMeter) -> dict:
    """Tokenize every task, install the tokenizer, then write the data directory: the training
    documents shuffled corpus-wide into shards (validation in corpus order), the per-document
    records and the manifest, which it returns."""
    cfg, work, tok_out = p.cfg, p.work, p.tok_out
    dtype = token_dtype(vocab)
    with meter.step("tokenize"):
        tjobs = [replace(j, tokenizer=str(tok_file), dtype=dtype) for j in kept.jobs]
        toks = ex.map(tokenize_task, tjobs, "prepare: tokenize", threaded=True)

    if not cfg.data.path:
        with atomic_dir(tok_out.parent) as tmp:
            shutil.copyfile(tok_file, tmp / "tokenizer.json")
            copy_format(tok_file, tmp)  # an imported model's chat format travels with its tokenizer
            write_json(tmp / "manifest.json", manifest("tokenizer", asdict(cfg.data.tokenizer), p.inputs,
                                                       vocab_size=vocab))
    tok_hash = sha256_file(tok_file)

    with atomic_dir(p.ddir) as tmp:
        with meter.step("shards"):
            splits, unigram_bpb = write_shards(ex, cfg.data, work, toks, tmp, dtype, vocab)
        with meter.step("records"):
            excluded = (_write_exclusions(tmp, work, kept.jobs, kept.filtered, kept.dedup, kept.posted)
                        if cfg.data.exclusions else None)
            described = _write_metadata(tmp, work, kept.jobs)
        if cfg.data.path:
            shutil.copyfile(tok_file, tmp / tok_out.name)
            copy_format(tok_file, tmp)
        man = manifest(
            "prepare",
            asdict(cfg.data),
            p.inputs,
            dtype=dtype,
            vocab_size=vocab,
            vocab_size_requested=want,
            tokenizer=tok_out.name if cfg.data.path else "../tokenizer/tokenizer.json",
            tokenizer_sha256=tok_hash,
            splits=splits,
            unigram_bpb=unigram_bpb,
            **summary,
            exclusions=excluded,
            metadata=described,
            seconds=meter.seconds(STEPS),
            driver=meter.to_dict(),
        )
        write_json(tmp / "manifest.json", man)
    return man


# ---- helpers -------------------------------------------------------------------------------------
def _fix_split(work: Path, jobs: list[Job], posted: list[dict]) -> int:
    """Write `split.json`: the one document whose split changes when the id split put every document, or
    none, in validation (a tiny corpus holds out its last document, and trains on its first). Returns
    the number of validation documents."""
    n_docs, n_val = sum(r["docs"] for r in posted), sum(r["val"] for r in posted)
    flip = {}
    if n_val == 0:
        t = max(i for i, r in enumerate(posted) if r["docs"])
        flip, n_val = {"task": f"{jobs[t].task.index:05d}", "doc": posted[t]["docs"] - 1, "val": True}, 1
    elif n_val == n_docs:
        t = min(i for i, r in enumerate(posted) if r["docs"])
        flip, n_val = {"task": f"{jobs[t].task.index:05d}", "doc": 0, "val": False}, n_val - 1
    atomic_write_text(work / "split.json", json.dumps(flip))
    return n_val


def _stop(out: Path, partial: dict, problem: str) -> None:
    """Stop with `problem`, after writing the report of what each stage kept and dropped on the way."""
    from kiln.data.report import write_prepare_report

    partial["stopped"] = problem
    path = write_prepare_report(out, partial)
    raise KilnError(f"{problem} (per-stage counts: {path})")


def _print_skips(filtered: list[dict], per_reason: int = 3) -> list[str]:
    """Print the first few skipped-input messages of each reason and how many more there were."""
    counts: dict[str, int] = {}
    for r in filtered:
        for reason, n in r["reported"].items():
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


def _split_texts(work: Path, jobs: list[Job], want_val: bool):
    for j in jobs:
        name = f"{j.task.index:05d}"
        for doc, val in zip(load_docs(work / "post" / f"{name}.docs"), val_mask(work, name)):
            if bool(val) == want_val:
                yield doc.text


def _merge_stats(filtered: list[dict], dedup_stats: dict, posted: list[dict]) -> dict:
    merged: dict[str, StageStats] = {}
    for results in (filtered, [{"stages": dedup_stats}], posted):
        for r in results:
            for name, s in r["stages"].items():
                merged.setdefault(name, StageStats(name)).merge(s)
    return {k: v.to_dict() for k, v in merged.items()}


def _write_exclusions(directory: Path, work: Path, jobs: list[Job], filtered: list[dict], dedup: dict,
                      posted: list[dict]) -> int:
    """Every dropped document, one JSON object per line: id, stage, reason, and its record (URL, source file,
    what the stages measured), under the stage and reason names the report counts them by."""
    n = 0
    with open(directory / "exclusions.jsonl", "w") as f:
        for res in filtered:
            for e in res["excluded"]:
                f.write(json.dumps(e) + "\n")
                n += 1
        for j in jobs:
            name = f"{j.task.index:05d}"
            if dedup["removed"].get(name):
                docs = load_docs(work / "filter" / f"{name}.docs")
                for i, stage, reason in dedup["removed"][name]:
                    rec = {"id": docs[i].id, "stage": stage, "reason": reason, **doc_record(docs[i])}
                    f.write(json.dumps(rec) + "\n")
                    n += 1
        for res in posted:
            for e in res["excluded"]:
                f.write(json.dumps(e) + "\n")
                n += 1
    return n


def _write_metadata(directory: Path, work: Path, jobs: list[Job]) -> int:
    """Every kept document, in corpus order: id, split, and its record (URL, source file, what the stages
    measured: language and score, classifier score, PII counts), which the shards cannot hold."""
    i = 0
    with open(directory / "metadata.jsonl", "w") as f:
        for j in jobs:
            name = f"{j.task.index:05d}"
            for doc, val in zip(load_docs(work / "post" / f"{name}.docs"), val_mask(work, name)):
                f.write(json.dumps({"id": doc.id, "split": "val" if val else "train", **doc_record(doc)}) + "\n")
                i += 1
    return i


def _budget(texts, max_bytes: int):
    """`texts` until about `max_bytes` characters have gone by (0: all), streamed: the driver holds one at a time."""
    n = 0
    for t in texts:
        if max_bytes and n >= max_bytes:
            return
        yield t
        n += len(t)
