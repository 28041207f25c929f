"""Models side by side: decode speed measured in turns, and the speedrun's model table (parameters,
bytes on disk, held-out bits per byte, decode tokens/s, $ per million tokens) for float and
quantized runs alike."""

from __future__ import annotations

from pathlib import Path

from kiln.eval.scoring import describe_heldout, heldout_bits_per_byte, run_windows
from kiln.hardware import in_fresh_process
from kiln.hardware import usd_per_hour as price_for
from kiln.infer.generate import decode_tokens_per_s
from kiln.infer.load import load


def compare_decode(runs: dict[str, str | Path], rounds: int = 8, device: str = "auto", **kw) -> dict[str, float]:
    """Decode tokens/s of several runs measured in turns (one run each per round, the best round
    kept), so that a busy machine's slow spells do not fall on one model only; in a fresh process,
    as `kiln generate` or a server would decode (`kiln.hardware.in_fresh_process`)."""
    return in_fresh_process(_compare_decode, {k: str(v) for k, v in runs.items()}, rounds, device, kw)


def _compare_decode(runs: dict[str, str], rounds: int, device: str, kw: dict) -> dict[str, float]:
    models = {name: load(run, device, "auto", key="run").model for name, run in runs.items()}
    best = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for name, model in models.items():
            best[name] = max(best[name], decode_tokens_per_s(model, repeats=1, **kw))
    return best


def model_row(run: str | Path, label: str = "", data: str | Path | None = None, device: str = "auto",
              usd_per_hour: float = 0.0, heldout: bool = True, tokens_per_s: float | None = None) -> dict:
    """One row of the speedrun's model table for a run (float or quantized): parameters, bytes on
    disk, held-out bits per byte (`kiln.eval.scoring.heldout_bits_per_byte` on the windows the run
    validated on: the figure training and `kiln eval` print for it), decode tokens/s at batch 1
    (measured unless `tokens_per_s` is given, e.g. by `compare_decode`) and $ per million decoded
    tokens at `usd_per_hour` (0 = the assumed price for the device)."""
    lm = load(run, device, key="run")
    ckpt, info, model, dev, mc = lm.source, lm.info, lm.model, lm.device, lm.model.cfg
    files = [ckpt / "model.safetensors"] if (ckpt / "model.safetensors").is_file() else list(ckpt.rglob("*.distcp"))
    on_disk = sum(f.stat().st_size for f in files)
    ddir = Path(data) if data else lm.data
    h = heldout_bits_per_byte(model, ddir, run_windows(lm), lm.n_vocab) if ddir and heldout else None
    tps = tokens_per_s or decode_tokens_per_s(model)
    price = price_for(usd_per_hour, dev)
    q = info.get("quantization")
    kind = "fp32" if not q else q["format"] + (f" g{q['group_size']}" if q.get("group_size") else "") + f" {q['method']}"
    return {"model": label or Path(run).name, "format": kind, "params": mc.num_params(), "bytes": on_disk,
            "fp16_share": on_disk / (2 * mc.num_params()), "bpb": h and h["bpb"], "heldout": h and describe_heldout(h),
            "decode_tokens_per_s": tps,
            "usd_per_million_tokens": price / 3600 / tps * 1e6, "usd_per_hour": price, "device": str(dev)}


def format_rows(rows: list[dict]) -> str:
    """Model rows as a Markdown table."""
    lines = ["| model | weights | parameters | bytes on disk | % of fp16 | held-out bits/byte | decode tok/s | $/M tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bpb = f"{r['bpb']:.4f}" if r.get("bpb") is not None else "—"
        lines.append(f"| {r['model']} | {r['format']} | {r['params'] / 1e6:.2f}M | {r['bytes'] / 1e6:.2f} MB | "
                     f"{100 * r['fp16_share']:.1f}% | {bpb} | {r['decode_tokens_per_s']:.0f} | "
                     f"{r['usd_per_million_tokens']:.3g} |")
    where = sorted({r["heldout"].split(": ", 1)[-1] for r in rows if r.get("heldout")})
    if where:
        lines += ["", f"Held-out bits/byte on {'; '.join(where)} of the validation split, as each run validated."]
    return "\n".join(lines)
