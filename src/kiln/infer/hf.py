"""Reading a Hugging Face directory into kiln's terms, and the weight names both sides share.

kiln's model is Llama's layout with other names (RoPE in the same rotate-half form): reading a
`LlamaForCausalLM` directory renames its tensors and pads the vocabulary rows; `kiln export`
(`kiln.post.export`) does the reverse. Weights are read from safetensors only: a directory
holding only pickle files is refused unless the user opts in with `allow_pickle=true`.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from kiln.data.tokenizer import BOS, EOS, SPECIAL_TOKENS, token_count
from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.runs import check_hf_dir

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


def read_hf(src: str | Path, allow_pickle: bool = False, key: str = "hf_import.path") -> HFModel:
    """A Llama-architecture Hugging Face directory (config.json, safetensors weights, tokenizer.json)
    in kiln's terms: its ModelConfig, weights under kiln's names with the vocabulary padded to a
    multiple of 64, and its tokenizer with kiln's special tokens (`adapt_tokenizer`). New tokens'
    rows start at the mean of the existing ones; padding rows at zero. `key` names the setting that
    gave `src`, for the errors."""
    src = check_hf_dir(src, key)  # what `kiln.cli` also checks before importing torch
    cfg = _read_json(src / "config.json", "the model's configuration")
    check_llama(cfg, src)
    shape = _shape(cfg, src)
    raw_tok, tok, tokens = _read_tokenizer(src, cfg)
    files, pickled = _weight_files(src, allow_pickle)
    tensors = _kiln_tensors(_load_weights(files, pickled), shape, src)

    n_tok = token_count(tok)
    vocab = padded_vocab(n_tok)
    rows = tensors["tok_emb.weight"].shape[0]
    _fit_vocabulary(tensors, vocab, sorted(tokens["added"].values()), raw_tok.get_vocab_size())
    notes = []
    if rows > vocab:
        notes.append(f"{rows - vocab} embedding rows past the tokenizer's {n_tok} ids dropped (no token reaches them)")
    if tokens["renamed"]:
        notes.append("renamed " + ", ".join(f"{o} → {n}" for o, n in tokens["renamed"].items()) + " (same ids)")
    if tokens["added"]:
        notes.append("added " + ", ".join(f"{t} (id {i})" for t, i in tokens["added"].items()))
    if pickled:
        notes.append(f"read pickle weights with torch.load(weights_only=True): {', '.join(f.name for f in files[:3])}")
    return HFModel(src, ModelConfig(vocab_size=vocab, **shape), tensors, tok, tokens, notes)


def _shape(cfg: dict, src: Path) -> dict:
    """kiln's ModelConfig fields (all but the vocabulary) from a Llama config.json."""
    try:
        d = int(cfg["hidden_size"])
        return dict(d_model=d, n_layers=int(cfg["num_hidden_layers"]), n_heads=int(cfg["num_attention_heads"]),
                    n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                    ffn_hidden=int(cfg["intermediate_size"]),
                    max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
                    rope_theta=float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))),
                    norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise KilnError(f"{src / 'config.json'} lacks or garbles {e}; it is not a complete Llama config") from None


def _read_tokenizer(src: Path, cfg: dict) -> tuple[Tokenizer, Tokenizer, dict]:
    """(the tokenizer as saved, the same with kiln's special tokens, what `adapt_tokenizer` did)."""
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
    return raw_tok, tok, tokens


def _kiln_tensors(raw: dict[str, torch.Tensor], shape: dict, src: Path) -> dict[str, torch.Tensor]:
    """The weights under kiln's names; anything a plain Llama model does not have, or lacks, is refused."""
    names = {hf: k for k, hf in name_map(shape["n_layers"], "hf").items()}
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
    return tensors


def _fit_vocabulary(tensors: dict[str, torch.Tensor], vocab: int, new_ids: list[int], old_tokens: int) -> None:
    """Embedding and head rows cut or padded (zeros) to `vocab`; rows of tokens kiln added start at
    the mean of the model's own."""
    rows = tensors["tok_emb.weight"].shape[0]
    for key in ("tok_emb.weight", "lm_head.weight"):
        if key not in tensors:
            continue
        old = tensors[key]
        grown = torch.zeros(vocab, old.shape[1], dtype=old.dtype)
        keep = min(rows, vocab)
        grown[:keep] = old[:keep]
        if new_ids:
            grown[new_ids] = old[: min(rows, old_tokens)].float().mean(0).to(old.dtype)
        tensors[key] = grown
