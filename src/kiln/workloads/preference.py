"""What the preference workloads (`kiln reward`, `kiln dpo`, `kiln rl`) share: where an alignment
run starts (`start_point`: the `init_from` model, its tokenizer, this run's resume point), the
policy and its frozen reference built from there, pair accuracies, and the report section of a
preference run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kiln.config import Config
from kiln.data.chat import ChatFormat, as_format
from kiln.errors import KilnError
from kiln.infer.load import open_checkpoint
from kiln.model.config import ModelConfig
from kiln.report import write_section
from kiln.runs import sha256_file
from kiln.train import parallel
from kiln.train.checkpoint import CheckpointManager
from kiln.train.metrics import read_metrics
from kiln.train.restore import load_init_weights
from kiln.workloads.common import build_trained, model_config_for, resolve_resume


@dataclass
class StartPoint:
    """Where an alignment run starts: the `init_from` checkpoint, its tokenizer and model shape,
    and (when continuing) this run's own checkpoint to resume."""

    source: Path
    info: dict
    tokenizer_path: Path
    tokenizer: object
    chat_format: ChatFormat  # the tokenizer's ids and chat format (kiln's, or an imported model's template)
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
    ck = open_checkpoint(cfg.init_from, "init_from", f"{workload}: init_from={cfg.init_from}")
    model_cfg = model_config_for(cfg, ck.tokenizer.get_vocab_size(), ck.model)
    ckpt = CheckpointManager(Path(cfg.out), cfg.train.keep_last)
    resume = resolve_resume(cfg, ckpt, model_cfg, workload)
    return StartPoint(ck.path, ck.info, ck.tokenizer_file, ck.tokenizer, ck.chat_format, model_cfg, ckpt, resume)


def pad_id(fmt) -> int:
    """The id padding positions hold (they carry no loss and are masked): the run's ChatFormat's."""
    return as_format(fmt).pad


def right_of(margin: torch.Tensor) -> torch.Tensor:
    """1 for each pair ranked right by `margin` (chosen − rejected), 0.5 for a tie, else 0."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def accuracy_of(margin: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right by `margin`; a tie counts half."""
    return right_of(margin).mean()


def report_preferences(run_dir: str, name: str, title: str, train_stats, val_stats, rows: list[tuple[str, str, str]]) -> None:
    """The report section of a preference run: data counts and each metric at the start and the end."""
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
    write_section(run_dir, name, [f"## {title}", "", *lines])
