"""Generation: load a run's model and tokenizer, sample with a static KV cache; and `kiln generate`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.config import Config, SampleConfig
from kiln.data.tokenizer import BOS, EOS, load_tokenizer
from kiln.errors import KilnError
from kiln.model.transformer import KVCache, ModelConfig, Transformer
from kiln.train import distributed_checkpoint
from kiln.train.checkpoint import CheckpointManager
from kiln.train.parallel import pick_device


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


@dataclass
class Engine:
    model: Transformer
    tokenizer: object
    device: torch.device

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> Engine:
        run_dir = Path(run_dir)
        ckpt = CheckpointManager(run_dir).latest_intact()
        if ckpt is None:
            raise KilnError(f"'{run_dir}' has no intact checkpoint; train one with `kiln pretrain out={run_dir}`")
        tok = load_tokenizer(run_dir / "tokenizer")
        mc = ModelConfig.from_dict(CheckpointManager.info(ckpt)["model"])
        dev = pick_device(device)
        model = Transformer(mc)
        if (ckpt / "model.safetensors").is_file():
            CheckpointManager.load(ckpt, model)
        else:  # a sharded checkpoint from a multi-process run, before its consolidation
            distributed_checkpoint.load(ckpt, model, None)
        model.to(dev).eval()
        return cls(model, tok, dev)

    @torch.no_grad()
    def generate(self, prompt: str, sc: SampleConfig, on_token: Callable[[int, str], None] | None = None) -> list[str]:
        """`sc.num_samples` completions of `prompt` (the prompt itself not included)."""
        tok, cfg = self.tokenizer, self.model.cfg
        ids = [tok.token_to_id(BOS), *tok.encode(prompt, add_special_tokens=False).ids]
        budget = min(sc.max_new_tokens, cfg.max_seq_len - 1)
        ids = ids[-(cfg.max_seq_len - budget):]  # keep the prompt's end if it is too long
        n = sc.num_samples
        gen = torch.Generator(device=self.device).manual_seed(sc.seed)
        cache = KVCache(cfg, n, len(ids) + budget, device=self.device)
        x = torch.tensor([ids] * n, device=self.device)
        logits = self.model(x, cache, 0)[:, -1]
        stop = {tok.token_to_id(BOS), tok.token_to_id(EOS)}
        out = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        pos = len(ids)
        for _ in range(budget):
            nxt = sample_next(logits[:, : tok.get_vocab_size()], sc.temperature, sc.top_k, sc.top_p, gen)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t in stop:
                    done[i] = True
                    continue
                out[i].append(t)
                if on_token:
                    on_token(i, tok.decode([t]))
            if bool(done.all()):
                break
            logits = self.model(nxt[:, None], cache, pos)[:, -1]
            pos += 1
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
    return texts
