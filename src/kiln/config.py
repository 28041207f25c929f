"""Typed configs: dataclasses loaded from YAML recipes, `key.sub=value` overrides, strict checks.

Every verb's options live in one dataclass tree. `load(Root, recipe, overrides)` merges a YAML
recipe with command-line overrides and builds the tree, failing with one line on an unknown key
(naming the closest valid one), a value of the wrong type (naming key, value, type and how to
write it) or a number out of its declared range. Command-line values are text read by the key's
type: a `str` key keeps what was typed, numbers take `64k` / `1.5B` / `2T`, lists take `a,b`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml

from kiln.errors import KilnError
from kiln.model.config import PRESETS, ModelConfig, preset


class ConfigError(KilnError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false are bools, so `compile: on` stays the string 'on'."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ---- the schema ------------------------------------------------------------------------------
def ranged(default=dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None, default_factory=dataclasses.MISSING):
    """A dataclass field whose value `build` checks against bounds: `max_steps: int = ranged(1000, ge=1)`.

    Every numeric key of every verb declares its range this way, so a bad value stops at load
    time with one line (`config key 'train.max_steps' = -5 must be ≥ 1`) instead of training
    nothing, dividing by zero or sampling garbage further on.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, default_factory=default_factory, metadata={"range": bounds})


_RANGE_TEXT = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
_RANGE_TEST = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def check_range(key: str, value, bounds: dict) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not bounds:
        return
    failed = [k for k, b in bounds.items() if not _RANGE_TEST[k](value, b)]
    if failed:
        want = " and ".join(f"{_RANGE_TEXT[k]} {bounds[k]:g}" for k in bounds)
        raise ConfigError(f"config key '{key}' = {value!r} is out of range: it must be {want}")


@dataclass
class ReaderConfig:
    format: Literal["auto", "stdlib", "text", "jsonl", "parquet", "warc"] = "auto"  # auto = by file name
    text_field: str = "text"  # JSONL / Parquet column holding the text
    id_field: str = "id"  # JSONL / Parquet column naming the document ("" = file:record)
    url_field: str = "url"  # JSONL / Parquet column with the source URL, if any
    html: Literal["auto", "always", "never"] = "auto"  # extract main text from HTML (auto: WARC, .html files)
    extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"
    extract_timeout_s: float = ranged(5.0, gt=0)  # per-document time limit for the HTML extractor
    max_record_bytes: int = ranged(16_000_000, ge=1)  # skip a record (file, line, row, WARC record) larger than this
    task_bytes: int = ranged(64_000_000, ge=1)  # split JSONL / text-line inputs larger than this into byte-range tasks


@dataclass
class ExecutorConfig:
    kind: Literal["local", "ray"] = "local"
    workers: int = ranged(0, ge=0)  # worker processes (local) or concurrent tasks (ray); 0 = the CPU count
    ray_address: str = ""  # "" = start a local Ray instance; "auto" or host:port = join a cluster


@dataclass
class TokenizerConfig:
    vocab_size: int = ranged(8192, ge=264)  # byte-level BPE vocabulary: 256 bytes + 7 special tokens + merges
    path: str = ""  # an existing tokenizer.json to use instead of training one
    train_bytes: int = ranged(0, ge=0)  # train on at most this many bytes of text (0 = all)


@dataclass
class ImageDataConfig:
    """`kiln prepare` with data.kind=images: how images are decoded, sized, split and stored."""

    size: int = ranged(32, ge=4)  # side of the square images stored, in pixels
    mode: Literal["RGB", "L"] = "RGB"  # stored channels: RGB (3) or L (grayscale, 1)
    fit: Literal["crop", "pad"] = "crop"  # keep the aspect ratio, then center-crop or pad to a square
    upscale: bool = False  # enlarge images smaller than `size`; false: skip them (counted as smaller_than_size)
    test_fraction: float = ranged(0.1, gt=0, lt=1)  # share of each class held out for test (data.val_fraction: validation)
    classes: list[str] = field(default_factory=list)  # class names in label order; [] = folder names / listing labels, sorted
    path_field: str = "path"  # CSV / JSONL column with the image path (relative to the listing's folder)
    label_field: str = "label"  # CSV / JSONL column with the class name or index
    max_pixels: int = ranged(89_478_485, ge=1)  # skip larger images (decompression bombs); Pillow's own limit
    task_images: int = ranged(512, ge=1)  # images per preparation task (the unit of parallelism and of resume)
    shard_images: int = ranged(50_000, ge=1)  # images per shard file
    contact_per_class: int = ranged(8, ge=1)  # samples per class on the report's contact sheet


@dataclass
class DataConfig:
    input: str = "stdlib"  # "stdlib" (this interpreter's standard library), a path, a directory or a glob
    path: str = ""  # prepared data directory pretrain reads; "" = <out>/data
    val_fraction: float = ranged(0.02, gt=0, lt=1)  # share of documents held out for validation (split by document id)
    max_docs: int = ranged(0, ge=0)  # keep at most this many documents after every stage (0 = all)
    min_chars: int = ranged(64, ge=0)  # the `length` stage: drop documents shorter than this
    max_chars: int = ranged(2_000_000, ge=1)  # the `length` stage: drop documents longer than this
    preset: Literal["auto", "code", "web", "minimal"] = "auto"  # stages used when `stages` is empty (auto: by input)
    stages: list[Any] = field(default_factory=list)  # [name | {name: {option: value}}]; see README "Data pipeline"
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    strict: bool = False  # stop at the first bad record instead of skipping and counting it
    exclusions: bool = False  # write every dropped document (id, stage, reason, url, source file) to <data>/exclusions.jsonl
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shard_tokens: int = ranged(50_000_000, ge=1)  # tokens per shard file
    seed: int = ranged(0, ge=0)  # shuffles document order across the corpus
    kind: Literal["text", "images"] = "text"  # images: data.input is `digits`, an image folder or a CSV/JSONL listing
    images: ImageDataConfig = field(default_factory=ImageDataConfig)
    # The sharded global steps (README "At scale"): the dedup's bucket size sets how many bucket tasks sort
    # key records (at least one per worker; a task holds about 2.5x this; the decisions do not depend on it);
    # the shuffle puts this many training tokens in each bucket task (the shard layout depends on it; one
    # bucket = one whole-corpus permutation).
    dedup_bucket_bytes: int = ranged(256_000_000, ge=1)
    shuffle_bucket_tokens: int = ranged(1_000_000_000, ge=1)


# Bounds of the `model.*` shape keys (ModelConfig stays free of config machinery); None = the preset's value.
MODEL_RANGES: dict[str, dict] = {
    "vocab_size": {"ge": 1}, "d_model": {"ge": 1}, "n_layers": {"ge": 1}, "n_heads": {"ge": 1},
    "n_kv_heads": {"ge": 0}, "ffn_hidden": {"ge": 0}, "multiple_of": {"ge": 1}, "max_seq_len": {"ge": 1},
    "rope_theta": {"gt": 0}, "norm_eps": {"gt": 0},
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


@dataclass
class SampleConfig:
    prompt: str = "def "
    max_new_tokens: int = ranged(64, ge=1)
    temperature: float = ranged(0.8, ge=0)  # 0 = greedy
    top_k: int = ranged(50, ge=0)  # 0 = off
    top_p: float = ranged(1.0, gt=0, le=1)  # 1 = off
    repetition_penalty: float = ranged(1.0, gt=0)  # > 1 discourages tokens already in the prompt or output
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these strings
    seed: int = ranged(0, ge=0)
    num_samples: int = ranged(1, ge=1)
    report_prompts: list[str] = field(
        default_factory=lambda: ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self"]
    )


@dataclass
class ServeConfig:
    """`kiln serve`: an OpenAI-compatible HTTP API over the continuous-batching engine."""

    host: str = "127.0.0.1"  # any other address needs an API key
    port: int = ranged(8000, ge=0, le=65535)  # 0 = a free port (printed at start)
    api_key: str = ""  # required off loopback; "" = the KILN_API_KEY environment variable, if set
    model_name: str = ""  # the model id clients ask for; "" = the run directory's name
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 on CUDA, fp32 elsewhere
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the decode step; auto = on for CUDA only
    max_batch: int = ranged(16, ge=1)  # sequences decoding together (rows of the KV cache)
    max_queue: int = ranged(256, ge=0)  # sequences waiting for a row; beyond that, 429
    max_prompt_tokens: int = ranged(0, ge=0)  # 0 = the model's context less one
    max_new_tokens: int = ranged(1024, ge=1)  # the largest max_tokens a request may ask for
    max_total_tokens: int = ranged(8192, ge=1)  # the largest n × max_tokens of one request
    max_n: int = ranged(8, ge=1)  # choices per request (prompts × n)
    max_streams_per_key: int = ranged(64, ge=1)  # requests in flight per API key (or client address)
    max_body_bytes: int = ranged(1_000_000, ge=1)
    max_json_depth: int = ranged(32, ge=1)
    read_timeout_s: float = ranged(10.0, gt=0)  # a request's head and body must arrive within this
    max_connections: int = ranged(1000, ge=1)  # open connections; beyond that, 503
    shutdown_timeout_s: float = ranged(30.0, ge=0)  # graceful shutdown: time left to requests in flight
    usd_per_hour: float = ranged(0.0, ge=0)  # the machine's price, for cost per million tokens; 0 = assumed


@dataclass
class LabelConfig:
    """`kiln label generate | serve | invite | report | export`: human preference labelling."""

    db: str = ""  # the label database (SQLite); "" = <out>/labels/labels.db
    prompts: str = ""  # prompts for `generate`: .jsonl with a "prompt" field, or text, one a line; "" = sample.report_prompts
    pairs_per_prompt: int = ranged(1, ge=1)  # pairs of completions `generate` samples per prompt
    chat: Literal["auto", "on", "off"] = "auto"  # prompt as a user turn, reply as the assistant; auto = on for sft/dpo/rl runs
    labellers: list[str] = field(default_factory=list)  # names `generate` invites (one link each)
    name: str = ""  # the labeller `invite` adds (or whose link it renews)
    labellers_per_pair: int = ranged(1, ge=1)  # how many labellers see each pair; 2+ gives agreement (kappa)
    host: str = "127.0.0.1"  # `serve` binds here; any other address needs label.admin_key
    port: int = ranged(8765, ge=0, le=65535)  # 0 = any free port (the address is printed)
    url: str = ""  # the address labellers open, for invite links; "" = http://host:port
    admin_key: str = ""  # admin token for the report/export views; "" = a fresh one per `serve` (loopback only)
    output: str = ""  # the preference JSONL `export` writes; "" = <out>/labels/preferences.jsonl
    lease_s: float = ranged(600.0, gt=0)  # a pair shown to a labeller is held for them this long
    busy_timeout_s: float = ranged(5.0, ge=0)  # wait this long for a locked database before answering "busy"


# The block projections LoRA can adapt (attention: wq wk wv wo; SwiGLU MLP: w1 w2 w3).
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoRAConfig:
    """Low-rank adapters (`kiln.model.lora`): rank 0 = full fine-tuning."""

    rank: int = ranged(0, ge=0)  # > 0: train rank-r adapters on `targets`, every base weight frozen
    alpha: float = ranged(16.0, gt=0)  # the adapters' output is scaled by alpha / rank
    dropout: float = ranged(0.0, ge=0, lt=1)  # dropout on the adapters' input while training
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # which projections get adapters

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"lora.targets={self.targets} must be a non-empty list of {', '.join(LORA_TARGETS)}")


@dataclass
class SFTConfig:
    """`kiln sft`: supervised fine-tuning on conversations (see README "Fine-tuning and alignment")."""

    data: str = ""  # JSONL of {"messages": [{role, content}]} or {"prompt", "completion"}; "" = the default task
    val_data: str = ""  # held-out JSONL in the same formats; "" = hold out sft.val_fraction of sft.data
    val_fraction: float = ranged(0.05, gt=0, lt=1)
    train_on: Literal["assistant", "last"] = "assistant"  # loss on every assistant turn, or only the last
    too_long: Literal["drop", "truncate"] = "drop"  # a conversation longer than train.seq_len + 1 tokens
    strict: bool = False  # stop at the first malformed record instead of skipping and counting it
    default_source: str = "stdlib"  # the default task's functions: "stdlib" or a directory of .py files
    default_max_chars: int = ranged(600, ge=64)  # the default task keeps functions up to this long
    eval_prompts: int = ranged(32, ge=0)  # held-out prompts answered greedily for the task metric; 0 = off
    eval_max_new_tokens: int = ranged(48, ge=1)  # longest reply the task metric generates (and scores)


@dataclass
class PreferenceConfig:
    """Preference pairs for `kiln reward` and `kiln dpo` (TRL's format; README "Fine-tuning and alignment")."""

    data: str = ""  # JSONL of {prompt, chosen, rejected} (text or message lists); "" = the default stdlib pairs
    val_data: str = ""  # held-out pairs in the same format; "" = hold out preference.val_fraction of the prompts
    val_fraction: float = ranged(0.1, gt=0, lt=1)
    max_pairs: int = ranged(0, ge=0)  # use at most this many pairs (0 = all; the default pairs: 4000)
    strict: bool = False  # stop at the first malformed row instead of skipping and counting it


@dataclass
class DPOConfig:
    """`kiln dpo`: direct preference optimization against a frozen reference (init_from)."""

    beta: float = ranged(0.1, gt=0)  # strength of the implicit KL to the reference
    sft_weight: float = ranged(0.0, ge=0)  # add this × the chosen completion's cross-entropy to the loss
    precompute_ref: bool = True  # score every pair with the reference once, then free it (else per batch)


@dataclass
class SandboxConfig:
    """Limits for running model-written code (`kiln.train.sandbox`)."""

    timeout_s: float = ranged(5.0, gt=0)  # wall clock per run (the CPU limit is the same, rounded up)
    memory_mb: int = ranged(512, ge=32)  # address space (RLIMIT_AS)
    max_output_bytes: int = ranged(65536, ge=1)  # stdout + stderr; past it the run is stopped
    max_procs: int = ranged(16, ge=1)  # processes of the sandbox user (RLIMIT_NPROC)
    max_file_mb: int = ranged(16, ge=0)  # largest file the program may write (RLIMIT_FSIZE)
    tmp_dir: str = ""  # where the private working directories go; "" = the system's temporary directory


@dataclass
class RLConfig:
    """`kiln rl`: GRPO on prompts with a verifiable reward or a reward model."""

    prompts: str = ""  # JSONL of {prompt, ...fields passed to the reward}; "" = the default task (rl.task)
    # the default task: "code" writes a standard-library function (its body after pretraining), rewarded
    # for parsing and passing its doctests; "docstring" (chat models) writes a function's docstring,
    # rewarded by word F1 against the real one
    task: Literal["code", "docstring"] = "code"
    val_prompts: str = ""  # held-out prompts; "" = hold out rl.val_fraction of rl.prompts
    val_fraction: float = ranged(0.1, gt=0, lt=1)
    max_prompts: int = ranged(0, ge=0)  # use at most this many prompts (0 = all; the default task: 2000)
    format: Literal["auto", "chat", "text"] = "auto"  # auto: chat after sft/dpo/rl, plain text after pretrain
    reward: str = ""  # module:function(prompt, completion, **fields); "" = the task's (code_reward, docstring_reward)
    reward_model: str = ""  # a `kiln reward` run to score completions instead of rl.reward
    reward_timeout_s: float = ranged(10.0, gt=0)  # a reward call running longer scores 0 (counted)
    group_size: int = ranged(8, ge=2)  # completions sampled per prompt (G)
    prompts_per_step: int = ranged(4, ge=1)  # prompts per rollout (per data-parallel rank)
    max_new_tokens: int = ranged(96, ge=1)
    temperature: float = ranged(1.0, gt=0)
    top_k: int = ranged(0, ge=0)  # 0 = off
    top_p: float = ranged(1.0, gt=0, le=1)  # 1 = off
    clip_eps: float = ranged(0.2, gt=0, lt=1)  # the policy ratio is clipped to [1 - eps, 1 + eps]
    kl_coef: float = ranged(0.0, ge=0)  # β of the KL penalty to the reference (0 = no reference model)
    scale_rewards: bool = True  # divide advantages by the group's standard deviation
    updates_per_rollout: int = ranged(1, ge=1)  # optimizer steps on each rollout (the ratio departs from 1 after the first)
    eval_prompts: int = ranged(32, ge=0)  # held-out prompts scored (greedy) at each evaluation; 0 = off
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)  # where rewards are computed (local, ray)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


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
class EvalConfig:
    path: str = ""  # what to evaluate: a run, a checkpoint directory or a Hugging Face export; "" = out
    data_path: str = ""  # prepared data whose held-out split is scored; "" = the run's own data
    text: list[str] = field(default_factory=list)  # text files to score in bits per byte
    max_batches: int = ranged(50, ge=0)  # held-out batches scored (0 = the whole split)
    batch_size: int = ranged(8, ge=1)
    seq_len: int = ranged(0, ge=0)  # scoring window; 0 = the model's context (at most 2048)
    tasks: bool = True  # code tasks on held-out Python: next-line exact match, function-completion parse rate
    num_examples: int = ranged(32, ge=0)  # examples per task
    max_new_tokens: int = ranged(128, ge=1)  # generation budget of a function completion
    harness_tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks (needs lm-eval)
    harness_include: str = ""  # a directory of extra lm-eval task YAMLs
    harness_limit: int = ranged(0, ge=0)  # examples per harness task (0 = all)


@dataclass
class AugmentConfig:
    """Batch-time augmentation of training images, on the training device (`kiln.data.augment`)."""

    enabled: bool = True
    crop_scale: float = ranged(0.8, gt=0, le=1)  # random resized crop: the smallest share of the image area kept
    crop_ratio: float = ranged(1.25, ge=1)  # crop aspect ratios drawn in [1/r, r]
    rotation: float = ranged(10.0, ge=0, le=180)  # random rotation in ±degrees
    flip: bool = False  # random horizontal flip (off by default: digits and text are not mirror-symmetric)
    jitter: float = ranged(0.0, ge=0, lt=1)  # brightness / contrast / saturation jitter strength; 0 = off


@dataclass
class VisionConfig:
    arch: Literal["vit", "cnn"] = "vit"  # vit: the shared Transformer over patches (causal=false); cnn: a small baseline
    patch_size: int = ranged(4, ge=1)  # ViT patch side in pixels; must divide data.images.size
    patch_overlap: int = ranged(0, ge=0)  # pixels each patch's embedding also sees of its neighbours, per side
    pooling: Literal["cls", "mean"] = "cls"  # ViT: a class token, or the mean of the patch tokens
    positions: Literal["learned", "rope"] = "learned"  # learned table over the patch grid, or RoPE over raster order
    label_smoothing: float = ranged(0.0, ge=0, lt=1)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    baselines: bool = True  # fit scikit-learn baselines (SVC, logistic regression) on the same split for the report
    # extra runs `kiln speedrun` trains beside the recipe's, on the same split, for the report's comparison
    compare: list[Literal["no-augment", "augment", "cnn", "vit"]] = field(default_factory=lambda: ["no-augment", "cnn"])


@dataclass
class EncoderConfig:
    mask_rate: float = ranged(0.15, gt=0, lt=1)  # share of tokens chosen as masked-LM targets
    mask_token: float = ranged(0.8, ge=0, le=1)  # of those: replaced by the mask token ...
    random_token: float = ranged(0.1, ge=0, le=1)  # ... or by a random token; the rest are left as they are
    export: bool = True  # write a Hugging Face (EuroBERT) directory to <out>/export/hf at the end

    def __post_init__(self) -> None:
        if self.mask_token + self.random_token > 1:
            raise ValueError(f"encoder.mask_token={self.mask_token} + encoder.random_token={self.random_token} exceeds 1; "
                             "the two shares split the chosen tokens: lower one of them")


@dataclass
class ClassifyConfig:
    input: str = "stdlib-order"  # stdlib-order, stdlib-packages (labelled from the stdlib; README, Encoders) or a JSONL path
    text_field: str = "text"  # JSONL: the text to classify
    label_field: str = "label"  # JSONL: its class name
    packages: list[str] = field(default_factory=lambda: [
        "asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml"])  # the stdlib tasks' sources
    max_per_class: int = ranged(0, ge=0)  # examples kept per class (0 = all)
    val_fraction: float = ranged(0.1, gt=0, lt=1)
    test_fraction: float = ranged(0.2, gt=0, lt=1)
    pooling: Literal["mean", "bos"] = "mean"  # how the head reads the sequence: mean of real tokens, or the first
    seed: int = ranged(0, ge=0)  # which examples fall in which split


@dataclass
class QuantizeConfig:
    """`kiln quantize`: weight-only INT8 / INT4 of a trained run (see README "Quantization")."""

    source: str = ""  # the float run (or checkpoint directory) to quantize; the result goes to `out`
    format: Literal["int8", "int4"] = "int8"  # int8: per output channel; int4: group-wise, two values per byte
    group_size: int = ranged(64, ge=1)  # int4: input columns sharing one scale and minimum (32, 64, 128 or 256)
    method: Literal["rtn", "gptq"] = "rtn"  # rtn: round to nearest; gptq: calibrated on the source's training shards
    calib_sequences: int = ranged(256, ge=1)  # gptq: training windows the projections are calibrated on
    calib_seq_len: int = ranged(0, ge=0)  # gptq: tokens per window; 0 = min(the model's context, 256)
    damp: float = ranged(0.01, gt=0, le=1)  # gptq: added to the inputs' second moment, × its mean diagonal
    eval_batches: int = ranged(16, ge=0)  # validation batches scored before and after, for the report (0 = none)


@dataclass
class DistillConfig:
    """`kiln distill`: train the student (`model.*`) on a frozen teacher (see README "Distillation")."""

    teacher: str = ""  # the teacher run (or checkpoint directory); same tokenizer as the data
    alpha: float = ranged(0.5, ge=0, le=1)  # loss = alpha · cross-entropy + (1 - alpha) · T² · divergence
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = ranged(0.5, gt=0, lt=1)  # jsd: the mixture's share of the teacher
    temperature: float = ranged(1.0, gt=0)  # both distributions are softened by it
    teacher_logits: Literal["online", "cached"] = "online"  # cached: top-k log-probabilities kept on disk per window
    top_k: int = ranged(64, ge=1)  # cached: teacher tokens kept per position
    cache_dir: str = ""  # cached: where; "" = <out>/teacher_cache (share one across students of a teacher)
    on_policy: float = ranged(0.0, ge=0, le=1)  # share of batches the student writes itself (from a prompt) and the teacher scores
    prompt_len: int = ranged(16, ge=1)  # on-policy: tokens of each training window kept as the prompt


@dataclass
class SpeedrunConfig:
    """`kiln speedrun` of a text recipe: after prepare, pretrain and samples, these post-training
    stages, each a run directory under `out` (see README "The main job")."""

    # sft: the default chat task; dpo: from the SFT model on the default pairs; rl: GRPO from the
    # DPO (else SFT) model on the docstring task; eval: the pretrained model's held-out figures and
    # code tasks; serve: latency and cost per query through the serving engine; quantize: INT8 and
    # INT4 (GPTQ) copies of the pretrained model; distill: it teaches a student a fifth its size.
    # quantize and distill add a table of every model's size, bits per byte, speed and cost.
    stages: list[Literal["sft", "dpo", "rl", "eval", "serve", "quantize", "distill"]] = field(
        default_factory=lambda: ["sft", "dpo", "rl", "eval", "serve", "quantize", "distill"])
    sft_steps: int = ranged(60, ge=1)
    dpo_steps: int = ranged(40, ge=1)
    dpo_pairs: int = ranged(1000, ge=20)  # default preference pairs drawn (a tenth held out)
    rl_steps: int = ranged(16, ge=1)
    distill_steps: int = ranged(200, ge=1)
    student: list[str] = field(  # the student's model.* overrides
        default_factory=lambda: ["preset=tiny", "d_model=128", "n_heads=4", "n_kv_heads=2"])


@dataclass
class Config:
    out: str = "runs/default"
    resume: str = "auto"  # auto (latest complete checkpoint in out, if any), never, or a checkpoint dir
    init_from: str = ""  # start a NEW run from another run's (or checkpoint's) weights; new optimizer, step 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    hf_import: HFImportConfig = field(default_factory=HFImportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    speedrun: SpeedrunConfig = field(default_factory=SpeedrunConfig)


# ---- building and checking -------------------------------------------------------------------
def _all_keys(cls, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        key = prefix + f.name
        out.append(key)
        if dataclasses.is_dataclass(typ):
            out.extend(_all_keys(typ, key + "."))
    return out


_HINT_SCOPE: list[str] = []  # the running verb's key prefixes, set by `load`


def _closest(key: str, keys: list[str]) -> list[str]:
    """The keys `key` most likely meant: a right leaf under a wrong section first (model.seed ->
    train.seed; a misspelt section, modle.preset, gets just its own), then the closest spelling,
    whole or by its last part (a bare `temprature` -> sample.temperature)."""
    leaf = key.rsplit(".", 1)[-1]
    similarity = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in keys if k.rsplit(".", 1)[-1] == leaf}
    section = key.split(".", 1)[0] + "."
    close = sorted(similarity, key=lambda k: (k.startswith(section), similarity[k]), reverse=True)[:3]
    if close and (similarity[close[0]] >= 0.8 or close[0].startswith(section)):
        close = close[:1]
    close = close or difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close and "." not in key:
        leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
        close = [leaves[m] for m in difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.75)]
    return close


def _unknown(key: str, root, value: Any = None) -> ConfigError:
    while isinstance(value, dict) and len(value) == 1:  # trian.max_steps=3: name the whole key
        ((sub, value),) = value.items()
        key = f"{key}.{sub}"
    keys = _all_keys(root)
    scoped = [k for k in keys if any(k == p or k.startswith(p + ".") for p in _HINT_SCOPE)]
    known_section = key.split(".", 1)[0] in {f.name for f in dataclasses.fields(root)}  # modle.x: a typo'd section
    leaf = key.rsplit(".", 1)[-1]
    if known_section and scoped and any(k.rsplit(".", 1)[-1] == leaf for k in scoped):
        keys = scoped
    # The running verb's own keys first (a bare `temprature=` under `kiln generate` means
    # sample.temperature, not rl.temperature), then every key.
    close = (_closest(key, scoped) if scoped and "." not in key else []) or _closest(key, keys)
    if close:
        hint = "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    else:
        hint = f"; valid top-level keys: {', '.join(f.name for f in dataclasses.fields(root))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _type_name(typ) -> str:
    if typing.get_origin(typ) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(typ))
    if typing.get_origin(typ) in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in typing.get_args(typ))
    if typing.get_origin(typ) is list:
        (item,) = typing.get_args(typ)
        return "a list" if item is Any else f"a list of {_type_name(item)}"
    return getattr(typ, "__name__", str(typ))


# Decimal SI suffixes users type for sizes and budgets: 64k, 1.5B, 2T (B and G are both 10⁹).
_SI = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_NUMBER = re.compile(r"([+-]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:e[+-]?\d+)?)([kmbgt]?)", re.IGNORECASE)
_NULL_WORDS = ("null", "none", "~", "")
_HINTS = {
    int: "write a whole number such as 1000, 64k or 2e6",
    float: "write a number such as 0.5, 3e-4 or 1.5B",
    bool: "write true or false",
    str: "write it as quoted text, e.g. 'text'",
}


def parse_number(text: str) -> Decimal | None:
    """The number `text` spells (`15e12`, `1_000`, `64k`, `1.5B`, `2T`), exactly, or None."""
    m = _NUMBER.fullmatch(text.strip())
    if not m:
        return None
    return Decimal(m.group(1).replace("_", "")) * _SI[m.group(2).lower()]


def _text_list(text: str) -> Any:
    """A list typed on the command line: `a,b`, `[a, b]` (YAML flow) or one item; "" is empty."""
    text = text.strip()
    if not text:
        return []
    if text[0] in "[{":
        try:
            value = _yaml(text)
        except yaml.YAMLError:
            return text
        return value if isinstance(value, list) else [value]
    return [part.strip() for part in text.split(",") if part.strip()]


def _coerce(key: str, value: Any, typ) -> Any:
    """`value` as the key's declared type `typ`, or a one-line ConfigError saying how to write it.

    Text (every command-line value, and strings in recipes) is read by the declared type, so a
    `str` key keeps exactly what was typed and a number key takes `64k` or `2T`; other values
    convert only without loss (int -> float, 3.0 -> 3).
    """
    origin = typing.get_origin(typ)

    def bad(hint: str | None = None) -> ConfigError:
        hint = hint or _HINTS.get(typ)
        return ConfigError(f"config key '{key}' = {value!r} is not {_type_name(typ)}" + (f"; {hint}" if hint else ""))

    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(typ))
        if nullable and (value is None or (str not in args and isinstance(value, str)
                                           and value.strip().lower() in _NULL_WORDS)):
            return None
        errors = []
        for a in args:
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else bad()
    if origin is Literal:
        choices = typing.get_args(typ)
        if value in choices:
            return value
        folded = [c for c in choices if isinstance(value, str) and isinstance(c, str) and c.lower() == value.lower()]
        if len(folded) == 1:
            return folded[0]
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        raise bad(f"did you mean {close[0]!r}?" if close else None)
    if origin is list:
        form = f"write {key}=a,b or {key}=[a, b]"
        if isinstance(value, str):
            value = _text_list(value)
        if not isinstance(value, list):
            raise bad(form)
        (item,) = typing.get_args(typ)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or typ is dict:
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = _yaml(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise bad(f"write {key}={{name: value}}")
        return value
    if typ is Any:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise bad()
    if typ is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        number = parse_number(value) if isinstance(value, str) else None
        if number is not None and number.adjusted() < 40 and number == number.to_integral_value():
            return int(number)
        raise bad()
    if typ is float:
        if isinstance(value, bool):
            raise bad()
        number = value if isinstance(value, (int, float)) else parse_number(value) if isinstance(value, str) else None
        if number is not None and math.isfinite(float(number)):
            return float(number)
        raise bad()
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    raise bad()


def build(cls, data: dict, root=None, prefix: str = ""):
    """Make a `cls` from nested dicts, checking every key and type."""
    root = root or cls
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields_by_name)
    kwargs = {}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise _unknown(key, root, v)
        typ = hints[k]
        if dataclasses.is_dataclass(typ):
            kwargs[k] = build(typ, v if v is not None else {}, root, key + ".")
        else:
            kwargs[k] = _coerce(key, v, typ)
            check_range(key, kwargs[k], fields_by_name[k].metadata.get("range", {}))
    try:
        return cls(**kwargs)
    except (ValueError, KilnError) as e:
        raise ConfigError(str(e)) from None


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value; write e.g. train.max_steps=100")
    key, raw = text.split("=", 1)
    # The text as typed: the key's declared type reads it (`_coerce`), so `prompt=# x` stays text.
    return key.strip(), raw


def read_recipe(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file '{path}' does not exist; pass -c with a YAML file, e.g. -c recipes/quickstart.yaml")
    try:
        data = _yaml(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"recipe file '{path}' is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


# Keys of a saved run config that describe one launch, not the run: where it is, how it starts,
# and the device and parallel layout (a run may continue on other hardware; checkpoints reshard).
LAUNCH_KEYS = ("out", "resume", "device", "parallel")


def run_config_path(out: str, resume: str) -> Path | None:
    """`out/config.yaml` when a launch continues the run there: the file exists and resume is not `never`."""
    path = Path(out) / "config.yaml"
    return path if resume != "never" and path.is_file() else None


def _merged(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(cls, recipe: str | Path | None = None, overrides: list[str] = (), shorthand: str | None = None,
         continue_run: bool = False, scope: tuple[str, ...] = ()):
    """Build `cls` from a recipe and `key=value` overrides.

    `shorthand` names a section whose keys may be given bare on the command line
    (`kiln generate prompt=...` means `sample.prompt=...`). With `continue_run` (training verbs),
    the settings saved in `out/config.yaml` (see `run_config_path`) come first, then the recipe,
    then the overrides: continuing a run needs only `out=`. `scope` lists the key prefixes the
    verb uses: typo hints suggest those keys first (`model.seed` → `train.seed`, not another
    verb's `classify.seed`).
    """
    _HINT_SCOPE[:] = list(scope)
    tree = read_recipe(recipe) if recipe else {}
    top = {f.name for f in dataclasses.fields(cls)}
    section_keys = set()
    if shorthand:
        section_keys = {f.name for f in dataclasses.fields(typing.get_type_hints(cls)[shorthand])}
    for item in overrides:
        key, value = parse_override(item)
        head = key.split(".", 1)[0]
        if head not in top and head in section_keys:
            key = f"{shorthand}.{key}"
        _set_dotted(tree, key, value)
    if continue_run:
        defaults = cls()
        saved = run_config_path(_coerce("out", tree.get("out", defaults.out), str),
                                _coerce("resume", tree.get("resume", defaults.resume), str))
        if saved:
            base = {k: v for k, v in read_recipe(saved).items() if k not in LAUNCH_KEYS}
            try:
                build(cls, base)
            except ConfigError as e:
                raise ConfigError(f"{saved} (the settings of the run being continued) does not load: {e}; "
                                  "continue that run with the command that made it, or choose a new out=") from None
            tree = _merged(base, tree)
    return build(cls, tree)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def describe(cls, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, type, default) for every leaf option, for `--help`."""
    rows = []
    inst = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            rows.extend(describe(typ, prefix + f.name + "."))
        else:
            rows.append((prefix + f.name, _type_name(typ), getattr(inst, f.name)))
    return rows
