"""The training section of a run's report: the loss and validation curves, throughput and MFU,
the final validation figures and the resolved config, from the run's metrics.jsonl."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from kiln.plan import PLAN_VS_RUN
from kiln.report import write_section
from kiln.runs import HeldOutWindows, read_manifest
from kiln.train.metrics import read_metrics


def plot_training(metrics: list[dict], path: Path, baseline_bpb: float | None, validated: bool) -> str | None:
    """Training loss, and validation bits per byte when the run logged it, against step, as a PNG;
    returns its caption (None: nothing to plot). `validated`: any validation figure was logged."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_bpb"]) for m in metrics if "val_bpb" in m]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(11 if val else 5.5, 4), squeeze=False)
    a = axes[0][0]
    a.plot(*zip(*train), lw=1)
    a.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss")
    a.grid(alpha=0.3)
    if val:
        b = axes[0][1]
        b.plot(*zip(*val), marker="o", label="model")
        if baseline_bpb:
            b.axhline(baseline_bpb, color="gray", ls="--", label=f"unigram baseline {baseline_bpb:.2f}")
        b.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
        b.grid(alpha=0.3)
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if val:
        return "training loss and validation bits per byte"
    return "training loss" if validated else "training loss (no validation ran)"


def _throughput_line(speed: list[float], mfu: list[float], peaks: list[float]) -> str:
    """Median throughput and MFU, with the peak the MFU was measured against. An MFU above 100%
    cannot be true: it means the peak was measured low, and the line says so instead of
    reporting it as a result."""
    if not (speed and mfu):
        return "- throughput: not logged"
    med = statistics.median(mfu)
    peak = f" of {statistics.median(peaks) / 1e9:,.0f} GFLOP/s per device" if peaks else ""
    line = (f"- throughput: median {statistics.median(speed):,.0f} tokens/s; MFU median {100 * med:.1f}%{peak} "
            "(model FLOPs 6N + attention; the measured fp32 matmul peak on CPU, on GPU the datasheet peak of the "
            "precision trained in: bf16, or TF32 for fp32)")
    if med > 1.0:
        line += ("\n- **MFU above 100% is a measurement error, not a result**: the matmul peak was timed while the "
                 "host was busy and read low; rerun on a quiet machine for a meaningful MFU")
    return line


def _bytes(x: float) -> str:
    for div, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if x >= div:
            return f"{x / div:,.1f} {unit}"
    return f"{x:,.0f} B"


def _seconds(x: float) -> str:
    if x >= 3600:
        return f"{x / 3600:,.2f} h"
    return f"{x:,.3g} s" if x >= 1 else f"{x * 1e3:,.3g} ms"


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 0.01 else f"${x:.2g}"


def plan_vs_measured_table(runs: list[tuple[str, Path, str]]) -> list[str]:
    """One "Plan vs measured" table over several runs (the speedrun's stages): for each, what the
    planner predicted before its first step and what it measured, peak memory, step time and
    tokens/s, with the error (predicted / measured − 1); a run without a plan_vs_run.json is left out.
    `runs`: (name, run directory, its path relative to the report, for the link to its own report)."""
    rows = []
    for name, run, link in runs:
        try:
            data = json.loads((run / PLAN_VS_RUN).read_text())
        except (OSError, ValueError):
            continue
        p, m, err = data.get("predicted"), data.get("measured") or {}, data.get("error") or {}
        if not p:
            rows.append(f"| [{name}]({link}/report.md) | no prediction: {data.get('no_prediction') or 'not modelled'} "
                        "| | | | | | |")
            continue

        def cell(key: str, fmt, p=p, m=m, err=err) -> str:
            got, e = m.get(key), err.get(key)
            return f"{fmt(p[key])} / {fmt(got) if got else '–'} | {f'{e:+.1%}' if e is not None else '–'}"

        mfu = f"{m['mfu']:.1%}" if m.get("mfu") and not m.get("mfu_unreliable") else "–"
        partial = " (partial¹)" if data.get("partial") else ""
        rows.append(f"| [{name}]({link}/report.md){partial} | {cell('peak_memory_bytes', _bytes)} | "
                    f"{cell('step_seconds', _seconds)} | {cell('tokens_per_s', lambda x: f'{x:,.0f}')} | {mfu} |")
    if not rows:
        return []
    return ["### Plan vs measured, every stage", "",
            "Each training run asked the planner (`kiln plan`) about itself before its first step; predicted / "
            "measured, and the error (predicted / measured − 1). Step time and tokens/s are predicted at the "
            "assumed MFU (`kiln plan … calibrate=RUN` uses a run's measured one); the memory model is the "
            "planner's own, checked here on every workload.", "",
            "| run | peak memory | error | step time | error | tokens/s | error | measured MFU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, ""] + (
        ["¹ the run does work the planner does not model (a teacher's forward, rollouts): its own report says "
         "what; its figures are for the modelled part.", ""] if any("(partial¹)" in r for r in rows) else [])


def plan_vs_measured(run: Path) -> list[str]:
    """The "Plan vs measured" lines of a run's report, from its plan_vs_run.json (nothing without one)."""
    path = run / PLAN_VS_RUN
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    p, m, err = data.get("predicted"), data.get("measured") or {}, data.get("error") or {}
    lines = ["### Plan vs measured", ""]
    if not p:
        return lines + [f"No prediction: {data.get('no_prediction') or 'the planner could not model this run'}.", ""]
    partial = data.get("partial") or []
    lines += [
        f"Before its first step the run asked the planner (`kiln plan`'s memory and step model) about itself: "
        f"{p['devices']} × {p['device']}, layout {p['layout']} (dp_replicate×dp_shard×tp×pp), "
        f"{p['microbatches']} micro-batch{'es' if p['microbatches'] > 1 else ''} of {p['micro_batch']} × {p['seq_len']} "
        f"per {'pipeline pass' if p.get('schedule') else 'step'}, {p['precision']}, "
        f"{p['peak_flops_per_device'] / 1e9:,.0f} GFLOP/s peak per device, an assumed MFU of {p['mfu']:.0%}"
        + (" (partial: see below)" if partial else "") + ". Error = predicted / measured − 1.", "",
        "| figure | predicted | measured | error |", "|---|---|---|---|"]

    def row(name: str, key: str, fmt, note: str = "") -> None:
        got = m.get(key)
        e = err.get(key)
        lines.append(f"| {name} | {fmt(p[key])} | {fmt(got) + note if got else 'not measured'} | "
                     f"{f'{e:+.1%}' if e is not None else '–'} |")

    warm = " (warm-up steps only: no step was timed after them)" if m.get("timing") == "warm-up" else ""
    row("peak memory per device", "peak_memory_bytes", _bytes)
    row("step time", "step_seconds", _seconds, warm)
    row("tokens/s (all devices)", "tokens_per_s", lambda x: f"{x:,.0f}", warm)
    row(f"total time, {p['steps']} steps", "total_seconds", _seconds,
        " (wall time: warm-up, evaluation and checkpoints included)")
    row(f"cost at {_usd(p['price_per_device_hour'])} per device-hour", "cost_usd", _usd)
    if m.get("mfu_unreliable"):
        lines.append(f"| MFU while computing | {p['mfu']:.0%} (assumed) | unreliable: reads {m['mfu']:.0%} > 100%, "
                     "the matmul peak was timed low | – |")
    elif m.get("mfu"):
        lines.append(f"| MFU while computing | {p['mfu']:.0%} (assumed) | {m['mfu']:.1%} | – |")
    lines.append("")
    for reason in partial:
        lines.append(f"- **partial prediction**: {reason}")
    lines.append(f"- measured peak memory: {m.get('memory_source', 'not measured')}")
    if data.get("calibration") and not partial:
        lines.append(f"- `kiln plan … calibrate={run}` plans with this run's measured MFU instead of the assumed one")
    lines.append("")
    return lines


def training_section(run: Path) -> list[str]:
    """The "Training" lines of a run's report (nothing when it logged no step)."""
    metrics = read_metrics(run)
    if not metrics:
        return []
    baseline = (read_manifest(run / "data") or {}).get("unigram_bpb")
    lines: list[str] = []
    validated = any(k.startswith("val_") for m in metrics for k in m)
    caption = plot_training(metrics, run / "loss.png", baseline, validated)
    if caption:
        lines += ["## Training", "", f"![{caption}](loss.png)", ""]
    final = [m for m in metrics if "val_bpb" in m]
    speed = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    mfu = [m["mfu"] for m in metrics if "mfu" in m]
    last = metrics[-1]
    cfg_text = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else ""
    ck = sorted((run / "checkpoints").glob("step_*/checkpoint.json")) if (run / "checkpoints").is_dir() else []
    info = json.loads(ck[-1].read_text()) if ck else {}
    model = info.get("model", {})
    if model:
        lines.append(
            f"- model: d_model {model['d_model']}, {model['n_layers']} layers, {model['n_heads']} heads "
            f"({model['n_kv_heads']} KV), vocab {model['vocab_size']}, context {model['max_seq_len']}"
        )
    lines += [
        f"- steps: {last['step']}, tokens seen: {last.get('tokens', 0):,}, wall time {last.get('elapsed_s', 0):.0f} s",
        _throughput_line(speed, mfu, [m["peak_flops"] for m in metrics if "peak_flops" in m]),
    ]
    if not validated:
        lines.append("- validation: none ran (the held-out split holds no tokens, or train.eval_every is 0)")
    if final:
        f = final[-1]
        verdict = ""
        if baseline:
            gain = 100 * (1 - f["val_bpb"] / baseline)
            verdict = f" vs the unigram baseline {baseline:.3f} ({abs(gain):.0f}% {'lower' if gain >= 0 else 'higher'})"
        windows = HeldOutWindows.from_dict(info.get("validation"))
        where = f" on {windows.describe()} of the held-out split" if windows else ""
        lines.append(f"- final validation{where}: loss {f['val_loss']:.4f} nats/token, **{f['val_bpb']:.4f} bits/byte**"
                     f"{verdict}; `kiln eval` and `kiln quantize` score the same windows")
    skipped = last.get("skipped_steps", 0)
    lines.append(f"- steps skipped by the loss-spike guard: {skipped}")
    planned = plan_vs_measured(run)
    if planned:
        lines += ["", *planned]
    if cfg_text:
        lines += ["", "<details><summary>resolved config</summary>", "", "```yaml", cfg_text.rstrip(), "```",
                  "", "</details>"]
    lines.append("")

    return lines


def push_training_section(run_dir: str | Path) -> Path:
    """Write the run's "training" report section and rebuild report.md; returns the report's path."""
    run = Path(run_dir)
    return write_section(run, "training", training_section(run))
