"""Loss functions the one training loop runs: each maps (model, batch) to a scalar loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def next_token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of predicting each target token (pretraining, and SFT with -100 masks)."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
