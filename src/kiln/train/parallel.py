"""Everything applied to the model from outside: process group and device mesh, pipeline stages,
tensor parallelism, activation checkpointing, compile, FSDP2 / DDP.

The model file stays plain single-device PyTorch (docs/architecture.md); this module wraps it, in
torchtitan's fixed order: split into pipeline stages → TP → activation checkpointing → compile →
FSDP2 (or DDP) → `PipelineStage`. The mesh is ("pp", "dp_replicate", "dp_shard", "tp"), TP
innermost so that its heavy traffic stays on the fastest links (within a node).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from kiln.config import Config, ParallelConfig
from kiln.errors import KilnError, PeerLostError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class Pipeline:
    """This rank's pipeline stage and the schedule (GPipe or 1F1B) that drives it.

    The last stage computes the objective's `pipeline_loss(logits, labels)`; an objective without
    one (it needs more than the logits and labels, or frozen models) cannot run pipelined and
    `bind` says so. Only `input_ids` travel between stages, so a batch carrying positions or
    masks is refused rather than silently trained without them.
    """

    schedule: object
    stage_index: int
    n_stages: int
    microbatches: int
    group: dist.ProcessGroup
    tied_group: dist.ProcessGroup | None = None  # first + last stage, when they hold one tied weight
    loss_scale: float = 1.0
    objective_loss: object = None
    workload: str = "pretrain"

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.n_stages - 1

    def bind(self, objective, workload: str) -> None:
        if getattr(objective, "pipeline_loss", None) is None or objective.frozen:
            raise KilnError(f"{workload}: the {objective.name} objective cannot run under pipeline parallelism "
                            "(it needs more than one stage's logits and labels); set parallel.pp=1")
        self.objective_loss, self.workload = objective.pipeline_loss, workload

    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Per-microbatch loss; the schedule does not rescale (scale_grads=False) because
        # `loss_scale` already folds in 1 / (microbatches × accumulation steps).
        return self.objective_loss(logits, labels) * self.loss_scale

    def _check(self, batch: dict) -> None:
        extra = sorted(set(batch) - {"input_ids", "labels"})
        if extra:
            raise KilnError(f"{self.workload}: under pipeline parallelism only input_ids pass between stages, but the "
                            f"batch also carries {', '.join(extra)}; set parallel.pp=1 (or train.document_mask=false)")

    def run(self, batch: dict, scale: float, train: bool = True) -> torch.Tensor:
        """One batch through the pipeline; the last stage returns Σ scaled microbatch losses, others 0."""
        self._check(batch)
        inputs = batch["input_ids"]
        self.loss_scale = scale / self.microbatches
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.is_first else ()
        kwargs = {"target": batch["labels"], "losses": losses} if self.is_last else {}
        (self.schedule.step if train else self.schedule.eval)(*args, return_outputs=False, **kwargs)
        if not losses:
            return torch.zeros((), device=inputs.device)
        return torch.stack([loss.detach() for loss in losses]).sum()

    def eval_step(self, batch: dict) -> dict[str, tuple[float, float]]:
        """Validation loss of one batch: (mean loss × labelled tokens, labelled tokens) on the last
        stage, (0, 0) elsewhere, so a sum over all ranks counts each pipeline once."""
        loss = self.run(batch, 1.0, train=False)
        if not self.is_last:
            return {"val_loss": (0.0, 0.0)}
        n = float((batch["labels"] != -100).sum())
        return {"val_loss": (float(loss) * n, n)}


@dataclass
class ParallelEnv:
    """Where this process sits: its device, its global rank, the mesh and its data-parallel coordinates."""

    device: torch.device
    rank: int = 0
    world: int = 1
    dp_rank: int = 0
    dp_world: int = 1
    layout: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MESH_DIMS, 1))
    mesh: object = None  # DeviceMesh over MESH_DIMS when distributed
    pipeline: Pipeline | None = None  # set by parallelize when pp > 1
    dedup_params: set[int] = field(default_factory=set)  # ids of tied copies not to count twice in the grad norm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def describe(self) -> str:
        if not self.distributed:
            return f"device {self.device}"
        dims = ", ".join(f"{k}={v}" for k, v in self.layout.items() if v > 1)
        return f"{self.world} ranks ({dims}), device {self.device}"


def pick_device(spec: str) -> torch.device:
    """The device `spec` names for this process (`choose_device`), set up for use (`use_device`)."""
    return use_device(choose_device(spec))


def choose_device(spec: str) -> torch.device:
    """auto, cpu, cuda, cuda:N or mps as one device for this process.

    As torchrun-launched tools do, `cuda` (and `auto` on a CUDA host) is this rank's own GPU, the
    one at index LOCAL_RANK (0 outside torchrun); which GPUs a node lends is chosen with
    CUDA_VISIBLE_DEVICES. `cuda:N` pins one GPU, which only a single rank per node can use:
    with several, every rank would land on GPU N, so it is refused.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return _local_gpu()
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise KilnError(f"device={spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise KilnError(f"device={spec} asked for CUDA but none is available; use device=auto or device=cpu")
    if dev.index is None:
        return _local_gpu()
    per_node = _ranks_per_node()
    if per_node > 1:
        raise KilnError(f"device={spec} would put all {per_node} ranks on this node on one GPU; use device=cuda "
                        "(each rank takes the GPU at its LOCAL_RANK) and CUDA_VISIBLE_DEVICES to pick the GPUs")
    visible = torch.cuda.device_count()
    if dev.index >= visible:
        raise KilnError(f"device={spec} names GPU {dev.index}, but {visible} GPU{'s' * (visible != 1)} "
                        f"{'are' if visible != 1 else 'is'} visible (0..{visible - 1}); check CUDA_VISIBLE_DEVICES")
    return dev


def _ranks_per_node() -> int:
    """How many ranks torchrun started on this node (LOCAL_WORLD_SIZE; the world size without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def _local_gpu() -> torch.device:
    local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= visible:
        raise KilnError(f"LOCAL_RANK={local_rank}, but {visible} GPU{'s' * (visible != 1)} "
                        f"{'are' if visible != 1 else 'is'} visible on this node; start at most {visible} "
                        "processes per node (torchrun --nproc-per-node) or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", local_rank)


def use_device(device: torch.device) -> torch.device:
    """Set this process up for `device`. On CUDA: it becomes the current device (what kernels,
    collectives and memory figures that name no device use), and fp32 matmuls and convolutions run
    on TF32 tensor cores (the rate `kiln plan` and the MFU peak of fp32 training assume; 10 mantissa
    bits on the multiply, fp32 accumulation). Other devices are left as they are."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # the legacy flags: they leave CPU (oneDNN) matmuls in fp32
        torch.backends.cudnn.allow_tf32 = True
    return device


def resolve_layout(pc: ParallelConfig, world: int) -> dict[str, int]:
    """The mesh sizes for `world` ranks; dp_shard=-1 takes whatever the others leave over."""
    fixed = {"pp": pc.pp, "dp_replicate": pc.dp_replicate, "tp": pc.tp}
    for k, v in fixed.items():
        if v < 1:
            raise KilnError(f"parallel.{k}={v} must be at least 1")
    rest = pc.pp * pc.dp_replicate * pc.tp
    shard = pc.dp_shard
    if shard == -1:
        if world % rest:
            raise KilnError(
                f"parallel layout pp={pc.pp} × dp_replicate={pc.dp_replicate} × tp={pc.tp} = {rest} does not divide "
                f"the world size {world}; launch a multiple of {rest} processes or change the layout"
            )
        shard = world // rest
    if shard < 1 or rest * shard != world:
        raise KilnError(
            f"parallel layout pp={pc.pp} × dp_replicate={pc.dp_replicate} × dp_shard={shard} × tp={pc.tp} = "
            f"{rest * shard} ranks, but {world} were launched; make the product equal the world size "
            "(dp_shard=-1 fills it in)"
        )
    return {"pp": pc.pp, "dp_replicate": pc.dp_replicate, "dp_shard": shard, "tp": pc.tp}


# How NCCL's watchdog handles a collective that failed or outlasted the timeout (torch 2.13,
# ProcessGroupNCCL.hpp `ErrorHandlingMode`): 3, torch's default, tears the process down (SIGABRT)
# without aborting the communicators; 2 aborts them and leaves the process up, so the error is
# raised in the training thread by its next collective (DistBackendError: "NCCL communicator was
# aborted ..."), where `peer_failures_as_errors` turns it into kiln's one line. A value set in the
# environment is kept.
NCCL_ERROR_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


def process_group_backend(device: torch.device) -> str:
    """nccl for a CUDA device (its environment set first: `NCCL_ERROR_ENV`), else gloo."""
    if device.type != "cuda":
        return "gloo"
    for key, value in NCCL_ERROR_ENV.items():
        os.environ.setdefault(key, value)
    return "nccl"


def init_env(cfg: Config) -> ParallelEnv:
    """Join the process group torchrun describes (if any) and build the device mesh.

    nccl on CUDA, gloo otherwise; every collective gives up after `parallel.timeout_s`, so a dead
    rank makes the others stop with an error instead of waiting forever (under NCCL raised in this
    thread, not a SIGABRT from the watchdog: `NCCL_ERROR_ENV`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = resolve_layout(cfg.parallel, world)
    if world == 1:
        return ParallelEnv(device=pick_device(cfg.device), layout=layout)
    from torch.distributed.device_mesh import init_device_mesh

    device = pick_device(cfg.device)  # this rank's GPU, made current before the process group forms
    if not dist.is_initialized():
        backend = process_group_backend(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.parallel.timeout_s))
        atexit.register(shutdown)
    mesh = init_device_mesh(device.type, tuple(layout.values()), mesh_dim_names=MESH_DIMS)
    dp_rank = mesh["dp_replicate"].get_local_rank() * layout["dp_shard"] + mesh["dp_shard"].get_local_rank()
    return ParallelEnv(device=device, rank=dist.get_rank(), world=world, dp_rank=dp_rank,
                       dp_world=layout["dp_replicate"] * layout["dp_shard"], layout=layout, mesh=mesh)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- the pieces, in the order parallelize applies them ---------------------------------------
def split_for_pipeline(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """Keep only this stage's blocks (contiguous, as even as possible); the first keeps the
    embedding, the last the final norm and head. Names stay those of the whole model."""
    n = len(model.layers)
    if n_stages > n:
        raise KilnError(f"parallel.pp={n_stages} pipeline stages but the model has only {n} layers; "
                        f"use parallel.pp ≤ {n}")
    bounds = [round(i * n / n_stages) for i in range(n_stages + 1)]
    keep = {str(i) for i in range(bounds[stage], bounds[stage + 1])}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if stage != 0:
        model.tok_emb = None
    if stage != n_stages - 1:
        model.norm = None
        model.lm_head = None
    return model


def _replicate_norm(norm: nn.Module, tp_mesh) -> None:
    """A norm outside sequence parallelism: weight replicated as a DTensor, plain tensors in and out."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    distribute_module(
        norm, tp_mesh,
        input_fn=lambda mod, inputs, mesh: (DTensor.from_local(inputs[0], mesh, [Replicate()], run_check=False),),
        output_fn=lambda mod, out, mesh: out.to_local(),
    )


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Megatron-style TP: q/k/v and w1/w3 split by output (heads / hidden; q/k/v biases with
    them), wo and w2 by input (wo's bias added once, after the reduction). Sliding windows, scaled
    RoPE and a head size of its own need nothing more; per-head q/k norms (Qwen3) are refused.

    With `sequence_parallel` the norms and the residual stream between blocks are split along the
    sequence, so each rank holds 1/tp of those activations (all-gather before attention / MLP,
    reduce-scatter after); without it they are replicated (used under pipeline parallelism, where
    stages hand each other whole activations).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    cfg = model.cfg
    for what, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads)):
        if n % tp:
            raise KilnError(f"parallel.tp={tp} does not divide model.{what}={n}; pick a TP degree that divides "
                            f"both n_heads={cfg.n_heads} and n_kv_heads={cfg.n_kv_heads}")
    if cfg.ffn_hidden % tp or cfg.vocab_size % tp:
        raise KilnError(f"parallel.tp={tp} does not divide ffn_hidden={cfg.ffn_hidden} and vocab={cfg.vocab_size}")
    if cfg.qk_norm:  # each rank would train its own copy of the norm gains from its own heads' gradients
        raise KilnError(f"parallel.tp={tp} with model.qk_norm=true (a Qwen3): the per-head q/k norm gains are shared "
                        "by heads that TP puts on different ranks, and their gradients are not summed across them; "
                        "use parallel.tp=1 (FSDP, parallel.dp_shard, shards the model instead)")
    seq = Shard(1) if sequence_parallel else Replicate()
    root_plan = {}
    if model.tok_emb is not None:
        root_plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.lm_head is not None:
        root_plan["lm_head"] = ColwiseParallel(input_layouts=seq, output_layouts=Replicate())
    if model.norm is not None and sequence_parallel:
        root_plan["norm"] = SequenceParallel()
    tied = model.tok_emb is not None and model.lm_head is not None and model.lm_head.weight is model.tok_emb.weight
    parallelize_module(model, tp_mesh, root_plan)
    if tied:  # both shard the (vocab, d) table by rows: one DTensor serves both
        model.lm_head.weight = model.tok_emb.weight
    if model.norm is not None and not sequence_parallel:
        _replicate_norm(model.norm, tp_mesh)
    for block in model.layers.values():
        plan = {
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=seq),
            "mlp.w1": ColwiseParallel(), "mlp.w3": ColwiseParallel(),
            "mlp.w2": RowwiseParallel(output_layouts=seq),
        }
        if sequence_parallel:
            plan |= {
                "attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel(),
                # Block calls attn(x, cos, sin, cache, start): gather only x.
                "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                           desired_input_layouts=(Replicate(), None, None, None, None)),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            }
        parallelize_module(block, tp_mesh, plan)
        if not sequence_parallel:
            _replicate_norm(block.attn_norm, tp_mesh)
            _replicate_norm(block.mlp_norm, tp_mesh)
        block.attn.n_heads //= tp  # the attention reshapes its local shard by these
        block.attn.n_kv_heads //= tp


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass instead of storing them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))


def use_compile(setting: str, device: torch.device) -> bool:
    """A `compile` setting (auto|on|off) on `device`: auto = on for CUDA only."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


# What `apply_compile` compiles with (a name or a backend function). Tests and CPU checks set
# "eager": dynamo's tracing, guards and cache entries without inductor's code generation.
COMPILE_BACKEND = "inductor"
# Graphs one model's blocks may need: gradients on or off × with or without a mask × positions as
# a range or per row × static lengths, then lengths marked dynamic. More is a recompilation bug,
# and a `fullgraph` compile raises on it rather than run slowly.
BLOCK_RECOMPILE_LIMIT = 16


def apply_compile(model: nn.Module, backend: str | Callable | None = None) -> None:
    """Compile block by block (`fullgraph`), every block of `model` through one dynamo context.

    Dynamo keeps compiled graphs on the code object it traced, `Block.forward`, which every block
    of every model in the process runs, and past `torch._dynamo.config.recompile_limit` (8)
    entries a `fullgraph` compile raises `FailOnRecompileLimitHit`; its automatic dynamic shapes
    are learnt per code object too, so one model's shapes turned another's dynamic (under FSDP2
    its head counts too, which SDPA's `enable_gqa` then refused). The models of one process (a speedrun's stages, a DPO policy
    beside its reference, a distillation student beside its teacher) used to add up to both.
    Here, per model:

    - its blocks share one graph: their parameters are graph inputs, and blocks of one shape pass
      the same guards;
    - its entries are its own (`isolate_recompiles`), up to `BLOCK_RECOMPILE_LIMIT`;
    - shapes are static (`dynamic=False`): nothing turns dynamic because another model differs.
      What does vary within one model, the batch and sequence lengths (DPO's and GRPO's padded
      widths, a smaller evaluation batch), is marked dynamic on the blocks' inputs once the model
      has seen a second one (`_VaryingLengths`): one more graph, for every length after it.

    Generation through a model with compiled blocks (GRPO's rollouts, on-policy distillation)
    runs them eagerly (`kiln.infer.engine.Batch`): a KV cache is not a training shape.
    """
    blocks = list(model.layers.values())
    if not blocks:
        return
    first = torch.compile(blocks[0], fullgraph=True, dynamic=False, backend=backend or COMPILE_BACKEND,
                          recompile_limit=BLOCK_RECOMPILE_LIMIT, isolate_recompiles=True)
    lengths = _VaryingLengths()
    for name, block in list(model.layers.named_children()):
        # the first block's context wraps the others: one region, so one graph for all of them
        wrapped = first if block is blocks[0] else first.dynamo_ctx(block)
        wrapped.register_forward_pre_hook(lengths)
        model.layers.register_module(name, wrapped)


class _VaryingLengths:
    """A forward pre-hook on one model's compiled blocks, which take (x, cos, sin, mask, cache):
    x (B, T, d), the RoPE tables (T, hd) or per row (B, 1, T, hd), the mask (B, 1, T, T). Once
    the model has seen a second batch size or sequence length, those dimensions of every input are
    marked dynamic (softly: a size dynamo specializes, like 1, stays static)."""

    def __init__(self) -> None:
        self.first: tuple[int, int] | None = None
        self.batch = self.seq = False

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3 or any(
                a is not None for a in args[4:]):  # a KV cache: generation, which runs the blocks eagerly
            return
        b, t = args[0].shape[:2]
        if self.first is None:
            self.first = (b, t)
        self.batch |= b != self.first[0]
        self.seq |= t != self.first[1]
        if not (self.batch or self.seq):
            return
        x, cos, sin, mask = (list(args) + [None] * 4)[:4]
        # (tensor, its batch dimensions, its sequence dimensions)
        parts = [(x, (0,), (1,)), (mask, (0,), (2, 3))]
        parts += [(r, (), (0,)) if r.dim() == 2 else (r, (0,), (2,)) for r in (cos, sin) if isinstance(r, torch.Tensor)]
        for tensor, batch_dims, seq_dims in parts:
            if isinstance(tensor, torch.Tensor):
                for d in (batch_dims if self.batch else ()) + (seq_dims if self.seq else ()):
                    torch._dynamo.maybe_mark_dynamic(tensor, d)


def apply_fsdp(model: nn.Module, dp_mesh, bf16: bool) -> None:
    """FSDP2: each block is one all-gather / reduce-scatter unit, the root holds embedding, norm and head.
    On GPU with bf16, parameters are gathered in bf16 and gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again first in backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def apply_ddp(model: nn.Module, dp_mesh) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, process_group=dp_mesh.get_group())


def _tied_group(env: ParallelEnv) -> dist.ProcessGroup | None:
    """Groups {first stage, last stage} of every pipeline: a tied embedding's two copies sum their
    gradients there. Every rank creates every group (new_group is collective)."""
    pp_lines = env.mesh.mesh.reshape(env.layout["pp"], -1).t()  # each row: one pipeline's ranks, by stage
    mine = None
    for line in pp_lines.tolist():
        g = dist.new_group([line[0], line[-1]])
        if env.rank in (line[0], line[-1]):
            mine = g
    return mine


def parallelize(model: nn.Module, cfg: Config, env: ParallelEnv, frozen: bool = False) -> nn.Module:
    """Apply, in a fixed order, PP split, TP, activation checkpointing, compile and FSDP2 / DDP;
    return this rank's part of the model to train (under PP, its stage; `env.pipeline` drives it).

    Call it once per model of a run. `frozen=True` places a model the objective holds but does
    not train (a DPO reference, a distillation teacher) like the trained one: TP and FSDP2
    sharded the same way, no DDP (it has no gradients to reduce), no activation checkpointing,
    never a pipeline. A model still on the meta device stays there (see `materialize`).
    """
    lay = env.layout
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and env.device.type == "cuda")
    tied = model.cfg.tie_embeddings  # under PP its two uses land on different stages
    on_meta = any(p.is_meta for p in model.parameters())
    if frozen:
        model.requires_grad_(False)
        model.eval()
        if lay["pp"] > 1:
            raise KilnError("a frozen reference or teacher model cannot be placed under pipeline parallelism; "
                            "set parallel.pp=1")
    if lay["pp"] > 1:
        split_for_pipeline(model, env.mesh["pp"].get_local_rank(), lay["pp"])
    if not on_meta:
        model.to(env.device)
    if lay["tp"] > 1:
        apply_tp(model, env.mesh["tp"], sequence_parallel=lay["pp"] == 1)
    if cfg.train.activation_checkpointing and not frozen:
        apply_activation_checkpointing(model)
    if use_compile(cfg.train.compile, env.device):
        apply_compile(model)
    stage_module = model
    if lay["dp_shard"] > 1:
        dims = ("dp_replicate", "dp_shard") if lay["dp_replicate"] > 1 else ("dp_shard",)
        apply_fsdp(model, env.mesh[dims], bf16 and env.device.type == "cuda")
    elif lay["dp_replicate"] > 1:
        if lay["tp"] > 1:
            raise KilnError("parallel.dp_replicate>1 with tp>1 needs sharded data parallelism: "
                            "set parallel.dp_shard to the data-parallel degree instead (FSDP2 / HSDP)")
        if not frozen:
            stage_module = apply_ddp(model, env.mesh["dp_replicate"])
    if lay["pp"] > 1:
        env.pipeline = build_pipeline(stage_module, cfg, env, tied)
        if tied and env.pipeline.is_last and not env.pipeline.is_first:
            env.dedup_params = {id(model.lm_head.weight)}
        return model
    return stage_module


def shards_parameters(env: ParallelEnv) -> bool:
    """Whether this layout keeps only a shard of each weight per rank (FSDP2 or TP)."""
    return env.layout["dp_shard"] > 1 or env.layout["tp"] > 1


def build_model(make, cfg: Config, env: ParallelEnv, init, frozen: bool = False) -> nn.Module:
    """Build a model with `make()`, place it with `parallelize` and fill its weights with `init(model)`.

    Where the layout shards weights (FSDP2, TP) the model is built on the meta device, sharded,
    and only then materialized (`to_empty`) and initialized, so no rank ever holds the whole
    model: `init` must write DTensor parameters shard by shard, as `Transformer.init_weights`
    and `checkpoint.load_model_tensors` do. Elsewhere it is built and initialized whole, then placed.
    """
    if not shards_parameters(env):
        model = make()
        init(model)
        return parallelize(model, cfg, env, frozen=frozen)
    with torch.device("meta"):
        model = make()
    placed = parallelize(model, cfg, env, frozen=frozen)
    model.to_empty(device=env.device)
    init(model)
    return placed


def build_pipeline(stage_module: nn.Module, cfg: Config, env: ParallelEnv, tied: bool) -> Pipeline:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    pc, n_stages = cfg.parallel, env.layout["pp"]
    micro = pc.pp_microbatches or 2 * n_stages
    if cfg.train.batch_size % micro:
        raise KilnError(f"train.batch_size={cfg.train.batch_size} does not split into parallel.pp_microbatches={micro} "
                        f"equal microbatches; make the batch size a multiple of {micro}")
    if pc.pp_schedule == "1f1b" and micro < n_stages:
        raise KilnError(f"the 1F1B schedule needs at least pp={n_stages} microbatches, got {micro}")
    index = env.mesh["pp"].get_local_rank()
    group = env.mesh["pp"].get_group()
    stage = PipelineStage(stage_module, index, n_stages, env.device, group=group)
    cls = ScheduleGPipe if pc.pp_schedule == "gpipe" else Schedule1F1B
    pipe = Pipeline(schedule=None, stage_index=index, n_stages=n_stages, microbatches=micro, group=group,
                    tied_group=_tied_group(env) if tied else None)
    pipe.schedule = cls(stage, n_microbatches=micro, loss_fn=pipe.loss_fn, scale_grads=False)
    return pipe


# ---- what the training loop needs ----------------------------------------------------------------
def no_grad_sync(model: nn.Module):
    """For accumulation micro-batches before the last: DDP skips its all-reduce (FSDP2 reduces every
    micro-batch, keeping gradients sharded)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


_COMM_FAILURE = ("connection", "timed out", "timeout", "gloo", "nccl", "peer", "socket", "broken pipe")


@contextlib.contextmanager
def peer_failures_as_errors(env: ParallelEnv, timeout_s: float):
    """Turn a collective that failed because another rank died (or stalled past the timeout) into one line."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: a save that lost a peer

    try:
        yield
    except (dist.DistError, RuntimeError, CheckpointException) as e:
        text = str(e).strip()
        if not env.distributed or not (isinstance(e, dist.DistError) or any(w in text.lower() for w in _COMM_FAILURE)):
            raise
        first = text.splitlines()[0][:200] if text else type(e).__name__
        raise PeerLostError(
            f"rank {env.rank} of {env.world} lost contact with the other ranks ({first}); a rank died or stalled "
            f"longer than parallel.timeout_s={timeout_s:g}: see its log, then rerun the same command to resume "
            "from the last checkpoint"
        ) from None


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def sync_tied_grads(model: nn.Module, env: ParallelEnv) -> None:
    """Under PP a tied embedding lives on the first and the last stage: sum the two gradients, as
    one shared weight would have, so both copies take the same step."""
    pipe = env.pipeline
    if pipe is None or pipe.tied_group is None:
        return
    w = model.tok_emb.weight if pipe.is_first else model.lm_head.weight
    if w.grad is not None:
        dist.all_reduce(_local(w.grad), group=pipe.tied_group)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, env: ParallelEnv) -> torch.Tensor:
    """Global gradient norm over every rank's shards, then clip: `clip_grad_norm_` for meshes.

    Gradients are grouped by how they are laid out; a group's local sum of squares is summed over
    the mesh dimensions it is sharded on (never the replicated ones), then over pipeline stages.
    A tied weight's second copy (`env.dedup_params`) is clipped but not counted.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate

    groups: dict = defaultdict(list)
    seen = set()
    for p in model.parameters():
        if p.grad is None or id(p) in seen:
            continue
        seen.add(id(p))
        if isinstance(p.grad, DTensor) and any(pl.is_partial() for pl in p.grad.placements):
            # sequence-parallel norms leave pending sums: reduce them before measuring
            p.grad = p.grad.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in p.grad.placements])
        g = p.grad
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups[key].append((g, id(p) in env.dedup_params))
    total = torch.zeros((), device=env.device, dtype=torch.float32)
    for key, items in groups.items():
        counted = [_local(g).float() for g, dup in items if not dup]
        sq = torch.stack([t.pow(2).sum() for t in counted]).sum() if counted else torch.zeros((), device=env.device)
        if key is not None:  # summed over every mesh dim it is split on (FSDP over TP uses _StridedShard)
            mesh, placements = key
            sq = DTensor.from_local(sq, mesh, [Replicate() if p.is_replicate() else Partial() for p in placements],
                                    run_check=False).full_tensor()
        total += sq
    if env.pipeline is not None:
        dist.all_reduce(total, group=env.pipeline.group)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g, _ in (item for items in groups.values() for item in items):
        _local(g).mul_(coef)
    return norm


def mean_loss(loss: torch.Tensor, env: ParallelEnv) -> torch.Tensor:
    """The step's loss averaged over data-parallel ranks and known to every rank (under PP only the
    last stage computes it; TP ranks hold copies), so every rank's spike guard decides alike."""
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return loss / (env.dp_world * env.layout["tp"])
