"""Run directories, stage manifests, atomic writes (a killed process never leaves half a file) and
what a run records of the held-out windows it validated on."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln import __version__
from kiln.errors import KilnError


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


@dataclass(frozen=True)
class HeldOutWindows:
    """Which windows of a prepared held-out split a held-out figure is measured on: the first
    `count` consecutive windows of `seq_len` + 1 tokens (0 = all of them), with attention kept
    within documents or not. A training run records the windows its validation used in
    checkpoint.json (`validation`), so that every later figure called held-out bits per byte for
    it (`kiln eval`, `kiln quantize`, the speedrun's tables) is measured on the same ones."""

    seq_len: int
    count: int = 0
    document_mask: bool = False

    def describe(self) -> str:
        n = f"{self.count:,} window{'s' * (self.count != 1)}" if self.count else "every window"
        return f"{n} of {self.seq_len} tokens" + (" (attention within documents)" if self.document_mask else "")

    def to_dict(self) -> dict:
        return {"seq_len": self.seq_len, "count": self.count, "document_mask": self.document_mask}

    @classmethod
    def from_dict(cls, d: object) -> HeldOutWindows | None:
        """The windows a checkpoint.json recorded (None: none, or not in this form)."""
        if not isinstance(d, dict) or not isinstance(d.get("seq_len"), int) or d["seq_len"] < 1:
            return None
        return cls(d["seq_len"], int(d.get("count", 0)), bool(d.get("document_mask", False)))


# ---- what a setting names: a run, a checkpoint, a model directory ---------------------------------
def check_checkpoint(spec: str | Path, key: str = "init_from") -> Path:
    """`spec` as a path if it is a run directory holding checkpoints/ or a checkpoint directory
    (checkpoint.json); else the one-line error naming `key`. Which checkpoint, and whether it is
    intact, `kiln.train.restore.find_checkpoint` decides after this."""
    path = Path(spec)
    if (path / "checkpoint.json").is_file() or (path / "checkpoints").is_dir():
        return path
    raise KilnError(f"{key}={spec} is neither a run directory with checkpoints nor a checkpoint directory "
                    "(holding checkpoint.json); point it at e.g. runs/NAME or runs/NAME/checkpoints/step_0000400")


def check_model(spec: str | Path, key: str = "out") -> str:
    """What `kiln.infer.load.load` reads at `spec`: "checkpoint" (a run with checkpoints/ or a
    checkpoint directory) or "hf" (a Hugging Face directory, config.json); else the one-line error
    naming `key`."""
    path = Path(spec)
    if (path / "checkpoint.json").is_file() or (path / "checkpoints").is_dir():
        return "checkpoint"
    if (path / "config.json").is_file():
        return "hf"
    if not path.exists():
        raise KilnError(f"{key}={spec} does not exist; name a run, a checkpoint directory or an export directory")
    if (path / "tokenizer").is_dir() or (path / "data").is_dir():
        raise KilnError(f"{key}={spec} holds no checkpoint yet; train one first (kiln pretrain out={spec}): it has "
                        "no intact checkpoint to load")
    raise KilnError(f"{key}={spec} is not a run (checkpoints/), a checkpoint (checkpoint.json) or a Hugging Face "
                    "directory (config.json); point it at e.g. runs/NAME or runs/NAME/export/hf")


def check_hf_dir(spec: str | Path, key: str = "hf_import.path") -> Path:
    """`spec` as a path if it is a directory (`kiln.infer.hf.read_hf` reads what is in it); else the
    one-line error naming `key`."""
    path = Path(spec)
    if not path.is_dir():
        raise KilnError(f"{key}={spec} is not a directory; point at a Hugging Face model directory "
                        "(config.json, *.safetensors, tokenizer.json)")
    return path


def cpu_model() -> str:
    """This machine's CPU as runs record it (and the matmul peak cache keys it): its model name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
