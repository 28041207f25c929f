"""After training: `eval.*` (`kiln eval`), `export.*` and `hf_import.*` (model formats), `quantize.*`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kiln.config.schema import ranged


@dataclass
class EvalConfig:
    path: str = ""  # what to evaluate: a run, a checkpoint directory or a Hugging Face export; "" = out
    data_path: str = ""  # prepared data whose held-out split is scored; "" = the run's own data
    text: list[str] = field(default_factory=list)  # text files to score in bits per byte
    # Held-out windows: 0, 0 = the ones the run's training validated on (so the figure is its val_bpb),
    # or, for a model that recorded none, 400 windows of its context (at most 2048 tokens).
    windows: int = ranged(0, ge=0)  # held-out windows scored; 0 = as training validated
    seq_len: int = ranged(0, ge=0)  # tokens per window (held-out and text files); 0 = as training validated
    batch_size: int = ranged(8, ge=1)
    tasks: bool = True  # code tasks on held-out Python: next-line exact match, function-completion parse rate
    num_examples: int = ranged(32, ge=0)  # examples per task
    max_new_tokens: int = ranged(128, ge=1)  # generation budget of a function completion
    harness_tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks (needs lm-eval)
    harness_include: str = ""  # a directory of extra lm-eval task YAMLs
    harness_limit: int = ranged(0, ge=0)  # examples per harness task (0 = all)


@dataclass
class ExportConfig:
    format: Literal["hf", "gguf"] = "hf"  # hf: a transformers directory; gguf: one llama.cpp file
    path: str = ""  # where it goes; "" = <out>/export/hf (hf) or <out>/export/<run name>.gguf (gguf)
    checkpoint: str = ""  # a checkpoint directory to export; "" = the run's newest intact one
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # GGUF: f32, or f16 matrices for the others


@dataclass
class HFImportConfig:
    path: str = ""  # the Hugging Face model directory to import (`kiln import PATH` sets it)
    allow_pickle: bool = False  # read *.bin / *.pt weights (torch.load weights_only=True) when no safetensors exist


@dataclass
class QuantizeConfig:
    """`kiln quantize`: weight-only INT8 / INT4 of a trained run (see docs/quantization.md)."""

    source: str = ""  # the float run (or checkpoint directory) to quantize; the result goes to `out`
    format: Literal["int8", "int4"] = "int8"  # int8: per output channel; int4: group-wise, two values per byte
    group_size: int = ranged(64, ge=1)  # int4: input columns sharing one scale and minimum (32, 64, 128 or 256)
    method: Literal["rtn", "gptq"] = "rtn"  # rtn: round to nearest; gptq: calibrated on the source's training shards
    calib_sequences: int = ranged(256, ge=1)  # gptq: training windows the projections are calibrated on
    calib_seq_len: int = ranged(0, ge=0)  # gptq: tokens per window; 0 = min(the model's context, 256)
    damp: float = ranged(0.01, gt=0, le=1)  # gptq: added to the inputs' second moment, × its mean diagonal
    evaluate: bool = True  # score held-out bits/byte before and after, on the windows the source run validated on
