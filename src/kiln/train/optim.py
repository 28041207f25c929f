"""AdamW with decay on matrices only, and the learning-rate schedules (a pure function of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.config import TrainConfig


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on ≥2-D weights (matmuls, embeddings), none on norms and biases."""
    decay, no_decay = [], []
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel exists for CPU and CUDA; it is not available for DTensor params on every backend.
    fused = all(type(p) is torch.Tensor or type(p) is nn.Parameter for p in decay + no_decay)
    impl = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, **impl)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine to lr·min_lr_ratio, or warmup-stable-decay (linear decay at the end)."""
    peak, floor = tc.lr, tc.lr * tc.min_lr_ratio
    if tc.warmup_steps and step < tc.warmup_steps:
        return peak * (step + 1) / tc.warmup_steps
    if tc.schedule == "constant":
        return peak
    total = max(tc.max_steps, tc.warmup_steps + 1)
    if tc.schedule == "cosine":
        progress = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    decay_start = total - int(tc.decay_fraction * total)
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return peak + (floor - peak) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
