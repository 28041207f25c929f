"""`kiln scale`: a ladder of small pretraining runs, a scaling law fitted to them, and a forecast
of the ladder's largest run, checked against what it measured.

Every rung is an ordinary pretraining run directory (`out/runs/d{width}-t{tokens per param}`) on
the recipe's data (prepared once, in `out/data`), model (its depth and heads; the width is the
rung's) and schedule (`max_steps` is the rung's token budget). A rung that finished is kept: a
rerun trains only what is missing (and continues a rung that was interrupted). The largest rung
by compute is held out of the fit, forecast from the others, and the forecast is compared with
its measured bits per byte. `scale.json` holds the points, the fit with its bootstrap (what
`kiln plan fit=out` reads), the held-out check and the compute-optimal frontier; the report's
"scale" section has a table and a plot of loss against compute.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kiln.config import Config
from kiln.data.layout import read_manifest
from kiln.data.pipeline import run_prepare
from kiln.errors import KilnError
from kiln.report import plot_over_steps, write_section
from kiln.runs import atomic_write_text
from kiln.scaling import SCALE_JSON, fit
from kiln.train.metrics import read_metrics
from kiln.workloads.common import model_config_for
from kiln.workloads.pretrain import run_pretrain

PLOT = "scale.png"


@dataclasses.dataclass
class Rung:
    name: str
    width: int
    ratio: float  # tokens per parameter asked for
    params: int
    steps: int
    tokens: int
    cfg: Config

    @property
    def compute(self) -> float:
        return 6.0 * self.params * self.tokens


def ladder(cfg: Config, ddir: Path, vocab_size: int) -> list[Rung]:
    """Every width × every token budget, as pretraining configs under `out/runs`."""
    sc = cfg.scale
    check_size(cfg)
    tc = cfg.train
    per_step = tc.tokens_per_step or tc.batch_size * tc.seq_len
    rungs = []
    for width in sc.widths:
        try:
            model = dataclasses.replace(cfg.model, d_model=width)
        except KilnError as e:
            raise KilnError(f"scale.widths: d_model={width}: {e}") from None
        params = model_config_for(dataclasses.replace(cfg, model=model), vocab_size).num_params()
        for ratio in sc.tokens_per_param:
            steps = max(sc.min_steps, round(ratio * params / per_step))
            name = f"d{width}-t{ratio:g}"
            train = dataclasses.replace(tc, max_steps=steps, eval_every=steps, ckpt_every=steps,
                                        warmup_steps=min(tc.warmup_steps, max(1, steps // 10)),
                                        log_every=max(1, min(tc.log_every, steps // 5 or 1)))
            run_cfg = dataclasses.replace(cfg, out=str(Path(cfg.out) / "runs" / name), resume="auto", init_from="",
                                          model=model, train=train,
                                          data=dataclasses.replace(cfg.data, path=str(ddir)))
            rungs.append(Rung(name, width, ratio, params, steps, steps * per_step, run_cfg))
    return rungs


def check_size(cfg: Config) -> None:
    sc = cfg.scale
    if len(sc.widths) * len(sc.tokens_per_param) < 4:
        raise KilnError("a ladder needs at least 4 runs (3 to fit, the largest held out): add scale.widths or "
                        "scale.tokens_per_param")


def final_bpb(run: str | Path, steps: int) -> float | None:
    """The validation bits per byte a run measured at its last step, or None if it has not finished."""
    done = [m for m in read_metrics(run) if "val_bpb" in m and m.get("step") == steps]
    return float(done[-1]["val_bpb"]) if done else None


def run_scale(cfg: Config) -> int:
    check_size(cfg)  # before anything is prepared or trained
    out = Path(cfg.out)
    ddir = Path(cfg.data.path) if cfg.data.path else out / "data"
    if read_manifest(ddir) is None:
        if cfg.data.path:
            raise KilnError(f"data.path={cfg.data.path} holds no prepared data; run `kiln prepare` first")
        print("== prepare")
        run_prepare(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path="")))
    man = read_manifest(ddir)
    rungs = ladder(cfg, ddir, man["vocab_size"])
    points = []
    for i, rung in enumerate(rungs, 1):
        bpb = final_bpb(rung.cfg.out, rung.steps)
        if bpb is None:
            print(f"== rung {i}/{len(rungs)}: {rung.name}: {rung.params / 1e6:.2f}M params, {rung.tokens:,} tokens "
                  f"({rung.steps} steps)", flush=True)
            run_pretrain(rung.cfg)
            bpb = final_bpb(rung.cfg.out, rung.steps)
            if bpb is None:
                raise KilnError(f"rung {rung.name} finished without a validation figure at step {rung.steps}")
        else:
            print(f"== rung {i}/{len(rungs)}: {rung.name}: finished earlier, kept ({bpb:.4f} bits/byte)")
        points.append({"name": rung.name, "run": str(Path("runs") / rung.name), "width": rung.width,
                       "tokens_per_param": rung.ratio, "params": rung.params, "tokens": rung.tokens,
                       "compute": rung.compute, "bpb": bpb})
    result = summarize(points, cfg.scale.bootstrap)
    atomic_write_text(out / SCALE_JSON, json.dumps(result, indent=2))
    path = write_section(out, "scale", report_lines(out, result))
    h = result["held_out"]
    print(f"== held out {h['name']}: forecast {h['forecast']:.4f} bits/byte "
          f"[{h['interval'][0]:.4f}, {h['interval'][1]:.4f}], measured {h['measured']:.4f} "
          f"({h['error']:+.1%}{'' if h['inside'] else ', OUTSIDE the interval'})"
          + (f"; only {len(points) - 1} runs fitted for 5 parameters: the interval means nothing, "
             "add widths or budgets" if h["underdetermined"] else ""))
    print(f"== {out / SCALE_JSON}; report: {path}")
    return 0


def summarize(points: list[dict], bootstrap: int) -> dict:
    """The fit on every point but the largest by compute, that point's forecast vs its measurement,
    and the frontier over the ladder's compute range (and ten times beyond)."""
    held = max(points, key=lambda p: p["compute"])
    rest = [p for p in points if p is not held]
    f = fit([p["params"] for p in rest], [p["tokens"] for p in rest], [p["bpb"] for p in rest], bootstrap=bootstrap)
    fc = f.forecast(held["params"], held["tokens"])
    lo, hi = fc["interval"]
    held_out = {"name": held["name"], "params": held["params"], "tokens": held["tokens"], "measured": held["bpb"],
                "forecast": fc["bpb"], "interval": fc["interval"], "error": fc["bpb"] / held["bpb"] - 1,
                "inside": lo <= held["bpb"] <= hi,
                # no more runs than the law's five parameters: the fit passes through them and its interval is empty
                "underdetermined": len(rest) <= 5}
    c_lo, c_hi = min(p["compute"] for p in points), 10 * max(p["compute"] for p in points)
    frontier = []
    for k in range(9):
        c = c_lo * (c_hi / c_lo) ** (k / 8)
        n, d = f.law.optimal(c)
        frontier.append({"compute": c, "params": n, "tokens": d, "bpb": float(f.law.loss(n, d))})
    return {"law": "E + A/N^alpha + B/D^beta (N: parameters, D: tokens, L: validation bits/byte)",
            "points": [{**p, "held_out": p is held} for p in points], "fit": f.to_dict(), "held_out": held_out,
            "frontier": frontier}


def report_lines(out: Path, result: dict) -> list[str]:
    """The report's "scale" section: the ladder, the law, the held-out check, the plot."""
    law, h = result["fit"]["law"], result["held_out"]
    lines = ["## Scaling ladder", "",
             f"L(N, D) = {law['E']:.3f} + {law['A']:.3g}/N^{law['alpha']:.3f} + {law['B']:.3g}/D^{law['beta']:.3f} "
             f"bits/byte, fitted to {len(result['points']) - 1} runs (Huber in log space, "
             f"{len(result['fit']['samples'])} bootstrap refits over runs).", "",
             "| run | params | tokens | compute (FLOPs) | val bits/byte | |", "|---|---:|---:|---:|---:|---|"]
    for p in result["points"]:
        lines.append(f"| [{p['name']}]({p['run']}/report.md) | {p['params']:,} | {p['tokens']:,} | {p['compute']:.3g} | "
                     f"{p['bpb']:.4f} | {'held out' if p['held_out'] else ''} |")
    lines += ["", f"**Held-out check** ({h['name']}, the largest run): forecast **{h['forecast']:.4f}** bits/byte, "
              f"90% interval [{h['interval'][0]:.4f}, {h['interval'][1]:.4f}]; measured **{h['measured']:.4f}** "
              f"({h['error']:+.1%}; {'inside' if h['inside'] else 'outside'} the interval)."
              + (" Fewer runs than 6 were fitted: the law passes through them and the interval means nothing."
                 if h["underdetermined"] else ""), ""]
    if plot(out / PLOT, result):
        lines += [f"![loss against compute]({PLOT})", ""]
    return lines


def plot(path: Path, result: dict) -> bool:
    """Loss against compute: each width's runs, its fitted curve, the frontier, the held-out run."""
    from kiln.scaling import Law

    law = Law.from_dict(result["fit"]["law"])
    widths = sorted({p["width"] for p in result["points"]})
    curves = []
    for i, w in enumerate(widths):  # a width's runs and its fitted curve in one colour
        mine = sorted((p for p in result["points"] if p["width"] == w and not p["held_out"]), key=lambda p: p["compute"])
        curves.append((f"d_model {w}", [(p["compute"], p["bpb"]) for p in mine], True, {"color": f"C{i}", "ls": ""}))
        ref = next(p for p in result["points"] if p["width"] == w)
        ds = [min(p["tokens"] for p in result["points"]) * 2 ** (k / 2) for k in range(-2, 16)]
        curves.append((f"fit, d_model {w}", [(6 * ref["params"] * d, float(law.loss(ref["params"], d))) for d in ds
                                             if 6 * ref["params"] * d <= result["frontier"][-1]["compute"]], False,
                       {"color": f"C{i}", "ls": "--"}))
    curves.append(("compute-optimal frontier", [(f["compute"], f["bpb"]) for f in result["frontier"]], False,
                   {"color": "black", "ls": ":"}))
    h = next(p for p in result["points"] if p["held_out"])
    held = result.get("held_out") or {}
    if held.get("forecast") is not None and held.get("interval"):
        lo, hi = held["interval"]
        curves.append((f"forecast of {h['name']}, 90% interval", [(h["compute"], lo), (h["compute"], held["forecast"]),
                                                                  (h["compute"], hi)], True,
                       {"color": "gray", "marker": "_", "markersize": 14}))
    curves.append((f"held out ({h['name']}), measured", [(h["compute"], h["bpb"])], True,
                   {"color": "red", "marker": "*", "markersize": 12, "ls": ""}))
    return plot_over_steps(path, curves, "validation bits/byte", "scaling ladder", xlabel="training FLOPs (6·N·D)",
                           logx=True, size=(8, 5))
