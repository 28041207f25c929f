"""The engine: a running batch over one preallocated KV cache in which sequences join and leave at
their own positions (continuous batching), each with its own sampling settings, streamed as text.

A sequence is prefilled into a free row of the cache (right-padded with the others that join
with it), then every step decodes one token for each running row, and a row is freed the moment
its sequence stops (end token, stop string, its own `until` test, `max_new_tokens`, the
context's end, or a cancel). The serving loop (`kiln.serve.scheduler`) steps a `Batch` on its
thread; `kiln.infer.generate.generate` runs one to completion for everything else that generates
(`kiln generate`, evaluation, SFT's replies, GRPO's rollouts, distillation, speed measurements).
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kiln.data.chat import as_format
from kiln.infer import decode, healing
from kiln.infer.prefix import PrefixCache, shared_groups
from kiln.model.transformer import KVCache


def _kept(logits: torch.Tensor, temperature: torch.Tensor, greedy: torch.Tensor, top_k, top_p
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's sampling distribution after temperature, top-k and top-p, in descending order of
    the logits: (probabilities of the kept tokens, unnormalised, 0 for the rest; the vocabulary
    order). The first token is always kept."""
    b, v = logits.shape
    dev = logits.device
    top_k = torch.as_tensor(top_k, device=dev).expand(b)
    top_p = torch.as_tensor(top_p, dtype=torch.float32, device=dev).expand(b)
    scaled = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    rank = torch.arange(v, device=dev)
    keep = rank[None, :] < torch.where(top_k > 0, top_k, v)[:, None]
    keep &= probs.cumsum(-1) - probs < top_p[:, None]  # the smallest prefix reaching top_p (the first always)
    return probs * keep, order


def sampling_probs(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """The distribution `sample_next` draws each row's token from, over the vocabulary (B, V): a
    one-hot at the argmax where the temperature is 0. Speculative decoding's acceptance rule
    compares the draft's and the model's (`kiln.infer.speculative`)."""
    b, _ = logits.shape
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).expand(b)
    greedy = temperature <= 0
    kept, order = _kept(logits, temperature, greedy, top_k, top_p)
    probs = torch.zeros_like(kept).scatter_(-1, order, kept / kept.sum(-1, keepdim=True))
    onehot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], onehot, probs)


def sample_next(logits: torch.Tensor, temperature, top_k, top_p, generator: torch.Generator | None = None,
                *, uniform: torch.Tensor | None = None, sampling: bool | None = None) -> torch.Tensor:
    """Pick one token per row of (B, V) logits: greedy where the temperature is 0, else top-k and
    nucleus (top-p) sampling. The settings are numbers or per-row (B,) tensors, so rows of one
    batch sample with their own; `uniform` holds each row's draw in [0, 1) (from the row's own
    generator, so a seeded request samples the same whatever batch it runs in), else the draws
    come from `generator`. `sampling`: whether any row samples, when the caller knows (else it is
    read from the temperatures: a host sync on a GPU)."""
    b, v = logits.shape
    dev = logits.device
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=dev).expand(b)
    greedy_tokens = logits.argmax(-1)
    greedy = temperature <= 0
    if sampling is None:
        sampling = bool((~greedy).any())
    if not sampling:
        return greedy_tokens
    kept, order = _kept(logits, temperature, greedy, top_k, top_p)
    cdf = kept.cumsum(-1)
    if uniform is None:
        uniform = torch.rand(b, generator=generator, device=generator.device if generator is not None else "cpu")
    # a copy from the host that the host need not wait for (a plain one waits for the GPU on CUDA)
    draw = uniform.to(dev, torch.float32, non_blocking=dev.type == "cuda")[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, draw, right=True).clamp_(max=v - 1)
    return torch.where(greedy, greedy_tokens, order.gather(-1, pick).squeeze(-1))


def end_ids(fmt) -> set[int]:
    """Tokens that end a generation: a new document begins, a document or a chat turn ends: the run's
    `ChatFormat.stop_ids` (an imported model's EOS and end-of-turn ids; a bare tokenizer is one
    `kiln prepare` trained: <|bos|>, <|eos|>, <|end|>)."""
    return as_format(fmt).stop_ids


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
    # token healing (`kiln.infer.healing`): a text prompt's last token is backed off and the first new
    # token is one that extends its text; needs the sequence's tokenizer (token-id prompts: leave off)
    heal: bool = False


class Sequence:
    """One generation: prompt ids, sampling settings, the output as tokens and as streamed text,
    and its timings. `listener(seq, text)` is called with each new piece of text and once more,
    with what is left (maybe ""), when `finish_reason` is set: "stop" (end token, stop string or
    `until`), "length" (max_new_tokens or the context's end), "cancelled" or "error".

    `until(tokens)`, if given, is asked after each token whether the sequence is complete (e.g. a
    whole line or function body). With `tokenizer=None` the sequence keeps token ids only (no text,
    no stop strings): what callers that score or train on ids need, without decoding each token.

    With `params.heal` (and a tokenizer) the prompt may be healed (`kiln.infer.healing`): `prompt`
    stays as given, `fed` is what the batch prefills (the prompt less its last `heal_text`'s token),
    the first of `tokens` extends `heal_text`, and `text` starts after it (what follows the prompt).
    Decode `fed + tokens` (not `prompt + tokens`) for the whole text."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer,
                 listener: Callable[[Sequence, str], None] | None = None, tag=None,
                 until: Callable[[list[int]], bool] | None = None) -> None:
        self.prompt, self.params, self.listener, self.tag, self.until = list(prompt), params, listener, tag, until
        self.tokens: list[int] = []
        self.stop_token: int | None = None  # the end token that stopped it (not in `tokens`)
        self.ended_by: str | None = None  # "end" (an end token), "stop" (a stop string), "until", "length"
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.context_ended = False  # stopped by the context's end before max_new_tokens
        self.cancelled = False
        self.rng = random.Random(params.seed)
        self.healing = healing.plan(tokenizer, self.prompt) if params.heal and tokenizer is not None else None
        self.heal_text = self.healing.text if self.healing is not None else ""
        self.fed = self.prompt[: len(self.prompt) - self.healing.backoff] if self.healing is not None else self.prompt
        self._unsent = len(self.heal_text)  # characters of the first token's text the prompt already has
        self._decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
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
        """Take one generated token; a stop string it completes, or `until`, finishes the sequence."""
        self.tokens.append(token)
        if self._decoder is not None:
            self._take_text(self._decoder.push(token))
        if self.finish_reason is None and self.until is not None and self.until(self.tokens):
            self.ended_by = "until"
            self.finish("stop")

    def _take_text(self, piece: str) -> None:
        if self._unsent:  # a healed prompt's backed-off text: the prompt's, not sent again
            n = min(len(piece), self._unsent)
            piece, self._unsent = piece[n:], self._unsent - n
        stops = self.params.stop
        if not stops:
            self._emit(piece)
            return
        held = self._held + piece
        hits = [i for i in (held.find(s) for s in stops) if i >= 0]
        if hits:
            self._held = ""
            self._emit(held[: min(hits)])
            self.ended_by = "stop"
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
        if reason in ("stop", "length") and self._decoder is not None:
            self._take_text(self._decoder.flush())
            if self.finish_reason is not None:  # that text completed a stop string
                return
            rest, self._held = self._held, ""
            self.text += rest
        self._end(reason, rest, error)

    def _end(self, reason: str, rest: str = "", error: str | None = None) -> None:
        self.finish_reason, self.error, self.finished_at = reason, error, time.perf_counter()
        self.ended_by = self.ended_by or ("length" if reason == "length" else reason)
        if self.listener:
            self.listener(self, rest)


@dataclass(frozen=True)
class ThreadState:
    """The thread-local torch state a decode runs under, taken on one thread (`capture`) and put on
    another (`apply`) before that one decodes: `kiln.serve.scheduler`'s generation thread, and any
    other thread that steps a `Batch` off the thread that loaded the model.

    torch keeps this per OS thread: grad mode is on in every new thread whatever the thread that
    started it set (`Batch` turns it off around its own steps, but a forward outside them would
    record a graph), and the intra-op thread count is OpenMP's and MKL's per-thread setting (torch
    re-applies its own last `torch.set_num_threads` in a new thread, but not a count set through
    OpenMP or MKL directly). `apply` sets the count and turns grad mode off for the rest of the
    thread's life. A thread that only steps a model another thread loaded still runs slower on a
    small model: see `kiln.serve.scheduler` on OpenMP's thread pools (load it on the stepping thread)."""

    num_threads: int

    @classmethod
    def capture(cls) -> ThreadState:
        return cls(torch.get_num_threads())

    def apply(self) -> None:
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        torch.set_grad_enabled(False)


class _RowView(KVCache):
    """Rows a..b-1 of a KV cache as a cache of their own: views of its tensors, no copies, so a
    forward over a few rows writes straight into the big cache (copy `lengths` back after)."""

    def __init__(self, cache: KVCache, a: int, b: int) -> None:  # noqa: D107 - no allocation, unlike KVCache
        self.k = [k[a:b] for k in cache.k]
        self.v = [v[a:b] for v in cache.v]
        self.max_len = cache.max_len
        self.lengths = cache.lengths[a:b].clone()
        self._step = None
        self._known = None


def adjacent_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Ascending row indices as runs of consecutive rows, (first, last + 1) each: a forward over a
    run's cache rows is a view of the cache, no copy."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def right_padded(pieces: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token lists as one (rows, longest) id tensor on `device`, right-padded, and its attention
    mask (1 on real tokens), or None for a single list (nothing to mask)."""
    ids = torch.zeros(len(pieces), max(len(x) for x in pieces), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(pieces):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids.to(device), (mask.to(device) if len(pieces) > 1 else None)


def _put(cache: KVCache, rows: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write each layer's (keys, values), (kv_heads, n, head_dim), into positions 0..n-1 of `rows`."""
    for (k, v), ck, cv in zip(kv, cache.k, cache.v):
        ck[rows, :, : k.shape[1]] = k
        cv[rows, :, : v.shape[1]] = v


def has_compiled_modules(model: nn.Module) -> bool:
    """Whether `model` holds `torch.compile`d modules (compiled training blocks, `train.compile`)."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled in this process
        return False
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) for m in model.modules())


class Batch:
    """Sequences decoding together over one preallocated KV cache, one row each, each at its
    own position. `add` prefills new sequences into free rows (the lowest first, so the running
    rows stay packed at the front and a step runs over rows 0..hi-1 only); `step` decodes one
    token for every running row; a finished or cancelled sequence frees its row at once.

    The model may be one being trained (GRPO's policy, a distilled student), also wrapped by DDP
    or FSDP2: then every forward goes through the wrapper (its hooks gather sharded weights), the
    model's own logits come from that forward, and gradients are off without `inference_mode`
    (its tensors could not be trained on later; `inference=False` asks for that on a plain model
    too). `fused=False` keeps the model's own forward for decoding.

    A compiled decode step is warmed up (compiled, and on CUDA its graphs recorded) when the batch
    is made, in the thread that makes it; `warm=False` leaves that to `warm_up()`, which the thread
    that will step the batch calls (`kiln.serve.scheduler`): torch keeps CUDA graph trees per
    thread, so graphs recorded in another thread would be recorded again at the first request.

    Each step reads the device once: the sampled tokens (`step(read=...)` brings a caller's
    tensor back in the same read). The rows' cache lengths are kept on the host (`length`) and
    handed to the cache before each forward, so planning one reads nothing back."""

    def __init__(self, model: nn.Module, vocab_size: int, stop_ids: set[int], rows: int, max_len: int,
                 compile: bool = False, fused: bool = True, inference: bool = True, warm: bool = True,
                 share_prefix: bool = True, prefix_cache_mb: float = 0.0) -> None:
        core = getattr(model, "module", model)  # DDP keeps the model in .module; FSDP2 is the model itself
        p = next(model.parameters())
        self.model, self.core, self.vocab, self.stop_ids, self.max_len = model, core, vocab_size, stop_ids, max_len
        self.wrapped = core is not model or type(core).__name__.startswith("FSDP")
        self.inference = inference and not self.wrapped
        self.device = p.device
        self.cache = KVCache(core.cfg, rows, max_len, device=p.device, dtype=p.dtype)
        self.seqs: list[Sequence | None] = [None] * rows
        self.last = torch.zeros(rows, 1, dtype=torch.long, device=p.device)  # each row's newest token
        self.live = torch.zeros(rows, dtype=torch.long, device=p.device)  # 1 = the row holds a sequence
        self.temperature = torch.zeros(rows, device=p.device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=p.device)
        self.top_p = torch.ones(rows, device=p.device)
        self.penalty = torch.ones(rows, device=p.device)
        self.seen: torch.Tensor | None = None  # (rows, vocab) tokens in each row's prompt and output, for penalties
        self.length = [0] * rows  # each row's cache length, known on the host (no device reads per step)
        # Shared prompt prefixes (kiln.infer.prefix): prompts of one `add` that begin alike prefill
        # their prefix once (`share_prefix`); a plain inference model may also keep the keys and
        # values of recent prefixes across calls (`prefix_cache_mb`, the server's), never a model
        # in training, whose weights change between calls.
        self.share_prefix = share_prefix
        self.prefix_cache = (PrefixCache(int(prefix_cache_mb * 2**20))
                             if prefix_cache_mb > 0 and self.inference else None)
        self.prompt_tokens_prefilled = 0  # prompt tokens run through a forward
        self.prompt_tokens_reused = 0  # prompt tokens whose keys and values were copied in instead
        self.prefill_s = 0.0  # seconds in `add` (prefill and first tokens)
        # The decode step: the fused, sync-free one for a plain model (compiled whole when asked),
        # else the model's own forward (compiled when asked). Prefill (other shapes, once per
        # request) stays eager.
        self.fast = decode.decode_step(model, compile) if fused and decode.supports(model) else None
        self.handed = 0  # tokens handed to sequences (end tokens included): a speculative step hands several a row
        # Speculative decoding: a small model of the same tokenizer drafts tokens this one checks in one
        # forward; `kiln.infer.speculative.attach` sets it (plain inference batches only).
        self.drafter = None
        if warm:
            self.warm_up()
        self.decode = torch.compile(model, dynamic=True) if compile and self.fast is None else model
        # A model being trained (a GRPO policy, a distilled student) may have compiled blocks
        # (`train.compile`), made for training shapes: a KV cache through them would compile once
        # per layer and per step, past dynamo's limit. The model's own forwards here (prefill, the
        # unfused decode) run them eagerly; wrappers' hooks (FSDP2's gathers) still run.
        self.eager_blocks = has_compiled_modules(model)

    def warm_up(self) -> None:
        """Compile the decode step now, in this thread (the one that will step the batch), while
        every row is free; a no-op without a compiled fused step or once this thread has done it."""
        if self.fast is not None and not any(self.seqs):
            self.fast.warm_up(self.cache)
            if self.drafter is not None:
                self.drafter.warm_up()

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

    def _logits(self, fn, ids: torch.Tensor, a: int, b: int, mask: torch.Tensor | None, lengths: list[int],
                ends: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at position `ends` of each row (the last position when None) of a forward over
        cache rows a..b-1, whose cache lengths are `lengths` (known here: nothing is read back)."""
        view = self._view(a, b).known(lengths)
        at = torch.arange(b - a, device=self.device)
        ends = torch.full((b - a,), ids.shape[1] - 1, device=self.device) if ends is None else ends
        with self._eager() if fn is self.model else contextlib.nullcontext():
            if self.wrapped:  # through the wrapper's forward (its hooks), which gives the logits itself
                logits = fn(ids, cache=view, attention_mask=mask)[at, ends]
            else:  # the LM head on the wanted positions only
                logits = self.core.logits(fn(ids, cache=view, attention_mask=mask, return_hidden=True)[at, ends])
        if view is not self.cache:
            self.cache.lengths[a:b] = view.lengths
        return logits

    def _eager(self):
        """Where the model's own forward runs: its compiled modules, if any, eagerly."""
        return torch.compiler.set_stance("force_eager") if self.eager_blocks else contextlib.nullcontext()

    def _no_grad(self):
        return torch.inference_mode() if self.inference else torch.no_grad()

    def add(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` into free rows (the caller checks `free_rows()`) and sample their first tokens."""
        began = time.perf_counter()
        with self._no_grad():
            self._add(seqs)
        self.prefill_s += time.perf_counter() - began

    def _add(self, seqs: list[Sequence]) -> None:
        free = [i for i, s in enumerate(self.seqs) if s is None]
        if len(seqs) > len(free):
            raise ValueError(f"{len(seqs)} sequences for {len(free)} free rows")
        for seq, row in zip(seqs, free):
            if not 0 < len(seq.prompt) < self.max_len:
                raise ValueError(f"a prompt of {len(seq.prompt)} tokens does not fit a cache of {self.max_len}")
            self.seqs[row] = seq
            self.length[row] = len(seq.fed)  # the prompt, less a healed prompt's backed-off token
            seq.budget = min(seq.params.max_new_tokens, self.max_len - len(seq.fed))
            sp = seq.params
            self.temperature[row], self.top_k[row], self.top_p[row] = sp.temperature, sp.top_k, sp.top_p
            self.penalty[row] = sp.repetition_penalty
            if sp.repetition_penalty != 1.0:
                if self.seen is None:
                    self.seen = torch.zeros(self.rows, self.vocab, dtype=torch.bool, device=self.device)
                self.seen[row] = False
                self.seen[row, torch.tensor(seq.fed, device=self.device).clamp(max=self.vocab - 1)] = True
        rows = free[: len(seqs)]
        self.cache.reset(rows)
        self.live[rows] = 1
        # One right-padded forward per run of adjacent rows, of what each row's shared prefix (its
        # keys and values copied in by `_share`) leaves; a run is cut where its rows' starts and
        # rests would not fit the cache in one forward.
        runs = adjacent_runs(rows)
        done = self._share(rows, runs)  # each row's cache length before its forward
        for a, b in (cut for run in runs for cut in self._fit(*run, done)):
            group, known = self.seqs[a:b], done[a:b]
            ids, mask = right_padded([s.fed[n:] for s, n in zip(group, known)], self.device)
            ends = torch.tensor([len(s.fed) - n - 1 for s, n in zip(group, known)], device=self.device)
            if any(known):  # the rows were just reset (to 0)
                self.cache.lengths[a:b] = torch.tensor(known, device=self.device)
            logits = self._logits(self.model, ids, a, b, mask, known, ends)
            self.prompt_tokens_prefilled += sum(len(s.fed) - n for s, n in zip(group, known))
            if self.prefix_cache is not None:
                self._remember(a, b)
            self._take(self._sample(logits, a, b, first=True), a)

    # ---- shared prompt prefixes (kiln.infer.prefix) ---------------------------------------------
    def _fits(self, a: int, b: int, done: list[int]) -> bool:
        """Whether rows a..b-1, at cache lengths `done`, prefill the rest of their prompts in one forward."""
        return max(done[a:b]) + max(len(s.fed) - n for s, n in zip(self.seqs[a:b], done[a:b])) <= self.max_len

    def _fit(self, a: int, b: int, done: list[int]):
        """Rows a..b-1 cut into runs that `_fits` (one run unless shared prefixes made starts differ)."""
        lo = a
        for r in range(a + 1, b + 1):
            if r == b or not self._fits(lo, r + 1, done):
                yield lo, r
                lo = r

    def _share(self, rows: list[int], runs: list[tuple[int, int]]) -> list[int]:
        """Copy into the new `rows` the keys and values of the prompt prefixes they need not
        prefill: blocks in the prefix cache, and prefixes several of them begin with (each
        prefilled here once, in a scratch cache of one row per group). Returns every row's cache
        length after the copies (0 where nothing was copied).

        Through a wrapper (DDP, FSDP2: every rank must make the same forwards) exactly one forward
        is made here whatever the prompts (a dropped one-token forward when nothing is shared), and
        sharing is given up where it would cut a run in two."""
        done = [0] * self.rows
        if not self.share_prefix and self.prefix_cache is None:
            return done
        prompts = [self.seqs[r].fed for r in rows]
        hits = [self.prefix_cache.lookup(p) for p in prompts] if self.prefix_cache is not None else [[]] * len(rows)
        cached = [sum(h.shape[3] for h in hit) for hit in hits]
        groups = []
        if self.share_prefix:
            for n, members in shared_groups(prompts):
                members = [i for i in members if cached[i] < n]  # the rest have more in the prefix cache
                if len(members) > 1:
                    groups.append((n, members))
        if self.wrapped and groups:
            for n, members in groups:
                for i in members:
                    done[rows[i]] = n
            if not all(self._fits(a, b, done) for a, b in runs):
                groups, done = [], [0] * self.rows
        grouped = {i for _, members in groups for i in members}
        computed = self._prefill_groups(groups, rows, prompts, hits, cached, done) if groups else 0
        if not groups and self.wrapped and self.share_prefix:
            with self._eager():
                self.model(self.last[:1], attention_mask=None)  # the forward the other ranks may make here
        by_chain: dict[int, list[int]] = {}  # rows whose prefix-cache hits end in the same block: the same blocks
        for i, hit in enumerate(hits):
            if hit and i not in grouped:
                by_chain.setdefault(id(hit[-1]), []).append(i)
        for members in by_chain.values():
            kv = torch.cat(hits[members[0]], dim=3)
            _put(self.cache, [rows[i] for i in members], [(kv[layer, 0], kv[layer, 1]) for layer in range(len(kv))])
            for i in members:
                done[rows[i]] = cached[i]
        self.prompt_tokens_prefilled += computed
        self.prompt_tokens_reused += sum(done[r] for r in rows) - computed
        return done

    def _prefill_groups(self, groups: list[tuple[int, list[int]]], rows: list[int], prompts: list[list[int]],
                        hits: list[list[torch.Tensor]], cached: list[int], done: list[int]) -> int:
        """Prefill each group's shared prefix once (one right-padded forward over a scratch cache of
        one row per group, after what the prefix cache holds of it) and copy its keys and values
        into the members' rows. Returns the tokens the forward prefilled."""
        starts = [min(cached[i] for i in members) for _, members in groups]
        scratch = KVCache(self.core.cfg, len(groups), max(n for n, _ in groups), device=self.device,
                          dtype=self.cache.k[0].dtype)
        pieces = []
        for j, ((n, members), c) in enumerate(zip(groups, starts)):
            first = min(members, key=lambda i: cached[i])
            if c:
                kv = torch.cat(hits[first], dim=3)
                _put(scratch, [j], [(kv[layer, 0], kv[layer, 1]) for layer in range(len(kv))])
            pieces.append(prompts[first][c:n])
        scratch.lengths = torch.tensor(starts, device=self.device)
        ids, mask = right_padded(pieces, self.device)
        with self._eager():
            if self.wrapped:
                self.model(ids, cache=scratch.known(starts), attention_mask=mask)
            else:
                self.model(ids, cache=scratch.known(starts), attention_mask=mask, return_hidden=True)
        for j, (n, members) in enumerate(groups):
            _put(self.cache, [rows[i] for i in members], [(k[j, :, :n], v[j, :, :n]) for k, v in zip(scratch.k, scratch.v)])
            for i in members:
                done[rows[i]] = n
        return sum(n - c for (n, _), c in zip(groups, starts))

    def _remember(self, a: int, b: int) -> None:
        """Keep the whole blocks of rows a..b-1's prompts, just prefilled, in the prefix cache."""
        for r in range(a, b):
            self.prefix_cache.store(self.seqs[r].fed, lambda s, e, r=r: torch.stack(
                [torch.stack((k[r, :, s:e], v[r, :, s:e])) for k, v in zip(self.cache.k, self.cache.v)]))

    def step(self, read: torch.Tensor | None = None) -> list | None:
        """Decode one token for every running row. `read`: a tensor whose values come back (as a
        list) in the same device read as the step's tokens, instead of a read of its own."""
        with self._no_grad():
            return self._step(read)

    def _step(self, read: torch.Tensor | None = None) -> list | None:
        hi = self._hi()
        if hi == 0:
            return None if read is None else read.tolist()
        timed = None
        if self.drafter is not None and read is None:
            if self.drafter.step(hi):
                return None
            timed = time.perf_counter(), sum(s is not None for s in self.seqs[:hi])
        live = self.live[:hi]
        if self.fast is not None:
            logits = self.fast(self.last[:, 0], self.cache, hi, max(self.length[:hi]) + 1)
            self.cache.lengths[:hi] += live
        else:
            mask = None if all(s is not None for s in self.seqs[:hi]) else live[:, None]
            logits = self._unfused(hi, mask)
        for row in range(hi):
            self.length[row] += self.seqs[row] is not None
        out = self._take(self._sample(logits, 0, hi), 0, read)
        if timed is not None:
            self.drafter.took_plain(timed[1], time.perf_counter() - timed[0])
        return out

    def _unfused(self, hi: int, mask: torch.Tensor | None) -> torch.Tensor:
        """One step of the model's own forward, compiled if asked; if that fails to compile, the
        step reruns eagerly (the cache's lengths as they were) and every later one is eager."""
        known = self.length[:hi]  # free rows are at 0, as their cache rows
        if self.decode is not self.model:
            lengths = self.cache.lengths.clone()
            try:
                return self._logits(self.decode, self.last[:hi], 0, hi, mask, known)
            except Exception as e:  # noqa: BLE001 - a failure eager would also have is raised by the rerun
                decode.compile_failed("the model's decode step", e)
                self.decode, self.cache.lengths, self.cache._step = self.model, lengths, None
        return self._logits(self.model, self.last[:hi], 0, hi, mask, known)

    def _sample(self, logits: torch.Tensor, a: int, b: int, first: bool = False) -> torch.Tensor:
        logits = logits[:, : self.vocab].float()
        seqs = self.seqs[a:b]
        if first and any(s is not None and s.healing is not None for s in seqs):
            logits = self._healed(logits, seqs)
        if self.seen is not None and any(s is not None and s.params.repetition_penalty != 1.0 for s in seqs):
            p = self.penalty[a:b, None]
            logits = torch.where(self.seen[a:b], torch.where(logits > 0, logits / p, logits * p), logits)
        if not any(s is not None and s.params.temperature > 0 for s in seqs):
            return logits.argmax(-1)
        draws = torch.tensor([s.rng.random() if s is not None and s.params.temperature > 0 else 0.0 for s in seqs])
        if self.device.type == "cuda":  # page-locked, so the copy to the GPU runs without the host waiting
            draws = draws.pin_memory()
        return sample_next(logits, self.temperature[a:b], self.top_k[a:b], self.top_p[a:b], uniform=draws,
                           sampling=True)

    def _healed(self, logits: torch.Tensor, seqs: list[Sequence | None]) -> torch.Tensor:
        """First-token logits with a healed row's tokens that do not extend its backed-off text
        masked out (before penalties, temperature, top-k and top-p)."""
        keep = torch.ones_like(logits, dtype=torch.bool)
        for i, s in enumerate(seqs):
            if s is not None and s.healing is not None:
                allowed = torch.tensor([t for t in s.healing.allowed if t < self.vocab], dtype=torch.long)
                if not len(allowed):
                    continue
                keep[i] = False
                keep[i, allowed.to(self.device)] = True
        return logits.masked_fill(~keep, float("-inf"))

    def _take(self, tokens: torch.Tensor, a: int, read: torch.Tensor | None = None) -> list | None:
        """Hand each row its sampled token; free the rows whose sequences end. The tokens are the
        step's one read of the device; `read`'s values come back with them (returned)."""
        b = a + tokens.shape[0]
        self.last[a:b, 0] = tokens
        if self.seen is not None:
            self.seen[torch.arange(a, b, device=self.device), tokens] = True
        values = tokens.tolist() if read is None else torch.cat([tokens, read.reshape(-1).to(tokens)]).tolist()
        tokens, extra = values[: b - a], (values[b - a :] if read is not None else None)
        now = time.perf_counter()
        for row, token in enumerate(tokens, start=a):
            self._give(row, token, now)
        return extra

    def _give(self, row: int, token: int, now: float) -> bool:
        """Hand row `row`'s sequence (if any) its next token; free the row if that ends it.
        Whether the sequence goes on."""
        seq = self.seqs[row]
        if seq is None:
            return False
        self.handed += 1
        if seq.first_token_at is None:
            seq.first_token_at = now
        if token in self.stop_ids:
            seq.stop_token, seq.ended_by = token, "end"
            seq.finish("stop")
        else:
            seq.push(token)
            if seq.finish_reason is None and len(seq.tokens) >= seq.budget:
                seq.context_ended = seq.budget < seq.params.max_new_tokens
                seq.finish("length")
        if seq.finish_reason is not None:
            self._free(row)
            return False
        return True

    def _free(self, row: int) -> None:
        self.seqs[row] = None
        self.length[row] = 0
        self.live[row] = 0
        self.cache.reset([row])
        if self.drafter is not None:
            self.drafter.length[row] = 0

    def idle_step(self) -> None:
        """A forward whose output is dropped: with sharded weights (or DDP's buffer broadcast) a rank
        that has nothing left to decode still joins each forward of the ranks that have."""
        with self._no_grad(), self._eager():
            self.model(self.last[:1], attention_mask=None)

    @torch.inference_mode()
    def remove(self, seq: Sequence, reason: str = "cancelled", error: str | None = None) -> None:
        """Take a sequence out of the batch now (a client left, or a failure), freeing its row."""
        for row, s in enumerate(self.seqs):
            if s is seq:
                self._free(row)
        seq.finish(reason, error)
