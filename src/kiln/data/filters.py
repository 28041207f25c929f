"""Quality filters with the published thresholds as defaults: Gopher, C4, FineWeb, code, language.

Prose rules (Gopher quality and repetition, C4 lines, FineWeb) follow the papers and
datatrove's implementations: Rae et al. 2021 (MassiveText, Table A1), Raffel et al. 2020 (C4),
Penedo et al. 2024 (FineWeb). The code rules follow The Stack / StarCoder / RedPajama's
cleaning of source files. Every threshold is a stage option.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from kiln.data.document import Document, Stage

_WORD = re.compile(r"\w+", re.UNICODE)
_ALPHA = re.compile(r"[^\W\d_]", re.UNICODE)
STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "·")
END_PUNCT = (".", "!", "?", '"', "'", "”", "’", "…")
ELLIPSES = ("...", "…")


def words_of(text: str) -> list[str]:
    return text.split()


class GopherQuality(Stage):
    """MassiveText quality rules: word count and length, symbols, bullets, ellipses, alphabetic words, stop words."""

    name = "gopher_quality"

    def __init__(self, min_doc_words: int = 50, max_doc_words: int = 100_000, min_avg_word_length: float = 3.0,
                 max_avg_word_length: float = 10.0, max_symbol_word_ratio: float = 0.1,
                 max_bullet_lines_ratio: float = 0.9, max_ellipsis_lines_ratio: float = 0.3,
                 max_non_alpha_words_ratio: float = 0.8, min_stop_words: int = 2) -> None:
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})

    def process(self, doc: Document) -> Document | str:
        words = words_of(doc.text)
        n = len(words)
        if n < self.min_doc_words:
            return "gopher_too_few_words"
        if n > self.max_doc_words:
            return "gopher_too_many_words"
        avg = sum(map(len, words)) / n
        if avg < self.min_avg_word_length:
            return "gopher_short_words"
        if avg > self.max_avg_word_length:
            return "gopher_long_words"
        symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("…")
        if symbols / n > self.max_symbol_word_ratio:
            return "gopher_symbols"
        lines = [ln for ln in doc.text.splitlines() if ln.strip()]
        if lines:
            if sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines) > self.max_bullet_lines_ratio:
                return "gopher_bullet_lines"
            if sum(ln.rstrip().endswith(ELLIPSES) for ln in lines) / len(lines) > self.max_ellipsis_lines_ratio:
                return "gopher_ellipsis_lines"
        if sum(1 for w in words if _ALPHA.search(w)) / n < self.max_non_alpha_words_ratio:
            return "gopher_non_alpha_words"
        if sum(1 for w in words if w.lower() in STOP_WORDS) < self.min_stop_words:
            return "gopher_stop_words"
        return doc


def _dup_stats(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, characters in them)."""
    seen: set[str] = set()
    n = chars = 0
    for it in items:
        if it in seen:
            n += 1
            chars += len(it)
        else:
            seen.add(it)
    return n, chars


class GopherRepetition(Stage):
    """MassiveText repetition rules: duplicate lines / paragraphs, top n-gram share, duplicate n-gram share."""

    name = "gopher_repetition"

    def __init__(self, dup_line_frac: float = 0.3, dup_para_frac: float = 0.3, dup_line_char_frac: float = 0.2,
                 dup_para_char_frac: float = 0.2, top_n_grams: list | None = None,
                 dup_n_grams: list | None = None) -> None:
        self.dup_line_frac, self.dup_para_frac = dup_line_frac, dup_para_frac
        self.dup_line_char_frac, self.dup_para_char_frac = dup_line_char_frac, dup_para_char_frac
        self.top_n_grams = top_n_grams if top_n_grams is not None else [[2, 0.2], [3, 0.18], [4, 0.16]]
        self.dup_n_grams = dup_n_grams if dup_n_grams is not None else [
            [5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11], [10, 0.10]]

    def process(self, doc: Document) -> Document | str:
        text = doc.text
        paras = [p for p in re.split(r"\n{2,}", text.strip()) if p.strip()]
        n, chars = _dup_stats(paras)
        if paras and n / len(paras) > self.dup_para_frac:
            return "gopher_dup_paragraphs"
        if chars / max(len(text), 1) > self.dup_para_char_frac:
            return "gopher_dup_paragraph_chars"
        lines = [ln for ln in text.split("\n") if ln.strip()]
        n, chars = _dup_stats(lines)
        if lines and n / len(lines) > self.dup_line_frac:
            return "gopher_dup_lines"
        if chars / max(len(text), 1) > self.dup_line_char_frac:
            return "gopher_dup_line_chars"
        words = _WORD.findall(text.lower())
        total = sum(map(len, words)) or 1
        for n_, frac in self.top_n_grams:
            grams = [" ".join(words[i : i + n_]) for i in range(len(words) - n_ + 1)]
            if grams:
                top, count = Counter(grams).most_common(1)[0]
                if count > 1 and len(top) * count / total > frac:
                    return f"gopher_top_{n_}_gram"
        for n_, frac in self.dup_n_grams:
            if _dup_ngram_chars(words, n_) / total > frac:
                return f"gopher_dup_{n_}_grams"
        return doc


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the words covered by n-grams that occur more than once (each word counted once)."""
    seen: dict[tuple, int] = {}
    covered = bytearray(len(words))
    for i in range(len(words) - n + 1):
        g = tuple(words[i : i + n])
        if g in seen:
            covered[seen[g] : seen[g] + n] = b"\x01" * n
            covered[i : i + n] = b"\x01" * n
        else:
            seen[g] = i
    return sum(len(w) for w, c in zip(words, covered) if c)


_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.I)
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4Lines(Stage):
    """C4's line rules: keep lines that end in punctuation and have ≥ 3 words; drop boilerplate lines
    (javascript, cookie/privacy policy); drop pages with lorem ipsum, a curly bracket, or < 5 sentences."""

    name = "c4_lines"

    def __init__(self, min_words_per_line: int = 3, min_sentences: int = 5, max_word_length: int = 1000,
                 filter_no_terminal_punct: bool = True, remove_citations: bool = True, filter_javascript: bool = True,
                 filter_policy: bool = True, filter_lorem_ipsum: bool = True, filter_curly_bracket: bool = True) -> None:
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})

    def process(self, doc: Document) -> Document | str:
        low = doc.text.lower()
        if self.filter_lorem_ipsum and "lorem ipsum" in low:
            return "c4_lorem_ipsum"
        if self.filter_curly_bracket and "{" in doc.text:
            return "c4_curly_bracket"
        kept, sentences = [], 0
        for line in doc.text.split("\n"):
            line = line.strip()
            if self.remove_citations:
                line = _CITATION.sub("", line)
            words = line.split()
            if len(words) < self.min_words_per_line:
                continue
            if any(len(w) > self.max_word_length for w in words):
                continue
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCT) or line.endswith("...")):
                continue
            ll = line.lower()
            if self.filter_javascript and "javascript" in ll:
                continue
            if self.filter_policy and any(p in ll for p in POLICY_PHRASES):
                continue
            kept.append(line)
            sentences += len(re.findall(r"[.!?]+(?:\s|$)", line)) or 1
        if not kept:
            return "c4_no_lines"
        if sentences < self.min_sentences:
            return "c4_too_few_sentences"
        doc.text = "\n".join(kept) + "\n"
        return doc


class FineWebQuality(Stage):
    """FineWeb's extra rules: share of lines ending in punctuation, of short lines, of duplicated-line
    characters, and of newlines per word (lists)."""

    name = "fineweb_quality"

    def __init__(self, line_punct_thr: float = 0.12, line_punct_exclude_zero: bool = False,
                 short_line_thr: float = 0.67, short_line_length: int = 30, char_duplicates_ratio: float = 0.01,
                 new_line_ratio: float = 0.3) -> None:
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})

    def process(self, doc: Document) -> Document | str:
        lines = [ln for ln in doc.text.split("\n") if ln.strip()]
        if not lines:
            return "fineweb_empty"
        ratio = sum(ln.rstrip().endswith(END_PUNCT) for ln in lines) / len(lines)
        if ratio <= self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return "fineweb_line_punct"
        if sum(len(ln) <= self.short_line_length for ln in lines) / len(lines) >= self.short_line_thr:
            return "fineweb_short_lines"
        _, dup_chars = _dup_stats(lines)
        if dup_chars / max(len(doc.text.replace("\n", "")), 1) >= self.char_duplicates_ratio:
            return "fineweb_char_dup"
        if doc.text.count("\n") / max(len(doc.text.split()), 1) > self.new_line_ratio:
            return "fineweb_list"
        return doc


AUTOGEN_MARKERS = ("auto-generated", "autogenerated", "automatically generated", "generated by", "do not edit",
                   "code generated")
_B64 = np.zeros(256, dtype=bool)  # bytes of base64 / hex blobs
_NUMLIT = np.zeros(256, dtype=bool)  # bytes of numeric or escaped data literals: 0x1f, 255, \x00
_ALNUM = np.zeros(256, dtype=bool)
for _c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789":
    _B64[_c] = _ALNUM[_c] = True
for _c in b"+/=":
    _B64[_c] = True
for _c in b"0123456789abcdefABCDEFxX,;\\ \t\n":
    _NUMLIT[_c] = True
_ALNUM[128:] = True  # letters of other scripts (UTF-8 bytes): counted as alphanumeric


def _long_runs(mask: np.ndarray, min_len: int) -> int:
    """Number of bytes in runs of True at least `min_len` long."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    lengths = edges[1::2] - edges[::2]
    return int(lengths[lengths >= min_len].sum())


class CodeQuality(Stage):
    """Source-file rules (The Stack / StarCoder): auto-generated headers, very long lines, a low share
    of alphanumeric characters, and files that are mostly encoded data literals."""

    name = "code_quality"

    def __init__(self, max_line_length: int = 1000, max_avg_line_length: float = 100.0, min_alnum_ratio: float = 0.25,
                 max_encoded_data_ratio: float = 0.5, autogen_header_lines: int = 5) -> None:
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})

    def process(self, doc: Document) -> Document | str:
        text = doc.text
        lines = text.split("\n")
        head = "\n".join(lines[: self.autogen_header_lines]).lower()
        if any(m in head for m in AUTOGEN_MARKERS):
            return "code_autogenerated"
        if max(map(len, lines)) > self.max_line_length:
            return "code_long_line"
        if len(text) / max(len(lines), 1) > self.max_avg_line_length:
            return "code_long_avg_line"
        b = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
        if _ALNUM[b].sum() / max(len(b), 1) < self.min_alnum_ratio:
            return "code_low_alnum"
        encoded = max(_long_runs(_B64[b], 64), _long_runs(_NUMLIT[b], 128))
        if encoded / max(len(b), 1) > self.max_encoded_data_ratio:
            return "code_encoded_data"
        return doc


class LanguageFilter(Stage):
    """Keep documents in `languages`, identified offline by resiliparse's `detect_fast` (a trigram
    profile model shipped in the package). Its score is an out-of-place distance: lower is surer.

    On a sentence or two the profiles are unreliable (a short English line can come out as `pt`),
    so documents shorter than `min_chars` pass unjudged. The language and score of every judged
    document go into its metadata (exclusions.jsonl, metadata.jsonl) to tune `max_score` by.
    """

    name = "language"

    def __init__(self, languages: list | None = None, max_score: int = 1200, min_chars: int = 200) -> None:
        if min_chars < 0:
            raise ValueError(f"min_chars must be ≥ 0, not {min_chars}")
        self.languages = set(languages if languages is not None else ["en"])
        self.max_score, self.min_chars = max_score, min_chars

    def process(self, doc: Document) -> Document | str:
        if len(doc.text) < self.min_chars:
            return doc
        from resiliparse.parse.lang import detect_fast

        lang, score = detect_fast(doc.text[:20_000])
        doc.meta["language"], doc.meta["language_score"] = lang, score
        if lang not in self.languages:
            return f"language_{lang}"
        if score > self.max_score:
            return "language_unsure"
        return doc
