"""Low-rank adapters (LoRA) on the transformer's projections: apply, initialize, merge, save, load.

A targeted projection `y = x Wᵀ` becomes `y = x Wᵀ + (alpha / r) · dropout(x) Aᵀ Bᵀ` with A (r × in)
and B (out × r) trained and every base weight frozen. B starts at zero, so a freshly adapted model
computes exactly what its base does. The frozen W keeps its name (`layers.0.attn.wq.weight`) and
the adapters sit beside it (`...wq.lora_a`, `...wq.lora_b`), so a base checkpoint loads into an
adapted model unchanged (the "subset" case of `load_init_weights`).

Like every other change to the model, adapters are applied from outside, before parallelism:
FSDP2 and DDP treat the frozen base and the adapters like any other parameters; tensor
parallelism would split A and B along the wrong dimension, so a LoRA run refuses `parallel.tp>1`.

A LoRA run's checkpoint (`kiln.train.lora_checkpoints.LoRACheckpoints`) holds the adapters alone in `adapter.safetensors`
(with the LoRA config in its metadata), and `model.safetensors` with the adapters merged into the
base: what `kiln generate`, export and a later stage's `init_from` read, with no LoRA code. A
resumed run reloads the frozen base from the checkpoint it started from.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kiln.errors import KilnError
from kiln.model.weights import load_model_tensors

ADAPTER_FILE = "adapter.safetensors"
_META_KEY = "kiln_lora"  # the adapter file's metadata entry holding the LoRA config (JSON)
_SUFFIXES = (".lora_a", ".lora_b")


class LoRALinear(nn.Module):
    """A linear layer with a frozen weight (and frozen bias, if it has one: Qwen2's q/k/v) and a
    trainable low-rank update.

    It takes over the replaced `nn.Linear`'s weight and bias Parameters themselves (same objects,
    same names), so it costs no copy and works on the meta device before sharding.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        out_features, in_features = base.weight.shape
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's own initialization; `init_lora` redraws it seeded
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, **kw).uniform_(-bound, bound))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    def delta(self) -> torch.Tensor:
        """(alpha / r) · B A, the update the adapter adds to the weight."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale


def _targets(model: nn.Module, targets: list[str]) -> Iterator[tuple[str, nn.Module, str]]:
    """(plain name, parent module, attribute) of every targeted projection, in layer order."""
    for i, block in model.layers.items():
        for part, names in (("attn", ("wq", "wk", "wv", "wo")), ("mlp", ("w1", "w2", "w3"))):
            parent = getattr(block, part)
            for name in names:
                if name in targets:
                    yield f"layers.{i}.{part}.{name}", parent, name


def apply_lora(model: nn.Module, lora) -> nn.Module:
    """Put rank-`lora.rank` adapters on the projections named in `lora.targets` of every block and
    freeze every other parameter. `lora` is a `kiln.config.LoRAConfig` (rank, alpha, dropout, targets).
    Call it before placing the model (`parallel.build_model`'s `make`); returns the model."""
    if lora.rank < 1:
        raise ValueError("apply_lora needs lora.rank ≥ 1")
    model.requires_grad_(False)
    for _, parent, name in _targets(model, lora.targets):
        setattr(parent, name, LoRALinear(getattr(parent, name), lora.rank, lora.alpha, lora.dropout))
    return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


@torch.no_grad()
def init_lora(model: nn.Module, seed: int = 0) -> None:
    """A ~ U(±1/√in) (nn.Linear's own initialization), B = 0: the adapted model starts as its base.

    Each A is drawn whole in a fixed order and copied into the local shard of a sharded (DTensor)
    parameter, so every layout starts from the same adapters."""
    from kiln.model.weights import copy_into

    gen = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        bound = 1.0 / math.sqrt(m.lora_a.shape[1])
        copy_into(m.lora_a, torch.empty(m.lora_a.shape, dtype=m.lora_a.dtype).uniform_(-bound, bound, generator=gen))
        copy_into(m.lora_b, torch.zeros(m.lora_b.shape, dtype=m.lora_b.dtype))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + (alpha / r) · B A) and put back a plain `nn.Linear`:
    the model is again a plain Transformer, as fast as the base. In place; returns the model."""
    for name, m in list(lora_modules(model)):
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        merged = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=m.bias is not None, device="meta")
        merged.weight = nn.Parameter((m.weight.float() + m.delta()).to(m.weight.dtype), requires_grad=False)
        if m.bias is not None:
            merged.bias = m.bias
        setattr(parent, name.rsplit(".", 1)[1], merged)
    return model


# ---- tensors and files ---------------------------------------------------------------------
def is_adapter_key(name: str) -> bool:
    return name.endswith(_SUFFIXES)


def adapter_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if is_adapter_key(k)}


def merged_tensors(tensors: dict[str, torch.Tensor], lora) -> dict[str, torch.Tensor]:
    """A LoRA model's weights (base + adapters, by name) as a plain model's: each adapted weight
    becomes W + (alpha / r) · B A, the adapters themselves are left out."""
    scale = lora.alpha / lora.rank
    out = {k: v for k, v in tensors.items() if not is_adapter_key(k)}
    for key in tensors:
        if key.endswith(".lora_a"):
            stem = key.removesuffix(".lora_a")
            a, b, w = tensors[key], tensors[stem + ".lora_b"], tensors[stem + ".weight"]
            out[stem + ".weight"] = (w.float() + (b.float() @ a.float()) * scale).to(w.dtype).contiguous()
    return out


def lora_dict(lora) -> dict:
    return {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets)}


def save_adapter(path: str | Path, tensors: dict[str, torch.Tensor], lora) -> None:
    """The adapters alone, with the LoRA config in the file's metadata (written under a temporary name)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={_META_KEY: json.dumps(lora_dict(lora))})
    os.replace(tmp, path)


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter tensors, LoRA config) of an adapter file, or a one-line error."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get(_META_KEY)
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise KilnError(f"adapter file '{path}' cannot be read ({e}); name a LoRA run's checkpoint") from None
    if meta is None or not tensors or not all(is_adapter_key(k) for k in tensors):
        raise KilnError(f"'{path}' is not a kiln LoRA adapter file (no {_META_KEY} metadata or non-adapter tensors)")
    return tensors, json.loads(meta)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Put the adapters saved at `path` (a LoRA checkpoint or its adapter.safetensors) onto a base
    model: adapters are applied first if the model has none. Returns the model (`merge_lora` it to serve)."""
    tensors, spec = read_adapter(path)
    if not any(True for _ in lora_modules(model)):
        apply_lora(model, SimpleNamespace(**spec))
    want = {f"{name}{s}" for name, _ in lora_modules(model) for s in _SUFFIXES}
    if set(tensors) != want:
        raise KilnError(f"adapters in '{path}' do not fit this model's adapted projections "
                        f"({len(tensors)} tensors there, {len(want)} here); load them onto the base they were trained on")
    load_model_tensors(model, tensors, str(path), partial=True)
    return model
