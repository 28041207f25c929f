"""`kiln quantize`: weight-only INT8 (per output channel) and INT4 (group-wise, two values per
byte) checkpoints, by round-to-nearest or GPTQ calibrated on the run's own training shards, and
the loader that serves them to the engine, `kiln eval` and `kiln serve`.

Stored form (`model.safetensors`, format tag in `checkpoint.json["quantization"]` and in the
file's metadata), for a weight W of shape (N, K):

- int8: `NAME.q` int8 (N, K), `NAME.scale` fp32 (N,): W ≈ q · scale, q in [-127, 127];
- int4: `NAME.q` uint8 (N, K/2), the value of column 2j in the low nibble and 2j+1 in the high
  one, `NAME.scale` and `NAME.min` fp16 (N, K/g): W ≈ q · scale + min per group of g columns.

Every matrix is quantized, the token embedding included: a tied embedding / LM head is stored
once and serves both uses (rows looked up for the embedding, a matmul for the head). Norm gains
stay in full precision. Activations and the KV cache stay in the compute dtype (fp32 on CPU).

Matmuls: on CPU, decode-sized inputs to large matrices go through ATen's weight-only kernels
(`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`, bf16 activations); small
matrices (under `KERNEL_MIN_ELEMENTS`, where a kernel call costs more than the fp32 matmul) are
dequantized once; larger inputs (prefill, scoring) and other devices dequantize the weight and run
a plain matmul, so the numbers a bits-per-byte score sees are those of the stored weights.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.model.config import ModelConfig

FORMATS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
FORMAT_VERSION = 1
METADATA_KEY = "kiln_quantization"
# At most this many rows (tokens) take the CPU kernels; more rows amortize a dequantized matmul.
KERNEL_MAX_ROWS = 16
# A matrix with fewer elements than this is dequantized once, on first use, and multiplied in the
# compute dtype: at decode sizes the weight-only kernels' fixed cost (bf16 casts, ~20 µs a call on
# this CPU) exceeds the fp32 matmul of a small matrix that sits in cache (256 × 256: 21 µs against
# 11), while from about half a million elements the bytes they save win (256 × 4096: 1.1×,
# 1024 × 4096: 1.5×, 4096 × 1024: 2.1× fp32). What is stored on disk is the quantized form either way.
KERNEL_MIN_ELEMENTS = 1 << 19


# ---- packing and the two formats ------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 → (N, K/2) uint8: column 2j in the low nibble, 2j+1 in the high one."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 → (N, K) uint8 values 0..15 (the inverse of `pack_int4`)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


@dataclass
class QuantizedTensor:
    """One weight matrix in its stored form (see the module docstring)."""

    format: str
    q: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None = None  # int4 only
    group_size: int = 0  # int4 only

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.q.shape
        return (n, 2 * k) if self.format == "int4" else (n, k)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight (or only `rows` of it, for an embedding lookup)."""
        q, scale, mn = self.q, self.scale, self.min
        if rows is not None:
            q, scale = q[rows], scale[rows]
            mn = mn[rows] if mn is not None else None
        if self.format == "int8":
            return (q.to(dtype) * scale.to(dtype)[..., None])
        values = unpack_int4(q).to(dtype).unflatten(-1, (-1, self.group_size))
        return (values * scale.to(dtype)[..., None] + mn.to(dtype)[..., None]).flatten(-2)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {f"{name}.q": self.q, f"{name}.scale": self.scale}
        if self.min is not None:
            out[f"{name}.min"] = self.min
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors("w").values())


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
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        u = torch.linalg.cholesky(hinv, upper=True).float()
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


# ---- modules that compute with stored weights ------------------------------------------------
class QuantWeight(nn.Module):
    """One stored matrix as buffers, with the matmul and the row lookup on it. The CPU kernels'
    layouts are built on first use per device (not saved: the stored form is the portable one)."""

    def __init__(self, qt: QuantizedTensor) -> None:
        super().__init__()
        self.format, self.group_size = qt.format, qt.group_size
        self.shape = qt.shape
        self.small = math.prod(qt.shape) < KERNEL_MIN_ELEMENTS  # dequantized once, not sent to the kernels
        # ATen's CPU kernels assume allocator-aligned rows; a tensor read from a file may sit anywhere
        for name, t in (("q", qt.q), ("scale", qt.scale), ("min", qt.min)):
            self.register_buffer(name, t.clone() if t is not None and t.data_ptr() % 64 else t)
        self._kernel = None  # the CPU kernel's matmul, built on first use; False = none for this device
        self._dense: torch.Tensor | None = None  # a small matrix, dequantized once (see KERNEL_MIN_ELEMENTS)

    def stored(self) -> QuantizedTensor:
        return QuantizedTensor(self.format, self.q, self.scale, self.min, self.group_size)

    def _apply(self, fn, recurse=True):
        self._kernel = self._dense = None  # moved or cast: rebuild from the stored form
        return super()._apply(fn, recurse)

    def _cpu_kernel(self):
        """`matmul(x_bf16) -> y_bf16` on ATen's CPU kernel for this matrix, or False where there is none."""
        kernel = False
        if self.q.device.type == "cpu" and not self.small:
            q, scale = self.q, self.scale
            if self.format == "int8":
                scale_bf16 = scale.to(torch.bfloat16)
                kernel = lambda x: torch._weight_int8pack_mm(x, q, scale_bf16)  # noqa: E731
            elif self.shape[0] % 16 == 0:
                packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(q).to(torch.int32), 1)
                # ATen's grid is (q - 8) · scale + zero, with groups along K: (K/g, N, 2)
                zero = self.min.float() + 8 * scale.float()
                sz = torch.stack([scale.float(), zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
                g = self.group_size
                kernel = lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, g, sz)  # noqa: E731
        self._kernel = kernel
        return kernel

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        rows = x.numel() // k
        kernel = self._kernel
        if kernel is None:
            kernel = self._cpu_kernel()
        if not kernel or rows > KERNEL_MAX_ROWS or torch.is_grad_enabled():
            if self.small and not torch.is_grad_enabled():
                if self._dense is None or self._dense.dtype != x.dtype:
                    self._dense = self.stored().dequantize(x.dtype)
                return F.linear(x, self._dense)
            return F.linear(x, self.stored().dequantize(x.dtype))
        # a bf16 copy is dense whatever the input's strides (the kernels read dense rows)
        y = kernel(x.reshape(rows, k).to(torch.bfloat16, memory_format=torch.contiguous_format))
        return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.stored().dequantize(dtype, rows=ids)


class QuantLinear(nn.Module):
    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.qweight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qweight.linear(x)


class QuantEmbedding(nn.Module):
    """Token embedding from a stored matrix; `dtype` is the compute dtype of what it returns."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.qweight, self.dtype = weight, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.rows(ids, self.dtype)


# ---- the model -------------------------------------------------------------------------------
def matrix_names(mc: ModelConfig) -> list[str]:
    """Every matrix of the model, by parameter name; a tied LM head is the embedding."""
    names = ["tok_emb.weight"] + ([] if mc.tie_embeddings else ["lm_head.weight"])
    for i in range(mc.n_layers):
        names += [f"layers.{i}.attn.{p}.weight" for p in ("wq", "wk", "wv", "wo")]
        names += [f"layers.{i}.mlp.{p}.weight" for p in ("w1", "w3", "w2")]
    return names


def matrix_shape(mc: ModelConfig, name: str) -> tuple[int, int]:
    """(N, K) of a matrix: output and input size."""
    d, hd = mc.d_model, mc.head_dim
    last = name.split(".")[-2]
    return {"tok_emb": (mc.vocab_size, d), "lm_head": (mc.vocab_size, d), "wq": (mc.n_heads * hd, d),
            "wk": (mc.n_kv_heads * hd, d), "wv": (mc.n_kv_heads * hd, d), "wo": (d, mc.n_heads * hd),
            "w1": (mc.ffn_hidden, d), "w3": (mc.ffn_hidden, d), "w2": (d, mc.ffn_hidden)}[last]


def _module(model: nn.Module, weight_name: str) -> tuple[nn.Module, str]:
    path = weight_name.removesuffix(".weight").split(".")
    parent = model.get_submodule(".".join(path[:-1])) if len(path) > 1 else model
    return parent, path[-1]


def attach(model: nn.Module, stored: dict[str, QuantizedTensor], dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap `model`'s matrices for modules computing with `stored` (tied table: one for both uses)."""
    for name, qt in stored.items():
        weight = QuantWeight(qt)
        parent, attr = _module(model, name)
        if name == "tok_emb.weight":
            setattr(parent, attr, QuantEmbedding(weight, dtype))
            if model.cfg.tie_embeddings:
                model.lm_head = QuantLinear(weight)
        else:
            setattr(parent, attr, QuantLinear(weight))
    return model


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


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: str, group_size: int = 64, method: str = "rtn",
                   calibration: Iterable[torch.Tensor] = (), damp: float = 0.01, progress=None) -> dict[str, QuantizedTensor]:
    """Every matrix of a float `Transformer` in its stored form. `method="gptq"` runs the
    calibration sequences (token-id batches) through the model block by block, each block seeing
    the outputs of the blocks already quantized, and quantizes each projection with GPTQ against
    its inputs' second moment; the embedding table (the LM head too when tied, since GPTQ's error
    compensation is valid only for a matmul's inputs) is rounded to nearest. An untied LM head
    is calibrated on the final norm's outputs."""
    mc: ModelConfig = model.cfg
    check_model(mc, fmt, group_size)
    params = dict(model.named_parameters())
    if method == "rtn":
        return {name: quantize_rtn(params[name], fmt, group_size) for name in matrix_names(mc)}
    if method != "gptq":
        raise KilnError(f"quantize.method={method!r} is not rtn or gptq")
    batches = [b for b in calibration]
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
                out[f"layers.{i}.{sub}.weight"] = qt
                lin.weight.copy_(qt.dequantize(lin.weight.dtype))  # later blocks see this block quantized
        hidden = [block(x, cos, sin) for x in hidden]
        if progress:
            progress(f"block {int(i) + 1}/{mc.n_layers} quantized")
    if not mc.tie_embeddings:
        final = [model.norm(x).reshape(-1, mc.d_model).float() for x in hidden]
        moment = sum(x.T @ x for x in final) / sum(x.shape[0] for x in final)
        out["lm_head.weight"] = quantize_gptq(model.lm_head.weight, moment, fmt, group_size, damp)
    return out


# ---- files -----------------------------------------------------------------------------------
def quantization_entry(fmt: str, group_size: int, method: str, **extra) -> dict:
    """The format tag that checkpoint.json (and the safetensors metadata) carry."""
    entry = {"format": fmt, "method": method, "version": FORMAT_VERSION, **extra}
    if fmt == "int4":
        entry["group_size"] = group_size
    return entry


def stored_tensors(model: nn.Module, stored: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Everything the quantized checkpoint holds: stored matrices and the float rest (norm gains)."""
    from kiln.train.checkpoint import model_tensors

    tensors = {k: v for k, v in model_tensors(model).items()
               if k not in stored and not (k == "lm_head.weight" and model.cfg.tie_embeddings)}
    for name, qt in stored.items():
        tensors.update({k: v.contiguous() for k, v in qt.tensors(name).items()})
    return tensors


def read_entry(ckpt: Path, info: dict) -> dict | None:
    """checkpoint.json's quantization entry, checked to be one this kiln reads; None if not quantized."""
    q = info.get("quantization")
    if not q:
        return None
    if not isinstance(q, dict) or q.get("format") not in FORMATS:
        tag = q.get("format") if isinstance(q, dict) else q
        raise KilnError(f"{ckpt} is quantized in a format this kiln does not know ({tag!r}; it reads "
                        f"{', '.join(FORMATS)}); upgrade kiln or quantize the float run again with `kiln quantize`")
    if q.get("version", FORMAT_VERSION) > FORMAT_VERSION:
        raise KilnError(f"{ckpt} holds {q['format']} weights of format version {q['version']}, newer than this "
                        f"kiln's {FORMAT_VERSION}; upgrade kiln or quantize the float run again")
    if q["format"] == "int4" and q.get("group_size") not in GROUP_SIZES:
        raise KilnError(f"{ckpt}: quantization group_size {q.get('group_size')!r} is not one of "
                        f"{', '.join(map(str, GROUP_SIZES))}; the checkpoint is damaged: quantize again")
    return q


def _read_stored(ckpt: Path, entry: dict, mc: ModelConfig) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
    """The stored matrices and the float tensors of a quantized checkpoint, every shape checked."""
    from safetensors import SafetensorError, safe_open

    path = ckpt / "model.safetensors"
    fix = "re-run `kiln quantize` to write it again"
    try:
        with safe_open(path, framework="pt") as f:
            meta = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise KilnError(f"{path} cannot be read ({e}); {fix}") from None
    try:
        file_entry = json.loads(meta) if meta else None
    except json.JSONDecodeError:
        file_entry = None
    if not file_entry or file_entry.get("format") != entry["format"] or \
            file_entry.get("group_size") != entry.get("group_size"):
        raise KilnError(f"{path} does not hold the {entry['format']} weights checkpoint.json describes "
                        f"(its tag: {file_entry}); {fix}")
    stored, g = {}, entry.get("group_size", 0)
    for name in matrix_names(mc):
        parts = {s: tensors.pop(f"{name}.{s}", None) for s in ("q", "scale", "min")}
        n, k = matrix_shape(mc, name)
        if entry["format"] == "int8":
            want = {"q": ((n, k), torch.int8), "scale": ((n,), None)}
        else:
            want = {"q": ((n, k // 2), torch.uint8), "scale": ((n, k // g), None), "min": ((n, k // g), None)}
        for s, (shape, dtype) in want.items():
            t = parts[s]
            if t is None or tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype) or \
                    (dtype is None and not t.is_floating_point()):
                got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise KilnError(f"{path}: '{name}.{s}' is {got}, the {entry['format']} model wants {shape}; {fix}")
        stored[name] = QuantizedTensor(entry["format"], parts["q"], parts["scale"], parts["min"], g)
    return stored, tensors


def build_quantized(mc: ModelConfig, stored: dict[str, QuantizedTensor], rest: dict[str, torch.Tensor],
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, source: str = "") -> nn.Module:
    """A `Transformer` computing with `stored`, the float weights it never holds left unallocated."""
    from kiln.model.transformer import Transformer, rope_tables

    with torch.device("meta"):
        model = Transformer(mc)
    attach(model, stored, dtype)
    floats = {n: p for n, p in model.named_parameters()}
    missing = sorted(set(floats) - set(rest))
    extra = sorted(set(rest) - set(floats))
    if missing or extra:
        raise KilnError(f"{source} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
                        "re-run `kiln quantize`")
    for name, t in rest.items():
        parent, attr = name.rsplit(".", 1)
        model.get_submodule(parent)._parameters[attr] = nn.Parameter(t.to(dtype), requires_grad=False)
    model.rope_cos, model.rope_sin = rope_tables(mc.head_dim, mc.max_seq_len, mc.rope_theta)
    return model.to(device).eval()


def load_model(ckpt: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module | None:
    """A quantized checkpoint's model on `device`, ready for inference (norm gains and activations in
    `dtype`, fp32 by default), or None when the checkpoint is not quantized. A damaged file, a
    format tag this kiln does not know, or tensors that do not fit the recorded model are refused."""
    from kiln.train.checkpoint import CheckpointManager

    ckpt = Path(ckpt)
    info = CheckpointManager.info(ckpt)
    entry = read_entry(ckpt, info)
    if entry is None:
        return None
    problem = CheckpointManager(ckpt.parent.parent).verify(ckpt)
    if problem:
        raise KilnError(f"{problem}; re-run `kiln quantize` to write it again")
    mc = ModelConfig.from_dict(info["model"])
    stored, rest = _read_stored(ckpt, entry, mc)
    return build_quantized(mc, stored, rest, torch.device(device), dtype or torch.float32,
                           str(ckpt / "model.safetensors"))


def open_for_eval(spec: str | Path, device: torch.device, key: str = "eval.path") -> dict | None:
    """What `kiln eval` needs of a quantized run or checkpoint (the fields of its `LoadedModel`),
    or None when `spec` is not one, for the float path to read it instead."""
    from kiln.data.tokenizer import load_tokenizer
    from kiln.runs import read_manifest
    from kiln.train.checkpoint import CheckpointManager
    from kiln.workloads.common import check_tokenizer, find_checkpoint

    path = Path(spec)
    complete = [path] if (path / "checkpoint.json").is_file() else CheckpointManager(path).complete()
    if not complete or not CheckpointManager.info(complete[-1]).get("quantization"):
        return None
    ckpt = find_checkpoint(str(spec), key=key)
    info = CheckpointManager.info(ckpt)
    run = ckpt.parent.parent
    tfile = run / "tokenizer" / "tokenizer.json"
    check_tokenizer(tfile, info, f"{key}={spec}")
    model = load_model(ckpt, device)
    if model is None:
        return None
    data = run / "data" if read_manifest(run / "data") else Path(info["data"]) if info.get("data") else None
    return {"model": model, "tokenizer": load_tokenizer(tfile), "device": device, "kind": "checkpoint",
            "source": ckpt, "home": run, "data": data, "step": info.get("step")}


# ---- measuring -------------------------------------------------------------------------------
@torch.no_grad()
def score(model: nn.Module, ddir: str | Path, batch_size: int = 8, seq_len: int = 256, max_batches: int = 16,
          reference: nn.Module | None = None) -> dict:
    """Validation bits per byte, as training's `val_bpb` (same windows, same bytes per token); with a
    `reference` model (the float one) also the mean KL(reference ‖ model) per token and the share of
    positions where both pick the same top token: measures of closeness that a few windows' bits
    per byte are too coarse for."""
    from kiln.data.shards import eval_batches, open_data

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


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, new_tokens: int = 64, prompt_len: int = 16, batch: int = 1,
                        repeats: int = 3) -> float:
    """Greedy decode speed with the KV cache: new tokens per second after a prefill of
    `prompt_len`, the best of `repeats` runs (the machine's noise only ever slows a run down)."""
    from kiln.model.transformer import KVCache

    cfg = model.cfg
    device = next(model.buffers()).device
    dtype = model.norm.weight.dtype
    new_tokens = min(new_tokens, cfg.max_seq_len - prompt_len)
    prompt = (torch.arange(batch * prompt_len, device=device) % cfg.vocab_size).view(batch, prompt_len)
    best = math.inf
    for _ in range(repeats):
        cache = KVCache(cfg, batch, prompt_len + new_tokens, device=device, dtype=dtype)
        logits = model(prompt, cache=cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            logits = model(logits[:, -1].argmax(-1)[:, None], cache=cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return batch * new_tokens / best


def compare_decode(runs: dict[str, str | Path], rounds: int = 8, device: str = "cpu", **kw) -> dict[str, float]:
    """Decode tokens/s of several runs measured in turns (one run each per round, the best round
    kept), so that a busy machine's slow spells do not fall on one model only."""
    from kiln.serve.engine import load_model as engine_load_model
    from kiln.train.checkpoint import CheckpointManager
    from kiln.train.parallel import pick_device
    from kiln.workloads.common import find_checkpoint

    dev = pick_device(device)
    models = {}
    for name, run in runs.items():
        ckpt = find_checkpoint(str(run), key="run")
        models[name] = engine_load_model(ckpt, CheckpointManager.info(ckpt), dev, torch.float32)
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
    engine's assumed price for the device)."""
    from kiln.serve.engine import load_model as engine_load_model
    from kiln.serve.engine import usd_per_hour as price_for
    from kiln.train.parallel import pick_device
    from kiln.workloads.common import find_checkpoint

    ckpt = find_checkpoint(str(run), key="run")
    info = json.loads((ckpt / "checkpoint.json").read_text())
    dev = pick_device(device)
    model = engine_load_model(ckpt, info, dev, torch.float32)
    mc = ModelConfig.from_dict(info["model"])
    files = [ckpt / "model.safetensors"] if (ckpt / "model.safetensors").is_file() else list(ckpt.rglob("*.distcp"))
    on_disk = sum(f.stat().st_size for f in files)
    ddir = Path(data) if data else Path(info["data"]) if info.get("data") else None
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


def quantize_checkpoint(source: str | Path, out: str | Path, qc, data_path: str = "", say=print) -> dict:
    """Quantize `source` (a run or checkpoint) into the run directory `out`; returns the figures.

    `qc` is a `kiln.config.QuantizeConfig`. The result is a checkpoint like any other
    (`out/checkpoints/step_N/`, checkpoint.json carrying the `quantization` entry) beside a copy
    of the tokenizer, so `kiln generate / serve / eval out=OUT` read it as they read a trained run.
    """
    from safetensors.torch import save_file

    from kiln.data.shards import open_data
    from kiln.model.transformer import Transformer
    from kiln.runs import atomic_dir, read_manifest, write_json
    from kiln.train.checkpoint import CheckpointManager, load_model_tensors
    from kiln.workloads.common import check_tokenizer, checkpoint_tensors, find_checkpoint

    src = find_checkpoint(str(source), key="quantize.source")
    info = CheckpointManager.info(src)
    q = info.get("quantization")
    if q:
        tag = q.get("format", q) if isinstance(q, dict) else q
        origin = info.get("quantized_from")
        raise KilnError(f"quantize.source={source} is already quantized ({tag}); quantize the float run it came "
                        f"from{f' ({origin})' if origin else ''} instead")
    if "model" not in info:
        raise KilnError(f"{src}/checkpoint.json records no model; it was not written by a kiln training verb")
    src_run, out = src.parent.parent, Path(out)
    if out.resolve() == src_run.resolve():
        raise KilnError(f"out={out} is the source run itself; write the quantized model to a new out=")
    ckpts = CheckpointManager(out)
    done = ckpts.complete()
    if done and CheckpointManager.info(done[-1]).get("workload") != "quantize":
        raise KilnError(f"'{out}' holds a {CheckpointManager.info(done[-1]).get('workload', 'training')} run; "
                        "choose a new out= for the quantized model")
    mc = ModelConfig.from_dict(info["model"])
    if not mc.causal:
        raise KilnError(f"{src} holds a bidirectional (causal=false) model; kiln quantize serves language models")
    group = qc.group_size if qc.format == "int4" else 0
    check_model(mc, qc.format, qc.group_size)
    tok = src_run / "tokenizer" / "tokenizer.json"
    check_tokenizer(tok, info, "quantize")
    ddir = Path(data_path) if data_path else src_run / "data" if read_manifest(src_run / "data") else \
        Path(info["data"]) if info.get("data") and read_manifest(info["data"]) else None
    if ddir is not None:
        man = open_data(ddir)
        if info.get("tokenizer_sha256") and man.get("tokenizer_sha256") != info["tokenizer_sha256"]:
            raise KilnError(f"the data in '{ddir}' was prepared with a different tokenizer than {src}'s; "
                            "set data.path= to data prepared with the model's tokenizer")
    if qc.method == "gptq" and ddir is None:
        raise KilnError(f"quantize.method=gptq calibrates on the source run's training shards, and {src_run} has "
                        "none (no data/ and no data recorded); set data.path=DIR or use method=rtn")

    t0 = time.perf_counter()
    model = Transformer(mc)
    load_model_tensors(model, checkpoint_tensors(src), str(src))
    model.eval()
    seq_len = min(qc.calib_seq_len or 256, mc.max_seq_len)
    before = score(model, ddir, 8, seq_len, qc.eval_batches)["bpb"] if ddir and qc.eval_batches else None
    calib = calibration_batches(ddir, qc.calib_sequences, seq_len) if qc.method == "gptq" else []
    say(f"quantize: {src} → {qc.format}{f' g{group}' if group else ''} by {qc.method}"
        + (f" ({qc.calib_sequences} calibration windows of {seq_len} tokens)" if calib else ""))
    stored = quantize_model(model, qc.format, qc.group_size, qc.method, calib, qc.damp,
                            progress=lambda m: say(f"quantize: {m}"))
    entry = quantization_entry(qc.format, group, qc.method,
                               **({"calib_sequences": qc.calib_sequences, "calib_seq_len": seq_len,
                                   "damp": qc.damp} if qc.method == "gptq" else {}))
    tensors = stored_tensors(model, stored)
    meta = {"workload": "quantize", "model": mc.to_dict(), "quantization": entry, "quantized_from": str(src),
            **{k: info[k] for k in ("tokenizer_sha256",) if k in info}, **({"data": str(ddir)} if ddir else {})}
    final = ckpts.path(int(info.get("step", 0)))
    with atomic_dir(final) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={METADATA_KEY: json.dumps(entry, sort_keys=True)})
        CheckpointManager.write_info(tmp, int(info.get("step", 0)), meta)
    ckpts.mark_latest(final)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copy2(tok, out / "tokenizer" / "tokenizer.json")

    after = {}
    if before is not None:
        if qc.method == "gptq":  # GPTQ left its own dequantized weights in `model`: read the float ones again
            load_model_tensors(model, checkpoint_tensors(src), str(src))
        after = score(load_model(final), ddir, 8, seq_len, qc.eval_batches, reference=model)
    fp16 = 2 * mc.num_params()
    nbytes = (final / "model.safetensors").stat().st_size
    result = {"source": str(src), "checkpoint": str(final), **entry, "params": mc.num_params(), "bytes": nbytes,
              "fp16_bytes": fp16, "fp16_share": nbytes / fp16, "bpb_before": before, "bpb_after": after.get("bpb"),
              "bpb_increase": (after["bpb"] / before - 1) if before else None,
              "kl_to_float": after.get("kl_to_float"), "top1_agreement": after.get("top1_agreement"),
              "eval_tokens": after.get("tokens"), "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "quantize.json", result)
    _write_report(out, result)
    quality = (f"; validation bits/byte {before:.4f} → {result['bpb_after']:.4f} ({100 * result['bpb_increase']:+.3f}%), "
               f"KL from the float model {result['kl_to_float']:.2e} nats/token" if before else "")
    say(f"quantize: {nbytes / 1e6:.2f} MB on disk, {100 * result['fp16_share']:.1f}% of fp16's {fp16 / 1e6:.2f} MB"
        f"{quality}; checkpoint {final}")
    return result


def _write_report(out: Path, r: dict) -> None:
    from kiln.report import write_report
    from kiln.runs import atomic_write_text

    grid = f" with groups of {r['group_size']}" if r.get("group_size") else " per output channel"
    lines = ["## Quantization", "",
             f"- `{r['source']}` → **{r['format']}**{grid}, by {r['method']} ({r['seconds']} s)",
             f"- on disk: {r['bytes'] / 1e6:.2f} MB, {100 * r['fp16_share']:.1f}% of the {r['fp16_bytes'] / 1e6:.2f} MB "
             f"of fp16 weights ({r['params']:,} parameters)"]
    if r.get("bpb_before") is not None:
        lines.append(f"- validation bits/byte: {r['bpb_before']:.4f} → {r['bpb_after']:.4f} "
                     f"({100 * r['bpb_increase']:+.3f}%) over {r['eval_tokens']:,} tokens; KL from the float model "
                     f"{r['kl_to_float']:.2e} nats/token, same top token at {100 * r['top1_agreement']:.1f}% of positions")
    atomic_write_text(out / "report.d" / "quantize.md", "\n".join(lines) + "\n")
    write_report(out)


def run_quantize(cfg) -> dict:
    """`kiln quantize source=RUN out=NEW format=int8|int4 [method=gptq group_size=64]`."""
    from kiln.config import dump_yaml
    from kiln.runs import atomic_write_text

    if not cfg.quantize.source:
        raise KilnError("quantize.source is empty; name the trained run to quantize, e.g. "
                        "kiln quantize source=runs/quickstart out=runs/quickstart-int8")
    result = quantize_checkpoint(cfg.quantize.source, cfg.out, cfg.quantize, cfg.data.path)
    atomic_write_text(Path(cfg.out) / "config.yaml", dump_yaml(cfg))
    return result
