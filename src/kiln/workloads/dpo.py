"""`kiln dpo`: Direct Preference Optimization (sigmoid loss) against a frozen reference, the
`init_from` model, on the shared Trainer.

The reference's log-probabilities of every pair do not change during training, so by default
they are computed once before the first step (one forward pass per pair, no backward) and the
reference is freed; `dpo.precompute_ref=false` scores each batch with it instead (cheaper when a
run sees only part of a large dataset).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import Config
from kiln.data.preference_data import Pair, PairLoader, by_kind, eval_pair_batches, load_pairs, pair_batch
from kiln.hardware import tune_cpu_allocator
from kiln.model.transformer import Transformer
from kiln.train import parallel
from kiln.train.objectives import Batch, Objective
from kiln.train.trainer import Trainer, to_device
from kiln.workloads.common import matmul_shapes, prepare_run_dir
from kiln.workloads.preference import accuracy_of, pad_id, report_preferences, right_of, start_point

WORKLOAD = "dpo"


def completion_logps(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's labelled tokens, their count) — labels are next-token targets."""
    logits = model(ids, attention_mask=mask)
    token_nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    per_row = token_nll.view(labels.shape).sum(-1)
    return -per_row, (labels != -100).sum(-1)


def pair_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen log-probs, rejected log-probs, chosen token counts), both sides in one forward pass."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logp, count = completion_logps(model, ids, mask, labels)
    n = batch["chosen_input_ids"].shape[0]
    return logp[:n], logp[n:], count[:n]


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean −log σ(β·[(π_c − ref_c) − (π_r − ref_r)]), implicit reward of chosen, of rejected).
    The implicit reward of a completion is β·(log π − log π_ref)."""
    chosen = beta * (pi_chosen - ref_chosen)
    rejected = beta * (pi_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


class DPO(Objective):
    """Sigmoid DPO with an optional SFT term (`sft_weight` × mean cross-entropy of the chosen tokens)."""

    name = "DPO (sigmoid)"

    def __init__(self, beta: float, sft_weight: float = 0.0, reference: nn.Module | None = None) -> None:
        super().__init__()
        self.beta, self.sft_weight = beta, sft_weight
        if reference is not None:
            self.frozen["reference"] = reference

    def reference_logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logp" in batch:
            return batch["ref_chosen_logp"].float(), batch["ref_rejected_logp"].float()
        with torch.no_grad():
            rc, rr, _ = pair_logps(self.frozen["reference"], batch)
        return rc, rr

    def _terms(self, model: nn.Module, batch: Batch):
        pc, pr, count = pair_logps(model, batch)
        rc, rr = self.reference_logps(batch)
        loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, self.beta)
        return loss, chosen, rejected, pc, pr, count

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        loss, chosen, rejected, pc, _, count = self._terms(model, batch)
        metrics = {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
                   "rewards_margin": (chosen - rejected).mean(), "rewards_accuracy": accuracy_of(chosen - rejected)}
        if self.sft_weight:
            sft = -pc.sum() / count.sum().clamp(min=1)
            metrics["sft_loss"] = sft.detach()
            loss = loss + self.sft_weight * sft
        return loss, metrics

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        loss, chosen, rejected, pc, pr, _ = self._terms(model, batch)
        n = float(chosen.shape[0])
        own = (pc - pr).detach()
        return {"val_loss": (float(loss) * n, n), "val_rewards_accuracy": (float(accuracy_of(chosen - rejected)) * n, n),
                "val_rewards_margin": (float((chosen - rejected).sum()), n),
                # the policy's own preference, no reference involved: before vs after training
                "val_logp_accuracy": (float(accuracy_of(own)) * n, n), "val_logp_margin": (float(own.sum()), n),
                **by_kind("val_logp_accuracy", batch, right_of(own))}


@torch.no_grad()
def precompute_reference(reference: nn.Module, pairs: list[Pair], batch_size: int, seq_len: int, pad: int,
                         env: parallel.ParallelEnv, autocast) -> None:
    """Store the reference's summed log-probabilities of both sides on every pair (`Pair.ref`)."""
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batch = to_device(pair_batch(chunk, seq_len, pad), env.device)
        with autocast:
            rc, rr, _ = pair_logps(reference, batch)
        for p, c, r in zip(chunk, rc.tolist(), rr.tolist(), strict=True):
            p.ref = (c, r)


def run_dpo(cfg: Config) -> dict:
    env = parallel.init_env(cfg)
    if env.device.type == "cpu":
        tune_cpu_allocator()
    sp = start_point(cfg, WORKLOAD)
    seq_len, bs, mc = cfg.train.seq_len, cfg.train.batch_size, sp.model_cfg
    train, val, train_stats, val_stats = load_pairs(cfg, sp.chat_format, seq_len, WORKLOAD)
    notes: list[str] = []
    model = sp.build_policy(cfg, env, lambda: Transformer(mc), WORKLOAD, notes)
    reference = sp.build_reference(cfg, env, lambda: Transformer(mc), WORKLOAD)
    pad = pad_id(sp.chat_format)
    evals_pairs = val[: bs * cfg.train.eval_batches * env.dp_world]
    objective = DPO(cfg.dpo.beta, cfg.dpo.sft_weight, reference)
    loader = PairLoader(train, bs, seq_len, pad, cfg.train.seed, rank=env.dp_rank, world=env.dp_world)
    prepare_run_dir(cfg, env, sp.tokenizer_path, WORKLOAD)  # inputs checked: now the run directory
    trainer = Trainer(
        cfg, model, env, loader, objective, eval_batches=None,
        flops_per_token=mc.flops_per_token(seq_len) * (1 if cfg.dpo.precompute_ref else 4 / 3),
        meta={"model": mc.to_dict(), "tokenizer_sha256": sp.tokenizer_sha256, "init_from": str(sp.source),
              "pairs": {"train": train_stats.to_dict(), "val": val_stats.to_dict()}},
        name=WORKLOAD, matmul_shapes=matmul_shapes(mc, 2 * bs * seq_len),
    )
    for note in notes:
        trainer.say(f"init_from: {note}")
    trainer.say(f"training pairs: {train_stats.describe()}")
    trainer.say(f"held-out pairs: {val_stats.describe()}; {len(evals_pairs[env.dp_rank::env.dp_world])} scored per evaluation")
    if cfg.dpo.precompute_ref:
        precompute_reference(reference, train + evals_pairs, bs, seq_len, pad, env, trainer.autocast)
        del objective.frozen["reference"], reference  # every pair now carries its reference log-probabilities
        trainer.say(f"reference log-probabilities computed once for {len(train) + len(evals_pairs):,} pairs")
    trainer.eval_batches = eval_pair_batches(evals_pairs, bs, seq_len, pad, env.dp_rank, env.dp_world)
    if sp.resume is not None:
        trainer.resume_from(sp.resume)
    with parallel.peer_failures_as_errors(env, cfg.parallel.timeout_s):
        last = trainer.fit()
    if env.is_main:
        report_preferences(cfg.out, "dpo", "DPO", train_stats, val_stats, [
            ("policy prefers chosen (log-prob accuracy)", "val_logp_accuracy", "{:.1%}"),
            ("log-prob margin, chosen − rejected (nats)", "val_logp_margin", "{:+.3f}"),
            ("implicit-reward accuracy vs the reference", "val_rewards_accuracy", "{:.1%}"),
            ("implicit-reward margin", "val_rewards_margin", "{:+.4f}"),
        ])
    return last
