"""The training loop: forward → loss → backward → clip → step, for any objective; and `kiln pretrain`."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kiln.config import Config, dump_yaml
from kiln.data.pipeline import data_dir, tokenizer_path
from kiln.data.shards import TokenLoader, eval_batches, open_data
from kiln.data.tokenizer import load_tokenizer
from kiln.errors import KilnError
from kiln.hardware import tune_cpu_allocator
from kiln.model.transformer import ModelConfig, Transformer, preset
from kiln.runs import atomic_write_text, sha256_file
from kiln.train import distributed_checkpoint, parallel
from kiln.train.checkpoint import CheckpointManager
from kiln.train.metrics import MetricsLog, peak_flops
from kiln.train.objectives import next_token_loss
from kiln.train.optim import build_optimizer, lr_at, set_lr


@dataclass
class SpikeGuard:
    """Skips a step whose loss or gradient norm is not finite, or whose loss jumps far above the recent mean."""

    factor: float
    window: int
    max_in_row: int
    recent: deque = field(default_factory=deque)
    in_row: int = 0
    skipped: int = 0

    def bad(self, loss: float, grad_norm: float) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "non-finite loss or gradient"
        if len(self.recent) >= min(10, self.window) and loss > self.factor * (sum(self.recent) / len(self.recent)):
            return f"loss {loss:.3f} spiked above {self.factor}× the recent mean"
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


class Trainer:
    """Runs `objective` over batches from `loader`, with accumulation, guard, eval, logs and checkpoints."""

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        env: parallel.ParallelEnv,
        loader,
        objective: Callable = next_token_loss,
        evaluate: Callable[[nn.Module], dict] | None = None,
        tokens_per_micro_batch: int = 0,
        flops_per_token: float = 0.0,
        meta: dict | None = None,
    ) -> None:
        self.cfg, self.tc, self.model, self.env = cfg, cfg.train, model, env
        self.loader, self.objective, self.evaluate = loader, objective, evaluate
        self.optimizer = build_optimizer(model, cfg.train)
        self.run_dir = Path(cfg.out)
        self.ckpt = CheckpointManager(self.run_dir, cfg.train.keep_last)
        self.meta = meta or {}
        self.tokens_per_micro = tokens_per_micro_batch
        self.flops_per_token = flops_per_token
        self.guard = SpikeGuard(self.tc.spike_factor, self.tc.spike_window, self.tc.max_bad_steps)
        self.step = 0
        self.accum = self._accumulation_steps()
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
        if self.tc.tokens_per_step % per_step:
            raise KilnError(
                f"train.tokens_per_step={self.tc.tokens_per_step} is not a multiple of one micro-batch across ranks "
                f"({per_step} = batch_size × seq_len × data-parallel ranks); pick a multiple of {per_step}"
            )
        return self.tc.tokens_per_step // per_step

    # ---- state -----------------------------------------------------------------------------
    def state(self) -> dict:
        s = {"step": self.step, "rng_cpu": torch.get_rng_state(), "loader": self.loader.state_dict(),
             "guard": self.guard.state_dict()}
        if torch.cuda.is_available():
            s["rng_cuda"] = torch.cuda.get_rng_state_all()
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
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(state["guard"])

    def save(self) -> None:
        if self.env.distributed:  # every rank writes its shards; the last checkpoint also gets one model file
            distributed_checkpoint.save(self.ckpt, self.step, self.model, self.optimizer, self.state(), self.meta,
                                        self.env.rank, consolidated=self.step == self.tc.max_steps)
        elif self.env.is_main:
            self.ckpt.save(self.step, self.model, self.optimizer, self.state(), self.meta)

    # ---- the loop --------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `accum` micro-batches; returns (loss, grad norm) before the update."""
        env = self.env
        total = torch.zeros((), device=env.device)
        for i in range(self.accum):
            inputs, targets = (t.to(env.device, non_blocking=True) for t in self.loader.next_batch())
            if env.pipeline is not None:  # forward and backward of every microbatch, scheduled across stages
                with self.autocast:
                    total += env.pipeline.run(inputs, targets, 1.0 / self.accum)
                continue
            last = i == self.accum - 1
            with contextlib.nullcontext() if last else parallel.no_grad_sync(self.model):
                with self.autocast:
                    loss = self.objective(self.model, (inputs, targets)) / self.accum
                loss.backward()
            total += loss.detach()
        clip = self.tc.grad_clip if self.tc.grad_clip > 0 else float("inf")
        if not env.distributed:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            return float(total), float(grad_norm)
        parallel.sync_tied_grads(self.model, env)
        grad_norm = parallel.clip_grad_norm(self.model, clip, env)
        return float(parallel.mean_loss(total, env)), float(grad_norm)

    def fit(self) -> dict:
        tc = self.tc
        log = MetricsLog(self.run_dir, self.step, tensorboard=tc.tensorboard, enabled=self.env.is_main)
        peak = peak_flops(self.env.device)
        tokens_per_step = self.tokens_per_micro * self.accum * self.env.dp_world
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="pretrain", unit="step",
                   disable=not (tc.progress and self.env.is_main) or None)
        t_start = time.perf_counter()
        t_window, steps_window = time.perf_counter(), 0
        last: dict = {}
        if self.evaluate and self.step == 0:  # the starting point of the validation curve
            log.log({"step": 0, **self.evaluate(self.model)})
        self.model.train()
        while self.step < tc.max_steps:
            lr = lr_at(self.step, tc)
            set_lr(self.optimizer, lr)
            loss, grad_norm = self.train_step()
            reason = self.guard.bad(loss, grad_norm)
            if reason is None:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.record(loss, reason, self.step + 1)
            self.step += 1
            steps_window += 1
            if reason is not None and self.env.is_main:
                tqdm.write(f"pretrain: step {self.step} skipped: {reason}")
            record = None
            if self.step % tc.log_every == 0 or self.step == tc.max_steps or reason is not None:
                dt = time.perf_counter() - t_window
                tps = tokens_per_step * steps_window / dt
                record = {
                    "step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tps,
                    "mfu": tps * self.flops_per_token / peak / self.env.world, "grad_norm": grad_norm,
                    "elapsed_s": time.perf_counter() - t_start, "tokens": self.step * tokens_per_step,
                    "skipped_steps": self.guard.skipped,
                }
                t_window, steps_window = time.perf_counter(), 0
            if self.evaluate and (self.step % tc.eval_every == 0 or self.step == tc.max_steps):
                t0 = time.perf_counter()
                ev = self.evaluate(self.model)
                self.model.train()
                record = {**(record or {"step": self.step}), **ev}
                t_window += time.perf_counter() - t0
            if record:
                log.log(record)
                last.update(record)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "val_bpb", "tokens_per_s") if k in record})
            if self.step % tc.ckpt_every == 0 or self.step == tc.max_steps:
                t0 = time.perf_counter()
                self.save()
                t_window += time.perf_counter() - t0
            bar.update(1)
        bar.close()
        log.close()
        return last


# ---- `kiln pretrain` ---------------------------------------------------------------------------
def model_config_for(cfg: Config, vocab_size: int) -> ModelConfig:
    over = cfg.model.overrides()
    padded = 64 * math.ceil(vocab_size / 64)  # matmul-friendly; the extra rows are never targets
    over.setdefault("max_seq_len", None)
    if over["max_seq_len"] is None:
        base = preset(cfg.model.preset, vocab_size=padded)
        over["max_seq_len"] = max(base.max_seq_len, cfg.train.seq_len)
    mc = preset(cfg.model.preset, vocab_size=padded, **over)
    if cfg.train.seq_len > mc.max_seq_len:
        raise KilnError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={mc.max_seq_len}; raise model.max_seq_len")
    return mc


def check_shards_match_tokenizer(ddir: Path, man: dict) -> Path:
    """The tokenizer the shards were written with, checked against them; returns its path."""
    tpath = tokenizer_path(ddir, man)
    tok = load_tokenizer(tpath)
    if tok.get_vocab_size() != man["vocab_size"] or sha256_file(tpath) != man["tokenizer_sha256"]:
        raise KilnError(
            f"token shards in '{ddir}' were written with a different tokenizer (vocab {man['vocab_size']}) than "
            f"'{tpath}' (vocab {tok.get_vocab_size()}); re-run `kiln prepare` so shards and tokenizer match"
        )
    first = man["splits"]["train"]["shards"][0]
    sample = np.memmap(ddir / first["file"], dtype=man["dtype"], mode="r")[:1_000_000]
    if len(sample) and int(sample.max()) >= man["vocab_size"]:
        raise KilnError(
            f"token shard '{ddir / first['file']}' holds id {int(sample.max())} ≥ the vocab size {man['vocab_size']}; "
            "the shards do not belong to this tokenizer: re-run `kiln prepare`"
        )
    return tpath


def make_evaluator(ddir: Path, man: dict, cfg: Config, env: parallel.ParallelEnv) -> Callable[[nn.Module], dict]:
    """Validation loss and bits per byte (loss in bits × val tokens / val bytes)."""
    val = man["splits"]["val"]
    tokens_per_byte = val["tokens"] / max(val["bytes"], 1)
    batches = list(eval_batches(ddir, cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_batches))

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict:
        model.eval()
        total, n = 0.0, 0
        for x, y in batches:
            x, y = x.to(env.device), y.to(env.device)
            if env.pipeline is not None:  # the last stage has the loss; every stage reports it
                loss = env.pipeline.run(x, y, 1.0, train=False)
                torch.distributed.all_reduce(loss, group=env.pipeline.group)
            else:
                loss = next_token_loss(model, (x, y))
            total += float(loss) * y.numel()
            n += y.numel()
        val_loss = total / max(n, 1)
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) * tokens_per_byte}

    return evaluate


def resolve_resume(cfg: Config, ckpt: CheckpointManager, model_cfg: ModelConfig) -> Path | None:
    """Which checkpoint to start from, refusing a run directory that holds a different model."""
    if cfg.resume not in ("auto", "never"):
        path = Path(cfg.resume)
        if not (path / "checkpoint.json").is_file():
            raise KilnError(f"resume={cfg.resume} is not a checkpoint directory (no checkpoint.json); use resume=auto")
        problem = ckpt.verify(path)
        if problem:
            raise KilnError(f"cannot resume from {path}: {problem}")
    elif ckpt.complete():
        if cfg.resume == "never":
            raise KilnError(f"'{cfg.out}' already has checkpoints; pass resume=auto to continue them or choose a new out=")
        path = ckpt.latest_intact()
        if path is None:
            raise KilnError(f"no intact checkpoint in '{ckpt.dir}'; delete it or choose a new out=")
    else:
        return None
    saved = ModelConfig.from_dict(CheckpointManager.info(path).get("model", {}))
    if saved != model_cfg:
        diff = {k: (v, getattr(model_cfg, k)) for k, v in asdict(saved).items() if getattr(model_cfg, k) != v}
        raise KilnError(
            f"'{cfg.out}' holds a run of a different model ({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in diff.items())}); "
            "choose a new out= or use that run's model settings"
        )
    return path


def run_pretrain(cfg: Config) -> dict:
    env = parallel.init_env(cfg)
    if env.device.type == "cpu":
        tune_cpu_allocator()
    ddir = data_dir(cfg)
    man = open_data(ddir)
    tpath = check_shards_match_tokenizer(ddir, man)
    model_cfg = model_config_for(cfg, man["vocab_size"])
    out = Path(cfg.out)
    ckpt = CheckpointManager(out, cfg.train.keep_last)
    start = resolve_resume(cfg, ckpt, model_cfg)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        if not (out / "tokenizer" / "tokenizer.json").is_file():
            (out / "tokenizer").mkdir(exist_ok=True)
            shutil.copy2(tpath, out / "tokenizer" / "tokenizer.json")

    torch.manual_seed(cfg.train.seed)
    model = Transformer(model_cfg)
    model.init_weights(cfg.train.seed)
    model = parallel.parallelize(model, cfg, env)
    loader = TokenLoader(ddir, "train", cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed,
                         rank=env.dp_rank, world=env.dp_world)
    trainer = Trainer(
        cfg, model, env, loader,
        evaluate=make_evaluator(ddir, man, cfg, env),
        tokens_per_micro_batch=cfg.train.batch_size * cfg.train.seq_len,
        flops_per_token=model_cfg.flops_per_token(cfg.train.seq_len),
        meta={"model": model_cfg.to_dict(), "data": str(ddir), "tokenizer_sha256": man["tokenizer_sha256"]},
    )
    if start is not None:
        trainer.resume_from(start)
        if env.is_main:
            print(f"pretrain: resumed from {start} (step {trainer.step})")
    if env.is_main:
        print(f"pretrain: {model_cfg.num_params() / 1e6:.1f}M params, {trainer.accum} micro-batches/step, "
              f"{env.describe()}, {cfg.train.max_steps} steps")
    with parallel.peer_failures_as_errors(env, cfg.parallel.timeout_s):
        return trainer.fit()
