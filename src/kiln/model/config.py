"""The model's shape: one schema (`ModelConfig`), its presets, and its size and FLOP formulas.

Torch-free, so the CLI, the config loader and `kiln plan` can read it without importing PyTorch.
`kiln.config.ModelSection` (the `model.*` keys of every recipe) is generated from this class, and
`kiln plan` counts parameters and FLOPs with these same methods: one schema, one formula.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from kiln.errors import KilnError


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
        if self.d_model % self.n_heads:
            raise KilnError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "pick a head count that divides d_model"
            )
        if self.n_heads % self.n_kv_heads:
            raise KilnError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs n_heads = k * n_kv_heads"
            )
        if self.head_dim % 2:
            raise KilnError(f"model.d_model / model.n_heads = {self.head_dim} is odd; rotary embeddings need an even head size")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # ---- sizes -------------------------------------------------------------------------------
    def layer_params(self) -> int:
        """Parameters of one transformer block: attention, SwiGLU MLP and its two norms."""
        d, hd = self.d_model, self.head_dim
        attn = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d
        mlp = 3 * d * self.ffn_hidden
        return attn + mlp + 2 * d

    def num_params(self, embedding: bool = True) -> int:
        """Parameter count; `embedding=False` leaves out the token-embedding table."""
        body = self.n_layers * self.layer_params() + self.d_model  # + final norm
        emb = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return body + head + (emb if embedding else 0)

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: every block, and the LM head (tied or not)."""
        norms = (2 * self.n_layers + 1) * self.d_model  # RMSNorm gains scale, they do not multiply
        return self.num_params(embedding=False) - norms + (self.vocab_size * self.d_model if self.tie_embeddings else 0)

    def forward_flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward FLOPs per token: 2·N + 4·L·d·T (attention's QKᵀ and AV over a context of T,
        counted in full as in the PaLM paper's appendix B)."""
        t = seq_len or self.max_seq_len
        return 2.0 * self.matmul_params() + 4.0 * self.n_layers * self.d_model * t

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


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset with `overrides` applied (e.g. a tokenizer's vocab size)."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KilnError(f"unknown model preset {name!r}; {hint}choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
