"""What the data layer reports: `prepare_report.md` and its plots (what the data pipeline kept,
dropped, and why, and how fast), and the "Data" section it pushes into a run's `report.md`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from kiln.data.images import SPLITS
from kiln.report import write_section
from kiln.runs import atomic_write_text, read_manifest


def _plot_lengths(man: dict, path: Path) -> bool:
    h = man.get("histograms") or {}
    if not h.get("before"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.asarray(h["bins"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for key, label in (("before", "as read"), ("after", "after all stages")):
        if h.get(key):
            ax.stairs(h[key], bins, label=f"{label} ({sum(h[key]):,} docs)", fill=key == "before", alpha=0.6)
    ax.set(xscale="log", xlabel="document length (characters)", ylabel="documents",
           title="document length distribution before / after")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_stages(man: dict, order: list[str], path: Path) -> bool:
    stages = man.get("stages") or {}
    if not stages:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in order if n in stages]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.2))
    y = np.arange(len(names))
    ax.barh(y, [stages[n]["docs_in"] for n in names], color="#ccc", label="in")
    ax.barh(y, [stages[n]["docs_out"] for n in names], color="#3a7", label="out")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set(xlabel="documents", title="documents in / out per stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_prepare_report(run_dir: str | Path, man: dict) -> Path:
    """`prepare_report.md` (and its plots) beside the data: totals, each stage's counts and drops,
    near-duplicate clusters, the driver's memory, document lengths and skipped input."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    order = _stage_order(man.get("stages", {}), man)
    lines = _totals(man) + _stage_table(man, order) + _minhash_lines(man) + _driver_lines(man)
    if _plot_lengths(man, run / "prepare_lengths.png"):
        lines += ["", "## Document lengths", "", "![document length distribution](prepare_lengths.png)"]
    if _plot_stages(man, order, run / "prepare_stages.png"):
        lines += ["", "## Documents per stage", "", "![documents in and out per stage](prepare_stages.png)"]
    if man.get("messages"):
        lines += ["", "## Skipped input (first messages)", "", *[f"- {m}" for m in man["messages"][:20]]]
    if man.get("exclusions") is not None:
        lines += ["", f"Every dropped document with its stage, reason, URL or source file and what the stages "
                      f"measured (e.g. its language score): `exclusions.jsonl` in the data directory "
                      f"({man['exclusions']:,} lines)."]
    if man.get("metadata") is not None:
        lines += ["", f"Every kept document's id, split, source and what the stages measured (language and "
                      f"score, classifier score, PII counts): `metadata.jsonl` in the data directory "
                      f"({man['metadata']:,} lines)."]
    path = run / "prepare_report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _stage_order(stages: dict, man: dict) -> list[str]:
    """The stages in the order they ran; the document cap right after dedup, where it applies."""
    order = [n for n in man.get("stage_order", []) if n in stages]
    order += [n for n in stages if n not in order]
    if "max_docs" in order:
        order.remove("max_docs")
        after = max([i for i, n in enumerate(order) if n in ("exact_dedup", "minhash_dedup")], default=len(order) - 1)
        order.insert(after + 1, "max_docs")
    return order


def _totals(man: dict) -> list[str]:
    read = man.get("stages", {}).get("read", {})
    lines = [
        "# kiln prepare report",
        "",
        f"- input: `{man['config'].get('input')}`: {man.get('files', '?')} files in {man.get('tasks', '?')} tasks, "
        f"executor {man.get('executor', '?')}",
    ]
    if man.get("stopped"):  # stopped before writing shards: the stage counts say what removed the corpus
        lines += [f"- **stopped**: {man['stopped']}; no data was written",
                  f"- documents: {read.get('docs_in', 0):,} read"]
    else:
        tr, va = man["splits"]["train"], man["splits"]["val"]
        vocab = f"vocab {man['vocab_size']} ({man['dtype']})"
        if man.get("vocab_size_requested", man["vocab_size"]) > man["vocab_size"]:
            vocab += (f", not the {man['vocab_size_requested']} asked for: the corpus had no more pairs to merge")
        lines += [
            f"- documents: {read.get('docs_in', 0):,} read → {tr['docs'] + va['docs']:,} kept "
            f"({tr['docs']:,} train, {va['docs']:,} validation); bytes {read.get('bytes_out', 0):,} → "
            f"{tr['bytes'] + va['bytes']:,}",
            f"- tokens out: {tr['tokens']:,} train, {va['tokens']:,} validation; {vocab}; "
            f"unigram baseline {man.get('unigram_bpb', float('nan')):.3f} bits/byte",
        ]
    return lines + ["- seconds: " + ", ".join(f"{k} {v}" for k, v in man.get("seconds", {}).items())]


def _stage_table(man: dict, order: list[str]) -> list[str]:
    stages = man.get("stages", {})
    lines = [
        "",
        "## Stages",
        "",
        "Seconds are summed over tasks (CPU time spent in the stage); docs/s is documents in per stage-second.",
        "",
        "| stage | docs in | docs out | kept | MB in | MB out | seconds | docs/s | dropped (reason: count) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in order:
        s = stages[name]
        rate = f"{s['docs_in'] / s['seconds']:,.0f}" if s["seconds"] > 0 else "—"
        kept = f"{100 * s['docs_out'] / s['docs_in']:.1f}%" if s["docs_in"] else "—"
        drops = ", ".join(f"{k}: {v:,}" for k, v in sorted(s["dropped"].items(), key=lambda kv: -kv[1])) or "—"
        lines.append(f"| {name} | {s['docs_in']:,} | {s['docs_out']:,} | {kept} | {s['bytes_in'] / 1e6:.2f} | "
                     f"{s['bytes_out'] / 1e6:.2f} | {s['seconds']:.2f} | {rate} | {drops} |")
    return lines


def _minhash_lines(man: dict) -> list[str]:
    mh = (man.get("dedup") or {}).get("minhash")
    if not mh:
        return []
    sizes = mh["cluster_sizes"]
    return [
        "",
        "## Near-duplicate clusters (MinHash LSH)",
        "",
        f"{mh['n_grams']}-word shingles, {mh['bands']} bands × {mh['rows']} rows. "
        f"{sum(sizes.values()):,} clusters of two or more documents; each keeps its first document.",
        f"Signatures on disk: {mh['signature_bytes'] / 1e6:.1f} MB; band-key records partitioned into "
        f"{man['dedup']['buckets']['minhash_dedup']} buckets: {mh['record_bytes'] / 1e6:.1f} MB; "
        f"{mh['pairs']:,} candidate pairs over {mh['docs_in_clusters']:,} documents, clustered in the driver.",
        "",
        "| cluster size | clusters |",
        "|---:|---:|",
        *[f"| {k} | {v:,} |" for k, v in sorted(sizes.items(), key=lambda kv: int(kv[0]))],
    ]


def _driver_lines(man: dict) -> list[str]:
    driver = man.get("driver") or {}
    if not driver.get("steps"):
        return []
    return ["", "## Driver memory per step", "",
                  f"Measured: {driver['method']}. The global steps run as tasks, so the driver's memory follows "
                  "the number of tasks and of duplicates, not of documents; with `data.executor.workers=1` the "
                  "tasks run inside the driver and count here too.", "",
                  "| step | seconds | resident at start (MB) | peak (MB) |", "|---|---:|---:|---:|",
                  *[f"| {k} | {v['seconds']:.2f} | {v['rss_start_mb']:,.1f} | {v['rss_peak_mb']:,.1f} |"
                    for k, v in driver["steps"].items()]]


def push_data_section(run: Path) -> None:
    """Push the "data" section of the run's report from `run/data`'s manifest: counts, tokenizer
    and per-stage table for text, counts per class and the contact sheet for images. Nothing when
    the run has no prepared data of its own."""
    run = Path(run)
    data = read_manifest(run / "data")
    if not data:
        return
    if data.get("kind") == "images":  # image shards: counts per class, drops, contact sheet
        write_section(run, "data", image_data_lines(run, data))
        return
    tr, va = data["splits"]["train"], data["splits"]["val"]
    lines = [
        "## Data",
        "",
        f"- input: `{data['config'].get('input')}`, {data.get('files', '?')} files",
        f"- train: {tr['docs']:,} documents, {tr['tokens']:,} tokens; validation: {va['docs']:,} documents, "
        f"{va['tokens']:,} tokens",
        f"- tokenizer: byte-level BPE, vocab {data['vocab_size']}, {tr['bytes'] / max(tr['tokens'], 1):.2f} bytes/token",
        "",
        "| stage | docs in | docs out | dropped (reason: count) | seconds |",
        "|---|---:|---:|---|---:|",
    ]
    stages = data.get("stages", {})
    for name in [n for n in data.get("stage_order", stages) if n in stages]:
        s = stages[name]
        drops = ", ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "—"
        lines.append(f"| {name} | {s['docs_in']:,} | {s['docs_out']:,} | {drops} | {s['seconds']} |")
    if (run / "prepare_report.md").exists():
        lines += ["", "The data pipeline's full report: [prepare_report.md](prepare_report.md)."]
    write_section(run, "data", lines)


def image_data_lines(run: Path, man: dict, ddir: Path | None = None) -> list[str]:
    """The image data section of a report: where from, counts per split and class, drops, the contact sheet."""
    ddir = ddir or run / "data"
    splits, read = man["splits"], man["read"]
    sheet = run / "contact_sheet.png"
    if (ddir / "contact_sheet.png").is_file() and ddir.resolve() != run.resolve():
        shutil.copyfile(ddir / "contact_sheet.png", sheet)
    drops = ", ".join(f"{k}: {v:,}" for k, v in sorted(read["dropped"].items(), key=lambda kv: -kv[1])) or "none"
    lines = [
        "## Data (images)",
        "",
        f"- input: `{man['config'].get('input')}` ({man['source']}): {read['listed']:,} listed → {read['kept']:,} kept; "
        f"dropped: {drops}",
        f"- {len(man['classes'])} classes, stored as {man['channels']}×{man['size']}×{man['size']} uint8 ({man['mode']}); "
        f"training-split mean {[round(m, 3) for m in man['mean']]}, std {[round(s, 3) for s in man['std']]}",
        f"- decoded in {man.get('tasks', '?')} tasks on {man.get('executor', '?')}; seconds: "
        + ", ".join(f"{k} {v}" for k, v in man.get("seconds", {}).items()),
        "",
        "| class | " + " | ".join(SPLITS) + " |",
        "|---|" + "---:|" * len(SPLITS),
        *[f"| {name} | " + " | ".join(f"{splits[s]['per_class'][k]:,}" for s in SPLITS) + " |"
          for k, name in enumerate(man["classes"][:50])],
        "| **total** | " + " | ".join(f"**{splits[s]['images']:,}**" for s in SPLITS) + " |",
        "",
    ]
    if sheet.is_file():
        lines += ["Training samples per class:", "", "![contact sheet](contact_sheet.png)", ""]
    if man.get("messages"):
        lines += ["Skipped input (first messages):", "", *[f"- {m}" for m in man["messages"][:20]], ""]
    return lines
