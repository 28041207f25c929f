"""What every training workload shares before and around `Trainer.fit`: where the run starts
(`resume` continues this run, `init_from` starts a new one from another run's weights), the run
directory (resolved config, tokenizer, the data's report section), the model shape a recipe
asks for, frozen parameters, and preparing the embedded default data on first use.

Workloads never import each other: what several of them need lives here (or in
`kiln.workloads.preference` / `kiln.workloads.classification`)."""

from __future__ import annotations

import fnmatch
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kiln.config import Config, dump_yaml
from kiln.data.chat import copy_format
from kiln.data.layout import check_prepared, tokenizer_path
from kiln.data.report import push_data_section
from kiln.data.shards import eval_batches, held_out_window, validation_windows
from kiln.data.tokenizer import load_tokenizer
from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.model.weights import clean_name
from kiln.provenance import FILE as PROVENANCE
from kiln.provenance import read_config, record_provenance
from kiln.runs import atomic_write_text, read_manifest, sha256_file
from kiln.train.checkpoint import CheckpointManager
from kiln.train.parallel import ParallelEnv
from kiln.train.restore import load_init_weights


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


def prepare_run_dir(cfg: Config, env: ParallelEnv, tokenizer: Path, workload: str) -> None:
    """Write the resolved config, keep the run's own copy of its tokenizer, put its data's section
in the report and record what made the run in provenance.json (main rank)."""
    if not env.is_main:
        return
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    before = read_config(out)  # the settings of the session this one may continue
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    push_data_section(out)  # the run's own prepared data, in its report
    mine = out / "tokenizer" / "tokenizer.json"
    if not mine.is_file():
        mine.parent.mkdir(exist_ok=True)
        shutil.copy2(tokenizer, mine)
        copy_format(tokenizer, mine.parent)  # an imported model's chat format travels with its tokenizer
    elif sha256_file(mine) != sha256_file(tokenizer) and CheckpointManager(out).complete():
        raise KilnError(f"{workload}: '{mine}' differs from the data's tokenizer '{tokenizer}' and the run has "
                        "checkpoints; use the data prepared with the run's tokenizer, or a new out=")
    record_run(cfg, env, workload, before)


def record_run(cfg: Config, env: ParallelEnv, workload: str, before: dict | None) -> None:
    """provenance.json (main rank, once config.yaml and the tokenizer are in place): the code,
    packages, machine, seeds, data and layout of this session; a session that continues the run on
    other code, packages, machine, layout or data says so in one line. `before`: the run's
    config.yaml as it was before this session wrote its own (`kiln.provenance.read_config`)."""
    changed = record_provenance(cfg.out, workload, asdict(cfg), before, world=env.world, layout=dict(env.layout),
                                device=str(env.device))
    moved = [c for c in changed if c["section"] != "config"]
    if moved:
        print(f"{workload}: this session continues the run on changed "
              + ", ".join(f"{c['section']}.{c['key']}" for c in moved)
              + f" (the sessions before it are kept in {Path(cfg.out) / PROVENANCE})", flush=True)


def ensure_data(cfg: Config, ddir: Path, workload: str) -> None:
    """With no prepared data where the run looks (and no data.path given), prepare `data.input`
    first. Call it before joining the process group: under torchrun rank 0 prepares (its worker
    processes must not be forked from a process that holds a collective library's threads) and the
    other ranks wait for the manifest to appear, or for rank 0's one-line error. An explicit
    data.path must already exist."""
    import os
    import time

    if cfg.data.path:
        check_prepared(cfg.data.path)  # what `kiln.cli` also checks before importing torch
        return
    if read_manifest(ddir) is not None:
        return
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


def model_config_for(cfg: Config, vocab_size: int, base: ModelConfig | None = None) -> ModelConfig:
    """The model for a tokenizer of `vocab_size` (padded to a multiple of 64: matmul-friendly; the
    extra rows are never targets): the preset and overrides, or with `base` (init_from) that
    run's model, which overrides may not reshape."""
    padded = 64 * math.ceil(vocab_size / 64)
    over = cfg.model.overrides()
    if "vocab_size" in over and over["vocab_size"] != padded:
        raise KilnError(f"model.vocab_size={over['vocab_size']} is set by the tokenizer ({vocab_size} tokens, padded to "
                        f"{padded}); leave model.vocab_size unset")
    over["vocab_size"] = padded
    if base is not None:
        clash = {k: v for k, v in over.items() if k != "max_seq_len" and getattr(base, k) != v}
        if clash:
            raise KilnError(f"init_from's model differs from model.* here ({', '.join(f'{k}={v}' for k, v in clash.items())}"
                            f" vs {', '.join(f'{k}={getattr(base, k)}' for k in clash)}); drop those model overrides")
        mc = ModelConfig(**{**base.to_dict(), **over})
    else:
        if over.get("max_seq_len") is None:
            over["max_seq_len"] = max(cfg.model.build(vocab_size=padded).max_seq_len, cfg.train.seq_len)
        mc = cfg.model.build(**over)
    if cfg.train.seq_len > mc.max_seq_len:
        raise KilnError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={mc.max_seq_len}; "
                        "raise model.max_seq_len or lower train.seq_len")
    return mc


def check_shards_match_tokenizer(ddir: Path, man: dict) -> Path:
    """The tokenizer the shards were written with, checked against them; returns its path."""
    tpath = tokenizer_path(ddir, man)
    tok = load_tokenizer(tpath)
    if tok.get_vocab_size() != man["vocab_size"] or sha256_file(tpath) != man["tokenizer_sha256"]:
        raise KilnError(
            f"token shards in '{ddir}' were written with a different tokenizer (vocab {man['vocab_size']}) than "
            f"'{tpath}' (vocab {tok.get_vocab_size()}); re-run `kiln prepare` so shards and tokenizer match"
        )
    first = man["splits"]["train"]["shards"][0]
    sample = np.memmap(ddir / first["file"], dtype=man["dtype"], mode="r")[:1_000_000]
    if len(sample) and int(sample.max()) >= man["vocab_size"]:
        raise KilnError(
            f"token shard '{ddir / first['file']}' holds id {int(sample.max())} ≥ the vocab size {man['vocab_size']}; "
            "the shards do not belong to this tokenizer: re-run `kiln prepare`"
        )
    return tpath


def matmul_shapes(mc: ModelConfig, tokens: int) -> tuple[tuple[int, int, int], ...]:
    """(m, k, n) of the model's main matmuls for a micro-batch: what its MFU peak is timed at."""
    return ((tokens, mc.d_model, mc.ffn_hidden), (tokens, mc.d_model, mc.n_heads * mc.head_dim),
            (tokens, mc.d_model, mc.vocab_size))


def validation_batches(ddir: Path, cfg: Config, env: ParallelEnv, workload: str) -> tuple[list[dict], dict]:
    """The held-out batches a token-shard run validates on, in windows of `train.seq_len`, and the
    checkpoint.json entry naming those windows (`validation`: what later held-out figures of the
    run are measured on). A held-out split shorter than one window is scored in one window as long
    as it holds, and the run says so (validating nothing without a word would leave a report with
    no validation)."""
    tc = cfg.train
    window = held_out_window(ddir, tc.seq_len)
    if window < tc.seq_len and env.is_main:
        if window:
            print(f"{workload}: the held-out split of '{ddir}' is shorter than one window of {tc.seq_len + 1} tokens; "
                  f"validating on windows of {window} tokens instead (a larger data.val_fraction holds out more)",
                  flush=True)
        else:
            print(f"{workload}: warning: the held-out split of '{ddir}' holds no tokens: no validation in this run; "
                  "prepare with a larger data.val_fraction", flush=True)
    if not window:
        return [], {}
    windows = validation_windows(ddir, tc.batch_size, window, tc.eval_batches, env.dp_world, tc.document_mask)
    batches = eval_batches(ddir, tc.batch_size, window, tc.eval_batches, rank=env.dp_rank, world=env.dp_world,
                           document_mask=tc.document_mask)
    return batches, {"validation": windows.to_dict()}
