"""`kiln rl`: GRPO on the shared Trainer.

Each rollout takes `rl.prompts_per_step` prompts, samples a group of `rl.group_size` completions
for each with batched KV-cache generation, scores every completion (a verifiable Python reward
`module:function`, run with a time limit and, for the default code reward, in the sandbox; or a
`kiln reward` run), and turns the rewards into group-normalized advantages. The loss is the
clipped policy-ratio objective with an optional KL penalty to the frozen reference (the
`init_from` model), normalized by the number of completion tokens. Rewards are computed by the
same executors as `kiln prepare` (in this process, local worker processes, or Ray tasks);
generation stays with the policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import Config
from kiln.data.chat import as_format, check_messages, speaks_chat
from kiln.data.executor import Executor
from kiln.data.inputs import check_prompts
from kiln.errors import KilnError
from kiln.hardware import tune_cpu_allocator
from kiln.infer.engine import SamplingParams, end_ids
from kiln.infer.generate import generate
from kiln.infer.load import open_checkpoint
from kiln.model.heads import ScalarHeadModel, sequence_scores
from kiln.model.transformer import Transformer
from kiln.model.weights import load_model_tensors
from kiln.report import plot_over_steps, write_section
from kiln.rewards.runner import _resolve_reward, score_job
from kiln.runs import atomic_write_text
from kiln.train import parallel
from kiln.train.objectives import Batch, Objective
from kiln.train.trainer import Trainer
from kiln.workloads.common import matmul_shapes, prepare_run_dir
from kiln.workloads.preference import pad_id, start_point

WORKLOAD = "rl"


# ---- prompts ---------------------------------------------------------------------------------
@dataclass
class Prompt:
    ids: list[int]  # the rendered prompt
    text: str  # what the reward sees as the prompt (text format: the prompt itself; chat: the last user turn)
    fields: dict  # the row's other fields, passed to the reward as keyword arguments


def read_prompt_rows(path: str, skipped: Counter, limit: int = 0, key: str = "rl.prompts") -> list[dict]:
    """Rows of a prompt JSONL (`{"prompt": text or messages, ...fields}`); malformed rows skipped and counted.
    `key` names the setting that gave `path`, for the errors."""
    p = check_prompts(path, key)
    rows, seen = [], 0
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            seen += 1
            if limit and len(rows) >= limit:
                break
            try:
                row = json.loads(line)
                prompt = row["prompt"]
                if isinstance(prompt, list):
                    check_messages(prompt)
                elif not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, KilnError):
                skipped["malformed"] += 1
                continue
            rows.append(row)
    if not seen:
        raise KilnError(f"rl prompts '{path}' are empty (no rows); give a JSONL file of {{\"prompt\": ...}} rows")
    return rows


def render_prompts(tokenizer, rows: list[dict], fmt: str, budget: int, skipped: Counter) -> list[Prompt]:
    """Prompts as token ids in `fmt` ("chat": the run's chat format, ready for the assistant's turn;
    "text": BOS + the text), `tokenizer` being the run's ChatFormat (or a kiln tokenizer). One
    longer than `budget` tokens is skipped and counted."""
    chat_format = as_format(tokenizer)
    out = []
    for row in rows:
        prompt = row["prompt"]
        fields = {k: v for k, v in row.items() if k != "prompt"}
        if fmt == "chat":
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids, text = chat_format.prompt_ids(messages), messages[-1]["content"]
        else:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            ids = chat_format.text_ids(text)
        if len(ids) > budget:
            skipped["prompt_too_long"] += 1
            continue
        out.append(Prompt(ids, text, fields))
    return out


def load_prompts(cfg: Config, tokenizer, fmt: str, budget: int) -> tuple[list[Prompt], list[Prompt], Counter]:
    rc = cfg.rl
    skipped: Counter = Counter()
    if rc.prompts:
        rows = read_prompt_rows(rc.prompts, skipped, rc.max_prompts)
        if rc.val_prompts:
            val_rows = read_prompt_rows(rc.val_prompts, skipped, key="rl.val_prompts")
        else:
            from kiln.data.preference_data import held_out_split

            rows, val_rows = held_out_split(rows, rc.val_fraction, "rl prompts")
    else:
        from kiln.data.preference_default import default_prompts, docstring_prompts

        if rc.task == "docstring":
            if fmt != "chat":
                raise KilnError("rl.task=docstring asks a chat model for a docstring; start from an sft, dpo or rl run "
                                "(init_from=runs/NAME) or set rl.format=chat")
            rows, val_rows = docstring_prompts(rc.max_prompts or 2000, rc.val_fraction, cfg.data.seed)
        else:
            rows, val_rows = default_prompts(rc.max_prompts or 2000, rc.val_fraction, cfg.data.seed, rc.sandbox)
        for r in rows + val_rows:  # the SFT task's wording in chat format, the function's own header in text
            chat = r.pop("chat_prompt")
            r["prompt"] = chat if fmt == "chat" else r["prompt"]
    train = render_prompts(tokenizer, rows, fmt, budget, skipped)
    val = render_prompts(tokenizer, val_rows, fmt, budget, skipped)
    if not train:
        raise KilnError(f"rl: no usable prompt ({', '.join(f'{k}: {v}' for k, v in skipped.items()) or 'none given'}); "
                        f"prompts must fit train.seq_len - rl.max_new_tokens = {budget} tokens")
    return train, val, skipped


def body_end(text: str) -> int | None:
    """Where a function body completed in plain-text format ends: at the first line that starts at
    column 0 (the model has moved on to the next top-level statement), or None."""
    m = re.search(r"\n(?=\S)", text)
    return m.start() if m else None


# ---- generation ------------------------------------------------------------------------------
@dataclass
class Completion:
    """One sampled completion: `prompt`, the prompt's ids as the policy read them (a healed prompt
    less its backed-off token), `ids`, the completion's (an end token kept), and `healed`, the text
    of the backed-off token that the completion's first token starts with ("" when not healed)."""

    prompt: list[int]
    ids: list[int]
    healed: str = ""


def complete(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
             top_p: float, seed: str, stop_ids: set[int], vocab: int, stop_text=None, tokenizer=None,
             heal: bool = False) -> list[Completion]:
    """Completions of each prompt, by `kiln.infer.generate` on the policy in training (through its
    DDP / FSDP2 wrapper, every rank stepping together). A row ends at a stop id (kept: it is the
    policy's choice too), when `stop_text(ids)` says so, or at `max_new_tokens`; row i samples
    with the seed `seed/i`. `heal` (with `tokenizer`): token healing of text prompts
    (`kiln.infer.healing`): the policy reads a healed prompt less its last token and writes that
    token's text back as the start of its first, as the tokenizer merged it in training."""
    params = [SamplingParams(max_new_tokens, temperature, top_k, top_p, seed=f"{seed}/{i}", heal=heal)
              for i in range(len(prompts))]
    until = (lambda _, ids: stop_text(ids)) if stop_text is not None else None
    seqs = generate(model, prompts, params, stop_ids=stop_ids, tokenizer=tokenizer if heal else None, vocab=vocab,
                    until=until, inference=False, ranks_in_step=True)
    return [Completion(list(s.fed), s.tokens + ([s.stop_token] if s.stop_token is not None else []), s.heal_text)
            for s in seqs]


# ---- rewards ---------------------------------------------------------------------------------
class Scorer:
    """Scores completions: the `rl.reward` function through an `Executor` (in this process, local
    workers or Ray tasks), or a reward model over the token sequences."""

    def __init__(self, cfg: Config, executor: Executor | None, reward_model: nn.Module | None = None,
                 device: torch.device | None = None, pad: int = 0) -> None:
        self.rc, self.executor, self.reward_model, self.device, self.pad = cfg.rl, executor, reward_model, device, pad

    def __call__(self, prompts: list[Prompt], completions: list[str], sequences: list[list[int]]
                 ) -> tuple[list[float], list[str]]:
        if self.reward_model is not None:
            return self._model_scores(sequences), ["reward_model"] * len(sequences)
        jobs = [{"reward": self.rc.reward, "prompt": p.text, "completion": c, "fields": p.fields,
                 "timeout_s": self.rc.reward_timeout_s, "sandbox": asdict(self.rc.sandbox)}
                for p, c in zip(prompts, completions, strict=True)]
        results = self.executor.map(score_job, jobs, "rl: rewards") if self.executor else [score_job(j) for j in jobs]
        return [r for r, _ in results], [why for _, why in results]

    @torch.no_grad()
    def _model_scores(self, sequences: list[list[int]]) -> list[float]:
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        return sequence_scores(self.reward_model, ids.to(self.device), mask.to(self.device)).float().tolist()


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: each reward minus its group's mean, divided by the
    group's standard deviation (sample, n − 1) when `scale`. A group whose rewards are all equal
    gets zero advantages (it teaches nothing)."""
    centered = rewards - rewards.mean(-1, keepdim=True)
    if not scale:
        return centered
    std = rewards.std(-1, keepdim=True)
    return torch.where(std > 0, centered / (std + eps), torch.zeros_like(centered))


# ---- rollouts as a loader --------------------------------------------------------------------
class RolloutLoader:
    """The RL "loader": each new batch is a fresh rollout (sample, score, advantages) made with
    the current policy; with `rl.updates_per_rollout` > 1 the same rollout serves that many steps,
    carrying the log-probabilities it was sampled with (the ratio's denominator)."""

    def __init__(self, cfg: Config, policy: nn.Module, prompts: list[Prompt], scorer: Scorer, tokenizer,
                 fmt: str, env: parallel.ParallelEnv, autocast) -> None:
        self.cfg, self.rc, self.policy, self.prompts, self.scorer = cfg, cfg.rl, policy, prompts, scorer
        chat_format = as_format(tokenizer)  # the run's ChatFormat (or a kiln tokenizer)
        self.tok, self.fmt, self.env, self.autocast = chat_format.tokenizer, fmt, env, autocast
        self.seed = cfg.train.seed
        if len(prompts) < self.rc.prompts_per_step * env.dp_world:
            raise KilnError(f"{len(prompts)} training prompts are fewer than one rollout "
                            f"(rl.prompts_per_step={self.rc.prompts_per_step} × {env.dp_world} ranks); "
                            "give more prompts or lower rl.prompts_per_step")
        self.stop_ids = end_ids(chat_format)
        self.pad = pad_id(chat_format)
        self.epoch, self.pos, self.rollouts = 0, 0, 0
        self.cached: dict | None = None
        self.uses = 0
        self.batch_tokens = 0  # positions in the last batch (`next_batch`)
        self.reasons: Counter = Counter()

    @property
    def tokens_per_batch(self) -> int:
        return self.rc.prompts_per_step * self.rc.group_size * self.cfg.train.seq_len

    def _next_prompts(self) -> list[Prompt]:
        step = self.rc.prompts_per_step * self.env.dp_world
        if self.pos + step > len(self.prompts):
            self.epoch, self.pos = self.epoch + 1, 0
        order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.prompts))
        start = self.pos + self.env.dp_rank * self.rc.prompts_per_step
        self.pos += step
        return [self.prompts[i] for i in order[start : start + self.rc.prompts_per_step]]

    def _stop_text(self):
        if self.fmt != "text":
            return None
        return lambda ids: body_end(self.tok.decode(ids)) is not None

    def complete(self, model: nn.Module, prompts: list[Prompt], temperature: float, top_k: int, top_p: float,
                 seed: str) -> list[Completion]:
        """Completions of `prompts` by `model`; text-format prompts are healed (`rl.heal`)."""
        return complete(model, [p.ids for p in prompts], self.rc.max_new_tokens, temperature, top_k, top_p, seed,
                        self.stop_ids, self.tok.get_vocab_size(), self._stop_text(), self.tok,
                        self.rc.heal and self.fmt == "text")

    def completion_text(self, c: Completion) -> str:
        """What the reward sees: the completion's text after the prompt (a healed prompt's
        backed-off text left out), cut where the function body ends in text format."""
        text = self.tok.decode([t for t in c.ids if t not in self.stop_ids])
        if self.fmt == "text":
            cut = body_end(text)
            text = text[:cut] if cut is not None else text
        return text[len(c.healed):] if text.startswith(c.healed) else text

    def steps_done(self) -> int:
        """Optimizer steps taken so far (each rollout serves rl.updates_per_rollout of them)."""
        return (self.rollouts - 1) * self.rc.updates_per_rollout + self.uses if self.rollouts else 0

    def next_batch(self) -> Batch:
        if self.cached is None or self.uses >= self.rc.updates_per_rollout:
            self.cached, self.uses = self.rollout(), 0
        self.uses += 1
        # the positions the update computes (rows padded to the rollout's longest, not to seq_len),
        # for the trainer's tokens/s and MFU
        self.batch_tokens = self.cached["input_ids"].numel()
        return self.cached

    def rollout(self) -> Batch:
        rc, env = self.rc, self.env
        prompts = [p for p in self._next_prompts() for _ in range(rc.group_size)]
        seed = f"{self.seed}/{self.rollouts}/{env.dp_rank}"
        self.rollouts += 1
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.autocast:
                completions = self.complete(self.policy, prompts, rc.temperature, rc.top_k, rc.top_p, seed)
        finally:
            self.policy.train(was_training)
        texts = [self.completion_text(c) for c in completions]
        rewards, reasons = self.scorer(prompts, texts, [c.prompt + c.ids for c in completions])
        self.reasons.update(reasons)
        r = torch.tensor(rewards, dtype=torch.float32).view(rc.prompts_per_step, rc.group_size)
        adv = group_advantages(r, rc.scale_rewards).flatten()
        batch = sequences_batch([c.prompt for c in completions], [c.ids for c in completions], self.pad)
        batch["advantages"] = adv
        lengths = torch.tensor([len(c.ids) for c in completions], dtype=torch.float32)
        stats = {"reward_mean": r.mean(), "reward_std": r.std(-1).mean(), "zero_variance_groups":
                 (r.std(-1) == 0).float().mean(), "completion_tokens": lengths.mean(),
                 **{f"reason_{k}": torch.tensor(float(v)) for k, v in Counter(reasons).items()}}
        batch.update({f"stat_{k}": v for k, v in stats.items()})
        if rc.updates_per_rollout > 1:
            with torch.no_grad(), self.autocast:
                batch["old_logp"] = token_logps(self.policy, _on(batch, env.device)).cpu()
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "rollouts": self.rollouts, "uses": self.uses,
                "reasons": dict(self.reasons), "cached": self.cached}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.rollouts = int(state["epoch"]), int(state["pos"]), int(state["rollouts"])
        self.uses, self.cached, self.reasons = int(state["uses"]), state["cached"], Counter(state["reasons"])


def _on(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def sequences_batch(prompts: list[list[int]], completions: list[list[int]], pad: int) -> Batch:
    """Prompt + completion rows, right-padded; next-token labels only on completion tokens."""
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq = p + c
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
        if c:
            labels[i, len(p) - 1 : len(seq) - 1] = torch.tensor(c)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B, T) log-probability of each label token under `model` (0 where the label is -100)."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    return -nll.view(labels.shape)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0
              ) -> tuple[torch.Tensor, dict]:
    """The clipped policy-ratio loss with group advantages, token-level normalized:
    Σ_tokens −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β·KL  /  number of completion tokens,
    with ρ = exp(logp − old_logp) and KL the k3 estimate exp(ref − logp) − (ref − logp) − 1."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    m = mask.float()
    n = m.sum().clamp(min=1)
    metrics = {"clip_fraction": (((ratio - 1).abs() > clip_eps).float() * m).sum() / n}
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_coef * kl
        metrics["kl"] = (kl.detach() * m).sum() / n
    return (per_token * m).sum() / n, metrics


class GRPO(Objective):
    """Group-relative policy optimization on rollout batches; evaluation generates greedily for
    held-out prompts and reports their mean reward (for the default reward: the share that parse
    and pass their doctests)."""

    name = "GRPO"

    def __init__(self, rc, reference: nn.Module | None, scorer: Scorer, eval_prompts: list[Prompt],
                 loader: RolloutLoader | None = None) -> None:
        super().__init__()
        self.rc, self.scorer, self.eval_prompts, self.loader = rc, scorer, eval_prompts, loader
        self.samples: list[dict] = []  # every evaluation's greedy completions (this rank's), for rl_samples.jsonl
        self._pending: list[dict] = []
        if reference is not None:
            self.frozen["reference"] = reference

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        logp = token_logps(model, batch)
        old = batch["old_logp"] if "old_logp" in batch else logp.detach()
        ref = None
        if "reference" in self.frozen:
            with torch.no_grad():
                ref = token_logps(self.frozen["reference"], batch)
        mask = batch["labels"] != -100
        loss, metrics = grpo_loss(logp, old, batch["advantages"], mask, self.rc.clip_eps, ref, self.rc.kl_coef)
        metrics.update({k[5:]: v for k, v in batch.items() if k.startswith("stat_")})
        return loss, metrics

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        prompts = [self.eval_prompts[i] for i in batch["prompt_index"].tolist()]
        loader = self.loader
        completions = loader.complete(model, prompts, 0.0, 0, 1.0, "eval")
        texts = [loader.completion_text(c) for c in completions]
        rewards, reasons = self.scorer(prompts, texts, [c.prompt + c.ids for c in completions])
        self._pending += [{"prompt": p.text, "completion": t, "reward": r, "reason": why}
                          for p, t, r, why in zip(prompts, texts, rewards, reasons, strict=True)]
        n = float(len(prompts))
        out = {"val_reward": (sum(rewards), n), "val_completion_tokens": (float(sum(len(c.ids) for c in completions)), n)}
        for why, count in Counter(reasons).items():  # shares of the held-out completions by reason
            out[f"val_reason_{why}"] = (float(count), 0.0)  # divided by every batch's count in eval_finish
        return out

    def eval_finish(self, totals: dict[str, tuple[float, float]]) -> dict[str, float]:
        step = self.loader.steps_done() if self.loader is not None else 0
        self.samples += [{"step": step, **row} for row in self._pending]
        self._pending = []
        n = totals.get("val_reward", (0.0, 0.0))[1]
        totals = {k: (v[0], n) if k.startswith("val_reason_") else v for k, v in totals.items()}
        return super().eval_finish(totals)


def eval_prompt_batches(prompts: list[Prompt], batch_size: int, rank: int, world: int) -> list[Batch]:
    """Index batches over this rank's share of the held-out prompts (every rank gets as many)."""
    usable = len(prompts) - len(prompts) % world
    mine = list(range(rank, usable, world))
    return [{"prompt_index": torch.tensor(mine[i : i + batch_size])} for i in range(0, len(mine), batch_size)]


def load_reward_model(spec: str, tokenizer_sha: str, env: parallel.ParallelEnv, cfg: Config) -> nn.Module:
    """A `kiln reward` run's model, frozen, placed like the policy; its tokenizer must be the policy's."""
    ck = open_checkpoint(spec, "rl.reward_model")
    if ck.info.get("head") != "scalar":
        raise KilnError(f"rl.reward_model={spec} is a {ck.info.get('workload', '?')} run, not a reward model; "
                        "train one with `kiln reward` and name that run")
    if ck.info.get("tokenizer_sha256") != tokenizer_sha:
        raise KilnError(f"rl.reward_model={spec} was trained with a different tokenizer than the policy (init_from); "
                        "train the reward model from the same base run")

    def init(model: ScalarHeadModel) -> None:
        model.init_buffers()
        load_model_tensors(model, ck.tensors, str(ck.path))

    return parallel.build_model(lambda: ScalarHeadModel(ck.model), cfg, env, init, frozen=True)


TASK_REWARDS = {"code": "kiln.rewards.code:code_reward",
                "docstring": "kiln.rewards.code:docstring_reward"}


def run_rl(cfg: Config) -> dict:
    rc = cfg.rl
    rc = dataclasses.replace(rc, reward=rc.reward or TASK_REWARDS[rc.task])
    # the caller's cfg stays as it was. Rollouts run the policy's compiled blocks (train.compile) eagerly
    # (`kiln.infer.engine.Batch`); its updates run them compiled.
    cfg = dataclasses.replace(cfg, rl=rc)
    if cfg.parallel.tp > 1:
        raise KilnError("rl: rollouts decode with a KV cache that does not run under tensor parallelism yet; set "
                        "parallel.tp=1 (parallel.dp_shard shards the policy instead)")
    if cfg.train.seq_len <= rc.max_new_tokens:
        raise KilnError(f"train.seq_len={cfg.train.seq_len} leaves no room for a prompt before rl.max_new_tokens="
                        f"{rc.max_new_tokens}; raise train.seq_len or lower rl.max_new_tokens")
    executor = Executor(rc.executor) if not rc.reward_model else None
    if executor is not None:
        executor.__enter__()  # worker processes start before this process has threads (see Executor)
    try:
        return _run(cfg, executor)
    finally:
        if executor is not None:
            executor.__exit__(None, None, None)


def _run(cfg: Config, executor: Executor | None) -> dict:
    rc = cfg.rl
    env = parallel.init_env(cfg)
    if env.device.type == "cpu":
        tune_cpu_allocator()
    sp = start_point(cfg, WORKLOAD)
    fmt = rc.format if rc.format != "auto" else ("chat" if speaks_chat(sp.info) else "text")
    if fmt == "chat":
        sp.chat_format.check_chat(f"rl: init_from={cfg.init_from}")
    train, val, skipped = load_prompts(cfg, sp.chat_format, fmt, cfg.train.seq_len - rc.max_new_tokens)
    mc = sp.model_cfg
    notes: list[str] = []
    model = sp.build_policy(cfg, env, lambda: Transformer(mc), WORKLOAD, notes)
    reference = sp.build_reference(cfg, env, lambda: Transformer(mc), WORKLOAD) if rc.kl_coef > 0 else None
    reward_model = load_reward_model(rc.reward_model, sp.tokenizer_sha256, env, cfg) if rc.reward_model else None
    if reward_model is None:
        _resolve_reward(rc.reward)  # a wrong name fails now, not at the first rollout
    scorer = Scorer(cfg, executor, reward_model, env.device, pad_id(sp.chat_format))
    eval_prompts = val[: rc.eval_prompts]
    objective = GRPO(rc, reference, scorer, eval_prompts)
    loader = RolloutLoader(cfg, model, train, scorer, sp.chat_format, fmt, env, autocast=contextlib.nullcontext())
    objective.loader = loader
    prepare_run_dir(cfg, env, sp.tokenizer_path, WORKLOAD)  # inputs checked: now the run directory
    trainer = Trainer(
        cfg, model, env, loader, objective,
        eval_batches=eval_prompt_batches(eval_prompts, cfg.train.batch_size, env.dp_rank, env.dp_world) or None,
        flops_per_token=mc.flops_per_token(cfg.train.seq_len),
        meta={"model": mc.to_dict(), "tokenizer_sha256": sp.tokenizer_sha256, "init_from": str(sp.source),
              "format": fmt, **({"reward_model": rc.reward_model} if rc.reward_model else {"reward": rc.reward})},
        name=WORKLOAD, matmul_shapes=matmul_shapes(mc, loader.tokens_per_batch),
    )
    loader.autocast = trainer.autocast  # generate with the precision the Trainer trains in
    for note in notes:
        trainer.say(f"init_from: {note}")
    trainer.say(f"{len(train):,} training prompts, {len(eval_prompts):,} held out for evaluation ({fmt} format)"
                + (f"; skipped: {', '.join(f'{k} {v}' for k, v in skipped.items())}" if skipped else ""))
    trainer.say(f"rollouts: {rc.prompts_per_step} prompts × {rc.group_size} completions of up to "
                f"{rc.max_new_tokens} tokens; rewards from "
                + (f"the reward model {rc.reward_model}" if rc.reward_model else f"{rc.reward} ({executor.label})"))
    if not rc.reward_model:
        from kiln.rewards.sandbox import describe_isolation

        trainer.say(f"sandbox: {describe_isolation(rc.sandbox)}")
    if sp.resume is not None:
        trainer.resume_from(sp.resume)
    with parallel.peer_failures_as_errors(env, cfg.parallel.timeout_s):
        last = trainer.fit()
    trainer.say("reward reasons over the run: " + ", ".join(f"{k} {v:,}" for k, v in loader.reasons.most_common()))
    if env.is_main:
        report_rl(cfg, loader, skipped, fmt, objective.samples)
    return last


SHOWN_SAMPLES = 4  # held-out completions quoted in the report, at the first and the last evaluation


def report_rl(cfg: Config, loader: RolloutLoader, skipped: Counter, fmt: str, samples: list[dict]) -> None:
    """The report's GRPO section: the held-out reward curve (a plot), the run's reward reasons and
    what the policy wrote for the same held-out prompts at the first and the last evaluation (all
    of them in rl_samples.jsonl)."""
    from kiln.train.metrics import read_metrics

    metrics = read_metrics(cfg.out)
    evals = [m for m in metrics if "val_reward" in m]
    val = [(m["step"], m["val_reward"]) for m in evals]
    train = [(m["step"], m["reward_mean"]) for m in metrics if "reward_mean" in m]
    lines = [f"- prompts in {fmt} format; reward: "
             + (f"reward model `{cfg.rl.reward_model}`" if cfg.rl.reward_model else f"`{cfg.rl.reward}`")]
    if skipped:
        lines.append("- prompts skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    lines.append("- completions by reward reason: " + ", ".join(f"{k} {v:,}" for k, v in loader.reasons.most_common()))
    lines.append("- tokens/s and MFU count the positions each update trains on (prompt + completion, rows padded to "
                 "the rollout's longest) over the whole step, sampling and scoring the rollout included")
    if val:
        lines.append(f"- held-out mean reward (greedy): **{val[0][1]:.3f} at step {val[0][0]} → {val[-1][1]:.3f} at "
                     f"step {val[-1][0]}**")
    if evals and any(k.startswith("val_reason_") for k in evals[0]):
        first, last = evals[0], evals[-1]
        if first.get("val_reason_syntax_error") is not None or last.get("val_reason_syntax_error") is not None:
            parse = [1 - m.get("val_reason_syntax_error", 0.0) - m.get("val_reason_no_function", 0.0) for m in (first, last)]
            lines.append(f"- held-out completions that parse: {parse[0]:.1%} at step {first['step']} → {parse[1]:.1%} "
                         f"at step {last['step']}")
        kinds = sorted({k[len("val_reason_"):] for m in (first, last) for k in m if k.startswith("val_reason_")})
        lines.append("- held-out completions by reason, first → last evaluation: " + ", ".join(
            f"{k} {first.get('val_reason_' + k, 0.0):.0%} → {last.get('val_reason_' + k, 0.0):.0%}" for k in kinds))
    if train and plot_over_steps(Path(cfg.out) / "rl_reward.png", [("rollout mean reward (sampled)", train, False),
                                                                    ("held-out reward (greedy)", val, True)],
                                 "reward", "GRPO reward"):
        lines += ["", "![rollout and held-out reward](rl_reward.png)"]
    if samples:
        atomic_write_text(Path(cfg.out) / "rl_samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
        steps = sorted({r["step"] for r in samples})
        lines += ["", f"Held-out greedy completions (all {len(samples):,}, every evaluation: `rl_samples.jsonl`):", ""]
        for step in dict.fromkeys((steps[0], steps[-1])):
            for r in [r for r in samples if r["step"] == step][:SHOWN_SAMPLES]:
                prompt = r["prompt"].strip().splitlines()[0][:80] if r["prompt"].strip() else ""
                lines += [f"- step {step}, reward {r['reward']:.2f} ({r['reason']}) — `{prompt}`", "",
                          "  ```", *[f"  {ln}" for ln in (r["completion"].rstrip() or "(empty)").splitlines()[:12]],
                          "  ```"]
    write_section(cfg.out, "grpo", ["## GRPO", "", *lines])
