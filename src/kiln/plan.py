"""`kiln plan`: memory, FLOPs, time, cost and communication for a model and token budget, and a parallelism advisor.

Before anyone spends GPU-hours this answers: how much memory each GPU needs (weights, gradients,
optimizer states, activations with and without checkpointing) under every candidate layout
dp_replicate × dp_shard (FSDP / ZeRO-3) × tp × pp; how many FLOPs, days, GPU-hours and dollars
the run takes; how much each parallel dimension communicates per step, over which link, and how
much of that the compute does not hide; which layout of a GPU count is the fastest that fits; and,
choosing the count (gpus=0), the time/cost frontier over counts and the one `objective` picks. It
does the same for fine-tuning (full and LoRA) and for inference economics (weights + KV cache,
bandwidth-bound decode speed, $ per million tokens).

A step is compute + exposed communication + pipeline bubble (`evaluate_layout`). Compute is model
FLOPs (`kiln.model.config.ModelConfig.flops_per_token`) at an assumed MFU, which by PaLM's
definition counts model FLOPs only: activation checkpointing's recomputed forward does not slow a
layout down at the same MFU, it raises the hardware FLOPs utilization (HFU) that MFU takes, and
the plan reports that HFU beside the time. Tensor- and pipeline-parallel traffic is on the critical
path; FSDP's and DDP's hides behind the compute it overlaps, up to that compute.

Every training run asks `predict_run` about itself before its first step (the same models for one
concrete layout and device) and writes the comparison with what it measured to `plan_vs_run.json`;
`calibrate=RUN,…` plans with the MFU those runs measured (`read_calibration`).

The activation count is not a textbook constant: it is the exact list of tensors kiln's
transformer (`kiln.model.transformer`) saves for backward, checked against a measured CPU run
in tests/test_plan.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Literal

from kiln.config import model_section, ranged
from kiln.errors import KilnError
from kiln.hardware import GPU_PRICES, GPUS, GPUSpec, gpu_spec
from kiln.model.config import ModelConfig
from kiln.scaling import Fit, read_fit

GB = 1e9  # datasheets count memory and bandwidth in powers of ten


# ---- the config ------------------------------------------------------------------------------
PlanModelSection = model_section("llama3-8b")  # model.preset plus any ModelConfig field as an override

# What tokens=0 means, per workload: assumptions to replace with your own budget (tokens=).
DEFAULT_TOKENS = {
    "pretrain": 15e12,  # Llama 3's pretraining corpus
    "finetune-full": 1e9,  # a large fine-tuning set seen for a few epochs
    "finetune-lora": 1e9,
    "inference": 1e9,  # tokens served, for the cost column
}

# Pretraining takes thousands of optimizer steps (Pythia: 143k; GPT-3 125M: 600k; a Chinchilla-optimal
# GPT-2 124M at 0.5M tokens a step: 5k): a plan with fewer spends a global batch larger than the run can use,
# and its GPU count (every data-parallel rank takes a share of one step) is not a run anyone would make.
MIN_PRETRAIN_STEPS = 1000


def batch_for_steps(tokens: float, seq_len: int, global_batch_tokens: int, steps: int = MIN_PRETRAIN_STEPS) -> int:
    """`global_batch_tokens`, or, when `tokens` would be fewer than `steps` steps of it, the largest
    power-of-two number of sequences (one at least) that gives `steps`: in tokens."""
    if tokens / global_batch_tokens >= steps:
        return global_batch_tokens
    sequences = max(1, int(tokens / steps / seq_len))
    return min(global_batch_tokens, seq_len * 2 ** (sequences.bit_length() - 1))


@dataclass
class InterconnectConfig:
    nvlink_gbps: float = ranged(0.0, ge=0)  # NVLink GB/s per GPU, both directions as datasheets quote it; 0 = the GPU's
    ib_gbits: float = ranged(400.0, gt=0)  # InfiniBand Gb/s per GPU (one NIC per GPU), each direction


@dataclass
class PricesConfig:
    # $ per GPU-hour: assumptions (typical 2025 cloud on-demand rates), not quotes.
    a100: float = ranged(GPU_PRICES["a100"], ge=0)
    h100: float = ranged(GPU_PRICES["h100"], ge=0)
    h200: float = ranged(GPU_PRICES["h200"], ge=0)
    b200: float = ranged(GPU_PRICES["b200"], ge=0)


@dataclass
class LoraPlanConfig:
    rank: int = ranged(16, ge=1)  # adapters on all seven projections of every block (wq wk wv wo w1 w3 w2)


@dataclass
class InferencePlanConfig:
    batch: int = ranged(1, ge=1)  # sequences decoded together
    context: int = ranged(8192, ge=1)  # tokens held in the KV cache per sequence
    # Stored weights: auto = `precision`; int8 / int4 are `kiln quantize`'s weight-only formats (the KV cache and
    # the matmuls stay in `precision`).
    weights: Literal["auto", "fp32", "bf16", "fp16", "fp8", "int8", "int4"] = "auto"
    group_size: int = ranged(64, ge=1)  # int4: weights sharing one fp16 scale and minimum


@dataclass
class PlanConfig:
    model: PlanModelSection = field(default_factory=PlanModelSection)
    workload: Literal["pretrain", "finetune-full", "finetune-lora", "inference"] = "pretrain"
    tokens: float = ranged(0.0, ge=0)  # training tokens (or tokens served, for inference); 0 = DEFAULT_TOKENS[workload]
    seq_len: int = ranged(0, ge=0)  # training sequence length; 0 = the model's max_seq_len
    micro_batch: int = ranged(0, ge=0)  # sequences per GPU per forward/backward; 0 = per layout, the shortest step that fits
    global_batch_tokens: int = ranged(4_194_304, ge=1)  # tokens per optimizer step (Llama 3 started at 4M)
    gpu: str = "H100"  # A100, H100, H200 or B200
    gpus: int = ranged(0, ge=0)  # 0 = choose the count by `objective`
    gpus_per_node: int = ranged(8, ge=1)
    max_gpus: int = ranged(32768, ge=1)  # the largest count tried when gpus=0
    max_days: float = ranged(90.0, gt=0)  # wall-clock limit when gpus=0: counts that take longer are not chosen
    # A job's time before its first step (scheduling, container start, NCCL set-up, loading), on every GPU:
    # added to its days and paid for, so a small run is not spread over GPUs that spend it waiting
    startup_minutes: float = ranged(10.0, ge=0)
    # How gpus=0 picks among the counts that finish within max_days: balanced = the fastest costing at most
    # cost_tolerance more than the cheapest; cheapest; fastest. Each count runs its fastest layout.
    objective: Literal["balanced", "cheapest", "fastest"] = "balanced"
    cost_tolerance: float = ranged(0.05, ge=0)  # balanced: 0.05 = up to 5% over the cheapest
    max_pp: int = ranged(16, ge=1)  # largest pipeline degree tried
    interconnect: InterconnectConfig = field(default_factory=InterconnectConfig)
    precision: Literal["bf16", "fp16", "fp8", "fp32"] = "bf16"
    # Assumed model-FLOPs utilization while computing (Llama 3 405B reported 38-43% over whole steps): model
    # FLOPs only, so time does not depend on checkpointing (its recomputed forward shows up as the HFU a layout
    # needs instead); exposed communication and the pipeline bubble are added on top.
    mfu: float = ranged(0.4, gt=0, le=1)
    # Runs (RUN[,RUN…]) whose measured MFU replaces `mfu`: the median of what their plan_vs_run.json measured.
    calibrate: list[str] = field(default_factory=list)
    activation_checkpointing: Literal["auto", "on", "off"] = "auto"  # auto = only where a layout needs it to fit
    max_memory_fraction: float = ranged(0.9, gt=0, le=1)  # the rest of HBM is CUDA context, NCCL buffers, fragmentation
    price_per_gpu_hour: float = ranged(0.0, ge=0)  # 0 = prices.<gpu>
    prices: PricesConfig = field(default_factory=PricesConfig)
    lora: LoraPlanConfig = field(default_factory=LoraPlanConfig)
    inference: InferencePlanConfig = field(default_factory=InferencePlanConfig)
    json: bool = False  # print one JSON object instead of tables
    # A `kiln scale` directory (its scale.json): forecast the planned run's validation bits per byte.
    fit: str = ""
    target_bpb: float = ranged(0.0, ge=0)  # with fit=: the cheapest model size and tokens expected to reach it


# ---- sizes -----------------------------------------------------------------------------------
_STORE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}  # a stored weight or KV entry (inference, frozen LoRA base)
_ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}  # fp8 training keeps activations in bf16 between matmuls


def weight_bytes(fmt: str, group_size: int = 64) -> float:
    """Bytes per stored weight: a float format, or `kiln quantize`'s int8 (one byte; the fp32 scale
    per output row is negligible) and int4 (half a byte, plus an fp16 scale and minimum per group)."""
    if fmt == "int8":
        return 1.0
    if fmt == "int4":
        return 0.5 + 4 / group_size
    return _STORE_BYTES[fmt]


def _state_bytes(precision: str) -> tuple[int, int, int]:
    """(weights, grads, optimizer) bytes per trainable parameter with AdamW.

    fp32: fp32 weights, fp32 grads, Adam m and v (4 + 4 + 8). Mixed precision (bf16/fp16/fp8):
    a bf16 working copy (2), fp32 grads (4: accumulated and reduced in fp32 so small updates are
    not lost) and fp32 master weights + m + v (12) — Megatron's accounting, 18 B/param; FSDP2
    with an fp32 master and no persistent bf16 copy needs 16, so this errs on the safe side.
    """
    return (4, 4, 8) if precision == "fp32" else (2, 4, 12)


def lora_layer_params(model: ModelConfig, rank: int) -> int:
    """LoRA parameters (A and B) in one block with adapters on all seven projections."""
    d, hd, f = model.d_model, model.head_dim, model.ffn_hidden
    q, kv = model.n_heads * hd, model.n_kv_heads * hd
    return rank * ((d + q) + 2 * (d + kv) + (q + d) + 3 * (d + f))


def activation_bytes_per_token(
    model: ModelConfig, precision: str = "fp32", seq_len: int = 0, flash_attention: bool = True, lora_rank: int = 0
) -> float:
    """Bytes one block of kiln's transformer saves for backward, per token (no TP, no checkpointing).

    Counted tensor by tensor (and measured with saved-tensor hooks), in the activation dtype:
    attention half 5·d + 2·kv — the block input, x·rstd and the normed input (RMSNorm), q after
    rotary, k and v at their own n_kv_heads width (SDPA's enable_gqa shares them across query
    heads without expanding), and the attention output; MLP half 3·d + 4·F — input, x·rstd,
    normed input, w1 and w3 outputs, silu(w1 x) and the gated product. In fp32: the two RMSNorm
    rstd values and, with flash attention, a logsumexp per head. Without flash attention (the
    math path) the softmax probabilities, n_heads·seq_len per token, replace the logsumexp.
    This is Korthikanti et al.'s s·b·h·(34 + 5·a·s/h) redone for a Llama block (SwiGLU, no
    dropout): 20·h + 8·F bytes per token in bf16, about 48·h for Llama 3's F = 3.5·h.
    Where the heads' width n_heads·head_dim differs from d (Qwen3), q and the attention output
    take that width; per-head q/k norms (Qwen3) keep q and k twice more (their input and x·rstd)
    and an rstd per head.
    """
    d, f, nq = model.d_model, model.ffn_hidden, model.n_heads
    q, kv = nq * model.head_dim, model.n_kv_heads * model.head_dim
    elems = 6 * d + 2 * q + 2 * kv + 4 * f + 7 * lora_rank  # LoRA adds each adapter's rank-r intermediate
    fp32 = 2 + nq
    if model.qk_norm:  # q and k before the norm and x·rstd (for the gain's gradient), and an rstd per head
        elems += 2 * (q + kv)
        fp32 += nq + model.n_kv_heads
    if not flash_attention:
        elems += nq * (seq_len or model.max_seq_len)
        fp32 -= nq
    return elems * _ACT_BYTES[precision] + fp32 * 4


def estimate_training_memory(
    model: ModelConfig,
    batch: int,
    seq_len: int,
    precision: str = "fp32",
    activation_checkpointing: bool = False,
    dp_shard: int = 1,
    tp: int = 1,
    pp: int = 1,
    microbatches: int = 1,
    flash_attention: bool = True,
    lora_rank: int = 0,
    schedule: str = "1f1b",
) -> dict[str, float]:
    """Peak bytes per GPU for one AdamW training step, for the worst pipeline stage.

    Keys: weights, grads, optimizer, activations (the blocks', plus token ids and the final
    norm), logits (the fp32 log-probabilities cross-entropy keeps: batch·seq·vocab·4, for each
    micro-batch the last stage holds),
    logit_grads (the gradients of the log-probabilities and of the logits, two more tensors of
    that size alive together as backward starts) and total.
    total is the peak, not the sum: it is weights + optimizer + the larger of two moments — as
    backward starts (every held activation, the logits and their gradients, plus the parameter
    gradients only when they accumulate over several micro-batches) and while backward runs
    through the blocks (all parameter gradients, the held activations and, with checkpointing,
    the block being recomputed). With one micro-batch, gradients start as None and fill in while
    activations are freed, so they never sit beside all of them.

    Model states shard over tp·pp and dp_shard (FSDP / ZeRO-3, which also holds two all-gathered
    units at a time); activations shard over tp (sequence parallel); under 1F1B the first stage
    holds min(pp, microbatches) micro-batches in flight (`schedule="gpipe"`: every stage holds all
    of them, as GPipe runs every forward before any backward). Full activation checkpointing keeps
    each block's input and recomputes one block at a time. `lora_rank` > 0 freezes the base.
    """
    d, vocab = model.d_model, model.vocab_size
    per_layer, vd = model.layer_params(), vocab * d
    layers = model.n_layers / pp
    w_b, g_b, o_b = _state_bytes(precision)
    act_b = _ACT_BYTES[precision]
    tokens = batch * seq_len
    block = activation_bytes_per_token(model, precision, seq_len, flash_attention, lora_rank) * tokens
    # (params, holds the embedding, holds the head); a tied head is a second copy on the last stage.
    stages = [(model.num_params(), True, True)] if pp == 1 else [
        (layers * per_layer + vd, True, False), (layers * per_layer + vd + d, False, True)]
    shard = tp * dp_shard
    worst: dict[str, float] = {}
    for params, first, last in stages:
        inflight = microbatches if schedule == "gpipe" and pp > 1 else min(pp, microbatches) if first else 1
        if lora_rank:
            trainable = layers * lora_layer_params(model, lora_rank)
            weights = params / shard * _STORE_BYTES[precision] + trainable / shard * w_b
        else:
            trainable = params
            weights = params / shard * w_b
        grads, optimizer = trainable / shard * g_b, trainable / shard * o_b
        if dp_shard > 1:
            # FSDP gathers one unit (a block, the embedding or the head) while prefetching the next,
            # and holds the unit's full gradient until it is reduce-scattered.
            unit = max(per_layer, vd) / tp
            weights += 2 * unit * (_STORE_BYTES[precision] if lora_rank else w_b)
            grads += (lora_layer_params(model, lora_rank) / tp if lora_rank else unit) * g_b
        held = layers * inflight * (tokens * d * act_b if activation_checkpointing else block) / tp
        recompute = block / tp if activation_checkpointing else 0.0
        logits = 0.0
        held += tokens * 8 if first else 0  # token ids (int64)
        if last:  # under GPipe every micro-batch's loss waits for its backward, 1F1B's one at a time
            held += inflight * (tokens * (3 * d * act_b + 4) / tp + tokens * 8)  # final RMSNorm, targets
            logits = inflight * tokens * vocab * 4 / tp  # vocab-parallel cross-entropy under tp
        start = held + logits + 2 * logits / inflight + (grads if microbatches > 1 else 0.0)
        through = grads + (held + recompute if activation_checkpointing else 0.0)
        mem = {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": held + recompute,
               "logits": logits, "logit_grads": 2 * logits / inflight,
               "total": weights + optimizer + max(start, through)}
        if not worst or mem["total"] > worst["total"]:
            worst = mem
    return worst


def training_flops_per_token(model: ModelConfig, seq_len: int, lora: bool = False) -> dict[str, float]:
    """Model FLOPs per trained token: {"dense", "attention", "forward", "total"}.

    From `ModelConfig.flops_per_token` (6·N over every matmul weight plus attention's
    12·L·d·seq_len); dense is the 6·N part. LoRA skips the frozen weights' gradient: 4·N instead
    of 6·N (the adapters' own FLOPs are negligible). forward is one forward pass, what activation
    checkpointing recomputes. None of this counts the recompute: that is hardware, not model, FLOPs.
    """
    n = model.matmul_params()
    dense = (4.0 if lora else 6.0) * n
    total = model.flops_per_token(seq_len) - (2.0 * n if lora else 0.0)
    return {"dense": dense, "attention": total - dense, "forward": model.forward_flops_per_token(seq_len),
            "total": total}


# ---- the layout search -----------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """The hardware a plan runs on."""

    gpu: GPUSpec
    gpus_per_node: int
    nvlink_bytes_s: float  # per GPU per direction
    ib_bytes_s: float  # per GPU per direction
    price: float  # $ per GPU-hour
    max_memory_fraction: float
    startup_s: float = 0.0  # per job, before the first step: every GPU is held (and paid) meanwhile

    @property
    def usable_bytes(self) -> float:
        return self.gpu.memory_gb * GB * self.max_memory_fraction


@dataclass(frozen=True)
class TrainingJob:
    """What is trained: the model, its tokens and the step shape."""

    model: ModelConfig
    tokens: float
    seq_len: int
    precision: str
    mfu: float  # model-FLOPs utilization while computing; exposed communication and the bubble come on top
    micro_batch: int  # sequences per micro-batch; 0 = chosen per layout (the shortest step that fits)
    global_batch_tokens: int
    lora_rank: int  # 0 = full fine-tuning / pretraining
    activation_checkpointing: str  # auto, on, off


# The pipeline schedules kiln's trainer runs (parallel.pp_schedule). Both idle (pp-1)/(m+pp-1) of a step;
# GPipe runs every forward before any backward, so each stage holds all m micro-batches, 1F1B at most pp.
SCHEDULES = {"1f1b": "1F1B", "gpipe": "GPipe"}


@dataclass
class Layout:
    """One parallel layout evaluated: memory per GPU, communication and time per step, cost."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    micro_batch: int  # sequences per micro-batch
    microbatches: int  # micro-batches per data-parallel rank per optimizer step (m)
    schedule: str  # pipeline schedule, a SCHEDULES key (1f1b where pp = 1)
    checkpointing: bool
    memory: dict[str, float]  # bytes per GPU under the chosen checkpointing
    activations_no_ckpt: float
    activations_ckpt: float
    comm: dict[str, dict]  # dimension -> {"bytes", "seconds", "exposed", "link"} per optimizer step
    compute_s: float  # model FLOPs at the assumed MFU: the time the GPU computes
    exposed_comm_s: float  # communication no compute hides (see evaluate_layout)
    bubble_s: float  # the pipeline's fill and drain: (pp-1)/(m+pp-1) of the step
    recompute_flops: float  # the whole run's forward recomputed by checkpointing (not model FLOPs); 0 without
    hfu: float  # hardware FLOPs utilization the assumed MFU implies: MFU × (1 + recompute / model FLOPs)
    step_s: float  # compute_s + exposed_comm_s + bubble_s
    step_mfu: float  # MFU over the whole step: the assumed MFU × compute_s / step_s
    step_tokens: int
    fits: bool
    comm_bound: bool  # exposed communication takes longer than the compute
    days: float
    gpu_hours: float
    cost: float

    @property
    def gpus(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def label(self) -> str:
        return f"{self.dp_replicate}×{self.dp_shard}×{self.tp}×{self.pp}"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["gpus"], out["label"] = self.gpus, self.label
        return out


def _divisors(n: int) -> list[int]:
    low = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted({*low, *(n // k for k in low)})


def _ring(n: int) -> float:
    """Share of a tensor each rank sends in a ring all-gather or reduce-scatter over n ranks."""
    return (n - 1) / n


def _evaluate(job: TrainingJob, cluster: Cluster, dp_replicate: int, dp_shard: int, tp: int, pp: int,
              micro_batch: int, m: int, schedule: str) -> Layout:
    """One layout at one micro-batch size, count and schedule (see evaluate_layout)."""
    model, gpu = job.model, cluster.gpu
    gpus = dp_replicate * dp_shard * tp * pp
    dp = dp_replicate * dp_shard
    mb_tokens = micro_batch * job.seq_len
    step_tokens = m * dp * mb_tokens
    lora = job.lora_rank

    def memory(ckpt: bool) -> dict[str, float]:
        return estimate_training_memory(model, micro_batch, job.seq_len, job.precision, ckpt, dp_shard, tp, pp, m,
                                        True, lora, schedule)

    plain, ckpt = memory(False), memory(True)
    use_ckpt = job.activation_checkpointing == "on" or (
        job.activation_checkpointing == "auto" and plain["total"] > cluster.usable_bytes)
    mem = ckpt if use_ckpt else plain
    fits = mem["total"] <= cluster.usable_bytes

    # MFU counts model FLOPs only (PaLM's definition), so compute is model FLOPs at the assumed MFU
    # whether or not the layout checkpoints; the recomputed forward raises the HFU it takes instead.
    flops = training_flops_per_token(model, job.seq_len, bool(lora))
    compute_s = flops["total"] * step_tokens / (gpus * gpu.peak_flops(job.precision) * job.mfu)
    forward_s = compute_s * flops["forward"] / flops["total"]
    backward_s = compute_s - forward_s
    recompute = flops["forward"] / flops["total"] if use_ckpt else 0.0

    # Ranks are laid out tp innermost, then dp_shard, dp_replicate, pp: a group stays on NVLink
    # while its extent fits in a node, and otherwise runs at the InfiniBand rate of one NIC.
    def link(extent: int) -> tuple[str, float]:
        if extent <= cluster.gpus_per_node:
            return "NVLink", cluster.nvlink_bytes_s
        return "IB", cluster.ib_bytes_s

    act_b = _ACT_BYTES[job.precision]
    hidden = mb_tokens * model.d_model * act_b  # one micro-batch's hidden states
    stage_params = model.num_params() / pp + (model.vocab_size * model.d_model if pp > 1 else 0)
    trainable = model.n_layers / pp * lora_layer_params(model, lora) if lora else stage_params
    gathered_b = _STORE_BYTES[job.precision] if lora else _state_bytes(job.precision)[0]
    # FSDP, every micro-batch: all-gather the weights for forward and again for backward, reduce-scatter fp32 grads.
    gather = m * _ring(dp_shard) * stage_params * gathered_b / tp if dp_shard > 1 else 0.0
    reduce = m * _ring(dp_shard) * trainable * 4 / tp if dp_shard > 1 else 0.0
    # Replicas all-reduce fp32 grads: DDP once per step (no_sync on the micro-batches before the last), HSDP
    # (FSDP2 over replicas × shards) after every micro-batch's reduce-scatter, on the 1/dp_shard shard it holds.
    syncs = m if dp_shard > 1 else 1
    volumes = {
        # Sequence-parallel TP: 2 all-gathers + 2 reduce-scatters forward, as many backward, again when recomputing.
        "tp": (tp, (12 if use_ckpt else 8) * _ring(tp) * hidden * model.n_layers / pp * m if tp > 1 else 0.0),
        "fsdp": (tp * dp_shard, 2 * gather + reduce),
        "dp": (tp * dp, syncs * 2 * _ring(dp_replicate) * trainable / (tp * dp_shard) * 4 if dp_replicate > 1 else 0.0),
        # Each stage sends activations forward and gradients back, per micro-batch.
        "pp": (gpus, 2 * m * hidden / tp if pp > 1 else 0.0),
    }
    comm = {}
    for dim, (extent, volume) in volumes.items():
        name, bw = link(extent)
        comm[dim] = {"bytes": volume, "seconds": volume / bw, "exposed": 0.0, "link": name if volume else "-"}

    # What hides and what does not. TP's collectives sit between the matmuls of every layer and PP's
    # sends between stages: on the critical path, all of it. FSDP prefetches the next unit's weights
    # while this one computes, and reduce-scatters a unit's gradients while the next computes: hidden
    # up to the compute of the same phase (the forward's gather against the forward, the backward's
    # gather, reduce-scatter and HSDP all-reduce against the backward), exposed beyond it. DDP's
    # gradient buckets all-reduce during the last micro-batch's backward, so only that much hides.
    comm["tp"]["exposed"], comm["pp"]["exposed"] = comm["tp"]["seconds"], comm["pp"]["seconds"]
    after_flush = 0.0
    if dp_shard > 1:
        rate = link(tp * dp_shard)[1]
        gather_s, reduce_s, sync_s = gather / rate, reduce / rate, comm["dp"]["seconds"]
        behind = gather_s + reduce_s + sync_s
        late = max(0.0, behind - backward_s)
        comm["fsdp"]["exposed"] = max(0.0, gather_s - forward_s) + late * (gather_s + reduce_s) / behind
        comm["dp"]["exposed"] = late * sync_s / behind
    elif dp_replicate > 1:
        comm["dp"]["exposed"] = after_flush = max(0.0, comm["dp"]["seconds"] - backward_s / m)
    exposed = sum(c["exposed"] for c in comm.values())
    # The pipeline: each stage works through m micro-batches (their compute and the traffic that stalls
    # it) and idles pp-1 slots of the same length while the pipe fills and drains; DDP's all-reduce
    # waits for the flush.
    bubble_s = (compute_s + exposed - after_flush) * (pp - 1) / m
    step_s = compute_s + exposed + bubble_s
    seconds = cluster.startup_s + job.tokens / step_tokens * step_s
    gpu_hours = gpus * seconds / 3600
    return Layout(dp_replicate, dp_shard, tp, pp, micro_batch, m, schedule, use_ckpt, mem, plain["activations"],
                  ckpt["activations"], comm, compute_s, exposed, bubble_s, recompute * flops["total"] * job.tokens,
                  job.mfu * (1 + recompute), step_s, job.mfu * compute_s / step_s, step_tokens, fits,
                  exposed > compute_s, seconds / 86400, gpu_hours, gpu_hours * cluster.price)


def evaluate_layout(job: TrainingJob, cluster: Cluster, dp_replicate: int, dp_shard: int, tp: int, pp: int,
                    micro_batch: int = 0, schedule: str = "") -> Layout | None:
    """Memory, communication, step time and cost of one layout; None if the global batch cannot feed it.

    The step is compute (model FLOPs at the assumed MFU) + the communication nothing hides + the
    pipeline bubble. The micro-batch size (`micro_batch`, else `job.micro_batch`, else chosen here:
    each divisor of the sequences a data-parallel rank takes per step) and the pipeline schedule
    (`schedule`, else both) are those of the shortest step that fits, ties going to the least memory
    (where none fits: the leanest).
    Fewer, larger micro-batches mean fewer FSDP gathers but a longer bubble and more activations.
    """
    dp = dp_replicate * dp_shard
    fixed = micro_batch or job.micro_batch
    if dp * (fixed or 1) * job.seq_len > job.global_batch_tokens:
        return None
    if fixed:
        sizes = [(fixed, max(1, round(job.global_batch_tokens / (dp * fixed * job.seq_len))))]
    else:
        seqs = max(1, round(job.global_batch_tokens / (dp * job.seq_len)))
        sizes = [(b, seqs // b) for b in _divisors(seqs)]
    schedules = [schedule] if schedule else list(SCHEDULES) if pp > 1 else ["1f1b"]
    options = [_evaluate(job, cluster, dp_replicate, dp_shard, tp, pp, b, m, s) for b, m in sizes for s in schedules]
    fitting = [o for o in options if o.fits]
    return min(fitting, key=_rank) if fitting else min(options, key=lambda o: o.memory["total"])


def candidate_layouts(job: TrainingJob, cluster: Cluster, gpus: int, max_pp: int) -> list[Layout]:
    """Every layout of `gpus` GPUs kiln's trainer runs: tp within a node dividing both head counts, pp
    dividing the layers, and the data-parallel rest split between FSDP shards and replicas (replicas
    of a TP group only beside FSDP shards: HSDP, not DDP)."""
    model = job.model
    out = []
    tps = [t for t in (1, 2, 4, 8, 16) if t <= cluster.gpus_per_node and gpus % t == 0
           and model.n_heads % t == 0 and model.n_kv_heads % t == 0]
    for tp in tps:
        for pp in _divisors(model.n_layers):
            if pp > max_pp or gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            shards = sorted({s for s in _divisors(dp) if s & (s - 1) == 0} | {dp})
            for dp_shard in shards:
                if tp > 1 and dp_shard == 1 < dp:
                    continue  # DDP replicas of a TP group: kiln's trainer asks for dp_shard (HSDP) instead
                layout = evaluate_layout(job, cluster, dp // dp_shard, dp_shard, tp, pp)
                if layout is not None:
                    out.append(layout)
    return out


def _rank(layout: Layout) -> tuple:
    # Fits first, then the fewest days (per token, not per step: steps differ in tokens; rounded so
    # equal times tie), then the lowest HFU the assumed MFU needs (no recompute), then the least memory.
    return (not layout.fits, float(f"{layout.days:.4g}"), round(layout.hfu, 4), layout.memory["total"])


def _gpu_counts(gpus_per_node: int, max_gpus: int) -> list[int]:
    """1, 2, 4 ... within a node, then whole nodes: gpus_per_node × 1, 2, 3, 4, 6, 8, 12, 16, ..."""
    counts = [c for c in (1, 2, 4) if c < gpus_per_node]
    k = 1
    while gpus_per_node * k <= max_gpus:
        counts.append(gpus_per_node * k)
        if k >= 2 and gpus_per_node * k * 3 // 2 <= max_gpus:
            counts.append(gpus_per_node * k * 3 // 2)
        k *= 2
    return sorted(set(counts))


def frontier(points: list[Layout]) -> list[Layout]:
    """The time/cost frontier: the points no other point beats on both days and cost, cheapest first
    (so each is faster than every one before it)."""
    def beats(q: Layout, p: Layout) -> bool:  # costs equal to a part in a million tie (float noise)
        cheaper, as_cheap = q.cost < p.cost * (1 - 1e-6), q.cost <= p.cost * (1 + 1e-6)
        return (as_cheap and q.days < p.days) or (cheaper and q.days <= p.days)

    return sorted((p for p in points if not any(beats(q, p) for q in points)), key=lambda p: (p.cost, -p.days))


def choose(points: list[Layout], objective: str, cost_tolerance: float, max_days: float,
           max_gpus: int) -> tuple[Layout, str]:
    """The headline among the frontier `points` (cheapest first) and the sentence saying why.

    Among the counts that finish within max_days: `cheapest`, the cheapest; `fastest`, the fastest;
    `balanced`, the fastest whose cost is at most (1 + cost_tolerance) × the cheapest's. If none
    finishes in time, the fastest, whatever the objective.
    """
    on_time = [p for p in points if p.days <= max_days]
    if not on_time:
        return points[-1], (f"no count up to max_gpus={max_gpus} finishes within max_days={max_days:g}; "
                            "this is the fastest")
    cheapest = on_time[0]
    within = f"finishing within max_days={max_days:g}"
    if objective == "cheapest":
        return cheapest, f"objective cheapest: the cheapest GPU count {within}"
    if objective == "fastest":
        return on_time[-1], f"objective fastest: the fastest GPU count up to max_gpus={max_gpus}"
    best = [p for p in on_time if p.cost <= cheapest.cost * (1 + cost_tolerance)][-1]
    return best, (f"objective balanced: the fastest GPU count costing at most {cost_tolerance:.0%} more than the "
                  f"cheapest {within} ({cheapest.gpus} GPUs, {_days(cheapest.days)} days, ${_si(cheapest.cost)})")


def _fewest_fitting(job: TrainingJob, cluster: Cluster, counts: list[int], max_pp: int) -> Layout | None:
    """The fastest layout at the first count in `counts` where one fits."""
    for n in counts:
        fitting = [lay for lay in candidate_layouts(job, cluster, n, max_pp) if lay.fits]
        if fitting:
            return min(fitting, key=_rank)
    return None


def _advice(job: TrainingJob, cluster: Cluster, gpus: int, max_pp: int, max_gpus: int) -> list[str]:
    """Single changes that make a run fit that does not, each with the peak memory per GPU it gives: a
    setting of the user's that differs from the leanest choice (activation_checkpointing=off, a fixed
    micro_batch above 1, seq_len), more GPUs, a GPU with more memory. Nothing the plan already tried."""
    def gives(lay: Layout, where: bool) -> str:
        return f"→ peak {lay.memory['total'] / GB:.1f} GB per GPU as {lay.label}{f' on {lay.gpus}' if where else ''}"

    counts = [gpus] if gpus else _gpu_counts(cluster.gpus_per_node, max_gpus)
    changes = []
    if job.activation_checkpointing == "off":
        changes.append(("activation_checkpointing", "auto", "off"))
    if job.micro_batch > 1:
        changes.append(("micro_batch", 1, job.micro_batch))
    if job.seq_len >= 2048:
        changes.append(("seq_len", job.seq_len // 2, job.seq_len))
    tips = []
    for name, value, yours in changes:
        lay = _fewest_fitting(dataclasses.replace(job, **{name: value}), cluster, counts, max_pp)
        if lay:
            tips.append(f"{name}={value} (yours is {yours}) {gives(lay, not gpus)}")
    key, above = ("gpus", gpus) if gpus else ("max_gpus", max_gpus)
    more = _fewest_fitting(job, cluster, [n for n in _gpu_counts(cluster.gpus_per_node, max(max_gpus, 32768))
                                          if n > above], max_pp)
    if more:
        tips.append(f"{key}={more.gpus} {gives(more, False)}")
    for other in sorted(GPUS.values(), key=lambda g: g.memory_gb):
        if other.memory_gb > cluster.gpu.memory_gb:
            bigger = _fewest_fitting(job, dataclasses.replace(cluster, gpu=other), counts, max_pp)
            if bigger:
                tips.append(f"gpu={other.name} ({other.memory_gb:g} GB) {gives(bigger, not gpus)}")
                break
    return tips


def _no_fit_error(job: TrainingJob, cluster: Cluster, layouts: list[Layout], gpus: int, max_pp: int,
                  max_gpus: int) -> KilnError:
    gpu = cluster.gpu
    where = f"{gpus} × {gpu.name}" if gpus else f"up to {max_gpus} × {gpu.name}"
    if not layouts:
        return KilnError(f"no layout of {where} can take global_batch_tokens={job.global_batch_tokens} with "
                         f"micro_batch={job.micro_batch or 1} × seq_len={job.seq_len} per GPU; raise global_batch_tokens")
    least = min(layouts, key=lambda lay: lay.memory["total"])
    tips = _advice(job, cluster, gpus, max_pp, max_gpus)
    return KilnError(
        f"a {_si(job.model.num_params())}-parameter model does not fit on {where} even at the leanest layout "
        f"{least.label} (dp_replicate×dp_shard×tp×pp, checkpointing {'on' if least.checkpointing else 'off'}): "
        f"{least.memory['total'] / GB:.1f} GB per GPU "
        f"needed, {cluster.usable_bytes / GB:.1f} GB usable ({cluster.max_memory_fraction:.0%} of {gpu.memory_gb:g} GB); "
        + (f"each of these fits: {'; '.join(tips)}" if tips else
           "neither more GPUs, a bigger GPU nor a change of activation_checkpointing, micro_batch or seq_len fits it"))


def search(job: TrainingJob, cluster: Cluster, gpus: int, max_pp: int, max_gpus: int, max_days: float,
           objective: str = "balanced", cost_tolerance: float = 0.05) -> dict:
    """The best layout for `gpus` GPUs, or (gpus=0) for the count the objective picks (see `choose`).

    Returns {"best": Layout, "layouts": layouts at the chosen count (ranked), "counts": the best
    layout per count tried, "frontier": the time/cost frontier of those, "note": why the choice was made}.
    """
    if gpus:
        layouts = sorted(candidate_layouts(job, cluster, gpus, max_pp), key=_rank)
        if not layouts or not layouts[0].fits:
            raise _no_fit_error(job, cluster, layouts, gpus, max_pp, max_gpus)
        note = "communication-bound: every layout that fits" if layouts[0].comm_bound else ""
        return {"best": layouts[0], "layouts": layouts, "counts": [layouts[0]], "frontier": [layouts[0]], "note": note}
    per_count: dict[int, list[Layout]] = {}
    tried: list[Layout] = []
    for count in _gpu_counts(cluster.gpus_per_node, max_gpus):
        layouts = sorted(candidate_layouts(job, cluster, count, max_pp), key=_rank)
        tried += layouts
        if layouts and layouts[0].fits:
            per_count[count] = layouts
    if not per_count:
        raise _no_fit_error(job, cluster, tried, 0, max_pp, max_gpus)
    bests = [layouts[0] for layouts in per_count.values()]
    points = frontier(bests)
    best, note = choose(points, objective, cost_tolerance, max_days, max_gpus)
    return {"best": best, "layouts": per_count[best.gpus], "counts": bests, "frontier": points, "note": note}


# ---- inference -------------------------------------------------------------------------------
def inference_estimate(model: ModelConfig, gpu: GPUSpec, precision: str, batch: int, context: int, price: float,
                       gpus_per_node: int = 8, max_memory_fraction: float = 0.9, weights: str = "auto",
                       group_size: int = 64) -> dict:
    """Serving on `gpu`: the fewest GPUs that hold weights + KV cache, decode tokens/s and $ per million tokens.

    Decode reads every weight and the whole KV cache once per step, so a step takes
    bytes / (tp × HBM bandwidth) unless the 2·N FLOPs per token of the batch take longer. Pipeline
    stages across nodes add memory, not speed (a batch visits them in turn). Peak bandwidth is
    an upper bound; real kernels reach roughly 70-85% of it. `weights` (auto = `precision`) is the
    stored format: int8 / int4 shrink the bytes read per step; the KV cache stays in `precision`.
    """
    store = _STORE_BYTES[precision]
    kv = 2 * model.n_layers * model.n_kv_heads * model.head_dim * context * batch * store
    weights = model.num_params() * weight_bytes(precision if weights == "auto" else weights, group_size)
    usable = gpu.memory_gb * GB * max_memory_fraction
    tp, pp = 1, 1
    tps = [t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node and model.n_kv_heads % t == 0]
    for tp in tps:
        if (weights + kv) / tp <= usable:
            break
    while (weights + kv) / (tp * pp) > usable:
        pp *= 2
        if pp > model.n_layers:
            lower = " or ".join(([f"inference.batch (yours is {batch})"] if batch > 1 else [])
                                + ([f"inference.context (yours is {context})"] if context > 1 else []))
            raise KilnError(f"inference needs {(weights + kv) / GB:.0f} GB of weights and KV cache; too much for "
                            f"{model.n_layers} pipeline stages of {tp} × {gpu.name}"
                            + (f"; the KV cache is {kv / GB:.0f} GB of it: lower {lower}" if lower else ""))
    n = tp * pp
    flops_per_token = model.forward_flops_per_token(context)
    bandwidth_s = (weights + kv) / (tp * gpu.hbm_tbps * 1e12)
    compute_s = flops_per_token * batch / (tp * gpu.peak_flops(precision))
    step_s = max(bandwidth_s, compute_s)
    tokens_s = batch / step_s
    return {"gpu": gpu.name, "gpus": n, "tp": tp, "pp": pp, "weights_per_gpu": weights / n, "kv_per_gpu": kv / n,
            "total_per_gpu": (weights + kv) / n, "tokens_per_s": tokens_s,
            "bound": "memory" if bandwidth_s >= compute_s else "compute", "price": price,
            "usd_per_million_tokens": n * price / 3600 / tokens_s * 1e6}


# ---- one concrete run: what a training verb asks before it starts ------------------------------
DEFAULT_MFU = 0.4  # PlanConfig.mfu's default: what a run assumes until `calibrate=` replaces it
PLAN_VS_RUN = "plan_vs_run.json"  # in a run directory: the prediction, the measurement, the error of each
_FROZEN_BYTES = 4  # kiln keeps a frozen model's weights (DPO reference, teacher) in fp32; autocast computes in bf16


def device_spec(name: str, peak_flops: float, memory_bytes: float, link_bytes_s: float = 0.0) -> GPUSpec:
    """A device the datasheet table does not hold (a CPU host, an unlisted GPU) as the planner's
    GPUSpec: its measured matmul peak for every precision, its memory, and (distributed) the rate
    its collectives were measured to move, per direction."""
    tflops = peak_flops / 1e12
    return GPUSpec(name, memory_bytes / GB, tflops, None, tflops, 0.0, 2 * link_bytes_s / GB)


def predict_run(model: ModelConfig, *, micro_batch: int, seq_len: int, steps: int, layout: dict[str, int],
                precision: str, gpu: GPUSpec, price_per_device_hour: float, accumulation: int = 1,
                pp_microbatches: int = 1, schedule: str = "1f1b", link_bytes_s: float = 0.0,
                devices_per_node: int = 0, mfu: float = DEFAULT_MFU, lora_rank: int = 0,
                activation_checkpointing: bool = False, frozen: tuple[ModelConfig, ...] = (), ddp_buckets: bool = False,
                step_tokens: int = 0) -> dict:
    """The planner's figures for one concrete run (one layout, one micro-batch, one device type), as
    `kiln <training verb>` asks before it starts: peak memory per device, step seconds, tokens/s,
    total seconds and cost. The same memory model, step model (compute at `mfu` + exposed
    communication + pipeline bubble) and FLOPs as `kiln plan`; nothing is searched.

    `micro_batch` sequences of `seq_len` per forward on each data-parallel rank, `accumulation`
    forwards per optimizer step; under pipeline parallelism (`layout["pp"]` > 1) each forward splits
    into `pp_microbatches` micro-batches run by `schedule`. `frozen`: models held but not trained
    (a DPO reference, a teacher), whose fp32 weights are placed like the trained one's (TP- and
    FSDP-sharded). `ddp_buckets`: DDP keeps a flat fp32 copy of every gradient in its buckets, beside
    `.grad`. `step_tokens`: what the run counts as tokens per step (images for a classifier; the
    default, sequences × seq_len); tokens/s is in those units. `link_bytes_s`: the per-direction rate
    of every collective (0: the GPU's NVLink within `devices_per_node` and 400 Gb/s InfiniBand across).
    """
    dp_replicate, dp_shard, tp, pp = (layout.get(k, 1) for k in ("dp_replicate", "dp_shard", "tp", "pp"))
    devices = dp_replicate * dp_shard * tp * pp
    if pp > 1:  # each of the `accumulation` forwards is one pipeline pass of pp_microbatches micro-batches
        m, passes = max(1, pp_microbatches), accumulation
        mb = max(1, micro_batch // m)
    else:
        m, passes, mb = accumulation, 1, micro_batch
    nvlink = link_bytes_s or gpu.nvlink_gbps * GB / 2 or math.inf  # inf: one device, nothing to move
    cluster = Cluster(gpu, devices_per_node or devices, nvlink, link_bytes_s or 400 * GB / 8,
                      price_per_device_hour, 1.0)
    pass_tokens = m * dp_replicate * dp_shard * mb * seq_len
    job = TrainingJob(model, float(steps * passes * pass_tokens), seq_len, precision, mfu, mb, pass_tokens,
                      lora_rank, "on" if activation_checkpointing else "off")
    lay = _evaluate(job, cluster, dp_replicate, dp_shard, tp, pp, mb, m, schedule)
    memory = dict(lay.memory)
    memory["frozen_weights"] = sum(f.num_params() for f in frozen) * _FROZEN_BYTES / (tp * dp_shard)
    trainable = (model.n_layers * lora_layer_params(model, lora_rank) if lora_rank else model.num_params()) / (tp * pp)
    memory["ddp_buckets"] = trainable * 4 if ddp_buckets and dp_replicate > 1 and dp_shard == 1 else 0.0
    peak = memory["total"] + memory["frozen_weights"] + memory["ddp_buckets"]
    step_s = lay.step_s * passes
    total_s = steps * step_s
    counted = step_tokens or passes * pass_tokens
    return {
        "peak_memory_bytes": peak, "memory": memory, "fits": peak <= gpu.memory_gb * GB,
        "step_seconds": step_s, "compute_seconds": lay.compute_s * passes,
        "exposed_comm_seconds": lay.exposed_comm_s * passes, "bubble_seconds": lay.bubble_s * passes,
        "tokens_per_s": counted / step_s, "total_seconds": total_s, "devices": devices,
        "cost_usd": devices * total_s / 3600 * price_per_device_hour, "price_per_device_hour": price_per_device_hour,
        "mfu": mfu, "step_mfu": lay.step_mfu, "hfu": lay.hfu, "layout": lay.label, "micro_batch": mb,
        "microbatches": m, "passes": passes, "schedule": schedule if pp > 1 else "", "checkpointing": lay.checkpointing,
        "model_flops_per_step": training_flops_per_token(model, seq_len, bool(lora_rank))["total"] * passes * pass_tokens,
        "peak_flops_per_device": gpu.peak_flops(precision), "device": gpu.name, "precision": precision,
        "seq_len": seq_len, "steps": steps,
    }


def calibrated_mfu(predicted: dict, step_seconds: float) -> float:
    """The MFU while computing that makes `predicted`'s step take the measured `step_seconds`: the
    run's model FLOPs over the compute part of its measured step (the step less the planner's exposed
    communication, and less the pipeline bubble's share of the step). Where that leaves under a
    tenth of the step, the MFU over the whole step."""
    work = predicted["model_flops_per_step"] / (predicted["devices"] * predicted["peak_flops_per_device"])
    bubble_share = predicted["bubble_seconds"] / predicted["step_seconds"] if predicted["step_seconds"] else 0.0
    compute = step_seconds * (1 - bubble_share) - predicted["exposed_comm_seconds"]
    return work / (compute if compute > 0.1 * step_seconds else step_seconds)


def read_calibration(runs: list[str]) -> dict:
    """The MFU measured by the runs `runs` name (their `plan_vs_run.json`): each run's, and the median
    of them that `kiln plan … calibrate=` uses instead of the assumed one. A run without the file, or
    one that timed no step, is a one-line error."""
    from pathlib import Path

    found = []
    for run in runs:
        path = Path(run) / PLAN_VS_RUN
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise KilnError(f"calibrate={run}: no {PLAN_VS_RUN} there; name a run directory a training verb "
                            "finished (every run since plan checking writes one)") from None
        except (OSError, ValueError) as e:
            raise KilnError(f"calibrate={run}: cannot read {path} ({e})") from None
        mfu = (data.get("calibration") or {}).get("mfu")
        if not mfu and (data.get("measured") or {}).get("mfu_unreliable"):
            raise KilnError(f"calibrate={run}: its MFU read above 100% (the matmul peak was timed while the host "
                            "was busy), a measurement error; rerun it on a quiet machine")
        if not mfu:
            raise KilnError(f"calibrate={run}: the run timed no training step, so it measured no MFU; "
                            "calibrate on a run of at least 2 steps")
        if data.get("partial"):
            raise KilnError(f"calibrate={run}: that {data.get('workload', 'run')}'s step holds work the planner does "
                            f"not model ({data['partial'][0]}), so its MFU would mislead a plan; calibrate on a "
                            "pretrain, sft or encoder run")
        pred = data.get("predicted") or {}
        found.append({"run": run, "mfu": mfu, "device": pred.get("device", "?"), "devices": pred.get("devices", 1),
                      "layout": pred.get("layout", ""), "seq_len": pred.get("seq_len"),
                      "micro_batch": pred.get("micro_batch"), "workload": data.get("workload", ""),
                      "params": (data.get("model") or {}).get("params")})
    mfus = sorted(r["mfu"] for r in found)
    mid = len(mfus) // 2
    median = mfus[mid] if len(mfus) % 2 else (mfus[mid - 1] + mfus[mid]) / 2
    return {"mfu": median, "runs": found}


def _calibration_line(cal: dict, assumed: float) -> str:
    """'MFU 23% measured by runs/a (…), replacing the assumed 40% (calibrate=)'."""
    def one(r: dict) -> str:
        shape = f"{_si(r['params'])} params, " if r.get("params") else ""
        return (f"{r['run']} ({r['workload'] or 'run'}, {shape}{r['micro_batch']}×{r['seq_len']} tokens per "
                f"micro-batch, {r['devices']} × {r['device']})")
    runs = cal["runs"]
    how = (f"measured by {one(runs[0])}" if len(runs) == 1 else f"the median of {len(runs)} runs': "
           + "; ".join(f"{r['mfu']:.1%} by {one(r)}" for r in runs))
    return (f"calib   MFU {cal['mfu']:.1%} {how} — replaces the assumed {assumed:.0%} (calibrate=); measured on "
            "their hardware at their shapes")


# ---- running it ------------------------------------------------------------------------------
def _check(cfg: PlanConfig) -> None:
    """What the per-key ranges (checked at load) cannot say: checks across keys."""
    if cfg.gpus > cfg.gpus_per_node and cfg.gpus % cfg.gpus_per_node:
        raise KilnError(f"gpus={cfg.gpus} is not a whole number of nodes of gpus_per_node={cfg.gpus_per_node}")


def _price(cfg: PlanConfig, gpu: GPUSpec) -> float:
    return getattr(cfg.prices, gpu.name.lower())


def _cluster(cfg: PlanConfig, gpu: GPUSpec, price: float) -> Cluster:
    nvlink = cfg.interconnect.nvlink_gbps or gpu.nvlink_gbps
    return Cluster(gpu, cfg.gpus_per_node, nvlink * GB / 2, cfg.interconnect.ib_gbits * GB / 8, price,
                   cfg.max_memory_fraction, cfg.startup_minutes * 60)


def plan(cfg: PlanConfig) -> dict:
    """The whole plan as a JSON-ready dict (what `json=true` prints)."""
    if cfg.target_bpb and not cfg.fit:
        raise KilnError("target_bpb= needs a scaling fit: fit=DIR, a `kiln scale` directory")
    if cfg.fit and cfg.workload != "pretrain":
        raise KilnError(f"fit= forecasts pretraining loss; workload={cfg.workload} has no forecast")
    out = _plan(cfg)
    if cfg.fit:
        scaling, _ = read_fit(cfg.fit)
        out["forecast"] = {**scaling.forecast(out["model"]["params"], out["tokens"]), "fit": cfg.fit,
                           "params": out["model"]["params"], "tokens": out["tokens"], "confidence": 0.9}
        if cfg.target_bpb:
            out["target"] = target_plan(cfg, scaling)
    return out


def shape_with_params(cfg: PlanConfig, params: float) -> dict:
    """model.* overrides of the planned model's family (its depth-to-width ratio, head size, grouping
    and FFN ratio) whose parameter count is closest to `params`."""
    base = cfg.model.build()
    head = base.head_dim or base.d_model // base.n_heads
    group = base.n_heads // (base.n_kv_heads or base.n_heads)
    ffn_ratio = base.ffn_hidden / base.d_model
    best, best_gap = None, math.inf
    for layers in range(1, 513):
        heads = max(group, group * round(base.d_model * layers / base.n_layers / (head * group)))
        d_model = heads * head
        ffn = base.multiple_of * math.ceil(ffn_ratio * d_model / base.multiple_of)
        shape = {"d_model": d_model, "n_layers": layers, "n_heads": heads, "n_kv_heads": heads // group,
                 "ffn_hidden": ffn, **({"head_dim": head} if base.head_dim else {})}
        gap = abs(math.log(ModelConfig(**{**base.to_dict(), **shape}).num_params() / params))
        if gap < best_gap:
            best, best_gap = shape, gap
    return best


def target_plan(cfg: PlanConfig, scaling: Fit) -> dict:
    """The cheapest (N, D) the fit expects to reach `target_bpb` (on its compute-optimal frontier), as
    a model of the planned family, with the planner's GPUs, days and dollars for it."""
    want = scaling.cheapest(cfg.target_bpb)
    shape = shape_with_params(cfg, want["params"])
    model = dataclasses.replace(cfg.model, **shape)
    built = model.build(**({"max_seq_len": cfg.seq_len} if cfg.seq_len else {}))
    params = built.num_params()
    tokens = float(want["compute"] / (6 * params))  # the same compute at the shape's own size
    # a small run gets a global batch it can use (MIN_PRETRAIN_STEPS steps), not the planned run's
    batch = batch_for_steps(tokens, cfg.seq_len or built.max_seq_len, cfg.global_batch_tokens)
    sub = _plan(dataclasses.replace(cfg, model=model, tokens=tokens, global_batch_tokens=batch, fit="", target_bpb=0.0))
    b = sub["best"]
    return {**want, "model": {**shape, "params": params}, "tokens": tokens, "global_batch_tokens": batch,
            "forecast": scaling.forecast(params, tokens),
            "best": {k: b[k] for k in ("gpus", "label", "days", "gpu_hours", "cost")}, "note": sub["note"]}


def _plan(cfg: PlanConfig) -> dict:
    _check(cfg)
    calibration = read_calibration(cfg.calibrate) if cfg.calibrate else None
    assumed = cfg.mfu
    if calibration:
        cfg = dataclasses.replace(cfg, mfu=min(1.0, calibration["mfu"]))
    gpu = gpu_spec(cfg.gpu)
    model = cfg.model.build(**({"max_seq_len": cfg.seq_len} if cfg.seq_len else {}))
    seq_len = cfg.seq_len or model.max_seq_len
    price = cfg.price_per_gpu_hour or _price(cfg, gpu)
    tokens = cfg.tokens or DEFAULT_TOKENS[cfg.workload]
    out: dict = {"workload": cfg.workload, "tokens": tokens, "tokens_default": not cfg.tokens,
                 "model": {"preset": cfg.model.preset, "overrides": cfg.model.overrides(), **model.to_dict(),
                           "params": model.num_params()},
                 "precision": cfg.precision, "gpu": {**dataclasses.asdict(gpu), "price_per_gpu_hour": price},
                 "assumptions": {"prices_are_assumptions": True, "mfu": cfg.mfu,
                                 "nvlink_gbps": cfg.interconnect.nvlink_gbps or gpu.nvlink_gbps,
                                 "ib_gbits": cfg.interconnect.ib_gbits,
                                 "max_memory_fraction": cfg.max_memory_fraction}}
    if calibration:
        out["calibration"] = {**calibration, "assumed_mfu": assumed}
        out["assumptions"]["mfu_source"] = "calibrate=" + ",".join(cfg.calibrate)
    if cfg.workload == "inference":
        out["batch"], out["context"] = cfg.inference.batch, cfg.inference.context
        out["weights"] = cfg.precision if cfg.inference.weights == "auto" else cfg.inference.weights
        out["by_gpu"] = []
        for other in GPUS.values():
            other_price = price if other is gpu else _price(cfg, other)
            row = inference_estimate(model, other, cfg.precision, cfg.inference.batch, cfg.inference.context,
                                     other_price, cfg.gpus_per_node, cfg.max_memory_fraction,
                                     cfg.inference.weights, cfg.inference.group_size)
            row["cost_for_tokens"] = row["usd_per_million_tokens"] * tokens / 1e6
            out["by_gpu"].append(row)
        return out

    if cfg.precision == "fp8" and gpu.fp8_tflops is None:
        raise KilnError(f"{gpu.name} has no fp8 tensor cores; train with precision=bf16 or pick H100, H200 or B200")
    if (cfg.micro_batch or 1) * seq_len > cfg.global_batch_tokens:
        raise KilnError(f"global_batch_tokens={cfg.global_batch_tokens} is smaller than one micro-batch "
                        f"(micro_batch={cfg.micro_batch or 1} × seq_len={seq_len}); raise it")
    lora_rank = cfg.lora.rank if cfg.workload == "finetune-lora" else 0
    job = TrainingJob(model, tokens, seq_len, cfg.precision, cfg.mfu, cfg.micro_batch, cfg.global_batch_tokens,
                      lora_rank, cfg.activation_checkpointing)
    flops = training_flops_per_token(model, seq_len, bool(lora_rank))
    out.update({"seq_len": seq_len, "micro_batch": cfg.micro_batch,
                "global_batch_tokens": cfg.global_batch_tokens, "lora_rank": lora_rank,
                "steps": tokens / cfg.global_batch_tokens,
                "flops": {k: v * tokens for k, v in flops.items() if k != "forward"}})
    if cfg.workload == "pretrain" and out["steps"] < MIN_PRETRAIN_STEPS:
        usable = batch_for_steps(tokens, seq_len, cfg.global_batch_tokens)
        out["warning"] = (f"{_si(tokens)} tokens are {out['steps']:.3g} optimizer steps of the "
                          f"{_si(cfg.global_batch_tokens)}-token global batch, fewer than the {MIN_PRETRAIN_STEPS:,} "
                          f"a pretraining run takes at least: the batch is larger than the run can use, and so is "
                          f"the GPU count it allows; global_batch_tokens={usable} gives {tokens / usable:,.0f} steps")
    goal = (cfg.objective, cfg.cost_tolerance)
    found = search(job, _cluster(cfg, gpu, price), cfg.gpus, cfg.max_pp, cfg.max_gpus, cfg.max_days, *goal)
    best = found["best"]
    out["objective"] = {"name": cfg.objective, "cost_tolerance": cfg.cost_tolerance, "max_days": cfg.max_days,
                        "applies": not cfg.gpus}
    out["best"] = best.to_dict()
    out["note"] = found["note"]
    if best.hfu > 1:
        out["note"] = "; ".join(filter(None, [out["note"], f"checkpointing needs HFU {best.hfu:.0%} for MFU "
                                              f"{cfg.mfu:.0%}, more than the GPU has: lower mfu"]))
    out["layouts"] = [lay.to_dict() for lay in found["layouts"][:10]]
    out["counts"] = [lay.to_dict() for lay in found["counts"]]
    out["frontier"] = [lay.to_dict() for lay in found["frontier"]]
    out["by_gpu"] = []
    for other in GPUS.values():
        if other is gpu:
            other_best = best
        elif cfg.precision == "fp8" and other.fp8_tflops is None:
            continue
        else:
            try:
                other_best = search(job, _cluster(cfg, other, _price(cfg, other)), cfg.gpus, cfg.max_pp,
                                    cfg.max_gpus, cfg.max_days, *goal)["best"]
            except KilnError:
                continue
        out["by_gpu"].append({"gpu": other.name, **other_best.to_dict()})
    return out


# ---- printing --------------------------------------------------------------------------------
def _si(x: float) -> str:
    """1234567 -> '1.23M'."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain-text columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for r in [headers, *rows]:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def _days(days: float) -> str:
    """Days to one decimal, three significant digits below 10 (a run of hours still reads apart from the next)."""
    return f"{days:.1f}" if days >= 10 else f"{days:.3g}"


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _tokens(result: dict) -> str:
    """'15T tokens', saying so when the count is the workload's default rather than the user's."""
    default = f" (default for {result['workload']}; set tokens=)" if result["tokens_default"] else ""
    return f"{_si(result['tokens'])} tokens{default}"


def _header(result: dict) -> list[str]:
    m, g, a = result["model"], result["gpu"], result["assumptions"]
    fp8 = f" ({g['fp8_tflops']:g} fp8)" if g["fp8_tflops"] else ""
    changed = ", ".join(f"{k}={v}" for k, v in m["overrides"].items())
    return [
        f"model   {m['preset']}{f' ({changed})' if changed else ''}: {_si(m['params'])} params, {m['n_layers']} layers, d_model {m['d_model']}, "
        f"{m['n_heads']}/{m['n_kv_heads']} heads, ffn {m['ffn_hidden']}, vocab {m['vocab_size']}",
        f"gpu     {g['name']}: {g['memory_gb']:g} GB, {g['bf16_tflops']:g} TFLOPS bf16 dense{fp8}, "
        f"HBM {g['hbm_tbps']:g} TB/s, NVLink {a['nvlink_gbps']:g} GB/s; InfiniBand {a['ib_gbits']:g} Gb/s per GPU",
        f"price   ${g['price_per_gpu_hour']:.2f}/GPU-hour — an assumption, set price_per_gpu_hour= or prices.<gpu>=",
    ]


def _count(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _breakdown(lay: dict, mfu: float) -> str:
    """'step 23.4 s = compute 20.56 s at MFU 40% + exposed communication … + pipeline bubble …'."""
    exposed = ", ".join(f"{dim.upper()} {_time(c['exposed'])}" for dim, c in lay["comm"].items() if c["exposed"] > 5e-4)
    m, p = lay["microbatches"], lay["pp"]
    idle = f"pp {p}, {_count(m, 'micro-batch', 'micro-batches')}: {(p - 1) / (m + p - 1):.0%} idle" if p > 1 else "pp 1"
    return (f"step {_time(lay['step_s'])} = compute {_time(lay['compute_s'])} at MFU {mfu:.0%} + exposed communication "
            f"{_time(lay['exposed_comm_s'])}{f' ({exposed})' if exposed else ''} + pipeline bubble "
            f"{_time(lay['bubble_s'])} ({idle}) for {_si(lay['step_tokens'])} tokens: MFU {lay['step_mfu']:.0%} "
            "over the step")


def format_training(result: dict) -> str:
    """The training plan as readable tables."""
    best = result["best"]
    lora = f", LoRA rank {result['lora_rank']}" if result["lora_rank"] else ""
    f = result["flops"]
    lines = [f"kiln plan: {result['workload']}{lora} — {_tokens(result)}, seq_len {result['seq_len']}, "
             f"global batch {_si(result['global_batch_tokens'])} tokens, micro-batch "
             f"{result['micro_batch'] or 'chosen per layout'}, {result['precision']}, AdamW, "
             f"{'calibrated' if result.get('calibration') else 'assumed'} MFU "
             f"{result['assumptions']['mfu']:.0%} while computing",
             *_header(result),
             *([_calibration_line(result["calibration"], result["calibration"]["assumed_mfu"])]
               if result.get("calibration") else []),
             f"compute {f['total']:.3g} model FLOPs = {'4' if result['lora_rank'] else '6'}·N·D {f['dense']:.3g} "
             f"+ attention {f['attention']:.3g}",
             *([f"warning {result['warning']}"] if result.get("warning") else []), ""]
    mfu = result["assumptions"]["mfu"]
    recompute = (f"; checkpointing recomputes {best['recompute_flops']:.3g} FLOPs more, so MFU {mfu:.0%} "
                 f"takes HFU {best['hfu']:.0%}" if best["checkpointing"] else "")
    mem = best["memory"]
    m, b = best["microbatches"], best["micro_batch"]
    schedule = f" ({SCHEDULES[best['schedule']]})" if best["pp"] > 1 else ""
    note = result["note"] if not result["objective"]["applies"] or "objective" not in result["note"] else ""
    lines += [f"choice  {result['note']}; objective=, cost_tolerance= and max_gpus= change it"] \
        if result["objective"]["applies"] else []
    lines += [
        f"best    {best['gpus']} × {result['gpu']['name']} as dp_replicate {best['dp_replicate']} × dp_shard "
        f"{best['dp_shard']} × tp {best['tp']} × pp {best['pp']}, {_count(m, 'micro-batch', 'micro-batches')} of "
        f"{_count(b, 'sequence')} per step{schedule}, activation checkpointing {'on' if best['checkpointing'] else 'off'}"
        + (f"  ({note})" if note else ""),
        f"        memory per GPU{' (worst pipeline stage)' if best['pp'] > 1 else ''}: peak {_gb(mem['total'])} GB "
        f"of {result['gpu']['memory_gb']:g} — weights "
        f"{_gb(mem['weights'])}, grads {_gb(mem['grads'])}, optimizer {_gb(mem['optimizer'])}, activations "
        f"{_gb(mem['activations'])}, logits {_gb(mem['logits'])} and their gradients {_gb(mem['logit_grads'])}",
        f"        {_days(best['days'])} days, {_si(best['gpu_hours'])} GPU-hours, ${_si(best['cost'])}{recompute}",
        f"        {_breakdown(best, mfu)}", "",
        f"layouts on {best['gpus']} × {result['gpu']['name']} (dp_rep×dp_shard×tp×pp; memory in GB per GPU, "
        "acts = activations + logits and their gradients, without / with checkpointing; peak < the sum when "
        "gradients fill in as backward frees activations):",
    ]
    rows = []
    for lay in result["layouts"]:
        mm = lay["memory"]
        loss = mm["logits"] + mm["logit_grads"]
        rows.append([lay["label"],
                     _gb(mm["weights"]), _gb(mm["grads"]), _gb(mm["optimizer"]),
                     _gb(lay["activations_no_ckpt"] + loss), _gb(lay["activations_ckpt"] + loss),
                     _gb(mm["total"]), "on" if lay["checkpointing"] else "off", "yes" if lay["fits"] else "NO"])
    lines += [_table(["layout", "weights", "grads", "optim", "acts", "acts ckpt", "peak", "ckpt", "fits"], rows), ""]
    lines.append("communication per step (volume per GPU, time at link rate: NVLink and IB per direction); step = "
                 "compute at the assumed MFU + exposed communication (all of TP and PP; FSDP and DP beyond the compute "
                 "they overlap) + pipeline bubble; m×b: micro-batches × sequences; HFU: what the assumed MFU takes:")
    rows = []
    for lay in result["layouts"]:
        cells = [lay["label"], f"{lay['microbatches']}×{lay['micro_batch']}"]
        for dim in ("tp", "fsdp", "dp", "pp"):
            c = lay["comm"][dim]
            cells.append(f"{_gb(c['bytes'])} GB {_time(c['seconds'])} {c['link']}" if c["bytes"] else "-")
        cells += [_time(lay["compute_s"]), _time(lay["exposed_comm_s"]), _time(lay["bubble_s"]), _time(lay["step_s"]),
                  f"{lay['hfu']:.0%}", _days(lay["days"]), f"${_si(lay['cost'])}",
                  "COMM-BOUND" if lay["comm_bound"] else ""]
        rows.append(cells)
    lines += [_table(["layout", "m×b", "TP", "FSDP", "DP", "PP", "compute", "exposed", "bubble", "step", "HFU", "days",
                      "cost", ""], rows)]
    front = result["frontier"]
    if result["objective"]["applies"] and len(front) == 1:
        lines += ["", f"time/cost frontier: {best['gpus']} GPUs alone (every other count is slower and costs no less)"]
    elif result["objective"]["applies"]:
        cheapest = front[0]["cost"]
        max_days = result["objective"]["max_days"]
        lines += ["", "time/cost frontier (each GPU count's fastest layout, its MFU over the whole step; a count left "
                  "out is beaten on both time and cost by one listed; all counts are in the JSON):"]
        rows = [[str(c["gpus"]), c["label"], f"{c['step_mfu']:.0%}", _days(c["days"]), _si(c["gpu_hours"]),
                 f"${_si(c['cost'])}", "cheapest" if c is front[0] else f"+{c['cost'] / cheapest - 1:.1%}",
                 "← best" if c["gpus"] == best["gpus"] else f"over max_days={max_days:g}" if c["days"] > max_days
                 else ""] for c in front]
        lines.append(_table(["gpus", "layout", "MFU", "days", "GPU-hours", "cost", "vs cheapest", ""], rows))
    lines += ["", f"on each GPU type (default prices{', the same objective' if result['objective']['applies'] else ''}):"]
    rows = [[r["gpu"], str(r["gpus"]), r["label"],
             _gb(r["memory"]["total"]), _days(r["days"]), _si(r["gpu_hours"]), f"${_si(r['cost'])}"]
            for r in result["by_gpu"]]
    lines.append(_table(["gpu", "gpus", "layout", "GB/GPU", "days", "GPU-hours", "cost"], rows))
    return "\n".join(lines + forecast_lines(result))


def forecast_lines(result: dict) -> list[str]:
    """With fit=: the forecast loss of the planned run, and the cheapest run reaching target_bpb."""
    if "forecast" not in result:
        return []
    f = result["forecast"]
    lo, hi = f["interval"]
    lines = ["", f"forecast  {f['bpb']:.4f} validation bits/byte (90% interval {lo:.4f}–{hi:.4f}) for "
             f"{_si(f['params'])} params × {_si(f['tokens'])} tokens, from the scaling fit in {f['fit']}"]
    t = result.get("target")
    if t:
        m, b = t["model"], t["best"]
        tlo, thi = t["forecast"]["interval"]
        lines.append(f"target    {t['target_bpb']:g} bits/byte: cheapest {_si(m['params'])} params (d_model "
                     f"{m['d_model']}, {m['n_layers']} layers, {m['n_heads']}/{m['n_kv_heads']} heads, ffn "
                     f"{m['ffn_hidden']}) × {_si(t['tokens'])} tokens in global batches of "
                     f"{_si(t['global_batch_tokens'])} = {t['compute']:.3g} FLOPs (forecast "
                     f"{t['forecast']['bpb']:.4f}, {tlo:.4f}–{thi:.4f}): {b['gpus']} × {result['gpu']['name']} "
                     f"{b['label']}, {_days(b['days'])} days, {_si(b['gpu_hours'])} GPU-hours, ${_si(b['cost'])}"
                     + (f" ({t['note']})" if t.get("note") else ""))
    return lines


def format_inference(result: dict) -> str:
    """The inference plan as a table over GPU types."""
    stored = result.get("weights", result["precision"])
    held = f"{result['precision']} weights and KV cache" if stored == result["precision"] else \
        f"{stored} weights, {result['precision']} KV cache"
    lines = [f"kiln plan: inference — {held}, batch {result['batch']}, "
             f"context {result['context']} tokens, serving {_tokens(result)}; decode is bound by HBM bandwidth "
             "(peak; real kernels reach ~70-85%)",
             *_header(result), ""]
    rows = [[r["gpu"], f"{r['gpus']} (tp {r['tp']}, pp {r['pp']})", _gb(r["weights_per_gpu"]), _gb(r["kv_per_gpu"]),
             _gb(r["total_per_gpu"]), f"{r['tokens_per_s']:.0f}", r["bound"], f"{r['price']:.2f}",
             f"{r['usd_per_million_tokens']:.3g}", f"${_si(r['cost_for_tokens'])}"] for r in result["by_gpu"]]
    lines.append(_table(["gpu", "gpus", "weights GB", "KV GB", "total GB", "decode tok/s", "bound", "$/GPU-h",
                         "$/M tokens", f"$ for {_si(result['tokens'])} tokens"], rows))
    return "\n".join(lines)


def run_plan(cfg: PlanConfig) -> int:
    """`kiln plan`: print the plan as tables, or as one JSON object with json=true."""
    result = plan(cfg)
    if cfg.json:
        print(json.dumps(result, default=float))
    elif result["workload"] == "inference":
        print(format_inference(result))
    else:
        print(format_training(result))
    return 0
