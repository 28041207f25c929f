"""Hugging Face export and import, GGUF, and loading only what is safe to load.

The export is checked by `transformers` itself (offline, from the directory alone) and GGUF by the
`gguf` package's reader plus a numpy forward that rotates adjacent pairs as llama.cpp does; the
import by a directory `transformers` writes from a random small LlamaConfig.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import STDLIB, TINY_TRAIN, kiln
from kiln.data.chat import check_messages, render
from kiln.data.tokenizer import BOS, EOS, SPECIAL_TOKENS, load_tokenizer
from kiln.errors import KilnError
from kiln.model.transformer import Transformer
from kiln.model.weights import load_model_tensors
from kiln.post.export import export_gguf, export_hf, import_hf, interleave_rope_rows, read_checkpoint
from kiln.train.checkpoint import CheckpointManager

transformers = pytest.importorskip("transformers")  # the dev extra; the export itself needs no transformers
FILES = ["json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py", "collections/abc.py",
         "html/parser.py", "html/entities.py", "keyword.py", "bisect.py", "heapq.py", "textwrap.py", "shlex.py"]
CODE = 'def add(a, b):\n    """Sum two numbers ."""\n    return a + b  # x .y ,z\n'


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("small_corpus")
    for f in FILES:
        shutil.copy(STDLIB / f, d / f.replace("/", "_"))
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    """A tiny model trained a few steps on a 300-token tokenizer (the model pads it to 320 rows)."""
    out = tmp_path_factory.mktemp("export") / "run"
    assert kiln("prepare", f"out={out}", f"data.input={corpus}", "data.tokenizer.vocab_size=300",
                "data.val_fraction=0.2") == 0
    assert kiln("pretrain", f"out={out}", *TINY_TRAIN, "train.max_steps=4", "train.lr=1e-2") == 0
    return out


def kiln_model(spec) -> tuple[Transformer, object]:
    ck = read_checkpoint(spec)
    model = Transformer(ck.model)
    load_model_tensors(model, ck.tensors, "test")
    return model.eval(), ck.tokenizer


@pytest.fixture(scope="module")
def exported(run):
    return export_hf(run)


def test_transformers_loads_the_export_offline_with_kilns_logits(run, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    model, ktok = kiln_model(run)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert model.cfg.vocab_size == 320 and hf.config.vocab_size == ktok.get_vocab_size() == 300  # padding cut
    ids = tok(CODE, return_tensors="pt").input_ids
    assert ids[0, 0] == ktok.token_to_id(BOS) and ids[0, 1:].tolist() == ktok.encode(CODE, add_special_tokens=False).ids
    with torch.no_grad():
        theirs, ours = hf(ids).logits, model(ids)
    assert theirs.shape[-1] == 300
    assert ours[..., 300:].abs().max() > 0  # the rows cut off were real, untrained padding
    assert theirs.std() > 0.1  # not trivially near zero
    assert (theirs - ours[..., :300]).abs().max() < 1e-4
    assert tok.decode(ids[0], skip_special_tokens=True) == CODE  # spacing of code kept as it is


def test_the_export_carries_kilns_chat_format_and_stop_tokens(run, exported):
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum 2 and 3?"},
                {"role": "assistant", "content": "5"}]
    ktok = load_tokenizer(run / "tokenizer")
    assert tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == render(ktok, messages).ids
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|system|>Be brief.<|end|><|user|>Sum 2 and 3?<|end|><|assistant|>"
    gen = GenerationConfig.from_pretrained(exported, local_files_only=True)
    assert set(gen.eos_token_id) == {ktok.token_to_id(t) for t in (EOS, BOS, "<|end|>")}
    assert json.loads((exported / "manifest.json").read_text())["step"] == 4


def test_the_exported_template_reads_roles_as_the_server_does(run, exported):
    """`developer` is `system` in both (OpenAI's newer name); a role kiln has no token for is refused by both."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    ktok = load_tokenizer(run / "tokenizer")
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Sum 2 and 3?"}]
    as_system = [{"role": "system", "content": "Be brief."}, messages[1]]
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == render(ktok, check_messages([dict(m) for m in messages]), add_generation_prompt=True).ids
    assert ids == render(ktok, as_system, add_generation_prompt=True).ids
    tool = [{"role": "tool", "content": "42"}]
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template(tool, tokenize=False)
    with pytest.raises(KilnError, match="unknown role 'tool'"):
        check_messages(tool)


def test_export_dtype_halves_the_weights(run, tmp_path):
    half = export_hf(run, tmp_path / "bf16", dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(half / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _gguf_logits(reader, ids: list[int]) -> np.ndarray:
    """A numpy Llama forward over GGUF tensors with llama.cpp's `llama` RoPE: adjacent pairs (2i, 2i+1)."""
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer")}
    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in reader.tensors}
    heads, kv, eps = f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.attention.layer_norm_rms_epsilon"]
    emb = t["token_embd.weight"]
    hd = emb.shape[1] // heads

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x):  # (T, H, hd)
        pos = np.arange(x.shape[0])[:, None]
        ang = pos * f["llama.rope.freq_base"] ** (-np.arange(0, hd, 2) / hd)  # (T, hd/2)
        a, b = x[..., 0::2], x[..., 1::2]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    x = emb[ids]
    n = len(ids)
    for i in range(f["llama.block_count"]):
        p = f"blk.{i}."
        h = norm(x, t[p + "attn_norm.weight"])
        q = rope((h @ t[p + "attn_q.weight"].T).reshape(n, heads, hd))
        k = rope((h @ t[p + "attn_k.weight"].T).reshape(n, kv, hd))
        v = (h @ t[p + "attn_v.weight"].T).reshape(n, kv, hd)
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + np.triu(np.full((n, n), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(n, -1) @ t[p + "attn_output.weight"].T
        h = norm(x, t[p + "ffn_norm.weight"])
        g = h @ t[p + "ffn_gate.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ t[p + "ffn_up.weight"].T)) @ t[p + "ffn_down.weight"].T
    return norm(x, t["output_norm.weight"]) @ t.get("output.weight", emb).T


def test_gguf_has_llama_keys_shapes_and_reproduces_the_logits(run):
    gguf = pytest.importorskip("gguf")
    path = export_gguf(run)
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "llama"
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.context_length"]) == (2, 64, 128)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.feed_forward_length"]) == (4, 2, 192)
    assert f["llama.rope.dimension_count"] == 16 and f["llama.rope.freq_base"] == 10000.0
    assert f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == 300
    assert f["tokenizer.ggml.tokens"][: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    assert f["tokenizer.ggml.bos_token_id"] == 0 and f["tokenizer.ggml.eos_token_id"] == 1
    assert "<|assistant|>" in f["tokenizer.chat_template"]
    shapes = {x.name: list(x.shape) for x in r.tensors}  # GGML order: the inner dimension first
    assert shapes["token_embd.weight"] == [64, 300]
    assert shapes["blk.0.attn_q.weight"] == [64, 64] and shapes["blk.1.attn_k.weight"] == [64, 32]
    assert shapes["blk.0.ffn_gate.weight"] == [64, 192] and shapes["blk.0.ffn_down.weight"] == [192, 64]
    assert shapes["output_norm.weight"] == [64] and "output.weight" not in shapes  # tied: llama.cpp reuses token_embd
    model, tok = kiln_model(run)
    ids = [0, *tok.encode(CODE, add_special_tokens=False).ids]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, :, :300].double().numpy()
    assert np.abs(_gguf_logits(r, ids) - ours).max() < 1e-4


def test_interleaving_rope_rows_keeps_attention_scores():
    """Rotate-half on the original rows and adjacent-pair rotation on the reordered rows give the same q·k."""
    from kiln.model.transformer import apply_rope, rope_tables

    g = torch.Generator().manual_seed(0)
    hd, heads, d = 8, 2, 16
    wq, wk, x = torch.randn(heads * hd, d, generator=g), torch.randn(heads * hd, d, generator=g), torch.randn(5, d, generator=g)
    cos, sin = rope_tables(hd, 5, 10000.0)
    q = apply_rope((x @ wq.T).view(5, heads, hd).transpose(0, 1), cos, sin)
    k = apply_rope((x @ wk.T).view(5, heads, hd).transpose(0, 1), cos, sin)

    def adjacent(w):
        y = (x @ interleave_rope_rows(w, heads).T).view(5, heads, hd).transpose(0, 1)
        ang = torch.arange(5)[:, None] * 10000.0 ** (-torch.arange(0, hd, 2) / hd)
        a, b = y[..., 0::2], y[..., 1::2]
        return torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1).flatten(-2)

    assert torch.allclose(q @ k.transpose(-1, -2), adjacent(wq) @ adjacent(wk).transpose(-1, -2), atol=1e-4)


# ---- import -----------------------------------------------------------------------------------------
def hf_llama(where, corpus, safe: bool = True):
    """A small random Llama saved by `transformers`, with a byte-level BPE of its own whose BOS/EOS
    are <s>/</s> and whose post-processor adds <s> (as Llama tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([p.read_text() for p in sorted(corpus.iterdir())], trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(where)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(where)
    if not safe:  # as older checkpoints come: a pickled state dict only
        torch.save(model.state_dict(), where / "pytorch_model.bin")
        (where / "model.safetensors").unlink()
    return model, fast


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("hf") / "llama"
    model, tok = hf_llama(d, corpus)
    return d, model, tok


def test_import_keeps_the_models_tokenizer_and_reproduces_its_logits(hf_dir, tmp_path):
    src, hf, hftok = hf_dir
    out, notes = import_hf(src, tmp_path / "imported")
    info = CheckpointManager.info(out / "checkpoints" / "step_0000000")
    assert CheckpointManager(out).verify(out / "checkpoints" / "step_0000000") is None
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000000"
    model, tok = kiln_model(out)
    # the model's own <s> and </s>, neither renamed nor joined by kiln's tokens (see tests/test_hf_chat.py)
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id(BOS) is None and tok.get_vocab_size() == 290
    chat = json.loads((out / "tokenizer" / "chat.json").read_text())
    assert chat["bos"] == 1 and chat["eos"] == [2] and chat["template"] is None
    assert info["model"]["vocab_size"] == 320 and info["model"]["rope_theta"] == 5000.0
    assert any("BOS <s> (1); EOS </s> (2)" in n and "no chat template" in n for n in notes)
    text = "for key in sorted(d):\n    print(key)\n"
    assert tok.encode(text).ids == hftok(text).input_ids  # ordinary text keeps its ids, BOS included
    ids = torch.tensor([hftok(text).input_ids])
    with torch.no_grad():
        theirs, ours = hf(ids).logits, model(ids)
    assert theirs.std() > 0.1
    assert (theirs - ours[..., :290]).abs().max() < 1e-4
    assert kiln("generate", f"out={out}", "prompt=import", "max_new_tokens=4", "temperature=0") == 0


def test_an_imported_run_continues_pretraining_and_exports_back(hf_dir, tmp_path, corpus):
    src, hf, hftok = hf_dir
    imported, _ = import_hf(src, tmp_path / "imported")
    new = tmp_path / "continued"
    assert kiln("prepare", f"out={new}", f"data.input={corpus}", "data.val_fraction=0.2",
                f"data.tokenizer.path={imported}/tokenizer/tokenizer.json") == 0
    assert kiln("pretrain", f"out={new}", f"init_from={imported}", *TINY_TRAIN, "train.max_steps=2",
                "train.lr=1e-9", "train.warmup_steps=0") == 0
    start = read_checkpoint(imported).tensors
    trained = read_checkpoint(new).tensors
    assert set(trained) == set(start)
    for k in start:  # a learning rate of 1e-9: the run trained the imported weights, not a fresh init
        assert torch.allclose(trained[k].float(), start[k].float(), atol=1e-5), k
    # and back to Hugging Face: transformers reads it and computes the original model's logits
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(export_hf(imported), local_files_only=True, dtype=torch.float32)
    ids = torch.tensor([hftok("import os\n").input_ids])
    with torch.no_grad():
        assert (back(ids).logits[..., :290] - hf(ids).logits).abs().max() < 1e-4


# ---- bad input --------------------------------------------------------------------------------------
def one_line_error(capsys, *args) -> str:
    capsys.readouterr()  # what came before is not kiln's
    assert kiln(*args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_pickle_only_directories_are_refused_unless_the_user_opts_in(tmp_path, corpus, capsys):
    model, _ = hf_llama(tmp_path / "pickled", corpus, safe=False)
    assert not list((tmp_path / "pickled").glob("*.safetensors")) and list((tmp_path / "pickled").glob("*.bin"))
    err = one_line_error(capsys, "import", str(tmp_path / "pickled"), f"out={tmp_path / 'a'}")
    assert "only pickle weights (pytorch_model.bin)" in err and "safetensors" in err and "allow_pickle=true" in err
    assert not (tmp_path / "a").exists()
    assert kiln("import", str(tmp_path / "pickled"), f"out={tmp_path / 'b'}", "allow_pickle=true") == 0
    assert "torch.load(weights_only=True)" in capsys.readouterr().out
    ours, _ = kiln_model(tmp_path / "b")
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        assert (model(ids).logits - ours(ids)[..., :290]).abs().max() < 1e-4


class RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_even_with_allow_pickle_a_pickle_that_runs_code_is_refused(tmp_path, capsys, monkeypatch):
    src = tmp_path / "evil"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                                 "num_hidden_layers": 1, "num_attention_heads": 4,
                                                 "intermediate_size": 128}))
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(src / "tokenizer.json"))
    torch.save({"model.embed_tokens.weight": RunsCode()}, src / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, "import", str(src), f"out={tmp_path / 'out'}", "allow_pickle=true")
    assert "holds more than tensors" in err and not (tmp_path / "PWNED").exists()


def test_unsupported_incomplete_and_traversing_directories_are_refused(hf_dir, tmp_path, capsys):
    src = hf_dir[0]

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(src, d)
        edit(d)
        return d

    def set_config(d, **kw):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **kw}))

    cases = {
        "gpt2": (lambda d: set_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2"),
                 "architecture 'GPT2LMHeadModel' is not supported; kiln imports LlamaForCausalLM, Qwen2ForCausalLM"),
        "scaled": (lambda d: set_config(d, rope_parameters={"rope_type": "dynamic", "factor": 8.0, "rope_theta": 5e5}),
                   "config.json's rope_parameters.rope_type is 'dynamic' (frequencies that change with the sequence "
                   "length), which kiln's model does not compute"),
        "noweights": (lambda d: (d / "model.safetensors").unlink(), "is incomplete: it holds no weights"),
        "noconfig": (lambda d: (d / "config.json").unlink(), "is incomplete: config.json is missing"),
        "notok": (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer.json"),
        "traversal": (lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"lm_head.weight": "../../secret.safetensors"}})), "lies outside"),
    }
    for name, (edit, want) in cases.items():
        err = one_line_error(capsys, "import", str(variant(name, edit)), f"out={tmp_path / ('out_' + name)}")
        assert want in err, (name, err)
        assert not (tmp_path / f"out_{name}").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert "already exists" in one_line_error(capsys, "import", str(src), f"out={tmp_path / 'taken'}")


def test_export_refuses_missing_and_quantized_checkpoints(run, tmp_path, capsys):
    err = one_line_error(capsys, "export", f"out={tmp_path / 'nothing'}")
    assert "is neither a run directory with checkpoints nor a checkpoint directory" in err
    err = one_line_error(capsys, "export", f"out={run}", f"checkpoint={tmp_path / 'gone'}")
    assert "export.checkpoint=" in err
    q = tmp_path / "q"
    shutil.copytree(run / "tokenizer", q / "tokenizer")
    ck = q / "checkpoints" / "step_0000004"
    shutil.copytree(run / "checkpoints" / "step_0000004", ck)
    info = json.loads((ck / "checkpoint.json").read_text())
    (ck / "checkpoint.json").write_text(json.dumps({**info, "quantization": {"format": "int8", "method": "rtn"}}))
    err = one_line_error(capsys, "export", f"out={q}")
    assert "is a quantized checkpoint (int8, rtn)" in err and "full-precision" in err
    assert not (q / "export").exists()
