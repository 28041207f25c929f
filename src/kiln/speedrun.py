"""`kiln speedrun`: every stage in one command — prepare, pretrain, sample, report."""

from __future__ import annotations

import dataclasses
import time

from kiln.config import Config
from kiln.data.pipeline import run_prepare
from kiln.report import write_report
from kiln.serve.engine import Engine
from kiln.workloads.pretrain import run_pretrain


def run_speedrun(cfg: Config) -> None:
    if cfg.data.kind == "images":  # an image recipe: prepare, the classifier and its comparisons
        from kiln.workloads.vision import run_vision_speedrun

        run_vision_speedrun(cfg)
        return
    t0 = time.perf_counter()
    print("== prepare")
    run_prepare(cfg)
    print("== pretrain")
    run_pretrain(cfg)
    print("== sample")
    engine = Engine.from_run(cfg.out, cfg.device)
    samples = []
    for prompt in cfg.sample.report_prompts:
        sc = dataclasses.replace(cfg.sample, prompt=prompt, num_samples=1)
        (completion,) = engine.generate(prompt, sc)
        samples.append((prompt, completion))
        print(f"--- {prompt!r}\n{prompt}{completion}\n")
    path = write_report(cfg.out, samples)
    print(f"== done in {time.perf_counter() - t0:.0f} s; report: {path}")
