"""Models side by side: validation bits per byte (and closeness to a reference model), decode speed
measured in turns, and the speedrun's model table (parameters, bytes on disk, bits per byte,
decode tokens/s, $ per million tokens) for float and quantized runs alike."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.data.shards import eval_batches, open_data
from kiln.errors import KilnError
from kiln.hardware import usd_per_hour as price_for
from kiln.infer.generate import decode_tokens_per_s
from kiln.infer.load import load


@torch.no_grad()
def score(model: nn.Module, ddir: str | Path, batch_size: int = 8, seq_len: int = 256, max_batches: int = 16,
          reference: nn.Module | None = None) -> dict:
    """Validation bits per byte, as training's `val_bpb` (same windows, same bytes per token); with a
    `reference` model (the float one) also the mean KL(reference ‖ model) per token and the share of
    positions where both pick the same top token: measures of closeness that a few windows' bits
    per byte are too coarse for."""
    val = open_data(ddir)["splits"]["val"]
    device = next(model.buffers()).device
    nats = count = kl = same = 0.0
    for batch in eval_batches(ddir, batch_size, min(seq_len, model.cfg.max_seq_len), max_batches):
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        logits = model(ids).float()
        nats += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
        count += labels.numel()
        if reference is not None:
            ref = reference(ids).float()
            logp, ref_logp = logits.log_softmax(-1), ref.log_softmax(-1)
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            same += float((ref.argmax(-1) == logits.argmax(-1)).sum())
    if not count:
        raise KilnError(f"the validation split of '{ddir}' is shorter than one window of {seq_len + 1} tokens")
    out = {"bpb": nats / count / math.log(2) * val["tokens"] / max(val["bytes"], 1), "tokens": int(count)}
    if reference is not None:
        out.update(kl_to_float=kl / count, top1_agreement=same / count)
    return out


def compare_decode(runs: dict[str, str | Path], rounds: int = 8, device: str = "cpu", **kw) -> dict[str, float]:
    """Decode tokens/s of several runs measured in turns (one run each per round, the best round
    kept), so that a busy machine's slow spells do not fall on one model only."""
    models = {name: load(run, device, key="run").model for name, run in runs.items()}
    best = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for name, model in models.items():
            best[name] = max(best[name], decode_tokens_per_s(model, repeats=1, **kw))
    return best


def model_row(run: str | Path, label: str = "", data: str | Path | None = None, device: str = "cpu",
              usd_per_hour: float = 0.0, eval_batches: int = 16, seq_len: int = 256,
              tokens_per_s: float | None = None) -> dict:
    """One row of the speedrun's model table for a run (float or quantized): parameters, bytes on
    disk, validation bits per byte, decode tokens/s at batch 1 (measured unless `tokens_per_s` is
    given, e.g. by `compare_decode`) and $ per million decoded tokens at `usd_per_hour` (0 = the
    assumed price for the device)."""
    lm = load(run, device, key="run")
    ckpt, info, model, dev, mc = lm.source, lm.info, lm.model, lm.device, lm.model.cfg
    files = [ckpt / "model.safetensors"] if (ckpt / "model.safetensors").is_file() else list(ckpt.rglob("*.distcp"))
    on_disk = sum(f.stat().st_size for f in files)
    ddir = Path(data) if data else lm.data
    bpb = score(model, ddir, 8, seq_len, eval_batches)["bpb"] if ddir and eval_batches else None
    tps = tokens_per_s or decode_tokens_per_s(model)
    price = price_for(usd_per_hour, dev)
    q = info.get("quantization")
    kind = "fp32" if not q else q["format"] + (f" g{q['group_size']}" if q.get("group_size") else "") + f" {q['method']}"
    return {"model": label or Path(run).name, "format": kind, "params": mc.num_params(), "bytes": on_disk,
            "fp16_share": on_disk / (2 * mc.num_params()), "bpb": bpb, "decode_tokens_per_s": tps,
            "usd_per_million_tokens": price / 3600 / tps * 1e6, "usd_per_hour": price, "device": str(dev)}


def format_rows(rows: list[dict]) -> str:
    """Model rows as a Markdown table."""
    lines = ["| model | weights | parameters | bytes on disk | % of fp16 | bits/byte | decode tok/s | $/M tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bpb = f"{r['bpb']:.4f}" if r.get("bpb") is not None else "—"
        lines.append(f"| {r['model']} | {r['format']} | {r['params'] / 1e6:.2f}M | {r['bytes'] / 1e6:.2f} MB | "
                     f"{100 * r['fp16_share']:.1f}% | {bpb} | {r['decode_tokens_per_s']:.0f} | "
                     f"{r['usd_per_million_tokens']:.3g} |")
    return "\n".join(lines)
