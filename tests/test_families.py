"""The model families kiln imports, checked against `transformers` itself: Llama 3.x (llama3 RoPE
scaling), Qwen2/2.5 (q/k/v biases, yarn RoPE, a sliding window on the upper layers), Qwen3 (per-head
q/k norms, a head size of its own, attention biases) and Mistral (a sliding window on every layer, a
head size of its own, linear RoPE scaling).

Each is a tiny random model `transformers` builds and saves (no downloads), with biases and norm
gains drawn at random too (transformers starts them at 0 and 1, which would hide a missing one) and
a byte-level BPE tokenizer of its own. For each: the import's logits equal transformers' within
1e-4 in fp32 over a sequence longer than the sliding window, greedy generations through the KV
cache (the fused decode step and the model's own forward, rows at different lengths) equal
transformers' `generate(do_sample=False)`, the parameter count equals transformers', and the
export loads back in transformers as the same architecture with the same logits. Then what each
feature needs elsewhere: quantization, LoRA, the decode step, tensor parallelism, GGUF, the FLOP
and parameter formulas, old checkpoint.json files, and the one-line refusals.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import kiln
from kiln.errors import KilnError
from kiln.infer.generate import generate, greedy
from kiln.model.config import ModelConfig, preset
from kiln.model.transformer import Transformer
from kiln.model.weights import load_model_tensors
from kiln.post.export import export_gguf, export_hf, import_hf, read_checkpoint

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

LINES = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "What is 2 + 3? It is 5.", "for key in sorted(d):\n    print(key)\n",
         "Square of 3 is 9 and of 4 is 16.", "import os\nprint(os.getcwd())\n"] * 20
VOCAB = 300  # the tokenizer's ids; kiln pads its rows to 320
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-5, initializer_range=0.1,
             bos_token_id=1, eos_token_id=2)
WINDOW = 16
LENGTH = 56  # tokens each logit check runs over: past the window, and past llama3's original context


def family_config(name: str, **changes):
    """(transformers config, architecture) of each family's tiny model; `changes` go to its config."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if name == "llama3":  # Llama 3.2: llama3 RoPE scaling, tied embeddings
        cls, arch, kw = LlamaConfig, "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif name == "qwen2":  # Qwen2.5: q/k/v biases, yarn, a sliding window on the layers from max_window_layers on
        cls, arch, kw = Qwen2Config, "Qwen2ForCausalLM", dict(
            tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
            rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                             "original_max_position_embeddings": 24})
    elif name == "qwen3":  # Qwen3: q/k norms, head_dim 24 (4 × 24 ≠ 64), here with attention biases on all four
        cls, arch, kw = Qwen3Config, "Qwen3ForCausalLM", dict(
            head_dim=24, attention_bias=True, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    elif name == "mistral":  # a sliding window on every layer, head_dim 32 (4 × 32 ≠ 64), linear RoPE scaling
        cls, arch, kw = MistralConfig, "MistralForCausalLM", dict(
            head_dim=32, sliding_window=WINDOW, tie_word_embeddings=False,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    else:
        raise ValueError(name)
    return cls(**{**SHAPE, **kw, **changes}), arch


FAMILIES = ["llama3", "qwen2", "qwen3", "mistral"]


def save_family(where, name: str, **changes):
    """A tiny random model of family `name` and its tokenizer, saved by `transformers` in `where`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() == VOCAB
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(where)
    cfg, arch = family_config(name, **changes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # biases and norm gains away from 0 and 1, so a missing or misplaced one shows
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif p.ndim == 1:
                p.normal_(1.0, 0.2)
    assert type(model).__name__ == arch
    model.save_pretrained(where)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, transformers model, its directory, the kiln run imported from it, import notes)."""
    root = tmp_path_factory.mktemp(request.param)
    model = save_family(root / "hf", request.param)
    run, notes = import_hf(root / "hf", root / "run")
    return request.param, model, root / "hf", run, notes


def kiln_model(spec) -> Transformer:
    ck = read_checkpoint(spec)
    model = Transformer(ck.model)
    load_model_tensors(model, ck.tensors, "test")
    return model.eval()


def sequence(n: int = LENGTH, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)


# ---- import: logits, parameters, what it says ----------------------------------------------------
def test_the_import_computes_transformers_logits_past_the_window(family):
    name, hf, _, run, _ = family
    model = kiln_model(run)
    ids = torch.cat([sequence(), sequence(seed=1)])
    with torch.no_grad():
        theirs, ours = hf(ids).logits, model(ids)[..., :VOCAB]
    assert theirs.std() > 0.5  # not trivially near zero
    assert (theirs - ours).abs().max() < 1e-4
    if name in ("qwen2", "mistral"):  # the window matters here: without it the logits past it differ
        mc = model.cfg
        unwindowed = Transformer(ModelConfig(**{**mc.to_dict(), "sliding_window": 0}))
        unwindowed.load_state_dict(model.state_dict())
        with torch.no_grad():
            free = unwindowed.eval()(ids)[..., :VOCAB]
        assert (free[:, :WINDOW] - theirs[:, :WINDOW]).abs().max() < 1e-4
        assert (free[:, WINDOW:] - theirs[:, WINDOW:]).abs().max() > 1e-2


def test_the_parameter_count_is_transformers(family):
    _, hf, _, run, _ = family
    mc = read_checkpoint(run).model
    assert ModelConfig(**{**mc.to_dict(), "vocab_size": VOCAB}).num_params() == hf.num_parameters()
    assert sum(p.numel() for p in Transformer(mc).parameters()) == mc.num_params()  # 320 rows: kiln's padding


def test_the_import_says_what_it_read(family):
    name, hf, _, run, notes = family
    said = notes[0]
    assert said.startswith(type(hf).__name__ + ": ") and f"{hf.num_parameters():,} parameters" in said
    assert "context 96" in said
    want = {"llama3": ["RoPE θ=500000, llama3 scaling ×8 from 32 positions", "tied embeddings"],
            "qwen2": ["yarn scaling ×4 from 24 positions", "q/k/v biases", "a sliding window of 16 on layers 1-2"],
            "qwen3": ["4/2 heads of 24", "q/k norms", "q/k/v biases", "an output bias", "untied"],
            "mistral": ["4/2 heads of 32", "linear scaling ×2", "a sliding window of 16 on every layer"]}[name]
    for w in want:
        assert w in said, (w, said)
    assert kiln("import", str(family[2]), f"out={run.parent / 'again'}") == 0


# ---- generation: the KV cache, the fused decode step ---------------------------------------------
@pytest.mark.parametrize("fused", [True, False], ids=["decode-step", "forward"])
def test_greedy_generations_are_transformers(family, fused):
    """Two prompts of different lengths decode together (the cache's rows at different lengths),
    past the sliding window; each continuation equals transformers' greedy one for that prompt."""
    _, hf, _, run, _ = family
    model = kiln_model(run)
    prompts = [sequence(9, seed=2)[0].tolist(), sequence(4, seed=3)[0].tolist()]
    new = 30
    seqs = generate(model, prompts, greedy(new), stop_ids=set(), vocab=VOCAB, fused=fused)
    for prompt, seq in zip(prompts, seqs):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new, min_new_tokens=new,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert seq.tokens == want


# ---- export back -----------------------------------------------------------------------------------
def test_the_export_loads_in_transformers_as_the_same_architecture(family, tmp_path):
    from transformers import AutoModelForCausalLM

    _, hf, _, run, _ = family
    back = AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf"), local_files_only=True,
                                                dtype=torch.float32).eval()
    assert type(back) is type(hf)
    assert back.num_parameters() == hf.num_parameters()
    ids = sequence()
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max() < 1e-4


# ---- GGUF: llama.cpp's architecture, keys and tensors for each feature ------------------------------
def gguf_logits(path, ids: list[int]) -> np.ndarray:
    """A numpy forward over a GGUF file as llama.cpp computes its llama, qwen2 and qwen3
    architectures: q/k/v (and output) biases where the file has them, per-head q/k RMSNorm (qwen3),
    heads of `attention.key_length`, RoPE on adjacent pairs (llama: the rows were reordered for it;
    `rope_freqs` divides each frequency, `rope.scaling.type` linear divides them all) or on halves
    (qwen2 and qwen3, llama.cpp's NEOX rotation), grouped-query attention, SwiGLU."""
    import gguf

    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer")}
    arch = f["general.architecture"]
    key = lambda name: f[f"{arch}.{name}"]  # noqa: E731
    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in r.tensors}
    heads, kv, eps = key("attention.head_count"), key("attention.head_count_kv"), key("attention.layer_norm_rms_epsilon")
    emb = t["token_embd.weight"]
    hd = f.get(f"{arch}.attention.key_length", emb.shape[1] // heads)
    assert key("rope.dimension_count") == hd
    freq = key("rope.freq_base") ** (-np.arange(0, hd, 2) / hd) / t.get("rope_freqs.weight", 1.0)
    scaling = f.get(f"{arch}.rope.scaling.type", "none")
    assert scaling in ("none", "linear"), scaling
    if scaling == "linear":
        freq = freq / key("rope.scaling.factor")

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x):  # (T, H, hd)
        ang = np.arange(x.shape[0])[:, None, None] * freq  # (T, 1, hd/2)
        cos, sin = np.cos(ang), np.sin(ang)
        a, b = (x[..., 0::2], x[..., 1::2]) if arch == "llama" else (x[..., : hd // 2], x[..., hd // 2:])
        first, second = a * cos - b * sin, a * sin + b * cos
        if arch == "llama":
            return np.stack([first, second], -1).reshape(x.shape)
        return np.concatenate([first, second], -1)

    def proj(h, name):
        y = h @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    x, n = emb[ids], len(ids)
    for i in range(key("block_count")):
        p = f"blk.{i}."
        h = norm(x, t[p + "attn_norm.weight"])
        q, k = proj(h, p + "attn_q").reshape(n, heads, hd), proj(h, p + "attn_k").reshape(n, kv, hd)
        if p + "attn_q_norm.weight" in t:
            q, k = norm(q, t[p + "attn_q_norm.weight"]), norm(k, t[p + "attn_k_norm.weight"])
        q, k, v = rope(q), rope(k), proj(h, p + "attn_v").reshape(n, kv, hd)
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + np.triu(np.full((n, n), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + proj(np.einsum("hts,shd->thd", a, v).reshape(n, -1), p + "attn_output")
        h = norm(x, t[p + "ffn_norm.weight"])
        g = h @ t[p + "ffn_gate.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ t[p + "ffn_up.weight"].T)) @ t[p + "ffn_down.weight"].T
    return norm(x, t["output_norm.weight"]) @ t.get("output.weight", emb).T


GGUF_CASES = {  # family, changes to its config, llama.cpp's architecture, tensors and keys that must be there
    "llama3-biased": ("llama3", {"attention_bias": True}, "llama",
                      ["rope_freqs.weight", "blk.0.attn_q.bias", "blk.2.attn_output.bias"], {}),
    "qwen3": ("qwen3", {"attention_bias": False}, "qwen3", ["blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"],
              {"qwen3.attention.key_length": 24, "qwen3.attention.value_length": 24}),
    "mistral-unwindowed": ("mistral", {"sliding_window": None}, "llama", [],
                           {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0,
                            "llama.attention.key_length": 32}),
    "qwen2-unwindowed": ("qwen2", {"use_sliding_window": False}, "qwen2", ["blk.0.attn_v.bias"],
                         {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
                          "qwen2.rope.scaling.original_context_length": 24, "qwen2.rope.scaling.yarn_beta_fast": 32.0}),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_takes_llama_cpps_architecture_keys_and_tensors(case, tmp_path):
    gguf = pytest.importorskip("gguf")
    name, changes, arch, tensors, keys = GGUF_CASES[case]
    save_family(tmp_path / "hf", name, **changes)
    run, _ = import_hf(tmp_path / "hf", tmp_path / "run")
    path = export_gguf(run)
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items()}
    names = {x.name for x in r.tensors}
    assert f["general.architecture"] == arch
    assert set(tensors) <= names
    for k, v in keys.items():
        assert f[k] == pytest.approx(v) if isinstance(v, float) else f[k] == v, k
    if arch != "llama":  # rotate-half, as kiln: no reordered rows
        assert "rope_freqs.weight" not in names
    if "yarn" in keys.values():
        return  # llama.cpp's own yarn is not redone here in numpy
    model = kiln_model(run)
    ids = sequence(24)[0].tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, :, :VOCAB].double().numpy()
    assert np.abs(gguf_logits(path, ids) - ours).max() < 1e-4


def test_gguf_refuses_a_sliding_window_llama_cpp_would_ignore(family, capsys):
    name, _, _, run, _ = family
    capsys.readouterr()
    rc = kiln("export", f"out={run}", "format=gguf", f"path={run.parent / 'x.gguf'}")
    err = capsys.readouterr().err
    if name not in ("qwen2", "mistral"):  # no window: whatever GGUF says of the model, it is not that
        assert "sliding window" not in err and (rc == 0) == (run.parent / "x.gguf").exists()
        (run.parent / "x.gguf").unlink(missing_ok=True)
        return
    assert rc == 2
    assert len(err.splitlines()) == 1 and "sliding window (16 of its 96 positions)" in err and "format=hf" in err
    assert not (run.parent / "x.gguf").exists()


# ---- what each feature needs elsewhere ----------------------------------------------------------------
def featured(**changes) -> Transformer:
    """A kiln model with every feature at once: a head size of its own, q/k/v biases, q/k norms, yarn
    RoPE, a sliding window from layer 1 on; biases and gains drawn at random."""
    cfg = ModelConfig(**{**dict(vocab_size=128, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=24,
                                qkv_bias=True, qk_norm=True, max_seq_len=64, sliding_window=8, window_from_layer=1,
                                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 24}), **changes})
    model = Transformer(cfg)
    model.init_weights(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.0 if name.endswith("bias") else 1.0))
    return model.eval()


def test_the_decode_step_takes_every_feature_eager_and_compiled():
    """Rows at different lengths, past the window, decode through the fused step (compiled too) with
    the logits of a full forward over each row's sequence."""
    from kiln.infer import decode
    from kiln.infer.engine import _RowView
    from kiln.model.transformer import KVCache

    model = featured()
    assert decode.supports(model)
    for compile in (False, True):
        step = decode.DecodeStep(model, compile=compile)
        seqs = {0: sequence(13, seed=4)[0].remainder(128).tolist(), 1: sequence(5, seed=5)[0].remainder(128).tolist()}
        cache = KVCache(model.cfg, 2, 40)
        with torch.inference_mode():
            for row, ids in seqs.items():
                view = _RowView(cache, row, row + 1)
                model(torch.tensor([ids[:-1]]), cache=view)
                cache.lengths[row] = view.lengths[0]
            for _ in range(6):
                last = torch.tensor([ids[-1] for ids in seqs.values()])
                logits = step(last, cache, 2, max(len(ids) for ids in seqs.values()))
                cache.lengths += 1
                for row, ids in seqs.items():
                    want = model(torch.tensor([ids]))[0, -1]
                    torch.testing.assert_close(logits[row], want, atol=1e-4, rtol=1e-4)
                    ids.append(int(want.argmax()))
        assert len(seqs[0]) > model.cfg.sliding_window + 8
        assert step.note is None  # compiled when asked, not eager after a failure


def test_quantized_models_keep_biases_and_qk_norms_in_full_precision():
    """int8 and int4 weights of a model with biases and q/k norms compute what the float model with the
    dequantized matrices computes: the biases and gains stay floats, beside the stored matrices."""
    from kiln.model.quant import build_quantized, matrix_names
    from kiln.post.quantize import quantize_model

    model = featured()
    ids = sequence(40)[:, :40].remainder(128)
    for fmt in ("int8", "int4"):
        stored = quantize_model(model, fmt, group_size=32 if fmt == "int4" else 0)
        rest = {k: v for k, v in model.state_dict().items() if k not in stored and k != "lm_head.weight"}
        assert "layers.0.attn.wq.bias" in rest and "layers.0.attn.q_norm.weight" in rest
        quantized = build_quantized(model.cfg, stored, rest)
        reference = featured()
        with torch.no_grad():
            for name in matrix_names(model.cfg):
                reference.get_parameter(name).copy_(stored[name].dequantize(torch.float32))
            assert (quantized(ids) - reference(ids)).abs().max() < 1e-4


def test_lora_adapts_biased_projections_and_merges_back():
    from kiln.config import LoRAConfig
    from kiln.model.lora import apply_lora, merge_lora

    model = featured()
    ids = sequence(30)[:, :30].remainder(128)
    with torch.no_grad():
        base = model(ids)
        apply_lora(model, LoRAConfig(rank=4, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"]))
        assert (model(ids) - base).abs().max() == 0  # B = 0: the adapted model starts as its base
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
        adapted = model(ids)
        assert not model.layers["0"].attn.wq.bias.requires_grad
        merge_lora(model)
        assert type(model.layers["0"].attn.wq) is torch.nn.Linear and model.layers["0"].attn.wq.bias is not None
        assert (model(ids) - adapted).abs().max() < 1e-4
        assert (adapted - base).abs().max() > 1e-3


def test_tensor_parallelism_refuses_qk_norms_in_one_line():
    from kiln.train.parallel import apply_tp

    class Mesh:
        def size(self):
            return 2

    with pytest.raises(KilnError, match=r"parallel.tp=2 with model.qk_norm=true .* use parallel.tp=1"):
        apply_tp(featured(), Mesh(), sequence_parallel=True)


def test_flops_count_the_heads_width_and_the_window():
    """The formula against torch's FLOP counter (biases and norms add no matmul FLOPs; heads of 24
    give q and the attention 96 wide, not d_model 64), and a sliding window counts the keys it sees."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = featured(sliding_window=0, window_from_layer=0).train()
    x = torch.randint(0, 128, (2, 32))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x).float().logsumexp(-1).sum().backward()
    assert counter.get_total_flops() == pytest.approx(model.cfg.flops_per_token(32) * x.numel(), rel=1e-9)
    mc = featured().cfg  # window 8 on layers 1 and 2
    assert mc.attended(32) == 32 + 2 * 8 and mc.attended(4) == 3 * 4
    assert mc.forward_flops_per_token(32) == 2 * mc.matmul_params() + 4 * 96 * (32 + 16)
    assert mc.num_params() == sum(p.numel() for p in Transformer(mc).parameters())


def test_the_memory_estimate_counts_q_k_norms_and_the_heads_width():
    """Saved activations of a real CPU training step with heads 96 wide over d_model 64, q/k/v biases
    and q/k norms, against `estimate_training_memory` (kiln plan's), tensor by tensor."""
    from test_plan import _measure_step

    from kiln.plan import estimate_training_memory

    cfg = featured(sliding_window=0, window_from_layer=0).cfg
    measured = _measure_step(cfg, 2, 64, checkpointing=False)
    estimate = estimate_training_memory(cfg, 2, 64, "fp32")
    assert estimate["activations"] + estimate["logits"] == pytest.approx(measured["activations"], rel=0.001)
    assert estimate["total"] == pytest.approx(measured["peak"], rel=0.04)


def test_plan_counts_an_imported_shape(capsys):
    from kiln import cli

    args = ["plan", "model.preset=llama3-1b", "model.head_dim=128", "model.qk_norm=true", "model.qkv_bias=true",
            "model.sliding_window=4096", "model.rope_scaling={type: llama3, factor: 32, original_max_seq_len: 8192}",
            "tokens=1e9", "json=true"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    mc = preset("llama3-1b", head_dim=128, qk_norm=True, qkv_bias=True)
    assert result["model"]["params"] == mc.num_params()


def test_old_checkpoint_json_files_read_as_the_model_they_were():
    """A checkpoint.json written before these fields existed builds the same model; new ones round-trip."""
    old = {"vocab_size": 320, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 192,
           "multiple_of": 64, "max_seq_len": 128, "rope_theta": 10000.0, "norm_eps": 1e-5, "tie_embeddings": True,
           "causal": True}
    mc = ModelConfig.from_dict(old)
    assert (mc.head_dim, mc.qkv_bias, mc.out_bias, mc.qk_norm, mc.rope_scaling, mc.sliding_window) == \
        (16, False, False, False, None, 0)
    assert ModelConfig.from_dict(json.loads(json.dumps(mc.to_dict()))) == mc
    new = featured().cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(new.to_dict()))) == new
    assert new.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_seq_len": 24, "beta_fast": 32.0,
                                "beta_slow": 1.0, "attention_factor": None, "truncate": True}
    with pytest.raises(KilnError, match="model.rope_scaling type 'dynamic' is not computed"):
        ModelConfig(rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(KilnError, match="sliding window is a causal attention pattern"):
        ModelConfig(sliding_window=8, causal=False)


# ---- refusals: one line, naming the field ----------------------------------------------------------
@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2-variants") / "hf"
    save_family(d, "qwen2")
    return d


@pytest.mark.parametrize("edit, want", [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6, "long_factor": [1.0], "short_factor": [1.0]}},
     "config.json's rope_parameters.rope_type is 'longrope'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "config.json's rope_scaling.rope_type is 'dynamic'"),
    ({"partial_rotary_factor": 0.5}, "config.json's partial_rotary_factor is 0.5"),
    ({"hidden_act": "gelu"}, "config.json's hidden_act is 'gelu'"),
    ({"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
     "config.json's layer_types interleaves full and sliding-window layers"),
    ({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"},
     "architecture 'Gemma2ForCausalLM' is not supported; kiln imports LlamaForCausalLM, Qwen2ForCausalLM, "
     "Qwen3ForCausalLM, MistralForCausalLM"),
])
def test_what_kiln_cannot_compute_is_refused_naming_the_field(qwen2_dir, tmp_path, capsys, edit, want):
    d = tmp_path / "variant"
    shutil.copytree(qwen2_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **edit}))
    capsys.readouterr()
    assert kiln("import", str(d), f"out={tmp_path / 'out'}") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and want in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_llama_mlp_bias_is_refused(tmp_path, capsys):
    save_family(tmp_path / "hf", "llama3", mlp_bias=True)
    capsys.readouterr()
    assert kiln("import", str(tmp_path / "hf"), f"out={tmp_path / 'out'}") == 2
    assert "config.json's mlp_bias is true" in capsys.readouterr().err
