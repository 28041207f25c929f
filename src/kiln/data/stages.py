"""Basic document stages: text normalization, length limits and exact deduplication."""

from __future__ import annotations

import hashlib
import unicodedata

from kiln.data.document import Document, Stage


class Normalize(Stage):
    """NFC-normalize, unify line endings, strip trailing whitespace at the ends of the text."""

    name = "normalize"

    def process(self, doc: Document) -> Document:
        text = unicodedata.normalize("NFC", doc.text.replace("\r\n", "\n").replace("\r", "\n")).strip("\n")
        doc.text = text + "\n" if text else ""
        return doc


class LengthFilter(Stage):
    name = "length"

    def __init__(self, min_chars: int, max_chars: int) -> None:
        self.min_chars, self.max_chars = min_chars, max_chars

    def process(self, doc: Document) -> Document | str:
        n = len(doc.text)
        if n < self.min_chars:
            return "too_short"
        if n > self.max_chars:
            return "too_long"
        return doc


class ExactDedup(Stage):
    """Keep the first document of each exact text (hash of the whitespace-normalized text)."""

    name = "exact_dedup"

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def process(self, doc: Document) -> Document | str:
        key = hashlib.blake2b(" ".join(doc.text.split()).encode(), digest_size=16).digest()
        if key in self.seen:
            return "exact_duplicate"
        self.seen.add(key)
        return doc
