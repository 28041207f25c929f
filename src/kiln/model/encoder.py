"""BERT-class encoders on the shared Transformer (`causal=False`): the classification head
(masked-LM corruption is `kiln.data.labelled_text.mask_tokens`; the EuroBERT export is
`kiln.post.eurobert`).

The masked-LM model is the `Transformer` itself, bidirectional, with its (tied) LM head predicting
the masked tokens. The mask token is not in the tokenizer: it is the first id after it, a row the
model's vocabulary (padded to a multiple of 64) has anyway. `EncoderClassifier` keeps every
backbone weight under its usual name, so an encoder checkpoint is an exact subset of it
(`init_from` adds a fresh head).

"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer
from kiln.model.weights import copy_into


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
            copy_into(bias, torch.zeros(bias.shape))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        hidden = super().forward(input_ids, attention_mask=attention_mask, return_hidden=True, **kw)
        return self.classifier(F.gelu(self.dense(pool(hidden, attention_mask, self.pooling))))
