"""A Llama-style transformer in plain single-device PyTorch: the one model every workload shares.

RMSNorm, rotary position embeddings (per-row positions; linear, llama3 or yarn scaling),
grouped-query attention through `F.scaled_dot_product_attention` (causal or bidirectional, with
padding and document masks, a sliding window where the config sets one), optional q/k/v and output
biases and per-head q/k RMSNorm, a head size of its own, a SwiGLU MLP, optional tied embeddings, a
preallocated KV cache with per-row lengths, and the final hidden states on request: Llama 2/3.x,
Qwen2/2.5, Qwen3 and Mistral compute here exactly as `transformers` computes them. Nothing here knows about devices, ranks or parallelism: that is applied
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


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """The rotary inverse frequencies (head_dim / 2 of them, float64) and the factor cos and sin are
    scaled by, for base `theta` and `scaling` (`ModelConfig.rope_scaling`, checked there), computed
    as `transformers`' modeling_rope_utils computes them (see `kiln.model.config.ROPE_SCALINGS`)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv, 1.0
    kind, factor = scaling["type"], scaling["factor"]
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":  # by wavelength against the original context: long ones / factor, short ones kept
        old, low, high = scaling["original_max_seq_len"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        return torch.where(wavelen > old / low, inv / factor, torch.where(wavelen < old / high, inv, blended)), 1.0
    if kind == "yarn":  # interpolated below the ramp's start, original past its end, blended along it
        old = scaling["original_max_seq_len"]

        def dim_turning(rotations: float) -> float:  # the dimension that turns `rotations` times over `old`
            return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = dim_turning(scaling["beta_fast"]), dim_turning(scaling["beta_slow"])
        if scaling["truncate"]:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        attention = scaling["attention_factor"]
        if attention is None:
            attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return inv / factor * ramp + inv * (1 - ramp), attention
    raise ValueError(f"RoPE scaling {kind!r} is not computed here")


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim), halves repeated (rotate-half layout),
    with `scaling`'s frequencies and attention factor (`rope_frequencies`)."""
    inv_freq, attention = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * attention).float(), (angles.sin() * attention).float()


def model_rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_tables` for a model of shape `cfg`."""
    return rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)


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

    Planning a forward needs the rows' lengths on the host (how many slots to attend, whether a
    mask is needed, whether they fit): a caller that keeps them there (the engine does) says so
    with `known(lengths)` before the forward, and nothing is read back from the device (on a GPU
    each read is a host sync); otherwise `begin` reads `lengths` once.
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
        self._known: list[int] | None = None  # the rows' lengths as the caller knows them, for the next forward

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def reset(self, rows=None) -> None:
        """Forget rows (all by default): their next forward starts at position 0."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, device=self.lengths.device)] = 0

    def known(self, lengths: list[int]) -> KVCache:
        """Tell the next forward the rows' current lengths, kept on the host by the caller, so that
        `begin` plans it without reading `self.lengths` back (for that forward only). Returns the cache."""
        if len(lengths) != self.batch:
            raise ValueError(f"{len(lengths)} lengths for a cache of {self.batch} rows")
        self._known = [int(n) for n in lengths]
        return self

    def begin(self, t: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Plan a forward of `t` new tokens per row; returns their default positions (B, t)."""
        start = self.lengths
        known, self._known = self._known, None
        if known is None:
            known = start.tolist()  # the one read of a forward the caller did not plan (a host sync on a GPU)
        used = max(known) + t
        if used > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked for {used}")
        offsets = torch.arange(t, device=start.device)
        slots = start[:, None] + offsets  # (B, t)
        if attention_mask is None and all(n == known[0] for n in known) and (t == 1 or known[0] == 0):
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


# ---- grouped-query heads and SDPA's backends -------------------------------------------------
# Which CUDA kernels take what, in torch 2.13 (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp and
# sdp_utils_cpp.h; default order flash, memory-efficient, math, cuDNN, with cuDNN first only on some
# Hopper/Blackwell setups): flash takes grouped-query heads (`enable_gqa`) but no `attn_mask` and only
# fp16/bf16 with head_dim <= 256; the memory-efficient kernel takes a mask (as an additive bias) and
# fp32, but not unequal query and key/value head counts (its GQA support, pytorch#191085, came after
# 2.13: `check_batch_size_and_num_heads_dense` there has no `supports_mqa` parameter). So a masked or
# fp32 grouped-query call falls through to the math backend, which materializes the (B, H, T, T)
# scores: O(T²) memory. Laid out with equal head counts, the same call runs the memory-efficient kernel.
FLASH_MAX_HEAD_DIM = 256


def attention_layout(device_type: str, dtype: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int,
                     t: int, masked: bool) -> str:
    """How `sdpa` lays grouped-query heads out for `F.scaled_dot_product_attention`:

    - "native": as they are (`enable_gqa` when the head counts differ): off CUDA (the CPU kernels
      take masks and groups: today's numbers), with equal head counts, and where flash runs;
    - "fold": one new token per row (decoding): each group of query heads becomes that many query
      rows against its one key/value head, the mask repeated per row: no copy of the cache;
    - "expand": keys and values repeated to the query heads (what the math backend would do anyway,
      O(T) memory) so the memory-efficient kernel takes the mask or the fp32 batch.
    """
    if n_heads == n_kv_heads or device_type != "cuda":
        return "native"
    if not masked and dtype in (torch.float16, torch.bfloat16) and head_dim <= FLASH_MAX_HEAD_DIM:
        return "native"  # flash, GQA included
    return "fold" if t == 1 else "expand"


def _lay_out(q, k, v, mask, causal: bool, layout: str):
    """(q, k, v, mask, causal) as `layout` (see `attention_layout`) hands them to SDPA."""
    b, nq, t, hd = q.shape
    nkv, s = k.shape[1], k.shape[2]
    g = nq // nkv
    if layout == "fold" and nq != nkv:  # (B, Hkv, g, hd) queries: row i of a group is query head kv·g + i
        if t != 1:
            raise ValueError(f"the fold layout takes one new token per row, not {t}")
        return q.reshape(b, nkv, g, hd), k, v, None if mask is None else mask.expand(b, 1, g, s), False
    if layout == "expand" and nq != nkv:  # query head h reads key/value head h // g, as enable_gqa does
        k = k[:, :, None].expand(-1, -1, g, -1, -1).reshape(b, nq, s, hd)
        v = v[:, :, None].expand(-1, -1, g, -1, -1).reshape(b, nq, s, v.shape[3])
    return q, k, v, mask, causal


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
         layout: str | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention` of (B, Hq, T, hd) queries against (B, Hkv, S, hd) keys and
    values (Hkv dividing Hq; query head h reads key/value head h // (Hq / Hkv)), with an optional
    boolean mask broadcastable to (B, 1, T, S), laid out as `attention_layout` says (or `layout`)."""
    b, nq, t, hd = q.shape
    if layout is None:
        layout = attention_layout(q.device.type, q.dtype, nq, k.shape[1], hd, t, mask is not None)
    q2, k, v, mask, causal = _lay_out(q, k, v, mask, causal, layout)
    gqa = k.shape[1] != q2.shape[1]  # grouped-query heads share K/V without copying the cache per query head
    if mask is None:
        y = F.scaled_dot_product_attention(q2, k, v, is_causal=causal, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q2, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.reshape(b, nq, t, y.shape[-1]) if q2.shape[1] != nq else y  # a folded group back to its heads


def sdpa_backend(cfg: ModelConfig, device, dtype: torch.dtype, batch: int, t: int, masked: bool,
                 past: int = 0, grad: bool = False) -> str:
    """The SDPA backend torch picks on `device` for the call `Attention` makes with `t` new tokens
    per row after `past` cached ones, masked or not (a bool mask as padding, documents or rows at
    different lengths give): "flash_attention", "efficient_attention", "cudnn_attention" or "math".
    Asks torch's own dispatcher (`torch._fused_sdp_choice`) on small tensors of those shapes."""
    from torch.nn.attention import SDPBackend

    device = torch.device(device)
    hd, nq, nkv, s = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, past + t
    q = torch.zeros(batch, t, nq, hd, device=device, dtype=dtype).transpose(1, 2).requires_grad_(grad)
    k = torch.zeros(batch, nkv, s, hd, device=device, dtype=dtype).requires_grad_(grad)
    v = torch.zeros(batch, nkv, s, hd, device=device, dtype=dtype).requires_grad_(grad)
    mask = torch.ones(batch, 1, t, s, device=device, dtype=torch.bool).tril(past) if masked else None
    layout = attention_layout(device.type, dtype, nq, nkv, hd, t, masked)
    q, k, v, mask, causal = _lay_out(q, k, v, mask, not masked and t > 1 and past == 0, layout)
    choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, causal, enable_gqa=k.shape[1] != q.shape[1])
    return SDPBackend(choice).name.lower()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.causal = cfg.causal
        # Tensor parallelism rewrites the two head counts to the local shard's (train/parallel.py).
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.layer_window(layer)  # 0: full attention
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.out_bias)
        # Qwen3: each head's queries and keys RMS-normed (one gain over head_dim, shared by the heads)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        hd, nq, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        q = self.wq(x).view(b, t, nq, hd)
        k = self.wk(x).view(b, t, nkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.wv(x).view(b, t, nkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = self.causal
        if cache is not None:
            k, v, mask = cache.update(self.layer, k, v)
            causal = isinstance(mask, str)  # "causal": a first chunk on every row
            mask = None if causal else mask
            if self.window and k.shape[2] > self.window:
                mask, causal = self._windowed(mask, causal, t, k.shape[2], True, x.device)
        elif self.window and t > self.window:
            mask, causal = self._windowed(mask, causal, t, t, False, x.device)
        # grouped-query heads laid out so that a fused kernel takes a masked or fp32 batch on CUDA
        layout = attention_layout(q.device.type, q.dtype, nq, nkv, hd, t, mask is not None)
        y = sdpa(q, k, v, mask, causal, layout)
        return self.wo(y.transpose(1, 2).reshape(b, t, nq * hd))

    def _windowed(self, mask: torch.Tensor | None, causal: bool, t: int, s: int, cached: bool,
                  device: torch.device) -> tuple[torch.Tensor, bool]:
        """(mask, causal) for `t` queries against `s` keys with this block's sliding window: a query
        sees only the `window` keys ending at its own position (itself included), counted by index
        (sequence index, or cache slot) as `transformers` counts them (kv_idx > q_idx - window).

        `mask` is None (no cache: plain causal; with the cache: one new token per row, every row at
        slot s - 1), causal (`causal`: a first chunk, queries at slots 0..t-1) or a boolean
        (B, 1, t, s) mask: without the cache, any (padding, documents) over sequence indices; with
        it, the cache's own, in which a query sees exactly the slots up to its own, so its slot is
        the count of what it sees, less one."""
        w = self.window
        if mask is None and cached and not causal:  # t == 1: the new tokens sit at slot s - 1
            return (torch.arange(s, device=device) > s - 1 - w).expand(1, 1, 1, s), False
        if mask is None:  # queries 0..t-1 against keys 0..t-1
            rows = torch.ones(t, s, dtype=torch.bool, device=device)
            return (rows.tril() & rows.triu(1 - w))[None, None], False
        if cached:
            slot = mask.sum(-1, keepdim=True) - 1  # (B, 1, t, 1)
            return mask & (torch.arange(s, device=device) > slot - w), False
        rows = torch.ones(t, s, dtype=torch.bool, device=device)
        return mask & rows.triu(1 - w), False


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
        cos, sin = model_rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, 0.02) for matrices, residual output projections scaled by 1/sqrt(2·layers); norm
        gains 1, biases 0.

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
                full.fill_(0.0 if name.endswith(".bias") else 1.0)
            else:
                std = out_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
                full.normal_(0.0, std, generator=gen)
            copy_into(p, full)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the rotary tables (not saved in checkpoints; garbage after `to_empty`)."""
        cos, sin = model_rope_tables(self.cfg)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _rope(self, positions: torch.Tensor | None, t: int, start: int = 0):
        if positions is None:
            return self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        # checked on the device: reading the positions back would stop the host at every forward
        # (an error surfaces at the next read on a GPU, at once on CPU)
        inside = ((positions >= 0) & (positions < self.cfg.max_seq_len)).all()
        torch._assert_async(inside, f"a position is outside 0..model.max_seq_len-1={self.cfg.max_seq_len - 1}")
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
