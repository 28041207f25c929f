"""`kiln quantize`: weight-only INT8 (per output channel) and INT4 (group-wise, two values per
byte) checkpoints, by round-to-nearest or GPTQ calibrated on the run's own training shards. The
stored format and the modules computing with it are `kiln.model.quant`; `kiln.infer.load` loads
a quantized run like any other. The model, its calibration, GPTQ and the before/after scores run
on the configured `device` (as every verb picks it), in full fp32 (TF32 off on CUDA); what is
written comes from the CPU.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from kiln.data.chat import copy_format, speaks_chat
from kiln.data.shards import open_data
from kiln.data.tokenizer import token_count
from kiln.errors import KilnError
from kiln.eval.scoring import describe_heldout, heldout_bits_per_byte, run_windows
from kiln.infer.load import RunCheckpoint, load, model_of, open_checkpoint
from kiln.model.config import ModelConfig
from kiln.model.quant import (
    FORMAT_VERSION,
    FORMATS,
    GROUP_SIZES,
    METADATA_KEY,
    QuantizedTensor,
    matrix_names,
    matrix_shape,
    pack_int4,
    stored_tensors,
)
from kiln.report import write_section
from kiln.runs import atomic_dir, read_manifest, write_json
from kiln.train.checkpoint import CheckpointManager
from kiln.train.parallel import pick_device


def check_group_size(name: str, k: int, fmt: str, group_size: int) -> None:
    """int4 groups run along a matrix's input dimension: they must divide it."""
    if fmt == "int4" and k % group_size:
        fits = [g for g in GROUP_SIZES if k % g == 0]
        fix = f"pick group_size={' or '.join(map(str, fits))}" if fits else "this model cannot use int4"
        raise KilnError(f"quantize.group_size={group_size} does not divide the input size {k} of '{name}'; {fix}")


def int4_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit grid of a group (..., g): (scale, min), already rounded to their stored fp16."""
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6).half().float()
    return scale, lo.half().float()


def int8_scale(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row scale: the row's largest magnitude maps to 127."""
    return (w.abs().amax(-1) / 127).clamp(min=1e-12)


def quantize_rtn(w: torch.Tensor, fmt: str, group_size: int = 64) -> QuantizedTensor:
    """Round-to-nearest: each value to the closest point of its row's (int8) or group's (int4) grid."""
    w = w.detach().float()
    if fmt == "int8":
        scale = int8_scale(w)
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return QuantizedTensor("int8", q, scale)
    groups = w.unflatten(-1, (-1, group_size))
    scale, mn = int4_params(groups)
    q = ((groups - mn[..., None]) / scale[..., None]).round().clamp(0, 15).flatten(-2)
    return QuantizedTensor("int4", pack_int4(q), scale.half(), mn.half(), group_size)


def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, fmt: str, group_size: int = 64,
                  damp: float = 0.01) -> QuantizedTensor:
    """GPTQ (Frantar et al., 2022): quantize one column at a time and spread its rounding error
    over the columns not yet quantized, weighted by the inverse of the inputs' second moment
    `hessian` (K × K, Σ xxᵀ over calibration tokens), so the layer's output on inputs like the
    calibration ones changes least. int4 group grids are fixed when their first column is reached
    (from the error-updated weights); int8 rows keep the round-to-nearest scale."""
    w = w.detach().float().clone()
    n, k = w.shape
    # the inverse in float64, on the weight's device (MPS has no float64: there, on the CPU)
    h = hessian.to("cpu" if w.device.type == "mps" else w.device, torch.float64).clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead.to(w.device)] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        u = torch.linalg.cholesky(hinv, upper=True).float().to(w.device)
    except RuntimeError:  # not positive definite even with damping: nothing to calibrate against
        return quantize_rtn(w, fmt, group_size)
    q = torch.empty(n, k, device=w.device)
    if fmt == "int8":
        scale = int8_scale(w)
        mins = None
    else:
        scale, mins = (torch.empty(n, k // group_size, device=w.device) for _ in range(2))
    block = max(128, group_size)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, device=w.device)
        for i in range(i2 - i1):
            col = i1 + i
            if fmt == "int4":
                if col % group_size == 0:
                    g = col // group_size
                    scale[:, g], mins[:, g] = int4_params(w1[:, i : i + group_size])
                s, m = scale[:, col // group_size], mins[:, col // group_size]
                qc = ((w1[:, i] - m) / s).round().clamp(0, 15)
                deq = qc * s + m
            else:
                qc = (w1[:, i] / scale).round().clamp(-127, 127)
                deq = qc * scale
            q[:, col] = qc
            e = (w1[:, i] - deq) / u[col, col]
            w1[:, i:] -= e[:, None] * u[col, col:i2][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    if fmt == "int8":
        return QuantizedTensor("int8", q.to(torch.int8), scale)
    return QuantizedTensor("int4", pack_int4(q), scale.half(), mins.half(), group_size)


def check_model(mc: ModelConfig, fmt: str, group_size: int) -> None:
    """Refuse a format the model's shapes cannot take, before any work."""
    if fmt not in FORMATS:
        raise KilnError(f"quantize.format={fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "int4" and group_size not in GROUP_SIZES:
        raise KilnError(f"quantize.group_size={group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    for name in matrix_names(mc):
        check_group_size(name.removesuffix(".weight"), matrix_shape(mc, name)[1], fmt, group_size)


class SecondMoment:
    """Σ xxᵀ / n over the inputs a linear layer sees, gathered by a forward pre-hook until `finish`."""

    def __init__(self, layer: nn.Linear) -> None:
        self.sum, self.n = torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device), 0
        self.handle = layer.register_forward_pre_hook(self)

    def __call__(self, _layer, args) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        self.sum.addmm_(x.T, x)
        self.n += x.shape[0]

    def finish(self) -> torch.Tensor:
        self.handle.remove()
        return self.sum / max(self.n, 1)


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """fp32 matmuls at full precision on CUDA for the duration (`use_device` turns TF32 on for
    training; second moments, GPTQ's error propagation and small KL figures want all 23 bits)."""
    if device.type != "cuda":
        yield
        return
    flag = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: str, group_size: int = 64, method: str = "rtn",
                   calibration: Iterable[torch.Tensor] = (), damp: float = 0.01, progress=None) -> dict[str, QuantizedTensor]:
    """Every matrix of a float `Transformer` in its stored form, on the CPU. `method="gptq"` runs
    the calibration sequences (token-id batches) through the model block by block, each block seeing
    the outputs of the blocks already quantized, and quantizes each projection with GPTQ against
    its inputs' second moment; the embedding table (the LM head too when tied, since GPTQ's error
    compensation is valid only for a matmul's inputs) is rounded to nearest. An untied LM head
    is calibrated on the final norm's outputs. The work runs on the model's device."""
    mc: ModelConfig = model.cfg
    check_model(mc, fmt, group_size)
    params = dict(model.named_parameters())
    if method == "rtn":
        return {name: quantize_rtn(params[name], fmt, group_size).to("cpu") for name in matrix_names(mc)}
    if method != "gptq":
        raise KilnError(f"quantize.method={method!r} is not rtn or gptq")
    device = params["tok_emb.weight"].device
    batches = [b.to(device) for b in calibration]
    if not batches:
        raise KilnError("GPTQ needs calibration sequences; the source run's training shards gave none")
    out = {"tok_emb.weight": quantize_rtn(params["tok_emb.weight"], fmt, group_size)}
    t = batches[0].shape[1]
    cos, sin = model.rope_cos[:t], model.rope_sin[:t]
    hidden = [model.tok_emb(b) for b in batches]
    # projections that read the same input share one second moment
    readers = {"attn.wq": ("attn.wq", "attn.wk", "attn.wv"), "attn.wo": ("attn.wo",),
               "mlp.w1": ("mlp.w1", "mlp.w3"), "mlp.w2": ("mlp.w2",)}
    for i, block in model.layers.items():
        moments = {key: SecondMoment(block.get_submodule(key)) for key in readers}
        for x in hidden:
            block(x, cos, sin)
        for key, names in readers.items():
            moment = moments[key].finish()
            for sub in names:
                lin = block.get_submodule(sub)
                qt = quantize_gptq(lin.weight, moment, fmt, group_size, damp)
                lin.weight.copy_(qt.dequantize(lin.weight.dtype))  # later blocks see this block quantized
                out[f"layers.{i}.{sub}.weight"] = qt.to("cpu")
        hidden = [block(x, cos, sin) for x in hidden]
        if progress:
            progress(f"block {int(i) + 1}/{mc.n_layers} quantized")
    if not mc.tie_embeddings:
        final = [model.norm(x).reshape(-1, mc.d_model).float() for x in hidden]
        moment = sum(x.T @ x for x in final) / sum(x.shape[0] for x in final)
        out["lm_head.weight"] = quantize_gptq(model.lm_head.weight, moment, fmt, group_size, damp)
    return {name: qt.to("cpu") for name, qt in out.items()}


# ---- files -----------------------------------------------------------------------------------
def quantization_entry(fmt: str, group_size: int, method: str, **extra) -> dict:
    """The format tag that checkpoint.json (and the safetensors metadata) carry."""
    entry = {"format": fmt, "method": method, "version": FORMAT_VERSION, **extra}
    if fmt == "int4":
        entry["group_size"] = group_size
    return entry


# ---- `kiln quantize` -------------------------------------------------------------------------
def calibration_batches(ddir: Path, sequences: int, seq_len: int, batch_size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """`sequences` windows of the training split (a seeded draw), as token-id batches."""
    from kiln.data.shards import TokenLoader

    loader = TokenLoader(ddir, "train", min(batch_size, sequences), seq_len, seed)
    out, left = [], sequences
    while left > 0:
        ids = loader.next_batch()["input_ids"]
        out.append(ids[:left])
        left -= len(out[-1])
    return out


def quantize_checkpoint(source: str | Path, out: str | Path, qc, data_path: str = "", say=print,
                        device: str | torch.device = "cpu") -> dict:
    """Quantize `source` (a run or checkpoint) into the run directory `out`; returns the figures.

    `qc` is a `kiln.config.QuantizeConfig`. The result is a checkpoint like any other
    (`out/checkpoints/step_N/`, checkpoint.json carrying the `quantization` entry) beside a copy
    of the tokenizer, so `kiln generate / serve / eval out=OUT` read it as they read a trained run.
    The float model is scored, calibrated and quantized on `device` (a `device=` setting: auto,
    cpu, cuda, ...) in fp32; the stored tensors are written from the CPU.
    """
    ck = _source(source, Path(out), qc)
    out = Path(out)
    ddir = _data(ck, data_path, qc)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    with exact_fp32(dev):
        return _quantize(ck, out, qc, ddir, dev, say)


def _quantize(ck: RunCheckpoint, out: Path, qc, ddir: Path | None, dev: torch.device, say) -> dict:
    group = qc.group_size if qc.format == "int4" else 0
    seq_len = min(qc.calib_seq_len or 256, ck.model.max_seq_len)
    windows = run_windows(info=ck.info, context=ck.model.max_seq_len)
    vocab = min(token_count(ck.tokenizer), ck.model.vocab_size)

    t0 = time.perf_counter()
    model = model_of(ck, dev).to(dev).eval()
    before = heldout_bits_per_byte(model, ddir, windows, vocab) if ddir and qc.evaluate else None
    calib = calibration_batches(ddir, qc.calib_sequences, seq_len) if qc.method == "gptq" else []
    say(f"quantize: {ck.path} → {qc.format}{f' g{group}' if group else ''} by {qc.method}"
        + (f" ({qc.calib_sequences} calibration windows of {seq_len} tokens)" if calib else "")
        + (f" on {dev}" if dev.type != "cpu" else ""))
    stored = quantize_model(model, qc.format, qc.group_size, qc.method, calib, qc.damp,
                            progress=lambda m: say(f"quantize: {m}"))
    entry = quantization_entry(qc.format, group, qc.method,
                               **({"calib_sequences": qc.calib_sequences, "calib_seq_len": seq_len,
                                   "damp": qc.damp} if qc.method == "gptq" else {}))
    final = _write_checkpoint(ck, out, stored_tensors(model, stored), entry, ddir)

    after = {}
    if before is not None:
        if qc.method == "gptq":  # GPTQ left its own dequantized weights in `model`: read the float ones again
            model = model_of(ck, dev).to(dev).eval()
        after = heldout_bits_per_byte(load(final, dev, key="quantize").model, ddir, windows, vocab, reference=model)
    mc = ck.model
    fp16 = 2 * mc.num_params()
    nbytes = (final / "model.safetensors").stat().st_size
    result = {"source": str(ck.path), "checkpoint": str(final), **entry, "params": mc.num_params(), "bytes": nbytes,
              "fp16_bytes": fp16, "fp16_share": nbytes / fp16, "bpb_before": before and before["bpb"],
              "bpb_after": after.get("bpb"), "bpb_increase": (after["bpb"] / before["bpb"] - 1) if before else None,
              "heldout": before and describe_heldout(before),
              "kl_to_float": after.get("kl_to_float"), "top1_agreement": after.get("top1_agreement"),
              "eval_tokens": after.get("tokens"), "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "quantize.json", result)
    _write_report(out, result)
    quality = (f"; held-out bits/byte {result['bpb_before']:.4f} → {result['bpb_after']:.4f} ({100 * result['bpb_increase']:+.3f}%) "
               f"{result['heldout']}, KL from the float model {result['kl_to_float']:.2e} nats/token" if before else "")
    say(f"quantize: {nbytes / 1e6:.2f} MB on disk, {100 * result['fp16_share']:.1f}% of fp16's {fp16 / 1e6:.2f} MB"
        f"{quality}; checkpoint {final}")
    return result


def _source(source: str | Path, out: Path, qc) -> RunCheckpoint:
    """The checkpoint to quantize, refused in one line if it cannot be: already quantized, the output
    run itself, not a language model, or shaped so the format does not fit; and `out` must not hold
    a training run."""
    ck = open_checkpoint(source, "quantize.source", "quantize")
    q = ck.info.get("quantization")
    if q:
        tag = q.get("format", q) if isinstance(q, dict) else q
        origin = ck.info.get("quantized_from")
        raise KilnError(f"quantize.source={source} is already quantized ({tag}); quantize the float run it came "
                        f"from{f' ({origin})' if origin else ''} instead")
    if out.resolve() == ck.run.resolve():
        raise KilnError(f"out={out} is the source run itself; write the quantized model to a new out=")
    done = CheckpointManager(out).complete()
    if done and CheckpointManager.info(done[-1]).get("workload") != "quantize":
        raise KilnError(f"'{out}' holds a {CheckpointManager.info(done[-1]).get('workload', 'training')} run; "
                        "choose a new out= for the quantized model")
    if not ck.model.causal:
        raise KilnError(f"{ck.path} holds a bidirectional (causal=false) model; kiln quantize serves language models")
    check_model(ck.model, qc.format, qc.group_size)
    return ck


def _data(ck: RunCheckpoint, data_path: str, qc) -> Path | None:
    """The prepared data to calibrate on and score with (data.path, else the run's own or the one it
    recorded), checked to be of the model's tokenizer; GPTQ cannot go without it."""
    info = ck.info
    ddir = Path(data_path) if data_path else ck.data
    if ddir is not None and not data_path and read_manifest(ddir) is None:  # the recorded data is gone
        ddir = None
    if ddir is not None:
        man = open_data(ddir)
        if info.get("tokenizer_sha256") and man.get("tokenizer_sha256") != info["tokenizer_sha256"]:
            raise KilnError(f"the data in '{ddir}' was prepared with a different tokenizer than {ck.path}'s; "
                            "set data.path= to data prepared with the model's tokenizer")
    if qc.method == "gptq" and ddir is None:
        raise KilnError(f"quantize.method=gptq calibrates on the source run's training shards, and {ck.run} has "
                        "none (no data/ and no data recorded); set data.path=DIR or use method=rtn")
    return ddir


def _write_checkpoint(ck: RunCheckpoint, out: Path, tensors: dict[str, torch.Tensor], entry: dict,
                      ddir: Path | None) -> Path:
    """The quantized checkpoint (`out/checkpoints/step_N`, whole or not at all) and the tokenizer beside it."""
    from safetensors.torch import save_file

    info = ck.info
    meta = {"workload": "quantize", "model": ck.model.to_dict(), "quantization": entry, "quantized_from": str(ck.path),
            **{k: info[k] for k in ("tokenizer_sha256", "validation") if k in info},
            **({"chat": True} if speaks_chat(info) else {}), **({"data": str(ddir)} if ddir else {})}
    ckpts = CheckpointManager(out)
    final = ckpts.path(int(info.get("step", 0)))
    with atomic_dir(final) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={METADATA_KEY: json.dumps(entry, sort_keys=True)})
        CheckpointManager.write_info(tmp, int(info.get("step", 0)), meta)
    ckpts.mark_latest(final)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copy2(ck.tokenizer_file, out / "tokenizer" / "tokenizer.json")
    copy_format(ck.tokenizer_file, out / "tokenizer")  # an imported model's chat format travels with it
    return final


def _write_report(out: Path, r: dict) -> None:
    grid = f" with groups of {r['group_size']}" if r.get("group_size") else " per output channel"
    lines = ["## Quantization", "",
             f"- `{r['source']}` → **{r['format']}**{grid}, by {r['method']} ({r['seconds']} s)",
             f"- on disk: {r['bytes'] / 1e6:.2f} MB, {100 * r['fp16_share']:.1f}% of the {r['fp16_bytes'] / 1e6:.2f} MB "
             f"of fp16 weights ({r['params']:,} parameters)"]
    if r.get("bpb_before") is not None:
        lines.append(f"- held-out bits/byte: {r['bpb_before']:.4f} → {r['bpb_after']:.4f} "
                     f"({100 * r['bpb_increase']:+.3f}%) {r['heldout']}; KL from the float model "
                     f"{r['kl_to_float']:.2e} nats/token, same top token at {100 * r['top1_agreement']:.1f}% of positions")
    write_section(out, "quantize", lines)


def run_quantize(cfg) -> dict:
    """`kiln quantize source=RUN out=NEW format=int8|int4 [method=gptq group_size=64]`."""
    from kiln.config import dump_yaml
    from kiln.runs import atomic_write_text

    if not cfg.quantize.source:
        raise KilnError("quantize.source is empty; name the trained run to quantize, e.g. "
                        "kiln quantize source=runs/quickstart out=runs/quickstart-int8")
    result = quantize_checkpoint(cfg.quantize.source, cfg.out, cfg.quantize, cfg.data.path, device=cfg.device)
    atomic_write_text(Path(cfg.out) / "config.yaml", dump_yaml(cfg))
    return result
