"""Quantized weights: the stored formats and the modules that compute with them.

Weight-only INT8 (per output channel) and INT4 (group-wise, two values per byte), as `kiln
quantize` (`kiln.post.quantize`) writes them. Stored form (`model.safetensors`, format tag in
`checkpoint.json["quantization"]` and in the file's metadata), for a weight W of shape (N, K):

- int8: `NAME.q` int8 (N, K), `NAME.scale` fp32 (N,): W ≈ q · scale, q in [-127, 127];
- int4: `NAME.q` uint8 (N, K/2), the value of column 2j in the low nibble and 2j+1 in the high
  one, `NAME.scale` and `NAME.min` fp16 (N, K/g): W ≈ q · scale + min per group of g columns.

Every matrix is quantized, the token embedding included: a tied embedding / LM head is stored
once and serves both uses (rows looked up for the embedding, a matmul for the head). Norm gains
(the q/k norms of a Qwen3 included) and projection biases (Qwen2's q/k/v) stay in full precision,
the biases added to the quantized matmul's output. Activations and the KV cache stay in the compute dtype (fp32 on CPU).

Matmuls (`choose_matmul` decides, by device, format, shape and rows): on CPU, decode-sized inputs
to large matrices go through ATen's weight-only kernels (`torch._weight_int8pack_mm`,
`torch._weight_int4pack_mm_for_cpu`, bf16 activations); on CUDA, int4 goes through
`torch._weight_int4pack_mm` (tinygemm, sm80 or newer, bf16 activations, its tile layout built once
per device) up to `CUDA_KERNEL_MAX_ROWS` rows, and int8 converts the weight to the compute dtype
inside the matmul and scales the outputs (torch 2.13's CUDA `_weight_int8pack_mm` gives each output
one thread walking a weight row alone: uncoalesced reads, slower than this); small matrices (under
`KERNEL_MIN_ELEMENTS`, where a kernel call costs more than the fp32 matmul) are dequantized once;
larger inputs (prefill, scoring), autograd and other devices dequantize the weight and run a plain
matmul (a device without a kernel says so once), so the numbers a bits-per-byte score sees are
those of the stored weights.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer, model_rope_tables
from kiln.model.weights import model_tensors

FORMATS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
FORMAT_VERSION = 1
METADATA_KEY = "kiln_quantization"
# At most this many rows (tokens) take the CPU kernels; more rows amortize a dequantized matmul.
KERNEL_MAX_ROWS = 16
# On CUDA, tinygemm (`_weight_int4pack_mm`) computes 16 rows per tile and reads the weight once per
# tile: 64 rows (a decode batch of 64 requests) read its ½ byte per weight 4 times, still less than
# dequantizing it (several bytes per weight) and reading the copy; prefill-sized inputs go to cuBLAS
# on the dequantized matrix (not measured: bench/gpu_check.py's quant-decode check times batch 1).
CUDA_KERNEL_MAX_ROWS = 64
CUDA_INT4_MIN_CAPABILITY = (8, 0)  # tinygemm's mma.m16n8k16 bf16 tiles: Ampere and newer
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

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same stored matrix on `device`."""
        return QuantizedTensor(self.format, self.q.to(device), self.scale.to(device),
                               None if self.min is None else self.min.to(device), self.group_size)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {f"{name}.q": self.q, f"{name}.scale": self.scale}
        if self.min is not None:
            out[f"{name}.min"] = self.min
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors("w").values())


# ---- which matmul runs ----------------------------------------------------------------------
# The largest rows each kernel takes; past it the dequantized matrix and a plain matmul.
KERNEL_ROWS = {"int8-cpu": KERNEL_MAX_ROWS, "int4-cpu": KERNEL_MAX_ROWS, "int4-cuda": CUDA_KERNEL_MAX_ROWS,
               "int8-upcast": math.inf}


def int4_inner_k_tiles(k: int) -> int:
    """tinygemm's inner k-tiles (8, 4 or 2 tiles of 16 columns per 32-bit word group) for an input
    size `k`, the widest that divides it; 0 if none does."""
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), 0)


def kernel_for(device_type: str, fmt: str, shape: tuple[int, int], group_size: int,
               capability: tuple[int, int] | None = None) -> str | None:
    """The weight-only kernel a matrix of `shape` (N, K) uses on a device type, or None (dequantized
    per call; a small matrix is dequantized once): "int8-cpu", "int4-cpu" (ATen's CPU kernels),
    "int4-cuda" (tinygemm: `capability` sm80+, N % 8 == 0, K a multiple of 32) or "int8-upcast"
    (CUDA: the int8 weight converted inside the matmul, the per-row scale applied to its outputs)."""
    n, k = shape
    if math.prod(shape) < KERNEL_MIN_ELEMENTS:
        return None
    if device_type == "cpu":
        return "int8-cpu" if fmt == "int8" else "int4-cpu" if n % 16 == 0 else None
    if device_type == "cuda":
        if fmt == "int8":
            return "int8-upcast"
        if capability is not None and tuple(capability) >= CUDA_INT4_MIN_CAPABILITY and n % 8 == 0 \
                and int4_inner_k_tiles(k) and group_size in GROUP_SIZES and k % group_size == 0:
            return "int4-cuda"
    return None


def matmul_path(kernel: str | None, small: bool, rows: int, grad: bool) -> str:
    """What one call runs: the kernel, "dense-once" (a small matrix, dequantized on first use) or
    "dequantize" (the whole matrix at this call: autograd, more rows than the kernel takes, none)."""
    if grad:
        return "dequantize"
    if small:
        return "dense-once"
    if kernel is None or rows > KERNEL_ROWS[kernel]:
        return "dequantize"
    return kernel


def choose_matmul(device_type: str, fmt: str, shape: tuple[int, int], group_size: int, rows: int,
                  grad: bool = False, capability: tuple[int, int] | None = None) -> str:
    """The matmul a quantized matrix of `shape` runs on a device type for an input of `rows` rows
    (`kernel_for`, then `matmul_path`): one of "int8-cpu", "int4-cpu", "int4-cuda", "int8-upcast",
    "dense-once", "dequantize"."""
    small = math.prod(shape) < KERNEL_MIN_ELEMENTS
    return matmul_path(kernel_for(device_type, fmt, shape, group_size, capability), small, rows, grad)


_NOTED: set[tuple[str, str]] = set()


def fallback_note(device_type: str, fmt: str, why: str = "") -> None:
    """Say once per process, on stderr, that `fmt` matrices on a device run without a weight-only kernel."""
    if (device_type, fmt) in _NOTED:
        return
    _NOTED.add((device_type, fmt))
    print(f"kiln: {fmt} matrices on {device_type} are dequantized at every call{why or ' (no weight-only kernel here)'}; "
          "decoding reads more bytes than a float model's would", file=sys.stderr, flush=True)


def int4_cuda_bytes(q: torch.Tensor) -> torch.Tensor:
    """The stored int4 bytes (column 2j in the low nibble) in the order CUDA's
    `_convert_weight_to_int4pack` reads: column 2j in the high nibble."""
    return ((q & 0x0F) << 4) | (q >> 4)


def int4_scales_zeros(scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """ATen's int4 grid (CPU and CUDA kernels alike) is (q - 8) · scale + zero with groups along K,
    as (K/g, N, 2) bf16: zero = min + 8 · scale."""
    zero = mn.float() + 8 * scale.float()
    return torch.stack([scale.float(), zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


# ---- modules that compute with stored weights ------------------------------------------------
class QuantWeight(nn.Module):
    """One stored matrix as buffers, with the matmul and the row lookup on it. The kernels' layouts
    are built on first use per device (not saved: the stored form is the portable one)."""

    def __init__(self, qt: QuantizedTensor) -> None:
        super().__init__()
        self.format, self.group_size = qt.format, qt.group_size
        self.shape = qt.shape
        self.small = math.prod(qt.shape) < KERNEL_MIN_ELEMENTS  # dequantized once, not sent to the kernels
        # ATen's CPU kernels assume allocator-aligned rows; a tensor read from a file may sit anywhere
        for name, t in (("q", qt.q), ("scale", qt.scale), ("min", qt.min)):
            self.register_buffer(name, t.clone() if t is not None and t.data_ptr() % 64 else t)
        self._kernel = None  # the kernel's matmul for this device, built on first use; False = none
        self._kernel_name: str | None = None
        self._dense: torch.Tensor | None = None  # a small matrix, dequantized once (see KERNEL_MIN_ELEMENTS)

    def stored(self) -> QuantizedTensor:
        return QuantizedTensor(self.format, self.q, self.scale, self.min, self.group_size)

    def _apply(self, fn, recurse=True):
        self._kernel = self._dense = self._kernel_name = None  # moved or cast: rebuild from the stored form
        return super()._apply(fn, recurse)

    def _find_kernel(self):
        """This device's kernel (`kernel_for`), built: `matmul(x (rows, K)) -> (rows, N)` in x's dtype; or False."""
        device = self.q.device
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        name = kernel_for(device.type, self.format, self.shape, self.group_size, capability)
        if name is None and not self.small and device.type != "cpu":
            why = (f" (torch's int4 kernel wants sm80+, N % 8 == 0 and K a multiple of 32: this is sm"
                   f"{capability[0]}{capability[1]}, {self.shape[0]} × {self.shape[1]})" if device.type == "cuda" else "")
            fallback_note(device.type, self.format, why)
        elif name == "int8-upcast":
            fallback_note(device.type, self.format, " (converted to the compute dtype inside the matmul: torch 2.13 "
                          "has no fast CUDA int8 weight-only kernel; int4 has one)")
        self._kernel_name = name
        self._kernel = self.build_kernel(name) if name else False
        return self._kernel

    def build_kernel(self, name: str):
        """`matmul(x (rows, K)) -> (rows, N)` in x's dtype on the kernel `name` (see `kernel_for`)."""
        q, scale = self.q, self.scale
        bf16 = torch.bfloat16
        if name == "int8-cpu":
            scale_bf16 = scale.to(bf16)
            # a bf16 copy is dense whatever the input's strides (the kernels read dense rows)
            return lambda x: torch._weight_int8pack_mm(  # noqa: E731
                x.to(bf16, memory_format=torch.contiguous_format), q, scale_bf16).to(x.dtype)
        if name == "int8-upcast":
            scale32 = scale.float()

            def upcast(x: torch.Tensor) -> torch.Tensor:
                y = F.linear(x, q.to(x.dtype))  # q is exact in any float dtype (|q| <= 127)
                return y.mul_(scale32) if y.dtype == torch.float32 else y.float().mul_(scale32).to(x.dtype)

            return upcast
        g = self.group_size
        sz = int4_scales_zeros(scale, self.min)
        if name == "int4-cpu":
            packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(q).to(torch.int32), 1)
            return lambda x: torch._weight_int4pack_mm_for_cpu(  # noqa: E731
                x.to(bf16, memory_format=torch.contiguous_format), packed, g, sz).to(x.dtype)
        if name == "int4-cuda":
            packed = torch._convert_weight_to_int4pack(int4_cuda_bytes(q).contiguous(), int4_inner_k_tiles(self.shape[1]))
            return lambda x: torch._weight_int4pack_mm(  # noqa: E731
                x.to(bf16, memory_format=torch.contiguous_format), packed, g, sz).to(x.dtype)
        raise ValueError(f"no quantized matmul kernel named {name!r}")

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        rows = x.numel() // k
        kernel = self._kernel
        if kernel is None:
            kernel = self._find_kernel()
        path = matmul_path(self._kernel_name, self.small, rows, torch.is_grad_enabled())
        if path == "dense-once":
            if self._dense is None or self._dense.dtype != x.dtype:
                self._dense = self.stored().dequantize(x.dtype)
            return F.linear(x, self._dense)
        if path == "dequantize":
            return F.linear(x, self.stored().dequantize(x.dtype))
        y = kernel(x.reshape(rows, k))
        return y.view(*x.shape[:-1], y.shape[-1])

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.stored().dequantize(dtype, rows=ids)


def matmul_paths(model: nn.Module, rows: int = 1) -> dict[str, int]:
    """How many of a quantized model's matrices run each path (`choose_matmul`) for an input of
    `rows` rows on the device they sit on, without autograd: what a decode step computes with
    (for bench/gpu_check.py, which cannot see it otherwise)."""
    counts: dict[str, int] = {}
    for weight in {id(m): m for m in model.modules() if isinstance(m, QuantWeight)}.values():
        device = weight.q.device
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        path = choose_matmul(device.type, weight.format, weight.shape, weight.group_size, rows, False, capability)
        counts[path] = counts.get(path, 0) + 1
    return counts


class QuantLinear(nn.Module):
    """A projection computing with a stored matrix, and its full-precision bias if it has one."""

    def __init__(self, weight: QuantWeight, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.qweight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qweight.linear(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


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
            setattr(parent, attr, QuantLinear(weight, getattr(parent, attr).bias))  # the bias stays a float
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
    model.rope_cos, model.rope_sin = model_rope_tables(mc)
    return model.to(device).eval()
