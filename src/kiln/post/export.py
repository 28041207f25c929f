"""Hugging Face interop, both ways, and GGUF for llama.cpp.

`kiln export` writes a run's checkpoint as a directory `transformers` loads offline
(`LlamaForCausalLM`, safetensors, the run's tokenizer with kiln's chat template) or as one GGUF
file. `kiln import` turns a Llama-architecture Hugging Face directory into a kiln run (tokenizer/,
checkpoints/step_0000000/, config.yaml) that `init_from=` continues. kiln's model is Llama's
layout with other names (RoPE in the same rotate-half form), so export and import rename tensors
and cut or pad the vocabulary rows; only GGUF reorders the query/key rows (llama.cpp rotates
adjacent pairs). Weights are read from safetensors only: a directory holding only pickle files
is refused unless the user opts in with `allow_pickle=true`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, processors

from kiln.config import Config, dump_yaml
from kiln.data.chat import CHAT_TEMPLATE
from kiln.data.tokenizer import BOS, END, EOS, PAD, SPECIAL_TOKENS
from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.runs import atomic_dir, fsync_dir, manifest, sha256_file, write_json
from kiln.train.checkpoint import CheckpointManager

# (kiln, Hugging Face Llama, GGUF) names of every weight; blocks are prefixed with their index
# (`layers.N.` / `model.layers.N.` / `blk.N.`).
TOP_NAMES = [("tok_emb", "model.embed_tokens", "token_embd"), ("norm", "model.norm", "output_norm"),
             ("lm_head", "lm_head", "output")]
BLOCK_NAMES = [
    ("attn_norm", "input_layernorm", "attn_norm"),
    ("attn.wq", "self_attn.q_proj", "attn_q"),
    ("attn.wk", "self_attn.k_proj", "attn_k"),
    ("attn.wv", "self_attn.v_proj", "attn_v"),
    ("attn.wo", "self_attn.o_proj", "attn_output"),
    ("mlp_norm", "post_attention_layernorm", "ffn_norm"),
    ("mlp.w1", "mlp.gate_proj", "ffn_gate"),
    ("mlp.w3", "mlp.up_proj", "ffn_up"),
    ("mlp.w2", "mlp.down_proj", "ffn_down"),
]
_PREFIX = {"hf": "model.layers.{}.", "gguf": "blk.{}."}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Pickle formats other tools save weights in: they can run code when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def name_map(n_layers: int, scheme: str) -> dict[str, str]:
    """kiln weight name -> its name in `scheme` ("hf" or "gguf") for a model of `n_layers` blocks."""
    col = {"hf": 1, "gguf": 2}[scheme]
    out = {f"{row[0]}.weight": f"{row[col]}.weight" for row in TOP_NAMES}
    for i in range(n_layers):
        for row in BLOCK_NAMES:
            out[f"layers.{i}.{row[0]}.weight"] = _PREFIX[scheme].format(i) + f"{row[col]}.weight"
    return out


def padded_vocab(n_tokens: int) -> int:
    """kiln's model rows for a tokenizer of `n_tokens` (a multiple of 64, as `kiln pretrain` pads)."""
    return 64 * math.ceil(n_tokens / 64)


def token_count(tok: Tokenizer) -> int:
    """How many ids the tokenizer can produce (its largest id + 1)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


# ---- a kiln checkpoint ---------------------------------------------------------------------------
@dataclass
class KilnCheckpoint:
    """A checkpoint's weights (plain kiln names), its model and the run's tokenizer."""

    path: Path
    run: Path
    info: dict
    model: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    tokenizer_file: Path


def read_checkpoint(spec: str | Path, key: str = "out") -> KilnCheckpoint:
    """A run's newest intact checkpoint (or the checkpoint directory `spec` names), checked: its
    tokenizer is the one it was trained with, and it is a full-precision causal language model."""
    from kiln.data.tokenizer import load_tokenizer
    from kiln.workloads.common import check_tokenizer, checkpoint_tensors, find_checkpoint

    path = find_checkpoint(str(spec), key=key)
    info = CheckpointManager.info(path)
    q = info.get("quantization")
    if q:
        what = ", ".join(str(q[k]) for k in ("format", "method") if k in q) if isinstance(q, dict) else str(q)
        raise KilnError(f"{path} is a quantized checkpoint ({what}); export and evaluation read full-precision "
                        "weights: name the checkpoint it was quantized from")
    if "model" not in info:
        raise KilnError(f"{path}/checkpoint.json records no model; it was not written by a kiln training verb")
    mc = ModelConfig.from_dict(info["model"])
    if not mc.causal:
        raise KilnError(f"{path} holds a bidirectional (causal=false) model; only causal language models export "
                        "to Llama format")
    run = path.parent.parent
    tfile = run / "tokenizer" / "tokenizer.json"
    check_tokenizer(tfile, info, f"{key}={spec}")
    tok = load_tokenizer(tfile)
    return KilnCheckpoint(path, run, info, mc, checkpoint_tensors(path), tok, tfile)


def _llama_tensors(ck: KilnCheckpoint, scheme: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under `scheme`'s names, the padded vocabulary rows cut to the tokenizer's."""
    names = name_map(ck.model.n_layers, scheme)
    if ck.model.tie_embeddings:
        names.pop("lm_head.weight")
    extra = sorted(set(ck.tensors) - set(names) - {"lm_head.weight"})
    if extra:
        raise KilnError(f"{ck.path} holds weights a Llama causal LM does not have ({', '.join(extra[:3])}): "
                        "only plain language-model checkpoints export (merge adapters, drop heads first)")
    missing = sorted(set(names) - set(ck.tensors))
    if missing:
        raise KilnError(f"{ck.path} lacks weights a Llama model needs ({', '.join(missing[:3])}); "
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


def hf_config(mc: ModelConfig, vocab: int, ids: dict, dtype: str) -> dict:
    """config.json of a `LlamaForCausalLM` with kiln's shape (rope_theta both ways: transformers 4 and 5)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "rope_parameters": {"rope_type": "default", "rope_theta": mc.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": mc.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": dtype,
    }


def export_hf(run_dir: str | Path, out_dir: str | Path | None = None, checkpoint: str | Path | None = None,
              dtype: str = "float32") -> Path:
    """Write `run_dir`'s newest intact checkpoint (or `checkpoint`) as a Hugging Face Llama directory,
    by default `<run>/export/hf`; returns it. The directory appears whole or not at all."""
    from safetensors.torch import save_file

    ck = read_checkpoint(checkpoint or run_dir, key="export.checkpoint" if checkpoint else "out")
    out = Path(out_dir) if out_dir else Path(run_dir) / "export" / "hf"
    tensors = _llama_tensors(ck, "hf", DTYPES[dtype])
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


# ---- GGUF export ------------------------------------------------------------------------------------
def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder a query/key projection's rows per head from rotate-half pairs (i, i + hd/2) to adjacent
    pairs (2i, 2i + 1), the layout llama.cpp's `llama` architecture rotates: same attention scores."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


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
    """Write the checkpoint as one GGUF file (llama architecture keys, the tokenizer as llama.cpp's
    `gpt2` BPE, kiln's chat template), by default `<run>/export/<run name>.gguf`; returns it.
    Matrices are f32 (dtype=float32) or f16 (otherwise); norms stay f32, as llama.cpp wants."""
    try:
        import gguf
    except ImportError:
        raise KilnError("format=gguf needs the `gguf` package: pip install gguf (or export format=hf)") from None
    ck = read_checkpoint(checkpoint or run_dir, key="export.checkpoint" if checkpoint else "out")
    mc = ck.model
    out = Path(path) if path else Path(run_dir) / "export" / f"{Path(run_dir).resolve().name}.gguf"
    data = _byte_level_bpe(ck.tokenizer, ck.tokenizer_file)
    f16 = dtype != "float32"
    tensors = _llama_tensors(ck, "gguf", torch.float16 if f16 else torch.float32)
    for i in range(mc.n_layers):
        for name, heads in (("attn_q", mc.n_heads), ("attn_k", mc.n_kv_heads)):
            key = f"blk.{i}.{name}.weight"
            tensors[key] = interleave_rope_rows(tensors[key], heads)

    vocab = ck.tokenizer.get_vocab(with_added_tokens=True)
    n_tok = token_count(ck.tokenizer)
    by_id = {i: t for t, i in vocab.items()}
    if len(by_id) != n_tok:
        raise KilnError(f"{ck.tokenizer_file} leaves ids unused; GGUF needs a token for every id up to {n_tok - 1}")
    control = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    ids = special_ids(ck.tokenizer)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(ck.run.resolve().name)
        w.add_context_length(mc.max_seq_len)
        w.add_embedding_length(mc.d_model)
        w.add_block_count(mc.n_layers)
        w.add_feed_forward_length(mc.ffn_hidden)
        w.add_head_count(mc.n_heads)
        w.add_head_count_kv(mc.n_kv_heads)
        w.add_rope_dimension_count(mc.head_dim)
        w.add_rope_freq_base(mc.rope_theta)
        w.add_layer_norm_rms_eps(mc.norm_eps)
        w.add_vocab_size(n_tok)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list([by_id[i] for i in range(n_tok)])
        w.add_token_types([gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL for i in range(n_tok)])
        w.add_token_merges(merges)
        w.add_bos_token_id(ids["bos"])
        w.add_eos_token_id(ids["eos"])
        if ids["pad"] is not None:
            w.add_pad_token_id(ids["pad"])
        if ids["end"] is not None:
            w.add_eot_token_id(ids["end"])
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
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


# ---- reading a Hugging Face directory ----------------------------------------------------------------
@dataclass
class HFModel:
    """A Llama-architecture Hugging Face directory read into kiln's terms."""

    source: Path
    model: ModelConfig
    tensors: dict[str, torch.Tensor]  # kiln names, vocabulary rows padded to model.vocab_size
    tokenizer: Tokenizer  # with kiln's special tokens (see `adapt_tokenizer`)
    tokens: dict  # what `adapt_tokenizer` renamed and added
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise KilnError(f"{path.parent} is incomplete: {path.name} is missing ({what}); "
                        "re-download or re-export the directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KilnError(f"{path} cannot be read ({str(e).splitlines()[0]}); re-download or re-export it") from None
    if not isinstance(data, dict):
        raise KilnError(f"{path} must hold a JSON object; re-download or re-export it")
    return data


def inside(root: Path, name: str, what: str) -> Path:
    """`root / name`, refusing a name (read from a file in `root`) that leads outside `root`."""
    p = (root / name).resolve()
    if Path(name).is_absolute() or not p.is_relative_to(root.resolve()):
        raise KilnError(f"{what} names '{name}', which lies outside {root}; refusing to read it (a tampered file?)")
    return p


def check_llama(cfg: dict, where: Path) -> None:
    """Refuse, in one line, a config kiln's model cannot reproduce exactly."""
    archs = cfg.get("architectures") or []
    if "LlamaForCausalLM" not in archs and cfg.get("model_type") != "llama":
        name = archs[0] if archs else cfg.get("model_type", "unknown")
        raise KilnError(f"{where}: architecture {name!r} is not supported; kiln imports Llama-architecture causal "
                        "LMs (LlamaForCausalLM: RMSNorm, rotary embeddings, SwiGLU)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    problems = []
    if kind != "default":
        problems.append(f"RoPE scaling {kind!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {cfg['hidden_act']!r}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("bias terms")
    heads = cfg.get("num_attention_heads")
    if cfg.get("head_dim") and heads and cfg["head_dim"] * heads != cfg.get("hidden_size"):
        problems.append(f"head_dim {cfg['head_dim']} × {heads} heads ≠ hidden_size {cfg.get('hidden_size')}")
    if problems:
        raise KilnError(f"{where}: this Llama variant uses {', '.join(problems)}, which kiln's model does not "
                        "implement; import a plain Llama model")


def _weight_files(src: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """The files holding the weights, and whether they are pickles (only with `allow_pickle`)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index, "the safetensors index").get("weight_map", {}).values()))
        files = [inside(src, n, str(index)) for n in names]
        for f in files:
            if not f.is_file():
                raise KilnError(f"{src} is incomplete: {f.name}, listed in {index.name}, is missing; re-download it")
        return files, False
    files = sorted(src.glob("*.safetensors"))
    if files:
        return files, False
    pickles = sorted(p for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not pickles:
        raise KilnError(f"{src} is incomplete: it holds no weights (no *.safetensors); re-download or re-export it")
    if not allow_pickle:
        raise KilnError(f"{src} holds only pickle weights ({', '.join(p.name for p in pickles[:3])}), which can run "
                        "code when loaded: convert them to safetensors (transformers' save_pretrained does), or "
                        "pass allow_pickle=true to load them with torch.load(weights_only=True)")
    pindex = src / "pytorch_model.bin.index.json"
    if pindex.is_file():
        names = sorted(set(_read_json(pindex, "the weights index").get("weight_map", {}).values()))
        pickles = [inside(src, n, str(pindex)) for n in names]
    return pickles, True


def _load_weights(files: list[Path], pickled: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out = {}
    for f in files:
        try:
            part = torch.load(f, weights_only=True, map_location="cpu") if pickled else load_file(f)
        except FileNotFoundError:
            raise KilnError(f"{f.parent} is incomplete: {f.name} is missing; re-download it") from None
        except pickle.UnpicklingError:
            raise KilnError(f"{f} holds more than tensors (pickled objects or code); kiln will not run it: "
                            "get the weights as safetensors") from None
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise KilnError(f"{f} cannot be read ({str(e).splitlines()[0][:200]}); re-download it") from None
        if not isinstance(part, dict):
            raise KilnError(f"{f} does not hold a dictionary of tensors; it is not a weights file")
        out.update(part)
    return out


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it (a string or {"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _renamed(node, old: str, new: str):
    """`node` (parsed JSON) with every string, and every key, equal to `old` replaced by `new`."""
    if isinstance(node, dict):
        return {(new if k == old else k): _renamed(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_renamed(v, old, new) for v in node]
    return new if node == old else node


def adapt_tokenizer(tok: Tokenizer, bos: str | None, eos: str | None) -> tuple[Tokenizer, dict]:
    """The tokenizer with the special tokens kiln's code names, ids unchanged.

    The model's own BOS and EOS (`bos`, `eos`) are renamed to <|bos|> and <|eos|> (same ids, so the
    model keeps the start and end tokens it learned; their old spelling becomes plain text); the
    other kiln tokens it lacks (<|pad|> and the chat roles) are added at new ids. A tokenizer that
    already has them is returned as is. Returns the tokenizer and what was renamed and added.
    """
    data = json.loads(tok.to_str())
    renamed = {}
    for old, new in ((bos, BOS), (eos, EOS)):
        if old is None or old == new or old in renamed or tok.token_to_id(new) is not None:
            continue
        if tok.token_to_id(old) is None:
            continue
        for part in ("added_tokens", "post_processor"):
            if data.get(part) is not None:
                data[part] = _renamed(data[part], old, new)
        if "vocab" in data["model"]:
            data["model"]["vocab"] = _renamed(data["model"]["vocab"], old, new)
        renamed[old] = new
    out = Tokenizer.from_str(json.dumps(data)) if renamed else Tokenizer.from_str(tok.to_str())
    for old, new in renamed.items():
        if out.token_to_id(new) != tok.token_to_id(old):
            raise KilnError(f"renaming the tokenizer's {old!r} to {new} moved its id; this tokenizer cannot be adapted")
    missing = [t for t in SPECIAL_TOKENS if out.token_to_id(t) is None]
    if missing:
        out.add_special_tokens(missing)
    return out, {"renamed": renamed, "added": {t: out.token_to_id(t) for t in missing}}


def read_hf(src: str | Path, allow_pickle: bool = False) -> HFModel:
    """A Llama-architecture Hugging Face directory (config.json, safetensors weights, tokenizer.json)
    in kiln's terms: its ModelConfig, weights under kiln's names with the vocabulary padded to a
    multiple of 64, and its tokenizer with kiln's special tokens (`adapt_tokenizer`). New tokens'
    rows start at the mean of the existing ones; padding rows at zero."""
    src = Path(src)
    if not src.is_dir():
        raise KilnError(f"{src} is not a directory; point at a Hugging Face model directory "
                        "(config.json, *.safetensors, tokenizer.json)")
    cfg = _read_json(src / "config.json", "the model's configuration")
    check_llama(cfg, src)
    try:
        n_layers, d = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
        shape = dict(d_model=d, n_layers=n_layers, n_heads=int(cfg["num_attention_heads"]),
                     n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                     ffn_hidden=int(cfg["intermediate_size"]),
                     max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
                     rope_theta=float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))),
                     norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise KilnError(f"{src / 'config.json'} lacks or garbles {e}; it is not a complete Llama config") from None

    tfile = src / "tokenizer.json"
    if not tfile.is_file():
        raise KilnError(f"{src} has no tokenizer.json (a sentencepiece-only tokenizer.model?); write one with "
                        "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    try:
        raw_tok = Tokenizer.from_file(str(tfile))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise KilnError(f"{tfile} cannot be read ({str(e).splitlines()[0]}); re-download it") from None
    tcfg = _read_json(src / "tokenizer_config.json", "") if (src / "tokenizer_config.json").is_file() else {}

    def special(name: str) -> str | None:
        text = _token_text(tcfg.get(f"{name}_token"))
        tid = cfg.get(f"{name}_token_id")
        tid = tid[0] if isinstance(tid, list) and tid else tid
        return text or (raw_tok.id_to_token(tid) if isinstance(tid, int) else None)

    tok, tokens = adapt_tokenizer(raw_tok, special("bos"), special("eos"))

    files, pickled = _weight_files(src, allow_pickle)
    raw = _load_weights(files, pickled)
    names = {hf: k for k, hf in name_map(n_layers, "hf").items()}
    tensors, unknown = {}, []
    for hf, t in raw.items():
        if hf.endswith("rotary_emb.inv_freq"):  # recomputed, never learned
            continue
        if hf not in names:
            unknown.append(hf)
            continue
        tensors[names[hf]] = t
    if unknown:
        raise KilnError(f"{src} holds weights a plain Llama model does not have ({', '.join(sorted(unknown)[:3])}); "
                        "kiln imports LlamaForCausalLM checkpoints only")
    if shape["tie_embeddings"]:
        tensors.pop("lm_head.weight", None)
    expected = set(names.values()) - ({"lm_head.weight"} if shape["tie_embeddings"] else set())
    missing = sorted(expected - set(tensors))
    if missing:
        raise KilnError(f"{src} is incomplete: weights {', '.join(missing[:3])} are missing; re-download it")

    n_tok = token_count(tok)
    vocab = padded_vocab(n_tok)
    rows = tensors["tok_emb.weight"].shape[0]
    notes = []
    new_ids = sorted(tokens["added"].values())
    for key in ("tok_emb.weight", "lm_head.weight"):
        if key not in tensors:
            continue
        old = tensors[key]
        grown = torch.zeros(vocab, old.shape[1], dtype=old.dtype)
        keep = min(rows, vocab)
        grown[:keep] = old[:keep]
        if new_ids:
            grown[new_ids] = old[: min(rows, raw_tok.get_vocab_size())].float().mean(0).to(old.dtype)
        tensors[key] = grown
    if rows > vocab:
        notes.append(f"{rows - vocab} embedding rows past the tokenizer's {n_tok} ids dropped (no token reaches them)")
    if tokens["renamed"]:
        notes.append("renamed " + ", ".join(f"{o} → {n}" for o, n in tokens["renamed"].items()) + " (same ids)")
    if tokens["added"]:
        notes.append("added " + ", ".join(f"{t} (id {i})" for t, i in tokens["added"].items()))
    if pickled:
        notes.append(f"read pickle weights with torch.load(weights_only=True): {', '.join(f.name for f in files[:3])}")
    mc = ModelConfig(vocab_size=vocab, **shape)
    return HFModel(src, mc, tensors, tok, tokens, notes)


def import_hf(src: str | Path, out: str | Path, allow_pickle: bool = False) -> tuple[Path, list[str]]:
    """Turn a Hugging Face Llama directory into the kiln run `out` (tokenizer/, checkpoints/step_0000000,
    config.yaml), which `init_from=out` continues; returns the run and what was done. The run
    appears whole or not at all, and an existing non-empty `out` is refused."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KilnError(f"out={out} already exists; choose a new out= for the imported run")
    hf = read_hf(src, allow_pickle)
    with atomic_dir(out) as tmp:
        (tmp / "tokenizer").mkdir()
        hf.tokenizer.save(str(tmp / "tokenizer" / "tokenizer.json"))
        write_json(tmp / "tokenizer" / "import.json", {"source": str(Path(src).resolve()), **hf.tokens})
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
    print(f"import: wrote the run {out}; continue it with `kiln pretrain out=NEW init_from={out}` on data prepared "
          f"with its tokenizer (data.tokenizer.path={out}/tokenizer/tokenizer.json)")
    return out
