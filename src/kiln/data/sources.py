"""Readers that turn raw inputs into Documents: the embedded Python-stdlib corpus and text files."""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from kiln.data.document import Document
from kiln.errors import KilnError


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
        files = [f for f in p.rglob("*") if f.is_file()]
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    if not files:
        raise KilnError(f"data.input '{pattern}' matches no files; give a file, a directory or a glob like 'docs/**/*.txt'")
    return sorted(files)


def input_files(spec: str) -> list[Path]:
    return stdlib_files() if spec == "stdlib" else text_files(spec)


def listing_fingerprint(files: list[Path]) -> str:
    """A cheap hash of file names, sizes and mtimes: changes when the input set changes."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_text_documents(files: list[Path], source: str, root: Path | None = None) -> Iterator[Document]:
    """One document per file, decoded as UTF-8 (undecodable bytes replaced and counted in meta)."""
    for f in files:
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
            bad = False
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            bad = True
        rel = str(f.relative_to(root)) if root else str(f)
        yield Document(text=text, id=rel, meta={"source": source, "path": str(f), "invalid_utf8": bad})


def documents(spec: str) -> Iterator[Document]:
    if spec == "stdlib":
        return read_text_documents(stdlib_files(), "stdlib", stdlib_root())
    return read_text_documents(text_files(spec), "text")
