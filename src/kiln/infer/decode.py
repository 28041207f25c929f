"""The decode step the engine runs for a plain (unquantized, single-device) model: one new token
per running row, written as one straight-line function with no host synchronisation, so that
`torch.compile` turns the whole step into one graph.

What it does differently from `Transformer.forward(tokens, cache=...)` (which stays the path for
prefill, and for models this cannot take, e.g. quantized ones):

- The query, key and value projections and the MLP's gate and up projections each run as one
  matrix (`fuse_projections`), so a step makes 4 matrix-vector products per layer instead of 7.
  The fused matrices (and q/k/v biases, where the model has them) replace the model's own weights
  (those become views into them), so no memory is duplicated and the model's eager forward is
  unchanged.
- What imported families add is computed as the forward computes it: q/k/v and output biases,
  per-head q/k RMSNorm (Qwen3), a head size of its own, scaled RoPE (the model's own tables), and a
  sliding window (each row's mask stops `window` slots before its position, in the layers that
  have one).
- On CPU, a product over several rows (a batch of rows, a speculative check of k + 1 tokens) runs
  as `w @ x.T`, transposed back (`_linear`): the BLAS kernel for that layout is 1.2-2x as fast for
  2 to 32 rows at these shapes; one row takes `F.linear`.
- Positions come from the cache's per-row lengths as a tensor, never read back to the host: the
  number of attended slots (`used`) is given by the caller, who knows every row's length
  already, and each row masks the slots past its own length.
- New keys and values are written with `index_put_` at each row's position, which the compiler
  keeps in place (a `scatter_` into a graph input is copied whole and back every step).
- Compiled, attention is written out as products, sums and a softmax (grouped-query heads as a
  reshape) so the compiler fuses it into a few loops; eager, it is `scaled_dot_product_attention`.
- Compiled with settings chosen per device (`compile_settings`): on CPU with `cpp_wrapper`, so
  the step's kernels are called from C++ rather than Python; on CUDA as CUDA graphs, which
  replay the step's hundreds of small kernels in one launch, over fixed shapes (every row of the
  cache, the attended length rounded up to a bucket). A step that fails to compile (no C++
  compiler, no CUDA toolkit) decodes eagerly and says so once.

On this CPU, for the 11M `small` model at batch 1, the eager step decodes ~1.25x as fast as
`transformers` and the compiled one ~2.1x (`python -P bench/generate.py`).
"""

from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kiln.model.transformer import KVCache, RMSNorm, Transformer, apply_rope, sdpa


def supports(model: nn.Module) -> bool:
    """Whether `model` is a plain decoder this step can run: every projection an ordinary
    `nn.Linear` with a dense weight (no quantized, LoRA-wrapped or sharded layers), biased or not,
    and q/k norms (if any) plain RMSNorms."""
    if type(model) is not Transformer or not model.cfg.causal or model.tok_emb is None or model.lm_head is None:
        return False
    if len(model.layers) != model.cfg.n_layers:
        return False
    for blk in model.layers.values():
        for lin in (blk.attn.wq, blk.attn.wk, blk.attn.wv, blk.attn.wo, blk.mlp.w1, blk.mlp.w2, blk.mlp.w3):
            if type(lin) is not nn.Linear or type(lin.weight.data) is not torch.Tensor or \
                    (lin.bias is not None and type(lin.bias.data) is not torch.Tensor):
                return False
        # q, k and v fuse into one matrix: biased all three or none; the MLP has no biases
        if len({lin.bias is None for lin in (blk.attn.wq, blk.attn.wk, blk.attn.wv)}) != 1 or \
                any(lin.bias is not None for lin in (blk.mlp.w1, blk.mlp.w2, blk.mlp.w3)):
            return False
        norms = {type(blk.attn.q_norm), type(blk.attn.k_norm)}
        if norms != {type(None)} and norms != {RMSNorm}:
            return False
    return True


_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def fuse_projections(model: Transformer) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per layer, the (q;k;v) and (gate;up) weights as single matrices, and the (q;k;v) biases as one
    vector (None without biases). The model's own wq, wk, wv, w1 and w3 weights (and q/k/v biases)
    are re-pointed at rows of them, so nothing is stored twice; a second call returns the same
    matrices while the model's weights still point into them."""
    groups = [((b.attn.wq, b.attn.wk, b.attn.wv), (b.mlp.w1, b.mlp.w3)) for b in model.layers.values()]
    known = _FUSED.get(model)
    if known is not None and all(parts[0].weight.data_ptr() == whole.data_ptr()
                                 for layer, pair in zip(groups, known) for parts, whole in zip(layer, pair)):
        return known
    fused = []
    for layer in groups:
        pair = [_fuse([lin.weight for lin in parts]) for parts in layer]
        qkv = layer[0]
        bias = _fuse([lin.bias for lin in qkv]) if qkv[0].bias is not None else None
        fused.append((*pair, bias))
    _FUSED[model] = fused
    return fused


def _fuse(params: list[nn.Parameter]) -> torch.Tensor:
    """`params` concatenated along their first dimension, each re-pointed at its rows of the whole."""
    whole = torch.cat([p.data for p in params]).contiguous()
    row = 0
    for p in params:
        n = p.shape[0]
        p.data = whole[row : row + n]
        row += n
    return whole


@dataclass(frozen=True)
class StepCompile:
    """How the decode step compiles on one kind of device (`compile_settings`)."""

    kwargs: dict = field(default_factory=dict)  # torch.compile's keyword arguments
    # replayed as CUDA graphs: fixed shapes (every cache row; the attended length in buckets, one
    # graph each) and the cache's tensors at fixed addresses, written in place
    cuda_graphs: bool = False


def compile_settings(device: torch.device) -> StepCompile:
    """The decode step's compile settings on `device` (deciding only; nothing is compiled).

    - CUDA: CUDA graphs (`mode="reduce-overhead"`). One token per row through every layer is
      hundreds of small kernels: the step is launch-bound, and a graph launches them all at once.
      No `cpp_wrapper`: its CUDA build needs a toolkit (CUDA_HOME, nvcc, libcuda to link), which
      a host with pip wheels only has not, and CUDA graphs leave it no launch overhead to save.
    - CPU: `cpp_wrapper`: the step's kernels are called from C++, not Python (~0.3 ms a step less here).
    - anything else: inductor's defaults.
    """
    if device.type == "cuda":
        return StepCompile({"mode": "reduce-overhead"}, cuda_graphs=True)
    if device.type == "cpu":
        return StepCompile({"options": {"cpp_wrapper": True}})
    return StepCompile()


def compile_failed(what: str, error: Exception) -> str:
    """Say on stderr, in one line, that `what` did not compile and runs eagerly; return the line."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    note = f"{what} did not compile ({type(error).__name__}: {first[:200]}); decoding eagerly"
    print(f"kiln: {note}", file=sys.stderr, flush=True)
    return note


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_step(model: Transformer, compile: bool = False) -> DecodeStep:
    """The model's decode step, made once per model and setting, so every batch over the model
    (each `kiln generate` call, each round of a benchmark) shares one compiled graph."""
    steps = _STEPS.setdefault(model, {})
    if compile not in steps:
        steps[compile] = DecodeStep(model, compile)
    return steps[compile]


class DecodeStep:
    """`step(tokens, cache, rows, used)`: logits (rows, vocab) for one new token per row of
    `cache` rows 0..rows-1, each at its row's length; writes their keys and values into the
    cache and leaves `cache.lengths` for the caller to advance. `tokens` holds one token for
    every row of the cache (rows past `rows` are free: at length 0, only their slot 0 is written).

    Compiled with `settings` (by default `compile_settings` for the model's device). If compiling
    or running the compiled step fails, the step runs eagerly from then on (the same tokens),
    after one line on stderr; `note` keeps it."""

    def __init__(self, model: Transformer, compile: bool = False, settings: StepCompile | None = None) -> None:
        cfg = model.cfg
        self.model = model
        self.fused = fuse_projections(model)
        self.nq, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.windows = sorted({blk.attn.window for blk in model.layers.values()})  # 0: full attention
        self.ffn = cfg.ffn_hidden
        self.settings = settings or compile_settings(model.tok_emb.weight.device)
        self.compiled = compile
        self.small_m = model.tok_emb.weight.device.type == "cpu"  # see `_linear`
        self._warmed: set[tuple[int | None, int]] = set()  # (thread (None: all, without CUDA graphs), verify T or 0: the step) done
        self.note: str | None = None  # why the step runs eagerly although compiling was asked for
        self._static: weakref.ref | None = None  # the cache whose tensors CUDA graphs write in place
        self._run = self._step
        if compile:
            # every decode step shares `_step`'s code, whose compiled graphs dynamo counts together:
            # a model's step and check, a draft's, each over a few shapes, are past the default 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            try:
                self._run = torch.compile(self._step, **self.settings.kwargs)
            except Exception as e:  # noqa: BLE001 - any failure to compile leaves the eager step
                self._eager(e)

    def warm_up(self, cache: KVCache, verify: int = 0) -> None:
        """Compile now, for one row and for several, with the attended length already dynamic,
        so no request pays for it later; with `verify`, also `verify` for up to that many tokens
        a row (T dynamic). Writes only the first slots of free rows (`cache.lengths` 0).

        Call it on the thread that will run the step: under CUDA graphs torch keeps the graph trees
        per thread (`torch._inductor.cudagraph_trees`), so each thread that steps warms up its own;
        without them, one warm-up serves every thread."""
        thread = threading.get_ident() if self.settings.cuda_graphs else None
        step = self.compiled and (thread, 0) not in self._warmed
        check = self.compiled and verify > 1 and not self.settings.cuda_graphs and (thread, verify) not in self._warmed
        if not (step or check):
            return
        tokens = torch.zeros(cache.batch, dtype=torch.long, device=cache.lengths.device)
        with torch.inference_mode():
            if step:
                # two attended lengths (two buckets under CUDA graphs), so the second compile makes it dynamic
                lengths = (2, 3) if not self.settings.cuda_graphs else (1, self._bucket(cache) + 1)
                for rows in sorted({1, min(2, cache.batch)}):
                    for used in sorted({min(u, cache.max_len) for u in lengths}):
                        self(tokens, cache, rows, used)
                self._warmed.add((thread, 0))
            if check:
                for t in sorted({2, verify}):
                    for rows in sorted({1, min(2, cache.batch)}):
                        for used in (t + 1, t + 2):
                            self.verify(tokens[:, None].expand(-1, t), cache, rows, min(used, cache.max_len))
                self._warmed.add((thread, verify))

    def __call__(self, tokens: torch.Tensor, cache: KVCache, rows: int, used: int) -> torch.Tensor:
        if self.compiled:
            try:
                return self._compiled(tokens, cache, rows, used)
            except Exception as e:  # noqa: BLE001 - a failure eager would also have is raised by the rerun below
                self._eager(e)
        return self._step(tokens[:rows], cache.lengths[:rows], cache.k, cache.v, used)

    def _compiled(self, tokens: torch.Tensor, cache: KVCache, rows: int, used: int) -> torch.Tensor:
        if not self.settings.cuda_graphs:
            return self._run(tokens[:rows], cache.lengths[:rows], cache.k, cache.v, used)
        # A graph replays fixed shapes: every row (free rows write their unused slot 0), the attended
        # length rounded up to a bucket (the slots past a row's length are masked), so few graphs.
        if self._static is None or self._static() is not cache:
            for t in (*cache.k, *cache.v):  # written in place by the graph, not copied into it each step
                torch._dynamo.mark_static_address(t, guard=False)
            self._static = weakref.ref(cache)
        bucket = self._bucket(cache)
        used = min(cache.max_len, -(-used // bucket) * bucket)
        torch.compiler.cudagraph_mark_step_begin()  # the last step's logits were read: its buffers may be reused
        return self._run(tokens[: cache.batch], cache.lengths, cache.k, cache.v, used)[:rows]

    @staticmethod
    def _bucket(cache: KVCache) -> int:
        """Attended lengths under CUDA graphs are multiples of this: at most ~32 graphs per cache length."""
        return max(64, -(-cache.max_len // 32))

    def _eager(self, error: Exception) -> None:
        self.note = compile_failed("the decode step", error)
        self.compiled, self._run = False, self._step

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t = q.shape[0], q.shape[2]
        if not self.compiled:
            return sdpa(q, k, v, mask, False)  # the model's own layout choice (a fused kernel on CUDA)
        q = q.view(b, self.nkv, self.nq // self.nkv, t, self.hd)
        if t == 1:
            # (B, kv, g, 1, hd) queries against (B, kv, 1, used, hd) keys: plain products and sums,
            # which the compiler fuses with the mask and softmax into a few loops (a batched matmul
            # of one query row is a library call per layer, and no faster at these sizes)
            scores = (q * k[:, :, None]).sum(-1) * self.hd**-0.5  # (B, kv, g, used)
            p = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
            return (p[..., None] * v[:, :, None]).sum(-2).view(b, self.nq, 1, self.hd)
        # T tokens a row (`verify`): grouped heads as a reshape, as above, with matrix products
        scores = q @ k[:, :, None].transpose(-1, -2) * self.hd**-0.5  # (B, kv, g, T, used)
        p = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1).to(v.dtype)
        return (p @ v[:, :, None]).view(b, self.nq, t, self.hd)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, ks: list[torch.Tensor],
              vs: list[torch.Tensor], used: int) -> torch.Tensor:
        """Logits (B, vocab) for one token per row at `positions` (each row's cache length); with
        (B, T) `tokens` (`verify`), logits (B, T, vocab) for T tokens per row from there."""
        m, nq, nkv, hd = self.model, self.nq, self.nkv, self.hd
        multi = tokens.dim() == 2
        tokens = tokens if multi else tokens[:, None]
        b, t = tokens.shape
        at = positions[:, None] + torch.arange(t, device=tokens.device) if multi else positions[:, None]  # (B, T)
        x = m.tok_emb(tokens)  # (B, T, d)
        cos, sin = m.rope_cos[at][:, None], m.rope_sin[at][:, None]  # (B, 1, T, hd)
        rows = torch.arange(b, device=tokens.device)[:, None]
        slots = torch.arange(used, device=tokens.device)[None, None, :]
        mask = (slots <= at[:, :, None])[:, None]  # (B, 1, T, used): each token sees its row up to itself
        windowed = {w: mask & (slots > at[:, :, None] - w)[:, None] for w in self.windows if w}
        for (qkv_w, gate_up_w, qkv_b), blk, k_cache, v_cache in zip(self.fused, m.layers.values(), ks, vs):
            h = blk.attn_norm(x)
            q, k, v = self._linear(h, qkv_w, qkv_b).split([nq * hd, nkv * hd, nkv * hd], -1)
            q, k = q.view(b, t, nq, hd), k.view(b, t, nkv, hd)
            if blk.attn.q_norm is not None:
                q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)
            q = apply_rope(q.transpose(1, 2), cos, sin)
            k = apply_rope(k.transpose(1, 2), cos, sin)
            k_cache[rows, :, at] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows, :, at] = v.view(b, t, nkv, hd).to(v_cache.dtype)
            y = self._attend(q, k_cache[:b, :, :used], v_cache[:b, :, :used], windowed.get(blk.attn.window, mask))
            x = x + self._linear(y.transpose(1, 2).reshape(b, t, nq * hd), blk.attn.wo.weight, blk.attn.wo.bias)
            gate, up = self._linear(blk.mlp_norm(x), gate_up_w).split([self.ffn, self.ffn], -1)
            x = x + self._linear(F.silu(gate) * up, blk.mlp.w2.weight)
        return self._linear(m.norm(x if multi else x[:, 0]), m.lm_head.weight, m.lm_head.bias)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`F.linear(x, w, bias)`. On CPU, for several rows (a batch, a speculative check), as
        `w @ x.T` transposed: for 2 to 32 rows against these weights' shapes the library's kernel
        for that layout runs 1.2-2x as fast as for `x @ w.T` (measured here: 4096x256 weights at 4
        rows 92 vs 180 us, at 32 rows 351 vs 428 us); one row (batch-1 decode) takes `F.linear`."""
        if not self.small_m or x.numel() == x.shape[-1]:
            return F.linear(x, w, bias)
        flat = x.reshape(-1, x.shape[-1]).t()
        y = torch.mm(w, flat) if bias is None else torch.addmm(bias[:, None], w, flat)
        return y.t().reshape(*x.shape[:-1], w.shape[0])

    def verify(self, tokens: torch.Tensor, cache: KVCache, rows: int, used: int) -> torch.Tensor:
        """Logits (rows, T, vocab) for (rows, T) `tokens`, each row's from its cache length on (a
        speculative round's check of drafted tokens, `kiln.infer.speculative`); writes their keys and
        values, leaves `cache.lengths` to the caller. Compiled like the step (a graph of its own,
        dynamic in T; `warm_up(cache, verify=T)`) except under CUDA graphs, whose fixed shapes it
        would multiply: there, and when compiling fails, eager."""
        if self.compiled and not self.settings.cuda_graphs:
            try:
                return self._run(tokens[:rows], cache.lengths[:rows], cache.k, cache.v, used)
            except Exception as e:  # noqa: BLE001 - a failure eager would also have is raised by the rerun below
                self._eager(e)
        return self._step(tokens[:rows], cache.lengths[:rows], cache.k, cache.v, used)
