"""`kiln pretrain`: next-token prediction on prepared token shards, on the shared Trainer."""

from __future__ import annotations

from pathlib import Path

from kiln.config import Config
from kiln.data.layout import data_dir
from kiln.data.shards import TokenLoader, open_data, tokens_per_byte
from kiln.errors import KilnError
from kiln.hardware import tune_cpu_allocator
from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer
from kiln.train import parallel
from kiln.train.checkpoint import CheckpointManager
from kiln.train.objectives import LanguageModeling
from kiln.train.restore import find_checkpoint
from kiln.train.trainer import Trainer
from kiln.workloads.common import (
    build_trained,
    check_shards_match_tokenizer,
    ensure_data,
    matmul_shapes,
    model_config_for,
    prepare_run_dir,
    resolve_resume,
    validation_batches,
)

WORKLOAD = "pretrain"


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

    notes = []

    model = build_trained(lambda: Transformer(model_cfg), cfg, env, source, start, WORKLOAD, notes)
    loader = TokenLoader(ddir, "train", cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed,
                         rank=env.dp_rank, world=env.dp_world, document_mask=cfg.train.document_mask)
    evals, windows = validation_batches(ddir, cfg, env, WORKLOAD)
    prepare_run_dir(cfg, env, tpath, WORKLOAD)  # inputs checked: now the run directory
    trainer = Trainer(
        cfg, model, env, loader, LanguageModeling(tokens_per_byte(man), min(man["vocab_size"], model_cfg.vocab_size)),
        eval_batches=evals,
        flops_per_token=model_cfg.flops_per_token(cfg.train.seq_len),
        meta={"model": model_cfg.to_dict(), "data": str(ddir), "tokenizer_sha256": man["tokenizer_sha256"], **windows,
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
