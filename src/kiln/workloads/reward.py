"""`kiln reward`: a reward model (the backbone plus a scalar head) trained on preference pairs with
the Bradley–Terry loss, on the shared Trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import Config
from kiln.data.preference_data import PairLoader, by_kind, eval_pair_batches, load_pairs
from kiln.errors import KilnError
from kiln.hardware import tune_cpu_allocator
from kiln.model.heads import ScalarHeadModel, sequence_scores
from kiln.train import parallel
from kiln.train.objectives import Batch, Objective
from kiln.train.trainer import Trainer
from kiln.workloads.common import matmul_shapes, prepare_run_dir
from kiln.workloads.preference import accuracy_of, pad_id, report_preferences, right_of, start_point

WORKLOAD = "reward"


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
    seq_len, bs = cfg.train.seq_len, cfg.train.batch_size
    train, val, train_stats, val_stats = load_pairs(cfg, sp.chat_format, seq_len, WORKLOAD)
    mc = sp.model_cfg
    notes: list[str] = []

    def keep_lm_head_out(model: ScalarHeadModel) -> None:
        if not mc.tie_embeddings:  # the LM head plays no part in a reward: keep it out of the optimizer
            model.lm_head.requires_grad_(False)

    model = sp.build_policy(cfg, env, lambda: ScalarHeadModel(mc), WORKLOAD, notes, keep_lm_head_out)
    pad = pad_id(sp.chat_format)
    loader = PairLoader(train, bs, seq_len, pad, cfg.train.seed, rank=env.dp_rank, world=env.dp_world)
    evals = eval_pair_batches(val[: bs * cfg.train.eval_batches * env.dp_world], bs, seq_len, pad,
                              env.dp_rank, env.dp_world)
    prepare_run_dir(cfg, env, sp.tokenizer_path, WORKLOAD)  # inputs checked: now the run directory
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
        report_preferences(cfg.out, "reward", "Reward model", train_stats, val_stats, [
            ("held-out pairwise accuracy", "val_accuracy", "{:.1%}"),
            ("held-out reward margin (chosen − rejected)", "val_margin", "{:+.3f}"),
        ])
    return last
