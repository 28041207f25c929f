"""The transformer: shapes, parameter counts, the KV cache and the presets up to 70B (on meta)."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import KilnError
from kiln.model.config import PRESETS, ModelConfig, preset
from kiln.model.transformer import KVCache, Transformer


def small_model(**kw) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, **kw))
    m.init_weights(0)
    return m.eval()


@pytest.mark.parametrize("name", ["tiny", "mini", "small"])
def test_parameter_count_matches_the_built_model(name):
    cfg = preset(name, vocab_size=512)
    assert sum(p.numel() for p in Transformer(cfg).parameters()) == cfg.num_params()


@pytest.mark.parametrize("name,billions", [("llama3-8b", 8.03), ("llama3-70b", 70.55), ("llama3-1b", 1.24)])
def test_large_presets_have_their_published_sizes_on_meta(name, billions):
    cfg = preset(name)
    with torch.device("meta"):
        m = Transformer(cfg)
    n = sum(p.numel() for p in m.parameters())
    assert n == cfg.num_params()
    assert abs(n / 1e9 - billions) / billions < 0.01


def test_flops_per_token_matches_a_counted_forward_and_backward():
    """The formula against torch's own FLOP counter on a real training step (not the same arithmetic)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    m = Transformer(cfg)
    x = torch.randint(0, 256, (2, 32))
    # the math backend spells attention as matmuls the counter sees (the fused CPU kernel it does not)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        m(x).float().logsumexp(-1).sum().backward()
    assert counter.get_total_flops() == pytest.approx(cfg.flops_per_token(32) * x.numel(), rel=1e-9)


def test_kv_cache_decoding_matches_the_full_forward():
    m = small_model()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.cfg, 2, 32)
        parts = [m(x[:, :10], cache=cache), m(x[:, 10:17], cache=cache)]  # prefill, then a chunk
        parts += [m(x[:, i : i + 1], cache=cache) for i in range(17, 24)]  # then one token at a time
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [24, 24]


def test_kv_cache_rows_at_different_lengths_decode_together():
    """Prompts of different lengths prefilled right-padded in one batch, then decoded together,
    each row at its own position: every row matches its own unbatched forward."""
    m = small_model()
    a, b = torch.randint(0, 300, (1, 12)), torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        full_a, full_b = m(a), m(b)
        cache = KVCache(m.cfg, 2, 32)
        prompt = torch.zeros(2, 8, dtype=torch.long)
        prompt[0], prompt[1, :5] = a[0, :8], b[0]
        mask = torch.zeros(2, 8, dtype=torch.long)
        mask[0], mask[1, :5] = 1, 1
        first = m(prompt, attention_mask=mask, cache=cache)
        assert cache.lengths.tolist() == [8, 5]
        torch.testing.assert_close(first[0], full_a[0, :8], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(first[1, :5], full_b[0], atol=1e-5, rtol=1e-5)
        # row 0 continues its prompt, row 1 feeds its own next tokens (here: a's tokens 8..11)
        steps = [m(torch.stack([a[0, 8 + i : 9 + i], a[0, 8 + i : 9 + i]]), cache=cache) for i in range(4)]
    torch.testing.assert_close(torch.cat([s[0] for s in steps]), full_a[0, 8:12], atol=1e-5, rtol=1e-5)
    both = torch.cat([b, a[:, 8:12]], 1)
    torch.testing.assert_close(torch.cat([s[1] for s in steps]), m(both)[0, 5:9], atol=1e-5, rtol=1e-5)
    cache.reset([1])
    assert cache.lengths.tolist() == [12, 0]


def test_left_padding_with_positions_matches_the_unpadded_sequence():
    m = small_model()
    x = torch.randint(0, 300, (1, 10))
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 10)], 1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        torch.testing.assert_close(m(padded, positions=positions, attention_mask=mask)[:, 6:], m(x),
                                   atol=1e-5, rtol=1e-5)
        # rotary attention sees only relative positions, so it is the gaps that must be right
        gappy = positions.clone()
        gappy[0, 11:] += 3
        assert not torch.allclose(m(padded, positions=gappy, attention_mask=mask)[:, 6:], m(x), atol=1e-3)


def test_packed_documents_attend_only_within_themselves():
    m = small_model()
    d1, d2 = torch.randint(0, 300, (1, 7)), torch.randint(0, 300, (1, 9))
    packed = torch.cat([d1, d2], 1)
    docs = torch.tensor([[0] * 7 + [1] * 9])
    positions = torch.tensor([list(range(7)) + list(range(9))])
    with torch.no_grad():
        out = m(packed, positions=positions, document_ids=docs)
        torch.testing.assert_close(out[:, :7], m(d1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 7:], m(d2), atol=1e-5, rtol=1e-5)
        leaky = m(packed)[:, 7:]  # plain causal attention: the second document sees the first
    assert not torch.allclose(leaky, m(d2), atol=1e-3)


def test_encoder_attention_is_bidirectional_and_respects_padding():
    m = small_model(causal=False)
    x = torch.randint(0, 300, (1, 12))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 300
    with torch.no_grad():
        assert not torch.allclose(m(x)[:, :5], m(y)[:, :5], atol=1e-4)  # the future changes the past
        pad = torch.cat([x, torch.randint(0, 300, (1, 4))], 1)
        mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 4)], 1).long()
        torch.testing.assert_close(m(pad, attention_mask=mask)[:, :12], m(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        KVCache(m.cfg, 1, 8)


def test_rotary_embedding_returns_the_activation_dtype_whatever_the_tables_hold():
    """q/k keep v's dtype (SDPA refuses a mix): bf16 activations with fp32 tables (norms and
    matrices cast, tables not) decode through the KV cache, and the rotation runs in fp32."""
    from kiln.model.transformer import apply_rope, rope_tables

    cos, sin = rope_tables(16, 8, 10000.0)
    x = torch.randn(1, 2, 8, 16).to(torch.bfloat16)
    y = apply_rope(x, cos, sin)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, apply_rope(x.float(), cos, sin).to(torch.bfloat16))
    m = small_model()
    for p in m.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert m.rope_cos.dtype == torch.float32
    ids = torch.randint(0, 300, (2, 6))
    cache = KVCache(m.cfg, 2, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert m(ids).dtype == torch.bfloat16
        assert m(ids, cache=cache).dtype == m(ids[:, :1], cache=cache).dtype == torch.bfloat16


def test_hidden_states_are_what_the_lm_head_reads():
    m = small_model()
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        h = m(x, return_hidden=True)
        assert h.shape == (2, 9, m.cfg.d_model)
        torch.testing.assert_close(m.logits(h), m(x))


def test_causality_future_tokens_do_not_change_past_logits():
    m = small_model()
    x = torch.randint(0, 300, (1, 20))
    y = x.clone()
    y[0, 15:] = (y[0, 15:] + 1) % 300
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :15], m(y)[:, :15])


def test_tied_embeddings_share_one_tensor_and_untied_do_not():
    tied = small_model()
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = small_model(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()


def test_bad_shapes_are_refused_with_the_fix():
    with pytest.raises(KilnError, match="not divisible by model.n_heads"):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(KilnError, match="grouped-query attention"):
        ModelConfig(d_model=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(KilnError, match="unknown model preset 'huge'"):
        preset("huge")
    m = small_model()
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=64"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_presets_grow_monotonically():
    sizes = [preset(n).num_params() for n in PRESETS]
    assert sizes == sorted(sizes)


def test_meta_construction_then_materialize_matches_eager_init():
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    with torch.device("meta"):
        lazy = Transformer(cfg)
    lazy.to_empty(device="cpu")
    lazy.init_weights(0)
    eager = Transformer(cfg)
    eager.init_weights(0)
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(lazy(x), eager(x))
