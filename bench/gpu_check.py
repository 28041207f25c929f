"""The first thing to run on a GPU: what kiln has never run on CUDA, checked and measured in minutes.

Each check runs kiln's own code (the CLI in-process, `kiln.infer.load.load`, `kiln.infer.generate`,
the engine's `Scheduler`, `kiln serve` in a subprocess) and ends as `ok`, `FAILED` or `skipped
(needs GPU)`, with its figures; a final table lists them all:

- pretrain   a small pretrain with the defaults (on CUDA: compiled blocks, bf16 autocast, fused
             AdamW) and again with `train.compile=off`: losses close, the MFU line names the card
             and its peak, peak memory within the card
- plan       that pretrain's peak memory against `kiln plan`'s estimate (`estimate_training_memory`)
- quantized  `kiln quantize` INT8 and INT4 runs generating on the device in the default dtype
             (bf16 on CUDA; on a CPU, bf16 too, which is the dtype CUDA picks)
- tf32       whether kiln turns TF32 on, and the fp32 matmul rate with it off and on (CUDA only)
- serve      `kiln serve` of the float and the INT4 run with the defaults (on CUDA: bf16, the decode
             step compiled), with no CUDA toolkit in its environment: /health, /v1/models, a completion
- attention  the SDPA backend that runs for grouped-query attention with a document mask (SFT's
             packing), a padding mask and none, and the memory of forward + backward at T=2048
- decode     batch-1 decode tokens/s: kiln eager, kiln compiled, `transformers` on the same
             weights; greedy tokens identical (exactly so in fp32). A compiled step that falls
             back to eager (kiln says so in one line) fails this check, `serve` and `batching`
- batching   32 clients through the engine's scheduler at once vs one at a time
- quant-decode  INT8 / INT4 vs float decode tokens/s on the device
- speedrun   `kiln speedrun` (pretrain, sample, SFT, [DPO,] distillation teacher + student) in one
             process with `train.compile=on`

The checks run in a worker process that the script watches: a check that overruns its time is
stopped (the worker is killed and a fresh one goes on with the next check), and a total budget
(`--budget`, 470 s on a GPU) bounds the whole run, so it never hangs; a SIGTERM (a hard
`timeout`) stops the worker and still prints the table. Without CUDA (or with
`--cpu`) every check runs at tiny shapes in a minute or two, and the figures only a GPU can give
are marked "needs GPU" (`tests/test_gpu_check.py` runs it so in `make test`).

    python -P bench/gpu_check.py                        # on the GPU machine: ~5-8 minutes
    python -P bench/gpu_check.py --json gpu_check.json --out /tmp/gpu-check   # keep the runs and the table
    python -P bench/gpu_check.py --cpu --quick          # the CPU mode, as the tests run it
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OK, FAILED, SKIPPED = "ok", "FAILED", "skipped (needs GPU)"
NEEDS_GPU = "needs GPU"  # marks a figure that means something only on a GPU

# name: (what it checks, seconds it may take on a GPU, on a CPU). Run in this order: the cheap and
# the crash checks first; the speedrun (several models compiled one after another, minutes on a
# GPU) last, with what the budget leaves (its failure is also shown on a CPU by tests/test_compile.py).
CHECKS: dict[str, tuple[str, int, int]] = {
    "pretrain": ("defaults (compile, bf16, fused AdamW) vs compile off", 200, 150),
    "plan": ("peak training memory vs `kiln plan`", 60, 60),
    "quantized": ("INT8 / INT4 generate on the device, default dtype", 90, 90),
    "tf32": ("TF32 on/off fp32 matmul rate", 60, 30),
    "serve": ("`kiln serve` start-up (float, INT4), no CUDA toolkit", 180, 120),
    "attention": ("SDPA backend for masked GQA, memory at T=2048", 90, 60),
    "decode": ("decode tokens/s: compiled vs eager vs transformers", 150, 120),
    "batching": ("continuous batching, 32 clients", 120, 90),
    "quant-decode": ("INT8 / INT4 vs float decode tokens/s", 90, 60),
    "speedrun": ("several compiled models in one process", 240, 200),
}

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self", "for i in range(",
           "# parse the", "def main():\n    args =", "with open(path) as f:", "try:\n    import json"]


class CheckFailed(Exception):
    """A check's own verdict: what went wrong, in one line."""


class Interrupted(Exception):
    """SIGTERM (a hard timeout) reached the watching process."""


def _interrupted(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def load_bench(name: str):
    """A sibling bench script as a module (without putting bench/ on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"kiln_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- the worker: runs the checks, one JSON event per line into a file the parent reads ----------
class Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


@contextlib.contextmanager
def stderr_seen():
    """What is written to sys.stderr meanwhile (from any thread), still shown in the log."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(Tee(sys.stderr, buf)):
        yield buf


def eager_fallbacks(text: str) -> list[str]:
    """kiln's one-line notes that a compiled decode step did not compile and decodes eagerly."""
    return [ln.strip() for ln in text.splitlines() if "did not compile" in ln]


class Ctx:
    """What the checks share: the device, the shapes, the runs on disk (found again by a restarted worker)."""

    def __init__(self, args) -> None:
        import torch

        from kiln.train.parallel import pick_device

        self.torch = torch
        self.out = Path(args.out)
        self.cuda = not args.cpu and torch.cuda.is_available()
        self.device = pick_device("auto") if self.cuda else torch.device("cpu")
        self.device_arg = "auto" if self.cuda else "cpu"
        self.quick = args.quick
        gpu_shapes = args.shapes == "gpu" or (args.shapes == "auto" and self.cuda)
        # GPU: the `small` preset (11M parameters, grouped-query heads); CPU: `tiny` at a short context.
        if gpu_shapes:
            self.preset, self.vocab, self.seq, self.batch = "small", 4096, 256, 16
            self.steps = 20 if args.quick else 40
            self.log_every, self.eval_batches, self.new_tokens, self.rounds = 5, 4, 128, 2 if args.quick else 3
            self.stages = "sft,dpo,distill"
        else:
            self.preset, self.vocab, self.seq, self.batch = "tiny", 512, 128, 4
            self.steps = 6 if args.quick else 8
            self.log_every, self.eval_batches, self.new_tokens, self.rounds = 2, 2, 32, 2
            self.stages = "sft,distill"  # DPO's policy + reference as well on a GPU (seconds there, not here)
        self.steps = args.steps or self.steps
        self.engines: dict = {}
        self._prepared = False
        if not self.cuda:
            # On a CPU, inductor would spend minutes in the C++ compiler: blocks compile with dynamo's
            # eager backend (the same tracing, guards and cache entries, no code generated).
            from kiln.train import parallel

            if hasattr(parallel, "COMPILE_BACKEND"):
                parallel.COMPILE_BACKEND = "eager"

    # ---- running kiln --------------------------------------------------------------------------
    def kiln(self, *args: str) -> str:
        """`kiln ARGS` in this process; its stdout and stderr (also in the log); raises on a non-zero exit."""
        from kiln import cli

        buf = io.StringIO()
        with contextlib.redirect_stdout(Tee(sys.stdout, buf)), contextlib.redirect_stderr(Tee(sys.stderr, buf)):
            rc = cli.main(list(args))
        text = buf.getvalue()
        if rc != 0:
            said = [ln for ln in text.splitlines() if "error" in ln.lower()] or text.splitlines()[-3:]
            raise CheckFailed(f"kiln {args[0]} exited {rc}: {' / '.join(said)[-400:]}")
        return text

    def train_args(self, steps: int | None = None) -> list[str]:
        steps = steps or self.steps
        return [f"device={self.device_arg}", f"model.preset={self.preset}", f"train.seq_len={self.seq}",
                f"train.batch_size={self.batch}", f"train.max_steps={steps}", f"train.eval_every={steps}",
                f"train.ckpt_every={steps}", f"train.eval_batches={self.eval_batches}",
                f"train.log_every={min(self.log_every, max(1, steps // 4))}", f"train.warmup_steps={max(1, steps // 5)}",
                "train.tensorboard=false", "train.progress=false"]

    @property
    def compile_note(self) -> str:
        return "" if self.cuda else " (dynamo's eager backend on CPU: inductor's code " + NEEDS_GPU + ")"

    # ---- runs on disk --------------------------------------------------------------------------
    def corpus(self) -> Path:
        """Real Python: four packages of this interpreter's standard library (~850 kB)."""
        d = self.out / "corpus"
        if not d.is_dir():
            tmp = self.out / "corpus.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            stdlib = Path(sysconfig.get_paths()["stdlib"])
            for pkg in ("json", "email", "http", "logging"):
                for f in sorted((stdlib / pkg).glob("*.py")):
                    (tmp / f"{pkg}_{f.name}").write_bytes(f.read_bytes())
            tmp.rename(d)
        return d

    def prepare_args(self) -> list[str]:
        return [f"data.input={self.corpus()}", f"data.tokenizer.vocab_size={self.vocab}", "data.val_fraction=0.1"]

    def prepared(self) -> Path:
        """The prepared data and tokenizer (once per worker: `kiln prepare` skips what is up to date,
        and finishes what a killed worker left half done)."""
        p = self.out / "prepared"
        if not self._prepared:
            self.kiln("prepare", f"out={p}", *self.prepare_args())
            self._prepared = True
        return p

    def new_run(self, name: str) -> Path:
        """A fresh run directory holding a copy of the prepared data and tokenizer."""
        src, run = self.prepared(), self.out / name
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        shutil.copytree(src / "data", run / "data")
        shutil.copytree(src / "tokenizer", run / "tokenizer")
        return run

    def base_run(self) -> Path:
        """The float run the inference checks load: the pretrain check's (defaults), else its
        compile-off twin, else one trained now with compile off."""
        for name in ("pretrain-defaults", "pretrain-compile-off", "pretrain-fallback"):
            if any((self.out / name / "checkpoints").glob("step_*/checkpoint.json")):
                return self.out / name
        run = self.new_run("pretrain-fallback")
        self.kiln("pretrain", f"out={run}", *self.train_args(), "train.compile=off")
        return run

    def quantized(self, fmt: str) -> Path:
        q = self.out / fmt
        if not (q / "quantize.json").is_file():
            shutil.rmtree(q, ignore_errors=True)
            self.kiln("quantize", f"source={self.base_run()}", f"out={q}", f"format={fmt}", "evaluate=false")
        return q

    def engine(self, run: Path):
        """One `Engine` per run for the whole worker: compiled decode steps are kept per model."""
        from kiln.infer.generate import Engine

        if run not in self.engines:
            self.engines[run] = Engine.from_run(run, self.device_arg)
        return self.engines[run]

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def metric_rows(run: Path) -> list[dict]:
    from kiln.train.metrics import read_metrics

    return [m for m in read_metrics(run) if "loss" in m]


def steady(rows: list[dict], key: str) -> float:
    """The median of `key` over the second half of the log lines (the first include compile time)."""
    vals = [r[key] for r in rows[len(rows) // 2:] if key in r]
    return statistics.median(vals) if vals else float("nan")


def gb(x: float) -> str:
    return f"{x:.2f} GB" if x >= 1 else f"{1000 * x:.0f} MB"


# ---- the checks: each returns (result, figures) or raises ---------------------------------------
def check_pretrain(ctx: Ctx) -> tuple[str, str]:
    import math

    from kiln.config import TrainConfig
    from kiln.hardware import datasheet_peak
    from kiln.model.config import preset
    from kiln.model.transformer import Transformer
    from kiln.train.metrics import read_metrics
    from kiln.train.optim import build_optimizer

    torch = ctx.torch
    runs, texts, secs = {}, {}, {}
    ctx.prepared()  # not in the first run's time
    # the defaults: on CUDA compile auto = on and precision auto = bf16; on a CPU compile is forced on
    for label, extra in (("defaults", [] if ctx.cuda else ["train.compile=on"]), ("compile-off", ["train.compile=off"])):
        run = ctx.new_run(f"pretrain-{label}")
        t0 = time.perf_counter()
        texts[label] = ctx.kiln("pretrain", f"out={run}", *ctx.train_args(), *extra)
        secs[label], runs[label] = time.perf_counter() - t0, metric_rows(run)
    problems, figures = [], []
    a, b = runs["defaults"], runs["compile-off"]
    pairs = [(x["loss"], y["loss"]) for x, y in zip(a, b) if x["step"] == y["step"]]
    if not pairs or not all(math.isfinite(x) and math.isfinite(y) for x, y in pairs):
        problems.append("losses missing or not finite")
    else:
        worst = max(abs(x - y) / abs(y) for x, y in pairs)
        tol = 0.05 if ctx.cuda else 1e-3
        figures.append(f"loss {pairs[0][0]:.3f}→{pairs[-1][0]:.3f} (compile off {pairs[-1][1]:.3f}), "
                       f"largest step difference {100 * worst:.2f}%")
        if worst > tol:
            problems.append(f"losses differ by {100 * worst:.1f}% (> {100 * tol:g}%)")
    val = [m["val_loss"] for m in read_metrics(ctx.out / "pretrain-defaults") if "val_loss" in m]
    if len(val) < 2 or not val[-1] < val[0]:
        problems.append(f"the validation loss did not fall ({val})")
    else:
        figures.append(f"validation loss {val[0]:.3f}→{val[-1]:.3f}")
    figures.append(f"wall {secs['defaults']:.0f} s vs {secs['compile-off']:.0f} s compile off; steady "
                   f"{steady(a, 'tokens_per_s'):,.0f} vs {steady(b, 'tokens_per_s'):,.0f} tok/s, MFU "
                   f"{100 * steady(a, 'mfu'):.1f}% vs {100 * steady(b, 'mfu'):.1f}%")
    line = next((ln for ln in texts["defaults"].splitlines() if "MFU is measured against" in ln), "")
    if not line:
        problems.append("no MFU line")
    peak_note = line.split("MFU is measured against", 1)[-1].strip()
    peak_figure = peak_note.split(" per device")[0]
    if ctx.cuda:
        name = torch.cuda.get_device_name(ctx.device)
        known = datasheet_peak(name)
        card = known[1] if known else name
        figures.append(f"MFU line: {peak_note}")
        if card not in line:
            problems.append(f"the MFU line does not name the card ({name!r}, key {card!r})")
        if "bf16" not in line:
            problems.append("the MFU peak is not the bf16 one")
    else:
        figures.append(f"MFU against {peak_figure}, this CPU's fp32 matmul peak (the card's name and datasheet "
                       f"peak: {NEEDS_GPU})")
    model = Transformer(preset("tiny", vocab_size=64)).to(ctx.device)
    fused = build_optimizer(model, TrainConfig()).defaults.get("fused")
    figures.append(f"AdamW fused: {fused}")
    if ctx.cuda and not fused:
        problems.append("AdamW is not fused on CUDA")
    mem = max((r.get("memory_gb", 0.0) for r in a), default=0.0)
    if ctx.cuda:
        total = torch.cuda.get_device_properties(ctx.device).total_memory / 1e9
        figures.append(f"peak memory {gb(mem)} of the card's {total:.0f} GB")
        if not 0 < mem < total:
            problems.append(f"peak memory {mem:.2f} GB not within the card's {total:.0f} GB")
    else:
        figures.append(f"peak RSS {gb(mem)} (the card's memory: {NEEDS_GPU})")
    figures.append(f"compile on{ctx.compile_note}")
    if problems:
        raise CheckFailed("; ".join(problems) + " | " + "; ".join(figures))
    return OK, "; ".join(figures)


def check_plan(ctx: Ctx) -> tuple[str, str]:
    from kiln.infer.load import open_checkpoint
    from kiln.plan import estimate_training_memory

    run = ctx.base_run()
    mc = open_checkpoint(run).model
    lo, hi = 0.67, 1.5
    if ctx.cuda:
        figures, bad = [], []
        est = estimate_training_memory(mc, ctx.batch, ctx.seq, "bf16")["total"]
        for name in ("pretrain-compile-off", "pretrain-defaults"):
            rows = metric_rows(ctx.out / name) if (ctx.out / name).is_dir() else []
            got = 1e9 * max((r.get("memory_gb", 0.0) for r in rows), default=0.0)
            if got <= 0:
                continue
            figures.append(f"{name.removeprefix('pretrain-')}: measured {gb(got / 1e9)}, plan {gb(est / 1e9)} "
                           f"(plan/measured {est / got:.2f})")
            if name == "pretrain-compile-off" and not lo <= est / got <= hi:
                bad.append(f"plan/measured {est / got:.2f} outside {lo}-{hi}")
        if not figures:
            raise CheckFailed("no pretrain run with a memory figure (the pretrain check failed?)")
        figures.append(f"bf16, {ctx.batch}×{ctx.seq}, torch.cuda.max_memory_allocated over the run")
        if bad:
            raise CheckFailed("; ".join(bad + figures))
        return OK, "; ".join(figures)
    # CPU: one training step's peak, measured as bench/scaling.py does (live state + the allocator's peak)
    import torch

    from kiln.config import TrainConfig
    from kiln.model.transformer import Transformer
    from kiln.train.optim import build_optimizer

    scaling = load_bench("scaling")
    torch.manual_seed(0)
    model = Transformer(mc)
    model.init_weights(0)
    opt = build_optimizer(model, TrainConfig())
    step = scaling.step_fn(model, opt, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    xy = torch.randint(0, mc.vocab_size, (ctx.batch, ctx.seq + 1))
    x, y = xy[:, :-1], xy[:, 1:]
    step(x, y)  # the optimizer's state exists from here on
    got = scaling.measured_peak(step, x, y, model, opt)
    est = estimate_training_memory(mc, ctx.batch, ctx.seq, "fp32")["total"]
    text = (f"fp32 step {ctx.batch}×{ctx.seq}: measured {gb(got / 1e9)}, plan {gb(est / 1e9)} (plan/measured "
            f"{est / got:.2f}); the bf16 run on the card: {NEEDS_GPU}")
    if not lo <= est / got <= hi:
        raise CheckFailed(f"plan/measured {est / got:.2f} outside {lo}-{hi}: {text}")
    return OK, text


def check_quantized(ctx: Ctx) -> tuple[str, str]:
    from kiln.config import SampleConfig
    from kiln.infer.generate import Engine, generate, greedy
    from kiln.infer.load import pick_dtype

    figures, problems = [], []
    dtypes = ["auto"] if ctx.cuda else ["auto", "bf16"]  # bf16: the dtype `auto` picks on CUDA
    for fmt in ("int8", "int4"):
        q = ctx.quantized(fmt)
        for dt in dtypes:
            try:
                eng = Engine.from_run(q, ctx.device_arg, dt)
                act = pick_dtype(dt, eng.device)  # what `load` computes the activations in
                ids = [eng.encode_prompt(p) for p in PROMPTS[:2]]  # two lengths: a right-padded prefill
                seqs = generate(eng.model, ids, greedy(8), stop_ids=set(), tokenizer=eng.tokenizer)
                text = eng.generate(PROMPTS[0], SampleConfig(max_new_tokens=8, temperature=0.0))[0]  # kiln generate's path
                n = [len(s.tokens) for s in seqs]
                figures.append(f"{fmt} {dt}→{str(act).removeprefix('torch.')} on {eng.device}: {n} tokens, {text!r}")
                if n != [8, 8]:
                    problems.append(f"{fmt} {dt}: {n} tokens instead of 8 each")
            except Exception as e:  # noqa: BLE001 - each format and dtype on its own
                problems.append(f"{fmt} {dt}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if not ctx.cuda:
        figures.append(f"on the GPU itself: {NEEDS_GPU}")
    if problems:
        raise CheckFailed("; ".join(problems + figures))
    return OK, "; ".join(figures)


@contextlib.contextmanager
def fp32_matmuls(torch, precision: str):
    """fp32 matmuls at `precision` meanwhile: "highest" (IEEE fp32) or "high" (TF32 on CUDA); then
    back to what they were (kiln's setting)."""
    before, flag = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cuda.matmul.allow_tf32 = flag


def check_tf32(ctx: Ctx) -> tuple[str, str]:
    if not ctx.cuda:
        return SKIPPED, f"fp32 matmul rate with TF32 off and on: {NEEDS_GPU}"
    from kiln.hardware import measure_matmul_peak
    from kiln.train.parallel import pick_device

    torch = ctx.torch
    pick_device("auto")  # what every kiln verb does first

    def rate(dtype=torch.float32) -> float:
        return measure_matmul_peak(ctx.device, 4096, dtype, seconds=0.5)

    as_kiln = rate()
    with fp32_matmuls(torch, "highest"):
        off = rate()
    with fp32_matmuls(torch, "high"):
        on = rate()
    bf16 = rate(torch.bfloat16)
    kiln_on = as_kiln > 1.5 * off  # measured, whichever API kiln sets it with
    text = (f"fp32 4096³: {off / 1e12:.0f} TFLOP/s with TF32 off, {on / 1e12:.0f} on ({on / off:.1f}×), "
            f"{as_kiln / 1e12:.0f} as kiln sets it up (TF32 {'on' if kiln_on else 'OFF'}); bf16 {bf16 / 1e12:.0f} TFLOP/s")
    if not kiln_on:
        raise CheckFailed("kiln leaves fp32 matmuls off TF32: " + text)
    if on < 1.5 * off:
        raise CheckFailed("TF32 does not speed fp32 matmuls up: " + text)
    return OK, text


def _toolkit_free_env() -> tuple[dict, str]:
    """This environment without a CUDA toolkit in sight: no CUDA_HOME / CUDA_PATH, no nvcc on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT")}
    dirs = [d for d in env.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "nvcc").exists()]
    env["PATH"] = os.pathsep.join(dirs)
    env["TOKENIZERS_PARALLELISM"] = "false"
    left = [p for p in ("/usr/local/cuda", "/opt/cuda") if Path(p, "bin", "nvcc").exists()]
    note = ("CUDA_HOME unset, nvcc off PATH" + (f"; but {', '.join(left)} holds a toolkit torch may still find"
                                               if left else "; no toolkit on this host"))
    return env, note


def _http(url: str, body: dict | None = None, timeout: float = 30.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class ServerProc:
    """`kiln serve` in a subprocess: started, asked, stopped; its output kept in a file."""

    def __init__(self, ctx: Ctx, run: Path, env: dict, name: str) -> None:
        self.log = ctx.out / f"serve-{name}.log"
        self.lines: list[str] = []
        self.t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "kiln", "serve", f"out={run}", "port=0", f"device={ctx.device_arg}", "max_batch=8"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log, "w") as f:
            for line in self.proc.stdout:
                self.lines.append(line)
                f.write(line)
                f.flush()

    def url(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            for line in self.lines:
                if " on http" in line:
                    return line.split(" on ", 1)[1].split("/v1")[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise CheckFailed(f"did not start: {self.tail()}")

    def ready(self, url: str, deadline: float) -> float:
        """Seconds from spawn until /health answers (the scheduler, and any compile, is up)."""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CheckFailed(f"exited {self.proc.returncode} during start-up: {self.tail()}")
            try:
                if _http(url + "/health", timeout=5).get("status") == "ok":
                    return time.perf_counter() - self.t0
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.2)
        raise CheckFailed(f"/health did not answer in time: {self.tail()}")

    def tail(self, n: int = 4) -> str:
        lines = [ln.strip() for ln in self.lines if ln.strip()]
        return " / ".join(lines[-n:])[-600:] or "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.reader.join(5)


def check_serve(ctx: Ctx) -> tuple[str, str]:
    env, toolkit = _toolkit_free_env()
    runs = {"float": ctx.base_run(), "int4": ctx.quantized("int4")}
    servers = {name: ServerProc(ctx, run, env, name) for name, run in runs.items()}  # both start together
    figures, problems = [], []
    try:
        deadline = time.monotonic() + (150 if ctx.cuda else 100)
        for name, srv in servers.items():
            try:
                url = srv.url(deadline)
                up = srv.ready(url, deadline)
                models = [m["id"] for m in _http(url + "/v1/models")["data"]]
                t0 = time.perf_counter()
                r = _http(url + "/v1/completions", {"model": models[0], "prompt": PROMPTS[0], "max_tokens": 8,
                                                     "temperature": 0}, timeout=120)
                took = time.perf_counter() - t0
                n = r["usage"]["completion_tokens"]
                figures.append(f"{name}: up in {up:.1f} s, /v1/models {models}, completion of {n} tokens in "
                               f"{1000 * took:.0f} ms {r['choices'][0]['text']!r}")
                if n < 1:
                    problems.append(f"{name}: an empty completion")
                problems += [f"{name}: {ln}" for ln in eager_fallbacks("".join(srv.lines))]
            except Exception as e:  # noqa: BLE001 - each server on its own
                msg = str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}; {srv.tail()}"
                problems.append(f"{name}: {msg}")
    finally:
        for srv in servers.values():
            srv.stop()
    figures.append(f"serve defaults (dtype auto, compile auto{'' if ctx.cuda else ' = off on CPU'}); "
                   f"environment: {toolkit}")
    if not ctx.cuda:
        figures.append(f"the compiled decode step without a toolkit: {NEEDS_GPU}")
    if problems:
        raise CheckFailed("; ".join(problems + figures))
    return OK, "; ".join(figures)


def check_speedrun(ctx: Ctx) -> tuple[str, str]:
    run = ctx.new_run("speedrun")  # its prepare stage finds the data up to date
    steps = max(4, ctx.steps // 2)
    graphs = _dynamo_graphs()
    t0 = time.perf_counter()
    ctx.kiln("speedrun", f"out={run}", *ctx.prepare_args(), *ctx.train_args(steps), "train.compile=on",
             "sample.max_new_tokens=8", f"speedrun.stages={ctx.stages}", "speedrun.sft_steps=3",
             "speedrun.dpo_steps=2", "speedrun.dpo_pairs=40", "speedrun.distill_steps=3",
             f"sft.default_source={ctx.corpus()}", "sft.default_max_chars=200", "sft.eval_prompts=2",
             "sft.eval_max_new_tokens=8", "speedrun.student=preset=tiny,d_model=32,n_heads=2,n_kv_heads=1")
    wall = time.perf_counter() - t0
    done = json.loads((run / "post_training.json").read_text())
    stages = {r["stage"]: r for r in done["stages"]}
    want = ctx.stages.split(",")
    missing = [s for s in want if s not in stages]
    if missing:
        raise CheckFailed(f"stages {missing} did not run")
    models = 1 + len(want) + ("dpo" in want) + ("distill" in want)  # pretrain; each stage; a DPO reference; a teacher
    made = _dynamo_graphs() - graphs if graphs >= 0 else -1
    text = (f"pretrain + {' + '.join(want)} ({models} compiled models) in {wall:.0f} s: "
            + ", ".join(f"{s} {stages[s]['seconds']:.0f} s" for s in want)
            + (f"; dynamo compiled {made} graphs" if made >= 0 else "") + ctx.compile_note)
    return OK, text


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a figure, not a check
        return -1


SDPA_BACKENDS = [("_scaled_dot_product_flash_attention_for_cpu", "flash (CPU)"),
                 ("_scaled_dot_product_flash_attention", "flash"), ("_scaled_dot_product_cudnn_attention", "cuDNN"),
                 ("_scaled_dot_product_efficient_attention", "mem-efficient"),
                 ("_scaled_dot_product_fused_attention_overrideable", "fused"),
                 ("_scaled_dot_product_attention_math", "math")]


def check_attention(ctx: Ctx) -> tuple[str, str]:
    from kiln.model.config import ModelConfig
    from kiln.model.transformer import Transformer
    from kiln.train.metrics import allocation_peak

    torch = ctx.torch
    t = 2048 if ctx.cuda else 128
    b = 2
    cfg = ModelConfig(vocab_size=1024, d_model=512, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=t)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0)
    model.to(ctx.device)
    ids = torch.randint(0, cfg.vocab_size, (b, t), device=ctx.device)
    docs = torch.cat([torch.zeros(b, t // 2), torch.ones(b, t // 4), torch.full((b, t - t // 2 - t // 4), 2.0)], 1)
    pad = torch.ones(b, t, dtype=torch.long)
    pad[1, t // 2:] = 0
    cases = {"causal": {}, "documents": {"document_ids": docs.long().to(ctx.device)},
             "padded": {"attention_mask": pad.to(ctx.device)}}

    def step(kw):
        with torch.autocast("cuda", torch.bfloat16) if ctx.cuda else contextlib.nullcontext():
            out = model(ids, **kw)
        out.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    found, mem = {}, {}
    for name, kw in cases.items():
        step(kw)  # warm up
        ctx.sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(kw)
            ctx.sync()
        ops = {e.key for e in prof.key_averages()}
        found[name] = next((label for op, label in SDPA_BACKENDS if any(k.endswith(op) for k in ops)),
                           "unknown: " + ",".join(sorted(k for k in ops if "attention" in k))[:120])
        if ctx.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(ctx.device)
            base = torch.cuda.memory_allocated(ctx.device)
            step(kw)
            ctx.sync()
            mem[name] = torch.cuda.max_memory_allocated(ctx.device) - base
        else:
            mem[name] = allocation_peak(lambda kw=kw: step(kw))
    math_bytes = cfg.n_layers * b * cfg.n_heads * t * t * (2 if ctx.cuda else 4)
    text = (f"GQA 8 query / 2 KV heads, {b}×{t}, forward + backward: "
            + ", ".join(f"{k} → {found[k]} {gb(mem[k] / 1e9)}" for k in cases)
            + f" (the T² scores of the math path alone: {gb(math_bytes / 1e9)})")
    if not ctx.cuda:
        return OK, text + f"; the CUDA backend and its memory at T=2048: {NEEDS_GPU}"
    slow = [k for k in ("documents", "padded") if found[k] == "math" or found[k].startswith("unknown")]
    if slow:
        raise CheckFailed(f"{', '.join(slow)} fall back to the math backend (O(T²) memory): {text}")
    return OK, text


def check_decode(ctx: Ctx) -> tuple[str, str]:
    from transformers import LlamaForCausalLM

    from kiln.infer.generate import Engine
    from kiln.post.export import export_hf

    torch = ctx.torch
    gen = load_bench("generate")
    run = ctx.base_run()
    eng = ctx.engine(run)
    dtype = next(eng.model.parameters()).dtype
    hf_dir = ctx.out / "hf"
    if not (hf_dir / "config.json").is_file():
        export_hf(run, hf_dir)
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa").to(eng.device).eval()
    ids = eng.encode_prompt(PROMPTS[0])
    new = min(ctx.new_tokens, eng.context - len(ids) - 1)
    seen = io.StringIO()

    def compiled():
        with stderr_seen() as buf:
            try:
                return gen.kiln_generate(eng, ids, 1, new, compile=True)
            finally:
                seen.write(buf.getvalue())

    sides = {"eager": lambda: gen.kiln_generate(eng, ids, 1, new), "compiled": compiled,
             "transformers": lambda: gen.hf_generate(hf, ids, 1, new, eng.device)}
    rows = {k: [] for k in sides}
    problems = []
    for _ in range(ctx.rounds):
        for k, fn in list(sides.items()):
            try:
                rows[k].append(fn())
            except Exception as e:  # noqa: BLE001 - the other sides still measure
                if k == "transformers":
                    raise
                problems.append(f"{k}: {type(e).__name__}: {str(e).strip()[:200]}")
                del sides[k], rows[k]
    fell_back = eager_fallbacks(seen.getvalue())
    if "compiled" in sides:
        from kiln.infer.decode import decode_step

        note = getattr(decode_step(eng.model, True), "note", None)  # the step kept per model, with why it is eager
        fell_back += [note] if note and not fell_back else []
    if fell_back:  # kiln decodes on, eagerly: the "compiled" figures would be eager ones
        problems.append("compiled: " + fell_back[0])
        sides.pop("compiled", None)
        rows.pop("compiled", None)
    # the best round; transformers' decode time is its whole generate less a 1-token one, which a
    # busy host can make come out negative: such rounds are dropped
    best = {k: min((r[2] for r in v if r[2] > 0), default=None) for k, v in rows.items()}
    tps = {k: (new - 1) / d for k, d in best.items() if d}
    ref = rows["transformers"][0][0][0]

    def same(k: str) -> str:
        got = rows[k][0][0][0]
        first = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), None)
        return "identical" if first is None else f"differ from token {first}"

    dt = str(dtype).removeprefix("torch.")
    hf_tps = tps.get("transformers")
    parts = [f"{k} {v:,.0f}" + ("" if k == "transformers" or not hf_tps else f" ({v / hf_tps:.2f}×)")
             for k, v in tps.items()] + (["transformers: timing noise, no figure"] if not hf_tps else [])
    text = f"batch 1, {new} new tokens, {dt}: tok/s " + ", ".join(parts)
    text += "; greedy vs transformers: " + ", ".join(f"{k} {same(k)}" for k in sides if k != "transformers")
    if ctx.cuda:  # the exact comparison: fp32 with TF32 off (bf16 rounding may split near-ties)
        with fp32_matmuls(torch, "highest"):
            e32 = Engine.from_run(run, ctx.device_arg, "fp32")
            h32 = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                   attn_implementation="sdpa").to(eng.device).eval()
            a, b = gen.kiln_generate(e32, ids, 1, new)[0][0], gen.hf_generate(h32, ids, 1, new, eng.device)[0][0]
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        text += "; fp32 eager vs transformers: " + ("identical" if first is None else f"differ from token {first}")
        if first is not None:
            problems.append("fp32 greedy tokens differ from transformers")
    elif "eager" in sides and same("eager") != "identical":
        problems.append("greedy tokens differ from transformers")
    if not ctx.cuda:
        text += f"; compiled here with cpp_wrapper, on CUDA as CUDA graphs: {NEEDS_GPU}"
    if problems:
        raise CheckFailed("; ".join(problems) + ": " + text)
    return OK, text


def check_batching(ctx: Ctx) -> tuple[str, str]:
    from kiln.infer.engine import SamplingParams, Sequence
    from kiln.serve.scheduler import Scheduler
    from kiln.train.parallel import use_compile

    eng = ctx.engine(ctx.base_run())
    compiled = use_compile("auto", eng.device)  # what `kiln serve` does with its defaults
    clients, new = 32, min(ctx.new_tokens, 32)
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    prompts = [eng.encode_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(clients)]

    def drive(rows: int) -> tuple[list[Sequence], float]:
        with Scheduler(eng, max_batch=rows, max_queue=2 * clients, compile=compiled) as sched:
            warm = Sequence(prompts[0], params, eng.tokenizer)
            sched.submit([warm])
            sched.wait([warm], 300)
            seqs = [Sequence(p, params, eng.tokenizer) for p in prompts]

            def client(s: Sequence) -> None:
                sched.submit([s])
                sched.wait([s], 300)

            threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in seqs]
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join(330)
            wall = time.perf_counter() - t0
            step = getattr(sched.batch, "fast", None)  # the fused decode step, with why it runs eagerly if it does
            if compiled and getattr(step, "note", None):
                notes.append(step.note)
            return seqs, wall

    notes: list[str] = []

    failed = ""
    try:
        with stderr_seen() as buf:
            together, t_together = drive(clients)
        said = eager_fallbacks(buf.getvalue()) + notes
        if compiled and said:
            failed = f"{said[0]}: "
            compiled = False
    except Exception as e:  # noqa: BLE001 - a compiled step that cannot start: measure eagerly, and say so
        if not compiled:
            raise
        failed = f"the compiled decode step failed ({type(e).__name__}: {str(e).strip()[:200]}), measured eager: "
        compiled = False
        together, t_together = drive(clients)
    alone, t_alone = drive(1)
    unfinished = [s for s in together + alone if s.finish_reason not in ("stop", "length")]
    if unfinished:
        raise CheckFailed(f"{len(unfinished)} of {2 * clients} requests did not finish "
                          f"({sorted({str(s.finish_reason) + ' ' + str(s.error) for s in unfinished})[:2]})")
    tok = sum(len(s.tokens) for s in together), sum(len(s.tokens) for s in alone)
    agree = sum(a.tokens == b.tokens for a, b in zip(together, alone))
    lat = sorted(s.latency_s for s in together)
    text = (f"{clients} clients, ≤{new} tokens each, decode step {'compiled' if compiled else 'eager'}: "
            f"{tok[0] / t_together:,.0f} tok/s together vs {tok[1] / t_alone:,.0f} one at a time "
            f"({(tok[0] / t_together) / (tok[1] / t_alone):.1f}×); latency p50 {1000 * lat[len(lat) // 2]:.0f} ms; "
            f"same greedy tokens both ways: {agree}/{clients}")
    if failed:
        raise CheckFailed(failed + text)
    if not ctx.cuda:
        text += f"; the compiled step's figures: {NEEDS_GPU}"
    return OK, text


def check_quant_decode(ctx: Ctx) -> tuple[str, str]:
    from kiln.infer.generate import decode_tokens_per_s
    from kiln.infer.load import load

    runs = {"float": ctx.base_run(), "int8": ctx.quantized("int8"), "int4": ctx.quantized("int4")}
    models = {k: load(r, ctx.device_arg, "auto").model for k, r in runs.items()}
    dt = str(next(models["float"].parameters()).dtype).removeprefix("torch.")
    best = dict.fromkeys(models, 0.0)
    for _ in range(ctx.rounds):  # in turns, the best round kept
        for k, m in models.items():
            best[k] = max(best[k], decode_tokens_per_s(m, new_tokens=min(64, ctx.new_tokens), repeats=1))
    text = (f"batch 1 eager on {ctx.device}: float ({dt}) {best['float']:,.0f} tok/s, "
            + ", ".join(f"{k} {best[k]:,.0f} ({best[k] / best['float']:.2f}×)" for k in ("int8", "int4")))
    if not all(v > 0 for v in best.values()):
        raise CheckFailed("a model decoded nothing: " + text)
    if not ctx.cuda:
        text += f"; bf16 vs INT8 / INT4 on the card: {NEEDS_GPU}"
    return OK, text


FUNCS = {"pretrain": check_pretrain, "plan": check_plan, "quantized": check_quantized, "tf32": check_tf32,
         "serve": check_serve, "speedrun": check_speedrun, "attention": check_attention, "decode": check_decode,
         "batching": check_batching, "quant-decode": check_quant_decode}


def worker(args) -> None:
    events = Path(args.events)

    def emit(**e) -> None:
        with open(events, "a") as f:
            f.write(json.dumps(e) + "\n")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    ctx = Ctx(args)
    emit(event="env", cuda=ctx.cuda, device=str(ctx.device), torch=torch.__version__,
         cuda_version=torch.version.cuda, card=torch.cuda.get_device_name(ctx.device) if ctx.cuda else "",
         shapes=f"{ctx.preset}, seq {ctx.seq}, batch {ctx.batch}, vocab {ctx.vocab}")
    for name in args.checks.split(","):
        emit(event="start", check=name)
        print(f"\n===== gpu_check: {name}", flush=True)
        t0 = time.perf_counter()
        error = ""
        try:
            result, figures = FUNCS[name](ctx)
        except CheckFailed as e:
            result, figures = FAILED, str(e)
        except Exception as e:  # noqa: BLE001 - one check's failure never stops the others
            result, figures = FAILED, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            error = traceback.format_exc()
            print(error, flush=True)
        if ctx.cuda:
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
        emit(event="done", check=name, result=result, figures=" ".join(figures.split()), error=error,
             seconds=round(time.perf_counter() - t0, 1))


# ---- the parent: starts and watches the worker, prints the table ----------------------------------
def read_events(path: Path, offset: int) -> tuple[list[dict], int]:
    if not path.is_file():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return [json.loads(ln) for ln in data[:end].splitlines() if ln.strip()], offset + end


def log_tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_checks(args, out: Path, names: list[str]) -> tuple[dict, dict]:
    events, log = out / "events.jsonl", out / "worker.log"
    results: dict[str, dict] = {}
    env_info: dict = {}
    todo = list(names)
    t_start = time.monotonic()
    budget = args.budget
    offset = 0
    proc, current, started = None, None, time.monotonic()
    try:
        while todo:
            cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--worker", "--events", str(events),
                   "--out", str(out), "--checks", ",".join(todo), "--shapes", args.shapes]
            cmd += ["--cpu"] * args.cpu + ["--quick"] * args.quick + ["--steps", str(args.steps)]
            with open(log, "a") as logf:
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
            current, started, progressed = None, time.monotonic(), False
            while True:
                new, offset = read_events(events, offset)
                for e in new:
                    if e["event"] == "env":
                        env_info = e
                        if budget is None:
                            budget = 470 if e["cuda"] else 300
                    elif e["event"] == "start":
                        current, started, progressed = e["check"], time.monotonic(), True
                    elif e["event"] == "done":
                        results[e["check"]] = e
                        todo.remove(e["check"])
                        current = None
                        print(f"[{len(results)}/{len(names)}] {e['check']}: {e['result']} ({e['seconds']:.0f} s)", flush=True)
                if proc.poll() is not None and not new:
                    break
                if not todo:  # all done: the worker has seconds to exit
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(30)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                now = time.monotonic()
                limit = CHECKS[current][1 if env_info.get("cuda") else 2] if current else 0
                over_budget = budget is not None and now - t_start > budget
                if current and (now - started > limit or over_budget):
                    why = (f"stopped after {now - started:.0f} s: over its {limit} s" if now - started > limit
                           else f"stopped: the run's {budget:.0f} s budget was spent")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)  # the worker and its children (servers)
                    proc.wait()
                    results[current] = {"check": current, "result": FAILED, "figures": why,
                                        "error": log_tail(log), "seconds": round(now - started, 1)}
                    todo.remove(current)
                    print(f"[{len(results)}/{len(names)}] {current}: FAILED ({why})", flush=True)
                    current = None
                    break
                if over_budget and not current:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.2)
            if current:  # the worker died inside a check
                results[current] = {"check": current, "result": FAILED, "figures": f"the worker died (exit {proc.returncode})",
                                    "error": log_tail(log), "seconds": round(time.monotonic() - started, 1)}
                todo.remove(current)
            elif not progressed and todo:  # it could not even start a check
                for name in todo:
                    results[name] = {"check": name, "result": FAILED, "figures": f"the worker exited {proc.returncode} "
                                     "before running it", "error": log_tail(log), "seconds": 0.0}
                todo = []
            if budget is not None and time.monotonic() - t_start > budget:
                for name in todo:
                    results[name] = {"check": name, "result": FAILED, "figures": f"not run: the {budget:.0f} s budget was spent",
                                     "error": "", "seconds": 0.0}
                todo = []
    except (Interrupted, KeyboardInterrupt) as e:  # a hard timeout's SIGTERM, or Ctrl-C: stop, and report what ran
        why = f"interrupted ({e or 'SIGINT'})"
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for name in todo:
            results[name] = {"check": name, "result": FAILED, "figures": why if name == current else f"not run: {why}",
                             "error": log_tail(log) if name == current else "",
                             "seconds": round(time.monotonic() - started, 1) if name == current else 0.0}
    return results, env_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the CPU mode even where CUDA is available (tiny shapes)")
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    ap.add_argument("--out", help="where the runs go (kept); default: a temporary directory, removed at the end")
    ap.add_argument("--json", help="write the table (and the device) as JSON here")
    ap.add_argument("--checks", default=",".join(CHECKS), help="comma list of checks to run (default: all)")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default 470 on a GPU, 300 on a CPU)")
    ap.add_argument("--steps", type=int, default=0, help="the pretrain check's steps (default 40 on a GPU, 8 on a CPU)")
    ap.add_argument("--shapes", choices=("auto", "cpu", "gpu"), default="auto",
                    help="model and run sizes: auto = gpu on CUDA; `--cpu --shapes gpu` rehearses a GPU run's configs")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--events", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    names = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        ap.error(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    names = [c for c in CHECKS if c in names]
    t0 = time.monotonic()
    keep = bool(args.out)
    out = Path(args.out) if keep else Path(tempfile.mkdtemp(prefix="kiln-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "events.jsonl").unlink(missing_ok=True)
    failed = names
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        results, env = run_checks(args, out, names)
        wall = time.monotonic() - t0
        for name in names:
            r = results[name]
            if r["result"] == FAILED and r.get("error"):
                print(f"\n--- {name} FAILED; the end of its log:\n{r['error'].rstrip()[-3000:]}")
        where = (f"{env.get('card') or 'CPU'} ({env.get('device', '?')}), torch {env.get('torch', '?')}"
                 + (f", CUDA {env['cuda_version']}" if env.get("cuda_version") and env.get("cuda") else "")
                 + f"; shapes: {env.get('shapes', '?')}; {wall:.0f} s")
        print(f"\n## kiln GPU check: {where}\n")
        print("| check | result | figures |\n|---|---|---|")
        for name in names:
            r = results[name]
            print(f"| {name}: {CHECKS[name][0]} | {r['result']} | {r['figures'].replace('|', '/')} |")
        failed = [n for n in names if results[n]["result"] == FAILED]
        print(f"\n{len(names) - len(failed)} of {len(names)} checks ok or skipped"
              + (f"; FAILED: {', '.join(failed)}" if failed else "")
              + ("" if env.get("cuda") else f"; figures marked '{NEEDS_GPU}' mean something only on a GPU"))
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"device": env, "seconds": round(wall, 1), "mode": "gpu" if env.get("cuda") else "cpu",
                 "checks": [{"check": n, "title": CHECKS[n][0], "result": results[n]["result"],
                             "figures": results[n]["figures"], "seconds": results[n]["seconds"],
                             "error": results[n].get("error", "")} for n in names]}, indent=2))
        if keep:
            print(f"runs and logs: {out}")
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
