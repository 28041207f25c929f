"""`report.md` for a run directory: what each stage did, with a loss-curve plot and samples."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from kiln.runs import atomic_write_text, read_manifest
from kiln.train.metrics import read_metrics


def plot_training(metrics: list[dict], path: Path, baseline_bpb: float | None) -> bool:
    """Training loss and validation bits per byte against step, as a PNG. False if nothing to plot."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_bpb"]) for m in metrics if "val_bpb" in m]
    if not train:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(*zip(*train), lw=1)
    a.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss")
    a.grid(alpha=0.3)
    if val:
        b.plot(*zip(*val), marker="o", label="model")
    if baseline_bpb:
        b.axhline(baseline_bpb, color="gray", ls="--", label=f"unigram baseline {baseline_bpb:.2f}")
    b.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    b.grid(alpha=0.3)
    if val or baseline_bpb:  # a run without bits per byte (sft) has nothing to label
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _throughput_line(speed: list[float], mfu: list[float], peaks: list[float]) -> str:
    """Median throughput and MFU, with the peak the MFU was measured against. An MFU above 100%
    cannot be true: it means the peak was measured low, and the line says so instead of
    reporting it as a result."""
    if not (speed and mfu):
        return "- throughput: not logged"
    med = statistics.median(mfu)
    peak = f" of {statistics.median(peaks) / 1e9:,.0f} GFLOP/s per device" if peaks else ""
    line = (f"- throughput: median {statistics.median(speed):,.0f} tokens/s; MFU median {100 * med:.1f}%{peak} "
            "(model FLOPs 6N + attention; the measured fp32 matmul peak on CPU, the bf16 datasheet peak on GPU)")
    if med > 1.0:
        line += ("\n- **MFU above 100% is a measurement error, not a result**: the matmul peak was timed while the "
                 "host was busy and read low; rerun on a quiet machine for a meaningful MFU")
    return line


def write_report(run_dir: str | Path, samples: list[tuple[str, str]] | None = None) -> Path:
    run = Path(run_dir)
    data = read_manifest(run / "data") or {}
    metrics = read_metrics(run)
    baseline = data.get("unigram_bpb")
    lines = [f"# kiln run report: `{run}`", ""]

    if data.get("kind") == "images":  # image shards: counts per class, drops, contact sheet
        from kiln.data.image_prep import data_lines

        lines += data_lines(run, data)
    elif data:
        tr, va = data["splits"]["train"], data["splits"]["val"]
        lines += [
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
        lines.append("")

    if metrics:
        if plot_training(metrics, run / "loss.png", baseline):
            lines += ["## Training", "", "![training loss and validation bits per byte](loss.png)", ""]
        final = [m for m in metrics if "val_bpb" in m]
        speed = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
        mfu = [m["mfu"] for m in metrics if "mfu" in m]
        last = metrics[-1]
        cfg_text = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else ""
        ck = sorted((run / "checkpoints").glob("step_*/checkpoint.json")) if (run / "checkpoints").is_dir() else []
        model = json.loads(ck[-1].read_text()).get("model", {}) if ck else {}
        if model:
            lines.append(
                f"- model: d_model {model['d_model']}, {model['n_layers']} layers, {model['n_heads']} heads "
                f"({model['n_kv_heads']} KV), vocab {model['vocab_size']}, context {model['max_seq_len']}"
            )
        lines += [
            f"- steps: {last['step']}, tokens seen: {last.get('tokens', 0):,}, wall time {last.get('elapsed_s', 0):.0f} s",
            _throughput_line(speed, mfu, [m["peak_flops"] for m in metrics if "peak_flops" in m]),
        ]
        if final:
            f = final[-1]
            verdict = ""
            if baseline:
                gain = 100 * (1 - f["val_bpb"] / baseline)
                verdict = f" vs the unigram baseline {baseline:.3f} ({abs(gain):.0f}% {'lower' if gain >= 0 else 'higher'})"
            lines.append(f"- final validation: loss {f['val_loss']:.3f} nats/token, **{f['val_bpb']:.3f} bits/byte**{verdict}")
        skipped = last.get("skipped_steps", 0)
        lines.append(f"- steps skipped by the loss-spike guard: {skipped}")
        if cfg_text:
            lines += ["", "<details><summary>resolved config</summary>", "", "```yaml", cfg_text.rstrip(), "```",
                      "", "</details>"]
        lines.append("")

    lines += evaluation_section(run)
    # Stages that measure more than the loop logs (sft, reward, dpo, ...) write their own section here.
    for part in sorted((run / "report.d").glob("*.md")):
        lines += [part.read_text().rstrip(), ""]

    if samples:
        lines += ["## Samples", ""]
        for prompt, completion in samples:
            lines += ["```python", prompt + completion, "```", ""]
    path = run / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def evaluation_section(run: Path) -> list[str]:
    """The "Evaluation" section from the run's eval.json (written by `kiln eval`), or nothing."""
    try:
        results = json.loads((run / "eval.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    from kiln.evaluate import summary_lines

    step = f" at step {results['step']}" if results.get("step") is not None else ""
    lines = ["## Evaluation", "", f"`kiln eval` of `{results['model']}`{step} ({results.get('created', '')}):", ""]
    lines += [f"- {line}" for line in summary_lines(results)]
    try:
        examples = [s for s in map(json.loads, (run / "eval_samples.jsonl").read_text().splitlines())
                    if s.get("task") == "function_completion"][:3]
    except (OSError, json.JSONDecodeError):
        examples = []
    if examples:
        lines += ["", "Function completions from held-out headers (greedy):"]
        for s in examples:
            lines += ["", f"{'parses' if s.get('parses') else 'does not parse'}:", "", "```python",
                      s.get("header", "") + s.get("completion", ""), "```"]
    return lines + ["", "All results: [eval.json](eval.json); every example: [eval_samples.jsonl](eval_samples.jsonl).", ""]


def write_evaluation(run_dir: str | Path) -> Path:
    """Put the "Evaluation" section into the run's report.md, replacing an older one (the rest of
    the report, including samples only `kiln speedrun` knows, stays as it is)."""
    run = Path(run_dir)
    path = run / "report.md"
    if not path.is_file():
        return write_report(run)
    text = path.read_text()
    start = text.find("\n## Evaluation\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[: start + 1] + (text[end + 1 :] if end >= 0 else "")
    section = "\n".join(evaluation_section(run))
    at = text.find("\n## Samples\n")
    text = text[: at + 1] + section + "\n" + text[at + 1 :] if at >= 0 else text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)
    return path
