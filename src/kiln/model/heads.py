"""A scalar head over the shared Transformer's hidden states: reward models (and value heads).

`ScalarHeadModel` is the `Transformer` plus one linear layer `score` reading
`forward(..., return_hidden=True)`. It keeps every backbone weight under its usual name, so a
language-model checkpoint is an exact subset of it (`init_from` a pretrained or SFT run adds a
fresh head) and a reward-model checkpoint a superset of a language model (a policy can start
from it, leaving the head out). Parallelism is applied from outside like any Transformer.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer
from kiln.model.weights import copy_into


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token in a right-padded (B, T) mask (1 = token)."""
    return (attention_mask.long().sum(-1) - 1).clamp(min=0)


class ScalarHeadModel(Transformer):
    """The backbone with a scalar head: `model(ids, attention_mask=m, score=True)` gives one number
    per position; `sequence_scores` reads each sequence's at its last real token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.score = nn.Linear(cfg.d_model, 1, bias=True)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """The backbone's initialization, then a zero head: every sequence starts at reward 0, so the
        first steps learn the ranking instead of undoing a random offset."""
        super().init_weights(seed)
        copy_into(self.score.weight, torch.zeros(self.score.weight.shape))
        copy_into(self.score.bias, torch.zeros(self.score.bias.shape))

    def forward(self, input_ids: torch.Tensor, *, score: bool = False, **kw) -> torch.Tensor:
        """As `Transformer.forward`; with `score=True`, the head's (B, T) scalar per position instead.
        Going through `forward` (not a side method) keeps DDP's and FSDP's hooks in the path."""
        if not score:
            return super().forward(input_ids, **kw)
        hidden = super().forward(input_ids, return_hidden=True, **kw)
        return self.score(hidden).squeeze(-1).float()


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) scalar of each right-padded sequence at its last real token, from a (placed) ScalarHeadModel."""
    per_token = model(input_ids, attention_mask=attention_mask, score=True)
    return per_token.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
