"""Reading a Hugging Face directory into kiln's terms, and the weight names both sides share.

kiln's model is Llama's layout with other names (RoPE in the same rotate-half form), with what
Qwen2/2.5, Qwen3 and Mistral add to it (`ModelConfig`'s head_dim, qkv_bias, out_bias, qk_norm,
rope_scaling, sliding_window): reading a `LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`
or `MistralForCausalLM` directory (`read_architecture`) maps its config and renames its tensors
and pads the vocabulary rows; `kiln export` (`kiln.post.export`) does the reverse. What kiln's
model cannot compute exactly is refused in one line naming the config.json field. The tokenizer is kept exactly as saved, and what kiln needs
to know about it (BOS, EOS and end-of-turn ids, the pad id, the chat template) is read the way
`transformers` reads it (`read_chat_format`). Weights are read from safetensors only: a directory
holding only pickle files is refused unless the user opts in with `allow_pickle=true`.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer

from kiln.data.chat import ChatFormat
from kiln.data.tokenizer import token_count
from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.runs import check_hf_dir

# (kiln, Hugging Face Llama, GGUF) names of every weight; blocks are prefixed with their index
# (`layers.N.` / `model.layers.N.` / `blk.N.`). Qwen2, Qwen3 and Mistral name them alike.
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
# Block tensors a ModelConfig flag adds, full names (kiln, Hugging Face, GGUF).
OPTIONAL_NAMES = {
    "qkv_bias": [("attn.wq.bias", "self_attn.q_proj.bias", "attn_q.bias"),
                 ("attn.wk.bias", "self_attn.k_proj.bias", "attn_k.bias"),
                 ("attn.wv.bias", "self_attn.v_proj.bias", "attn_v.bias")],
    "out_bias": [("attn.wo.bias", "self_attn.o_proj.bias", "attn_output.bias")],
    "qk_norm": [("attn.q_norm.weight", "self_attn.q_norm.weight", "attn_q_norm.weight"),
                ("attn.k_norm.weight", "self_attn.k_norm.weight", "attn_k_norm.weight")],
}
_PREFIX = {"hf": "model.layers.{}.", "gguf": "blk.{}."}
# The Hugging Face causal LMs kiln reads (config.json's `architectures`, or its `model_type`).
FAMILIES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
            "MistralForCausalLM": "mistral"}
# What `transformers` takes for a field a family's config.json leaves out (its configuration_*.py).
FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": 4096,
              "max_window_layers": 28},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128, "sliding_window": 4096,
              "max_window_layers": 28},
    "mistral": {"max_position_embeddings": 131072, "num_key_value_heads": 8, "sliding_window": 4096},
}
# Pickle formats other tools save weights in: they can run code when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# A directory's tokenizer files besides tokenizer.json, kept unchanged beside an imported run's
# tokenizer (`kiln.data.chat.SOURCE_DIR`) for `kiln export` to write back.
HF_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "generation_config.json")
# The special-token variables `transformers` hands a chat template (its special_tokens_map).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")



def name_map(model: ModelConfig | int, scheme: str) -> dict[str, str]:
    """kiln weight name -> its name in `scheme` ("hf" or "gguf") for a model (or a plain Llama model of
    that many blocks), its biases and q/k norms included where it has them."""
    col = {"hf": 1, "gguf": 2}[scheme]
    n_layers = model if isinstance(model, int) else model.n_layers
    extra = [] if isinstance(model, int) else [row for flag, rows in OPTIONAL_NAMES.items() if getattr(model, flag)
                                               for row in rows]
    out = {f"{row[0]}.weight": f"{row[col]}.weight" for row in TOP_NAMES}
    for i in range(n_layers):
        for row in BLOCK_NAMES:
            out[f"layers.{i}.{row[0]}.weight"] = _PREFIX[scheme].format(i) + f"{row[col]}.weight"
        for row in extra:
            out[f"layers.{i}.{row[0]}"] = _PREFIX[scheme].format(i) + row[col]
    return out


def padded_vocab(n_tokens: int) -> int:
    """kiln's model rows for a tokenizer of `n_tokens` (a multiple of 64, as `kiln pretrain` pads)."""
    return 64 * math.ceil(n_tokens / 64)


@dataclass
class HFModel:
    """A Hugging Face directory (Llama, Qwen2, Qwen3 or Mistral) read into kiln's terms."""

    source: Path
    model: ModelConfig
    tensors: dict[str, torch.Tensor]  # kiln names, vocabulary rows padded to model.vocab_size
    tokenizer: Tokenizer  # exactly as saved: the ids and spellings the model was trained with
    chat: ChatFormat  # its BOS / EOS / end-of-turn / pad ids and chat template (`read_chat_format`)
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


def read_architecture(cfg: dict, where: Path) -> tuple[str, dict]:
    """(the architecture's name, kiln's ModelConfig fields but the vocabulary) of a config.json, read
    as `transformers` reads that family; anything kiln's model cannot reproduce exactly is refused in
    one line naming the config.json field."""
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in FAMILIES), None) or \
        next((a for a, f in FAMILIES.items() if f == cfg.get("model_type") and not archs), None)
    if arch is None:
        name = archs[0] if archs else cfg.get("model_type", "unknown")
        raise KilnError(f"{where}: architecture {name!r} is not supported; kiln imports {', '.join(FAMILIES)} "
                        "(RMSNorm, rotary embeddings, SwiGLU)")
    family = FAMILIES[arch]
    conf = {**FAMILY_DEFAULTS[family], **cfg}

    def refuse(field: str, what: str, known: str = "") -> KilnError:
        return KilnError(f"{where}: config.json's {field} {what}, which kiln's model does not compute{known}; "
                         f"import a model without it")

    if conf.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", f"is {conf['hidden_act']!r} (kiln's MLP is SwiGLU with SiLU)")
    if conf.get("mlp_bias") and family == "llama":
        raise refuse("mlp_bias", "is true (biases in the MLP)")
    try:
        d, heads = int(conf["hidden_size"]), int(conf["num_attention_heads"])
        n_layers = int(conf["num_hidden_layers"])
        max_len = int(conf["max_position_embeddings"])
        head_dim = conf.get("head_dim")  # None: hidden_size / heads, as every family takes it
        shape = dict(d_model=d, n_layers=n_layers, n_heads=heads,
                     n_kv_heads=int(conf.get("num_key_value_heads") or heads),
                     ffn_hidden=int(conf["intermediate_size"]), max_seq_len=max_len,
                     norm_eps=float(conf.get("rms_norm_eps", 1e-6)),
                     tie_embeddings=bool(conf.get("tie_word_embeddings", False)),
                     head_dim=int(head_dim or d // heads))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise KilnError(f"{where / 'config.json'} lacks or garbles {e}; it is not a complete {arch} config") from None
    bias = family in ("llama", "qwen3") and bool(conf.get("attention_bias"))
    shape.update(qkv_bias=bias or family == "qwen2", out_bias=bias, qk_norm=family == "qwen3")
    shape.update(_rope(conf, family, max_len, refuse))
    shape.update(_sliding_window(conf, family, n_layers, refuse))
    return arch, shape


def _rope(conf: dict, family: str, max_len: int, refuse) -> dict:
    """rope_theta and rope_scaling from config.json's `rope_parameters` (transformers 5) or
    `rope_scaling` and `rope_theta` (transformers 4), completed as transformers completes them."""
    # transformers 5 writes rope_parameters, and reads a legacy rope_scaling over it when both are set
    field = "rope_scaling" if conf.get("rope_scaling") else "rope_parameters"
    params = conf.get(field) if isinstance(conf.get(field), dict) else {}
    theta_from = conf.get("rope_parameters") if isinstance(conf.get("rope_parameters"), dict) else {}
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type: one RoPE for all, or refuse
        kinds = {json.dumps(v, sort_keys=True) for v in params.values()}
        if len(kinds) > 1:
            raise refuse(field, f"gives each layer type its own RoPE ({', '.join(params)})")
        params = next(iter(params.values()))
    theta = float(params.get("rope_theta", theta_from.get("rope_theta", conf.get("rope_theta", 10000.0))))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", conf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise refuse("partial_rotary_factor", f"is {partial} (rotary embeddings on part of each head)")
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if kind not in ("linear", "llama3", "yarn"):
        why = {"dynamic": " (frequencies that change with the sequence length)",
               "longrope": " (frequencies that switch at the original context)"}.get(kind, "")
        raise refuse(f"{field}.rope_type", f"is {kind!r}{why}", " (it computes default, linear, llama3 and yarn RoPE)")
    original = conf.get("original_max_position_embeddings") if kind in ("llama3", "yarn") else None
    original = int(original or params.get("original_max_position_embeddings") or max_len)
    factor = params.get("factor")
    if factor is None and kind == "yarn":
        factor = max_len / original
    out = {"type": kind, "factor": factor}
    if kind == "llama3":
        out.update(low_freq_factor=params.get("low_freq_factor"), high_freq_factor=params.get("high_freq_factor"),
                   original_max_seq_len=original)
    elif kind == "yarn":
        attention = params.get("attention_factor")
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if attention is None and mscale and mscale_all and factor > 1:
            attention = (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all * math.log(factor) + 1)
        out.update(original_max_seq_len=original, beta_fast=params.get("beta_fast") or 32.0,
                   beta_slow=params.get("beta_slow") or 1.0, attention_factor=attention,
                   truncate=params.get("truncate", True))
    missing = [k for k, v in out.items() if v is None and k != "attention_factor"]
    if missing:
        raise refuse(field, f"({kind}) lacks {', '.join(missing)}")
    return {"rope_theta": theta, "rope_scaling": out}


def _sliding_window(conf: dict, family: str, n_layers: int, refuse) -> dict:
    """sliding_window and window_from_layer as the family sets them: Mistral's every layer when
    `sliding_window` is set; Qwen2/3's layers from `max_window_layers` on (or as `layer_types` lists
    them) when `use_sliding_window` is true; Llama none."""
    if family == "llama":
        return {}
    window = conf.get("sliding_window")
    if family != "mistral" and not conf.get("use_sliding_window"):
        window = None
    if not window:
        return {"sliding_window": 0, "window_from_layer": 0}
    if family == "mistral":  # transformers' Mistral windows every layer, whatever layer_types says
        return {"sliding_window": int(window), "window_from_layer": 0}
    types = conf.get("layer_types")
    if types is None:
        start = min(int(conf.get("max_window_layers", 28)), n_layers)
    else:
        if not isinstance(types, list) or len(types) != n_layers or \
                set(types) - {"full_attention", "sliding_attention"}:
            raise refuse("layer_types", f"is {types!r}, not one of full_attention / sliding_attention per layer")
        start = next((i for i, t in enumerate(types) if t == "sliding_attention"), n_layers)
        if "full_attention" in types[start:]:
            raise refuse("layer_types", "interleaves full and sliding-window layers (kiln windows the layers "
                         "from one index on)")
    if start >= n_layers:
        return {"sliding_window": 0, "window_from_layer": 0}
    return {"sliding_window": int(window), "window_from_layer": start}


def describe_architecture(arch: str, mc: ModelConfig, params: int) -> str:
    """One line on what an import read: family, size, context and RoPE, and what it adds to Llama."""
    heads = f"{mc.n_heads}/{mc.n_kv_heads} heads" + (f" of {mc.head_dim}" if mc.n_heads * mc.head_dim != mc.d_model
                                                      else "")
    extras = [name for flag, name in (("qkv_bias", "q/k/v biases"), ("out_bias", "an output bias"),
                                      ("qk_norm", "q/k norms")) if getattr(mc, flag)]
    if mc.sliding_window:
        layers = f"layers {mc.window_from_layer}-{mc.n_layers - 1}" if mc.window_from_layer else "every layer"
        extras.append(f"a sliding window of {mc.sliding_window} on {layers}")
    return (f"{arch}: {params:,} parameters, {mc.n_layers} layers, d_model {mc.d_model}, {heads}, ffn "
            f"{mc.ffn_hidden}, context {mc.max_seq_len}, RoPE {mc.describe_rope()}"
            f"{', ' + ', '.join(extras) if extras else ''}, {'tied' if mc.tie_embeddings else 'untied'} embeddings")


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


def read_hf(src: str | Path, allow_pickle: bool = False, key: str = "hf_import.path") -> HFModel:
    """A Llama-architecture Hugging Face directory (config.json, safetensors weights, tokenizer.json)
    in kiln's terms: its ModelConfig, weights under kiln's names with the vocabulary padded to a
    multiple of 64 (padding rows at zero), its tokenizer unchanged and its chat format
    (`read_chat_format`). `key` names the setting that gave `src`, for the errors."""
    src = check_hf_dir(src, key)  # what `kiln.cli` also checks before importing torch
    cfg = _read_json(src / "config.json", "the model's configuration")
    arch, shape = read_architecture(cfg, src)
    tok = _read_tokenizer(src)
    chat = read_chat_format(src, cfg, tok)
    files, pickled = _weight_files(src, allow_pickle)
    tensors = _kiln_tensors(_load_weights(files, pickled), ModelConfig(**shape), arch, src)

    n_tok = token_count(tok)
    vocab = padded_vocab(n_tok)
    rows = tensors["tok_emb.weight"].shape[0]
    _fit_vocabulary(tensors, vocab, [], n_tok)
    mc = ModelConfig(vocab_size=vocab, **shape)
    notes = [describe_architecture(arch, mc, ModelConfig(vocab_size=rows, **shape).num_params()), f"tokenizer kept as it is ({n_tok} ids); {chat.describe()}"]
    if rows > vocab:
        notes.append(f"{rows - vocab} embedding rows past the tokenizer's {n_tok} ids dropped (no token reaches them)")
    if pickled:
        notes.append(f"read pickle weights with torch.load(weights_only=True): {', '.join(f.name for f in files[:3])}")
    return HFModel(src, mc, tensors, tok, chat, notes)


def _read_tokenizer(src: Path) -> Tokenizer:
    """The directory's tokenizer.json, as saved."""
    tfile = src / "tokenizer.json"
    if not tfile.is_file():
        raise KilnError(f"{src} has no tokenizer.json (a sentencepiece-only tokenizer.model?); write one with "
                        "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    try:
        return Tokenizer.from_file(str(tfile))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise KilnError(f"{tfile} cannot be read ({str(e).splitlines()[0]}); re-download it") from None


def _id_list(value) -> list[int]:
    """An id field of config.json / generation_config.json (an int, a list of ints, or null)."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _chat_template(src: Path, tcfg: dict) -> tuple[str | None, str]:
    """The directory's chat template (tokenizer_config.json's `chat_template`, a string or a list of
    named templates of which kiln renders "default", else chat_template.jinja) and where it came from."""
    value = tcfg.get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next((t for t in named.values() if isinstance(t, str)), None)
    if isinstance(value, str) and value.strip():
        return value, str(src / "tokenizer_config.json")
    jfile = src / "chat_template.jinja"
    if jfile.is_file():
        try:
            return jfile.read_text(encoding="utf-8"), str(jfile)
        except (OSError, UnicodeDecodeError) as e:
            raise KilnError(f"{jfile} cannot be read ({e}); re-download it") from None
    return None, ""


def read_chat_format(src: Path, cfg: dict, tok: Tokenizer) -> ChatFormat:
    """What kiln needs to know about an imported tokenizer, read from the directory as `transformers`
    reads it: BOS (tokenizer_config.json's `bos_token`; None when it sets none, as Qwen's), the EOS ids
    (generation_config.json's `eos_token_id`, an int or a list, then the tokenizer's `eos_token`,
    then config.json's), the end-of-turn token its chat template closes a reply with, the pad id (its
    `pad_token`, else `pad_token_id`, else the first EOS: padding never carries a loss), and the
    template."""
    tcfg = _read_json(src / "tokenizer_config.json", "") if (src / "tokenizer_config.json").is_file() else {}
    gen = _read_json(src / "generation_config.json", "") if (src / "generation_config.json").is_file() else {}
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    # the template's variables: the special tokens the tokenizer config sets, as transformers passes them
    tokens = {name: text for name in TEMPLATE_TOKENS if (text := _token_text(tcfg.get(name)))
              and tok.token_to_id(text) is not None}

    def known(ids) -> list[int]:
        return [i for i in ids if i is not None and 0 <= i < n_tok]

    bos = tok.token_to_id(tokens["bos_token"]) if "bos_token" in tokens else None
    if not tcfg and known(_id_list(cfg.get("bos_token_id"))):  # no tokenizer_config.json: config.json's id
        bos = known(_id_list(cfg.get("bos_token_id")))[0]
    eos = list(dict.fromkeys(known([*_id_list(gen.get("eos_token_id")),
                                    tok.token_to_id(tokens["eos_token"]) if "eos_token" in tokens else None,
                                    *_id_list(cfg.get("eos_token_id"))])))
    pads = known([tok.token_to_id(tokens["pad_token"]) if "pad_token" in tokens else None,
                  *_id_list(gen.get("pad_token_id")), *_id_list(cfg.get("pad_token_id")), *eos[:1]])
    add_bos = tcfg.get("add_bos_token")
    if not isinstance(add_bos, bool):  # what the tokenizer's post-processor does with a plain text
        add_bos = bos is not None and tok.encode("a").ids[:1] == [bos]
    template, where = _chat_template(src, tcfg)
    chat = ChatFormat(tok, False, bos, tuple(eos), tuple(eos), pads[0] if pads else 0, template, tokens, add_bos,
                      where)
    turn = chat.turn_end()
    return replace(chat, end=tuple(dict.fromkeys([*([turn] if turn is not None else []), *eos])))


def _kiln_tensors(raw: dict[str, torch.Tensor], mc: ModelConfig, arch: str, src: Path) -> dict[str, torch.Tensor]:
    """The weights under kiln's names; anything the architecture does not have, or lacks, is refused."""
    names = {hf: k for k, hf in name_map(mc, "hf").items()}
    tensors, unknown = {}, []
    for hf, t in raw.items():
        if hf.endswith("rotary_emb.inv_freq"):  # recomputed, never learned
            continue
        if hf not in names:
            unknown.append(hf)
            continue
        tensors[names[hf]] = t
    if unknown:
        raise KilnError(f"{src} holds weights a {arch} as its config.json describes it does not have "
                        f"({', '.join(sorted(unknown)[:3])}); kiln will not drop them")
    if mc.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    expected = set(names.values()) - ({"lm_head.weight"} if mc.tie_embeddings else set())
    missing = sorted(expected - set(tensors))
    if missing:
        raise KilnError(f"{src} is incomplete: weights {', '.join(missing[:3])} are missing; re-download it")
    return tensors


def _fit_vocabulary(tensors: dict[str, torch.Tensor], vocab: int, new_ids: list[int], old_tokens: int) -> None:
    """Embedding and head rows cut or padded (zeros) to `vocab`; rows of new tokens (`new_ids`, none
    for an import, which keeps the tokenizer as it is) start at the mean of the model's own."""
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
