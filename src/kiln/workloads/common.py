"""What every training workload shares before and around `Trainer.fit`: where the run starts
(`resume` continues this run, `init_from` starts a new one from another run's weights), the run
directory (resolved config, tokenizer), the tokenizer check against a checkpoint's record,
frozen parameters, and preparing the embedded default data on first use."""

from __future__ import annotations

import fnmatch
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from kiln.config import Config, dump_yaml
from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.runs import atomic_write_text, read_manifest, sha256_file
from kiln.train import distributed_checkpoint
from kiln.train.checkpoint import CheckpointManager, clean_name, load_model_tensors
from kiln.train.parallel import ParallelEnv


def resolve_resume(cfg: Config, ckpt: CheckpointManager, model_cfg: ModelConfig, workload: str) -> Path | None:
    """Which checkpoint of this run to continue from, refusing a run directory that holds a different model."""
    if cfg.resume not in ("auto", "never"):
        path = Path(cfg.resume)
        if not (path / "checkpoint.json").is_file():
            raise KilnError(f"resume={cfg.resume} is not a checkpoint directory (no checkpoint.json); use resume=auto")
        problem = ckpt.verify(path)
        if problem:
            raise KilnError(f"cannot resume from {path}: {problem}")
    elif ckpt.complete():
        if cfg.resume == "never":
            raise KilnError(f"'{cfg.out}' already has checkpoints; pass resume=auto to continue them or choose a new out=")
        path = ckpt.latest_intact()
        if path is None:
            raise KilnError(f"no intact checkpoint in '{ckpt.dir}'; delete it or choose a new out=")
    else:
        return None
    info = CheckpointManager.info(path)
    saved = ModelConfig.from_dict(info.get("model", {}))
    if saved != model_cfg:
        diff = {k: (v, getattr(model_cfg, k)) for k, v in asdict(saved).items() if getattr(model_cfg, k) != v}
        raise KilnError(
            f"'{cfg.out}' holds a run of a different model ({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in diff.items())}); "
            "choose a new out= or use that run's model settings"
        )
    if info.get("workload", workload) == "import":
        raise KilnError(f"'{cfg.out}' holds a model made by `kiln import`; train from it in a new run: "
                        f"`kiln {workload} init_from={cfg.out} out=runs/NEW`")
    if info.get("workload", workload) != workload:
        raise KilnError(f"'{cfg.out}' holds a {info['workload']} run; continue it with `kiln {info['workload']}` "
                        f"or start this {workload} run in a new out= (init_from={cfg.out} starts from its weights)")
    return path


def find_checkpoint(spec: str, key: str = "init_from") -> Path:
    """A run directory (its newest intact checkpoint) or one checkpoint directory, checked."""
    path = Path(spec)
    if (path / "checkpoint.json").is_file():
        problem = CheckpointManager(path.parent.parent).verify(path)
        if problem:
            raise KilnError(f"{key}={spec}: {problem}")
        return path
    if (path / "checkpoints").is_dir():
        found = CheckpointManager(path).latest_intact()
        if found is not None:
            return found
        raise KilnError(f"{key}={spec}: the run holds no intact checkpoint; train it first or name a checkpoint directory")
    raise KilnError(f"{key}={spec} is neither a run directory with checkpoints nor a checkpoint directory "
                    "(holding checkpoint.json); point it at e.g. runs/NAME or runs/NAME/checkpoints/step_0000400")


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint under its plain name, single-process or sharded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        try:
            return load_file(path / "model.safetensors")
        except (SafetensorError, OSError) as e:
            raise KilnError(f"{path / 'model.safetensors'} cannot be read ({e}); name another checkpoint") from None
    if distributed_checkpoint.is_sharded(path):
        tied = bool(CheckpointManager.info(path).get("model", {}).get("tie_embeddings", True))
        return distributed_checkpoint.read_tensors(path, tied)
    raise KilnError(f"{path} holds no weights (no model.safetensors or dcp/); name another checkpoint")


def load_init_weights(model: nn.Module, path: Path, workload: str) -> str:
    """Copy `path`'s weights into `model` for a new run; returns a one-line account.

    The checkpoint may hold exactly the model's weights, a subset of them (adapters only: the
    rest keep their initialization) or a superset (a base with a head this model does not have:
    the extra tensors are left out). Anything else (names that only partly overlap, or a shape
    that differs) is a different model and is refused in one line.
    """
    tensors = checkpoint_tensors(path)
    own = {clean_name(n): p for n, p in model.state_dict(keep_vars=True).items()}
    tied = {n for n in own if n not in tensors and any(own[n] is own[m] for m in tensors if m in own)}
    wanted = set(own) - tied
    given = set(tensors)
    if not (given <= set(own) or wanted <= given):
        missing, unexpected = sorted(wanted - given), sorted(given - set(own))
        raise KilnError(
            f"{workload}: init_from {path} does not fit this model: it lacks {missing[:3]} and has {unexpected[:3]} "
            "that the model does not; it was saved from a different model: use its model settings"
        )
    use = {k: v for k, v in tensors.items() if k in own}
    load_model_tensors(model, use, str(path), partial=True)
    notes = [f"loaded {len(use)} tensors from {path}"]
    if wanted - given:
        notes.append(f"{len(wanted - given)} new ones keep their initialization ({', '.join(sorted(wanted - given)[:3])})")
    if given - set(own):
        notes.append(f"{len(given - set(own))} not used by this model ({', '.join(sorted(given - set(own))[:3])})")
    return "; ".join(notes)


def apply_freeze(model: nn.Module, patterns: list[str], workload: str) -> int:
    """Freeze parameters whose plain name matches any of `patterns` (fnmatch); returns how many."""
    if not patterns:
        return 0
    n = 0
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(clean_name(name), pat) for pat in patterns):
            p.requires_grad_(False)
            n += 1
    if n == 0:
        raise KilnError(f"{workload}: train.freeze={patterns} matches no parameter; names look like "
                        f"{next(iter(clean_name(k) for k, _ in model.named_parameters()))!r}")
    return n


def check_tokenizer(tokenizer: Path, info: dict, what: str) -> None:
    """The tokenizer beside a run must be the one its checkpoint was trained with (checkpoint.json
    records its SHA-256): a replaced tokenizer turns every output into garbage."""
    want = info.get("tokenizer_sha256")
    if not want:
        return
    if not tokenizer.is_file():
        raise KilnError(f"{what}: '{tokenizer}' is missing; the checkpoint needs the tokenizer it was trained with")
    if sha256_file(tokenizer) != want:
        raise KilnError(
            f"{what}: '{tokenizer}' is not the tokenizer this checkpoint was trained with (its SHA-256 differs from "
            "checkpoint.json's); was `kiln prepare` re-run into this run? Restore the run's tokenizer or retrain"
        )


def prepare_run_dir(cfg: Config, env: ParallelEnv, tokenizer: Path, workload: str) -> None:
    """Write the resolved config and keep the run's own copy of its tokenizer (main rank)."""
    if not env.is_main:
        return
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    mine = out / "tokenizer" / "tokenizer.json"
    if not mine.is_file():
        mine.parent.mkdir(exist_ok=True)
        shutil.copy2(tokenizer, mine)
    elif sha256_file(mine) != sha256_file(tokenizer) and CheckpointManager(out).complete():
        raise KilnError(f"{workload}: '{mine}' differs from the data's tokenizer '{tokenizer}' and the run has "
                        "checkpoints; use the data prepared with the run's tokenizer, or a new out=")


def ensure_data(cfg: Config, ddir: Path, workload: str) -> None:
    """With no prepared data where the run looks (and no data.path given), prepare `data.input`
    first. Call it before joining the process group: under torchrun rank 0 prepares (its worker
    processes must not be forked from a process that holds a collective library's threads) and the
    other ranks wait for the manifest to appear, or for rank 0's one-line error. An explicit
    data.path must already exist."""
    import os
    import time

    if read_manifest(ddir) is not None:
        return
    if cfg.data.path:
        raise KilnError(f"'{ddir}' holds no prepared data (manifest.json missing or unreadable); "
                        f"run `kiln prepare data.path={ddir}` first")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    failed = ddir.parent / f".{ddir.name}.prepare-failed"
    if rank == 0:
        failed.unlink(missing_ok=True)
        print(f"{workload}: no prepared data in '{ddir}'; preparing data.input={cfg.data.input} first", flush=True)
        from kiln.data.pipeline import run_prepare

        try:
            run_prepare(cfg)
        except (KilnError, KeyboardInterrupt) as e:
            if world > 1:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(str(e) or "interrupted")
            raise
        return
    started = time.time()
    while read_manifest(ddir) is None:
        if failed.is_file() and failed.stat().st_mtime >= started - 5:
            raise KilnError(failed.read_text())
        time.sleep(0.5)


def build_trained(make, cfg: Config, env: ParallelEnv, source: Path | None, resume: Path | None, workload: str,
                  notes: list[str], prepare=None) -> nn.Module:
    """The model a run trains, placed by `parallel.build_model` (sharded from the meta device where
    the layout asks): `init_weights` from `train.seed`; then, for a new run (`resume` None) with an
    `init_from` checkpoint (`source`), its weights (the loader's note appended to `notes`); then
    `prepare(model)` (LoRA adapters, a head kept out of the optimizer); then `train.freeze`."""
    from kiln.train import parallel

    def init(model: nn.Module) -> None:
        model.init_weights(cfg.train.seed)
        if source is not None and resume is None:
            notes.append(load_init_weights(model, source, workload))
        if prepare is not None:
            prepare(model)
        apply_freeze(model, cfg.train.freeze, workload)

    torch.manual_seed(cfg.train.seed)
    return parallel.build_model(make, cfg, env, init)
