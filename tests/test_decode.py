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
from kiln.model.quant import build_quantized
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


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_verify_gives_each_row_the_logits_of_several_new_tokens(compile):
    """`DecodeStep.verify` (speculative decoding's check): T new tokens per row, each row from its
    own cache length (a free row at 0 among them); every position's logits equal a full forward over
    the row's sequence to there, and a later step reads the keys and values it wrote. Compiled
    (traced whole, `fullgraph`: a graph break would make it eager and leave a note), its attention
    is written out as products (grouped heads as a reshape) rather than the model's SDPA."""
    torch.manual_seed(0)
    model = tiny_model()
    settings = decode.StepCompile({"backend": "eager", "fullgraph": True}) if compile else None
    step = decode.DecodeStep(model, compile=compile, settings=settings)
    seqs = {0: torch.randint(0, 96, (9,)).tolist(), 2: torch.randint(0, 96, (4,)).tolist()}
    new = {row: torch.randint(0, 96, (3,)).tolist() for row in seqs}
    cache = KVCache(model.cfg, 3, 40)
    with torch.inference_mode():
        for row, ids in seqs.items():
            view = decode_rows(cache, row)
            model(torch.tensor([ids]), cache=view)
            cache.lengths[row] = view.lengths[0]
        tokens = torch.zeros(3, 3, dtype=torch.long)
        for row, ids in new.items():
            tokens[row] = torch.tensor(ids)
        logits = step.verify(tokens, cache, 3, max(len(s) for s in seqs.values()) + 3)
        for row in seqs:
            want = model(torch.tensor([seqs[row] + new[row]]))[0, -3:]
            torch.testing.assert_close(logits[row], want, atol=1e-4, rtol=1e-4)
        cache.lengths += torch.tensor([3, 0, 3])
        nxt = torch.tensor([5, 0, 7])
        after = step(nxt, cache, 3, max(len(s) for s in seqs.values()) + 4)
        for row in seqs:
            want = model(torch.tensor([seqs[row] + new[row] + [int(nxt[row])]]))[0, -1]
            torch.testing.assert_close(after[row], want, atol=1e-4, rtol=1e-4)
        cache.lengths += torch.tensor([1, 0, 1])
        two = torch.tensor([[3, 4], [0, 0], [5, 6]])  # another T: the compiled check is dynamic in it
        logits = step.verify(two, cache, 3, max(len(s) for s in seqs.values()) + 6)
        for row in seqs:
            want = model(torch.tensor([seqs[row] + new[row] + [int(nxt[row])] + two[row].tolist()]))[0, -2:]
            torch.testing.assert_close(logits[row], want, atol=1e-4, rtol=1e-4)
    assert step.note is None and step.compiled == compile
    if compile:  # a draft's check through the same code, other head counts (dynamo then makes them dynamic)
        other = Transformer(preset("tiny", vocab_size=96, n_kv_heads=4, d_model=32))
        other.init_weights(1)
        other_step = decode.DecodeStep(other.eval(), compile=True, settings=settings)
        cache = KVCache(other.cfg, 2, 40)
        with torch.inference_mode():
            for t in (3, 2, 4):
                got = other_step.verify(torch.arange(2 * t).view(2, t) + 1, cache, 2, t)
                torch.testing.assert_close(got[1], other(torch.arange(t, 2 * t)[None] + 1)[0], atol=1e-4, rtol=1e-4)
        assert other_step.note is None


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
    float_model = tiny_model()
    stored = quantize_model(float_model, "int8")
    rest = {k: v for k, v in float_model.state_dict().items() if "norm" in k}
    quantized = build_quantized(float_model.cfg, stored, rest)
    assert isinstance(quantized, Transformer) and not decode.supports(quantized)
    assert not decode.supports(apply_lora(tiny_model(), LoRAConfig(rank=4)))
    bidirectional = Transformer(preset("tiny", vocab_size=96, causal=False))
    assert not decode.supports(bidirectional)


# ---- compiling it: the settings each device gets, and eager when compiling fails ----------------------
def test_each_device_gets_its_own_compile_settings():
    """CUDA: CUDA graphs over fixed shapes (the step is launch-bound), and no `cpp_wrapper`, whose
    CUDA build needs a toolkit (nvcc, CUDA_HOME, libcuda to link) a host with pip wheels lacks.
    CPU: `cpp_wrapper`, which saves Python's overhead per kernel there."""
    cuda = decode.compile_settings(torch.device("cuda", 0))
    assert cuda.cuda_graphs and cuda.kwargs == {"mode": "reduce-overhead"}
    assert "cpp_wrapper" not in repr(cuda.kwargs)
    cpu = decode.compile_settings(torch.device("cpu"))
    assert not cpu.cuda_graphs and cpu.kwargs == {"options": {"cpp_wrapper": True}}
    assert decode.compile_settings(torch.device("mps")) == decode.StepCompile({}, cuda_graphs=False)


def test_the_cuda_graph_shapes_give_the_same_tokens():
    """As CUDA graphs run it (every row of the cache, the attended length rounded up to a bucket),
    compiled here with the eager backend: the tokens of the plain model's own forward."""
    from kiln.infer.engine import SamplingParams
    from kiln.infer.generate import generate

    torch._dynamo.reset()
    model, plain = tiny_model(), tiny_model()
    step = decode.DecodeStep(model, compile=True, settings=decode.StepCompile({"backend": "eager"}, cuda_graphs=True))
    decode._STEPS[model] = {True: step}
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    params = [SamplingParams(n, temperature=0.0) for n in (70, 5, 12)]  # past one bucket of attended slots
    want = [s.tokens for s in generate(plain, prompts, params, stop_ids=set(), rows=4, fused=False)]
    got = [s.tokens for s in generate(model, prompts, params, stop_ids=set(), rows=4, compile=True)]
    assert got == want and step.compiled


def test_a_step_that_fails_to_compile_decodes_eagerly_with_one_note(monkeypatch, capsys):
    """A compile that fails (inductor's C++ or CUDA build: no compiler, no toolkit) when the step
    is warmed up, or later: the step decodes eagerly from then on, the same tokens, and says so once."""
    from kiln.infer.engine import SamplingParams
    from kiln.infer.generate import generate

    def broken(fn=None, **kw):
        def run(*args, **kwargs):
            raise RuntimeError("CppCompileError: nvcc: not found\n(a long build log)")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model, plain = tiny_model(), tiny_model()
    prompts, params = [[1, 2, 3], [4, 5]], [SamplingParams(6, temperature=0.0)] * 2
    want = [s.tokens for s in generate(plain, prompts, params, stop_ids=set())]
    for _ in range(2):
        assert [s.tokens for s in generate(model, prompts, params, stop_ids=set(), compile=True)] == want
    err = capsys.readouterr().err
    assert err.count("decoding eagerly") == 1 and "nvcc: not found" in err and "build log" not in err
    assert not decode.decode_step(model, True).compiled
    # a model the fused step does not take: its own forward, compiled, falls back the same way
    lora = apply_lora(tiny_model(), LoRAConfig(rank=4))
    want = [s.tokens for s in generate(lora, prompts, params, stop_ids=set())]
    assert [s.tokens for s in generate(lora, prompts, params, stop_ids=set(), compile=True)] == want
    assert capsys.readouterr().err.count("decoding eagerly") == 1
