"""`kiln sft`: supervised fine-tuning on conversations, full or LoRA, on the shared Trainer.

The model starts from a pretrained run (`init_from`) and learns the assistant turns of chat
JSONL (`kiln.data.chat_data`: packed rows, loss on assistant tokens only) with the ordinary
next-token objective. With `lora.rank > 0` only low-rank adapters train (`kiln.model.lora`): the
checkpoints carry the adapters alone in `adapter.safetensors` and the merged model in
`model.safetensors`, so `kiln generate`, export and later stages read an SFT run like any other.
With no `sft.data`, the embedded default task (docstring ⇄ function from the standard library,
`kiln.data.sft_default`) is built into the run directory.

Measured: the held-out loss on assistant tokens (the loop's validation, step 0 being the base),
and a task metric: greedy replies to held-out prompts scored by word-overlap F1 and exact match
against the reference reply, for the base and the fine-tuned model, in metrics.jsonl and report.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kiln.config import Config
from kiln.data.chat import as_format, read_format
from kiln.data.chat_data import (
    ChatStats,
    Example,
    PackedChatLoader,
    held_out_split,
    packed_eval_batches,
    read_conversations,
    tokenize,
)
from kiln.data.tokenizer import load_tokenizer, token_count
from kiln.errors import KilnError
from kiln.hardware import tune_cpu_allocator
from kiln.infer.generate import generate, greedy
from kiln.infer.load import load
from kiln.model.config import ModelConfig
from kiln.model.lora import apply_lora, init_lora, lora_dict
from kiln.model.transformer import Transformer
from kiln.plan import training_flops_per_token
from kiln.report import write_section
from kiln.rewards.text import word_f1
from kiln.runs import sha256_file
from kiln.train import parallel
from kiln.train.checkpoint import CheckpointManager
from kiln.train.lora_checkpoints import LoRACheckpoints
from kiln.train.metrics import MetricsLog
from kiln.train.objectives import LanguageModeling
from kiln.train.restore import find_checkpoint
from kiln.train.trainer import Trainer
from kiln.workloads.common import build_trained, matmul_shapes, model_config_for, prepare_run_dir, resolve_resume

WORKLOAD = "sft"
DEFAULT_DATA_DIR = "sft_data"  # under the run directory: the default task's train.jsonl / val.jsonl


# ---- tokenizer and data ----------------------------------------------------------------------
def resolve_tokenizer(cfg: Config, source: Path | None) -> Path:
    """The tokenizer of this run: data.tokenizer.path if set, else the init_from run's, else the one
    already in `out`. It must be the one init_from was trained with and the one `out` holds, and
    render conversations (kiln's chat tokens, or an imported model's chat template beside it)."""
    if cfg.data.tokenizer.path:
        path = Path(cfg.data.tokenizer.path)
        path = path / "tokenizer.json" if path.is_dir() else path
    elif source is not None:
        path = source.parent.parent / "tokenizer" / "tokenizer.json"
    else:
        path = Path(cfg.out) / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise KilnError(f"sft: no tokenizer at '{path}'; start from a pretrained run (init_from=runs/NAME) or set "
                        "data.tokenizer.path")
    read_format(path, load_tokenizer(path)).check_chat(f"sft: tokenizer '{path}'")
    digest = sha256_file(path)
    if source is not None:
        want = CheckpointManager.info(source).get("tokenizer_sha256")
        if want and want != digest:
            raise KilnError(f"sft: init_from={cfg.init_from} was trained with a different tokenizer than '{path}'; "
                            "fine-tune with that run's own tokenizer (leave data.tokenizer.path unset)")
    mine = Path(cfg.out) / "tokenizer" / "tokenizer.json"
    if mine.is_file() and mine.resolve() != path.resolve() and sha256_file(mine) != digest:
        raise KilnError(f"sft: '{mine}' is another tokenizer than '{path}' (the one this run uses); choose a new out=")
    return path


def _main_rank_first(env: parallel.ParallelEnv, build) -> None:
    """`build()` on the main rank while the others wait; its one-line error stops every rank."""
    error = None
    if env.is_main:
        try:
            build()
        except KilnError as e:
            if not env.distributed:
                raise
            error = str(e)
    if env.distributed:
        from datetime import timedelta

        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0, group=dist.new_group(backend="gloo", timeout=timedelta(hours=1)))
        if box[0]:
            raise KilnError(box[0])


@dataclass
class SFTData:
    """Tokenized training and held-out conversations, what reading them skipped, and the held-out
    conversations themselves (the task metric prompts with them)."""

    train: list[Example]
    val: list[Example]
    val_conversations: list[list[dict]]
    files: dict[str, str]
    stats: dict[str, ChatStats] = field(default_factory=dict)


def load_sft_data(cfg: Config, env: parallel.ParallelEnv, fmt) -> SFTData:
    """sft.data (+ sft.val_data or a held-out share of it), or the default task built into the run."""
    sc, seq_len = cfg.sft, cfg.train.seq_len
    if not sc.data:
        from kiln.data.sft_default import build_default_task

        where = Path(cfg.out) / DEFAULT_DATA_DIR
        _main_rank_first(env, lambda: build_default_task(where, sc.default_source, sc.default_max_chars,
                                                         sc.val_fraction))
        files = {"train": str(where / "train.jsonl"), "val": str(where / "val.jsonl")}
    else:
        files = {"train": sc.data, "val": sc.val_data}
    stats = {"train": ChatStats(), "val": ChatStats()}
    train = read_conversations(files["train"], stats["train"], sc.strict)
    val = read_conversations(files["val"], stats["val"], sc.strict, key="sft.val_data") if files["val"] else None
    for split, convs in (("train", train), ("val", val)):
        if convs is not None and not convs:
            raise KilnError(f"sft: {files[split]} has no usable conversation: {stats[split].describe()}; fix the data")
    if val is None:
        train, val = held_out_split(train, sc.val_fraction)
        files["val"] = f"{sc.val_fraction:g} of {files['train']}, held out"
        stats["val"].records = len(val)
        stats["train"].records -= len(val)
    out = {}
    for split, convs in (("train", train), ("val", val)):
        out[split] = tokenize(fmt, convs, seq_len, stats[split], sc.too_long, sc.train_on)
        if not out[split]:
            raise KilnError(f"sft: {files[split]} has no conversation that fits train.seq_len={seq_len}: "
                            f"{stats[split].describe()}; fix the data, raise train.seq_len or set sft.too_long=truncate")
    return SFTData(out["train"], out["val"], val, files, stats)


# ---- the task metric -------------------------------------------------------------------------
@torch.no_grad()
def task_prompts(fmt, conversations: list[list[dict]], n: int, max_new_tokens: int,
                 context: int) -> list[tuple[list[int], str]]:
    """(prompt ids, reference reply) of up to `n` held-out conversations, in order: everything before
    the last assistant turn, and that turn, in the run's chat format (`fmt`: a ChatFormat, or a
    kiln tokenizer). Only those whose reference fits `max_new_tokens` (a perfect reply is possible)
    and whose prompt leaves room for it in the context."""
    fmt = as_format(fmt)
    tokenizer = fmt.tokenizer
    out: list[tuple[list[int], str]] = []
    for messages in conversations:
        if len(out) >= n:
            break
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        ids = fmt.prompt_ids(messages[:last])
        reference = messages[last]["content"]
        if len(tokenizer.encode(reference, add_special_tokens=False).ids) + 1 > max_new_tokens:
            continue
        if len(ids) + max_new_tokens > context:
            continue
        out.append((ids, reference))
    return out


def task_score(model: Transformer, fmt, prompts: list[tuple[list[int], str]], max_new_tokens: int) -> dict:
    """Mean word-overlap F1 and exact-match rate of greedy replies (ended by the format's end of turn)
    against the references."""
    fmt = as_format(fmt)
    tokenizer = fmt.tokenizer
    replies = generate(model, [p for p, _ in prompts], greedy(max_new_tokens), stop_ids=set(fmt.end),
                       vocab=tokenizer.get_vocab_size(), rows=16)
    texts = [tokenizer.decode(r.tokens).strip() for r in replies]
    f1 = [word_f1(t, ref) for t, (_, ref) in zip(texts, prompts)]
    exact = [float(t == ref.strip()) for t, (_, ref) in zip(texts, prompts)]
    return {"f1": sum(f1) / len(f1), "exact": sum(exact) / len(exact), "replies": texts}


def reply_model(spec: Path | None, model_cfg: ModelConfig, seed: int, device: torch.device) -> nn.Module:
    """The model whose replies are scored: a checkpoint read back as `kiln generate` reads it, or
    (no init_from) the seeded initialization the run started from."""
    if spec is not None:
        return load(spec, device, key="init_from").model
    model = Transformer(model_cfg)
    model.init_weights(seed)
    return model.to(device).eval()


# ---- the run ---------------------------------------------------------------------------------
def _base(cfg: Config, source: Path | None, start: Path | None) -> Path | None:
    """The checkpoint this run starts from: init_from for a new run; for a resumed one, the very
    checkpoint it started from (recorded), not whatever init_from names now. A LoRA run reloads its
    frozen base from there, so that checkpoint must be unchanged: a changed base would silently
    shift every adapted weight."""
    if start is None:
        return source
    info = CheckpointManager.info(start)
    if (info.get("lora") or None) != (lora_dict(cfg.lora) if cfg.lora.rank else None):
        raise KilnError(f"'{cfg.out}' holds a {_method(info.get('lora'))} run, this launch asks for "
                        f"{_method(lora_dict(cfg.lora) if cfg.lora.rank else None)}; continue it with its own lora.* "
                        "settings or choose a new out=")
    recorded = Path(info["init_from"]) if info.get("init_from") else None
    if not cfg.lora.rank:
        return recorded if recorded is not None and (recorded / "checkpoint.json").is_file() else source
    intact = recorded is not None and (recorded / "checkpoint.json").is_file()
    if not intact or sha256_file(recorded / "checkpoint.json") != info["lora_base_sha256"]:
        raise KilnError(f"sft: this LoRA run's base checkpoint {recorded} is gone or changed; its adapters only make "
                        "sense on that exact base: restore it, or start a new run (new out=)")
    return recorded


def _method(lora: dict | None) -> str:
    if not lora:
        return "full fine-tuning"
    return (f"LoRA rank {lora['rank']} (alpha {lora['alpha']:g}, dropout {lora['dropout']:g}, "
            f"on {','.join(lora['targets'])})")


def _check_setup(cfg: Config) -> None:
    if cfg.lora.rank and not cfg.init_from:
        raise KilnError("sft: lora.rank > 0 adapts a pretrained model: set init_from=runs/NAME (the base run)")
    if cfg.parallel.pp > 1:
        raise KilnError("sft packs conversations with document_ids and positions, which pipeline stages do not pass "
                        "on; set parallel.pp=1 (shard with parallel.dp_shard instead)")
    if cfg.lora.rank and cfg.parallel.tp > 1:
        raise KilnError("sft: LoRA does not run under tensor parallelism (it would split the adapters along their "
                        "rank); set parallel.tp=1 and shard with parallel.dp_shard (FSDP2), or train in full")


def run_sft(cfg: Config) -> dict:
    """Fine-tune; returns the final validation metrics and the task metric of base and fine-tuned
    model (`task_f1`, `base_task_f1`, ...). The stage `kiln speedrun` runs after pretraining."""
    _check_setup(cfg)
    lora = cfg.lora.rank > 0
    source = find_checkpoint(cfg.init_from) if cfg.init_from else None
    tpath = resolve_tokenizer(cfg, source)
    tok = load_tokenizer(tpath)
    fmt = read_format(tpath, tok)  # kiln's chat format, or an imported model's own template
    base_cfg = ModelConfig.from_dict(CheckpointManager.info(source)["model"]) if source else None
    model_cfg = model_config_for(cfg, tok.get_vocab_size(), base_cfg)
    env = parallel.init_env(cfg)
    if env.device.type == "cpu":
        tune_cpu_allocator()
    ckpt = (LoRACheckpoints(Path(cfg.out), cfg.train.keep_last, cfg.lora, model_cfg.tie_embeddings) if lora
            else CheckpointManager(Path(cfg.out), cfg.train.keep_last))
    start = resolve_resume(cfg, ckpt, model_cfg, WORKLOAD)
    source = _base(cfg, source, start)
    data = load_sft_data(cfg, env, fmt)

    notes = []

    def make() -> Transformer:
        return apply_lora(Transformer(model_cfg), cfg.lora) if lora else Transformer(model_cfg)

    # a LoRA run always reloads its frozen base (its checkpoints hold the adapters), then adds them
    model = build_trained(make, cfg, env, source, None if lora else start, WORKLOAD, notes,
                          (lambda m: init_lora(m, cfg.train.seed)) if lora else None)
    pad = fmt.pad
    tc = cfg.train
    loader = PackedChatLoader(data.train, tc.batch_size, tc.seq_len, pad, tc.seed, rank=env.dp_rank, world=env.dp_world)
    meta = {"model": model_cfg.to_dict(), "tokenizer_sha256": sha256_file(tpath), "data": data.files,
            **({"init_from": str(source)} if source else {})}
    if lora:
        meta |= {"lora": lora_dict(cfg.lora), "lora_base_sha256": sha256_file(source / "checkpoint.json")}
    prepare_run_dir(cfg, env, tpath, WORKLOAD)  # inputs checked: now the run directory
    trainer = Trainer(
        cfg, model, env, loader, LanguageModeling(vocab=min(token_count(tok), model_cfg.vocab_size)),
        eval_batches=packed_eval_batches(data.val, tc.batch_size, tc.seq_len, pad, tc.eval_batches,
                                         rank=env.dp_rank, world=env.dp_world),
        flops_per_token=training_flops_per_token(model_cfg, tc.seq_len, lora)["total"],
        meta=meta, name=WORKLOAD, matmul_shapes=matmul_shapes(model_cfg, tc.batch_size * tc.seq_len),
    )
    trainer.ckpt = ckpt
    if source is None:
        trainer.say("note: no init_from: fine-tuning a freshly initialized model (set init_from=runs/NAME to start "
                    "from a pretrained one)")
    for note in notes:
        trainer.say(f"init_from: {note}")
    for split in ("train", "val"):
        trainer.say(f"{split} data {data.files[split]}: {data.stats[split].describe()}")
    trainer.say(f"packing: {len(data.train):,} conversations fill {100 * loader.fill:.0f}% of their rows' tokens")
    if start is not None:
        trainer.resume_from(start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # global sizes, sharded or not
    trainer.say(f"{model_cfg.num_params() / 1e6:.1f}M params, {_method(meta.get('lora'))}: {trainable:,} trained "
                f"({100 * trainable / model_cfg.num_params():.2f}%), {trainer.accum} micro-batches/step "
                f"({trainer.tokens_per_step:,} tokens), {env.describe()}, {tc.max_steps} steps")
    with parallel.peer_failures_as_errors(env, cfg.parallel.timeout_s):
        result = trainer.fit()
    # The others wait for the main rank's evaluation, so a next stage in this process group starts together.
    _main_rank_first(env, lambda: result.update(finish(cfg, trainer, data, fmt, model_cfg, source, env.device)))
    return result


def finish(cfg: Config, trainer: Trainer, data: SFTData, fmt, model_cfg: ModelConfig, source: Path | None,
           device: torch.device) -> dict:
    """After training (main rank): the task metric of base and fine-tuned model, read back from the
    checkpoints as `kiln generate` would, into metrics.jsonl and the report's SFT section."""
    from kiln.train.metrics import read_metrics

    sc, out = cfg.sft, Path(cfg.out)
    scores: dict = {}
    prompts = task_prompts(fmt, data.val_conversations, sc.eval_prompts, sc.eval_max_new_tokens, model_cfg.max_seq_len)
    if prompts:
        final = CheckpointManager(out).latest_intact()
        base = reply_model(source, model_cfg, cfg.train.seed, device)
        before = task_score(base, fmt, prompts, sc.eval_max_new_tokens)
        del base
        after = task_score(reply_model(final, model_cfg, cfg.train.seed, device), fmt, prompts, sc.eval_max_new_tokens)
        scores = {"task_f1": after["f1"], "task_exact": after["exact"], "base_task_f1": before["f1"],
                  "base_task_exact": before["exact"], "task_prompts": len(prompts)}
        log = MetricsLog(out, trainer.step, tensorboard=False)
        log.log({"step": trainer.step, **scores})
        log.close()
        trainer.say(f"task metric on {len(prompts)} held-out prompts (greedy reply vs reference): word F1 "
                    f"{before['f1']:.3f} → {after['f1']:.3f}, exact match {100 * before['exact']:.0f}% → "
                    f"{100 * after['exact']:.0f}% (base → fine-tuned)")
    elif sc.eval_prompts:
        trainer.say(f"task metric skipped: no held-out reply fits sft.eval_max_new_tokens={sc.eval_max_new_tokens}")
    val = [m for m in read_metrics(out) if "val_loss" in m]
    lora = cfg.lora
    method = (f"LoRA rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, on {', '.join(lora.targets)}; "
              "the adapters alone in each checkpoint's `adapter.safetensors`, merged into its `model.safetensors`"
              if lora.rank else "full fine-tuning")
    lines = ["## Supervised fine-tuning", "", f"- method: {method}"]
    lines.append(f"- started from: `{source}`" if source else "- started from: a fresh initialization (no init_from)")
    for split in ("train", "val"):
        lines.append(f"- {split} data: `{data.files[split]}`: {data.stats[split].describe()}")
    if len(val) >= 2:
        lines.append(f"- held-out loss on assistant tokens: **{val[0]['val_loss']:.3f} → {val[-1]['val_loss']:.3f}** "
                     f"nats/token (step {val[0]['step']} = the base → step {val[-1]['step']})")
    if scores:
        lines.append(f"- task metric, greedy replies to {scores['task_prompts']} held-out prompts scored against the "
                     f"reference reply: word-overlap F1 **{scores['base_task_f1']:.3f} → {scores['task_f1']:.3f}**, "
                     f"exact match {100 * scores['base_task_exact']:.0f}% → {100 * scores['task_exact']:.0f}% "
                     "(base → fine-tuned)")
        lines += ["", "| held-out prompt (end) | reference | fine-tuned reply |", "|---|---|---|"]
        for (ids, ref), reply in list(zip(prompts, after["replies"]))[:3]:
            lines.append(f"| {_cell(as_format(fmt).tokenizer.decode(ids)[-80:])} | {_cell(ref)} | {_cell(reply)} |")
    write_section(out, "sft", lines)
    return scores


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")[:160] or "—"
