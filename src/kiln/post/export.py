"""Hugging Face interop, both ways, and GGUF for llama.cpp (reading a Hugging Face directory is
`kiln.infer.hf`, shared with every loader).

`kiln export` writes a run's checkpoint as a directory `transformers` loads offline
(`LlamaForCausalLM`, or the Qwen2 / Qwen3 / Mistral architecture that computes what the model
adds to Llama: `hf_architecture`; safetensors, the run's tokenizer with kiln's chat template, or an imported
run's own tokenizer files and template, unchanged) or as one GGUF file. `kiln import` turns a
Llama-architecture Hugging Face directory into a kiln run (tokenizer/ as the model has it, with
`chat.json` and its chat template beside it; checkpoints/step_0000000/, config.yaml) that
`init_from=` continues. kiln's model is Llama's
layout with other names (RoPE in the same rotate-half form), so export and import rename tensors
and cut or pad the vocabulary rows; only GGUF's `llama` architecture reorders the query/key rows
(llama.cpp rotates adjacent pairs there; its `qwen2` / `qwen3` rotate halves, as kiln does). Weights are read from safetensors only: a directory holding only pickle files
is refused unless the user opts in with `allow_pickle=true`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, processors

from kiln.config import Config, dump_yaml
from kiln.data.chat import CHAT_TEMPLATE, SOURCE_DIR, ChatFormat, write_format
from kiln.data.tokenizer import BOS, END, EOS, PAD, SPECIAL_TOKENS, token_count
from kiln.errors import KilnError
from kiln.infer.hf import HF_TOKENIZER_FILES, name_map, read_hf
from kiln.infer.load import RunCheckpoint, open_checkpoint
from kiln.model.config import ModelConfig
from kiln.runs import atomic_dir, fsync_dir, manifest, sha256_file, write_json
from kiln.train.checkpoint import CheckpointManager


def read_checkpoint(spec: str | Path, key: str = "out") -> RunCheckpoint:
    """The checkpoint to export, checked: full-precision weights of a causal language model."""
    ck = open_checkpoint(spec, key).full_precision("export and evaluation")
    if not ck.model.causal:
        raise KilnError(f"{ck.path} holds a bidirectional (causal=false) model; only causal language models export "
                        "to Llama format")
    return ck


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
def _llama_tensors(ck: RunCheckpoint, scheme: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under `scheme`'s names, the padded vocabulary rows cut to the tokenizer's."""
    names = name_map(ck.model, scheme)
    if ck.model.tie_embeddings:
        names.pop("lm_head.weight")
    extra = sorted(set(ck.tensors) - set(names) - {"lm_head.weight"})
    if extra:
        raise KilnError(f"{ck.path} holds weights a causal LM of its shape does not have ({', '.join(extra[:3])}): "
                        "only plain language-model checkpoints export (merge adapters, drop heads first)")
    missing = sorted(set(names) - set(ck.tensors))
    if missing:
        raise KilnError(f"{ck.path} lacks weights its model needs ({', '.join(missing[:3])}); "
                        "export the full model's checkpoint")
    n_tok = token_count(ck.tokenizer)
    if n_tok > ck.model.vocab_size:
        raise KilnError(f"{ck.tokenizer_file} has {n_tok} tokens but the model only {ck.model.vocab_size} rows; "
                        "the tokenizer does not belong to this checkpoint")
    out = {}
    for kname, other in names.items():
        t = ck.tensors[kname]
        if kname in ("tok_emb.weight", "lm_head.weight"):
            t = t[:n_tok]  # rows past the tokenizer are padding no token id reaches
        out[other] = t.to(dtype if t.ndim > 1 or scheme == "hf" else torch.float32).contiguous()
    return out


# ---- Hugging Face export ---------------------------------------------------------------------------
def hf_tokenizer(tok: Tokenizer) -> Tokenizer:
    """A copy that adds <|bos|> in front of every encoding, as kiln's data and prompts start with it
    (what `transformers` users expect from `tokenizer(text)`); kiln itself encodes without it."""
    out = Tokenizer.from_str(tok.to_str())
    bos = out.token_to_id(BOS)
    out.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                                       special_tokens=[(BOS, bos)])
    return out


def special_ids(tok: Tokenizer) -> dict[str, int | None]:
    return {name: tok.token_to_id(t) for name, t in (("bos", BOS), ("eos", EOS), ("pad", PAD), ("end", END))}


def format_ids(fmt: ChatFormat) -> dict:
    """config.json's bos / eos / pad ids of an imported run, and the ids generation stops at."""
    eos = list(fmt.eos)
    return {"bos": fmt.bos, "eos": eos[0] if len(eos) == 1 else (eos or None), "pad": fmt.pad,
            "stops": list(dict.fromkeys([*fmt.eos, *fmt.end]))}


def hf_architecture(mc: ModelConfig) -> str:
    """The `transformers` architecture that computes `mc` exactly: Qwen3 for per-head q/k norms
    (attention biases on all four projections or none), Qwen2 for q/k/v biases without an output
    bias, Mistral for a sliding window on every layer, Llama otherwise (attention biases on all four
    or none); a combination none of them has is refused in one line."""
    window = mc.window_layers() > 0
    if mc.qk_norm:
        if mc.qkv_bias != mc.out_bias:
            raise KilnError("this model has q/k norms with model.qkv_bias != model.out_bias; transformers' Qwen3 "
                            "(attention_bias) biases all four projections or none, so no architecture exports it")
        return "Qwen3ForCausalLM"
    if mc.qkv_bias and not mc.out_bias:
        return "Qwen2ForCausalLM"
    if mc.out_bias and not mc.qkv_bias:
        raise KilnError("model.out_bias=true without q/k/v biases: no transformers architecture computes it")
    if window:
        if mc.window_from_layer or mc.qkv_bias:
            raise KilnError(f"a sliding window from layer {mc.window_from_layer} on, with attention biases on all four "
                            "projections or none and no q/k norms: no transformers architecture computes it (Mistral "
                            "windows every layer, without biases; Qwen2 has q/k/v biases only, Qwen3 q/k norms)")
        return "MistralForCausalLM"
    return "LlamaForCausalLM"


def hf_rope(mc: ModelConfig) -> dict:
    """config.json's `rope_parameters` for `mc` (transformers 5's names and the scaling's own)."""
    out = {"rope_type": "default", "rope_theta": mc.rope_theta}
    rs = mc.rope_scaling
    if rs:
        out["rope_type"] = rs["type"]
        out["factor"] = rs["factor"]
        if "original_max_seq_len" in rs:
            out["original_max_position_embeddings"] = rs["original_max_seq_len"]
        out.update({k: rs[k] for k in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow") if k in rs})
        if rs.get("attention_factor") is not None:
            out["attention_factor"] = rs["attention_factor"]
        if rs.get("truncate") is False:
            out["truncate"] = False
    return out


def hf_config(mc: ModelConfig, vocab: int, ids: dict, dtype: str) -> dict:
    """config.json of the architecture that computes `mc` (`hf_architecture`), with kiln's shape
    (RoPE both ways: transformers 5's rope_parameters, and rope_theta / rope_scaling for transformers 4)."""
    arch = hf_architecture(mc)
    rope = hf_rope(mc)
    conf = {
        "architectures": [arch],
        "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                       "MistralForCausalLM": "mistral"}[arch],
        "vocab_size": vocab,
        "hidden_size": mc.d_model,
        "intermediate_size": mc.ffn_hidden,
        "num_hidden_layers": mc.n_layers,
        "num_attention_heads": mc.n_heads,
        "num_key_value_heads": mc.n_kv_heads,
        "head_dim": mc.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": mc.max_seq_len,
        "rms_norm_eps": mc.norm_eps,
        "rope_theta": mc.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if mc.rope_scaling else None,
        "tie_word_embeddings": mc.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": dtype,
    }
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        conf["attention_bias"] = mc.qkv_bias
    if arch == "LlamaForCausalLM":
        conf["mlp_bias"] = False
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        windowed = mc.window_layers() > 0
        conf.update(use_sliding_window=windowed, sliding_window=mc.sliding_window if windowed else None,
                    max_window_layers=mc.window_from_layer if windowed else mc.n_layers,
                    layer_types=["sliding_attention" if mc.layer_window(i) else "full_attention"
                                 for i in range(mc.n_layers)])
    if arch == "MistralForCausalLM":
        conf["sliding_window"] = mc.sliding_window
    return conf


def export_hf(run_dir: str | Path, out_dir: str | Path | None = None, checkpoint: str | Path | None = None,
              dtype: str = "float32") -> Path:
    """Write `run_dir`'s newest intact checkpoint (or `checkpoint`) as a Hugging Face Llama directory,
    by default `<run>/export/hf`; returns it. The directory appears whole or not at all."""
    from safetensors.torch import save_file

    ck = read_checkpoint(checkpoint or run_dir, key="export.checkpoint" if checkpoint else "out")
    out = Path(out_dir) if out_dir else Path(run_dir) / "export" / "hf"
    tensors = _llama_tensors(ck, "hf", DTYPES[dtype])
    if not ck.chat_format.own:
        return _export_imported(ck, tensors, out, dtype)
    tok = hf_tokenizer(ck.tokenizer)
    ids = special_ids(tok)
    stops = [i for i in (ids["eos"], ids["bos"], ids["end"]) if i is not None]
    specials = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None]
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD if ids["pad"] is not None else None,
        "additional_special_tokens": [t for t in specials if t not in (BOS, EOS, PAD)],
        "model_max_length": ck.model.max_seq_len,
        "clean_up_tokenization_spaces": False,  # code: never rewrite " ." into "."
        "chat_template": CHAT_TEMPLATE,
    }
    with atomic_dir(out) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config(ck.model, token_count(tok), ids, dtype))
        # A document ends where the next begins (<|bos|>), a chat turn at <|end|>: kiln's engine stops at both.
        write_json(tmp / "generation_config.json", {"bos_token_id": ids["bos"], "eos_token_id": stops,
                                                     "pad_token_id": ids["pad"]})
        tok.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tok_config)
        write_json(tmp / "special_tokens_map.json", {k: v for k, v in tok_config.items() if k.endswith("_token")
                                                     or k == "additional_special_tokens"})
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        write_json(tmp / "manifest.json", manifest("export", {"format": "hf", "dtype": dtype}, str(ck.path),
                                                   step=ck.info.get("step"), checkpoint=str(ck.path),
                                                   tokenizer_sha256=sha256_file(ck.tokenizer_file)))
    return out


def _export_imported(ck: RunCheckpoint, tensors: dict[str, torch.Tensor], out: Path, dtype: str) -> Path:
    """An imported run (or one trained from it) back as a Hugging Face directory: its tokenizer.json
    and the original tokenizer_config.json / special_tokens_map.json / chat_template.jinja /
    generation_config.json byte for byte, so the chat template and stop ids are the model's own."""
    from safetensors.torch import save_file

    fmt = ck.chat_format
    ids = format_ids(fmt)
    kept = ck.tokenizer_file.parent / SOURCE_DIR
    with atomic_dir(out) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config(ck.model, token_count(ck.tokenizer), ids, dtype))
        shutil.copyfile(ck.tokenizer_file, tmp / "tokenizer.json")
        for name in HF_TOKENIZER_FILES:
            if (kept / name).is_file():
                shutil.copyfile(kept / name, tmp / name)
        if not (tmp / "tokenizer_config.json").is_file():
            write_json(tmp / "tokenizer_config.json", {
                "tokenizer_class": "PreTrainedTokenizerFast", **fmt.tokens, "model_max_length": ck.model.max_seq_len,
                **({"chat_template": fmt.template} if fmt.template else {})})
        if not (tmp / "generation_config.json").is_file():
            write_json(tmp / "generation_config.json", {"bos_token_id": fmt.bos, "eos_token_id": ids["stops"],
                                                         "pad_token_id": fmt.pad})
        write_json(tmp / "manifest.json", manifest("export", {"format": "hf", "dtype": dtype}, str(ck.path),
                                                   step=ck.info.get("step"), checkpoint=str(ck.path),
                                                   tokenizer_sha256=sha256_file(ck.tokenizer_file)))
    return out


# ---- GGUF export ------------------------------------------------------------------------------------
def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder a query/key projection's rows per head from rotate-half pairs (i, i + hd/2) to adjacent
    pairs (2i, 2i + 1), the layout llama.cpp's `llama` architecture rotates: same attention scores."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_architecture(mc: ModelConfig) -> str:
    """llama.cpp's architecture for `mc`, as convert_hf_to_gguf.py picks it for the Hugging Face
    family (`llama` for Llama and Mistral, `qwen2`, `qwen3`), or a one-line refusal of what none of
    them computes: a sliding window shorter than the context (llama.cpp's llama / qwen2 / qwen3
    attend to every position), llama3 RoPE outside `llama` (its `rope_freqs` factors), yarn RoPE
    without truncation, attention biases on a `qwen3`."""
    fix = "export format=hf instead"
    if mc.window_layers() and mc.sliding_window < mc.max_seq_len:
        raise KilnError(f"GGUF cannot hold this model's sliding window ({mc.sliding_window} of its {mc.max_seq_len} "
                        f"positions): llama.cpp's llama, qwen2 and qwen3 architectures attend to every position, so "
                        f"its outputs would differ past {mc.sliding_window} tokens; {fix}")
    if mc.qk_norm:
        if mc.qkv_bias or mc.out_bias:
            raise KilnError(f"GGUF: llama.cpp's qwen3 architecture (q/k norms) has no attention biases; {fix}")
        arch = "qwen3"
    elif mc.qkv_bias and not mc.out_bias:
        arch = "qwen2"
    elif mc.out_bias and not mc.qkv_bias:
        raise KilnError(f"GGUF: no llama.cpp architecture has an attention output bias without q/k/v biases; {fix}")
    else:
        arch = "llama"
    rs = mc.rope_scaling or {}
    if rs.get("type") == "llama3" and arch != "llama":
        raise KilnError(f"GGUF: llama3 RoPE scaling is written as the llama architecture's rope_freqs factors; "
                        f"llama.cpp's {arch} does not read them; {fix}")
    if rs.get("type") == "yarn" and rs.get("truncate") is False:
        raise KilnError(f"GGUF: llama.cpp's yarn RoPE rounds its ramp's ends (truncate=true); this model's does not; {fix}")
    return arch


def llama3_rope_factors(mc: ModelConfig) -> torch.Tensor:
    """llama.cpp's `rope_freqs` for llama3 RoPE: per frequency, what it divides the plain frequency
    by (convert_hf_to_gguf.py's factors, from kiln's own frequencies)."""
    from kiln.model.transformer import rope_frequencies

    plain, _ = rope_frequencies(mc.head_dim, mc.rope_theta)
    scaled, _ = rope_frequencies(mc.head_dim, mc.rope_theta, mc.rope_scaling)
    return (plain / scaled).float()


def _byte_level_bpe(tok: Tokenizer, where: Path) -> dict:
    """tokenizer.json's content if it is a byte-level BPE with GPT-2's pre-tokenizer (what kiln trains:
    llama.cpp's `gpt2` tokenizer model), else a one-line refusal."""
    data = json.loads(tok.to_str())
    pre = data.get("pre_tokenizer") or {}
    if data["model"].get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise KilnError(f"{where} is not a byte-level BPE with GPT-2 pre-tokenization (kiln's own tokenizers are); "
                        "GGUF export cannot describe it: export format=hf and convert with llama.cpp's "
                        "convert_hf_to_gguf.py")
    return data


def export_gguf(run_dir: str | Path, path: str | Path | None = None, checkpoint: str | Path | None = None,
                dtype: str = "float32") -> Path:
    """Write the checkpoint as one GGUF file (the keys of llama.cpp's llama, qwen2 or qwen3
    architecture: `gguf_architecture`; head size, RoPE scaling, biases and q/k norms as
    convert_hf_to_gguf.py writes them; the tokenizer as llama.cpp's `gpt2` BPE, the run's chat
    template), by default `<run>/export/<run name>.gguf`; returns it. Matrices are f32
    (dtype=float32) or f16 (otherwise); norms and biases stay f32, as llama.cpp wants."""
    try:
        import gguf
    except ImportError:
        raise KilnError("format=gguf needs the `gguf` package: pip install gguf (or export format=hf)") from None
    ck = read_checkpoint(checkpoint or run_dir, key="export.checkpoint" if checkpoint else "out")
    mc = ck.model
    arch = gguf_architecture(mc)
    out = Path(path) if path else Path(run_dir) / "export" / f"{Path(run_dir).resolve().name}.gguf"
    data = _byte_level_bpe(ck.tokenizer, ck.tokenizer_file)
    f16 = dtype != "float32"
    tensors = _llama_tensors(ck, "gguf", torch.float16 if f16 else torch.float32)
    for i in range(mc.n_layers if arch == "llama" else 0):  # qwen2 / qwen3 rotate halves, as kiln does
        for name, heads in (("attn_q", mc.n_heads), ("attn_k", mc.n_kv_heads)):
            key = f"blk.{i}.{name}.weight"
            tensors[key] = interleave_rope_rows(tensors[key], heads)
            if f"blk.{i}.{name}.bias" in tensors:
                bias = f"blk.{i}.{name}.bias"
                tensors[bias] = interleave_rope_rows(tensors[bias][:, None], heads)[:, 0].contiguous()
    if (mc.rope_scaling or {}).get("type") == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_factors(mc)

    vocab = ck.tokenizer.get_vocab(with_added_tokens=True)
    n_tok = token_count(ck.tokenizer)
    by_id = {i: t for t, i in vocab.items()}
    if len(by_id) != n_tok:
        raise KilnError(f"{ck.tokenizer_file} leaves ids unused; GGUF needs a token for every id up to {n_tok - 1}")
    control = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    fmt = ck.chat_format
    ids = {"bos": fmt.bos, "eos": fmt.eos[0] if fmt.eos else None, "pad": fmt.pad, "end": fmt.turn_end()}

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(ck.run.resolve().name)
        w.add_context_length(mc.max_seq_len)
        w.add_embedding_length(mc.d_model)
        w.add_block_count(mc.n_layers)
        w.add_feed_forward_length(mc.ffn_hidden)
        w.add_head_count(mc.n_heads)
        w.add_head_count_kv(mc.n_kv_heads)
        w.add_rope_dimension_count(mc.head_dim)
        if mc.n_heads * mc.head_dim != mc.d_model:
            w.add_key_length(mc.head_dim)
            w.add_value_length(mc.head_dim)
        w.add_rope_freq_base(mc.rope_theta)
        rs = mc.rope_scaling or {}
        if rs.get("type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rs["factor"])
        elif rs.get("type") == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rs["factor"])
            w.add_rope_scaling_orig_ctx_len(rs["original_max_seq_len"])
            w.add_rope_scaling_yarn_beta_fast(rs["beta_fast"])
            w.add_rope_scaling_yarn_beta_slow(rs["beta_slow"])
            if rs["attention_factor"] is not None:
                w.add_rope_scaling_yarn_attn_factor(rs["attention_factor"])
        w.add_layer_norm_rms_eps(mc.norm_eps)
        w.add_vocab_size(n_tok)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list([by_id[i] for i in range(n_tok)])
        w.add_token_types([gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL for i in range(n_tok)])
        w.add_token_merges(merges)
        if ids["bos"] is not None:
            w.add_bos_token_id(ids["bos"])
        if ids["eos"] is not None:
            w.add_eos_token_id(ids["eos"])
        if ids["pad"] is not None:
            w.add_pad_token_id(ids["pad"])
        if ids["end"] is not None:
            w.add_eot_token_id(ids["end"])
        w.add_add_bos_token(fmt.starts_with_bos)
        w.add_add_eos_token(False)
        if fmt.chat_template:
            w.add_chat_template(fmt.chat_template)
        for name, t in tensors.items():
            w.add_tensor(name, t.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    return out


def import_hf(src: str | Path, out: str | Path, allow_pickle: bool = False) -> tuple[Path, list[str]]:
    """Turn a Hugging Face Llama directory into the kiln run `out` (tokenizer/, checkpoints/step_0000000,
    config.yaml), which `init_from=out` continues; returns the run and what was read and done. The
    tokenizer is kept as it is, with `chat.json` (its BOS / EOS / end-of-turn / pad ids) and the chat
    template beside it, and the directory's other tokenizer files under `tokenizer/hf/`. The run
    appears whole or not at all, and an existing non-empty `out` is refused."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KilnError(f"out={out} already exists; choose a new out= for the imported run")
    hf = read_hf(src, allow_pickle)
    with atomic_dir(out) as tmp:
        tdir = tmp / "tokenizer"
        tdir.mkdir()
        shutil.copyfile(hf.source / "tokenizer.json", tdir / "tokenizer.json")  # byte for byte: the same ids
        write_format(tdir, hf.chat.record(), hf.chat.template)
        (tdir / SOURCE_DIR).mkdir()
        for name in HF_TOKENIZER_FILES:  # what `kiln export` writes back unchanged
            if (hf.source / name).is_file():
                shutil.copyfile(hf.source / name, tdir / SOURCE_DIR / name)
        write_json(tdir / "import.json", {"source": str(Path(src).resolve())})
        ck = CheckpointManager(tmp)
        step = ck.path(0)
        step.mkdir(parents=True)
        save_file(hf.tensors, step / "model.safetensors")
        torch.save({"step": 0}, step / "state.pt")  # what loaders of a checkpoint read besides the weights
        CheckpointManager.write_info(step, 0, {
            "workload": "import", "model": hf.model.to_dict(), "imported_from": str(Path(src).resolve()),
            "tokenizer_sha256": sha256_file(tmp / "tokenizer" / "tokenizer.json"),
        })
        (ck.dir / "latest").write_text(step.name + "\n")
        cfg = Config(out=str(out), init_from="")
        for k, v in hf.model.to_dict().items():
            if hasattr(cfg.model, k):
                setattr(cfg.model, k, v)
        cfg.data.tokenizer.path = str(out / "tokenizer" / "tokenizer.json")
        cfg.train.seq_len = min(cfg.train.seq_len, hf.model.max_seq_len)
        (tmp / "config.yaml").write_text(dump_yaml(cfg))
    return out, hf.notes


# ---- the verbs ------------------------------------------------------------------------------------
def run_export(cfg: Config) -> Path:
    ec = cfg.export
    if ec.format == "gguf":
        path = export_gguf(cfg.out, ec.path or None, ec.checkpoint or None, ec.dtype)
    else:
        path = export_hf(cfg.out, ec.path or None, ec.checkpoint or None, ec.dtype)
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    print(f"export: wrote {path} ({ec.format}, {ec.dtype}, {size / 1e6:.1f} MB)")
    return path


def run_import(cfg: Config) -> Path:
    hi = cfg.hf_import
    if not hi.path:
        raise KilnError("import needs the Hugging Face directory: kiln import PATH out=runs/NAME")
    out, notes = import_hf(hi.path, cfg.out, hi.allow_pickle)
    for note in notes:
        print(f"import: {note}")
    print(f"import: wrote the run {out}; fine-tune it with `kiln sft out=NEW init_from={out}` (conversations in its "
          f"own chat template), or continue it with `kiln pretrain out=NEW init_from={out}` on data prepared "
          f"with its tokenizer (data.tokenizer.path={out}/tokenizer/tokenizer.json)")
    return out
