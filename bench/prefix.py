"""Shared prompt prefixes (`kiln.infer.prefix`): prefill time with sharing off vs on, two workloads.

1. A GRPO-shaped rollout: `--prompts` prompts × `--group` completions each (64 rows by default),
   sampled as GRPO samples (seeded, temperature 1, a model's batch with `inference=False`),
   `--new-tokens` new tokens per row, no end token (every row does the same work either way).
   Sharing off prefills every row's whole prompt; on, each prompt is prefilled once and its keys
   and values copied into the group's rows. Prints the prompt-prefill seconds (`Batch.add`: the
   forwards over the prompts and the first tokens), its share of the rollout, the rollout's total,
   and the off/on ratios (best of `--repeats`, off and on alternating).
2. A served workload: `--requests` requests through the `Scheduler` (`--clients` at a time, each
   sending its next request when the last one is done), each a common `--system-tokens` system
   prompt and a distinct short user turn. Off: no prefix cache and no sharing within an admission;
   on: `prefix_cache_mb=64` (`serve.prefix_cache_mb`'s default). Prints the median time to first
   token, the prefill seconds, the prompt tokens reused, and the ratios.

Prompts are token ids from the run's tokenizer over Python's standard library source, so no data
is needed beyond the run. No timing is asserted: the figures depend on the machine.

    python -P bench/prefix.py                                   # --run /tmp/demo/runs/quickstart
    python -P bench/prefix.py --run runs/quickstart --device cuda --prompt-tokens 256
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import threading
import time
from pathlib import Path

import torch

from kiln.infer.engine import Batch, SamplingParams, Sequence
from kiln.infer.generate import Engine
from kiln.serve.scheduler import Scheduler

SOURCES = ["json/decoder.py", "json/encoder.py", "collections/__init__.py", "email/message.py", "http/client.py",
           "logging/__init__.py", "urllib/parse.py", "html/parser.py", "argparse.py", "textwrap.py"]


def texts() -> list[str]:
    """Pieces of the standard library's source: a few hundred tokens each."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in SOURCES:
        src = (stdlib / name).read_text()
        out += [src[i : i + 4000] for i in range(0, min(len(src), 16000), 4000)]
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rollout(engine: Engine, prompts: list[list[int]], group: int, new_tokens: int, share: bool) -> dict:
    """One GRPO-shaped rollout: every prompt `group` times, all rows prefilled in one `add`."""
    rows = [p for p in prompts for _ in range(group)]
    max_len = max(len(p) for p in rows) + new_tokens
    batch = Batch(engine.model, engine.tokenizer.get_vocab_size(), set(), len(rows), max_len, inference=False,
                  share_prefix=share)
    seqs = [Sequence(p, SamplingParams(new_tokens, 1.0, seed=f"0/{i}"), None) for i, p in enumerate(rows)]
    sync(engine.device)
    began = time.perf_counter()
    batch.add(seqs)
    prefilled = time.perf_counter()
    while batch.running:
        batch.step()
    sync(engine.device)
    end = time.perf_counter()
    assert all(len(s.tokens) == new_tokens for s in seqs)
    return {"prefill": prefilled - began, "total": end - began, "reused": batch.prompt_tokens_reused,
            "tokens": sum(len(p) for p in rows)}


def served(engine: Engine, prompts: list[list[int]], clients: int, max_tokens: int, cache_mb: float,
           rows: int) -> dict:
    """The prompts through a scheduler, `clients` requests in flight at a time."""
    with Scheduler(engine, max_batch=rows, max_queue=len(prompts), prefix_cache_mb=cache_mb) as sched:
        sched.batch.share_prefix = cache_mb > 0  # off: no sharing within an admission either
        seqs = [Sequence(p, SamplingParams(max_tokens, 0.0), None) for p in prompts]
        todo, lock = iter(seqs), threading.Lock()

        def client() -> None:
            while True:
                with lock:
                    seq = next(todo, None)
                if seq is None:
                    return
                sched.submit([seq])
                sched.wait([seq], 600)

        began = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
        batch = sched.batch
        return {"ttft": statistics.median(s.ttft_s for s in seqs), "prefill": batch.prefill_s, "wall": wall,
                "reused": batch.prompt_tokens_reused, "prefilled": batch.prompt_tokens_prefilled,
                "tokens": [s.tokens for s in seqs]}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="/tmp/demo/runs/quickstart")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=192)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    engine = Engine.from_run(args.run, args.device)
    tok = engine.tokenizer
    pieces = [tok.encode(t, add_special_tokens=False).ids for t in texts()]
    pieces = [p for p in pieces if len(p) >= args.prompt_tokens]
    print(f"model: {args.run} ({sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f}M parameters, "
          f"{engine.device}, {next(engine.model.parameters()).dtype}), torch threads {torch.get_num_threads()}")

    # 1. GRPO-shaped rollout
    prompts = [p[: args.prompt_tokens] for p in pieces[: args.prompts]]
    rollout(engine, prompts[:1], 2, 4, True)  # warm-up
    best: dict[bool, dict] = {}
    for _ in range(args.repeats):
        for share in (False, True):
            r = rollout(engine, prompts, args.group, args.new_tokens, share)
            if share not in best or r["total"] < best[share]["total"]:
                best[share] = r
    off, on = best[False], best[True]
    print(f"\nGRPO-shaped rollout: {len(prompts)} prompts × group {args.group} = {len(prompts) * args.group} rows, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens (best of {args.repeats})")
    print(f"{'':24}{'sharing off':>14}{'sharing on':>14}{'off/on':>10}")
    print(f"{'prompt prefill s':24}{off['prefill']:>14.3f}{on['prefill']:>14.3f}{ratio(off['prefill'], on['prefill']):>10}")
    print(f"{'prefill share of total':24}{off['prefill'] / off['total']:>14.1%}{on['prefill'] / on['total']:>14.1%}")
    print(f"{'rollout total s':24}{off['total']:>14.3f}{on['total']:>14.3f}{ratio(off['total'], on['total']):>10}")
    print(f"{'prompt tokens reused':24}{off['reused']:>14,}{on['reused']:>14,}   of {on['tokens']:,}")

    # 2. served workload: a common system prompt, distinct short user turns
    system = pieces[-1][: args.system_tokens]
    turns = [tok.encode(f"\n# request {i}: def handle_{i}(x):", add_special_tokens=False).ids
             for i in range(args.requests)]
    requests = [system + t for t in turns]
    rows = max(args.clients, 4)
    served(engine, requests[:2], 1, 2, 0, rows)  # warm-up
    results: dict[float, dict] = {}
    for _ in range(args.repeats):
        for mb in (0.0, 64.0):
            r = served(engine, requests, args.clients, args.max_tokens, mb, rows)
            if mb not in results or r["wall"] < results[mb]["wall"]:
                results[mb] = r
    off, on = results[0.0], results[64.0]
    same = "identical" if off["tokens"] == on["tokens"] else "DIFFERENT"
    print(f"\nserved: {args.requests} requests, {len(system)}-token system prompt + {min(map(len, turns))}-"
          f"{max(map(len, turns))}-token user turns, {args.clients} clients, {rows} rows, {args.max_tokens} new "
          f"tokens, greedy (best of {args.repeats}; greedy tokens {same})")
    print(f"{'':24}{'cache off':>14}{'cache on':>14}{'off/on':>10}")
    print(f"{'median TTFT ms':24}{off['ttft'] * 1e3:>14.1f}{on['ttft'] * 1e3:>14.1f}{ratio(off['ttft'], on['ttft']):>10}")
    print(f"{'prefill s (all)':24}{off['prefill']:>14.3f}{on['prefill']:>14.3f}{ratio(off['prefill'], on['prefill']):>10}")
    print(f"{'wall s':24}{off['wall']:>14.3f}{on['wall']:>14.3f}{ratio(off['wall'], on['wall']):>10}")
    print(f"{'prompt tokens prefilled':24}{off['prefilled']:>14,}{on['prefilled']:>14,}")
    print(f"{'prompt tokens reused':24}{off['reused']:>14,}{on['reused']:>14,}")


if __name__ == "__main__":
    main()
