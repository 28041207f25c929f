"""Reading a checkpoint back: finding a run's newest intact one (or the one named), its weights
whole under plain names (single-process or sharded), the tokenizer it was trained with, and its
weights copied into a new run's model (`init_from`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.model.weights import clean_name, load_model_tensors
from kiln.runs import check_checkpoint, sha256_file
from kiln.train import distributed_checkpoint
from kiln.train.checkpoint import CheckpointManager


def find_checkpoint(spec: str, key: str = "init_from") -> Path:
    """A run directory (its newest intact checkpoint) or one checkpoint directory, checked."""
    path = check_checkpoint(spec, key)  # what `kiln.cli` also checks before importing torch
    if (path / "checkpoint.json").is_file():
        problem = CheckpointManager(path.parent.parent).verify(path)
        if problem:
            raise KilnError(f"{key}={spec}: {problem}")
        return path
    found = CheckpointManager(path).latest_intact()
    if found is not None:
        return found
    raise KilnError(f"{key}={spec}: the run holds no intact checkpoint; train it first or name a checkpoint directory")


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint under its plain name, single-process or sharded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        try:
            return load_file(path / "model.safetensors")
        except (SafetensorError, OSError) as e:
            raise KilnError(f"{path / 'model.safetensors'} cannot be read ({e}); name another checkpoint") from None
    if distributed_checkpoint.is_sharded(path):
        tied = bool(CheckpointManager.info(path).get("model", {}).get("tie_embeddings", True))
        return distributed_checkpoint.read_tensors(path, tied)
    raise KilnError(f"{path} holds no weights (no model.safetensors or dcp/); name another checkpoint")


def load_init_weights(model: nn.Module, path: Path, workload: str) -> str:
    """Copy `path`'s weights into `model` for a new run; returns a one-line account.

    The checkpoint may hold exactly the model's weights, a subset of them (adapters only: the
    rest keep their initialization) or a superset (a base with a head this model does not have:
    the extra tensors are left out). Anything else (names that only partly overlap, or a shape
    that differs) is a different model and is refused in one line.
    """
    tensors = checkpoint_tensors(path)
    own = {clean_name(n): p for n, p in model.state_dict(keep_vars=True).items()}
    tied = {n for n in own if n not in tensors and any(own[n] is own[m] for m in tensors if m in own)}
    wanted = set(own) - tied
    given = set(tensors)
    if not (given <= set(own) or wanted <= given):
        missing, unexpected = sorted(wanted - given), sorted(given - set(own))
        raise KilnError(
            f"{workload}: init_from {path} does not fit this model: it lacks {missing[:3]} and has {unexpected[:3]} "
            "that the model does not; it was saved from a different model: use its model settings"
        )
    use = {k: v for k, v in tensors.items() if k in own}
    load_model_tensors(model, use, str(path), partial=True)
    notes = [f"loaded {len(use)} tensors from {path}"]
    if wanted - given:
        notes.append(f"{len(wanted - given)} new ones keep their initialization ({', '.join(sorted(wanted - given)[:3])})")
    if given - set(own):
        notes.append(f"{len(given - set(own))} not used by this model ({', '.join(sorted(given - set(own))[:3])})")
    return "; ".join(notes)


def check_tokenizer(tokenizer: Path, info: dict, what: str) -> None:
    """The tokenizer beside a run must be the one its checkpoint was trained with (checkpoint.json
    records its SHA-256): a replaced tokenizer turns every output into garbage."""
    want = info.get("tokenizer_sha256")
    if not want:
        return
    if not tokenizer.is_file():
        raise KilnError(f"{what}: '{tokenizer}' is missing; the checkpoint needs the tokenizer it was trained with")
    if sha256_file(tokenizer) != want:
        raise KilnError(
            f"{what}: '{tokenizer}' is not the tokenizer this checkpoint was trained with (its SHA-256 differs from "
            "checkpoint.json's); was `kiln prepare` re-run into this run? Restore the run's tokenizer or retrain"
        )
