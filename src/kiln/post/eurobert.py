"""A kiln encoder (or classifier) as a transformers EuroBERT directory.

kiln's blocks (pre-norm RMSNorm, rotary embeddings in the rotate-half layout, grouped-query
attention, SwiGLU, a final RMSNorm) are exactly those of transformers' EuroBERT, a Llama-style
encoder; BERT (post-norm LayerNorm, learned absolute positions, GELU MLP) and ModernBERT
(LayerNorm, an embedding norm, no norm before the first attention) are different functions, so
kiln writes EuroBERT directories (`EuroBertForMaskedLM`, `EuroBertForSequenceClassification`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kiln.data.labelled_text import MASK
from kiln.data.tokenizer import BOS, EOS, PAD, load_tokenizer
from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.runs import atomic_dir

# ---- Hugging Face export ---------------------------------------------------------------------------
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}


def eurobert_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """kiln weight names → EuroBERT's (`model.` backbone, `lm_head` or `dense` / `classifier` head)."""
    out = {}
    for name, t in tensors.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            out[f"model.layers.{i}.{_LAYER_NAMES[rest]}"] = t
        elif name == "tok_emb.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = t
        else:  # the classifier head keeps its names
            out[name] = t
    return {k: v.contiguous() for k, v in out.items()}


def eurobert_config(cfg: ModelConfig, mask_id: int, classes: list[str] | None, pooling: str, tokenizer) -> dict:
    conf = {
        "architectures": ["EuroBertForSequenceClassification" if classes else "EuroBertForMaskedLM"],
        "model_type": "eurobert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": tokenizer.token_to_id(BOS), "eos_token_id": tokenizer.token_to_id(EOS),
        "pad_token_id": tokenizer.token_to_id(PAD), "mask_token_id": mask_id,
        "classifier_pooling": pooling, "torch_dtype": "float32",
    }
    if classes:
        conf["id2label"] = {str(i): c for i, c in enumerate(classes)}
        conf["label2id"] = {c: i for i, c in enumerate(classes)}
    return conf


def export_eurobert(tensors: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer_path: Path, out: Path, *,
                    mask_id: int, classes: list[str] | None = None, pooling: str = "mean") -> Path:
    """Write a transformers EuroBERT directory (config.json, model.safetensors, the tokenizer with its
    mask token) from a kiln encoder's (or classifier's) weights; replaces `out` whole."""
    from safetensors.torch import save_file
    from tokenizers import AddedToken

    if cfg.causal:
        raise KilnError("only a bidirectional encoder (causal=false) exports as EuroBERT; a decoder exports as Llama")
    added = [f"model.{k}" for k in ("qkv_bias", "out_bias", "qk_norm", "rope_scaling") if getattr(cfg, k)]
    if added:  # an encoder made from an imported Qwen or Llama 3.1+ (init_from)
        raise KilnError(f"this encoder has {', '.join(added)}, which kiln's EuroBERT export does not write; "
                        "only encoders of kiln's own shape export as EuroBERT")
    tok = load_tokenizer(tokenizer_path)
    if tok.get_vocab_size() != mask_id:
        raise KilnError(f"the tokenizer has {tok.get_vocab_size()} tokens but the mask token is id {mask_id}; "
                        "export with the tokenizer the encoder was trained with")
    tok.add_special_tokens([AddedToken(MASK, special=True)])
    with atomic_dir(out) as tmp:
        save_file(eurobert_tensors(tensors, cfg), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(eurobert_config(cfg, mask_id, classes, pooling, tok), indent=2))
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "mask_token": MASK, "model_max_length": cfg.max_seq_len}, indent=2))
    return out
