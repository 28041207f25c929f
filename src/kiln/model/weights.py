"""A model's weights by plain name: reading them out, copying them in (whole tensors into local
shards where a parameter is sharded), checked against the model's own names and shapes."""

from __future__ import annotations

import torch
from torch import nn

from kiln.errors import KilnError

# Wrappers applied from outside (activation checkpointing, torch.compile, DDP) add these to names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def clean_name(name: str) -> str:
    for w in _WRAPPER_PREFIXES:
        name = name.replace(w, "")
    return name


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under their plain names, each shared (tied) tensor once."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[clean_name(name)] = t.detach().cpu().contiguous()
    return out


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str, partial: bool = False) -> None:
    """Copy `tensors` into `model`, matching plain names; every weight must be present (unless
    `partial`: then only those given) and fit. Sharded (DTensor) weights take their local shard."""
    own = {clean_name(n): p for n, p in model.state_dict(keep_vars=True).items()}
    tied = {n for n in own if n not in tensors and any(own[n] is own[m] for m in tensors if m in own)}
    missing = [] if partial else sorted(set(own) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise KilnError(
            f"{source} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "it was saved from a different model: use its model settings or a new out="
        )
    with torch.no_grad():
        for name, t in tensors.items():
            if tuple(own[name].shape) != tuple(t.shape):
                raise KilnError(
                    f"{source}: weight '{name}' has shape {tuple(t.shape)}, the model wants {tuple(own[name].shape)}; "
                    "it was saved from a different model: use its model settings or a new out="
                )
            copy_into(own[name], t.to(own[name].dtype))


def copy_into(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, or into its local shard if it is a DTensor."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # a build without distributed support
        DTensor = ()  # noqa: N806
    if isinstance(p, DTensor):
        local = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(local.to_local())
    else:
        p.copy_(full)
