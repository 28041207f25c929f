"""Typed configs: dataclasses loaded from YAML recipes, `key.sub=value` overrides, strict checks.

Every verb's options live in one dataclass tree. `load(Root, recipe, overrides)` merges a YAML
recipe with command-line overrides and builds the tree, failing with one line on an unknown key
(naming the closest valid one), a value of the wrong type (naming key, value, type and how to
write it) or a number out of its declared range. Command-line values are text read by the key's
type: a `str` key keeps what was typed, numbers take `64k` / `1.5B` / `2T`, lists take `a,b`.

The package: this module is the machinery (reading recipes, overrides, type and range checks,
`dump_yaml`, `describe`) and the root `Config`; its sections are declared, with `schema.ranged`,
in modules by area: `data` (data.*), `train` (model.*, train.*, parallel.*), `tuning` (sft.*,
lora.*, preference.*, dpo.*, rl.*, distill.*, speedrun.*), `encoders` (vision.*, encoder.*,
classify.*), `serve` (sample.*, serve.*, label.*) and `post` (eval.*, export.*, hf_import.*,
quantize.*). Every name is re-exported here: import from `kiln.config`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import math
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml

from kiln.config.data import DataConfig, ExecutorConfig, ImageDataConfig, ReaderConfig, TokenizerConfig
from kiln.config.encoders import AugmentConfig, ClassifyConfig, EncoderConfig, VisionConfig
from kiln.config.post import EvalConfig, ExportConfig, HFImportConfig, QuantizeConfig
from kiln.config.schema import ranged
from kiln.config.serve import LabelConfig, SampleConfig, ServeConfig
from kiln.config.train import MODEL_RANGES, ModelSection, ParallelConfig, TrainConfig, model_section
from kiln.config.tuning import (
    LORA_TARGETS,
    DistillConfig,
    DPOConfig,
    LoRAConfig,
    PreferenceConfig,
    RLConfig,
    SandboxConfig,
    ScaleConfig,
    SFTConfig,
    SpeedrunConfig,
)
from kiln.errors import KilnError

__all__ = [
    # the machinery
    "ConfigError", "ranged", "check_range", "parse_number", "build", "parse_override", "read_recipe",
    "LAUNCH_KEYS", "run_config_path", "load", "to_dict", "dump_yaml", "describe",
    # the root, then its sections by the module declaring them
    "Config",
    "DataConfig", "ReaderConfig", "ExecutorConfig", "TokenizerConfig", "ImageDataConfig",  # data
    "MODEL_RANGES", "model_section", "ModelSection", "TrainConfig", "ParallelConfig",  # train
    "SFTConfig", "LORA_TARGETS", "LoRAConfig", "PreferenceConfig", "DPOConfig",  # tuning
    "SandboxConfig", "RLConfig", "DistillConfig", "SpeedrunConfig", "ScaleConfig",
    "AugmentConfig", "VisionConfig", "EncoderConfig", "ClassifyConfig",  # encoders
    "SampleConfig", "ServeConfig", "LabelConfig",  # serve
    "EvalConfig", "ExportConfig", "HFImportConfig", "QuantizeConfig",  # post
]


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


# ---- ranges (declared with `ranged`) ---------------------------------------------------------
_RANGE_TEXT = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
_RANGE_TEST = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def check_range(key: str, value, bounds: dict) -> None:
    if isinstance(value, (list, tuple)):  # a list key's bounds hold for each of its numbers
        for item in value:
            check_range(key, item, bounds)
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not bounds:
        return
    failed = [k for k, b in bounds.items() if not _RANGE_TEST[k](value, b)]
    if failed:
        want = " and ".join(f"{_RANGE_TEXT[k]} {bounds[k]:g}" for k in bounds)
        raise ConfigError(f"config key '{key}' = {value!r} is out of range: it must be {want}")


# ---- the root: every verb's sections -----------------------------------------------------------
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
    scale: ScaleConfig = field(default_factory=ScaleConfig)


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
    """`out/config.yaml` when a launch continues the run there: the file exists, the run holds a
    checkpoint (a directory with none is not a run to continue: its settings, e.g. those of a
    launch that failed on a typo, are not taken over) and resume is not `never`."""
    path = Path(out) / "config.yaml"
    trained = any((Path(out) / "checkpoints").glob("step_*/checkpoint.json"))
    return path if resume != "never" and trained and path.is_file() else None


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


def notes(cls, prefix: str = "") -> dict[str, str]:
    """What the source says of each leaf option (key -> text), for `--help`: the comments on its
    line(s), after the comment lines just above it (a blank line or code ends those)."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    said = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(notes(hints[f.name], prefix + f.name + "."))
        elif said.get(f.name):
            out[prefix + f.name] = said[f.name]
    return out


@functools.cache
def _field_comments(cls) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # made at run time (model sections): no source to read
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, row = [], node.lineno - 1
            while row >= 1 and lines[row - 1].lstrip().startswith("#") and row in comments:
                above.insert(0, comments[row])
                row -= 1
            on = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]  # a field over lines too
            out[node.target.id] = " ".join(above + on)
    return out
