"""`kiln quantize`: the stored formats (packing, error against theory), GPTQ against round-to-nearest,
the CPU kernels against the plain dequantized matmul, a quantized model staying close to its float
model, quantized checkpoints in the engine, `kiln eval` and export, `kiln plan`'s bytes, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import TINY_TRAIN, kiln
from kiln.errors import KilnError
from kiln.infer.load import load
from kiln.model import quant as QF
from kiln.model.config import preset
from kiln.model.transformer import KVCache, Transformer
from kiln.post import quantize as Q
from kiln.train.checkpoint import CheckpointManager

FAST = [*TINY_TRAIN, "train.eval_every=1000", "train.ckpt_every=1000"]


# ---- the formats -----------------------------------------------------------------------------
def test_int4_packs_two_values_per_byte_low_nibble_first_and_unpacks_exactly():
    assert QF.pack_int4(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]
    q = torch.randint(0, 16, (37, 128), generator=torch.Generator().manual_seed(0))
    packed = QF.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (37, 64)
    assert torch.equal(QF.unpack_int4(packed).long(), q)
    with pytest.raises(ValueError, match="even number of columns"):
        QF.pack_int4(torch.zeros(2, 3))


def test_int4_round_trip_is_exact_on_values_the_grid_holds():
    g = torch.Generator().manual_seed(1)
    scale = (torch.rand(8, 4, generator=g) + 0.1).half().float()
    low = torch.randn(8, 4, generator=g).half().float()
    q = torch.randint(0, 16, (8, 4, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15  # each group spans its whole grid
    w = (q * scale[..., None] + low[..., None]).flatten(-2)
    stored = Q.quantize_rtn(w, "int4", 32)
    assert torch.allclose(stored.dequantize(), w, atol=1e-5 * w.abs().max().item())


@pytest.mark.parametrize("fmt, group, lo, hi", [
    # Gaussian rows: int8's step is max|w|/127 (about 3σ/127 for 256 values), so the rounding error's RMS is
    # step/√12 ≈ 0.0066σ; int4's group range is about 4σ (32 values) to 5σ (128), step = range/15, RMS = step/√12.
    ("int8", 0, 0.004, 0.010),
    ("int4", 32, 0.06, 0.10),
    ("int4", 128, 0.08, 0.12),
])
def test_error_on_random_matrices_is_what_the_grid_step_predicts(fmt, group, lo, hi):
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(2))
    stored = Q.quantize_rtn(w, fmt, group or 64)
    err = stored.dequantize() - w
    assert lo < float(err.norm() / w.norm()) < hi
    if fmt == "int8":  # every value within half a step of its row's grid
        step = w.abs().amax(1, keepdim=True) / 127
    else:
        groups = w.view(512, -1, group)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(group, 1)
    assert bool((err.abs() <= step / 2 * 1.01 + 1e-3 * step).all())


def test_group_error_grows_with_group_size_and_int8_beats_int4():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3))
    errs = [float((Q.quantize_rtn(w, "int4", g).dequantize() - w).norm()) for g in (32, 64, 128, 256)]
    assert errs == sorted(errs)
    assert float((Q.quantize_rtn(w, "int8").dequantize() - w).norm()) < errs[0] / 8


def test_gptq_cuts_the_output_error_where_inputs_are_correlated():
    g = torch.Generator().manual_seed(4)
    k = 128
    w = torch.randn(96, k, generator=g) * 0.05
    # activations near a 32-dimensional subspace (as a transformer's are): the error of one column
    # can be cancelled by the columns it is correlated with
    low_rank = torch.randn(4096, 32, generator=g) @ torch.randn(32, k, generator=g) + 0.1 * torch.randn(4096, k, generator=g)
    independent = torch.randn(4096, k, generator=g) * torch.linspace(0.2, 3.0, k)  # nothing to cancel against
    for fmt, group in (("int4", 32), ("int8", 0)):
        ratios = []
        for x in (low_rank, independent):
            rtn = Q.quantize_rtn(w, fmt, group or 64).dequantize()
            gptq = Q.quantize_gptq(w, x.T @ x / len(x), fmt, group or 64).dequantize()
            ratios.append(float((x @ (gptq - w).T).norm() / (x @ (rtn - w).T).norm()))
        assert ratios[0] < 0.6 and ratios[1] < 1.01, (fmt, ratios)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cpu_kernels_agree_with_the_dequantized_matmul(fmt):
    g = torch.Generator().manual_seed(5)
    stored = Q.quantize_rtn(torch.randn(1024, 512, generator=g) * 0.02, fmt, 32)  # large enough for the kernel
    weight = QF.QuantWeight(stored)
    x = torch.randn(1, 3, 512, generator=g)
    reference = x @ stored.dequantize().T
    with torch.no_grad():
        fast = weight.linear(x)
    assert weight._kernel, "the decode-sized input should have used the CPU kernel"
    assert torch.allclose(fast, reference, rtol=0, atol=0.02 * reference.abs().max().item())
    many = torch.randn(64, 512, generator=g)  # more rows than the kernel threshold: the exact path
    with torch.no_grad():
        assert torch.allclose(weight.linear(many), many @ stored.dequantize().T, atol=1e-5)
    small = QF.QuantWeight(Q.quantize_rtn(torch.randn(64, 128, generator=g) * 0.02, fmt, 32))
    x = torch.randn(1, 1, 128, generator=g)
    with torch.no_grad():  # a small matrix: dequantized once, then exact
        assert torch.allclose(small.linear(x), x @ small.stored().dequantize().T, atol=1e-6)
    assert small._kernel is False and small._dense is not None


def test_tied_embedding_and_lm_head_are_stored_once_and_share_one_matrix():
    mc = preset("tiny", vocab_size=512)
    model = Transformer(mc)
    model.init_weights(0)
    stored = Q.quantize_model(model, "int4", 32)
    tensors = QF.stored_tensors(model, stored)
    assert "tok_emb.weight.q" in tensors and not any(k.startswith("lm_head") for k in tensors)
    rest = {k: v for k, v in tensors.items() if not k.endswith((".q", ".scale", ".min"))}
    quantized = QF.build_quantized(mc, stored, rest)
    assert quantized.lm_head.qweight is quantized.tok_emb.qweight
    assert sorted(n for n, _ in quantized.named_parameters()) == sorted(rest)  # only norm gains stay float


# ---- a trained run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared):
    out = tmp_path_factory.mktemp("quantize") / "base"
    out.mkdir()
    shutil.copytree(prepared / "data", out / "data")
    shutil.copytree(prepared / "tokenizer", out / "tokenizer")
    assert kiln("pretrain", f"out={out}", *FAST, "train.max_steps=60", "train.lr=1e-2") == 0
    return out


@pytest.fixture(scope="module")
def quantized(trained):
    """The trained run as int8 (round to nearest) and int4 g32 (GPTQ)."""
    runs = {}
    for name, args in {"int8": ["format=int8"],
                       "int4": ["format=int4", "group_size=32", "method=gptq", "calib_sequences=32",
                                "calib_seq_len=64"]}.items():
        out = trained.parent / name
        assert kiln("quantize", f"source={trained}", f"out={out}", *args) == 0
        runs[name] = out
    return runs


def _latest(run):
    path = CheckpointManager(run).latest_intact()
    return path, CheckpointManager.info(path)


def _load(run):
    return load(run, "cpu").model


def test_quantized_checkpoints_are_small_and_tagged(trained, quantized):
    params = Transformer(preset("tiny", vocab_size=512)).cfg.num_params()
    for name, limit in (("int8", 0.56), ("int4", 0.35)):
        path, info = _latest(quantized[name])
        assert info["quantization"]["format"] == name and info["workload"] == "quantize"
        assert (path / "model.safetensors").stat().st_size <= limit * 2 * params
        figures = json.loads((quantized[name] / "quantize.json").read_text())
        assert figures["bpb_after"] > 0 and "## Quantization" in (quantized[name] / "report.md").read_text()
    assert _latest(quantized["int4"])[1]["quantization"]["group_size"] == 32


def test_a_quantized_model_predicts_what_the_float_model_does(trained, quantized):
    from kiln.data.shards import eval_batches

    base = _load(trained)
    batches = eval_batches(trained / "data", 4, 64, 4)
    for name, min_agree in (("int8", 0.97), ("int4", 0.85)):
        model = _load(quantized[name])
        agree = []
        with torch.no_grad():
            for b in batches:
                agree.append((base(b["input_ids"]).argmax(-1) == model(b["input_ids"]).argmax(-1)).float().mean())
        assert float(sum(agree) / len(agree)) >= min_agree, name

    def greedy(model, prompt, n=16):
        cache = KVCache(model.cfg, 1, len(prompt) + n)
        out = []
        with torch.no_grad():
            logits = model(torch.tensor([prompt]), cache=cache)
            for _ in range(n):
                token = logits[:, -1].argmax(-1)
                out.append(int(token))
                logits = model(token[:, None], cache=cache)
        return out

    prompts = [b["input_ids"][0, :24].tolist() for b in batches]
    same = sum(greedy(base, p) == greedy(_load(quantized["int8"]), p) for p in prompts)
    assert same >= len(prompts) - 1  # int8's greedy continuations match the float model's


def test_engine_eval_and_export_read_quantized_runs(trained, quantized, capsys):
    from kiln.config import SampleConfig
    from kiln.eval.scoring import heldout_bits_per_byte, run_windows
    from kiln.infer.generate import Engine

    engine = Engine.from_run(quantized["int4"], "cpu")
    assert isinstance(engine.model.lm_head, QF.QuantLinear)
    (text,) = engine.generate("def ", SampleConfig(max_new_tokens=8, temperature=0))
    assert isinstance(text, str)
    lm = load(quantized["int8"], "cpu")
    assert isinstance(lm.model.tok_emb, QF.QuantEmbedding) and lm.data is not None
    windows = run_windows(lm)
    bpb = heldout_bits_per_byte(lm.model, lm.data, windows, lm.n_vocab)["bpb"]
    float_bpb = heldout_bits_per_byte(load(trained, "cpu").model, lm.data, windows, lm.n_vocab)["bpb"]
    assert abs(bpb / float_bpb - 1) < 0.01
    capsys.readouterr()
    assert kiln("export", f"out={quantized['int8']}") == 2
    assert "is a quantized checkpoint" in capsys.readouterr().err


def test_one_loader_reads_a_run_a_checkpoint_a_quantized_run_and_an_export_alike(trained, quantized):
    from kiln.post.export import export_hf

    ck = _latest(trained)[0]
    exported = export_hf(trained, trained.parent / "hf")
    loaded = {"run": load(trained), "checkpoint": load(ck), "int8": load(quantized["int8"]), "hf": load(exported)}
    assert [lm.kind for lm in loaded.values()] == ["checkpoint", "checkpoint", "checkpoint", "hf"]
    assert [lm.workload for lm in loaded.values()] == ["pretrain", "pretrain", "quantize", "hf"]
    assert loaded["run"].home == trained and loaded["checkpoint"].source == ck and loaded["hf"].home == exported
    assert loaded["run"].data == trained / "data" and loaded["int8"].data == trained / "data"
    assert isinstance(loaded["int8"].model.lm_head, QF.QuantLinear)
    ids = torch.tensor([[loaded["run"].bos, *loaded["run"].encode("def f(x):\n    return")]])
    with torch.no_grad():
        logits = {name: lm.model(ids)[0, -1, : lm.n_vocab] for name, lm in loaded.items()}
    assert torch.equal(logits["run"], logits["checkpoint"])
    assert torch.allclose(logits["run"], logits["hf"], atol=1e-5)  # the export holds the same weights
    assert int(logits["int8"].argmax()) == int(logits["run"].argmax())


def test_plan_int4_weights_match_what_kiln_quantize_writes(tmp_path):
    from kiln.hardware import GPUS
    from kiln.plan import inference_estimate

    mc = preset("mini", vocab_size=1024, n_layers=1)
    model = Transformer(mc)
    model.init_weights(0)
    stored = Q.quantize_model(model, "int4", 64)
    from safetensors.torch import save_file

    save_file(QF.stored_tensors(model, stored), tmp_path / "m.safetensors")
    row = inference_estimate(mc, GPUS["H100"], "bf16", 1, 1, 1.0, weights="int4", group_size=64)
    assert row["weights_per_gpu"] == pytest.approx((tmp_path / "m.safetensors").stat().st_size, rel=0.03)
    bf16 = inference_estimate(mc, GPUS["H100"], "bf16", 1, 1, 1.0)
    assert row["weights_per_gpu"] < 0.3 * bf16["weights_per_gpu"]


# ---- bad input -------------------------------------------------------------------------------
def test_bad_input_is_refused_in_one_line(trained, quantized, tmp_path, capsys):
    cases = [
        ([f"source={quantized['int8']}", f"out={tmp_path / 'x'}"], "is already quantized (int8)"),
        ([f"source={trained}", f"out={tmp_path / 'y'}", "format=int4", "group_size=128"],
         "does not divide the input size 64"),
        ([f"source={trained}", f"out={tmp_path / 'z'}", "format=int4", "group_size=48"], "is not one of 32, 64"),
        ([f"out={tmp_path / 'w'}"], "quantize.source is empty"),
        ([f"source={trained}", f"out={trained}"], "is the source run itself"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert kiln("quantize", *args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def _copy(run, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(run, copy)
    return copy, _latest(copy)[0]


def test_a_damaged_quantized_file_is_refused(quantized, tmp_path):
    run, ck = _copy(quantized["int8"], tmp_path, "corrupt")
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (ck / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(KilnError, match="is corrupt"):
        load(ck)
    run, ck = _copy(quantized["int4"], tmp_path, "truncated")
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(KilnError, match="is truncated"):
        load(ck)


def test_a_format_tag_the_loader_does_not_know_is_refused(quantized, tmp_path):
    run, ck = _copy(quantized["int8"], tmp_path, "unknown")
    info = json.loads((ck / "checkpoint.json").read_text())
    (ck / "checkpoint.json").write_text(json.dumps({**info, "quantization": {**info["quantization"], "format": "int3"}}))
    with pytest.raises(KilnError, match="format this kiln does not know \\('int3'"):
        load(ck)
    (ck / "checkpoint.json").write_text(json.dumps({**info, "quantization": {**info["quantization"], "version": 9}}))
    with pytest.raises(KilnError, match="newer than this kiln's"):
        load(ck)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_quantized_run_generates_in_bf16(quantized, fmt):
    """CUDA's default dtype is bf16: the rotary tables (fp32) must not turn q/k into fp32 while v
    and the cache are bf16 (SDPA refuses mixed dtypes); greedy tokens agree with the fp32 model's."""
    from kiln.config import SampleConfig
    from kiln.infer.generate import Engine, generate, greedy

    lm = load(quantized[fmt], "cpu", "bf16")
    assert lm.model.norm.weight.dtype == torch.bfloat16
    prompt = [lm.bos, *lm.encode("def f(x):\n    return")]
    (seq,) = generate(lm.model, [prompt], greedy(8), stop_ids=set(), tokenizer=lm.tokenizer)
    assert len(seq.tokens) == 8
    with torch.no_grad():
        logits = lm.model(torch.tensor([prompt]))
    assert logits.dtype == torch.bfloat16
    (ref,) = generate(_load(quantized[fmt]).eval(), [prompt], greedy(8), stop_ids=set())
    assert seq.tokens[:2] == ref.tokens[:2]  # bf16 rounding may part ways later, not at once
    engine = Engine.from_run(quantized[fmt], "cpu", "bf16")
    (text,) = engine.generate("def ", SampleConfig(max_new_tokens=8, temperature=0))
    assert isinstance(text, str)


# ---- CUDA's kernels, chosen without a GPU ------------------------------------------------------
H100 = (9, 0)


@pytest.mark.parametrize("fmt, shape, group, rows, grad, cap, want", [
    # CPU: as before (bf16 kernels for decode-sized inputs, the dequantized matmul past 16 rows)
    ("int8", (1024, 512), 0, 1, False, None, "int8-cpu"),
    ("int4", (1024, 512), 32, 16, False, None, "int4-cpu"),
    ("int4", (1030, 512), 32, 1, False, None, "dequantize"),  # ATen's CPU layout wants N % 16 == 0
    ("int8", (1024, 512), 0, 17, False, None, "dequantize"),
    ("int8", (64, 128), 0, 1, False, None, "dense-once"),  # small: dequantized once
    ("int4", (1024, 512), 32, 1, True, None, "dequantize"),  # autograd: no kernel has a backward
])
def test_the_cpu_matmul_choice_is_unchanged(fmt, shape, group, rows, grad, cap, want):
    assert QF.choose_matmul("cpu", fmt, shape, group, rows, grad) == want


@pytest.mark.parametrize("fmt, shape, group, rows, grad, cap, want", [
    ("int4", (4096, 4096), 64, 1, False, H100, "int4-cuda"),  # tinygemm: decode and small batches
    ("int4", (4096, 4096), 256, 64, False, H100, "int4-cuda"),
    ("int4", (4096, 4096), 64, 65, False, H100, "dequantize"),  # prefill: dequantized, cuBLAS
    ("int4", (4096, 4096), 64, 1, True, H100, "dequantize"),
    ("int4", (4096, 4096), 64, 1, False, (8, 0), "int4-cuda"),
    ("int4", (4096, 4096), 64, 1, False, (7, 5), "dequantize"),  # the kernel needs sm80 or newer
    ("int4", (4100, 4096), 64, 1, False, H100, "dequantize"),  # N % 8 != 0
    ("int4", (4096, 4128), 32, 1, False, H100, "int4-cuda"),  # K % 32: two inner k-tiles
    ("int8", (4096, 4096), 0, 1, False, H100, "int8-upcast"),  # converted in the matmul, scaled after
    ("int8", (4096, 4096), 0, 4096, False, H100, "int8-upcast"),
    ("int8", (4096, 4096), 0, 1, True, H100, "dequantize"),
    ("int8", (256, 256), 0, 1, False, H100, "dense-once"),
])
def test_cuda_gets_its_own_kernels(fmt, shape, group, rows, grad, cap, want):
    assert QF.choose_matmul("cuda", fmt, shape, group, rows, grad, cap) == want


def test_other_devices_dequantize_per_call_and_say_so_once(capsys):
    assert QF.choose_matmul("mps", "int4", (4096, 4096), 64, 1, False) == "dequantize"
    QF.fallback_note("mps", "int4")
    QF.fallback_note("mps", "int4")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dequantized" in err and "mps" in err


def test_cuda_int4_bytes_hold_the_even_column_in_the_high_nibble():
    """`_convert_weight_to_int4pack` (CUDA) reads (N, K/2) uint8 with column 2j in the high nibble (the
    reverse of the stored form)."""
    stored = QF.pack_int4(torch.tensor([[1, 2, 15, 0]]))
    assert QF.int4_cuda_bytes(stored).tolist() == [[0x12, 0xF0]]
    q = torch.randint(0, 16, (16, 64), generator=torch.Generator().manual_seed(6))
    cuda = QF.int4_cuda_bytes(QF.pack_int4(q))
    assert torch.equal(torch.stack([cuda >> 4, cuda & 0x0F], -1).flatten(-2).long(), q)


def _stand_in_cuda_int4_ops(monkeypatch):
    """ATen's CUDA int4 ops on this CPU: the CUDA byte order unpacked, then the CPU kernel (same grid,
    same (K/g, N, 2) scales and zeros); a wrong nibble order, grid or group would show in the numbers."""
    def convert(w, inner_k_tiles):
        assert w.dtype == torch.uint8 and w.is_contiguous() and inner_k_tiles in (2, 4, 8)
        assert (2 * w.shape[1]) % (16 * inner_k_tiles) == 0
        values = torch.stack([w >> 4, w & 0x0F], -1).flatten(-2).to(torch.int32)
        return torch._convert_weight_to_int4pack_for_cpu(values, 1)

    def mm(x, w, group, sz):
        assert x.dtype == torch.bfloat16 and x.is_contiguous() and sz.dtype == torch.bfloat16
        return torch._weight_int4pack_mm_for_cpu(x, w, group, sz)

    monkeypatch.setattr(torch, "_convert_weight_to_int4pack", convert)
    monkeypatch.setattr(torch, "_weight_int4pack_mm", mm)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_cuda_paths_compute_the_stored_weights(fmt, monkeypatch):
    _stand_in_cuda_int4_ops(monkeypatch)
    g = torch.Generator().manual_seed(7)
    stored = Q.quantize_rtn(torch.randn(1024, 512, generator=g) * 0.02, fmt, 64)
    weight = QF.QuantWeight(stored)
    kernel = weight.build_kernel("int4-cuda" if fmt == "int4" else "int8-upcast")
    for dtype, tol in ((torch.float32, 0.02 if fmt == "int4" else 1e-5), (torch.bfloat16, 0.03)):
        x = torch.randn(3, 512, generator=g).to(dtype)
        reference = x.float() @ stored.dequantize().T
        with torch.no_grad():
            y = kernel(x)
        assert y.dtype == dtype and y.shape == (3, 1024)
        assert torch.allclose(y.float(), reference, rtol=0, atol=tol * reference.abs().max().item()), (fmt, dtype)


# ---- GPTQ on the configured device -------------------------------------------------------------
def test_gptq_calibrates_on_the_configured_device_and_stores_on_the_cpu(trained, tmp_path, monkeypatch):
    """`kiln quantize device=...` runs the model, the calibration and GPTQ where `device` says (as
    every verb picks it: `pick_device`) and writes the stored tensors from the CPU."""
    asked, seen = [], []
    real_pick, real_gptq = Q.pick_device, Q.quantize_gptq

    def pick(spec):
        asked.append(spec)
        return real_pick("cpu")

    def gptq(w, hessian, *args, **kw):
        seen.append((w.device.type, hessian.device.type))
        out = real_gptq(w, hessian, *args, **kw)
        return out

    monkeypatch.setattr(Q, "pick_device", pick)
    monkeypatch.setattr(Q, "quantize_gptq", gptq)
    out = tmp_path / "on-device"
    assert kiln("quantize", f"source={trained}", f"out={out}", "format=int4", "group_size=32", "method=gptq",
                "calib_sequences=8", "calib_seq_len=32", "evaluate=false", "device=cpu") == 0
    assert asked == ["cpu"] and seen and set(seen) == {("cpu", "cpu")}
    assert _latest(out)[1]["quantization"]["method"] == "gptq"


def test_stored_tensors_come_back_to_the_cpu_from_any_device():
    qt = Q.quantize_rtn(torch.randn(64, 64), "int4", 32)
    moved = qt.to("meta")
    assert moved.q.device.type == moved.scale.device.type == moved.min.device.type == "meta"
    assert moved.group_size == 32 and moved.format == "int4" and qt.to("cpu").q is qt.q


def test_quantization_on_cuda_keeps_fp32_matmuls_exact():
    """`use_device` turns TF32 on for CUDA (training's rate); the second moments and GPTQ's error
    propagation, and the before/after scores, are computed at full fp32 and the flag is put back."""
    flag = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with Q.exact_fp32(torch.device("cuda", 0)):
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
        with Q.exact_fp32(torch.device("cpu")):
            assert torch.backends.cuda.matmul.allow_tf32  # nothing to change off CUDA
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


def test_a_models_matmul_paths_are_counted_for_the_gpu_check():
    mc = preset("tiny", vocab_size=512)
    model = Transformer(mc)
    model.init_weights(0)
    stored = Q.quantize_model(model, "int4", 32)
    rest = {k: v for k, v in QF.stored_tensors(model, stored).items() if not k.endswith((".q", ".scale", ".min"))}
    quantized = QF.build_quantized(mc, stored, rest)
    counts = QF.matmul_paths(quantized)
    assert sum(counts.values()) == len(QF.matrix_names(mc))  # the tied table once
    assert set(counts) <= {"dense-once", "int4-cpu", "dequantize"}
