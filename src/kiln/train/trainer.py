"""The training loop every workload shares: forward → loss → backward → clip → step, for any
objective and any loader, with accumulation, the spike guard, evaluation, logs, checkpoints and
exact resume. Workloads (`kiln.workloads.*`) build the models, loader and objective and call
`Trainer.fit`; nothing here knows which workload it runs beyond its name.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from kiln.config import Config
from kiln.errors import KilnError
from kiln.hardware import peak_flops, retime_peak
from kiln.train import distributed_checkpoint, parallel
from kiln.train.checkpoint import CheckpointManager
from kiln.train.metrics import MetricsLog, format_duration
from kiln.train.objectives import Batch, Objective
from kiln.train.optim import build_optimizer, lr_at, set_lr
from kiln.train.plan_check import PlanCheck
from kiln.train.report import push_training_section


@dataclass
class SpikeGuard:
    """Skips a step whose loss or gradient norm is not finite, or whose loss jumps far above the
    recent ones.

    A spike is a loss more than `factor - 1` scales above the recent mean, the scale being the
    larger of |mean|, the recent spread and a small floor. For the positive losses of
    pretraining this is the familiar "above factor × the mean"; for losses near zero or below
    (DPO, RL, a reward margin) the spread takes over, so the guard works for any loss.
    """

    factor: float
    window: int
    max_in_row: int
    recent: deque = field(default_factory=deque)
    in_row: int = 0
    skipped: int = 0

    def bad(self, loss: float, grad_norm: float) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "non-finite loss or gradient"
        if len(self.recent) >= min(10, self.window):
            mean = sum(self.recent) / len(self.recent)
            spread = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / len(self.recent))
            scale = max(abs(mean), 3 * spread, 1e-3)
            if loss - mean > (self.factor - 1) * scale:
                return f"loss {loss:.4g} spiked far above the recent mean {mean:.4g}"
        return None

    def record(self, loss: float, reason: str | None, step: int) -> None:
        if reason is None:
            self.in_row = 0
            self.recent.append(loss)
            while len(self.recent) > self.window:
                self.recent.popleft()
            return
        self.in_row += 1
        self.skipped += 1
        if self.in_row >= self.max_in_row:
            raise KilnError(
                f"training diverged: {self.in_row} bad steps in a row up to step {step} ({reason}); "
                "lower train.lr, raise train.warmup_steps or resume from an earlier checkpoint"
            )

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "in_row": self.in_row, "skipped": self.skipped}

    def load_state_dict(self, s: dict) -> None:
        self.recent, self.in_row, self.skipped = deque(s["recent"]), s["in_row"], s["skipped"]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _wide(device: torch.device) -> torch.dtype:
    """The dtype metrics are summed in on `device`: float64 (the sums Python floats made), where it exists."""
    return torch.float32 if device.type == "mps" else torch.float64


def _add_metrics(sums: dict[str, torch.Tensor], metrics: dict, accum: int) -> None:
    """Add one micro-batch's metrics (0-d tensors or numbers) to the step's sums, each divided by
    `accum`, as tensors where they are: nothing is read back to the host (a sync on a GPU)."""
    for k, v in metrics.items():
        t = v.detach().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)
        t = t.to(_wide(t.device)) / accum
        sums[k] = sums[k] + t if k in sums else t


class Trainer:
    """Runs `objective` over batches from `loader` (the loader interface: `next_batch()`,
    `state_dict()`, `load_state_dict()`, `tokens_per_batch`), with accumulation, the spike guard,
    evaluation on `eval_batches`, logs, the run's report and checkpoints."""

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        env: parallel.ParallelEnv,
        loader,
        objective: Objective,
        eval_batches: list[Batch] | None = None,
        flops_per_token: float = 0.0,
        meta: dict | None = None,
        name: str = "pretrain",
        matmul_shapes: tuple[tuple[int, int, int], ...] = (),
    ) -> None:
        self.cfg, self.tc, self.model, self.env = cfg, cfg.train, model, env
        self.loader, self.objective, self.eval_batches = loader, objective, eval_batches
        self.name = name
        self.matmul_shapes = matmul_shapes  # (m, k, n) of the model's main matmuls, for the MFU peak
        if env.pipeline is not None:
            env.pipeline.bind(objective, name)
        self.optimizer = build_optimizer(model, cfg.train)
        if not self.optimizer.param_groups[0]["params"] and not self.optimizer.param_groups[1]["params"]:
            raise KilnError(f"{name}: the model has no trainable parameter; check train.freeze")
        self.run_dir = Path(cfg.out)
        self.ckpt = CheckpointManager(self.run_dir, cfg.train.keep_last)
        self.meta = {"workload": name, **(meta or {})}
        self.tokens_per_micro = getattr(loader, "tokens_per_batch", 0)
        self.flops_per_token = flops_per_token
        self.guard = SpikeGuard(self.tc.spike_factor, self.tc.spike_window, self.tc.max_bad_steps)
        self.step = 0
        self.tokens = 0  # cumulative over the run, across resumes and layouts
        self.elapsed = 0.0  # seconds of training, cumulative across resumes
        self.accum = self._accumulation_steps()
        self.tokens_per_step = self.tokens_per_micro * self.accum * env.dp_world
        self.autocast = (
            torch.autocast(env.device.type, dtype=torch.bfloat16)
            if self._use_bf16() else contextlib.nullcontext()
        )

    def _use_bf16(self) -> bool:
        p = self.tc.precision
        return p == "bf16" or (p == "auto" and self.env.device.type == "cuda")

    def _accumulation_steps(self) -> int:
        per_step = self.tokens_per_micro * self.env.dp_world
        if not self.tc.tokens_per_step:
            return 1
        if not per_step or self.tc.tokens_per_step % per_step:
            raise KilnError(
                f"train.tokens_per_step={self.tc.tokens_per_step} is not a multiple of one micro-batch across ranks "
                f"({per_step} = batch_size × seq_len × data-parallel ranks); pick a multiple of {per_step}"
            )
        return self.tc.tokens_per_step // per_step

    def say(self, text: str) -> None:
        """One line to stdout from the main rank, above the progress bar if there is one."""
        if self.env.is_main:
            tqdm.write(f"{self.name}: {text}", file=sys.stdout)
            sys.stdout.flush()

    # ---- state -----------------------------------------------------------------------------
    def state(self) -> dict:
        """The trainer state a checkpoint keeps (`state.pt`). Collective under torch.distributed:
        every rank's RNG states are gathered (`rng_ranks`), so each resumes from its own."""
        rng = rng_state(self.env.device)
        s = {"step": self.step, **rng, "loader": self.loader.state_dict(),
             "guard": self.guard.state_dict(), "tokens": self.tokens, "elapsed_s": self.elapsed,
             "tokens_per_step": self.tokens_per_step, "world": self.env.world}
        if self.env.distributed:
            every: list = [None] * self.env.world
            torch.distributed.all_gather_object(every, rng)
            s["rng_ranks"] = every
        return s

    def resume_from(self, path: Path) -> None:
        if distributed_checkpoint.is_sharded(path):  # saved on many ranks: loads into any layout, or one process
            state = distributed_checkpoint.load(path, self.model, self.optimizer)
        elif self.env.distributed:
            raise KilnError(f"{path} is a single-process checkpoint; resume it on one process, or start this "
                            "layout afresh with a new out=")
        else:
            state = self.ckpt.load(path, self.model, self.optimizer)
        self.step = int(state["step"])
        restore_rng(state, self.env)
        self.loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(state["guard"])
        before = int(state.get("tokens_per_step", self.tokens_per_step))
        self.tokens = int(state.get("tokens", self.step * before))
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.say(f"resumed from {path} (step {self.step}); {self.tokens:,} tokens seen so far")
        if before != self.tokens_per_step:
            self.say(f"note: this layout trains {self.tokens_per_step:,} tokens per step, the checkpoint's "
                     f"{before:,} ({state.get('world', '?')} ranks then, {self.env.world} now); set "
                     "train.tokens_per_step to keep the global batch")

    def save(self) -> Path:
        if self.env.distributed:  # every rank writes its shards; the last checkpoint also gets one model file
            return distributed_checkpoint.save(self.ckpt, self.step, self.model, self.optimizer, self.state(),
                                               self.meta, self.env.rank, consolidated=self.step == self.tc.max_steps,
                                               timeout_s=self.cfg.parallel.timeout_s)
        if self.env.is_main:
            return self.ckpt.save(self.step, self.model, self.optimizer, self.state(), self.meta)
        return self.ckpt.path(self.step)

    # ---- the loop --------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, dict]:
        """One optimizer step over `accum` micro-batches; returns (loss, grad norm, metrics) before the update.

        The loss and gradient norm (which the spike guard needs every step) come back to the host in
        one read; the metrics stay 0-d tensors, averaged over the micro-batches, until a logged step
        reads them (`read_metrics`): a step reads the device once however many micro-batches it has."""
        env = self.env
        total = torch.zeros((), device=env.device)
        sums: dict[str, torch.Tensor] = {}
        self.last_step_tokens = 0
        for i in range(self.accum):
            batch = to_device(self.loader.next_batch(), env.device)
            # a loader that pads each batch to its own longest row says how many positions it holds
            # (`batch_tokens`); the others hold `tokens_per_batch` every time
            self.last_step_tokens += getattr(self.loader, "batch_tokens", None) or self.tokens_per_micro
            if env.pipeline is not None:  # forward and backward of every microbatch, scheduled across stages
                with self.autocast:
                    total += env.pipeline.run(batch, 1.0 / self.accum)
                continue
            last = i == self.accum - 1
            with contextlib.nullcontext() if last else parallel.no_grad_sync(self.model):
                with self.autocast:
                    loss, metrics = self.objective.loss(self.model, batch)
                    loss = loss / self.accum
                loss.backward()
            total += loss.detach()
            _add_metrics(sums, metrics, self.accum)
        clip = self.tc.grad_clip if self.tc.grad_clip > 0 else float("inf")
        if not env.distributed:
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        else:
            parallel.sync_tied_grads(self.model, env)
            grad_norm = parallel.clip_grad_norm(self.model, clip, env)
            total = parallel.mean_loss(total, env)
        loss, norm = torch.stack([total.float(), grad_norm.float().to(total.device)]).tolist()  # one read
        return loss, norm, sums

    @staticmethod
    def read_metrics(sums: dict) -> dict[str, float]:
        """A step's metrics (`train_step`'s tensors) as floats, in one read per device they sit on."""
        out: dict[str, float] = {k: float(v) for k, v in sums.items() if not isinstance(v, torch.Tensor)}
        devices = {v.device for v in sums.values() if isinstance(v, torch.Tensor)}
        for device in devices:
            keys = [k for k, v in sums.items() if isinstance(v, torch.Tensor) and v.device == device]
            values = torch.stack([sums[k].reshape(()).to(_wide(device)) for k in keys]).tolist()
            out.update(zip(keys, values))
        return {k: out[k] for k in sums}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The objective's validation metrics over `eval_batches`, summed over data-parallel ranks."""
        env, model = self.env, self.model
        model.eval()
        totals: dict[str, list[float]] = {}
        try:
            for batch in self.eval_batches or []:
                batch = to_device(batch, env.device)
                with self.autocast:
                    if env.pipeline is not None:
                        parts = env.pipeline.eval_step(batch)
                    else:
                        parts = self.objective.eval_step(model, batch)
                for k, (s, n) in parts.items():
                    acc = totals.setdefault(k, [0.0, 0.0])
                    acc[0] += s
                    acc[1] += n
            if env.distributed:  # TP copies and pipeline stages without the loss sum and count alike
                every = [None] * env.world  # a rank may have had no batch: agree on the names first
                torch.distributed.all_gather_object(every, sorted(totals))
                keys = sorted(set().union(*every))
                flat = torch.tensor([totals.get(k, [0.0, 0.0])[j] for k in keys for j in (0, 1)], dtype=torch.float64)
                if env.device.type != "cpu":
                    flat = flat.to(env.device)
                torch.distributed.all_reduce(flat)
                totals = {k: [float(flat[2 * i]), float(flat[2 * i + 1])] for i, k in enumerate(keys)}
        finally:
            model.train()
        return self.objective.eval_finish({k: (s, n) for k, (s, n) in totals.items()})

    def _progress_bar(self):
        interactive = self.tc.progress and self.env.is_main and sys.stdout.isatty()
        if not interactive:
            return None
        return tqdm(total=self.tc.max_steps, initial=self.step, desc=self.name, unit="step", leave=True,
                    dynamic_ncols=True)

    def _log_line(self, r: dict, peak: float, t_left: float | None) -> str:
        """The step's line; a window of warm-up steps only (`warmup`) has no rate, and before any
        steady step the ETA has none either: the line says so instead of printing compile time as speed."""
        parts = [f"step {r['step']}/{self.tc.max_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
        if r.get("warmup"):
            parts.append("warm-up: not timed")
        else:
            parts += [f"{r['tokens_per_s']:,.0f} tok/s", _mfu_text(r['mfu'])]
        if r.get("memory_gb"):
            parts.append(f"mem {r['memory_gb']:.2f} GB")
        parts += [f"grad norm {r['grad_norm']:.3g}",
                  "ETA after warm-up" if t_left is None else f"ETA {format_duration(t_left)}"]
        return " | ".join(parts)

    def fit(self) -> dict:
        """Train to `train.max_steps`: the loop, evaluations, log lines, checkpoints, the report."""
        try:
            return self._fit()
        except KeyboardInterrupt as e:
            e.kiln_step = self.step  # the last step completed: the CLI says what a rerun redoes
            raise

    def _fit(self) -> dict:
        tc, env = self.tc, self.env
        if env.device.type == "cuda":  # the peak memory figures count this fit, not an earlier stage in the process
            torch.cuda.reset_peak_memory_stats(env.device)
        log = MetricsLog(self.run_dir, self.step, tensorboard=tc.tensorboard, enabled=env.is_main)
        # the datasheet peak of the precision the matmuls run in: bf16, or TF32 for fp32 on CUDA
        peak, peak_note = peak_flops(env.device, self.matmul_shapes, precision="bf16" if self._use_bf16() else "fp32")
        retimes = 0  # of the CPU peak, when a step's MFU reads above 100%
        if env.is_main:
            self.say(f"MFU is measured against {peak / 1e9:,.0f} GFLOP/s per device ({peak_note})")
        check = PlanCheck(self, peak)  # the planner's figures for this run, compared with its own when it ends
        if env.is_main:
            self.say(check.describe())
        if tc.warmup_steps >= tc.max_steps:
            self.say(f"warning: train.warmup_steps={tc.warmup_steps} ≥ train.max_steps={tc.max_steps}: the whole run "
                     "stays in warmup and the learning rate never decays; lower train.warmup_steps")
        bar = self._progress_bar()
        t_window, tokens_window, steps_window = time.perf_counter(), 0, 0
        # Warm-up steps (the first of this fit, a fresh run's or a resume's, and any step during which
        # torch.compile compiled) are left out of tok/s, MFU and the ETA: compile time is not speed.
        warm_steps, warm_s = 0, 0.0
        t_run = time.perf_counter()
        elapsed0 = self.elapsed
        start_step = self.step
        last: dict = {}
        if self.eval_batches and self.step == 0:  # the starting point of the validation curve
            ev = self.evaluate()
            log.log({"step": 0, **ev})
            last.update(ev)
            self.say("step 0 validation: " + _fmt(ev))
        self.model.train()
        checkpoint = None
        while self.step < tc.max_steps:
            lr = lr_at(self.step, tc)
            set_lr(self.optimizer, lr)
            t_step, compiled = time.perf_counter(), _frames_compiled()
            probe = check.step_memory() if self.step == start_step else None  # the first step's memory
            if probe is not None:
                loss, grad_norm, extra = probe.train_step(self.train_step)
            else:
                loss, grad_norm, extra = self.train_step()
            reason = self.guard.bad(loss, grad_norm)
            if reason is None and probe is not None:
                probe.optimizer_step()
            elif reason is None:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.record(loss, reason, self.step + 1)
            self.step += 1
            step_tokens = self.last_step_tokens * env.dp_world  # every rank's micro-batches alike (rank 0's count)
            self.tokens += step_tokens
            if reason is not None:
                self.say(f"step {self.step} skipped: {reason}")
            record = None
            now = time.perf_counter()
            self.elapsed = elapsed0 + (now - t_run)
            if self.step == start_step + 1 or _frames_compiled() != compiled:  # warm-up: not timed
                warm_steps += 1
                warm_s += now - t_step
                t_window += now - t_step
                check.warm(step_tokens, now - t_step)
            else:
                tokens_window += step_tokens
                steps_window += 1
            if self.step % tc.log_every == 0 or self.step == tc.max_steps or reason is not None:
                tps = tokens_window / (now - t_window) if steps_window else None
                mfu = tps * self.flops_per_token / peak / env.world if steps_window else None
                if mfu is not None and mfu > 1 and env.device.type != "cuda" and env.is_main \
                        and retimes < _MAX_PEAK_RETIMES:
                    # An MFU above 100% cannot be true: the matmul peak was timed while the host was busy.
                    # Time it again (the higher of that and the best known is kept) and recompute this step.
                    retimes += 1
                    low = peak
                    peak, peak_note = retime_peak(env.device, self.matmul_shapes)
                    mfu = tps * self.flops_per_token / peak / env.world
                    self.say(f"step {self.step}: MFU read above 100%, so the peak ({low / 1e9:,.0f} GFLOP/s) was "
                             f"timed low; MFU is now measured against {peak / 1e9:,.0f} GFLOP/s per device ({peak_note})")
                record = {
                    **self.read_metrics(extra),  # the objective's own metrics; the loop's names below win a clash
                    "step": self.step, "loss": loss, "lr": lr,
                    **({"tokens_per_s": tps, "mfu": mfu} if steps_window else {"warmup": True}),
                    "peak_flops": peak, "grad_norm": grad_norm,
                    "elapsed_s": self.elapsed, "tokens": self.tokens, "skipped_steps": self.guard.skipped,
                }
                if mfu is not None and mfu > 1:  # still above 100%: a measurement error, kept but marked
                    record["mfu_unreliable"] = True
                mem = _memory_gb(env.device)
                if mem:
                    record["memory_gb"] = mem
                if steps_window:
                    check.timed(tokens_window, now - t_window, steps_window)
                t_window, tokens_window, steps_window = time.perf_counter(), 0, 0
                steady = self.step - start_step - warm_steps
                t_left = (now - t_run - warm_s) / steady * (tc.max_steps - self.step) if steady else None
                if bar is None:
                    self.say(self._log_line(record, peak, t_left))
            if self.eval_batches and (self.step % tc.eval_every == 0 or self.step == tc.max_steps):
                t0 = time.perf_counter()
                ev = self.evaluate()
                record = {**(record or {"step": self.step}), **ev}
                self.say(f"step {self.step} validation: " + _fmt(ev))
                t_window += time.perf_counter() - t0
            if record:
                log.log(record)
                last.update(record)
                if bar is not None:
                    bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "val_bpb", "tokens_per_s") if k in record})
            if self.step % tc.ckpt_every == 0 or self.step == tc.max_steps:
                t0 = time.perf_counter()
                checkpoint = self.save()
                t_window += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        log.close()
        if self.step > start_step:  # collective; a fit with nothing left to do keeps the last comparison
            check.finish(peak)
        if env.is_main:
            report = push_training_section(self.run_dir)
            where = f"checkpoint {checkpoint}, " if checkpoint else ""
            summary = _fmt({k: v for k, v in last.items() if k.startswith("val_")})
            self.say(f"done: {self.step} steps, {self.tokens:,} tokens in {format_duration(self.elapsed)}"
                     + (f"; {summary}" if summary else "")
                     + f"; {where}metrics {self.run_dir / 'metrics.jsonl'}, report {report}")
        return last


_MAX_PEAK_RETIMES = 3  # per run: re-timing costs about a second per matmul shape


def _frames_compiled() -> int:
    """How many frames torch.compile has compiled in this process so far (0 before dynamo is loaded)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def _mfu_text(mfu: float) -> str:
    """The log line's MFU: a figure up to 100%; above that, marked as the measurement error it is."""
    if mfu > 1:
        return f"MFU unreliable (reads {100 * mfu:.0f}% > 100%: a measurement error, not a result)"
    return f"MFU {100 * mfu:.1f}%"


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))


def rng_state(device: torch.device) -> dict:
    """This process's RNG states: the CPU generator's and, on a GPU, that device's own (`rng_device`)."""
    s = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        s["rng_device"] = torch.cuda.get_rng_state(device)
    return s


def restore_rng(state: dict, env: parallel.ParallelEnv) -> None:
    """Put back the RNG states `state` saved for this rank: its own entry of `rng_ranks` when the
    checkpoint was saved by as many ranks, else the saving rank 0's (a new layout resumes exactly
    only where it draws nothing random per rank). A checkpoint from before per-device states holds
    `rng_cuda`, one state per GPU its process saw: this device's entry is taken if there is one."""
    ranks = state.get("rng_ranks")
    mine = ranks[env.rank] if ranks and len(ranks) == env.world else state
    torch.set_rng_state(mine["rng_cpu"])
    device = env.device
    if device.type != "cuda":
        return
    saved = mine.get("rng_device")
    if saved is None and isinstance(state.get("rng_cuda"), (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        saved = state["rng_cuda"][index] if index < len(state["rng_cuda"]) else None
    if saved is not None:
        torch.cuda.set_rng_state(saved, device)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux: peak resident set
    except (ImportError, AttributeError):
        return 0.0
