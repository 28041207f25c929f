"""What the classifiers (`kiln vision`, `kiln classify`) share: the cross-entropy objective with
accuracy, predictions gathered across ranks, the confusion matrix and its plot, and the newest
evaluation in a run's metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln.train import parallel
from kiln.train.objectives import Batch, Objective
from kiln.train.trainer import to_device


class Classification(Objective):
    """Cross-entropy over classes of a model that maps the batch's `inputs` to (B, classes) logits;
    logs accuracy, and validation loss and accuracy summed over every example."""

    name = "classification cross-entropy"

    def __init__(self, inputs: tuple[str, ...] = ("pixel_values",), label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.inputs, self.label_smoothing = inputs, label_smoothing

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**{k: batch[k] for k in self.inputs if k in batch}).float()

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        logits = self.logits(model, batch)
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=self.label_smoothing)
        return loss, {"accuracy": (logits.detach().argmax(-1) == batch["labels"]).float().mean()}

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        logits = self.logits(model, batch)
        n = float(batch["labels"].numel())
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        return {"val_loss": (float(loss), n), "val_accuracy": (float((logits.argmax(-1) == batch["labels"]).sum()), n)}


@torch.no_grad()
def predict(model: nn.Module, batches: list[Batch], objective: Classification, env: parallel.ParallelEnv) -> np.ndarray:
    """Predicted classes of every batch, in order. Every rank runs every batch (sharded models need
    all ranks in each forward), so every rank returns the same predictions."""
    model.eval()
    try:
        out = [objective.logits(model, to_device(b, env.device)).argmax(-1).cpu() for b in batches]
    finally:
        model.train()
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def latest_metrics(run: Path) -> dict:
    """The newest logged value of every metric of the run (across resumes): what a launch that
    found the run already finished still reports."""
    from kiln.train.metrics import read_metrics

    out: dict = {}
    for record in read_metrics(run):
        out.update(record)
    return out


def confusion(labels: np.ndarray, predicted: np.ndarray, n: int) -> np.ndarray:
    """(true, predicted) counts."""
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (labels, predicted), 1)
    return m


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1 + 0.45 * n))
    ax.imshow(matrix, cmap="Blues")
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(n), classes, rotation=90 if max(map(len, classes)) > 2 else 0)
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
