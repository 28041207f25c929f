"""Where prepared data lives: a run's data directory, its work directory, its tokenizer, and the
check that keeps `kiln prepare` from replacing the data a run's checkpoints were trained with.

Text (`kiln.data.pipeline`) and images (`kiln.data.image_prep`) both lay out their data this way,
and every stage that reads prepared data finds it here.
"""

from __future__ import annotations

from pathlib import Path

from kiln.config import Config
from kiln.errors import KilnError
from kiln.runs import read_manifest

__all__ = ["check_not_a_trained_run", "check_prepared", "data_dir", "tokenizer_path", "work_dir"]


def data_dir(cfg: Config) -> Path:
    return Path(cfg.data.path) if cfg.data.path else Path(cfg.out) / "data"


def check_prepared(spec: str | Path, key: str = "data.path") -> Path:
    """`spec` as a path if it holds prepared data (its manifest.json); else the one-line error (a
    training verb pointed at `key`=spec does not prepare it itself). Torch-free: `kiln.cli` calls it
    before importing the verb."""
    path = Path(spec)
    if read_manifest(path) is None:
        raise KilnError(f"'{spec}' holds no prepared data (manifest.json missing or unreadable); "
                        f"run `kiln prepare {key}={spec}` first")
    return path


def work_dir(ddir: Path) -> Path:
    return ddir.with_name(ddir.name + ".work")


def tokenizer_path(data_path: Path, man: dict) -> Path:
    """Where the tokenizer a data directory was made with lives."""
    return (data_path / man["tokenizer"]).resolve()


def check_not_a_trained_run(cfg: Config, out: Path, ddir: Path) -> None:
    """Refuse to replace the tokenizer and data that a run's checkpoints were trained with."""
    if cfg.data.path and ddir.resolve() != (out / "data").resolve():
        return  # the data goes elsewhere and brings its own tokenizer; the run keeps its own
    ckpts = sorted(p.parent.name for p in (out / "checkpoints").glob("*/checkpoint.json"))
    if ckpts:
        raise KilnError(
            f"'{out}' holds checkpoints ({', '.join(ckpts[-2:])}) trained with its tokenizer and data, which this "
            f"prepare would replace; give a new out= for a new run, or data.path= to prepare the data elsewhere")
