"""The model's shape: one schema (`ModelConfig`), its presets, and its size and FLOP formulas.

Torch-free, so the CLI, the config loader and `kiln plan` can read it without importing PyTorch.
`kiln.config.ModelSection` (the `model.*` keys of every recipe) is generated from this class, and
`kiln plan` counts parameters and FLOPs with these same methods: one schema, one formula.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from kiln.errors import KilnError

# RoPE scalings kiln computes (`model.rope_scaling`), with each one's settings and their defaults
# (None: required). Named and computed as `transformers` does (its modeling_rope_utils.py):
# "linear" divides every frequency by `factor`; "llama3" (Llama 3.1+) divides the low frequencies
# by `factor`, keeps the high ones and blends between, by wavelength against the original context;
# "yarn" blends interpolated and original frequencies along a ramp between the dimensions that turn
# `beta_fast` and `beta_slow` times over the original context, and scales cos and sin by
# `attention_factor` (default 0.1·ln(factor) + 1). "dynamic" (frequencies that change with the
# sequence length) and "longrope" are not computed.
ROPE_SCALINGS: dict[str, dict[str, float | int | bool | None]] = {
    "linear": {"factor": None},
    "llama3": {"factor": None, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": None},
    "yarn": {"factor": None, "original_max_seq_len": None, "beta_fast": 32.0, "beta_slow": 1.0,
             "attention_factor": None, "truncate": True},
}


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 0  # 0 = same as n_heads (plain multi-head attention)
    ffn_hidden: int = 0  # 0 = 8/3 * d_model rounded up to `multiple_of`
    multiple_of: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    causal: bool = True  # False: bidirectional attention (encoders, vision transformers)
    # What imported families add (defaults: kiln's own model). `head_dim` 0 = d_model / n_heads;
    # set, each head's size stands on its own (Qwen3, some Mistrals: n_heads · head_dim ≠ d_model).
    head_dim: int = 0
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2; Llama/Qwen3 attention_bias)
    out_bias: bool = False  # a bias on the attention output projection (Llama/Qwen3 attention_bias)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    rope_scaling: dict | None = None  # {"type": "linear" | "llama3" | "yarn", ...}: see ROPE_SCALINGS
    # Sliding-window attention (Mistral's sliding_window, Qwen2/3's use_sliding_window): a token sees
    # itself and the sliding_window - 1 tokens before it, in the layers from `window_from_layer` on
    # (Qwen's max_window_layers; the layers before it attend to everything). 0 = no window.
    sliding_window: int = 0
    window_from_layer: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            if getattr(self, name) < 1:
                raise KilnError(f"model.{name}={getattr(self, name)} must be at least 1")
        if self.n_kv_heads < 0 or self.ffn_hidden < 0:
            raise KilnError("model.n_kv_heads and model.ffn_hidden must be ≥ 0 (0 = the default)")
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden == 0:
            hidden = int(8 * self.d_model / 3)
            self.ffn_hidden = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.head_dim < 0 or self.sliding_window < 0 or self.window_from_layer < 0:
            raise KilnError("model.head_dim, model.sliding_window and model.window_from_layer must be ≥ 0 (0 = the default)")
        if self.head_dim == 0:
            if self.d_model % self.n_heads:
                raise KilnError(
                    f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                    "pick a head count that divides d_model (or set model.head_dim)"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise KilnError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs n_heads = k * n_kv_heads"
            )
        if self.head_dim % 2:
            raise KilnError(f"model.head_dim = {self.head_dim} (d_model / n_heads unless set) is odd; "
                            "rotary embeddings need an even head size")
        if self.sliding_window and not self.causal:
            raise KilnError("model.sliding_window is set on a bidirectional (causal=false) model; a sliding window "
                            "is a causal attention pattern: set model.sliding_window=0")
        self.rope_scaling = _rope_scaling(self.rope_scaling, self.max_seq_len)

    def layer_window(self, layer: int) -> int:
        """The sliding window of block `layer` (keys a query sees, itself included), 0 for full attention."""
        return self.sliding_window if self.sliding_window and layer >= self.window_from_layer else 0

    def window_layers(self) -> int:
        """How many blocks attend through the sliding window."""
        return max(0, self.n_layers - self.window_from_layer) if self.sliding_window else 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """From `to_dict`'s output, or an older checkpoint.json's (fields it lacks take their defaults:
        what its model computed)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def describe_rope(self) -> str:
        """RoPE in words: its base and, if any, its scaling."""
        text = f"θ={self.rope_theta:.10g}"
        rs = self.rope_scaling
        if rs:
            text += f", {rs['type']} scaling ×{rs['factor']:g}"
            if rs.get("original_max_seq_len"):
                text += f" from {rs['original_max_seq_len']} positions"
        return text

    # ---- sizes -------------------------------------------------------------------------------
    def layer_matmul_params(self) -> int:
        """Matrix weights of one block: q, k, v and output projections, and the SwiGLU MLP's three."""
        d, q, kv = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return d * (q + 2 * kv) + q * d + 3 * d * self.ffn_hidden

    def layer_params(self) -> int:
        """Parameters of one transformer block: its matrices, the attention biases and q/k norm gains
        if it has them, and its two norms."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        bias = (q + 2 * kv if self.qkv_bias else 0) + (self.d_model if self.out_bias else 0)
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        return self.layer_matmul_params() + bias + qk_norm + 2 * self.d_model

    def num_params(self, embedding: bool = True) -> int:
        """Parameter count (what `transformers`' num_parameters() gives for the same model);
        `embedding=False` leaves out the token-embedding table."""
        body = self.n_layers * self.layer_params() + self.d_model  # + final norm
        emb = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return body + head + (emb if embedding else 0)

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: every block's matrices, and the LM head (tied
        or not). Norm gains scale and biases add; neither multiplies."""
        return self.n_layers * self.layer_matmul_params() + self.vocab_size * self.d_model

    def attended(self, seq_len: int | None = None) -> float:
        """Keys a token's query meets, summed over the blocks, for a context of `seq_len`: T in a
        full-attention block, min(T, sliding_window) in a windowed one."""
        t = seq_len or self.max_seq_len
        windowed = self.window_layers()
        return (self.n_layers - windowed) * t + windowed * min(t, self.sliding_window or t)

    def forward_flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward FLOPs per token: 2·N + 4·(n_heads·head_dim)·Σ keys (attention's QKᵀ and AV over a
        context of T per block, counted in full as in the PaLM paper's appendix B; a sliding-window
        block counts the min(T, window) keys a query can see)."""
        return 2.0 * self.matmul_params() + 4.0 * self.n_heads * self.head_dim * self.attended(seq_len)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3× forward): 6·N + 12·L·d·T.

        Model FLOPs only (PaLM's MFU definition): activation checkpointing's recomputed forward
        is not counted here, it is what separates hardware FLOPs utilization (HFU) from MFU.
        """
        return 3.0 * self.forward_flops_per_token(seq_len)


# One or two dials per family; everything else follows from them (nanochat's way).
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128),
    "mini": dict(d_model=256, n_layers=4, n_heads=4, max_seq_len=256),
    "small": dict(d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=256),
    "medium": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=512),
    "gpt2-124m": dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "llama3-1b": dict(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
        max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True,
    ),
    "llama3-8b": dict(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
        max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False,
    ),
    "llama3-70b": dict(
        vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672,
        max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False,
    ),
}


def _rope_scaling(value, max_seq_len: int) -> dict | None:
    """`model.rope_scaling` checked and completed with its defaults (see ROPE_SCALINGS), or None."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise KilnError(f"model.rope_scaling={value!r} must be a mapping such as {{type: llama3, factor: 8, ...}}")
    kind = value.get("type")
    if kind in (None, "default", "none"):
        if len(value) > 1:
            raise KilnError(f"model.rope_scaling={value} sets parameters but no type; name one of {', '.join(ROPE_SCALINGS)}")
        return None
    if kind not in ROPE_SCALINGS:
        raise KilnError(f"model.rope_scaling type {kind!r} is not computed by kiln's model; it computes "
                        f"{', '.join(ROPE_SCALINGS)} (or none)")
    spec = ROPE_SCALINGS[kind]
    unknown = sorted(set(value) - set(spec) - {"type"})
    if unknown:
        raise KilnError(f"model.rope_scaling ({kind}) has no setting {', '.join(unknown)}; it takes {', '.join(spec)}")
    out: dict = {"type": kind}
    for key, default in spec.items():
        v = value.get(key, default)
        if v is None and key == "attention_factor":
            out[key] = None
            continue
        if v is None and key == "original_max_seq_len":
            v = max_seq_len  # what transformers assumes when a config names none
        if v is None:
            raise KilnError(f"model.rope_scaling ({kind}) needs {key}")
        if key == "truncate":
            if not isinstance(v, bool):
                raise KilnError(f"model.rope_scaling.truncate={v!r} must be true or false")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise KilnError(f"model.rope_scaling.{key}={v!r} must be a number > 0")
        out[key] = int(v) if key == "original_max_seq_len" else (v if key == "truncate" else float(v))
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise KilnError("model.rope_scaling (llama3) needs high_freq_factor > low_freq_factor")
    return out


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset with `overrides` applied (e.g. a tokenizer's vocab size)."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KilnError(f"unknown model preset {name!r}; {hint}choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
