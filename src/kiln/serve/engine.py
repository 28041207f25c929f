"""Generation: load a run's model and tokenizer, sample with a static KV cache; and `kiln generate`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.config import Config, SampleConfig
from kiln.data.tokenizer import BOS, EOS, load_tokenizer
from kiln.errors import KilnError
from kiln.model.transformer import KVCache, ModelConfig, Transformer
from kiln.train import distributed_checkpoint
from kiln.train.checkpoint import CheckpointManager
from kiln.train.parallel import pick_device
from kiln.workloads.common import check_tokenizer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of (B, V) logits: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StreamDecoder:
    """Incremental detokenization: turns token ids into text as they come, holding back the
    bytes of a character split across tokens until it is complete (instead of printing
    replacement characters)."""

    def __init__(self, tokenizer) -> None:
        self.tok, self.ids, self.sent = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the rest
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        new, self.sent = text[self.sent:], len(text)
        return new


@dataclass
class Engine:
    model: Transformer
    tokenizer: object
    device: torch.device
    notes: list[str] = field(default_factory=list)  # what the last generate had to say (e.g. context end)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> Engine:
        run_dir = Path(run_dir)
        ckpt = CheckpointManager(run_dir).latest_intact()
        if ckpt is None:
            raise KilnError(f"'{run_dir}' has no intact checkpoint; train one with `kiln pretrain out={run_dir}`")
        info = CheckpointManager.info(ckpt)
        tpath = run_dir / "tokenizer" / "tokenizer.json"
        check_tokenizer(tpath, info, "generate")
        tok = load_tokenizer(run_dir / "tokenizer")
        mc = ModelConfig.from_dict(info["model"])
        dev = pick_device(device)
        model = Transformer(mc)
        if (ckpt / "model.safetensors").is_file():
            CheckpointManager.load(ckpt, model)
        else:  # a sharded checkpoint from a multi-process run, before its consolidation
            distributed_checkpoint.load(ckpt, model, None)
        model.init_buffers()
        model.to(dev).eval()
        return cls(model, tok, dev)

    def encode_prompt(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        return [tok.token_to_id(BOS), *tok.encode(prompt, add_special_tokens=False).ids]

    @torch.no_grad()
    def generate(self, prompt: str, sc: SampleConfig, on_token: Callable[[int, str], None] | None = None) -> list[str]:
        """`sc.num_samples` completions of `prompt` (the prompt itself not included).

        The whole prompt is always kept: one that leaves no room in the model's context is
        refused. Generation stops at `max_new_tokens`, an end token, or the context's end, which
        is then noted in `self.notes` (and said by `kiln generate`), never silently.
        """
        tok, cfg = self.tokenizer, self.model.cfg
        ids = self.encode_prompt(prompt)
        self.notes = []
        if len(ids) >= cfg.max_seq_len:
            raise KilnError(f"the prompt is {len(ids)} tokens but the model's context holds {cfg.max_seq_len}; "
                            "shorten the prompt")
        budget = min(sc.max_new_tokens, cfg.max_seq_len - len(ids))
        n = sc.num_samples
        gen = torch.Generator(device=self.device).manual_seed(sc.seed)
        cache = KVCache(cfg, n, len(ids) + budget, device=self.device)
        x = torch.tensor([ids] * n, device=self.device)
        logits = self.model(x, cache=cache)[:, -1]
        stop = {tok.token_to_id(BOS), tok.token_to_id(EOS)}
        out = [[] for _ in range(n)]
        streams = [StreamDecoder(tok) for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        for step in range(budget):
            nxt = sample_next(logits[:, : tok.get_vocab_size()], sc.temperature, sc.top_k, sc.top_p, gen)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t in stop:
                    done[i] = True
                    continue
                out[i].append(t)
                if on_token:
                    piece = streams[i].push(t)
                    if piece:
                        on_token(i, piece)
            if bool(done.all()) or step == budget - 1:
                break
            logits = self.model(nxt[:, None], cache=cache)[:, -1]
        if on_token:
            for i, s in enumerate(streams):
                rest = s.flush()
                if rest:
                    on_token(i, rest)
        if budget < sc.max_new_tokens and not bool(done.all()):
            self.notes.append(f"stopped at the model's context of {cfg.max_seq_len} tokens "
                              f"({len(ids)} prompt + {budget} new) before max_new_tokens={sc.max_new_tokens}")
        return [tok.decode(o) for o in out]


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
