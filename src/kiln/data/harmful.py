"""Harmful-content filters: URL/domain blocklist, word/phrase blocklist (Aho-Corasick), a classifier-score hook."""

from __future__ import annotations

import importlib
from pathlib import Path
from urllib.parse import urlsplit

from kiln.data.document import Document, Stage
from kiln.errors import KilnError

LISTS = Path(__file__).parent / "lists"


def read_list(path: str | Path) -> list[str]:
    """Non-empty, non-comment lines of a list file, lowercased."""
    p = Path(path)
    if not p.is_file():
        raise KilnError(f"blocklist '{p}' does not exist; give a text file with one entry per line")
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            out.append(line)
    return out


class UrlBlocklist(Stage):
    """Drop documents whose URL's host is, or is under, a listed domain (documents without a URL pass)."""

    name = "url_blocklist"

    def __init__(self, path: str = "") -> None:
        self.domains = frozenset(read_list(path or LISTS / "domains.txt"))

    def process(self, doc: Document) -> Document | str:
        url = doc.meta.get("url")
        if not url:
            return doc
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        parts = host.split(".")
        if any(".".join(parts[i:]) in self.domains for i in range(len(parts))):
            return "blocked_domain"
        return doc


class WordBlocklist(Stage):
    """Drop documents with more than `max_matches` listed words or phrases (whole-word, case-insensitive)."""

    name = "word_blocklist"

    def __init__(self, path: str = "", max_matches: int = 0) -> None:
        import ahocorasick

        self.max_matches = max_matches
        self.automaton = ahocorasick.Automaton()
        for w in read_list(path or LISTS / "words.txt"):
            self.automaton.add_word(w, len(w))
        self.empty = len(self.automaton) == 0
        if not self.empty:
            self.automaton.make_automaton()

    def process(self, doc: Document) -> Document | str:
        if self.empty:
            return doc
        text = doc.text.lower()
        n = 0
        for end, length in self.automaton.iter(text):
            start = end - length + 1
            if (start == 0 or not text[start - 1].isalnum()) and (end + 1 == len(text) or not text[end + 1].isalnum()):
                n += 1
                if n > self.max_matches:
                    return "blocked_words"
        return doc


class ClassifierScore(Stage):
    """Score each document with a user function `module:function(text) -> float` (e.g. a toxicity or
    quality classifier) and drop it outside [min_score, max_score]; the score is kept in meta."""

    name = "classifier"

    def __init__(self, function: str = "", min_score: float = float("-inf"), max_score: float = float("inf"),
                 field: str = "score") -> None:
        if ":" not in function:
            raise ValueError("classifier needs function: 'module:function' taking text and returning a float")
        module, name = function.split(":", 1)
        try:
            self.fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"classifier function '{function}' cannot be imported ({e})") from None
        self.min_score, self.max_score, self.field = min_score, max_score, field

    def process(self, doc: Document) -> Document | str:
        score = float(self.fn(doc.text))
        doc.meta[self.field] = score
        if score < self.min_score:
            return "classifier_low"
        if score > self.max_score:
            return "classifier_high"
        return doc
