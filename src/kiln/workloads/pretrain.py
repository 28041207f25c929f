"""`kiln pretrain`: next-token prediction on prepared token shards, on the shared Trainer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kiln.config import Config
from kiln.data.pipeline import data_dir, tokenizer_path
from kiln.data.shards import TokenLoader, eval_batches, open_data
from kiln.data.tokenizer import load_tokenizer
from kiln.errors import KilnError
from kiln.hardware import tune_cpu_allocator
from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer
from kiln.runs import sha256_file
from kiln.train import parallel
from kiln.train.checkpoint import CheckpointManager
from kiln.train.objectives import LanguageModeling
from kiln.train.trainer import Trainer
from kiln.workloads.common import (
    build_trained,
    ensure_data,
    find_checkpoint,
    prepare_run_dir,
    resolve_resume,
)

WORKLOAD = "pretrain"


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


def run_pretrain(cfg: Config) -> dict:
    ddir = data_dir(cfg)
    ensure_data(cfg, ddir, WORKLOAD)  # before the process group: rank 0 may fork data workers
    env = parallel.init_env(cfg)
    if env.device.type == "cpu":
        tune_cpu_allocator()
    man = open_data(ddir)
    tpath = check_shards_match_tokenizer(ddir, man)
    source = find_checkpoint(cfg.init_from) if cfg.init_from else None
    base = ModelConfig.from_dict(CheckpointManager.info(source)["model"]) if source else None
    if source is not None and CheckpointManager.info(source).get("tokenizer_sha256") not in (None, man["tokenizer_sha256"]):
        raise KilnError(f"init_from={cfg.init_from} was trained with a different tokenizer than the data in '{ddir}'; "
                        "prepare the data with that run's tokenizer (data.tokenizer.path=RUN/tokenizer/tokenizer.json)")
    model_cfg = model_config_for(cfg, man["vocab_size"], base)
    ckpt = CheckpointManager(Path(cfg.out), cfg.train.keep_last)
    start = resolve_resume(cfg, ckpt, model_cfg, WORKLOAD)
    prepare_run_dir(cfg, env, tpath, WORKLOAD)

    notes = []

    model = build_trained(lambda: Transformer(model_cfg), cfg, env, source, start, WORKLOAD, notes)
    loader = TokenLoader(ddir, "train", cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed,
                         rank=env.dp_rank, world=env.dp_world, document_mask=cfg.train.document_mask)
    val = man["splits"]["val"]
    trainer = Trainer(
        cfg, model, env, loader, LanguageModeling(tokens_per_byte=val["tokens"] / max(val["bytes"], 1)),
        eval_batches=eval_batches(ddir, cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_batches,
                                  rank=env.dp_rank, world=env.dp_world, document_mask=cfg.train.document_mask),
        flops_per_token=model_cfg.flops_per_token(cfg.train.seq_len),
        meta={"model": model_cfg.to_dict(), "data": str(ddir), "tokenizer_sha256": man["tokenizer_sha256"],
              **({"init_from": str(source)} if source else {})},
        name=WORKLOAD,
        matmul_shapes=matmul_shapes(model_cfg, cfg.train.batch_size * cfg.train.seq_len),
    )
    for note in notes:
        trainer.say(f"init_from: {note}")
    if start is not None:
        trainer.resume_from(start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = f", {model_cfg.num_params() - trainable:,} frozen" if cfg.train.freeze and not env.distributed else ""
    trainer.say(f"{model_cfg.num_params() / 1e6:.1f}M params{frozen}, {trainer.accum} micro-batches/step "
                f"({trainer.tokens_per_step:,} tokens), {env.describe()}, {cfg.train.max_steps} steps")
    with parallel.peer_failures_as_errors(env, cfg.parallel.timeout_s):
        return trainer.fit()
