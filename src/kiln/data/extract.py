"""HTML to main-content text (resiliparse or trafilatura) under a per-document time limit, and charset decoding."""

from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager

from kiln.data.document import Document, Stage

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.I)


def decode_bytes(raw: bytes, declared: str | None = None) -> tuple[str, str]:
    """Bytes to text: the declared charset (HTTP header or <meta>), else UTF-8, else a detected one.

    Returns (text, encoding used). Never raises: undecodable bytes become U+FFFD.
    """
    candidates = []
    if declared:
        candidates.append(declared)
    m = _META_CHARSET.search(raw[:4096])
    if m:
        candidates.append(m.group(1).decode("ascii", "ignore"))
    candidates.append("utf-8")
    for enc in candidates:
        try:
            return raw.decode(enc), enc.lower()
        except (UnicodeDecodeError, LookupError):
            continue
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    enc = detect_encoding(raw)
    return bytes_to_str(raw, enc), enc


class ExtractTimeout(BaseException):
    """A BaseException, so an extractor's own `except Exception` cannot swallow the time limit."""


@contextmanager
def time_limit(seconds: float):
    """Raise ExtractTimeout in the block after `seconds` (main thread only; elsewhere no limit applies)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _alarm(signum, frame):
        raise ExtractTimeout

    old = signal.signal(signal.SIGALRM, _alarm)
    # A library loaded earlier (a runtime's threads) may have blocked SIGALRM: let it through here.
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGALRM, old)


def html_to_text(html: str, extractor: str = "resiliparse") -> str:
    """The main content of a web page as plain text (navigation, boilerplate and markup removed)."""
    if extractor == "trafilatura":
        import trafilatura

        return trafilatura.extract(html, include_comments=False, include_tables=True, favor_precision=True) or ""
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(html, main_content=True, alt_texts=False, links=False, noscript=False)


class ExtractHtml(Stage):
    """Replace HTML documents (meta `html`) by their main text; drop pages that time out or have none."""

    name = "extract"

    def __init__(self, extractor: str = "resiliparse", timeout_s: float = 5.0) -> None:
        if extractor not in ("resiliparse", "trafilatura"):
            raise ValueError(f"extractor must be 'resiliparse' or 'trafilatura', not {extractor!r}")
        self.extractor, self.timeout_s = extractor, timeout_s

    def process(self, doc: Document) -> Document | str:
        if not doc.meta.get("html"):
            return doc
        try:
            with time_limit(self.timeout_s):
                text = html_to_text(doc.text, self.extractor)
        except ExtractTimeout:
            return "extract_timeout"
        except Exception:  # a page the extractor cannot parse is bad input, not a crash
            return "extract_failed"
        if not text.strip():
            return "extract_empty"
        doc.text = text
        doc.meta["html"] = False
        return doc
