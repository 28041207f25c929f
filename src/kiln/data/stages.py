"""The stage registry: cleaning and length stages, presets, and building a recipe's `data.stages` list."""

from __future__ import annotations

import difflib
import inspect
import re
import unicodedata

from kiln.config import DataConfig
from kiln.data.dedup import Decontaminate, ExactDedup, MinhashDedup
from kiln.data.document import Document, Stage
from kiln.data.extract import ExtractHtml
from kiln.data.filters import C4Lines, CodeQuality, FineWebQuality, GopherQuality, GopherRepetition, LanguageFilter
from kiln.data.harmful import ClassifierScore, UrlBlocklist, WordBlocklist
from kiln.data.pii import ScrubPII
from kiln.errors import KilnError

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff\ufffe]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")
_SPACES = re.compile(r"[ \t\u00a0]{2,}")
# Characters typical of UTF-8 text decoded as Latin-1/cp1252: only such documents go through ftfy.
_MOJIBAKE = re.compile("[ÃÂâ][\u0080-\u00bf\u2018-\u201e\u2020-\u2122]")


class Clean(Stage):
    """Unicode NFC, line endings, control and zero-width characters, trailing spaces, runs of blank lines,
    and mojibake repair with ftfy (only for documents that look garbled, so it stays cheap)."""

    name = "clean"

    def __init__(self, form: str = "NFC", ftfy: bool = True, max_blank_lines: int = 2,
                 collapse_spaces: bool = False) -> None:
        if form not in ("NFC", "NFKC", "none"):
            raise ValueError(f"form must be NFC, NFKC or none, not {form!r}")
        self.form, self.ftfy, self.max_blank_lines, self.collapse_spaces = form, ftfy, max_blank_lines, collapse_spaces
        self._blank = "\n" * (max_blank_lines + 1)

    def process(self, doc: Document) -> Document | str:
        text = doc.text.replace("\r\n", "\n").replace("\r", "\n")
        if self.ftfy and _MOJIBAKE.search(text):
            import ftfy

            fixed = ftfy.fix_text(text, normalization="NFC", unescape_html=False)
            if fixed != text:
                doc.meta["ftfy"] = True
                text = fixed
        if self.form != "none" and not text.isascii():
            text = unicodedata.normalize(self.form, text)
        text = _CONTROL.sub("", text)
        text = _TRAILING.sub("\n", text)
        if self.collapse_spaces:
            text = _SPACES.sub(" ", text)
        if self.max_blank_lines >= 0:
            text = _BLANKS.sub(self._blank, text) if self.max_blank_lines >= 1 else re.sub(r"\n{2,}", "\n", text)
        text = text.strip("\n")
        if not text.strip():
            return "empty_after_clean"
        doc.text = text + "\n"
        return doc


class LengthFilter(Stage):
    """Drop documents shorter than `min_chars` or longer than `max_chars` (defaults: data.min_chars / max_chars)."""

    name = "length"

    def __init__(self, min_chars: int = 64, max_chars: int = 2_000_000) -> None:
        self.min_chars, self.max_chars = min_chars, max_chars

    def process(self, doc: Document) -> Document | str:
        n = len(doc.text)
        if n < self.min_chars:
            return "too_short"
        if n > self.max_chars:
            return "too_long"
        return doc


STAGES: dict[str, type[Stage]] = {
    cls.name: cls
    for cls in (ExtractHtml, Clean, LengthFilter, LanguageFilter, UrlBlocklist, GopherRepetition, GopherQuality,
                C4Lines, FineWebQuality, CodeQuality, WordBlocklist, ClassifierScore, Decontaminate, ExactDedup,
                MinhashDedup, ScrubPII)
}

PRESETS: dict[str, list] = {
    # Source code: keep files whole (no prose rules), drop generated/data files, dedup, scrub secrets and emails.
    "code": ["clean", "length", "code_quality", "exact_dedup", "minhash_dedup",
             {"pii": {"ips": False, "phones": False}}],
    # Web / prose, in FineWeb's order.
    "web": [{"clean": {"max_blank_lines": 1}}, "url_blocklist", "length", "language", "gopher_repetition",
            "gopher_quality", "c4_lines", "fineweb_quality", "word_blocklist", "exact_dedup", "minhash_dedup", "pii"],
    "minimal": ["clean", "length", "exact_dedup"],
}
CODE_SUFFIXES = (".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".rb",
                 ".sh", ".lua", ".kt", ".swift", ".scala", ".cs", ".php", ".m", ".jl", ".r", ".sql", ".toml", ".yaml")


def preset_for(data: DataConfig, files: list) -> str:
    """`data.preset`, or for `auto`: `code` when every input file is source code (the stdlib), else `web`."""
    if data.preset != "auto":
        return data.preset
    return "code" if files and all(str(f).lower().endswith(CODE_SUFFIXES) for f in files) else "web"


def _check_option(stage: str, key: str, value, default):
    where = f"data.stages: {stage}.{key} = {value!r}"
    if default is None or isinstance(default, list):
        if value is not None and not isinstance(value, list) and isinstance(default, list):
            raise KilnError(f"{where} must be a list")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise KilnError(f"{where} must be true or false")
        return value
    if isinstance(default, int) and not isinstance(value, bool) and isinstance(value, int):
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, str) and isinstance(value, str):
        return value
    raise KilnError(f"{where} must be {type(default).__name__}")


DEDUP_STAGES = ("exact_dedup", "minhash_dedup")


def stage_entries(data: DataConfig, files: list, html: bool = False) -> list[tuple[str, dict]]:
    """(name, options) for each stage the recipe asks for: `data.stages`, else the preset's list;
    `extract` goes first when the input may hold HTML (`html`) and the list does not place it."""
    raw = data.stages or PRESETS[preset_for(data, files)]
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            name, opts = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, opts = next(iter(item.items()))
            opts = opts or {}
            if not isinstance(opts, dict):
                raise KilnError(f"data.stages[{i}]: options of '{name}' must be a mapping, got {opts!r}")
        else:
            raise KilnError(f"data.stages[{i}] = {item!r}: write a stage name or {{name: {{option: value}}}}")
        if name not in STAGES:
            close = difflib.get_close_matches(str(name), STAGES, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise KilnError(f"data.stages[{i}]: unknown stage '{name}'; {hint}known stages: {', '.join(STAGES)}")
        out.append((name, dict(opts)))
    if html and "extract" not in [n for n, _ in out]:
        out.insert(0, ("extract", {"extractor": data.reader.extractor, "timeout_s": data.reader.extract_timeout_s}))
    return out


def build_stage(name: str, opts: dict, data: DataConfig) -> Stage:
    cls = STAGES[name]
    params = inspect.signature(cls.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self"}
    if name == "length":
        defaults = {"min_chars": data.min_chars, "max_chars": data.max_chars}
    kwargs = dict(defaults)
    for k, v in opts.items():
        if k not in defaults:
            close = difflib.get_close_matches(k, defaults, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise KilnError(f"data.stages: unknown option '{k}' for stage '{name}'; {hint}"
                            f"options: {', '.join(defaults) or 'none'}")
        kwargs[k] = _check_option(name, k, v, defaults[k])
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise KilnError(f"data.stages: stage '{name}': {e}") from None


def split_at_dedup(stages: list[Stage]) -> tuple[list[Stage], list[Stage], list[Stage]]:
    """(stages before the dedup steps, the dedup steps, stages after); dedup steps must be adjacent."""
    marks = [i for i, s in enumerate(stages) if getattr(s, "global_step", False)]
    if not marks:
        return stages, [], []
    if marks != list(range(marks[0], marks[-1] + 1)):
        raise KilnError("data.stages: exact_dedup and minhash_dedup must be next to each other (they run as one "
                        "global step); move the stages between them before or after")
    if len({stages[i].name for i in marks}) != len(marks):
        raise KilnError("data.stages: each dedup stage may appear once")
    return stages[: marks[0]], [stages[i] for i in marks], stages[marks[-1] + 1 :]
