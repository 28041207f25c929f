"""One small module per workload on the shared `Trainer` (torchtune's recipe-per-workflow).

Each builds its models, loader and objective and calls `Trainer.fit`. Workloads never import each
other: what they share lives below them, in `kiln.workloads.common` (where a run starts from, the
run directory, the model shape, data preparation on first use), `.preference` (reward, DPO and
GRPO) and `.classification` (the vision and text classifiers). docs/architecture.md has the layers.
"""
