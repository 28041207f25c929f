"""`kiln distill`: a smaller student (`model.*`) learns from a frozen teacher run on the same
token shards, on the shared Trainer.

loss = α · cross-entropy(student, data) + (1 − α) · T² · D(teacher ‖ student), D being forward KL,
reverse KL or the generalized Jensen–Shannon divergence between the two next-token
distributions softened by the temperature T, over every labelled position.

The teacher's logits come from the teacher itself each step (`distill.teacher_logits=online`), or
from an on-disk cache of its top-k log-probabilities per training window (`cached`): a window is
scored by the teacher the first time any run sees it and read back afterwards (later epochs,
resumed runs, other students of the same teacher on the same data). With `distill.on_policy > 0`,
that share of batches is written by the student itself (sampled from each window's first
`prompt_len` tokens) and only the divergence on the sampled tokens is learned: the teacher scores
what the student actually produces.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import Config
from kiln.data.layout import data_dir
from kiln.data.shards import TokenLoader, open_data, tokens_per_byte
from kiln.errors import KilnError
from kiln.hardware import tune_cpu_allocator
from kiln.infer.engine import SamplingParams
from kiln.infer.generate import generate
from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer
from kiln.model.weights import load_model_tensors
from kiln.report import write_section
from kiln.runs import atomic_write_text, fingerprint, sha256_file
from kiln.train import parallel
from kiln.train.checkpoint import CheckpointManager
from kiln.train.objectives import Batch, LanguageModeling, bits_per_byte, model_inputs, token_cross_entropy
from kiln.train.restore import checkpoint_tensors, find_checkpoint
from kiln.train.trainer import Trainer
from kiln.workloads.common import (
    build_trained,
    check_shards_match_tokenizer,
    ensure_data,
    matmul_shapes,
    model_config_for,
    prepare_run_dir,
    resolve_resume,
    validation_batches,
)

WORKLOAD = "distill"


# ---- the objective -------------------------------------------------------------------------------
def token_divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float = 1.0,
                     beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence (…, V) × (…, V) → (…) between the teacher's and the student's
    next-token distributions at `temperature`: forward KL(p_t ‖ p_s) (mass-covering), reverse
    KL(p_s ‖ p_t) (mode-seeking) or the generalized JSD, β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m) with
    m = β·p_t + (1−β)·p_s."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "forward_kl":
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse_kl":
        return (s.exp() * (s - t)).sum(-1)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    raise KilnError(f"distill.divergence={kind!r} is not forward_kl, reverse_kl or jsd")


def topk_forward_kl(student: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL from a teacher known only by its top-k tokens (`ids`, `logp`: (…, k)): the teacher
    renormalized over them, the student's full-vocabulary log-probabilities read at them."""
    s = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, ids)
    t = F.log_softmax(logp.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


class Distillation(LanguageModeling):
    """α · cross-entropy + (1 − α) · T² · divergence from the frozen teacher (see the module docstring).

    Validation reports the student's loss and bits per byte (as pretraining), the teacher's
    (`val_teacher_bpb`) and `val_kd`, the divergence from the teacher, on the same windows."""

    name = "distillation"

    def __init__(self, teacher: nn.Module, student_cfg: ModelConfig, n_vocab: int, alpha: float = 0.5,
                 divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                 tokens_per_byte: float | None = None, cache: TeacherCache | None = None,
                 on_policy: float = 0.0, prompt_len: int = 16) -> None:
        super().__init__(tokens_per_byte, n_vocab)
        self.frozen["teacher"] = teacher
        self.student_cfg, self.n_vocab = student_cfg, n_vocab
        self.alpha, self.divergence, self.temperature, self.beta = alpha, divergence, temperature, beta
        self.cache, self.on_policy, self.prompt_len = cache, on_policy, prompt_len

    @property
    def teacher(self) -> nn.Module:
        return self.frozen["teacher"]

    @torch.no_grad()
    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        return self.teacher(batch["input_ids"], **model_inputs(batch))

    def per_token_kd(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        student = logits[..., : self.n_vocab]
        if self.cache is not None and "window_ids" in batch:
            ids, logp = self.cache.lookup(batch, lambda b: self.teacher_logits(b)[..., : self.n_vocab])
            return topk_forward_kl(student, ids.to(student.device), logp.to(student.device), self.temperature)
        teacher = self.teacher_logits(batch)[..., : self.n_vocab]
        return token_divergence(student, teacher, self.divergence, self.temperature, self.beta)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        on_policy = self.on_policy > 0 and float(torch.rand(())) < self.on_policy
        if on_policy:
            batch = self.student_batch(model, batch)
        logits = model(batch["input_ids"], **model_inputs(batch))
        mask = batch["labels"] != -100
        kd_tok = self.per_token_kd(logits, batch)
        kd = (kd_tok * mask).sum() / mask.sum().clamp(min=1) * self.temperature ** 2
        if on_policy:  # the student's own tokens: nothing to imitate but the teacher's judgement of them
            return (1 - self.alpha) * kd, {"kd": kd.detach(), "on_policy": 1.0}
        ce_sum, n = token_cross_entropy(logits, batch["labels"], self.n_vocab)
        ce = ce_sum / n.clamp(min=1)
        return self.alpha * ce + (1 - self.alpha) * kd, {"ce": ce.detach(), "kd": kd.detach(), "on_policy": 0.0}

    @torch.no_grad()
    def student_batch(self, model: nn.Module, batch: Batch) -> Batch:
        """The student continues each window's first `prompt_len` tokens to the window's length
        (sampling at temperature 1, `kiln.infer.generate`); labels cover the sampled tokens only."""
        ids = batch["input_ids"]
        b, t = ids.shape
        p = min(self.prompt_len, t - 1)
        seed = int(torch.randint(0, 2**62, ()))  # from torch's seeded generator: a resumed run samples the same
        params = [SamplingParams(t + 1 - p, temperature=1.0, seed=f"{seed}/{i}") for i in range(b)]
        prompts = ids[:, :p].tolist()
        seqs = generate(model, prompts, params, stop_ids=set(), vocab=self.n_vocab, inference=False, ranks_in_step=True)
        out = [ids[:, :p], torch.tensor([s.tokens for s in seqs], dtype=ids.dtype, device=ids.device)]
        seq = torch.cat(out, dim=1)
        labels = seq[:, 1:].clone()
        labels[:, : p - 1] = -100
        return {"input_ids": seq[:, :-1], "labels": labels}

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, tuple[float, float]]:
        logits = model(batch["input_ids"], **model_inputs(batch))
        teacher = self.teacher_logits(batch)
        total, n = token_cross_entropy(logits, batch["labels"], self.n_vocab)
        teacher_total, _ = token_cross_entropy(teacher, batch["labels"], self.n_vocab)
        mask = batch["labels"] != -100
        kd = token_divergence(logits[..., : self.n_vocab], teacher[..., : self.n_vocab], self.divergence,
                              self.temperature, self.beta)
        return {"val_loss": (float(total), float(n)), "val_teacher_loss": (float(teacher_total), float(n)),
                "val_kd": (float((kd * mask).sum()), float(mask.sum()))}

    def eval_finish(self, totals: dict[str, tuple[float, float]]) -> dict[str, float]:
        out = super().eval_finish(totals)
        if self.tokens_per_byte and "val_teacher_loss" in out:
            out["val_teacher_bpb"] = bits_per_byte(out["val_teacher_loss"], self.tokens_per_byte)
        return out

    pipeline_loss = None  # needs the teacher beside the student


# ---- the teacher's top-k on disk -------------------------------------------------------------------
class WindowLoader(TokenLoader):
    """A `TokenLoader` whose batches also carry the index of each window (`window_ids`): the
    teacher cache's keys."""

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = super().next_batch()
        start = self.pos - self.batch_size * self.world + self.rank * self.batch_size
        batch["window_ids"] = torch.from_numpy(self._perm[start : start + self.batch_size].astype(np.int64))
        return batch


class TeacherCache:
    """The teacher's top-k token ids and log-probabilities for every position of every training
    window, memoized on disk (sparse `.npy` memory maps; a window's row is written, then marked
    filled). `key` names what the rows depend on (teacher weights, data, window length, k): a
    cache made for anything else is started afresh. In a multi-process run the main rank creates
    the files; ranks fill disjoint rows."""

    def __init__(self, directory: Path, n_windows: int, seq_len: int, top_k: int, key: dict,
                 is_main: bool = True, barrier=None) -> None:
        self.dir, self.top_k = Path(directory), top_k
        meta = {**key, "n_windows": n_windows, "seq_len": seq_len, "top_k": top_k, "version": 1}
        shape = (n_windows, seq_len, top_k)
        files = {"ids": np.int32, "logp": np.float16}
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                same = json.loads((self.dir / "meta.json").read_text()) == meta
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:
                for name in [*files, "filled"]:
                    (self.dir / f"{name}.npy").unlink(missing_ok=True)
                for name, dtype in files.items():
                    np.lib.format.open_memmap(self.dir / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
                np.lib.format.open_memmap(self.dir / "filled.npy", mode="w+", dtype=np.uint8, shape=(n_windows,)).flush()
                atomic_write_text(self.dir / "meta.json", json.dumps(meta, sort_keys=True))
        if barrier is not None:
            barrier()
        self.ids = np.load(self.dir / "ids.npy", mmap_mode="r+")
        self.logp = np.load(self.dir / "logp.npy", mmap_mode="r+")
        self.filled = np.load(self.dir / "filled.npy", mmap_mode="r+")
        self.hits = self.misses = 0

    def lookup(self, batch: Batch, teacher_logits) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, log-probabilities), (B, T, k) each, for the batch's windows; the teacher scores
        (`teacher_logits(sub_batch)`) only the windows not yet cached, and they are written."""
        w = batch["window_ids"].cpu().numpy()
        missing = np.flatnonzero(self.filled[w] == 0)
        if len(missing):
            rows = torch.from_numpy(missing).to(batch["input_ids"].device)
            sub = {k: v[rows] for k, v in batch.items() if k != "window_ids" and v.dim() > 0}
            logp = F.log_softmax(teacher_logits(sub).float(), dim=-1)
            top = logp.topk(self.top_k, dim=-1)
            self.ids[w[missing]] = top.indices.cpu().numpy().astype(np.int32)
            self.logp[w[missing]] = top.values.cpu().numpy().astype(np.float16)
            self.ids.flush()
            self.logp.flush()
            self.filled[w[missing]] = 1
            self.filled.flush()
        self.misses += len(missing)
        self.hits += len(w) - len(missing)
        return torch.from_numpy(self.ids[w].astype(np.int64)), torch.from_numpy(self.logp[w].astype(np.float32))


# ---- the workload ----------------------------------------------------------------------------------
def load_teacher(cfg: Config, man: dict, student_cfg: ModelConfig) -> tuple[Path, dict, ModelConfig]:
    """The teacher's checkpoint, its record and model, checked against the data and the student:
    one tokenizer for all three, a causal float model that sees the student's windows."""
    spec = cfg.distill.teacher
    if not spec:
        raise KilnError("distill.teacher is empty; name the trained run to learn from, e.g. distill.teacher=runs/quickstart")
    path = find_checkpoint(spec, key="distill.teacher")
    info = CheckpointManager.info(path)
    if info.get("quantization"):
        raise KilnError(f"distill.teacher={spec} is a quantized checkpoint; name the float run it was quantized from "
                        f"({info.get('quantized_from', 'see its checkpoint.json')})")
    if "model" not in info:
        raise KilnError(f"distill.teacher={spec}: {path}/checkpoint.json records no model; name a kiln training run")
    want = man["tokenizer_sha256"]
    tfile = path.parent.parent / "tokenizer" / "tokenizer.json"
    have = info.get("tokenizer_sha256") or (sha256_file(tfile) if tfile.is_file() else None)
    if have != want:
        raise KilnError(f"distill.teacher={spec} was trained with a different tokenizer than the data the student learns "
                        "from; teacher and student must share one: prepare the data with the teacher's tokenizer "
                        f"(data.tokenizer.path={tfile})")
    tmc = ModelConfig.from_dict(info["model"])
    if not tmc.causal:
        raise KilnError(f"distill.teacher={spec} is a bidirectional (causal=false) model; distillation needs a language model")
    if tmc.vocab_size != student_cfg.vocab_size:
        raise KilnError(f"distill.teacher={spec} has {tmc.vocab_size} vocabulary rows, the student {student_cfg.vocab_size}; "
                        "they must share a tokenizer (leave model.vocab_size unset)")
    if cfg.train.seq_len > tmc.max_seq_len:
        raise KilnError(f"train.seq_len={cfg.train.seq_len} exceeds the teacher's context of {tmc.max_seq_len}; "
                        f"lower train.seq_len to at most {tmc.max_seq_len}")
    return path, info, tmc


def run_distill(cfg: Config) -> dict:
    dc = cfg.distill
    ddir = data_dir(cfg)
    ensure_data(cfg, ddir, WORKLOAD)
    env = parallel.init_env(cfg)
    if env.device.type == "cpu":
        tune_cpu_allocator()
    man = open_data(ddir)
    tpath = check_shards_match_tokenizer(ddir, man)
    source = find_checkpoint(cfg.init_from) if cfg.init_from else None
    base = ModelConfig.from_dict(CheckpointManager.info(source)["model"]) if source else None
    model_cfg = model_config_for(cfg, man["vocab_size"], base)
    teacher_path, teacher_info, teacher_cfg = load_teacher(cfg, man, model_cfg)
    if dc.teacher_logits == "cached" and dc.divergence != "forward_kl":
        raise KilnError(f"distill.divergence={dc.divergence} needs the teacher's whole distribution; the top-k cache "
                        "serves forward_kl only: use distill.teacher_logits=online or divergence=forward_kl")
    if dc.on_policy > 0 and dc.prompt_len >= cfg.train.seq_len:
        raise KilnError(f"distill.prompt_len={dc.prompt_len} leaves nothing to sample in windows of "
                        f"train.seq_len={cfg.train.seq_len}; lower it")
    ckpt = CheckpointManager(Path(cfg.out), cfg.train.keep_last)
    start = resolve_resume(cfg, ckpt, model_cfg, WORKLOAD)

    notes = []

    def init_teacher(model: Transformer) -> None:
        model.init_weights(cfg.train.seed)
        load_model_tensors(model, checkpoint_tensors(teacher_path), str(teacher_path))

    model = build_trained(lambda: Transformer(model_cfg), cfg, env, source, start, WORKLOAD, notes)
    teacher = parallel.build_model(lambda: Transformer(teacher_cfg), cfg, env, init_teacher, frozen=True)
    loader_cls = WindowLoader if dc.teacher_logits == "cached" else TokenLoader
    loader = loader_cls(ddir, "train", cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed,
                        rank=env.dp_rank, world=env.dp_world, document_mask=cfg.train.document_mask)
    cache = None
    if dc.teacher_logits == "cached":
        key = {"teacher": str(teacher_path.resolve()), "teacher_sha256": teacher_info["files"]["model.safetensors"]["sha256"]
               if "model.safetensors" in teacher_info.get("files", {}) else fingerprint(teacher_info.get("files")),
               "data": fingerprint(man["splits"]["train"]), "document_mask": cfg.train.document_mask}
        barrier = torch.distributed.barrier if env.distributed else None
        cache = TeacherCache(Path(dc.cache_dir or Path(cfg.out) / "teacher_cache"), loader.n_windows,
                             cfg.train.seq_len, dc.top_k, key, env.is_main, barrier)
    n_vocab = min(man["vocab_size"], model_cfg.vocab_size)
    objective = Distillation(teacher, model_cfg, n_vocab, dc.alpha, dc.divergence, dc.temperature, dc.jsd_beta,
                             tokens_per_byte=tokens_per_byte(man), cache=cache,
                             on_policy=dc.on_policy, prompt_len=dc.prompt_len)
    evals, windows = validation_batches(ddir, cfg, env, WORKLOAD)
    teacher_flops = teacher_cfg.forward_flops_per_token(cfg.train.seq_len) if dc.teacher_logits == "online" else 0.0
    prepare_run_dir(cfg, env, tpath, WORKLOAD)  # inputs checked: now the run directory
    trainer = Trainer(
        cfg, model, env, loader, objective, eval_batches=evals,
        flops_per_token=model_cfg.flops_per_token(cfg.train.seq_len) + teacher_flops,
        meta={"model": model_cfg.to_dict(), "data": str(ddir), "tokenizer_sha256": man["tokenizer_sha256"],
              "teacher": str(teacher_path), "distill": asdict(dc), **windows, **({"init_from": str(source)} if source else {})},
        name=WORKLOAD,
        matmul_shapes=matmul_shapes(model_cfg, cfg.train.batch_size * cfg.train.seq_len),
    )
    for note in notes:
        trainer.say(f"init_from: {note}")
    if start is not None:
        trainer.resume_from(start)
    ratio = model_cfg.num_params() / teacher_cfg.num_params()
    trainer.say(f"student {model_cfg.num_params() / 1e6:.2f}M params ({ratio:.2f}× the teacher's "
                f"{teacher_cfg.num_params() / 1e6:.2f}M, {teacher_path}); "
                f"loss = {dc.alpha:g}·CE + {1 - dc.alpha:g}·T²·{dc.divergence} (T={dc.temperature:g}), teacher logits "
                f"{dc.teacher_logits}" + (f", {dc.on_policy:.0%} of batches on-policy" if dc.on_policy else ""))
    with parallel.peer_failures_as_errors(env, cfg.parallel.timeout_s):
        last = trainer.fit()
    if env.is_main:
        _write_report(Path(cfg.out), model_cfg, teacher_cfg, teacher_path, last, cache)
    return {**last, "student_params": model_cfg.num_params(), "teacher_params": teacher_cfg.num_params()}


def _write_report(out: Path, student: ModelConfig, teacher: ModelConfig, teacher_path: Path, last: dict,
                  cache: TeacherCache | None) -> None:
    lines = ["## Distillation", "",
             f"- teacher `{teacher_path}`: {teacher.num_params():,} parameters, validation "
             f"{last.get('val_teacher_bpb', float('nan')):.4f} bits/byte",
             f"- student: {student.num_params():,} parameters ({student.num_params() / teacher.num_params():.2f}× the "
             f"teacher's), validation {last.get('val_bpb', float('nan')):.4f} bits/byte, "
             f"divergence from the teacher {last.get('val_kd', float('nan')):.4f} nats/token"]
    if cache is not None:
        lines.append(f"- teacher top-{cache.top_k} cache `{cache.dir}`: {cache.hits:,} windows read, "
                     f"{cache.misses:,} scored by the teacher in this session")
    write_section(out, "distill", lines)


def distill_into(cfg: Config, teacher: str, out: str, preset: str = "tiny", **model) -> dict:
    """For `kiln speedrun`: distill the run `teacher` into a new run `out` whose student is `preset`
    plus `model` shape overrides (e.g. `d_model=128, n_heads=4, n_kv_heads=2`: about a fifth of the
    quickstart model), trained on the teacher's data with `cfg.train` and `cfg.distill`."""
    import dataclasses

    from kiln.config import ModelSection

    data = dataclasses.replace(cfg.data, path=cfg.data.path or str(Path(teacher) / "data"))
    return run_distill(dataclasses.replace(cfg, out=out, data=data, model=ModelSection(preset=preset, **model),
                                           init_from="", resume="auto",
                                           distill=dataclasses.replace(cfg.distill, teacher=teacher)))
