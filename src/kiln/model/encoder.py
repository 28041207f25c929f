"""BERT-class encoders on the shared Transformer (`causal=False`): masked-LM corruption, a
classification head, and the export to Hugging Face.

The masked-LM model is the `Transformer` itself, bidirectional, with its (tied) LM head predicting
the masked tokens. The mask token is not in the tokenizer: it is the first id after it, a row the
model's vocabulary (padded to a multiple of 64) has anyway. `EncoderClassifier` keeps every
backbone weight under its usual name, so an encoder checkpoint is an exact subset of it
(`init_from` adds a fresh head).

Export: kiln's blocks (pre-norm RMSNorm, rotary embeddings in the rotate-half layout, grouped-query
attention, SwiGLU, a final RMSNorm) are exactly those of transformers' EuroBERT, a Llama-style
encoder; BERT (post-norm LayerNorm, learned absolute positions, GELU MLP) and ModernBERT
(LayerNorm, an embedding norm, no norm before the first attention) are different functions, so
kiln writes EuroBERT directories (`EuroBertForMaskedLM`, `EuroBertForSequenceClassification`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.data.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS
from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer, _copy_into

MASK = "<|mask|>"


def mask_tokens(ids: torch.Tensor, gen: torch.Generator, *, mask_id: int, vocab: int, rate: float,
                mask_share: float = 0.8, random_share: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: each ordinary token (special tokens never) is chosen with probability
    `rate`; a chosen one becomes the mask token (`mask_share`), a random ordinary token
    (`random_share`) or stays itself (the rest). Returns (inputs, labels): labels are the original
    ids at the chosen positions, -100 elsewhere. At least one token of the batch is chosen."""
    ordinary = ids >= len(SPECIAL_TOKENS)
    chosen = (torch.rand(ids.shape, generator=gen) < rate) & ordinary
    if not chosen.any() and ordinary.any():
        chosen.view(-1)[ordinary.view(-1).nonzero()[0]] = True
    kind = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(len(SPECIAL_TOKENS), vocab, ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[chosen & (kind < mask_share)] = mask_id
    swap = chosen & (kind >= mask_share) & (kind < mask_share + random_share)
    inputs[swap] = random_ids[swap]
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return inputs, labels


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, d) → (B, d): the mean over real tokens, or the first token (`bos`)."""
    if how == "bos":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class EncoderClassifier(Transformer):
    """The bidirectional backbone with a head: pooled hidden state → dense → GELU → one logit per class
    (EuroBERT's sequence-classification head, so the export is exact). `model(ids, attention_mask=m)`
    returns (B, classes); going through `forward` keeps DDP's and FSDP's hooks in the path."""

    def __init__(self, cfg: ModelConfig, classes: int, pooling: str = "mean") -> None:
        if cfg.causal:
            raise KilnError("a classifier over an encoder needs model.causal=false")
        super().__init__(cfg)
        self.pooling = pooling
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.classifier = nn.Linear(cfg.d_model, classes)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """The backbone's initialization; the head's biases start at zero."""
        super().init_weights(seed)
        for bias in (self.dense.bias, self.classifier.bias):
            _copy_into(bias, torch.zeros(bias.shape))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        hidden = super().forward(input_ids, attention_mask=attention_mask, return_hidden=True, **kw)
        return self.classifier(F.gelu(self.dense(pool(hidden, attention_mask, self.pooling))))


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

    from kiln.data.tokenizer import load_tokenizer
    from kiln.runs import atomic_dir

    if cfg.causal:
        raise KilnError("only a bidirectional encoder (causal=false) exports as EuroBERT; a decoder exports as Llama")
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
