"""What the one training loop optimizes: an `Objective` maps (model, batch) to a loss and metrics.

A batch is a dict of tensors: `input_ids`, `labels` (-100 = no loss), optional `positions`,
`attention_mask`, `document_ids`, plus whatever an objective needs (`chosen_*`/`rejected_*`,
`advantages`, `pixel_values`, ...). The loop never assumes next-token loss; it calls

- `objective.loss(model, batch) -> (loss, metrics)`: the scalar to backpropagate and a dict of
  floats or 0-d tensors to log (averaged over the step's micro-batches);
- `objective.eval_step(model, batch) -> {name: (sum, count)}` and `objective.eval_finish(totals)`:
  validation metrics, summed over the evaluation batches (and data-parallel ranks) before being
  turned into means, so every batch and rank weighs by its real count;
- `objective.pipeline_loss(output, batch)` only where the objective can run under pipeline
  parallelism (the last stage sees only its logits and the labels); `None` means it cannot, and
  the run says so in one line instead of silently swapping in cross-entropy;
- `objective.frozen`: models the objective holds but does not train (a DPO reference, a
  distillation teacher); the workload places each with `parallel.parallelize(..., frozen=True)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]

MODEL_INPUTS = ("positions", "attention_mask", "document_ids")


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The optional model keyword arguments a batch carries (positions, masks)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over labelled tokens, number of labelled tokens); labels -100 are skipped.
    With `vocab`, the softmax runs over the tokenizer's ids only: the rows a vocabulary padded to a
    multiple of 64 adds are no tokens, and every figure kiln calls a loss or bits per byte leaves
    them out, so that training, `kiln eval` and `kiln quantize` give one number for one model."""
    if vocab is not None and vocab < logits.shape[-1]:
        logits = logits[..., :vocab]
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return total, (labels != -100).sum()


def bits_per_byte(nats_per_token: float, tokens_per_byte: float) -> float:
    """A loss in nats per token as bits per byte of text, at the split's tokens per byte."""
    return nats_per_token / math.log(2) * tokens_per_byte


def next_token_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of each labelled token. A batch with no labelled token gives 0 with a
    zero gradient, not NaN (a conversation whose assistant turns were all cut off)."""
    total, n = token_cross_entropy(model(batch["input_ids"], **model_inputs(batch)), batch["labels"])
    return total / n.clamp(min=1)


class Objective:
    """The interface; subclasses set `name` and implement `loss` (and usually the eval pair)."""

    name = "objective"
    frozen: dict[str, nn.Module]

    def __init__(self) -> None:
        self.frozen = {}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        loss, _ = self.loss(model, batch)
        return {"val_loss": (float(loss), 1.0)}

    def eval_finish(self, totals: dict[str, tuple[float, float]]) -> dict[str, float]:
        return {k: s / max(n, 1e-12) for k, (s, n) in totals.items()}

    pipeline_loss: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None


class LanguageModeling(Objective):
    """Next-token cross-entropy (pretraining; SFT with -100 on the prompt) over the tokenizer's
    `vocab` ids (None: every row of the model's head). Validation reports the loss per token and,
    given the validation split's tokens per byte, bits per byte."""

    name = "next-token cross-entropy"

    def __init__(self, tokens_per_byte: float | None = None, vocab: int | None = None) -> None:
        super().__init__()
        self.tokens_per_byte, self.vocab = tokens_per_byte, vocab

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        return self.pipeline_loss(model(batch["input_ids"], **model_inputs(batch)), batch["labels"]), {}

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        total, n = token_cross_entropy(model(batch["input_ids"], **model_inputs(batch)), batch["labels"], self.vocab)
        return {"val_loss": (float(total), float(n))}

    def eval_finish(self, totals: dict[str, tuple[float, float]]) -> dict[str, float]:
        out = super().eval_finish(totals)
        if self.tokens_per_byte and "val_loss" in out:
            out["val_bpb"] = bits_per_byte(out["val_loss"], self.tokens_per_byte)
        return out

    def pipeline_loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, n = token_cross_entropy(output, labels, self.vocab)
        return total / n.clamp(min=1)
