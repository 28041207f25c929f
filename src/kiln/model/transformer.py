"""A Llama-style transformer in plain single-device PyTorch: the one model every workload shares.

RMSNorm, rotary position embeddings (per-row positions), grouped-query attention through
`F.scaled_dot_product_attention` (causal or bidirectional, with padding and document masks),
a SwiGLU MLP, optional tied embeddings, a preallocated KV cache with per-row lengths, and the
final hidden states on request. Nothing here knows about devices, ranks or parallelism: that is applied
from outside (`kiln.train.parallel`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kiln.model.config import ModelConfig
from kiln.model.weights import copy_into


# ---- layers ----------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim), halves repeated (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) queries or keys by (T, hd) tables, or by per-row (B, 1, T, hd) ones.

    The rotation runs in the tables' precision (fp32 unless the model was cast whole) and returns
    `x`'s dtype, so q and k stay in the dtype of v and the KV cache (SDPA wants one dtype)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer, (batch, kv_heads, max_len, head_dim), with a
    length per row.

    Each row appends at its own length, so rows at different positions decode together (a batch
    of prompts of different lengths, or continuous batching where requests join and leave):
    `Transformer.forward(tokens, cache=cache)` writes row b's new keys at slots
    `lengths[b] ... lengths[b] + T - 1` and lets each query see its row's slots up to its own.
    A row's padding (attention_mask 0, only at the end of a chunk) is written but not counted,
    so the row's next tokens overwrite it. `reset(rows)` frees rows for new sequences.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32) -> None:
        if not cfg.causal:
            raise ValueError("a KV cache serves causal (decoder) models only; this model has causal=False")
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self._step: tuple | None = None  # (slot index, used length, mask) for the forward in progress

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def reset(self, rows=None) -> None:
        """Forget rows (all by default): their next forward starts at position 0."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, device=self.lengths.device)] = 0

    def begin(self, t: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Plan a forward of `t` new tokens per row; returns their default positions (B, t)."""
        start = self.lengths
        if int(start.max()) + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked for {int(start.max()) + t}")
        offsets = torch.arange(t, device=start.device)
        slots = start[:, None] + offsets  # (B, t)
        used = int(start.max()) + t
        first = int(start[0])
        if attention_mask is None and bool((start == first).all()) and (t == 1 or first == 0):
            # every row at the same length: one new token sees every used slot, a first chunk is plain
            # causal, so the fused kernels run without an explicit mask
            mask = None if t == 1 else "causal"
        else:
            # query (b, i) sees slot j of its row iff j <= start[b] + i: its past and itself
            mask = (torch.arange(used, device=start.device)[None, None, :] <= slots[:, :, None])[:, None]
        self._step = (slots, used, mask)
        n_new = attention_mask.sum(-1).long() if attention_mask is not None else torch.full_like(start, t)
        self._new_lengths = start + n_new
        return slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slots, used, mask = self._step
        idx = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[layer].scatter_(2, idx, k.to(self.k[layer].dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v[layer].dtype))
        return self.k[layer][:, :, :used], self.v[layer][:, :, :used], mask

    def end(self) -> None:
        self.lengths = self._new_lengths
        self._step = None


def build_attention_mask(
    causal: bool, t: int, attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None
) -> torch.Tensor | None:
    """A (B, 1, T, T) boolean mask (True = may attend) from the parts given, or None when plain
    causal attention (or no mask at all) does the job, so the fast fused kernel is used.

    `attention_mask` is (B, T) with 1 for real tokens and 0 for padding (keys that no one may
    see), or an explicit (B, T, T) boolean mask; `document_ids` (B, T) stops attention at the
    boundaries of sequences packed into one row.
    """
    if attention_mask is None and document_ids is None:
        return None
    mask = None
    if attention_mask is not None and attention_mask.dim() == 3:
        mask = attention_mask.bool()
    elif attention_mask is not None:
        mask = attention_mask.bool()[:, None, :].expand(-1, t, -1)
        # a padding query sees itself, so its (ignored) output is finite rather than NaN
        mask = mask | torch.eye(t, dtype=torch.bool, device=mask.device)
    if document_ids is not None:
        same = document_ids[:, :, None] == document_ids[:, None, :]
        mask = same if mask is None else mask & same
    if causal:
        mask = mask & torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    return mask[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.causal = cfg.causal
        # Tensor parallelism rewrites the two head counts to the local shard's (train/parallel.py).
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        hd, nq, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        q = self.wq(x).view(b, t, nq, hd).transpose(1, 2)
        k = self.wk(x).view(b, t, nkv, hd).transpose(1, 2)
        v = self.wv(x).view(b, t, nkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = self.causal
        if cache is not None:
            k, v, mask = cache.update(self.layer, k, v)
            causal = isinstance(mask, str)  # "causal": a first chunk on every row
            mask = None if causal else mask
        gqa = nq != nkv  # grouped-query heads share K/V without copying the cache per query head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(b, t, nq * hd))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The model every workload shares.

    `model(input_ids)` returns logits (B, T, vocab). Keyword arguments serve the other workloads:

    - `positions` (B, T): each token's position for the rotary embedding (default 0..T-1, or the
      cache's per-row lengths onward): left-padded batches, packed documents whose positions
      restart, requests at different lengths in one decode batch.
    - `attention_mask`: (B, T) with 1 = real token, 0 = padding, or a (B, T, T) boolean mask.
    - `document_ids` (B, T): packed sequences attend only within their own document.
    - `cache`: a `KVCache`; new keys are appended per row at the row's length.
    - `return_hidden=True`: the final hidden states (B, T, d_model) after the last norm, for
      reward/value heads, classifiers and distillation; `model.logits(hidden)` finishes them.

    `cfg.causal=False` makes attention bidirectional (encoders, vision transformers).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # A dict keyed by layer index, so pipeline stages can drop layers and keep the names.
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, 0.02) everywhere; residual output projections scaled by 1/sqrt(2·layers).

        Works on a model materialized from the meta device after sharding (`to_empty`): each
        parameter is drawn whole, in the same order as for a single-device model, and a sharded
        (DTensor) parameter keeps only its local shard, so a sharded model starts from exactly
        the weights a single process would, holding one whole parameter at a time. Also re-ties
        the LM head to the embedding, which `to_empty` may untie.
        """
        if self.cfg.tie_embeddings and self.lm_head is not None and self.tok_emb is not None \
                and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight
        gen = torch.Generator()
        if seed is not None:
            gen.manual_seed(seed)
        out_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            full = torch.empty(p.shape, dtype=p.dtype)
            if p.ndim == 1:
                full.fill_(1.0)
            else:
                std = out_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
                full.normal_(0.0, std, generator=gen)
            copy_into(p, full)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the rotary tables (not saved in checkpoints; garbage after `to_empty`)."""
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _rope(self, positions: torch.Tensor | None, t: int, start: int = 0):
        if positions is None:
            return self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        if int(positions.max()) >= self.cfg.max_seq_len or int(positions.min()) < 0:
            raise ValueError(f"position {int(positions.max())} is outside 0..model.max_seq_len-1={self.cfg.max_seq_len - 1}")
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, hd)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        t = input_ids.shape[1]
        mask = None
        if cache is not None:
            cache_pos = cache.begin(t, attention_mask)
            positions = cache_pos if positions is None else positions
        else:
            if positions is None and t > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {t} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
            mask = build_attention_mask(self.cfg.causal, t, attention_mask, document_ids)
        cos, sin = self._rope(positions, t)
        x = self.tok_emb(input_ids) if self.tok_emb is not None else input_ids
        for block in self.layers.values():
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.end()
        x = self.norm(x) if self.norm is not None else x
        if return_hidden or self.lm_head is None:
            return x
        return self.lm_head(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits from `forward(..., return_hidden=True)`'s hidden states."""
        return self.lm_head(hidden)
