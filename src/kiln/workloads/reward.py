"""`kiln reward`: a reward model (the backbone plus a scalar head) trained on preference pairs with
the Bradley–Terry loss, on the shared Trainer. Also what `kiln dpo` and `kiln rl` share with it:
where an alignment run starts (`start_point`) and the section each adds to the run's report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import Config
from kiln.data.preference_data import PairLoader, by_kind, eval_pair_batches, load_pairs
from kiln.data.tokenizer import PAD, load_tokenizer
from kiln.errors import KilnError
from kiln.hardware import tune_cpu_allocator
from kiln.model.config import ModelConfig
from kiln.model.heads import ScalarHeadModel, sequence_scores
from kiln.runs import atomic_write_text, sha256_file
from kiln.train import parallel
from kiln.train.checkpoint import CheckpointManager
from kiln.train.objectives import Batch, Objective
from kiln.train.trainer import Trainer
from kiln.workloads.common import (
    build_trained,
    check_tokenizer,
    find_checkpoint,
    load_init_weights,
    prepare_run_dir,
    resolve_resume,
)
from kiln.workloads.pretrain import matmul_shapes, model_config_for

WORKLOAD = "reward"


@dataclass
class StartPoint:
    """Where an alignment run starts: the `init_from` checkpoint, its tokenizer and model shape,
    and (when continuing) this run's own checkpoint to resume."""

    source: Path
    info: dict
    tokenizer_path: Path
    tokenizer: object
    model_cfg: ModelConfig
    ckpt: CheckpointManager
    resume: Path | None

    @property
    def tokenizer_sha256(self) -> str:
        return sha256_file(self.tokenizer_path)

    def build_policy(self, cfg: Config, env, make, workload: str, notes: list[str], prepare=None) -> nn.Module:
        """The model this run trains, placed by `parallel.build_model`: initialized from the seed,
        then (a new run) loaded from `init_from` (its note appended to `notes`), `prepare(model)`
        (e.g. a head kept out of the optimizer), then `train.freeze`."""
        return build_trained(make, cfg, env, self.source, self.resume, workload, notes, prepare)

    def build_reference(self, cfg: Config, env, make, workload: str) -> nn.Module:
        """A frozen copy of the `init_from` model, placed like the policy (DPO's reference, GRPO's KL anchor)."""
        def init(model: nn.Module) -> None:
            model.init_weights(cfg.train.seed)
            load_init_weights(model, self.source, workload)

        return parallel.build_model(make, cfg, env, init, frozen=True)


def start_point(cfg: Config, workload: str) -> StartPoint:
    """The checked starting point of a `workload` run: `init_from` must name a trained run whose
    tokenizer is the one its checkpoint records."""
    if not cfg.init_from:
        raise KilnError(f"kiln {workload} starts from a trained model: pass init_from=RUN (e.g. a pretrain or sft run)")
    source = find_checkpoint(cfg.init_from)
    info = CheckpointManager.info(source)
    tpath = source.parent.parent / "tokenizer" / "tokenizer.json"
    check_tokenizer(tpath, info, f"{workload}: init_from={cfg.init_from}")
    tok = load_tokenizer(tpath)
    base = ModelConfig.from_dict(info["model"])
    model_cfg = model_config_for(cfg, tok.get_vocab_size(), base)
    ckpt = CheckpointManager(Path(cfg.out), cfg.train.keep_last)
    resume = resolve_resume(cfg, ckpt, model_cfg, workload)
    return StartPoint(source, info, tpath, tok, model_cfg, ckpt, resume)


def pad_id(tokenizer) -> int:
    return tokenizer.token_to_id(PAD)


def append_report(run_dir: str | Path, title: str, lines: list[str]) -> Path:
    """Add (or replace) a `## title` section at the end of the run's report.md."""
    path = Path(run_dir) / "report.md"
    text = path.read_text() if path.is_file() else f"# kiln run report: `{run_dir}`\n"
    head = f"## {title}\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + (text[nxt + 1:] if nxt >= 0 else "")
    atomic_write_text(path, text.rstrip("\n") + "\n\n" + head + "\n" + "\n".join(lines) + "\n")
    return path


def right_of(margin: torch.Tensor) -> torch.Tensor:
    """1 for each pair ranked right by `margin` (chosen − rejected), 0.5 for a tie, else 0."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def accuracy_of(margin: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right by `margin`; a tie counts half."""
    return right_of(margin).mean()


def pair_scores(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward of each chosen and each rejected sequence, in one forward pass over both."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    scores = sequence_scores(model, ids, mask)
    n = batch["chosen_input_ids"].shape[0]
    return scores[:n], scores[n:]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of −log σ(r_chosen − r_rejected): the negative log-likelihood of the preferences."""
    return -F.logsigmoid(chosen - rejected).mean()


class BradleyTerry(Objective):
    """Pairwise preference loss on a scalar-head model; logs accuracy and the reward margin."""

    name = "Bradley–Terry preference loss"

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        rc, rr = pair_scores(model, batch)
        margin = (rc - rr).detach()
        return bradley_terry_loss(rc, rr), {"accuracy": accuracy_of(margin), "margin": margin.mean(),
                                            "reward_chosen": rc.detach().mean(), "reward_rejected": rr.detach().mean()}

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        rc, rr = pair_scores(model, batch)
        n = float(rc.shape[0])
        margin = rc - rr
        return {"val_loss": (float(bradley_terry_loss(rc, rr)) * n, n),
                "val_accuracy": (float(accuracy_of(margin)) * n, n), "val_margin": (float(margin.sum()), n),
                **by_kind("val_accuracy", batch, right_of(margin))}


def run_reward(cfg: Config) -> dict:
    if cfg.parallel.tp > 1:
        raise KilnError("reward: the scalar head is not placed under tensor parallelism yet; set parallel.tp=1 "
                        "(parallel.dp_shard shards the model instead)")
    env = parallel.init_env(cfg)
    if env.device.type == "cpu":
        tune_cpu_allocator()
    sp = start_point(cfg, WORKLOAD)
    prepare_run_dir(cfg, env, sp.tokenizer_path, WORKLOAD)
    seq_len, bs = cfg.train.seq_len, cfg.train.batch_size
    train, val, train_stats, val_stats = load_pairs(cfg, sp.tokenizer, seq_len, WORKLOAD)
    mc = sp.model_cfg
    notes: list[str] = []

    def keep_lm_head_out(model: ScalarHeadModel) -> None:
        if not mc.tie_embeddings:  # the LM head plays no part in a reward: keep it out of the optimizer
            model.lm_head.requires_grad_(False)

    model = sp.build_policy(cfg, env, lambda: ScalarHeadModel(mc), WORKLOAD, notes, keep_lm_head_out)
    pad = pad_id(sp.tokenizer)
    loader = PairLoader(train, bs, seq_len, pad, cfg.train.seed, rank=env.dp_rank, world=env.dp_world)
    evals = eval_pair_batches(val[: bs * cfg.train.eval_batches * env.dp_world], bs, seq_len, pad,
                              env.dp_rank, env.dp_world)
    trainer = Trainer(
        cfg, model, env, loader, BradleyTerry(), eval_batches=evals,
        flops_per_token=mc.flops_per_token(seq_len),
        meta={"model": mc.to_dict(), "tokenizer_sha256": sp.tokenizer_sha256, "head": "scalar",
              "init_from": str(sp.source), "pairs": {"train": train_stats.to_dict(), "val": val_stats.to_dict()}},
        name=WORKLOAD, matmul_shapes=matmul_shapes(mc, 2 * bs * seq_len),
    )
    for note in notes:
        trainer.say(f"init_from: {note}")
    trainer.say(f"training pairs: {train_stats.describe()}")
    trainer.say(f"held-out pairs: {val_stats.describe()}; {sum(b['chosen_input_ids'].shape[0] for b in evals)} "
                "scored per evaluation")
    if sp.resume is not None:
        trainer.resume_from(sp.resume)
    with parallel.peer_failures_as_errors(env, cfg.parallel.timeout_s):
        last = trainer.fit()
    if env.is_main:
        report_preferences(cfg.out, "Reward model", train_stats, val_stats, [
            ("held-out pairwise accuracy", "val_accuracy", "{:.1%}"),
            ("held-out reward margin (chosen − rejected)", "val_margin", "{:+.3f}"),
        ])
    return last


def report_preferences(run_dir: str, title: str, train_stats, val_stats, rows: list[tuple[str, str, str]]) -> None:
    """The report section of a preference run: data counts and each metric at the start and the end."""
    from kiln.train.metrics import read_metrics

    evals = [m for m in read_metrics(run_dir) if any(k in m for _, k, _ in rows)]
    lines = [f"- training pairs: {train_stats.describe()}", f"- held-out pairs: {val_stats.describe()}", ""]
    if evals:
        first, last = evals[0], evals[-1]
        lines += ["| held-out metric | start (step {}) | end (step {}) |".format(first["step"], last["step"]),
                  "|---|---:|---:|"]
        for label, key, fmt in rows:
            if key in first and key in last:
                lines.append(f"| {label} | {fmt.format(first[key])} | {fmt.format(last[key])} |")
            if not key.endswith("accuracy"):
                continue
            for kind in sorted(k[len(key) + 1:] for k in last if k.startswith(key + "_") and k in first):
                lines.append(f"| {label}, {kind} pairs | {fmt.format(first[f'{key}_{kind}'])} | "
                             f"{fmt.format(last[f'{key}_{kind}'])} |")
    append_report(run_dir, title, lines)
