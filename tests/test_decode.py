"""The engine's fused, sync-free decode step (`kiln.infer.decode`): the same logits as the model's
own forward for rows at different positions (eager and compiled), the model unchanged by the
fused weights, and the models it must not take."""

from __future__ import annotations

import pytest
import torch

from kiln.config import LoRAConfig
from kiln.infer import decode
from kiln.model.config import preset
from kiln.model.lora import apply_lora
from kiln.model.transformer import KVCache, Transformer
from kiln.post.quantize import quantize_model


def tiny_model(seed: int = 0) -> Transformer:
    model = Transformer(preset("tiny", vocab_size=96))  # 4 query heads over 2 key/value heads
    model.init_weights(seed)
    return model.eval()


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_the_step_gives_each_row_the_logits_of_its_whole_sequence(compile):
    """Three rows at different lengths (one of them free, at length 0) decode five tokens
    together; each live row's logits equal a full forward over its whole sequence, and each
    row's cache length advances only if it is live."""
    torch.manual_seed(0)
    model = tiny_model()
    step = decode.DecodeStep(model, compile=compile)
    seqs = {0: torch.randint(0, 96, (7,)).tolist(), 2: torch.randint(0, 96, (3,)).tolist()}
    cache = KVCache(model.cfg, 3, 40)
    with torch.inference_mode():
        for row, ids in seqs.items():  # prefill each row alone, as the engine does
            view = decode_rows(cache, row)
            model(torch.tensor([ids]), cache=view)
            cache.lengths[row] = view.lengths[0]
        last = torch.zeros(3, dtype=torch.long)
        for _ in range(5):
            for row, ids in seqs.items():
                last[row] = ids[-1]
            # the last token of each sequence is not in the cache yet: step it in, as `Batch.step` does
            for row, ids in seqs.items():
                cache.lengths[row] = len(ids) - 1
            used = max(len(ids) for ids in seqs.values())
            logits = step(last, cache, 3, used)
            cache.lengths += torch.tensor([1, 0, 1])
            for row, ids in seqs.items():
                want = model(torch.tensor([ids]))[0, -1]
                torch.testing.assert_close(logits[row], want, atol=1e-4, rtol=1e-4)
                ids.append(int(want.argmax()))
        assert cache.lengths.tolist() == [len(seqs[0]) - 1, 0, len(seqs[2]) - 1]


def decode_rows(cache: KVCache, row: int) -> KVCache:
    from kiln.infer.engine import _RowView

    return _RowView(cache, row, row + 1)


def test_fusing_the_projections_leaves_the_model_and_its_weights_as_they_were():
    model = tiny_model()
    x = torch.randint(0, 96, (2, 9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x)
        fused = decode.fuse_projections(model)
        again = decode.fuse_projections(model)  # idempotent: the same storage, not a second copy
        got = model(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(fused, again))
    attn = model.layers["0"].attn
    assert attn.wq.weight.data_ptr() == fused[0][0].data_ptr()  # the model's weight is a view, not a copy


def test_quantized_and_lora_models_take_the_models_own_forward():
    assert decode.supports(tiny_model())
    assert not decode.supports(quantize_model(tiny_model(), "int8"))
    assert not decode.supports(apply_lora(tiny_model(), LoRAConfig(rank=4)))
    bidirectional = Transformer(preset("tiny", vocab_size=96, causal=False))
    assert not decode.supports(bidirectional)
