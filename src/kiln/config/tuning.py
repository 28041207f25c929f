"""Post-training workloads: `sft.*` and `lora.*` (fine-tuning), `preference.*` and `dpo.*`, `rl.*` and its
`sandbox`, `distill.*`, and `speedrun.*` (which of them the main job runs after pretraining)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kiln.config.data import ExecutorConfig
from kiln.config.schema import ranged

# The block projections LoRA can adapt (attention: wq wk wv wo; SwiGLU MLP: w1 w2 w3).
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoRAConfig:
    """Low-rank adapters (`kiln.model.lora`): rank 0 = full fine-tuning."""

    rank: int = ranged(0, ge=0)  # > 0: train rank-r adapters on `targets`, every base weight frozen
    alpha: float = ranged(16.0, gt=0)  # the adapters' output is scaled by alpha / rank
    dropout: float = ranged(0.0, ge=0, lt=1)  # dropout on the adapters' input while training
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # which projections get adapters

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"lora.targets={self.targets} must be a non-empty list of {', '.join(LORA_TARGETS)}")


@dataclass
class SFTConfig:
    """`kiln sft`: supervised fine-tuning on conversations (see docs/fine-tuning.md)."""

    data: str = ""  # JSONL of {"messages": [{role, content}]} or {"prompt", "completion"}; "" = the default task
    val_data: str = ""  # held-out JSONL in the same formats; "" = hold out sft.val_fraction of sft.data
    val_fraction: float = ranged(0.05, gt=0, lt=1)
    train_on: Literal["assistant", "last"] = "assistant"  # loss on every assistant turn, or only the last
    too_long: Literal["drop", "truncate"] = "drop"  # a conversation longer than train.seq_len + 1 tokens
    strict: bool = False  # stop at the first malformed record instead of skipping and counting it
    default_source: str = "stdlib"  # the default task's functions: "stdlib" or a directory of .py files
    default_max_chars: int = ranged(600, ge=64)  # the default task keeps functions up to this long
    eval_prompts: int = ranged(32, ge=0)  # held-out prompts answered greedily for the task metric; 0 = off
    eval_max_new_tokens: int = ranged(48, ge=1)  # longest reply the task metric generates (and scores)


@dataclass
class PreferenceConfig:
    """Preference pairs for `kiln reward` and `kiln dpo` (TRL's format; docs/fine-tuning.md)."""

    data: str = ""  # JSONL of {prompt, chosen, rejected} (text or message lists); "" = the default stdlib pairs
    val_data: str = ""  # held-out pairs in the same format; "" = hold out preference.val_fraction of the prompts
    val_fraction: float = ranged(0.1, gt=0, lt=1)
    max_pairs: int = ranged(0, ge=0)  # use at most this many pairs (0 = all; the default pairs: 4000)
    strict: bool = False  # stop at the first malformed row instead of skipping and counting it


@dataclass
class DPOConfig:
    """`kiln dpo`: direct preference optimization against a frozen reference (init_from)."""

    beta: float = ranged(0.1, gt=0)  # strength of the implicit KL to the reference
    sft_weight: float = ranged(0.0, ge=0)  # add this × the chosen completion's cross-entropy to the loss
    precompute_ref: bool = True  # score every pair with the reference once, then free it (else per batch)


@dataclass
class SandboxConfig:
    """Limits for running model-written code (`kiln.rewards.sandbox`)."""

    timeout_s: float = ranged(5.0, gt=0)  # wall clock per run (the CPU limit is the same, rounded up)
    memory_mb: int = ranged(512, ge=32)  # address space (RLIMIT_AS)
    max_output_bytes: int = ranged(65536, ge=1)  # stdout + stderr; past it the run is stopped
    max_procs: int = ranged(16, ge=1)  # processes of the sandbox user (RLIMIT_NPROC)
    max_file_mb: int = ranged(16, ge=0)  # largest file the program may write (RLIMIT_FSIZE)
    tmp_dir: str = ""  # where the private working directories go; "" = the system's temporary directory


@dataclass
class RLConfig:
    """`kiln rl`: GRPO on prompts with a verifiable reward or a reward model."""

    prompts: str = ""  # JSONL of {prompt, ...fields passed to the reward}; "" = the default task (rl.task)
    # the default task: "code" writes a standard-library function (its body after pretraining), rewarded
    # for parsing and passing its doctests; "docstring" (chat models) writes a function's docstring,
    # rewarded by word F1 against the real one
    task: Literal["code", "docstring"] = "code"
    val_prompts: str = ""  # held-out prompts; "" = hold out rl.val_fraction of rl.prompts
    val_fraction: float = ranged(0.1, gt=0, lt=1)
    max_prompts: int = ranged(0, ge=0)  # use at most this many prompts (0 = all; the default task: 2000)
    format: Literal["auto", "chat", "text"] = "auto"  # auto: chat after sft/dpo/rl, plain text after pretrain
    reward: str = ""  # module:function(prompt, completion, **fields); "" = the task's (code_reward, docstring_reward)
    reward_model: str = ""  # a `kiln reward` run to score completions instead of rl.reward
    reward_timeout_s: float = ranged(10.0, gt=0)  # a reward call running longer scores 0 (counted)
    group_size: int = ranged(8, ge=2)  # completions sampled per prompt (G)
    prompts_per_step: int = ranged(4, ge=1)  # prompts per rollout (per data-parallel rank)
    max_new_tokens: int = ranged(96, ge=1)
    temperature: float = ranged(1.0, gt=0)
    top_k: int = ranged(0, ge=0)  # 0 = off
    top_p: float = ranged(1.0, gt=0, le=1)  # 1 = off
    # token healing of text-format prompts (kiln.infer.healing): a prompt ending in "\n" may go on with
    # "\n    " as the tokenizer merged it in training; chat prompts are never healed
    heal: bool = True
    clip_eps: float = ranged(0.2, gt=0, lt=1)  # the policy ratio is clipped to [1 - eps, 1 + eps]
    kl_coef: float = ranged(0.0, ge=0)  # β of the KL penalty to the reference (0 = no reference model)
    scale_rewards: bool = True  # divide advantages by the group's standard deviation
    updates_per_rollout: int = ranged(1, ge=1)  # optimizer steps on each rollout (the ratio departs from 1 after the first)
    eval_prompts: int = ranged(32, ge=0)  # held-out prompts scored (greedy) at each evaluation; 0 = off
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)  # where rewards are computed (local, ray)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class DistillConfig:
    """`kiln distill`: train the student (`model.*`) on a frozen teacher (see docs/quantization.md, "Distillation")."""

    teacher: str = ""  # the teacher run (or checkpoint directory); same tokenizer as the data
    alpha: float = ranged(0.5, ge=0, le=1)  # loss = alpha · cross-entropy + (1 - alpha) · T² · divergence
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = ranged(0.5, gt=0, lt=1)  # jsd: the mixture's share of the teacher
    temperature: float = ranged(1.0, gt=0)  # both distributions are softened by it
    teacher_logits: Literal["online", "cached"] = "online"  # cached: top-k log-probabilities kept on disk per window
    top_k: int = ranged(64, ge=1)  # cached: teacher tokens kept per position
    cache_dir: str = ""  # cached: where; "" = <out>/teacher_cache (share one across students of a teacher)
    on_policy: float = ranged(0.0, ge=0, le=1)  # share of batches the student writes itself (from a prompt) and the teacher scores
    prompt_len: int = ranged(16, ge=1)  # on-policy: tokens of each training window kept as the prompt


@dataclass
class SpeedrunConfig:
    """`kiln speedrun` of a text recipe: after prepare, pretrain and samples, these post-training
    stages, each a run directory under `out` (see README "Two commands")."""

    # sft: the default chat task; dpo: from the SFT model on the default pairs; rl: GRPO from the
    # DPO (else SFT) model on the docstring task; eval: the pretrained model's held-out figures and
    # code tasks; serve: latency and cost per query through the serving engine; quantize: INT8 and
    # INT4 (GPTQ) copies of the pretrained model; distill: it teaches a student a fifth its size.
    # quantize and distill add a table of every model's size, bits per byte, speed and cost.
    stages: list[Literal["sft", "dpo", "rl", "eval", "serve", "quantize", "distill"]] = field(
        default_factory=lambda: ["sft", "dpo", "rl", "eval", "serve", "quantize", "distill"])
    sft_steps: int = ranged(60, ge=1)
    dpo_steps: int = ranged(40, ge=1)
    dpo_pairs: int = ranged(1000, ge=20)  # default preference pairs drawn (a tenth held out)
    rl_steps: int = ranged(16, ge=1)
    distill_steps: int = ranged(400, ge=1)
    student: list[str] = field(  # the student's model.* overrides
        default_factory=lambda: ["preset=tiny", "d_model=192", "n_layers=1", "n_heads=4", "n_kv_heads=2"])


@dataclass
class ScaleConfig:
    """`kiln scale`: a ladder of pretraining runs (every width × every token budget) on the recipe's
    data, model and schedule, fitted to L(N, D) = E + A/N^α + B/D^β (see docs/planning.md)."""

    widths: list[int] = ranged(ge=1, default_factory=lambda: [64, 96, 128])  # model.d_model of each size (depth: model.*)
    # each size's token budgets, as tokens per parameter (Chinchilla's compute-optimal is about 20)
    tokens_per_param: list[float] = ranged(gt=0, default_factory=lambda: [5.0, 10.0, 20.0])
    bootstrap: int = ranged(100, ge=0)  # refits on runs resampled with replacement, for the intervals
    min_steps: int = ranged(10, ge=1)  # a rung trains at least this many steps
