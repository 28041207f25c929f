"""Pretraining's sections: `model.*` (generated from `kiln.model.config.ModelConfig`), `train.*`, `parallel.*`."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from kiln.config.schema import ranged
from kiln.model.config import PRESETS, ModelConfig, preset

# Bounds of the `model.*` shape keys (ModelConfig stays free of config machinery); None = the preset's value.
MODEL_RANGES: dict[str, dict] = {
    "vocab_size": {"ge": 1}, "d_model": {"ge": 1}, "n_layers": {"ge": 1}, "n_heads": {"ge": 1},
    "n_kv_heads": {"ge": 0}, "ffn_hidden": {"ge": 0}, "multiple_of": {"ge": 1}, "max_seq_len": {"ge": 1},
    "rope_theta": {"gt": 0}, "norm_eps": {"gt": 0}, "head_dim": {"ge": 0}, "sliding_window": {"ge": 0},
    "window_from_layer": {"ge": 0},
}


def model_section(default_preset: str):
    """The `model.*` keys: a preset plus every `ModelConfig` field as an optional override.

    Generated from `kiln.model.config.ModelConfig`, so a new model field is a recipe key at once,
    with no second copy of the schema (pretrain and `kiln plan` differ only in the default preset).
    """
    hints = typing.get_type_hints(ModelConfig)
    cls = dataclasses.make_dataclass(
        "ModelSection",
        [("preset", Literal[tuple(PRESETS)], field(default=default_preset))]
        + [(f.name, hints[f.name] | None, ranged(None, **MODEL_RANGES.get(f.name, {})))
           for f in dataclasses.fields(ModelConfig)],
        namespace={
            "overrides": lambda self: {k: v for k, v in dataclasses.asdict(self).items()
                                       if k != "preset" and v is not None},
            "build": _build_model,
            "__post_init__": lambda self: self.build(),  # an impossible shape fails at load, not after prepare
            "__doc__": f"model.preset (default {default_preset!r}; one of {', '.join(PRESETS)}) plus shape overrides; "
                       "None = the preset's value",
        },
    )
    cls.__module__ = __name__
    return cls


def _build_model(self, **forced) -> ModelConfig:
    """The ModelConfig for this section: the preset, its overrides, then `forced` values (e.g. the
    tokenizer's vocab size), one line of error for an unknown preset or an impossible shape."""
    return preset(self.preset, **{**self.overrides(), **forced})


ModelSection = model_section("small")


@dataclass
class TrainConfig:
    max_steps: int = ranged(1000, ge=1)
    batch_size: int = ranged(8, ge=1)  # sequences per micro-batch per data-parallel rank
    seq_len: int = ranged(256, ge=1)
    tokens_per_step: int = ranged(0, ge=0)  # global tokens per optimizer step; 0 = one micro-batch per rank
    lr: float = ranged(3e-3, gt=0)
    min_lr_ratio: float = ranged(0.1, ge=0, le=1)  # final lr as a share of lr
    warmup_steps: int = ranged(100, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = ranged(0.2, ge=0, le=1)  # share of steps spent decaying, for schedule=wsd
    weight_decay: float = ranged(0.1, ge=0)  # applied to matrices only
    beta1: float = ranged(0.9, ge=0, lt=1)
    beta2: float = ranged(0.95, ge=0, lt=1)
    eps: float = ranged(1e-8, gt=0)
    grad_clip: float = ranged(1.0, ge=0)  # max global grad norm; 0 = off
    seed: int = ranged(0, ge=0)
    ckpt_every: int = ranged(100, ge=1)
    keep_last: int = ranged(3, ge=1)  # complete checkpoints kept on disk
    eval_every: int = ranged(100, ge=1)
    eval_batches: int = ranged(20, ge=1)
    log_every: int = ranged(10, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 elsewhere
    compile: Literal["auto", "on", "off"] = "auto"  # auto = on for CUDA, off on CPU
    activation_checkpointing: bool = False
    document_mask: bool = False  # packed documents attend only within themselves (explicit mask: slower)
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns kept frozen, e.g. ["tok_emb.*"]
    spike_factor: float = ranged(4.0, gt=1)  # skip a step whose loss exceeds this multiple of the recent mean
    spike_window: int = ranged(50, ge=1)
    max_bad_steps: int = ranged(5, ge=1)  # stop after this many skipped steps in a row
    tensorboard: bool = True
    progress: bool = True


@dataclass
class ParallelConfig:
    dp_replicate: int = ranged(1, ge=1)  # DDP degree
    dp_shard: int = ranged(-1, ge=-1)  # FSDP2 degree; -1 = whatever the world size leaves over
    tp: int = ranged(1, ge=1)
    pp: int = ranged(1, ge=1)
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    pp_microbatches: int = ranged(0, ge=0)  # 0 = 2 × pp
    timeout_s: float = ranged(300.0, gt=0)  # a collective waiting this long means a peer died
