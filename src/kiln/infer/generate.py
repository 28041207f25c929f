"""The one batched generation function, the `Engine` (a loaded model that generates text), and
`kiln generate`.

`generate(model, prompts, params)` runs token-id prompts to completion on the engine's `Batch`:
prompts of different lengths are prefilled right-padded, every row decodes at its own position
(the fused decode step where the model takes it), a row's slot goes to the next waiting prompt
the moment it finishes (continuous batching, `rows` at a time), and each row stops at an end
token, one of its stop strings, its own `until(tokens)` test, or its budget of new tokens within
the model's context. Greedy or sampled per row (`SamplingParams`), seeded per row.

Everything in kiln that generates goes through it: `kiln generate` and the engine, evaluation's
code tasks, SFT's held-out replies, GRPO's rollouts (on a policy in training, through its DDP or
FSDP2 wrapper, every rank stepping together), on-policy distillation's student samples, and the
decode-speed measurements.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kiln.config import Config, SampleConfig
from kiln.data.chat import ChatFormat, chat_messages
from kiln.errors import KilnError
from kiln.infer.engine import Batch, SamplingParams, Sequence, end_ids
from kiln.infer.load import load


def generate(model: nn.Module, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *,
             stop_ids: set[int], tokenizer=None, vocab: int | None = None, rows: int | None = None,
             until: Callable[[int, list[int]], bool] | None = None,
             listener: Callable[[Sequence, str], None] | None = None,
             compile: bool = False, fused: bool = True, inference: bool = True, ranks_in_step: bool = False
             ) -> list[Sequence]:
    """Continuations of `prompts` (token ids, each shorter than the model's context), in order.

    `params`: one `SamplingParams` for all or one per prompt. `stop_ids`: tokens that end a row
    (recorded as `seq.stop_token`, not part of `seq.tokens`). `tokenizer`: needed for text
    (`seq.text`, stop strings, `listener`, token healing where `params.heal`: `seq.fed` is then the
    prompt as prefilled); without it rows keep ids only. `vocab`: ids that may
    be sampled (the tokenizer's size by default; the model's padded rows past it never are).
    `until(i, tokens)`: row i is complete. `rows`: rows decoding at once (all by default).
    `inference=False` for a model in training (no `inference_mode` tensors); `ranks_in_step`: under
    torch.distributed, every rank steps until all are done (sharded weights need every rank in
    each forward). Returns the finished `Sequence`s: `tokens`, `text`, `ended_by` ("end", "stop",
    "until", "length"), `stop_token`, `context_ended`, timings.
    """
    core = getattr(model, "module", model)
    context = core.cfg.max_seq_len
    plist = params if isinstance(params, list) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"{len(plist)} sampling settings for {len(prompts)} prompts")
    for p in prompts:
        if not 0 < len(p) < context:
            raise ValueError(f"prompts must hold 1 to {context - 1} tokens (the model's context is {context})")
    if vocab is None:
        vocab = tokenizer.get_vocab_size() if tokenizer is not None else core.cfg.vocab_size
    seqs = [Sequence(p, sp, tokenizer, listener, tag=i, until=_row_test(until, i))
            for i, (p, sp) in enumerate(zip(prompts, plist))]
    if not seqs:
        return seqs
    max_len = min(context, max(len(s.prompt) + max(1, s.params.max_new_tokens) for s in seqs))
    synced = ranks_in_step and torch.distributed.is_available() and torch.distributed.is_initialized()
    if synced:  # every rank admits all its rows in the first forward, so all make the same forwards after
        rows = len(seqs)
    batch = Batch(model, vocab, stop_ids, min(rows or len(seqs), len(seqs)), max_len, compile, fused, inference)
    waiting = list(seqs)
    anyone = True  # under `synced`: whether some rank had rows left, as of the last all-reduce read
    while True:
        if waiting and batch.free_rows():
            take, waiting = waiting[: batch.free_rows()], waiting[batch.free_rows():]
            batch.add(take)
        busy = bool(batch.running) or bool(waiting)
        if not synced:
            if not busy:
                break
            batch.step()
            continue
        # Every rank steps until none has rows left. Whether this one has is all-reduced each step
        # and read back with the step's tokens (one device read per step, not two), so the ranks
        # learn that all are done one step late: each makes one forward more, all alike.
        if not anyone:
            break
        flag = torch.full((1,), int(busy), dtype=torch.long, device=batch.device)
        torch.distributed.all_reduce(flag)
        if batch.running:
            (others,) = batch.step(read=flag)
        else:  # this rank is done: keep the others' sharded forwards company
            batch.idle_step()
            others = int(flag.item())
        anyone = others > 0
    return seqs


def _row_test(until, i: int):
    return None if until is None else (lambda tokens: until(i, tokens))


def greedy(max_new_tokens: int) -> SamplingParams:
    """Greedy decoding of up to `max_new_tokens` new tokens."""
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, new_tokens: int = 64, prompt_len: int = 16, repeats: int = 3) -> float:
    """Greedy decode speed at batch 1, as `generate` decodes: new tokens per second after the
    prefill of a `prompt_len` prompt (no end token stops it), the best of `repeats` runs (the
    machine's noise only ever slows a run down)."""
    cfg = model.cfg
    new_tokens = min(new_tokens, cfg.max_seq_len - prompt_len)
    prompt = [i % cfg.vocab_size for i in range(prompt_len)]
    best = 0.0
    for _ in range(repeats):
        seq = generate(model, [prompt], greedy(new_tokens), stop_ids=set())[0]
        best = max(best, seq.decode_tokens_per_s or 0.0)
    return best


@dataclass
class Engine:
    """A loaded model with its tokenizer, as `kiln generate`, `kiln serve` and the labelling app use it."""

    model: nn.Module
    tokenizer: object
    device: torch.device
    notes: list[str] = field(default_factory=list)  # what the last generate had to say (e.g. context end)
    chat: bool = False  # trained to answer in its chat format (`kiln.data.chat.speaks_chat`)
    workload: str = ""
    chat_format: ChatFormat | None = None  # its ids and chat template; None: kiln's format over `tokenizer`
    draft: nn.Module | None = None  # a small model of the same tokenizer for speculative decoding (`add_draft`)
    draft_tokens: int = 4  # tokens the draft proposes per round

    def __post_init__(self) -> None:
        if self.chat_format is None:
            self.chat_format = ChatFormat.kiln(self.tokenizer)

    @classmethod
    def from_run(cls, spec: str | Path, device: str = "auto", dtype: str = "auto", key: str = "out") -> Engine:
        """A run, checkpoint, quantized run or Hugging Face directory (`kiln.infer.load.load`)."""
        lm = load(spec, device, dtype, key=key)
        return cls(lm.model, lm.tokenizer, lm.device, chat=lm.chat, workload=lm.workload, chat_format=lm.chat_format)

    def add_draft(self, spec: str | Path, tokens: int = 4, key: str = "serve.draft") -> None:
        """Decode speculatively with the model at `spec` (e.g. the student `kiln distill` made of this
        one) proposing `tokens` tokens a round (`kiln.infer.speculative`). The draft must share the
        model's tokenizer (the same vocabulary, token for token) and be a plain model."""
        from kiln.infer import decode

        lm = load(spec, self.device, next(self.model.parameters()).dtype, key=key)
        if lm.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise KilnError(f"{key}={spec}: its tokenizer differs from the served model's; a draft model must "
                            "share the tokenizer (a student `kiln distill` made of this model does)")
        if not decode.supports(lm.model) or not decode.supports(self.model):
            raise KilnError(f"{key}={spec}: speculative decoding needs plain models on both sides (not quantized, "
                            "not LoRA); serve a plain run or drop the draft")
        self.draft, self.draft_tokens = lm.model, tokens

    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def stop_ids(self) -> set[int]:
        return end_ids(self.chat_format)

    def encode_prompt(self, prompt: str) -> list[int]:
        """A plain-text prompt: BOS (where the model's documents start with one) and the text's ids."""
        return self.chat_format.text_ids(prompt)

    def new_batch(self, rows: int, max_len: int | None = None, compile: bool = False, warm: bool = True,
                  prefix_cache_mb: float = 0.0) -> Batch:
        """A batch over this model; `warm=False` leaves the decode step's warm-up to `Batch.warm_up()`,
        called by the thread that will step the batch; `prefix_cache_mb`: the budget of its cache of
        recent prompt prefixes (`serve.prefix_cache_mb`; 0 = none)."""
        batch = Batch(self.model, self.tokenizer.get_vocab_size(), self.stop_ids, rows,
                      min(max_len or self.context, self.context), compile, warm=warm, prefix_cache_mb=prefix_cache_mb)
        if self.draft is not None:
            from kiln.infer.speculative import attach

            attach(batch, self.draft, self.draft_tokens, compile, warm)
        return batch

    def generate(self, prompt: str, sc: SampleConfig, on_token: Callable[[int, str], None] | None = None,
                 chat: bool = False) -> list[str]:
        """`sc.num_samples` completions of `prompt` (the prompt itself not included); with `chat`,
        replies to `prompt` as the user's turn (after `sc.system`, if set) in the model's chat format,
        as the server's chat endpoint renders it.

        The whole prompt is always kept: one that leaves no room in the model's context is
        refused. Generation stops at `max_new_tokens`, an end token, or the context's end, which
        is then noted in `self.notes` (and said by `kiln generate`), never silently. A text prompt
        is healed (`sc.heal`, `kiln.infer.healing`); a chat prompt is taken as rendered.
        """
        ids = self.chat_format.prompt_ids(chat_messages(prompt, sc.system)) if chat else self.encode_prompt(prompt)
        self.notes = []
        if len(ids) >= self.context:
            raise KilnError(f"the prompt is {len(ids)} tokens but the model's context holds {self.context}; "
                            "shorten the prompt")
        budget = min(sc.max_new_tokens, self.context - len(ids))
        listener = (lambda seq, text: text and on_token(seq.tag, text)) if on_token else None
        params = [SamplingParams(sc.max_new_tokens, sc.temperature, sc.top_k, sc.top_p, sc.repetition_penalty,
                                 f"{sc.seed}/{i}", tuple(sc.stop), heal=sc.heal and not chat)
                  for i in range(sc.num_samples)]
        seqs = generate(self.model, [ids] * sc.num_samples, params, tokenizer=self.tokenizer, stop_ids=self.stop_ids,
                        listener=listener)
        if any(s.context_ended for s in seqs):
            self.notes.append(f"stopped at the model's context of {self.context} tokens "
                              f"({len(ids)} prompt + {budget} new) before max_new_tokens={sc.max_new_tokens}")
        return [s.text for s in seqs]


def run_generate(cfg: Config) -> list[str]:
    """`kiln generate`: complete `sample.prompt` with the run's model, streaming one sample; a run
    trained on conversations (or `sample.chat=on`) replies to it as the user's turn instead."""
    engine = Engine.from_run(cfg.out, cfg.device)
    sc = cfg.sample
    chat = sc.chat == "on" or (sc.chat == "auto" and engine.chat)
    if chat:
        try:
            engine.chat_format.check_chat(f"sample.chat=on: out={cfg.out}")
        except KilnError as e:
            raise KilnError(f"{e} (sample.chat=off completes the prompt as text)") from None
    if sc.system and not chat:
        raise KilnError("sample.system is a chat setting, and this run completes text; set sample.chat=on or "
                        "drop sample.system")
    if chat and sc.chat == "auto":
        print(f"kiln generate: chat mode (a {engine.workload} run): the prompt is the user's turn; sample.chat=off "
              "completes it as raw text", file=sys.stderr)
    shown = "" if chat else sc.prompt  # a reply follows no echo of the question
    stream = sc.num_samples == 1
    if stream:
        print(shown, end="", flush=True)
    texts = engine.generate(sc.prompt, sc, on_token=(lambda i, s: print(s, end="", flush=True)) if stream else None,
                            chat=chat)
    if stream:
        print()
    else:
        for i, t in enumerate(texts):
            print(f"--- sample {i}\n{shown}{t}")
    for note in engine.notes:
        print(f"kiln generate: {note}", file=sys.stderr)
    return texts

