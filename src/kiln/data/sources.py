"""Readers that turn raw inputs into Documents, and the split of inputs into tasks.

Formats: the embedded Python-stdlib corpus, text files (one document per file), JSONL (plain,
.gz, .zst), Parquet (streamed by row group) and WARC / WARC.gz crawls (HTTP response records).
A task is a run of whole files, or one byte range / row-group range of a large file, so the
documents of all tasks in task order are the corpus in file order however it is split.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kiln.config import ReaderConfig
from kiln.data.document import BadInput, Document
from kiln.data.extract import decode_bytes
from kiln.errors import KilnError

HTML_SUFFIXES = (".html", ".htm", ".xhtml")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every .py file of the running interpreter's standard library (site-packages excluded), sorted."""
    root = stdlib_root()
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files)


def text_files(pattern: str) -> list[Path]:
    """Files named by a path, a directory (all files under it) or a glob, sorted."""
    p = Path(pattern)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")]
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    if not files:
        raise KilnError(f"data.input '{pattern}' matches no files; give a file, a directory or a glob like 'docs/**/*.txt'")
    return sorted(files)


def input_files(spec: str) -> list[Path]:
    """The input files of `data.input`: comma-separated paths, directories or globs, or `stdlib`."""
    out: list[Path] = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        out.extend(stdlib_files() if part == "stdlib" else text_files(part))
    if not out:
        raise KilnError(f"data.input '{spec}' names no input; give 'stdlib', a file, a directory or a glob")
    return out


def listing_fingerprint(files: list[Path]) -> str:
    """A cheap hash of file names, sizes and mtimes: changes when the input set changes."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def file_format(path: Path, reader: ReaderConfig) -> str:
    """The reader for a file: `data.reader.format`, or by its name."""
    if reader.format not in ("auto", "stdlib"):
        return reader.format
    name = path.name.lower()
    for suffix in (".gz", ".zst", ".zstd"):
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".warc", ".arc")):
        return "warc"
    return "text"


@dataclass(frozen=True)
class Task:
    """A unit of work: whole files (`files`), or one file's byte range / row groups [start, end)."""

    index: int
    files: tuple[str, ...]
    format: str
    root: str = ""  # ids of text documents are paths relative to this
    start: int = 0
    end: int = -1  # -1 = the whole file

    def describe(self) -> str:
        where = self.files[0] if len(self.files) == 1 else f"{self.files[0]} (+{len(self.files) - 1} files)"
        return where if self.end < 0 else f"{where} [{self.start}:{self.end})"


def plan_tasks(spec: str, reader: ReaderConfig, target_bytes: int) -> list[Task]:
    """Split the input into tasks of about `target_bytes` (and at most `reader.task_bytes`) each."""
    tasks: list[Task] = []
    group: list[str] = []
    group_bytes = 0
    group_root = ""

    def close_group():
        nonlocal group, group_bytes
        if group:
            tasks.append(Task(len(tasks), tuple(group), "text", group_root))
            group, group_bytes = [], 0

    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        if part == "stdlib":
            files, root = stdlib_files(), str(stdlib_root())
        else:
            files = text_files(part)
            root = part if Path(part).is_dir() else ""
        if root != group_root:
            close_group()
            group_root = root
        for f in files:
            size = f.stat().st_size
            fmt = file_format(f, reader)
            if fmt == "text":
                if group and group_bytes + size > target_bytes:
                    close_group()
                group.append(str(f))
                group_bytes += size
                continue
            close_group()
            if fmt == "jsonl" and not _compressed(f) and size > reader.task_bytes:
                for start in range(0, size, reader.task_bytes):
                    tasks.append(Task(len(tasks), (str(f),), fmt, root, start, min(size, start + reader.task_bytes)))
            elif fmt == "parquet":
                tasks.extend(_parquet_tasks(f, root, len(tasks), reader.task_bytes))
            else:
                tasks.append(Task(len(tasks), (str(f),), fmt, root))
    close_group()
    return tasks


def _compressed(f: Path) -> bool:
    return f.name.lower().endswith((".gz", ".zst", ".zstd"))


def _parquet_tasks(f: Path, root: str, first: int, task_bytes: int) -> list[Task]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(f).metadata
    except Exception:  # unreadable: one task, whose reader reports it
        return [Task(first, (str(f),), "parquet", root)]
    tasks, start, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= task_bytes or g == meta.num_row_groups - 1:
            tasks.append(Task(first + len(tasks), (str(f),), "parquet", root, start, g + 1))
            start, size = g + 1, 0
    return tasks or [Task(first, (str(f),), "parquet", root)]


def read_task(task: Task, reader: ReaderConfig, bad: BadInput) -> Iterator[Document]:
    """The documents of one task, bad records skipped through `bad`."""
    if task.format == "text":
        for f in task.files:
            yield from read_text_file(Path(f), task.root, reader, bad)
    elif task.format == "jsonl":
        yield from read_jsonl(Path(task.files[0]), reader, bad, task.start, task.end)
    elif task.format == "parquet":
        yield from read_parquet(Path(task.files[0]), reader, bad, task.start, task.end)
    elif task.format == "warc":
        yield from read_warc(Path(task.files[0]), reader, bad)
    else:
        raise KilnError(f"unknown data.reader.format '{task.format}'; use auto, text, jsonl, parquet or warc")


def _doc_id(path: Path, root: str) -> str:
    if root:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return str(path)


def read_text_file(f: Path, root: str, reader: ReaderConfig, bad: BadInput) -> Iterator[Document]:
    """One document per file; HTML files are marked for the `extract` stage."""
    size = f.stat().st_size
    if size == 0:
        # Empty files are normal in source trees (package __init__.py): counted, not reported.
        bad.skip("empty_file", f"'{f}'", "the file is empty", "remove it or ignore this message",
                 bad=f.suffix != ".py")
        return
    if size > reader.max_record_bytes:
        bad.skip("record_too_large", f"'{f}'", f"{size:,} bytes exceeds data.reader.max_record_bytes",
                 "split the file or raise data.reader.max_record_bytes")
        return
    raw = f.read_bytes()
    try:
        text, enc = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        text, enc = decode_bytes(raw)
        if enc == "utf-8":  # undecodable even by detection: bytes replaced
            bad.skip("invalid_utf8", f"'{f}'", f"invalid UTF-8 at byte {e.start}", "re-encode the file as UTF-8")
            return
    html = reader.html == "always" or (reader.html == "auto" and f.name.lower().endswith(HTML_SUFFIXES))
    yield Document(text, _doc_id(f, root), {"source": "text", "path": str(f), "encoding": enc, "html": html})


def _open_stream(f: Path) -> io.BufferedIOBase:
    name = f.name.lower()
    if name.endswith(".gz"):
        return gzip.open(f, "rb")
    if name.endswith((".zst", ".zstd")):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(f, "rb"), closefd=True))
    return open(f, "rb")


_STREAM_ERRORS = (EOFError, OSError, zlib.error)


def _zstd_error() -> tuple[type, ...]:
    try:
        import zstandard

        return (zstandard.ZstdError,)
    except ImportError:
        return ()


def read_jsonl(f: Path, reader: ReaderConfig, bad: BadInput, start: int = 0, end: int = -1) -> Iterator[Document]:
    """One document per JSON line (`reader.text_field`); a byte range starts at the first line beginning in it."""
    ranged = end >= 0
    limit = reader.max_record_bytes
    errors = _STREAM_ERRORS + _zstd_error()
    line_no, pos = 0, start
    empty = True
    try:
        with _open_stream(f) as fh:
            if ranged and start > 0:
                fh.seek(start - 1)
                pos = start - 1 + _skip_line(fh, limit)  # finish the line that began before the range
            while not ranged or pos < end:
                line = fh.readline(limit + 1)
                if not line:
                    break
                empty = False
                line_no += 1
                where = f"'{f}' byte {pos}" if ranged else f"'{f}' line {line_no}"
                rec_start = pos
                pos += len(line)
                if len(line) > limit and not line.endswith(b"\n"):
                    pos += _skip_line(fh, limit)
                    bad.skip("record_too_large", where, f"a line over {limit:,} bytes",
                             "split the record or raise data.reader.max_record_bytes")
                    continue
                if not line.strip():
                    continue
                yield from _json_record(line, where, f, reader, bad, f"{f.name}@{rec_start}" if ranged else f"{f.name}:{line_no}")
    except errors as e:
        bad.skip("corrupt_compressed", f"'{f}' after line {line_no}", f"the stream is corrupt or truncated ({e})",
                 "re-download or re-compress the file")
        return
    if empty and start == 0:
        bad.skip("empty_file", f"'{f}'", "the file holds no records", "remove it or ignore this message")


def _skip_line(fh, limit: int) -> int:
    """Consume the rest of the current line in pieces of at most `limit` bytes; return how many bytes it had."""
    n = 0
    while True:
        piece = fh.readline(limit)
        n += len(piece)
        if not piece or piece.endswith(b"\n"):
            return n


def _json_record(line: bytes, where: str, f: Path, reader: ReaderConfig, bad: BadInput, default_id: str):
    try:
        text_line = line.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.skip("invalid_utf8", where, f"invalid UTF-8 at byte {e.start} of the line", "re-encode the file as UTF-8")
        return
    try:
        rec = json.loads(text_line)
    except json.JSONDecodeError as e:
        # json's own message may end in "at" ("Invalid control character at"): name the place once.
        msg = e.msg.removesuffix(" at")
        bad.skip("malformed_json", where, f"not valid JSON ({msg} at column {e.colno})", "fix or remove the line")
        return
    if not isinstance(rec, dict):
        bad.skip("malformed_json", where, f"a JSON {type(rec).__name__}, not an object", "write one object per line")
        return
    text = rec.get(reader.text_field)
    if not isinstance(text, str):
        keys = ", ".join(list(rec)[:8])
        bad.skip("missing_text_field", where, f"no string field '{reader.text_field}' (fields: {keys})",
                 "set data.reader.text_field to the field holding the text")
        return
    doc_id = rec.get(reader.id_field) if reader.id_field else None
    meta = {"source": "jsonl", "path": str(f)}
    url = rec.get(reader.url_field) if reader.url_field else None
    if isinstance(url, str):
        meta["url"] = url
    meta["html"] = reader.html == "always"
    yield Document(text, str(doc_id) if doc_id is not None else default_id, meta)


def read_parquet(f: Path, reader: ReaderConfig, bad: BadInput, start: int = 0, end: int = -1) -> Iterator[Document]:
    """One document per row of `reader.text_field`, streamed row group by row group."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:
        bad.skip("corrupt_parquet", f"'{f}'", f"not a readable Parquet file ({str(e).splitlines()[0]})",
                 "re-write the file")
        return
    names = pf.schema_arrow.names
    groups = list(range(start, end if end >= 0 else pf.metadata.num_row_groups))
    rows = [pf.metadata.row_group(g).num_rows for g in groups]
    if reader.text_field not in names:
        bad.skip("missing_text_column", f"'{f}'", f"no column '{reader.text_field}' (columns: {', '.join(names[:10])})",
                 "set data.reader.text_field to the column holding the text", docs=sum(rows))
        return
    cols = [c for c in (reader.text_field, reader.id_field, reader.url_field) if c and c in names]
    row = first = sum(pf.metadata.row_group(g).num_rows for g in range(groups[0])) if groups else 0
    try:
        for g in groups:
            table = pf.read_row_group(g, columns=cols).to_pydict()
            texts = table[reader.text_field]
            ids = table.get(reader.id_field) if reader.id_field else None
            urls = table.get(reader.url_field) if reader.url_field else None
            for i, text in enumerate(texts):
                where = f"'{f}' row {row}"
                if not isinstance(text, str):
                    bad.skip("missing_text_field", where, f"column '{reader.text_field}' is null or not text",
                             "clean the column", bad=text is not None)
                elif len(text) > reader.max_record_bytes:
                    bad.skip("record_too_large", where, f"{len(text):,} characters", "raise data.reader.max_record_bytes")
                else:
                    meta = {"source": "parquet", "path": str(f), "html": reader.html == "always"}
                    if urls and isinstance(urls[i], str):
                        meta["url"] = urls[i]
                    doc_id = ids[i] if ids and ids[i] is not None else f"{f.name}#{row}"
                    yield Document(text, str(doc_id), meta)
                row += 1
    except Exception as e:  # the rows not read yet are lost with it
        bad.skip("corrupt_parquet", f"'{f}' row {row}", f"unreadable ({str(e).splitlines()[0]})", "re-write the file",
                 docs=max(1, first + sum(rows) - row))


def read_warc(f: Path, reader: ReaderConfig, bad: BadInput) -> Iterator[Document]:
    """One document per HTTP `response` record with an HTML (or text) body, decoded by its charset."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    if f.stat().st_size == 0:
        bad.skip("empty_file", f"'{f}'", "the file is empty", "remove it or ignore this message")
        return
    n = 0
    try:
        with open(f, "rb") as fh:
            for rec in ArchiveIterator(fh):
                n += 1
                where = f"'{f}' record {n}"
                if not rec.rec_headers.get_header("WARC-Type"):
                    bad.skip("invalid_warc", where, "not a WARC record (no WARC-Type header)",
                             "check that the file is a WARC; the records before it were kept")
                    return
                if rec.rec_type != "response":
                    bad.skip(f"warc_{rec.rec_type}_record", where, "", bad=False)
                    continue
                uri = rec.rec_headers.get_header("WARC-Target-URI") or ""
                if rec.http_headers is None:
                    bad.skip("warc_not_http", where, f"response record for '{uri}' without HTTP headers",
                             "only HTTP response records are read")
                    continue
                ctype = (rec.http_headers.get_header("Content-Type") or "").lower()
                if ctype and "html" not in ctype and not ctype.startswith("text/"):
                    bad.skip("warc_not_html", where, ctype, bad=False)
                    continue
                length = int(rec.rec_headers.get_header("Content-Length") or 0)
                if length > reader.max_record_bytes:
                    bad.skip("record_too_large", where, f"{length:,} bytes for '{uri}'",
                             "raise data.reader.max_record_bytes")
                    continue
                body = rec.content_stream().read()
                if rec.raw_stream.limit > 0:  # the file ended inside this record
                    raise EOFError(f"{rec.raw_stream.limit} bytes missing from '{uri}'")
                if not body.strip():
                    bad.skip("warc_empty_body", where, f"empty body for '{uri}'", bad=False)
                    continue
                charset = None
                if "charset=" in ctype:
                    charset = ctype.split("charset=", 1)[1].split(";")[0].strip(" \"'")
                text, enc = decode_bytes(body, charset)
                rec_id = rec.rec_headers.get_header("WARC-Record-ID") or f"{f.name}#{n}"
                html = reader.html != "never" and ("html" in ctype or not ctype)
                yield Document(text, rec_id, {"source": "warc", "path": str(f), "url": uri, "encoding": enc,
                                              "html": html})
    except (ArchiveLoadFailed, EOFError, OSError, zlib.error, ValueError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        bad.skip("truncated_warc", f"'{f}' record {n + 1}", f"unreadable or truncated WARC record ({msg})",
                 "re-download the file; the records before it were kept")
