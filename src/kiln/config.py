"""Typed configs: dataclasses loaded from YAML recipes, `key.sub=value` overrides, strict checks.

Every verb's options live in one dataclass tree. `load(Root, recipe, overrides)` merges a YAML
recipe with command-line overrides and builds the tree, failing with one line on an unknown key
(naming the closest valid one) or a value of the wrong type (naming key, value and type).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
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
    extract_timeout_s: float = 5.0  # per-document time limit for the HTML extractor
    max_record_bytes: int = 16_000_000  # skip a record (file, line, row, WARC record) larger than this
    task_bytes: int = 64_000_000  # split JSONL / text-line inputs larger than this into byte-range tasks


@dataclass
class ExecutorConfig:
    kind: Literal["local", "ray"] = "local"
    workers: int = 0  # worker processes (local) or concurrent tasks (ray); 0 = the CPU count
    ray_address: str = ""  # "" = start a local Ray instance; "auto" or host:port = join a cluster


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192  # byte-level BPE vocabulary, special tokens included
    path: str = ""  # an existing tokenizer.json to use instead of training one
    train_bytes: int = 0  # train on at most this many bytes of text (0 = all)


@dataclass
class DataConfig:
    input: str = "stdlib"  # "stdlib" (this interpreter's standard library), a path, a directory or a glob
    path: str = ""  # prepared data directory pretrain reads; "" = <out>/data
    val_fraction: float = 0.02  # share of documents held out for validation (split by document id)
    max_docs: int = 0  # keep at most this many documents after every stage (0 = all)
    min_chars: int = 64  # the `length` stage: drop documents shorter than this
    max_chars: int = 2_000_000  # the `length` stage: drop documents longer than this
    preset: Literal["auto", "code", "web", "minimal"] = "auto"  # stages used when `stages` is empty (auto: by input)
    stages: list[Any] = field(default_factory=list)  # [name | {name: {option: value}}]; see README "Data pipeline"
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    strict: bool = False  # stop at the first bad record instead of skipping and counting it
    exclusions: bool = False  # write every dropped document's id and reason to <data>/exclusions.jsonl
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shard_tokens: int = 50_000_000  # tokens per shard file
    seed: int = 0  # shuffles document order across the corpus


def model_section(default_preset: str):
    """The `model.*` keys: a preset plus every `ModelConfig` field as an optional override.

    Generated from `kiln.model.config.ModelConfig`, so a new model field is a recipe key at once,
    with no second copy of the schema (pretrain and `kiln plan` differ only in the default preset).
    """
    hints = typing.get_type_hints(ModelConfig)
    cls = dataclasses.make_dataclass(
        "ModelSection",
        [("preset", str, field(default=default_preset))]
        + [(f.name, hints[f.name] | None, field(default=None)) for f in dataclasses.fields(ModelConfig)],
        namespace={
            "overrides": lambda self: {k: v for k, v in dataclasses.asdict(self).items()
                                       if k != "preset" and v is not None},
            "build": _build_model,
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
    max_steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch per data-parallel rank
    seq_len: int = 256
    tokens_per_step: int = 0  # global tokens per optimizer step; 0 = one micro-batch per rank
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr as a share of lr
    warmup_steps: int = 100
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2  # share of steps spent decaying, for schedule=wsd
    weight_decay: float = 0.1  # applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    seed: int = 0
    ckpt_every: int = 100
    keep_last: int = 3  # complete checkpoints kept on disk
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 elsewhere
    compile: Literal["auto", "on", "off"] = "auto"  # auto = on for CUDA, off on CPU
    activation_checkpointing: bool = False
    spike_factor: float = 4.0  # skip a step whose loss exceeds this multiple of the recent mean
    spike_window: int = 50
    max_bad_steps: int = 5  # stop after this many skipped steps in a row
    tensorboard: bool = True
    progress: bool = True


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # DDP degree
    dp_shard: int = -1  # FSDP2 degree; -1 = whatever the world size leaves over
    tp: int = 1
    pp: int = 1
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    pp_microbatches: int = 0  # 0 = 2 × pp
    timeout_s: float = 300.0  # a collective waiting this long means a peer died


@dataclass
class SampleConfig:
    prompt: str = "def "
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    num_samples: int = 1
    report_prompts: list[str] = field(
        default_factory=lambda: ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self"]
    )


@dataclass
class Config:
    out: str = "runs/default"
    resume: str = "auto"  # auto (latest complete checkpoint in out, if any), never, or a checkpoint dir
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


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


def _unknown(key: str, root) -> ConfigError:
    keys = _all_keys(root)
    leaf = key.rsplit(".", 1)[-1]
    # A right leaf under a wrong section first (model.seed -> train.seed), then the closest spelling.
    close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != key][:3]
    close = close or difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
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
    return getattr(typ, "__name__", str(typ))


def _coerce(key: str, value: Any, typ) -> Any:
    """Check `value` against `typ`, allowing only lossless conversions (int -> float, "1e6" -> float)."""
    origin = typing.get_origin(typ)
    bad = ConfigError(f"config key '{key}' = {value!r} is not {_type_name(typ)}")
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(typ):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(typ)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    if typ is Any:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


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
            raise _unknown(key, root)
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
    key = key.strip()
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads "1e6" as a string; keep strings, the schema coerces numbers.
    return key, value


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


def load(cls, recipe: str | Path | None = None, overrides: list[str] = (), shorthand: str | None = None):
    """Build `cls` from a recipe and `key=value` overrides.

    `shorthand` names a section whose keys may be given bare on the command line
    (`kiln generate prompt=...` means `sample.prompt=...`).
    """
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
