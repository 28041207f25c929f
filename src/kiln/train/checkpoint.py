"""Checkpoints that survive a kill at any moment, and loading that detects a corrupt one.

A checkpoint is a directory `checkpoints/step_NNNNNNN/` holding `model.safetensors`,
`optimizer.pt`, `state.pt` (step, RNG states, loader position, guard state) and, written last,
`checkpoint.json` with every file's size and SHA-256. It is assembled under a temporary name and
renamed into place, and `latest` names the newest complete one. Loading checks the hashes and
falls back to the previous checkpoint when a file is damaged. Loading never unpickles code:
weights come from safetensors and everything else through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kiln import __version__
from kiln.errors import KilnError
from kiln.model.weights import load_model_tensors, model_tensors
from kiln.runs import atomic_dir, atomic_write_text, clean_stale_temps, sha256_file


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int = 3) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, meta: dict) -> Path:
        final = self.path(step)
        with atomic_dir(final) as tmp:
            save_file(model_tensors(model), tmp / "model.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(state, tmp / "state.pt")
            self.write_info(tmp, step, meta)
        self.mark_latest(final)
        return final

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:07d}"

    @staticmethod
    def write_info(tmp: Path, step: int, meta: dict) -> None:
        """Write checkpoint.json, the size and SHA-256 of every file under `tmp`: the last file written."""
        files = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        info = {"step": step, "kiln_version": __version__, "files": files, **meta}
        (tmp / "checkpoint.json").write_text(json.dumps(info, indent=2, sort_keys=True))

    def mark_latest(self, final: Path) -> None:
        """Point `latest` at the checkpoint just put in place and drop the oldest beyond keep_last."""
        atomic_write_text(self.dir / "latest", final.name + "\n")
        self.prune()

    def prune(self) -> None:
        """Delete all but the newest `keep_last` complete checkpoints."""
        complete = self.complete()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Checkpoint directories that have their checkpoint.json, oldest first."""
        if not self.dir.is_dir():
            return []
        clean_stale_temps(self.dir)
        return sorted(p for p in self.dir.glob("step_*") if (p / "checkpoint.json").is_file())

    def verify(self, path: Path) -> str | None:
        """None if every file matches its recorded size and hash, else what is wrong."""
        try:
            info = json.loads((path / "checkpoint.json").read_text())
        except (OSError, json.JSONDecodeError):
            return f"{path / 'checkpoint.json'} is unreadable"
        for name, rec in info.get("files", {}).items():
            f = path / name
            if not f.is_file():
                return f"{f} is missing"
            if f.stat().st_size != rec["bytes"]:
                return f"{f} is truncated ({f.stat().st_size} of {rec['bytes']} bytes)"
            if sha256_file(f) != rec["sha256"]:
                return f"{f} is corrupt (its SHA-256 does not match checkpoint.json)"
        return None

    def latest_intact(self) -> Path | None:
        """The newest checkpoint whose files check out, warning about each damaged one skipped."""
        for path in reversed(self.complete()):
            problem = self.verify(path)
            if problem is None:
                return path
            print(f"kiln: warning: {problem}; falling back to the previous checkpoint", file=sys.stderr)
        return None

    @staticmethod
    def info(path: Path) -> dict:
        return json.loads((Path(path) / "checkpoint.json").read_text())

    @staticmethod
    def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Load weights (and optimizer state) from `path`; returns the saved trainer state."""
        path = Path(path)
        try:
            tensors = load_file(path / "model.safetensors")
        except (SafetensorError, OSError) as e:
            raise KilnError(f"{path / 'model.safetensors'} cannot be read ({e}); delete that checkpoint") from None
        load_model_tensors(model, tensors, str(path / "model.safetensors"))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        return torch.load(path / "state.pt", weights_only=True, map_location="cpu")
