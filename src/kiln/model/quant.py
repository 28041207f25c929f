"""Quantized weights: the stored formats and the modules that compute with them.

Weight-only INT8 (per output channel) and INT4 (group-wise, two values per byte), as `kiln
quantize` (`kiln.post.quantize`) writes them. Stored form (`model.safetensors`, format tag in
`checkpoint.json["quantization"]` and in the file's metadata), for a weight W of shape (N, K):

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer, rope_tables
from kiln.model.weights import model_tensors

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


def stored_tensors(model: nn.Module, stored: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Everything the quantized checkpoint holds: stored matrices and the float rest (norm gains)."""
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


def read_stored(ckpt: Path, entry: dict, mc: ModelConfig) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
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
