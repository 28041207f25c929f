"""The transformer: shapes, parameter counts, the KV cache and the presets up to 70B (on meta)."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import KilnError
from kiln.model.transformer import PRESETS, KVCache, ModelConfig, Transformer, preset


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


def test_flops_per_token_is_six_n_plus_attention():
    cfg = preset("small", vocab_size=8192)
    n = cfg.num_params(embedding=False) + 8192 * cfg.d_model  # tied head still costs a matmul
    assert cfg.flops_per_token(256) == 6 * n + 12 * cfg.n_layers * cfg.d_model * 256


def test_kv_cache_decoding_matches_the_full_forward():
    m = small_model()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.cfg, 2, 32)
        parts = [m(x[:, :10], cache, 0), m(x[:, 10:17], cache, 10)]  # prefill, then a chunk
        parts += [m(x[:, i : i + 1], cache, i) for i in range(17, 24)]  # then one token at a time
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


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
