"""Everything applied to the model from outside: device placement, activation checkpointing, compile.

The model file stays plain single-device PyTorch (DESIGN.md principle 2); this module wraps it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from kiln.config import Config
from kiln.errors import KilnError


@dataclass
class ParallelEnv:
    """Where this process sits: its device, its global rank, and its data-parallel coordinates."""

    device: torch.device
    rank: int = 0
    world: int = 1
    dp_rank: int = 0
    dp_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise KilnError(f"device={spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KilnError(f"device={spec} asked for CUDA but none is available; use device=auto or device=cpu")
    return dev


def init_env(cfg: Config) -> ParallelEnv:
    return ParallelEnv(device=pick_device(cfg.device))


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass instead of storing them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))


def use_compile(cfg: Config, device: torch.device) -> bool:
    return cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda")


def apply_compile(model: nn.Module) -> None:
    """Compile block by block: the blocks are identical, so one compiled graph serves them all."""
    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, torch.compile(block, fullgraph=True))


def parallelize(model: nn.Module, cfg: Config, env: ParallelEnv) -> nn.Module:
    """Apply, in a fixed order, activation checkpointing and compile; return the model to train."""
    model.to(env.device)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if use_compile(cfg, env.device):
        apply_compile(model)
    return model
