"""Run directories, stage manifests and atomic writes (a killed process never leaves half a file)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kiln import __version__


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> None:
    """Call `write(file)` on a temporary name beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def publish_dir(tmp: Path, final: Path) -> None:
    """Make the finished directory `tmp` become `final`: fsync every file, then rename it into place.

    An existing `final` is replaced as a whole.
    """
    tmp.chmod(0o755)  # mkdtemp makes it private; artifacts are ordinary files
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            p.chmod(0o644)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            p.chmod(0o755)
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}.tmp")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary directory that becomes `final` only if the block finishes.

    An existing `final` is replaced as a whole; on error the temporary directory is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable short hash of a JSON-able object (configs, input listings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest(stage: str, config: dict, inputs: str, **counts: Any) -> dict:
    """What made an artifact: the stage, its config, its inputs' fingerprint, kiln's version, counts."""
    return {
        "stage": stage,
        "kiln_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "inputs": inputs,
        **counts,
    }


def read_manifest(directory: str | Path) -> dict | None:
    p = Path(directory) / "manifest.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def clean_stale_temps(directory: str | Path) -> None:
    """Remove temporaries a killed process left behind (names start with '.' and end '.tmp')."""
    d = Path(directory)
    if not d.is_dir():
        return
    for p in d.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
