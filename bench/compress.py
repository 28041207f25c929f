"""Quantization and distillation, measured: bytes, bits per byte, decode speed, and the student's gap.

1. A teacher: the quickstart model (`recipes/quickstart.yaml`: mini preset on the standard library).
2. `kiln quantize`: INT8 per channel; INT4 by round-to-nearest and by GPTQ at group sizes 32, 64 and
   128. For each: bytes on disk as a share of the fp16 weights, validation bits per byte and its
   change against the float model (the same windows for all), decode tokens/s at batch 1 on this
   CPU (fp32 activations; best of several runs, so other load only ever slows a row down).
3. `kiln distill`: a student with ≤ 1/4 of the teacher's parameters trained from scratch (`kiln
   pretrain`) and by distillation (`kiln distill`) on the same tokens (same steps, batches, seed);
   the share of the scratch student's bits-per-byte gap to the teacher that distillation closes.
   Then the teacher's cost per step: logits on the fly vs the top-k cache, cold and warm.

Every stage is skipped when its output is already in --work, so an interrupted run continues.

    python bench/compress.py                       # everything, in runs/bench-compress
    python bench/compress.py --threads 1 --steps 200 --skip-distill
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/quickstart.yaml"
TRAIN = ["train.tensorboard=false", "train.progress=false"]


def kiln(*args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    print(f"$ kiln {' '.join(args)}", flush=True)
    p = subprocess.run([sys.executable, "-m", "kiln", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"kiln {args[0]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    print(f"  ({time.perf_counter() - t0:.0f} s) {p.stdout.strip().splitlines()[-1][:200]}", flush=True)


def done(run: Path, step: int) -> bool:
    return (run / "checkpoints" / f"step_{step:07d}" / "checkpoint.json").is_file()


def last_eval(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_bpb" in r][-1]


def step_speed(run: Path) -> float:
    """Median training tokens/s over the run's log lines."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)


WIDE = ["model.preset=mini", "model.d_model=1024", "model.n_heads=16", "model.n_kv_heads=4", "model.n_layers=4"]


def wide_decode(work: Path, teacher: Path, rounds: int, threads: int) -> dict:
    """Decode speed where the weights no longer fit the caches: a 48.5M-parameter model (d_model
    1024, 4 layers; two training steps, since speed does not depend on the weights) in fp32, INT8
    and INT4, on 1 and on `threads` threads. The quickstart model's 256-wide matrices sit in cache,
    where a quantized matmul's fixed cost exceeds what it saves in bytes (see KERNEL_MIN_ELEMENTS)."""
    from kiln.eval.compare import compare_decode

    wide = work / "wide"
    if not done(wide, 2):
        kiln("pretrain", f"out={wide}", f"data.path={teacher / 'data'}", *WIDE, "train.max_steps=2",
             "train.batch_size=2", "train.seq_len=256", "train.eval_batches=1", "train.warmup_steps=1", *TRAIN,
             threads=threads)
    runs = {"fp32": wide}
    for name, extra in (("int8", []), ("int4-g64", ["format=int4", "group_size=64"])):
        runs[name] = work / f"wide-{name}"
        if not (runs[name] / "quantize.json").is_file():
            kiln("quantize", f"source={wide}", f"out={runs[name]}", "eval_batches=2", *extra, threads=threads)
    out = {}
    print("\n## Decode at batch 1 on a wider model (d_model 1024, 4 layers, 48.5M parameters)\n")
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        speed = compare_decode(runs, rounds=rounds)
        out[n] = speed
        print(f"- {n} thread{'s' if n > 1 else ''}: " + ", ".join(
            f"{k} {v:.0f} tokens/s ({v / speed['fp32']:.2f}×)" for k, v in speed.items()))
    torch.set_num_threads(threads)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "runs" / "bench-compress"))
    ap.add_argument("--steps", type=int, default=400, help="training steps of the teacher and of each student")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for training and decoding")
    ap.add_argument("--eval-batches", type=int, default=32, help="validation batches (8 × 256 tokens) per score")
    ap.add_argument("--student", default="model.preset=tiny,model.d_model=128,model.n_heads=4,model.n_kv_heads=2",
                    help="the student's model.* overrides, comma-separated")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=8, help="decode timing rounds (the models take turns)")
    ap.add_argument("--skip-quantize", action="store_true")
    ap.add_argument("--skip-distill", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    teacher = work / "teacher"
    t = args.threads
    results: dict = {"threads": args.threads, "steps": args.steps}

    if not done(teacher, args.steps):
        kiln("pretrain", "-c", RECIPE, f"out={teacher}", f"train.max_steps={args.steps}",
             f"train.ckpt_every={args.steps}", f"train.eval_every={args.steps}", *TRAIN, threads=t)

    if not args.skip_quantize:
        from kiln.eval.compare import compare_decode, format_rows, model_row
        from kiln.model.config import ModelConfig
        from kiln.model.quant import GROUP_SIZES, matrix_names, matrix_shape

        mc = ModelConfig.from_dict(json.loads(
            (teacher / "checkpoints" / f"step_{args.steps:07d}" / "checkpoint.json").read_text())["model"])
        inputs = {matrix_shape(mc, n)[1] for n in matrix_names(mc)}
        groups = [g for g in GROUP_SIZES[:3] if all(k % g == 0 for k in inputs)]
        print(f"int4 group sizes that divide every input size of the teacher ({sorted(inputs)}): {groups}")
        variants = {"int8": ["format=int8"]}
        for g in groups:
            for method in ("rtn", "gptq"):
                variants[f"int4-g{g}-{method}"] = ["format=int4", f"group_size={g}", f"method={method}"]
        figures = {}
        for name, extra in variants.items():
            out = work / name
            if not (out / "quantize.json").is_file():
                kiln("quantize", f"source={teacher}", f"out={out}", f"eval_batches={args.eval_batches}", *extra, threads=t)
            figures[name] = json.loads((out / "quantize.json").read_text())
        first = next(iter(figures.values()))
        print(f"\n## Quantization (validation over the same {first['eval_tokens']:,} tokens; bytes on disk as a share "
              "of the fp16 weights)\n")
        print("| model | % of fp16 | bits/byte | change | KL from fp32 (nats/token) | same top token | seconds |\n"
              "|---|---:|---:|---:|---:|---:|---:|")
        print(f"| fp32 (teacher) | 200.0% | {first['bpb_before']:.4f} | — | — | — | — |")
        for name, f in figures.items():
            print(f"| {name} | {100 * f['fp16_share']:.1f}% | {f['bpb_after']:.4f} | {100 * f['bpb_increase']:+.3f}% | "
                  f"{f['kl_to_float']:.2e} | {100 * f['top1_agreement']:.1f}% | {f['seconds']} |")
        results["quantize"] = figures
        runs = {"teacher": teacher, **{n: work / n for n in ("int8", f"int4-g{groups[0]}-gptq", f"int4-g{groups[-1]}-gptq")}}
        speed = compare_decode(runs, rounds=args.rounds)
        rows = [model_row(run, name, heldout=False, tokens_per_s=speed[name]) for name, run in runs.items()]
        for row in rows:
            row["bpb"] = figures[row["model"]]["bpb_after"] if row["model"] in figures else first["bpb_before"]
        print(f"\n## Decode at batch 1 on this CPU ({args.threads} threads; best of {args.rounds} rounds taken in turns)\n")
        print(format_rows(rows))
        base = rows[0]["decode_tokens_per_s"]
        print("\n" + ", ".join(f"{r['model']}: {r['decode_tokens_per_s'] / base:.2f}× fp32" for r in rows[1:]))
        results["rows"] = rows
        results["wide_decode"] = wide_decode(work, teacher, args.rounds, t)

    if not args.skip_distill:
        student = args.student.split(",")
        base = [f"data.path={teacher / 'data'}", *student, *TRAIN]

        def steps(n: int) -> list[str]:
            return [f"train.max_steps={n}", f"train.ckpt_every={n}", f"train.eval_every={n}"]

        common = [*base, *steps(args.steps)]
        scratch, distilled = work / "student-scratch", work / f"student-kd-a{args.alpha:g}-t{args.temperature:g}"
        if not done(scratch, args.steps):
            kiln("pretrain", "-c", RECIPE, f"out={scratch}", *common, threads=t)
        if not done(distilled, args.steps):
            kiln("distill", "-c", RECIPE, f"out={distilled}", f"distill.teacher={teacher}", f"distill.alpha={args.alpha}",
                 f"distill.temperature={args.temperature}", *common, threads=t)
        s, d = last_eval(scratch), last_eval(distilled)
        tb = d["val_teacher_bpb"]
        info = json.loads((distilled / "checkpoints" / f"step_{args.steps:07d}" / "checkpoint.json").read_text())
        from kiln.model.config import ModelConfig

        sp = ModelConfig.from_dict(info["model"]).num_params()
        tp = ModelConfig.from_dict(json.loads(
            (teacher / "checkpoints" / f"step_{args.steps:07d}" / "checkpoint.json").read_text())["model"]).num_params()
        closed = (s["val_bpb"] - d["val_bpb"]) / (s["val_bpb"] - tb)
        print(f"\n## Distillation ({args.steps} steps each, the same batches)\n")
        print("| model | parameters | validation bits/byte |\n|---|---:|---:|")
        print(f"| teacher | {tp / 1e6:.2f}M | {tb:.4f} |")
        print(f"| student from scratch | {sp / 1e6:.2f}M ({sp / tp:.2f}×) | {s['val_bpb']:.4f} |")
        print(f"| student distilled (α {args.alpha:g}, T {args.temperature:g}) | {sp / 1e6:.2f}M | {d['val_bpb']:.4f} |")
        print(f"\ndistillation closes {100 * closed:.0f}% of the scratch student's gap to the teacher")
        results["distill"] = {"teacher_bpb": tb, "scratch_bpb": s["val_bpb"], "distilled_bpb": d["val_bpb"],
                              "gap_closed": closed, "student_params": sp, "teacher_params": tp}

        timing_steps = max(20, args.steps // 8)
        cache = work / "teacher-cache"
        kd = ["distill", "-c", RECIPE, f"distill.teacher={teacher}", f"distill.alpha={args.alpha}"]
        cached = [*kd, "distill.teacher_logits=cached", f"distill.cache_dir={cache}"]
        speeds = {}
        for label, verb, out in (("student alone (kiln pretrain)", ["pretrain", "-c", RECIPE], work / "time-scratch"),
                                 ("teacher logits online", kd, work / "time-online"),
                                 ("top-k cache, cold (the teacher scores each window)", cached, work / "time-cache-cold"),
                                 ("top-k cache, warm (every window read back)", cached, work / "time-cache-warm")):
            if not done(out, timing_steps):
                if out.name == "time-cache-cold":
                    shutil.rmtree(cache, ignore_errors=True)  # cold: every window scored by the teacher
                kiln(*verb, f"out={out}", *base, *steps(timing_steps), threads=t)
            speeds[label] = step_speed(out)
        per_token = sum(f.stat().st_size for f in cache.glob("*.npy") if f.name != "filled.npy")
        print(f"\n## Teacher logits: on the fly vs the top-k cache ({timing_steps} steps each, back to back; "
              "training tokens/s, median of the log lines)\n")
        for label, v in speeds.items():
            print(f"- {label}: {v:,.0f} tokens/s")
        print(f"- cache on disk: {sum(f.stat().st_blocks * 512 for f in cache.glob('*.npy')) / 1e6:.0f} MB used "
              f"(sparse files of {per_token / 1e9:.1f} GB for the whole training split)")
        results["teacher_logits"] = speeds
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {work / 'results.json'}")


if __name__ == "__main__":
    main()
