"""One small module per workload on the shared `Trainer` (torchtune's recipe-per-workflow).

Each builds its models, loader and objective and calls `Trainer.fit`; what they share (where a
run starts from, the run directory, the tokenizer check, data preparation on first use) lives
in `kiln.workloads.common`. `pretrain` is here now; sft, reward, dpo, rl, distill, vision and
encoder plug in the same way (docs/architecture.md).
"""
