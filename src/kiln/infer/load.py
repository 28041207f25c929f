"""The one way kiln loads a trained model.

`open_checkpoint(spec)` reads what a run or checkpoint directory is (its newest intact checkpoint,
`checkpoint.json`, the model shape, the tokenizer it was trained with, checked by hash) without
building anything; training verbs that place weights themselves (`init_from`, a frozen reward
model or teacher) start from it. `load(spec)` returns a model ready for inference, whatever
`spec` names:

- a run directory (its newest intact checkpoint) or one checkpoint directory, written by one
  process (`model.safetensors`) or by many (`dcp/` shards, consolidated or not);
- a LoRA run (its checkpoints hold the adapters merged into the base: read like any other);
- a `kiln quantize` run (int8 / int4 weights, computed on as stored);
- a `kiln reward` run (the backbone with its scalar head, `kiln.model.heads.ScalarHeadModel`);
- a Hugging Face directory (a kiln export, or any Llama one: `kiln.infer.hf`).

Every verb that runs a trained model (generate, serve, eval, quantize, export, label, the
speedrun's tables) goes through here, so each of these cases and their one-line refusals exist once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from kiln.data.chat import ChatFormat, read_format, speaks_chat
from kiln.data.tokenizer import load_tokenizer, token_count
from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.model.heads import ScalarHeadModel
from kiln.model.quant import build_quantized, read_entry, read_stored
from kiln.model.transformer import Transformer
from kiln.model.weights import load_model_tensors
from kiln.runs import check_model, read_manifest
from kiln.train.checkpoint import CheckpointManager
from kiln.train.parallel import pick_device
from kiln.train.restore import check_tokenizer, checkpoint_tensors, find_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- what a checkpoint is ------------------------------------------------------------------------
@dataclass
class RunCheckpoint:
    """One checkpoint of a run, read but not built: `model` is its shape, `info` its
    checkpoint.json (`workload` says what it was trained as), the tokenizer the one it records,
    `chat_format` its ids and chat template (`kiln.data.chat.read_format`)."""

    path: Path
    run: Path
    info: dict
    model: ModelConfig
    tokenizer_file: Path
    tokenizer: Tokenizer
    chat_format: ChatFormat

    @cached_property
    def quantization(self) -> dict | None:
        """The checked quantization entry, or None for full-precision weights."""
        return read_entry(self.path, self.info)

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every full-precision weight under its plain name (read once)."""
        return checkpoint_tensors(self.path)

    @property
    def data(self) -> Path | None:
        """The prepared data it was trained on: the run's own data/, else the one recorded."""
        if read_manifest(self.run / "data"):
            return self.run / "data"
        recorded = self.info.get("data")  # token shards' directory (an sft run records its JSONL files instead)
        return Path(recorded) if isinstance(recorded, str) and recorded else None

    def full_precision(self, what: str) -> RunCheckpoint:
        """This checkpoint, refusing a quantized one where `what` needs the float weights."""
        q = self.info.get("quantization")
        if q:
            tag = ", ".join(str(q[k]) for k in ("format", "method") if k in q) if isinstance(q, dict) else str(q)
            raise KilnError(f"{self.path} is a quantized checkpoint ({tag}); {what} read full-precision weights: "
                            "name the checkpoint it was quantized from")
        return self


def open_checkpoint(spec: str | Path, key: str = "out", what: str = "") -> RunCheckpoint:
    """A run's newest intact checkpoint, or the checkpoint directory `spec` names, with the run's
    tokenizer checked against the one the checkpoint records. `key` is the setting that named it,
    `what` what the errors start with (`key=spec` by default)."""
    path = find_checkpoint(str(spec), key=key)
    info = CheckpointManager.info(path)
    if "model" not in info:
        raise KilnError(f"{path}/checkpoint.json records no model; it was not written by a kiln training verb")
    run = path.parent.parent
    tfile = run / "tokenizer" / "tokenizer.json"
    check_tokenizer(tfile, info, what or f"{key}={spec}")
    tok = load_tokenizer(tfile)
    return RunCheckpoint(path, run, info, ModelConfig.from_dict(info["model"]), tfile, tok, read_format(tfile, tok))


# ---- a model ready for inference -------------------------------------------------------------------
@dataclass
class Loaded:
    """A model ready for inference (eval mode, on `device`) with its tokenizer, its chat format
    (the ids that start and end documents and turns, how conversations render) and origin."""

    model: nn.Module
    tokenizer: Tokenizer
    device: torch.device
    kind: str  # "checkpoint" (of a run, float or quantized) or "hf" (a Hugging Face directory)
    source: Path  # the checkpoint or Hugging Face directory
    home: Path  # where results about it go: the run, or the Hugging Face directory
    info: dict = field(default_factory=dict)  # checkpoint.json ({} for a Hugging Face directory)
    data: Path | None = None  # the prepared data it was trained on, if known
    chat_format: ChatFormat | None = None  # None: kiln's own format over `tokenizer`

    def __post_init__(self) -> None:
        if self.chat_format is None:
            self.chat_format = ChatFormat.kiln(self.tokenizer)

    @property
    def step(self) -> int | None:
        return self.info.get("step")

    @property
    def workload(self) -> str:
        """What it was trained as: pretrain, sft, dpo, rl, distill, quantize, import, ... (hf: "hf")."""
        return self.info.get("workload", "pretrain") if self.kind == "checkpoint" else "hf"

    @property
    def chat(self) -> bool:
        """Whether it was trained to answer in kiln's chat format (`kiln.data.chat.speaks_chat`)."""
        return self.kind == "checkpoint" and speaks_chat(self.info)

    @property
    def quantized(self) -> bool:
        return bool(self.info.get("quantization"))

    @property
    def n_vocab(self) -> int:
        """Ids the tokenizer produces: the model's rows past them are padding."""
        return min(token_count(self.tokenizer), self.model.cfg.vocab_size)

    @property
    def bos(self) -> int:
        """The token a document starts after: BOS (or, for a tokenizer without one, the EOS before it)."""
        return self.chat_format.document_start

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def pick_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (half the bytes each decode step reads), fp32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise KilnError(f"dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load(spec: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype | None = "fp32", *,
         key: str = "out", allow_pickle: bool = False) -> Loaded:
    """A run, a checkpoint, a quantized run or a Hugging Face directory as a model ready for
    inference on `device` in `dtype` ("auto": bf16 on CUDA, fp32 elsewhere; a quantized model
    computes its activations in it). `key` names the setting that gave `spec`, for the errors."""
    path = Path(spec)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    dt = pick_dtype(dtype, dev)
    if check_model(spec, key) == "checkpoint":  # what `kiln.cli` also checks before importing torch
        ck = open_checkpoint(path, key)
        loaded = Loaded(model_of(ck, dev, dt), ck.tokenizer, dev, "checkpoint", ck.path, ck.run, ck.info, ck.data,
                        ck.chat_format)
    else:
        from kiln.infer.hf import read_hf

        hf = read_hf(path, allow_pickle, key)
        loaded = Loaded(_float_model(hf.model, hf.tensors, path), hf.tokenizer, dev, "hf", path, path,
                        chat_format=hf.chat)
    if not loaded.quantized:
        loaded.model.to(device=dev, dtype=dt)
    loaded.model.eval()
    return loaded


def model_of(ck: RunCheckpoint, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model a checkpoint holds, as it was trained: quantized on `device` (activations in
    `dtype`), else on the CPU in fp32 (`load` places it)."""
    if ck.quantization:
        return quantized_model(ck, device, dtype)
    return _float_model(ck.model, ck.tensors, ck.path, ck.info.get("head"))


def _float_model(mc: ModelConfig, tensors: dict[str, torch.Tensor], source: Path, head: str | None = None) -> Transformer:
    """The model as it was trained: a language model, or one with a scalar head (a reward model,
    which still scores and generates as its backbone: `model(ids)` gives LM logits)."""
    if not mc.causal:
        raise KilnError(f"{source} holds a bidirectional (causal=false) encoder; it classifies or fills masks, it does "
                        "not generate: use it through `kiln classify` or its EuroBERT export")
    model = ScalarHeadModel(mc) if head == "scalar" else Transformer(mc)
    load_model_tensors(model, tensors, str(source))
    model.init_buffers()
    return model


def quantized_model(ck: RunCheckpoint, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A quantized checkpoint's model on `device` (norm gains and activations in `dtype`). A damaged
    file, a format tag this kiln does not know, or tensors that do not fit the model are refused."""
    problem = CheckpointManager(ck.run).verify(ck.path)
    if problem:
        raise KilnError(f"{problem}; re-run `kiln quantize` to write it again")
    stored, rest = read_stored(ck.path, ck.quantization, ck.model)
    return build_quantized(ck.model, stored, rest, device, dtype, str(ck.path / "model.safetensors"))
