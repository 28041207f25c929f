"""`kiln speedrun`: every stage in one command — prepare, pretrain, sample, then the post-training
stages of `speedrun.stages` (SFT, DPO, GRPO, evaluation, serving), and one report.

Each post-training stage is an ordinary run directory under `out` (`out/sft`, `out/dpo`, `out/rl`),
made by the same code as `kiln sft` / `kiln dpo` / `kiln rl` with the stage's own schedule (the
recipe's `train` section is the pretraining schedule); the main report gets a table of what each
stage changed, measured on held-out data, and links to the stages' own reports.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from kiln.config import Config, RLConfig
from kiln.data.pipeline import run_prepare
from kiln.infer.generate import Engine
from kiln.report import write_report, write_section
from kiln.runs import atomic_write_text
from kiln.train.metrics import read_metrics
from kiln.workloads.pretrain import run_pretrain
from kiln.workloads.rl import TASK_REWARDS

SPEEDRUN_RL = {"max_new_tokens": 48, "temperature": 0.8, "prompts_per_step": 8}


def run_speedrun(cfg: Config) -> None:
    if cfg.data.kind == "images":  # an image recipe: prepare, the classifier and its comparisons
        from kiln.workloads.vision import run_vision_speedrun

        run_vision_speedrun(cfg)
        return
    stage_configs(cfg)  # a stage list that cannot run stops now, not after pretraining
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
    del engine
    path = write_section(cfg.out, "samples", sample_lines(samples))
    if cfg.speedrun.stages:
        run_post_training(cfg)
        path = write_report(cfg.out)
    print(f"== done in {time.perf_counter() - t0:.0f} s; report: {path}")


def sample_lines(samples: list[tuple[str, str]]) -> list[str]:
    """The report's "Samples" section: each report prompt with the pretrained model's completion."""
    lines = ["## Samples", ""]
    for prompt, completion in samples:
        lines += ["```python", prompt + completion, "```", ""]
    return lines


# ---- post-training ---------------------------------------------------------------------------------
def _schedule(cfg: Config, steps: int, batch_size: int, lr: float, eval_batches: int, log_every: int = 0):
    """The stage's `train` section: the recipe's, with a short fine-tuning schedule (evaluated at
    step 0, the start, and at the end)."""
    return dataclasses.replace(
        cfg.train, max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
        schedule="cosine", ckpt_every=steps, eval_every=steps, eval_batches=eval_batches,
        log_every=log_every or max(1, steps // 6), freeze=[])


def stage_configs(cfg: Config) -> dict[str, Config]:
    """The Config of each training stage in `speedrun.stages`, chained: SFT from the pretrained run,
    DPO from the SFT model, GRPO from the DPO model (or the SFT model without DPO)."""
    sr, out = cfg.speedrun, Path(cfg.out)
    base = dataclasses.replace(cfg, resume="auto")
    stages: dict[str, Config] = {}
    parent = str(out)
    if "sft" in sr.stages:
        stages["sft"] = dataclasses.replace(base, out=str(out / "sft"), init_from=parent,
                                            train=_schedule(cfg, sr.sft_steps, 8, 1e-3, 8))
        parent = str(out / "sft")
    if "dpo" in sr.stages:
        if "sft" not in sr.stages:
            raise_stage("dpo", "sft")
        stages["dpo"] = dataclasses.replace(
            base, out=str(out / "dpo"), init_from=parent,
            preference=dataclasses.replace(cfg.preference, max_pairs=sr.dpo_pairs),
            train=_schedule(cfg, sr.dpo_steps, 8, 5e-4, max(1, sr.dpo_pairs // 80)))
        parent = str(out / "dpo")
    if "rl" in sr.stages:
        if "sft" not in sr.stages:
            raise_stage("rl", "sft")
        # A chat model's task: its docstrings, rewarded by word F1 against the real ones (partial credit,
        # so groups differ from the first step; the code task needs a model that already writes Python).
        # Short replies at a lower temperature (a 4M-parameter model samples mostly noise at 1.0), eight
        # prompts a step; a value the recipe sets itself is kept.
        rl = cfg.rl
        if not own_rl_task(rl):
            defaults = RLConfig()
            rl = dataclasses.replace(rl, task="docstring", **{k: v for k, v in SPEEDRUN_RL.items()
                                                              if getattr(rl, k) == getattr(defaults, k)})
        stages["rl"] = dataclasses.replace(base, out=str(out / "rl"), init_from=parent, rl=rl,
                                           train=_schedule(cfg, sr.rl_steps, 8, 3e-4, 1, log_every=1))
    return stages


def own_rl_task(rc: RLConfig) -> bool:
    """Whether the recipe gives GRPO prompts, a reward or a reward model of its own (the speedrun's
    docstring-task defaults then stay out of it)."""
    return bool(rc.prompts or rc.reward or rc.reward_model)


def _rel(out: Path, run: str) -> Path:
    return Path(run).relative_to(out) if Path(run).is_relative_to(out) else Path(run)


def raise_stage(stage: str, needs: str) -> None:
    from kiln.config import ConfigError

    raise ConfigError(f"speedrun.stages has {stage!r} without {needs!r}, which it starts from; add {needs!r} "
                      f"or run `kiln {stage}` on a run of your own")


def run_post_training(cfg: Config) -> list[dict]:
    """Run the post-training stages; write the main report's "Post-training" (and "Serving")
    section; return one row per stage."""
    from kiln.workloads.dpo import run_dpo
    from kiln.workloads.rl import run_rl
    from kiln.workloads.sft import run_sft

    runners = {"sft": run_sft, "dpo": run_dpo, "rl": run_rl}
    out = Path(cfg.out)
    rows: list[dict] = []
    for name, scfg in stage_configs(cfg).items():
        t0 = time.perf_counter()
        state = stage_state(scfg)
        if state == "done":
            print(f"== {name}: {scfg.out} already holds its final checkpoint, newer than {scfg.init_from}'s; kept")
            seconds = max((m.get("elapsed_s", 0.0) for m in read_metrics(scfg.out)), default=0.0)
        else:
            if state == "stale":  # made from an older parent: its checkpoints would resume the wrong model
                print(f"== {name}: {scfg.out} was made from an older {scfg.init_from}; starting it afresh")
                shutil.rmtree(scfg.out)
            print(f"== {name}")
            runners[name](scfg)
            seconds = time.perf_counter() - t0
        rows.append({"stage": name, "out": scfg.out, "seconds": seconds, **stage_effect(name, scfg)})
    if "eval" in cfg.speedrun.stages:
        print("== eval")
        from kiln.eval.evaluate import evaluate_run, summary_lines

        t0 = time.perf_counter()
        results = evaluate_run(cfg.out, dataclasses.replace(cfg.eval, path=""), cfg.device)
        for line in summary_lines(results):
            print(f"  {line}")
        rows.append({"stage": "eval", "out": cfg.out, "seconds": time.perf_counter() - t0})
    serving = None
    if "serve" in cfg.speedrun.stages:
        print("== serve")
        from kiln.serve.measure import measure_serving

        t0 = time.perf_counter()
        serving = measure_serving(cfg.out, cfg)
        print(f"  {serving_line(serving)}")
        rows.append({"stage": "serve", "out": cfg.out, "seconds": time.perf_counter() - t0})
    models = compress(cfg, rows)
    atomic_write_text(out / "post_training.json", json.dumps({"stages": rows, "serving": serving, "models": models},
                                                            indent=2))
    write_section(out, "post_training", post_training_lines(out, rows, serving, models), rebuild=False)
    return rows


QUANTIZED = {"int8": {"format": "int8"},
             "int4-g64-gptq": {"format": "int4", "group_size": 64, "method": "gptq", "calib_sequences": 64}}


def compress(cfg: Config, rows: list[dict]) -> list[dict] | None:
    """The `quantize` and `distill` stages: INT8 and INT4 copies of the pretrained model and a
    distilled student (each a run under `out`), then one table row per model (size, bits per byte
    on the same validation windows, decode tokens/s measured in turns, $ per million tokens)."""
    from kiln.eval.compare import compare_decode, model_row
    from kiln.post.quantize import quantize_checkpoint

    out, stages = Path(cfg.out), cfg.speedrun.stages
    runs: dict[str, Path] = {}
    if "quantize" in stages:
        for name, spec in QUANTIZED.items():
            qout = out / name
            t0 = time.perf_counter()
            if run_state(qout, out, None) == "done" and (qout / "quantize.json").is_file():
                print(f"== quantize {name}: {qout} is newer than {out}'s checkpoint; kept")
            else:
                print(f"== quantize {name}")
                shutil.rmtree(qout, ignore_errors=True)
                quantize_checkpoint(out, qout, dataclasses.replace(cfg.quantize, source=str(out), **spec),
                                    device=cfg.device)
            rows.append({"stage": f"quantize {name}", "out": str(qout), "seconds": time.perf_counter() - t0})
            runs[name] = qout
    if "distill" in stages:
        from kiln.config import load as load_config
        from kiln.workloads.distill import distill_into

        sout = out / "student"
        steps = cfg.speedrun.distill_steps
        t0 = time.perf_counter()
        state = run_state(sout, out, steps)
        if state == "done":
            print(f"== distill: {sout} already holds its final checkpoint, newer than {out}'s; kept")
        else:
            print("== distill")
            if state == "stale":
                shutil.rmtree(sout)
            student = load_config(Config, None, [f"model.{kv}" for kv in cfg.speedrun.student]).model
            scfg = dataclasses.replace(cfg, train=_schedule(cfg, steps, cfg.train.batch_size, cfg.train.lr,
                                                            cfg.train.eval_batches))
            kw = {k: v for k, v in dataclasses.asdict(student).items() if k != "preset" and v is not None}
            distill_into(scfg, str(out), str(sout), student.preset, **kw)
        rows.append({"stage": "distill", "out": str(sout), "seconds": time.perf_counter() - t0,
                     **distill_effect(sout)})
        runs["student (distilled)"] = sout
    if not runs:
        return None
    print("== models: size, bits per byte, decode speed, cost")
    runs = {"pretrained": out, **runs}
    speed = compare_decode(runs, rounds=3, device=cfg.device)  # on the device the runs trained on
    data = cfg.data.path or str(out / "data")
    # each on the windows it validated on: the pretrained row reads as its training and its evaluation
    table = [model_row(run, name, data=data, device=cfg.device, usd_per_hour=cfg.serve.usd_per_hour,
                       tokens_per_s=speed[name])
             for name, run in runs.items()]
    for r in table:
        bpb = f"{r['bpb']:.4f}" if r["bpb"] is not None else "—"
        print(f"  {r['model']}: {r['params'] / 1e6:.2f}M params, {r['bytes'] / 1e6:.2f} MB, {bpb} held-out bits/byte, "
              f"{r['decode_tokens_per_s']:.0f} tokens/s, ${r['usd_per_million_tokens']:.3g}/M tokens")
    return table


def distill_effect(run: Path) -> dict:
    metrics = read_metrics(str(run))
    ev = [m for m in metrics if "val_bpb" in m]
    effects = []
    if ev and "val_teacher_bpb" in ev[-1]:
        effects.append(("student's validation bits/byte (the teacher's)",
                        f"{ev[0]['val_bpb']:.3f}", f"{ev[-1]['val_bpb']:.3f} ({ev[-1]['val_teacher_bpb']:.3f})"))
    return {"effects": effects, "steps": _last_step(metrics)}


def stage_state(cfg: Config) -> str:
    """The state of a training stage's run: see `run_state`."""
    return run_state(Path(cfg.out), Path(cfg.init_from), cfg.train.max_steps)


def run_state(run: Path, parent: Path, steps: int | None) -> str:
    """"new" (no checkpoint yet: make it), "done" (its checkpoint of step `steps` (any step when
    None), made after the newest checkpoint of `parent`: a rerun of the speedrun keeps it), "stale"
    (made from an older parent: start afresh) or "partial" (interrupted: resume)."""
    from kiln.train.checkpoint import CheckpointManager

    mine = CheckpointManager(run).latest_intact() if (run / "checkpoints").is_dir() else None
    theirs = CheckpointManager(parent).latest_intact()
    if mine is None or theirs is None:
        return "new"
    if (mine / "checkpoint.json").stat().st_mtime < (theirs / "checkpoint.json").stat().st_mtime:
        return "stale"
    return "done" if steps is None or CheckpointManager.info(mine).get("step") == steps else "partial"


REWARDS = {"code": "the share of functions that parse, are not stubs and pass their doctests",
           "docstring": "word F1 of the docstrings against the real ones"}


def stage_effect(stage: str, cfg: Config) -> dict:
    """What the stage changed, from its metrics.jsonl: each held-out figure at the stage's start
    (step 0, the model it started from) and at its end."""
    run, rc = cfg.out, cfg.rl
    if own_rl_task(rc):
        reward = f"the reward model `{rc.reward_model}`" if rc.reward_model else f"`{rc.reward or TASK_REWARDS[rc.task]}`"
    else:
        reward = REWARDS[rc.task]
    keys = {
        "sft": [("val_loss", "held-out loss on the assistant's tokens (nats/token)", "{:.3f}"),
                ("task_f1", "task: word F1 of greedy replies vs the reference", "{:.3f}")],
        "dpo": [("val_logp_accuracy", "held-out pairs whose chosen reply the policy finds likelier", "{:.1%}"),
                ("val_rewards_accuracy", "held-out implicit-reward accuracy", "{:.1%}")],
        "rl": [("val_reward", f"held-out reward of greedy replies: {reward}", "{:.3f}")],
    }[stage]
    metrics = read_metrics(run)
    effects = []
    for key, label, fmt in keys:
        ev = [m for m in metrics if key in m]
        if not ev:
            continue
        # task_f1 is measured once, at the end, beside the base model's; the others at step 0 and the end
        first = ev[-1]["base_task_f1"] if key == "task_f1" else ev[0][key]
        effects.append((label, fmt.format(first), fmt.format(ev[-1][key])))
    return {"effects": effects, "steps": _last_step(metrics)}


def _last_step(metrics: list[dict]) -> int:
    return max((m.get("step", 0) for m in metrics), default=0)


def serving_line(s: dict) -> str:
    return (f"{s['queries']} queries on {s['device']}: median time to first token {1000 * s['ttft_s']:.0f} ms, "
            f"latency {1000 * s['latency_s']:.0f} ms, {s['decode_tokens_per_s']:.0f} tokens/s alone, "
            f"{s['batched_tokens_per_s']:.0f} tokens/s batched; ${s['usd_per_query']:.2e} per query, "
            f"${s['usd_per_million_tokens']:.3f} per million tokens at ${s['usd_per_hour']:.2f}/hour")


STAGE_TITLES = {"sft": "SFT", "dpo": "DPO", "rl": "GRPO", "eval": "Evaluation", "serve": "Serving"}


def post_training_lines(out: Path, rows: list[dict], serving: dict | None, models: list[dict] | None = None) -> list[str]:
    lines: list[str] = []
    trained = [r for r in rows if r["stage"] in ("sft", "dpo", "rl")]
    if trained:
        chain = " → ".join(["pretrained", *(STAGE_TITLES[r["stage"]] for r in trained)])
        lines += ["## Post-training", "",
                  f"Each stage starts from the one before ({chain}) with a short schedule of its own; every figure "
                  "is on held-out data, at the stage's step 0 (the model it started from) and at its end.", "",
                  "| stage | steps | seconds | held-out figure | start | end |", "|---|---:|---:|---|---:|---:|"]
    for r in trained:
        name = f"[{STAGE_TITLES[r['stage']]}]({_rel(out, r['out'])}/report.md)"
        effects = r.get("effects") or [("(no evaluation logged)", "—", "—")]
        for i, (label, before, after) in enumerate(effects):
            head = f"| {name} | {r['steps']} | {r['seconds']:.0f} |" if i == 0 else "| | | |"
            lines.append(f"{head} {label} | {before} | {after} |")
    if trained:
        lines.append("")
        grpo = [r for r in trained if r["stage"] == "rl" and (Path(r["out"]) / "rl_reward.png").is_file()]
        if grpo:
            lines += [f"![GRPO: rollout and held-out reward]({_rel(out, grpo[0]['out'])}/rl_reward.png)", ""]
    from kiln.train.report import plan_vs_measured_table

    runs = [("pretrain", out, ".")] + [(STAGE_TITLES.get(r["stage"], r["stage"]), Path(r["out"]), str(_rel(out, r["out"])))
                                       for r in rows if r["stage"] in ("sft", "dpo", "rl", "distill")]
    lines += plan_vs_measured_table(runs)
    if models:
        from kiln.eval.compare import format_rows

        distilled = [r for r in rows if r["stage"] == "distill"]
        lines += ["## Compression", "",
                  "The pretrained model quantized (weights only: INT8 per output channel, INT4 in groups of 64 "
                  "calibrated by GPTQ) and distilled into a smaller student"
                  + (f" ({distilled[0]['steps']} steps on the same data, [report]({_rel(out, distilled[0]['out'])}/report.md))"
                     if distilled else "")
                  + "; held-out bits per byte on the windows each run validated on (for the pretrained model its "
                  "final validation and the evaluation above: one figure), decode at batch 1 measured "
                  "in turns on "
                  f"{models[0]['device']}, cost at ${models[0]['usd_per_hour']:.2f}/hour:", "", format_rows(models), ""]
    if serving:
        lines += ["## Serving", "",
                  f"The pretrained model through kiln's engine (`kiln serve` uses the same), greedy, "
                  f"{serving['queries']} report prompts × up to the recipe's `sample.max_new_tokens`, in a fresh "
                  "process as `kiln serve` runs it (its engine thread loads and decodes the model), sampling and "
                  "text streaming included:", "",
                  f"- alone (one query at a time): median time to first token **{1000 * serving['ttft_s']:.0f} ms**, "
                  f"latency **{1000 * serving['latency_s']:.0f} ms** per query, "
                  f"{serving['decode_tokens_per_s']:.0f} decode tokens/s",
                  f"- together through the continuous batcher: {serving['batched_tokens_per_s']:.0f} tokens/s",
                  f"- cost at ${serving['usd_per_hour']:.2f}/hour for the {serving['device']} host (`serve.usd_per_hour`; "
                  f"an assumption, not a quote): **${serving['usd_per_query']:.2e} per query**, "
                  f"${serving['usd_per_million_tokens']:.3f} per million generated tokens", ""]
    return lines

