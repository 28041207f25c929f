"""Documents and the stage interface: every data step is a generator over a stream of documents."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from kiln.errors import KilnError


@dataclass
class Document:
    text: str
    id: str
    meta: dict = field(default_factory=dict)  # source, path, url, ... and what stages measure (language, score, pii_*)


def doc_record(doc: Document) -> dict:
    """What a user reads about a document after the run: where it came from (url, path, encoding) and
    what stages measured (language and its score, a classifier score, PII counts)."""
    return {k: v for k, v in doc.meta.items() if k != "html"}


@dataclass
class StageStats:
    """Counts for one stage: documents in and out, bytes in and out, drops by reason, seconds.

    `excluded`, when a list, collects a record of every drop (`data.exclusions`): the document's
    id, this stage, the reason, and what `doc_record` keeps of it (its URL, source file, and what
    earlier stages measured, such as the language score that made this stage drop it).
    """

    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    dropped: Counter = field(default_factory=Counter)
    excluded: list | None = None

    def drop(self, doc_id: str, reason: str, record: dict | None = None, n: int = 1) -> None:
        """Count `n` documents dropped for `reason` (n > 1: a whole unreadable file or column at once)."""
        self.dropped[reason] += n
        if self.excluded is not None:
            self.excluded.append({"id": doc_id, "stage": self.name, "reason": reason, **(record or {}),
                                  **({"docs": n} if n != 1 else {})})

    def merge(self, other: dict) -> None:
        """Add the counts of another task's `to_dict()` for the same stage."""
        for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "seconds"):
            setattr(self, k, getattr(self, k) + other[k])
        self.dropped.update(other["dropped"])

    def to_dict(self) -> dict:
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
            "dropped": dict(self.dropped),
        }


class Stage:
    """One step over a stream of documents: pass, change or drop each one, counting why.

    Subclasses override `process` (one document at a time; return the document, possibly
    changed, or a string naming why it is dropped) or `run` for steps that need the whole stream.
    """

    name = "stage"

    def process(self, doc: Document) -> Document | str:
        return doc

    def run(self, docs: Iterable[Document], stats: StageStats) -> Iterator[Document]:
        for doc in docs:
            t0 = time.perf_counter()
            out = self.process(doc)
            stats.seconds += time.perf_counter() - t0
            if isinstance(out, str):
                stats.drop(doc.id, out, doc_record(doc))
                continue
            yield out


def run_stages(docs: Iterable[Document], stages: list[Stage], stats: dict[str, StageStats]) -> Iterator[Document]:
    """Chain `stages` over `docs`, counting documents and bytes into `stats` (one entry per stage)."""
    for stage in stages:
        st = stats.setdefault(stage.name, StageStats(stage.name))
        docs = _count_out(stage.run(_count_in(docs, st), st), st)
    return iter(docs)


def _count_in(docs: Iterable[Document], st: StageStats) -> Iterator[Document]:
    for d in docs:
        st.docs_in += 1
        st.bytes_in += len(d.text)
        yield d


def _count_out(docs: Iterable[Document], st: StageStats) -> Iterator[Document]:
    for d in docs:
        st.docs_out += 1
        st.bytes_out += len(d.text)
        yield d


class BadInput:
    """Where readers report records they cannot use: counted by reason, a line each, or a stop in strict mode.

    `skip(..., bad=False)` counts an expected skip (a WARC request record, a non-HTML response)
    without a message. Bad input keeps `<where>: <what> [reason]; <fix>` (the first
    `max_messages` per reason, for the driver to print) and, with `strict`, raises a KilnError
    carrying the same line.
    """

    def __init__(self, stats: StageStats, strict: bool = False, max_messages: int = 3) -> None:
        self.stats, self.strict, self.max_messages = stats, strict, max_messages
        self.messages: list[list[str]] = []  # [reason, line]
        self.reported: Counter = Counter()  # bad-input skips per reason (a file counts once)

    def skip(self, reason: str, where: str, what: str, fix: str = "", bad: bool = True, docs: int = 1) -> None:
        """Count `docs` documents (the records of an unusable file, e.g. a Parquet file without the text column)."""
        self.stats.drop(where, reason, n=docs)
        if not bad:
            return
        line = f"{where}: {what} [{reason}]" + (f"; {fix}" if fix else "")
        if self.strict:
            raise KilnError(f"{line} (data.strict=true stops at bad input; set data.strict=false to skip and count it)")
        self.reported[reason] += 1
        if self.reported[reason] <= self.max_messages:
            self.messages.append([reason, line])
