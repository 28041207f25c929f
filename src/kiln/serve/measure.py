"""Serving figures for a run, for `kiln speedrun`'s report: latency and decode speed of each prompt
alone, throughput of all together through the continuous batcher, and the cost per query."""

from __future__ import annotations

import statistics
import time
from functools import partial
from pathlib import Path

from kiln.config import Config
from kiln.hardware import in_fresh_process, usd_per_hour
from kiln.infer.engine import SamplingParams, Sequence
from kiln.infer.generate import Engine
from kiln.serve.scheduler import Scheduler


def measure_serving(run_dir: str | Path, cfg: Config, prompts: list[str] | None = None) -> dict:
    """Serving figures for a run (for `kiln speedrun`'s report): each prompt alone (time to first
    token, latency and decode tokens/s per query), then all together through the continuous
    batcher (tokens/s), and the cost per query and per million generated tokens at
    `serve.usd_per_hour`.

    Measured in a fresh process that loads, steps and samples the model on its engine thread, as
    `kiln serve` does: a process that has trained (the speedrun's) keeps an OpenMP thread pool on
    its main thread, beside which a small model decodes on another thread at about half its speed
    (`kiln.serve.scheduler`), a figure no server would show."""
    return in_fresh_process(_measure, str(run_dir), cfg, prompts)


def _measure(run_dir: str, cfg: Config, prompts: list[str] | None) -> dict:
    sv = cfg.serve
    prompts = prompts or list(cfg.sample.report_prompts)
    params = SamplingParams(max_new_tokens=cfg.sample.max_new_tokens, temperature=0.0)
    load = partial(Engine.from_run, run_dir, cfg.device, sv.dtype)
    with Scheduler(load, max_batch=max(len(prompts), 1), max_queue=len(prompts)) as sched:
        engine = sched.engine

        def one(prompt: str) -> Sequence:
            return Sequence(engine.encode_prompt(prompt)[: engine.context - 1], params, engine.tokenizer)

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
