"""Checkpoints of a LoRA run: the adapters alone beside the merged model (see `kiln.model.lora`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kiln.model.lora import ADAPTER_FILE, adapter_tensors, merged_tensors, read_adapter, save_adapter
from kiln.model.weights import load_model_tensors
from kiln.train import distributed_checkpoint
from kiln.train.checkpoint import CheckpointManager


class LoRACheckpoints(CheckpointManager):
    """Checkpoints of a LoRA run, in every layout.

    Whatever wrote the checkpoint (one process: `model.safetensors` with base and adapters; many
    ranks: `dcp/`, consolidated or not), before it is hashed and published this adds
    `adapter.safetensors` (the adapters alone, with the config) and makes `model.safetensors` the
    merged model. Sharded checkpoints resume from `dcp/` as usual; a single-process resume reads
    the adapters from `adapter.safetensors` into a model whose frozen base is already loaded.
    """

    def __init__(self, run_dir: str | Path, keep_last: int, lora, tied: bool) -> None:
        super().__init__(run_dir, keep_last)
        self.lora, self.tied = lora, tied

    def write_info(self, tmp: Path, step: int, meta: dict) -> None:
        full = tmp / "model.safetensors"
        if full.is_file():
            tensors = load_file(full)
        else:  # a sharded checkpoint not consolidated: gather it here, once, on this (main) rank
            tensors = distributed_checkpoint.read_tensors(tmp, self.tied)
        save_adapter(tmp / ADAPTER_FILE, adapter_tensors(tensors), self.lora)
        merged = tmp / ".model.safetensors.tmp"
        save_file(merged_tensors(tensors, self.lora), merged)
        os.replace(merged, full)
        CheckpointManager.write_info(tmp, step, meta)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
        tensors, _ = read_adapter(Path(path) / ADAPTER_FILE)
        load_model_tensors(model, tensors, str(Path(path) / ADAPTER_FILE), partial=True)
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(Path(path) / "optimizer.pt", weights_only=True, map_location="cpu"))
        return torch.load(Path(path) / "state.pt", weights_only=True, map_location="cpu")
