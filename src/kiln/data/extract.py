"""HTML to main-content text (resiliparse or trafilatura) under a per-page time limit that holds, and charset decoding.

The extractors run C code (lexbor, lxml) that a signal handler cannot interrupt: one page of
HTML nested a few tens of thousands of levels deep keeps resiliparse busy for minutes to hours.
So pages are extracted in a child process, one request at a time over a pipe; a page that takes
longer than the limit is dropped by killing that child, and the next page starts a fresh one.
"""

from __future__ import annotations

import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
import weakref
from pathlib import Path

from kiln.data.document import Document, Stage
from kiln.errors import KilnError

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


def html_to_text(html: str, extractor: str = "resiliparse") -> str:
    """The main content of a web page as plain text (navigation, boilerplate and markup removed)."""
    if extractor == "trafilatura":
        import trafilatura

        return trafilatura.extract(html, include_comments=False, include_tables=True, favor_precision=True) or ""
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(html, main_content=True, alt_texts=False, links=False, noscript=False)


# A message on the pipe, either way: status (1 byte), payload length (8 bytes), payload (UTF-8).
_HEAD = struct.Struct(">BQ")
_OK, _FAILED, _BROKEN = 0, 1, 2


def serve(extractor: str, parent: int) -> None:
    """The child's loop: read a page, write its text (or _FAILED), until the parent closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle, silently
    if sys.platform.startswith("linux"):  # die with the parent even while stuck in C code
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        return
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library's stray print must not land in the replies

    def reply(status: int, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        replies.write(_HEAD.pack(status, len(data)) + data)
        replies.flush()

    try:
        html_to_text("<html><body><p>warm up</p></body></html>", extractor)
    except Exception as e:
        reply(_BROKEN, f"{type(e).__name__}: {e}")
        return
    reply(_OK, "ready")
    while True:
        head = requests.read(8)
        if len(head) < 8:
            return
        html = requests.read(struct.unpack(">Q", head)[0]).decode("utf-8", "surrogatepass")
        try:
            reply(_OK, html_to_text(html, extractor))
        except Exception as e:  # a page the extractor cannot parse is bad input, not a crash
            reply(_FAILED, f"{type(e).__name__}: {e}")


class ExtractorProcess:
    """A child interpreter that extracts one page per request and is killed when a page takes too long."""

    def __init__(self, extractor: str) -> None:
        self.extractor = extractor
        self.proc: subprocess.Popen | None = None
        self.owner = 0  # the pid that started it: a forked worker must start its own, not share its parent's

    def _start(self) -> None:
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])  # kiln importable in the child however the parent found it
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from kiln.data.extract import serve; serve(sys.argv[1], int(sys.argv[2]))",
             self.extractor, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, env=env)
        self.owner = os.getpid()
        self._stop = weakref.finalize(self, _stop_child, self.proc, self.owner)  # also at interpreter exit
        self._ready = select.poll()
        self._ready.register(self.proc.stdout.fileno(), select.POLLIN)
        try:
            status, text = self._reply(time.monotonic() + 60)
        except (TimeoutError, EOFError):
            status, text = _BROKEN, "it exited or hung while starting"
        if status != _OK:
            self.close()
            raise KilnError(f"the HTML extractor '{self.extractor}' cannot run ({text}); "
                            "pip install 'kiln[data]' for trafilatura, or set data.reader.html=never")

    def _read(self, n: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        buf = bytearray()
        while len(buf) < n:
            wait = deadline - time.monotonic()
            if wait <= 0 or not self._ready.poll(wait * 1000):
                raise TimeoutError
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _reply(self, deadline: float) -> tuple[int, str]:
        status, n = _HEAD.unpack(self._read(_HEAD.size, deadline))
        return status, self._read(n, deadline).decode("utf-8", "surrogatepass")

    def extract(self, html: str, timeout_s: float) -> str:
        """The page's text; raises TimeoutError past `timeout_s` and ValueError when the extractor fails."""
        if self.proc is None or self.owner != os.getpid() or self.proc.poll() is not None:
            self._start()
        data = html.encode("utf-8", "surrogatepass")
        try:
            view = memoryview(struct.pack(">Q", len(data)) + data)
            while view:
                view = view[os.write(self.proc.stdin.fileno(), view):]
            status, text = self._reply(time.monotonic() + timeout_s)
        except (BrokenPipeError, EOFError):  # the extractor crashed on this page (C code can segfault)
            self.close()
            raise ValueError("the extractor process died") from None
        except BaseException:  # past the limit, or interrupted mid-request: the child's state is unknown
            self.close()
            raise
        if status != _OK:
            raise ValueError(text)
        return text

    def close(self) -> None:
        if self.proc is not None:
            self._stop()
        self.proc = None


def _stop_child(proc: subprocess.Popen, owner: int) -> None:
    if os.getpid() == owner:  # a forked copy of this object must leave its parent's child alone
        proc.kill()
        proc.wait()
    proc.stdin.close()
    proc.stdout.close()


class ExtractHtml(Stage):
    """Replace HTML documents (meta `html`) by their main text; drop pages that time out, fail or have none."""

    name = "extract"

    def __init__(self, extractor: str = "resiliparse", timeout_s: float = 5.0) -> None:
        if extractor not in ("resiliparse", "trafilatura"):
            raise ValueError(f"extractor must be 'resiliparse' or 'trafilatura', not {extractor!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s!r}")
        self.timeout_s = timeout_s
        self.worker = ExtractorProcess(extractor)

    def process(self, doc: Document) -> Document | str:
        if not doc.meta.get("html"):
            return doc
        try:
            text = self.worker.extract(doc.text, self.timeout_s)
        except TimeoutError:
            return "extract_timeout"
        except ValueError:
            return "extract_failed"
        if not text.strip():
            return "extract_empty"
        doc.text = text
        doc.meta["html"] = False
        return doc
