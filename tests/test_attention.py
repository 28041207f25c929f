"""Grouped-query attention's layout for SDPA: on CUDA a mask (documents, padding, rows at different
lengths in one decode batch) or an fp32 batch would send `enable_gqa` to the math backend (flash takes
no mask and no fp32; torch 2.13's memory-efficient kernel takes both but not unequal head counts), so
the heads are laid out for a fused kernel instead. The choice is a pure function, tested here for a
CUDA device this machine does not have; every layout gives today's numbers on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.model import transformer as T
from kiln.model.config import ModelConfig
from kiln.model.transformer import KVCache, Transformer, attention_layout, sdpa, sdpa_backend

BF16, FP32 = torch.bfloat16, torch.float32


# ---- the choice ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, t, masked, want", [
    (BF16, 2048, False, "native"),   # plain causal: flash takes GQA as it is
    (BF16, 2048, True, "expand"),    # documents / padding: flash refuses the mask, efficient the head counts
    (BF16, 1, True, "fold"),         # decode rows at different lengths: the group joins the query rows
    (FP32, 2048, False, "expand"),   # fp32 (evaluation, precision=fp32): flash refuses fp32
    (FP32, 1, False, "fold"),
    (torch.float16, 512, True, "expand"),
])
def test_masked_or_fp32_grouped_query_attention_is_laid_out_for_a_fused_cuda_kernel(dtype, t, masked, want):
    assert attention_layout("cuda", dtype, 8, 2, 64, t, masked) == want


def test_the_layout_is_left_alone_off_cuda_without_groups_and_where_flash_takes_it():
    for device in ("cpu", "mps", "meta"):
        for dtype, masked in ((BF16, True), (FP32, False), (FP32, True)):
            assert attention_layout(device, dtype, 8, 2, 64, 16, masked) == "native"
    assert attention_layout("cuda", BF16, 8, 8, 64, 128, True) == "native"  # equal head counts: any kernel
    assert attention_layout("cuda", FP32, 8, 8, 64, 128, False) == "native"
    assert attention_layout("cuda", BF16, 8, 2, 256, 128, False) == "native"
    assert attention_layout("cuda", BF16, 8, 2, 512, 128, False) == "expand"  # past flash's head size


# ---- every layout computes today's attention -------------------------------------------------
def _qkv(b, nq, nkv, t, s, hd, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, nq, hd, generator=g).to(dtype).transpose(1, 2)  # the strides Attention gives
    k = torch.randn(b, nkv, s, hd, generator=g).to(dtype)
    v = torch.randn(b, nkv, s, hd, generator=g).to(dtype)
    return q, k, v


def _document_mask(b, t):
    docs = torch.cat([torch.zeros(b, t // 2), torch.ones(b, t - t // 2)], 1).long()
    docs[1, : t // 4] = 2
    return T.build_attention_mask(True, t, None, docs)


def _padding_mask(b, t):
    pad = torch.ones(b, t, dtype=torch.long)
    pad[1, t // 3:] = 0
    return T.build_attention_mask(True, t, pad, None)


@pytest.mark.parametrize("dtype, tol", [(FP32, 1e-5), (BF16, 2e-2)])
@pytest.mark.parametrize("layout, case", [
    *[("expand", c) for c in ("documents", "padding", "causal", "decode", "decode-unmasked")],
    ("fold", "decode"), ("fold", "decode-unmasked"),  # the group joins the query rows: one new token per row
])
def test_every_layout_gives_the_numbers_enable_gqa_gives(layout, case, dtype, tol):
    b, nq, nkv, hd = 2, 8, 2, 16
    t = 1 if case.startswith("decode") else 24
    s = 40 if case.startswith("decode") else t
    q, k, v = _qkv(b, nq, nkv, t, s, hd, dtype)
    mask, causal = {"documents": (_document_mask(b, t), False), "padding": (_padding_mask(b, t), False),
                    "causal": (None, True), "decode-unmasked": (None, False),
                    "decode": ((torch.arange(s)[None, :] <= torch.tensor([[13], [39]]))[:, None, None], False)}[case]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    got = sdpa(q, k, v, mask, causal, layout=layout)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got.float(), want.float(), rtol=0, atol=tol)


def test_attention_forward_lays_the_heads_out_as_the_choice_says(monkeypatch):
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0)
    ids = torch.randint(0, 64, (2, 24))
    docs = torch.cat([torch.zeros(2, 10), torch.ones(2, 14)], 1).long()
    with torch.no_grad():
        want = model(ids, document_ids=docs)
        seen = []
        real = F.scaled_dot_product_attention

        def spy(q, k, v, **kw):
            seen.append((q.shape[1], k.shape[1], kw.get("enable_gqa", False)))
            return real(q, k, v, **kw)

        monkeypatch.setattr(T, "attention_layout", lambda *a: "expand")  # what CUDA picks for a masked batch
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        got = model(ids, document_ids=docs)
    assert seen == [(8, 8, False)] * cfg.n_layers  # K/V expanded to the query heads, no enable_gqa
    assert torch.allclose(got, want, atol=1e-5)


def test_mixed_length_decode_through_the_cache_is_unchanged_by_the_fold(monkeypatch):
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=64)
    torch.manual_seed(1)
    model = Transformer(cfg)
    model.init_weights(1)

    def decode(layout):
        if layout:
            monkeypatch.setattr(T, "attention_layout", lambda *a: layout if a[5] == 1 else "native")
        cache = KVCache(cfg, 2, 32)
        with torch.no_grad():
            model(torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2)),
                  attention_mask=torch.tensor([[1] * 9, [1] * 4 + [0] * 5]), cache=cache)
            outs = [model(torch.tensor([[3], [5]]), cache=cache) for _ in range(4)]
        monkeypatch.undo()
        return torch.cat(outs, 1)

    assert torch.allclose(decode("fold"), decode(None), atol=1e-5)
    assert torch.allclose(decode("expand"), decode(None), atol=1e-5)


# ---- which backend runs: what bench/gpu_check.py asks ---------------------------------------
def test_the_backend_helper_names_what_sdpa_picks_for_kilns_own_layout():
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=8, n_kv_heads=2, max_seq_len=256)
    names = {"flash_attention", "efficient_attention", "math", "cudnn_attention"}
    for masked in (False, True):
        for t in (1, 128):
            name = sdpa_backend(cfg, "cpu", FP32, batch=2, t=t, masked=masked)
            assert name in names, name
    # on a CPU, torch's own choice for these shapes: the CPU flash kernel, masks and groups included
    assert sdpa_backend(cfg, "cpu", FP32, batch=2, t=128, masked=True) == "flash_attention"
