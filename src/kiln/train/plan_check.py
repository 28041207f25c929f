"""Every training run checks the plan: before its first step the Trainer asks the planner
(`kiln.plan.predict_run`) about this exact run, and when it ends writes `plan_vs_run.json` in the
run directory (the prediction, what the run measured, the error of each figure) for the report's
"Plan vs measured" table and for `kiln plan … calibrate=`.

What is compared, per device:

- **peak memory**: on CUDA `torch.cuda.max_memory_allocated` over the fit; on CPU the allocator's
  peak during the first step of the fit (the profiler's memory events, as `bench/scaling.py` and
  tests/test_plan.py measure it) on top of the weights, buffers, optimizer state and DDP buckets
  already live, counting the optimizer state a first step creates as live from the start (as in
  every later step). The largest over ranks. Not the process's RSS: that holds the interpreter,
  libraries and the data, which no plan counts.
- **step time** and **tokens/s**: the steps the Trainer times (warm-up left out, as in its log).
- **total time** and **cost**: the fit's wall time (warm-up, evaluation and checkpoints included)
  at the configured price (`serve.usd_per_hour`; 0 = the assumed price of the GPU, or of a CPU host).

The prediction covers what the planner models: a transformer trained on its vocabulary logits,
with AdamW, in any layout. Where a workload adds what it does not (a scalar or pooled head, pairs
padded to their batch, rollouts inside a step, a teacher's logits) the prediction is marked partial
with the reason; a model without transformer blocks gets none.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist

from kiln.hardware import GPUS, datasheet_peak, usd_per_hour
from kiln.model.config import ModelConfig
from kiln.model.lora import LoRALinear
from kiln.model.transformer import Block
from kiln.plan import DEFAULT_MFU, PLAN_VS_RUN, calibrated_mfu, device_spec, predict_run
from kiln.runs import write_json
from kiln.train.metrics import allocation_peak
from kiln.train.parallel import use_compile

# What the planner leaves out of a workload's step, by the Trainer's name for it (absent: nothing).
NOT_PLANNED = {
    "reward": "the scalar head reads one hidden state per sequence, so the vocabulary logits the planner "
              "counts are never computed; pairs are padded to each batch's longest, not train.seq_len",
    "dpo": "pairs are padded to each batch's longest, not train.seq_len; the reference model's forward pass "
           "is not planned (its weights are)",
    "rl": "each step samples rollouts and scores them before training on them: generation and rewards "
          "are not planned",
    "distill": "the teacher's forward pass and its logits, held beside the student's, are not planned "
               "(its weights are)",
    "vision": "the planner models a transformer over the patch tokens: not the patch embedding or the "
              "pooled classification head (it counts vocabulary-sized logits per token)",
    "classify": "the pooled classification head reads one vector per sequence, so the vocabulary logits the "
                "planner counts are never computed",
}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP


def _local_bytes(tensors) -> int:
    """Bytes this rank holds for `tensors`, each storage once (a DTensor counts its local shard)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _ram_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0.0


def _ranks_on_host() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def measure_link(device: torch.device) -> float:
    """Bytes per second one rank sends in a ring all-reduce of 8 MiB (the best of 3), over the whole
    process group: the rate the planner's collectives run at on this machine. Collective."""
    t = torch.ones(2**21, device=device)
    world = dist.get_world_size()
    dist.all_reduce(t)
    best = math.inf
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dist.all_reduce(t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    slowest = torch.tensor([best], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # every rank plans with the same rate
    return 2 * (world - 1) / world * t.nbytes / float(slowest)


class StepMemory:
    """The allocator's peak of one training step on CPU, measured in two phases (forward/backward,
    then the optimizer step) so that the first step of a fit serves: its optimizer state, created
    during that step, is counted as live from the start, as it is in every later step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, frozen: list[torch.nn.Module],
                 ddp_bucket_bytes: int) -> None:
        self.model, self.optimizer, self.frozen = model, optimizer, frozen
        self.ddp_bucket_bytes = ddp_bucket_bytes
        self.peak: int | None = None

    def _held(self) -> int:
        mods = [self.model, *self.frozen]
        return _local_bytes([t for m in mods for t in (*m.parameters(), *m.buffers())]) + self.ddp_bucket_bytes

    def _state(self) -> int:
        return _local_bytes([v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)])

    def train_step(self, fn):
        self.base, self.state_before = self._held(), self._state()
        out: list = []
        self.forward_backward = allocation_peak(lambda: out.append(fn()))
        self.peak = self.base + self.state_before + self.forward_backward
        return out[0]

    def optimizer_step(self) -> None:
        grads = _local_bytes([p.grad for p in self.model.parameters() if p.grad is not None])
        update = allocation_peak(self.optimizer.step)
        state = self._state()
        self.peak = max(self.base + state + self.forward_backward, self.base + self.state_before + grads + update)


class PlanCheck:
    """One fit's prediction (asked when the fit starts) and measurement (gathered as it runs)."""

    def __init__(self, trainer, peak: float) -> None:
        self.trainer = trainer
        self.predicted: dict | None = None
        self.partial: list[str] = []
        self.reason = ""  # why there is no prediction
        self.timed_s = self.warm_s = 0.0
        self.timed_tokens = self.timed_steps = self.warm_steps = self.warm_tokens = 0
        self.memory: StepMemory | None = None
        env = trainer.env
        self.link = measure_link(env.device) if env.distributed else 0.0  # collective: every rank, always
        try:
            self.predicted = self._predict(peak)
        except Exception as e:  # noqa: BLE001 — a plan never stops a run: it says why it has none
            self.reason = f"the planner could not model this run ({type(e).__name__}: {e})"

    # ---- before: the prediction -------------------------------------------------------------
    def _model_config(self) -> ModelConfig | None:
        info = self.trainer.meta.get("model")
        if info:
            return ModelConfig.from_dict(info)
        cfg = getattr(_unwrap(self.trainer.model), "cfg", None)
        return cfg if isinstance(cfg, ModelConfig) else None

    def _device(self, peak: float):
        """(the planner's GPUSpec for this device, price per device-hour, devices per node, the
        collectives' measured rate or 0 for a datasheet GPU's links)."""
        env, tr = self.trainer.env, self.trainer
        device = env.device
        setting = tr.cfg.serve.usd_per_hour
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            memory = float(torch.cuda.get_device_properties(device).total_memory)
            known = datasheet_peak(name, "bf16")
            per_node = max(1, min(env.world, torch.cuda.device_count() if _ranks_on_host() == 1 else _ranks_on_host()))
            if known is not None and known[1] in GPUS:
                spec = GPUS[known[1]]
                gpu = device_spec(f"{name} ({spec.name} datasheet links)", peak, memory, spec.nvlink_gbps * 1e9 / 2)
                return gpu, usd_per_hour(setting, device), per_node, 0.0
            return device_spec(name, peak, memory, self.link), usd_per_hour(setting, device), per_node, self.link
        ranks = max(1, min(env.world, _ranks_on_host() if env.distributed else 1))
        what = "CPU" if device.type == "cpu" else str(device)
        gpu = device_spec(f"{what} ({torch.get_num_threads()} threads per rank)", peak, _ram_bytes() / ranks, self.link)
        # the ranks of one host share it: each device-hour is the host's price over the ranks on it
        return gpu, usd_per_hour(setting, device) / ranks, env.world, self.link

    def _predict(self, peak: float) -> dict | None:
        tr, env, cfg = self.trainer, self.trainer.env, self.trainer.cfg
        mc = self._model_config()
        module = _unwrap(tr.model)
        if mc is None or not any(isinstance(m, Block) for m in module.modules()):
            self.reason = "the planner models transformer blocks; this model has none" if mc else \
                "the Trainer was not told the model's shape (meta['model'])"
            return None
        vision = tr.name == "vision"
        seq_len = mc.max_seq_len if vision else cfg.train.seq_len
        per_micro = tr.tokens_per_micro
        sequences = per_micro if vision else max(1, per_micro // seq_len)
        lora = any(isinstance(m, LoRALinear) for m in module.modules())
        if tr.name in NOT_PLANNED:
            self.partial.append(NOT_PLANNED[tr.name])
        if lora and sorted(cfg.lora.targets) != sorted(("wq", "wk", "wv", "wo", "w1", "w2", "w3")):
            self.partial.append(f"LoRA adapters on {', '.join(cfg.lora.targets)} only: the planner counts them "
                                "on all seven projections")
        if cfg.train.freeze and not lora:
            self.partial.append(f"train.freeze={cfg.train.freeze}: the planner trains every weight (their gradients "
                                "and optimizer state are counted)")
        frozen = tuple(c for m in getattr(tr.objective, "frozen", {}).values()
                       if isinstance(c := getattr(_unwrap(m), "cfg", None), ModelConfig))
        gpu, price, per_node, link = self._device(peak)
        pipe = env.pipeline
        ddp = isinstance(tr.model, torch.nn.parallel.DistributedDataParallel)
        return predict_run(
            mc, micro_batch=sequences, seq_len=seq_len, steps=tr.tc.max_steps, layout=env.layout,
            precision="bf16" if tr._use_bf16() else "fp32", gpu=gpu, price_per_device_hour=price,
            accumulation=tr.accum, pp_microbatches=pipe.microbatches if pipe else 1,
            schedule=cfg.parallel.pp_schedule, link_bytes_s=link,
            devices_per_node=per_node, mfu=DEFAULT_MFU, lora_rank=cfg.lora.rank if lora else 0,
            activation_checkpointing=cfg.train.activation_checkpointing, frozen=frozen, ddp_buckets=ddp,
            step_tokens=tr.tokens_per_step)

    def describe(self) -> str:
        """The line the run prints before its first step."""
        p = self.predicted
        if p is None:
            return f"plan: no prediction: {self.reason}"
        part = " (partial: see the report)" if self.partial else ""
        return (f"plan{part}: peak {p['peak_memory_bytes'] / 1e6:,.1f} MB per device, step {p['step_seconds']:.3g} s, "
                f"{p['tokens_per_s']:,.0f} tokens/s, {p['total_seconds']:.3g} s and ${p['cost_usd']:.3g} for "
                f"{p['steps']} steps at the assumed MFU {p['mfu']:.0%} on {p['devices']} × {p['device']}")

    # ---- during: what the run measures ------------------------------------------------------
    def step_memory(self) -> StepMemory | None:
        """The probe for the first step of this fit: on CPU, not under torch.compile (the profiler
        would count compilation); None elsewhere (CUDA reads its own allocator's peak)."""
        tr = self.trainer
        if tr.env.device.type != "cpu" or use_compile(tr.cfg.train.compile, tr.env.device):
            return None
        frozen = [_unwrap(m) for m in getattr(tr.objective, "frozen", {}).values()]
        buckets = 0
        if isinstance(tr.model, torch.nn.parallel.DistributedDataParallel):  # its flat gradient buckets
            buckets = sum(p.numel() * p.element_size() for p in tr.model.parameters() if p.requires_grad)
        self.memory = StepMemory(tr.model, tr.optimizer, frozen, buckets)
        return self.memory

    def timed(self, tokens: int, seconds: float, steps: int) -> None:
        self.timed_tokens += tokens
        self.timed_s += seconds
        self.timed_steps += steps

    def warm(self, tokens: int, seconds: float) -> None:
        self.warm_tokens += tokens
        self.warm_s += seconds
        self.warm_steps += 1

    # ---- after: the comparison --------------------------------------------------------------
    def _peak_memory(self) -> float | None:
        """This fit's measured peak per device, the largest over ranks. Collective."""
        env = self.trainer.env
        if env.device.type == "cuda":
            mine = float(torch.cuda.max_memory_allocated(env.device))
        elif self.memory is not None and self.memory.peak is not None:
            mine = float(self.memory.peak)
        else:
            mine = -1.0
        if env.distributed:
            t = torch.tensor([mine], dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            mine = float(t)
        return mine if mine > 0 else None

    def finish(self, peak_flops: float) -> dict:
        """Gather the measurement (collective: every rank calls it) and, on the main rank, write
        `plan_vs_run.json`; returns what it wrote."""
        tr = self.trainer
        memory = self._peak_memory()
        if self.timed_steps:
            step_s, tps, timed = self.timed_s / self.timed_steps, self.timed_tokens / self.timed_s, "steady"
        elif self.warm_steps:  # every step was warm-up: its time is all there is, and it says so
            step_s, tps, timed = self.warm_s / self.warm_steps, self.warm_tokens / self.warm_s, "warm-up"
        else:
            step_s = tps = None
            timed = "none"
        p = self.predicted
        measured = {"peak_memory_bytes": memory, "step_seconds": step_s, "tokens_per_s": tps,
                    "total_seconds": tr.elapsed, "steps": tr.step, "timed_steps": self.timed_steps, "timing": timed,
                    "memory_source": ("torch.cuda.max_memory_allocated" if tr.env.device.type == "cuda" else
                                      "CPU allocator peak of the first step (profiler memory events) + live weights, "
                                      "buffers, optimizer state" if memory else "not measured")}
        if p is not None:
            measured["cost_usd"] = p["devices"] * tr.elapsed / 3600 * p["price_per_device_hour"]
        out: dict = {"workload": tr.name, "predicted": p, "measured": measured, "error": {},
                     "partial": self.partial, "no_prediction": self.reason if p is None else ""}
        if p is not None:
            out["model"] = {"params": self._model_config().num_params()}
            for key in ("peak_memory_bytes", "step_seconds", "tokens_per_s", "total_seconds", "cost_usd"):
                if measured.get(key):
                    out["error"][key] = p[key] / measured[key] - 1
            if step_s and tps and timed == "steady":
                # the MFU that would have predicted this step time (at the planned tokens per step)
                planned = dict(p, peak_flops_per_device=peak_flops)
                step_at_plan = p["tokens_per_s"] * p["step_seconds"] / tps
                mfu = calibrated_mfu(planned, step_at_plan)
                measured["mfu"] = mfu
                if mfu > 1:  # cannot be true: the peak was timed low (a busy host); kept, marked, never used
                    measured["mfu_unreliable"] = True
                else:
                    out["calibration"] = {"mfu": mfu, "peak_flops_per_device": peak_flops,
                                          "partial": bool(self.partial)}
        if tr.env.is_main:
            write_json(tr.run_dir / PLAN_VS_RUN, out)
        return out
