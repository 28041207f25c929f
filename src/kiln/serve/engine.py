"""Generation: a run's model and tokenizer, and a running batch over one preallocated KV cache in
which sequences join and leave at their own positions (continuous batching), each with its own
sampling settings, streamed as text; `kiln generate`; `measure_serving` for the speedrun's report.

The serving loop (`kiln.serve.scheduler`) and `kiln generate` share `Batch`: a sequence is
prefilled into a free row of the cache (right-padded with the others that join with it), then
every step decodes one token for each running row, and a row is freed the moment its sequence
stops (end token, stop string, `max_new_tokens`, the context's end, or a cancel).
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.config import Config, SampleConfig
from kiln.data.tokenizer import BOS, END, EOS, load_tokenizer
from kiln.errors import KilnError
from kiln.model.transformer import KVCache, ModelConfig, Transformer
from kiln.serve import decode
from kiln.train import distributed_checkpoint
from kiln.train.checkpoint import CheckpointManager
from kiln.train.parallel import pick_device
from kiln.workloads.common import check_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sample_next(logits: torch.Tensor, temperature, top_k, top_p, generator: torch.Generator | None = None,
                *, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row of (B, V) logits: greedy where the temperature is 0, else top-k and
    nucleus (top-p) sampling. The settings are numbers or per-row (B,) tensors, so rows of one
    batch sample with their own; `uniform` holds each row's draw in [0, 1) (from the row's own
    generator, so a seeded request samples the same whatever batch it runs in), else the draws
    come from `generator`."""
    b, v = logits.shape
    dev = logits.device
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=dev).expand(b)
    greedy_tokens = logits.argmax(-1)
    greedy = temperature <= 0
    if not bool((~greedy).any()):
        return greedy_tokens
    top_k = torch.as_tensor(top_k, device=dev).expand(b)
    top_p = torch.as_tensor(top_p, dtype=torch.float32, device=dev).expand(b)
    scaled = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    rank = torch.arange(v, device=dev)
    keep = rank[None, :] < torch.where(top_k > 0, top_k, v)[:, None]
    keep &= probs.cumsum(-1) - probs < top_p[:, None]  # the smallest prefix reaching top_p (the first always)
    cdf = (probs * keep).cumsum(-1)
    if uniform is None:
        uniform = torch.rand(b, generator=generator, device=generator.device if generator is not None else "cpu")
    draw = uniform.to(dev, torch.float32)[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, draw, right=True).clamp_(max=v - 1)
    return torch.where(greedy, greedy_tokens, order.gather(-1, pick).squeeze(-1))


class StreamDecoder:
    """Incremental detokenization: turns token ids into text as they come, holding back the
    bytes of a character split across tokens until it is complete (instead of printing
    replacement characters). Decodes only the tokens since the last piece, so a long
    generation costs linear, not quadratic, time."""

    def __init__(self, tokenizer) -> None:
        self.tok, self.ids = tokenizer, []
        self.start = 0  # ids[start:sent] are the tokens of the last piece: context for the next
        self.sent = 0  # ids up to here have been turned into text

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._take(final=False)

    def flush(self) -> str:
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        done = self.tok.decode(self.ids[self.start : self.sent])
        text = self.tok.decode(self.ids[self.start :])
        if (text.endswith("\ufffd") and not final) or len(text) <= len(done):
            return ""  # an unfinished multi-byte character, or a token with no text: wait for more
        self.start, self.sent = self.sent, len(self.ids)
        return text[len(done) :]


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled and where it stops."""

    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (1 = off)
    seed: int | str | None = None  # None = fresh entropy
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings


class Sequence:
    """One generation: prompt ids, sampling settings, the output as tokens and as streamed text,
    and its timings. `listener(seq, text)` is called with each new piece of text and once more,
    with what is left (maybe ""), when `finish_reason` is set: "stop" (end token or stop string),
    "length" (max_new_tokens or the context's end), "cancelled" or "error"."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer,
                 listener: Callable[[Sequence, str], None] | None = None, tag=None) -> None:
        self.prompt, self.params, self.listener, self.tag = list(prompt), params, listener, tag
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.context_ended = False  # stopped by the context's end before max_new_tokens
        self.cancelled = False
        self.rng = random.Random(params.seed)
        self._decoder = StreamDecoder(tokenizer)
        self._held = ""  # text that may be the start of a stop string
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.submitted

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.finished_at is None or self.first_token_at is None or len(self.tokens) < 2:
            return None
        return (len(self.tokens) - 1) / max(self.finished_at - self.first_token_at, 1e-9)

    def _emit(self, text: str) -> None:
        self.text += text
        if text and self.listener:
            self.listener(self, text)

    def push(self, token: int) -> None:
        """Take one generated token; a stop string it completes finishes the sequence."""
        self.tokens.append(token)
        self._take_text(self._decoder.push(token))

    def _take_text(self, piece: str) -> None:
        stops = self.params.stop
        if not stops:
            self._emit(piece)
            return
        held = self._held + piece
        hits = [i for i in (held.find(s) for s in stops) if i >= 0]
        if hits:
            self._held = ""
            self._emit(held[: min(hits)])
            self._end("stop")  # the text after the stop string is dropped
            return
        keep = max((n for s in stops for n in range(min(len(s) - 1, len(held)), 0, -1) if held.endswith(s[:n])),
                   default=0)
        self._held = held[len(held) - keep :]
        self._emit(held[: len(held) - keep])

    def finish(self, reason: str, error: str | None = None) -> None:
        """End the sequence. At a natural end ("stop", "length") the text still held back (an
        unfinished character, a possible start of a stop string) is delivered first."""
        if self.finish_reason is not None:
            return
        rest = ""
        if reason in ("stop", "length"):
            self._take_text(self._decoder.flush())
            if self.finish_reason is not None:  # that text completed a stop string
                return
            rest, self._held = self._held, ""
            self.text += rest
        self._end(reason, rest, error)

    def _end(self, reason: str, rest: str = "", error: str | None = None) -> None:
        self.finish_reason, self.error, self.finished_at = reason, error, time.perf_counter()
        if self.listener:
            self.listener(self, rest)


class _RowView(KVCache):
    """Rows a..b-1 of a KV cache as a cache of their own: views of its tensors, no copies, so a
    forward over a few rows writes straight into the big cache (copy `lengths` back after)."""

    def __init__(self, cache: KVCache, a: int, b: int) -> None:  # noqa: D107 - no allocation, unlike KVCache
        self.k = [k[a:b] for k in cache.k]
        self.v = [v[a:b] for v in cache.v]
        self.max_len = cache.max_len
        self.lengths = cache.lengths[a:b].clone()
        self._step = None


class Batch:
    """Sequences decoding together over one preallocated KV cache, one row each, each at its
    own position. `add` prefills new sequences into free rows (the lowest first, so the running
    rows stay packed at the front and a step runs over rows 0..hi-1 only); `step` decodes one
    token for every running row; a finished or cancelled sequence frees its row at once."""

    def __init__(self, model: Transformer, vocab_size: int, stop_ids: set[int], rows: int, max_len: int,
                 compile: bool = False) -> None:
        p = next(model.parameters())
        self.model, self.vocab, self.stop_ids, self.max_len = model, vocab_size, stop_ids, max_len
        self.device = p.device
        self.cache = KVCache(model.cfg, rows, max_len, device=p.device, dtype=p.dtype)
        self.seqs: list[Sequence | None] = [None] * rows
        self.last = torch.zeros(rows, 1, dtype=torch.long, device=p.device)  # each row's newest token
        self.live = torch.zeros(rows, dtype=torch.long, device=p.device)  # 1 = the row holds a sequence
        self.temperature = torch.zeros(rows, device=p.device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=p.device)
        self.top_p = torch.ones(rows, device=p.device)
        self.penalty = torch.ones(rows, device=p.device)
        self.seen: torch.Tensor | None = None  # (rows, vocab) tokens in each row's prompt and output, for penalties
        self.length = [0] * rows  # each row's cache length, known on the host (no device reads per step)
        # The decode step: the fused, sync-free one for a plain model (compiled whole when asked),
        # else the model's own forward (compiled when asked). Prefill (other shapes, once per
        # request) stays eager.
        self.fast = decode.decode_step(model, compile) if decode.supports(model) else None
        if self.fast is not None:
            self.fast.warm_up(self.cache)  # while every row is free
        self.decode = torch.compile(model, dynamic=True) if compile and self.fast is None else model

    @property
    def rows(self) -> int:
        return len(self.seqs)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.seqs if s is not None]

    def free_rows(self) -> int:
        return sum(s is None for s in self.seqs)

    def _hi(self) -> int:
        return max((i + 1 for i, s in enumerate(self.seqs) if s is not None), default=0)

    def _view(self, a: int, b: int) -> KVCache:
        return self.cache if (a, b) == (0, self.rows) else _RowView(self.cache, a, b)

    def _forward(self, fn, ids: torch.Tensor, a: int, b: int, mask: torch.Tensor | None) -> torch.Tensor:
        view = self._view(a, b)
        hidden = fn(ids, cache=view, attention_mask=mask, return_hidden=True)
        if view is not self.cache:
            self.cache.lengths[a:b] = view.lengths
        return hidden

    @torch.inference_mode()
    def add(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` into free rows (the caller checks `free_rows()`) and sample their first tokens."""
        free = [i for i, s in enumerate(self.seqs) if s is None]
        if len(seqs) > len(free):
            raise ValueError(f"{len(seqs)} sequences for {len(free)} free rows")
        for seq, row in zip(seqs, free):
            if not 0 < len(seq.prompt) < self.max_len:
                raise ValueError(f"a prompt of {len(seq.prompt)} tokens does not fit a cache of {self.max_len}")
            self.seqs[row] = seq
            self.length[row] = len(seq.prompt)
            seq.budget = min(seq.params.max_new_tokens, self.max_len - len(seq.prompt))
            sp = seq.params
            self.temperature[row], self.top_k[row], self.top_p[row] = sp.temperature, sp.top_k, sp.top_p
            self.penalty[row] = sp.repetition_penalty
            if sp.repetition_penalty != 1.0:
                if self.seen is None:
                    self.seen = torch.zeros(self.rows, self.vocab, dtype=torch.bool, device=self.device)
                self.seen[row] = False
                self.seen[row, torch.tensor(seq.prompt, device=self.device).clamp(max=self.vocab - 1)] = True
        rows = free[: len(seqs)]
        self.cache.reset(rows)
        self.live[rows] = 1
        # One right-padded forward per run of adjacent rows.
        runs, start = [], rows[0]
        for prev, row in zip(rows, [*rows[1:], None]):
            if row != prev + 1:
                runs.append((start, prev + 1))
                start = row
        for a, b in runs:
            group = self.seqs[a:b]
            t = max(len(s.prompt) for s in group)
            ids = torch.zeros(b - a, t, dtype=torch.long)
            mask = torch.zeros(b - a, t, dtype=torch.long)
            for i, s in enumerate(group):
                ids[i, : len(s.prompt)] = torch.tensor(s.prompt)
                mask[i, : len(s.prompt)] = 1
            hidden = self._forward(self.model, ids.to(self.device), a, b, mask.to(self.device) if b - a > 1 else None)
            ends = torch.tensor([len(s.prompt) - 1 for s in group], device=self.device)
            logits = self.model.logits(hidden[torch.arange(b - a, device=self.device), ends])
            self._take(self._sample(logits, a, b), a)

    @torch.inference_mode()
    def step(self) -> None:
        """Decode one token for every running row."""
        hi = self._hi()
        if hi == 0:
            return
        live = self.live[:hi]
        if self.fast is not None:
            logits = self.fast(self.last[:, 0], self.cache, hi, max(self.length[:hi]) + 1)
            self.cache.lengths[:hi] += live
        else:
            mask = None if all(s is not None for s in self.seqs[:hi]) else live[:, None]
            logits = self.model.logits(self._forward(self.decode, self.last[:hi], 0, hi, mask)[:, -1])
        for row in range(hi):
            self.length[row] += self.seqs[row] is not None
        self._take(self._sample(logits, 0, hi), 0)

    def _sample(self, logits: torch.Tensor, a: int, b: int) -> torch.Tensor:
        logits = logits[:, : self.vocab].float()
        seqs = self.seqs[a:b]
        if self.seen is not None and any(s is not None and s.params.repetition_penalty != 1.0 for s in seqs):
            p = self.penalty[a:b, None]
            logits = torch.where(self.seen[a:b], torch.where(logits > 0, logits / p, logits * p), logits)
        if not any(s is not None and s.params.temperature > 0 for s in seqs):
            return logits.argmax(-1)
        draws = torch.tensor([s.rng.random() if s is not None and s.params.temperature > 0 else 0.0 for s in seqs])
        return sample_next(logits, self.temperature[a:b], self.top_k[a:b], self.top_p[a:b], uniform=draws)

    def _take(self, tokens: torch.Tensor, a: int) -> None:
        """Hand each row its sampled token; free the rows whose sequences end."""
        b = a + tokens.shape[0]
        self.last[a:b, 0] = tokens
        if self.seen is not None:
            self.seen[torch.arange(a, b, device=self.device), tokens] = True
        now = time.perf_counter()
        for row, token in enumerate(tokens.tolist(), start=a):
            seq = self.seqs[row]
            if seq is None:
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
            if token in self.stop_ids:
                seq.finish("stop")
            else:
                seq.push(token)
                if seq.finish_reason is None and len(seq.tokens) >= seq.budget:
                    seq.context_ended = seq.budget < seq.params.max_new_tokens
                    seq.finish("length")
            if seq.finish_reason is not None:
                self._free(row)

    def _free(self, row: int) -> None:
        self.seqs[row] = None
        self.length[row] = 0
        self.live[row] = 0
        self.cache.reset([row])

    @torch.inference_mode()
    def remove(self, seq: Sequence, reason: str = "cancelled", error: str | None = None) -> None:
        """Take a sequence out of the batch now (a client left, or a failure), freeing its row."""
        for row, s in enumerate(self.seqs):
            if s is seq:
                self._free(row)
        seq.finish(reason, error)


def load_model(ckpt: Path, info: dict, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A checkpoint's model on `device` in `dtype`, ready for inference: the one place where
    another kind of checkpoint (e.g. a quantized one) plugs in."""
    from kiln.post.quantize import load_model as load_quantized

    quantized = load_quantized(ckpt, device, dtype)  # None unless checkpoint.json has a `quantization` entry
    if quantized is not None:
        return quantized
    model = Transformer(ModelConfig.from_dict(info["model"]))
    if (ckpt / "model.safetensors").is_file():
        CheckpointManager.load(ckpt, model)
    else:  # a sharded checkpoint from a multi-process run, before its consolidation
        distributed_checkpoint.load(ckpt, model, None)
    model.init_buffers()
    return model.to(device=device, dtype=dtype).eval()


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (half the bytes each decode step reads), fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise KilnError(f"dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class Engine:
    model: Transformer
    tokenizer: object
    device: torch.device
    notes: list[str] = field(default_factory=list)  # what the last generate had to say (e.g. context end)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", dtype: str = "auto") -> Engine:
        run_dir = Path(run_dir)
        ckpt = CheckpointManager(run_dir).latest_intact()
        if ckpt is None:
            raise KilnError(f"'{run_dir}' has no intact checkpoint; train one with `kiln pretrain out={run_dir}`")
        info = CheckpointManager.info(ckpt)
        check_tokenizer(run_dir / "tokenizer" / "tokenizer.json", info, "generate")
        tok = load_tokenizer(run_dir / "tokenizer")
        dev = pick_device(device)
        return cls(load_model(ckpt, info, dev, pick_dtype(dtype, dev)), tok, dev)

    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def stop_ids(self) -> set[int]:
        """Tokens that end a generation: a new document begins, a document or a chat turn ends."""
        return {i for i in (self.tokenizer.token_to_id(t) for t in (BOS, EOS, END)) if i is not None}

    def encode_prompt(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        return [tok.token_to_id(BOS), *tok.encode(prompt, add_special_tokens=False).ids]

    def new_batch(self, rows: int, max_len: int | None = None, compile: bool = False) -> Batch:
        return Batch(self.model, self.tokenizer.get_vocab_size(), self.stop_ids, rows,
                     min(max_len or self.context, self.context), compile)

    def generate(self, prompt: str, sc: SampleConfig, on_token: Callable[[int, str], None] | None = None) -> list[str]:
        """`sc.num_samples` completions of `prompt` (the prompt itself not included).

        The whole prompt is always kept: one that leaves no room in the model's context is
        refused. Generation stops at `max_new_tokens`, an end token, or the context's end, which
        is then noted in `self.notes` (and said by `kiln generate`), never silently.
        """
        ids = self.encode_prompt(prompt)
        self.notes = []
        if len(ids) >= self.context:
            raise KilnError(f"the prompt is {len(ids)} tokens but the model's context holds {self.context}; "
                            "shorten the prompt")
        budget = min(sc.max_new_tokens, self.context - len(ids))
        listener = (lambda seq, text: text and on_token(seq.tag, text)) if on_token else None
        seqs = [Sequence(ids, SamplingParams(sc.max_new_tokens, sc.temperature, sc.top_k, sc.top_p,
                                             sc.repetition_penalty, f"{sc.seed}/{i}", tuple(sc.stop)),
                         self.tokenizer, listener, tag=i)
                for i in range(sc.num_samples)]
        batch = self.new_batch(sc.num_samples, len(ids) + budget)
        batch.add(seqs)
        while batch.running:
            batch.step()
        if any(s.context_ended for s in seqs):
            self.notes.append(f"stopped at the model's context of {self.context} tokens "
                              f"({len(ids)} prompt + {budget} new) before max_new_tokens={sc.max_new_tokens}")
        return [s.text for s in seqs]


def run_generate(cfg: Config) -> list[str]:
    engine = Engine.from_run(cfg.out, cfg.device)
    sc = cfg.sample
    stream = sc.num_samples == 1
    if stream:
        print(sc.prompt, end="", flush=True)
    texts = engine.generate(sc.prompt, sc, on_token=(lambda i, s: print(s, end="", flush=True)) if stream else None)
    if stream:
        print()
    else:
        for i, t in enumerate(texts):
            print(f"--- sample {i}\n{sc.prompt}{t}")
    for note in engine.notes:
        print(f"kiln generate: {note}", file=sys.stderr)
    return texts


def usd_per_hour(setting: float, device: torch.device) -> float:
    """The configured price of the serving machine, or (0 = auto) kiln plan's assumed price for
    the GPU in use, or $0.10/hour for a CPU host (both assumptions, not quotes)."""
    if setting > 0:
        return setting
    if device.type == "cuda":
        from kiln.plan import PricesConfig

        name = torch.cuda.get_device_name(device).lower()
        for gpu, price in vars(PricesConfig()).items():
            if gpu in name:
                return price
    return 0.10


def measure_serving(run_dir: str | Path, cfg: Config, prompts: list[str] | None = None) -> dict:
    """Serving figures for a run (for `kiln speedrun`'s report): each prompt alone (time to first
    token, latency and decode tokens/s per query), then all together through the continuous
    batcher (tokens/s), and the cost per query and per million generated tokens at
    `serve.usd_per_hour`."""
    from kiln.serve.scheduler import Scheduler

    sv = cfg.serve
    engine = Engine.from_run(run_dir, cfg.device, sv.dtype)
    prompts = prompts or list(cfg.sample.report_prompts)
    params = SamplingParams(max_new_tokens=cfg.sample.max_new_tokens, temperature=0.0)

    def one(prompt: str) -> Sequence:
        return Sequence(engine.encode_prompt(prompt)[: engine.context - 1], params, engine.tokenizer)

    with Scheduler(engine, max_batch=max(len(prompts), 1), max_queue=len(prompts)) as sched:
        alone = []
        for prompt in prompts:
            seq = one(prompt)
            sched.submit([seq])
            sched.wait([seq])
            alone.append(seq)
        together = [one(p) for p in prompts]
        t0 = time.perf_counter()
        sched.submit(together)
        sched.wait(together)
        wall = time.perf_counter() - t0
    price = usd_per_hour(sv.usd_per_hour, engine.device)
    tokens = sum(len(s.tokens) for s in together)
    tokens_per_s = tokens / max(wall, 1e-9)
    latency = statistics.median(s.latency_s for s in alone)
    return {
        "queries": len(prompts),
        "ttft_s": statistics.median(s.ttft_s for s in alone),
        "latency_s": latency,
        "decode_tokens_per_s": statistics.median(s.decode_tokens_per_s or 0.0 for s in alone),
        "batched_tokens_per_s": tokens_per_s,
        "usd_per_hour": price,
        "usd_per_query": price / 3600 * latency,
        "usd_per_million_tokens": price / 3600 / tokens_per_s * 1e6 if tokens else None,
        "device": str(engine.device),
    }
