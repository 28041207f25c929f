"""Every training run checks the plan: the planner's figures for the run (asked before its first
step) beside what it measured, in `plan_vs_run.json` and the report; `kiln plan … calibrate=RUN`
plans with the MFU such runs measured. The 2-rank layouts are checked in tests/test_distributed.py
(on its existing runs) and every workload's file in that workload's own tests."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_TRAIN, check_plan_vs_run, kiln
from kiln.model.config import preset
from kiln.plan import PLAN_VS_RUN, estimate_training_memory, training_flops_per_token

SHORT = [*TINY_TRAIN, "train.max_steps=2", "train.warmup_steps=1", "train.eval_every=1000", "train.eval_batches=1"]

# (overrides, the planner's memory arguments for the same run) — vocab 512 from the prepared data
SHAPES = {
    "tiny": (["train.seq_len=64", "train.batch_size=4"],
             dict(shape=dict(name="tiny"), batch=4, seq_len=64)),
    "wider and longer": (["model.d_model=128", "model.n_layers=3", "train.seq_len=128", "train.batch_size=2"],
                         dict(shape=dict(name="tiny", d_model=128, n_layers=3), batch=2, seq_len=128)),
    "mini, activation checkpointing": (
        ["model.preset=mini", "model.n_layers=2", "train.seq_len=96", "train.batch_size=3",
         "train.activation_checkpointing=true"],
        dict(shape=dict(name="mini", n_layers=2), batch=3, seq_len=96, activation_checkpointing=True)),
    "two micro-batches per step": (["train.seq_len=64", "train.batch_size=2", "train.tokens_per_step=512"],
                                   dict(shape=dict(name="tiny"), batch=2, seq_len=64, microbatches=2)),
}


@pytest.mark.parametrize("name", SHAPES)
def test_the_memory_prediction_lands_within_10_percent_of_the_allocator_peak(run_dir, name):
    overrides, planner = SHAPES[name]
    assert kiln("pretrain", f"out={run_dir}", *SHORT, *overrides) == 0
    data = check_plan_vs_run(run_dir)
    predicted, measured = data["predicted"], data["measured"]
    # the planner's own memory model for this shape, not a second copy of it
    shape = dict(planner.pop("shape"))
    model = preset(shape.pop("name"), vocab_size=512, max_seq_len=planner["seq_len"], **shape)
    want = estimate_training_memory(model, precision="fp32", **planner)["total"]
    assert predicted["peak_memory_bytes"] == pytest.approx(want)
    # measured: the allocator's peak of a step (what the plan counts), far below the process's RSS
    assert abs(data["error"]["peak_memory_bytes"]) < 0.10, (measured["peak_memory_bytes"], want)
    rss = max(m.get("memory_gb", 0) for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()))
    assert measured["peak_memory_bytes"] < rss * 1e9 / 4
    assert data["error"]["peak_memory_bytes"] == pytest.approx(want / measured["peak_memory_bytes"] - 1)


def test_the_report_table_shows_each_figure_with_its_error(run_dir, capsys):
    assert kiln("pretrain", f"out={run_dir}", *SHORT, "train.max_steps=4") == 0
    said = capsys.readouterr().out
    assert "pretrain: plan: peak " in said and "at the assumed MFU 40%" in said  # before the first step
    data = check_plan_vs_run(run_dir)
    p, m = data["predicted"], data["measured"]
    assert p["steps"] == 4 and p["devices"] == 1 and p["layout"] == "1×1×1×1" and p["mfu"] == 0.4
    assert p["total_seconds"] == pytest.approx(4 * p["step_seconds"])
    assert p["cost_usd"] == pytest.approx(p["total_seconds"] / 3600 * 0.10)  # a CPU host's assumed $0.10/hour
    assert p["tokens_per_s"] == pytest.approx(4 * 64 / p["step_seconds"])
    assert m["timed_steps"] == 3 and m["timing"] == "steady"  # the first step is warm-up, as in the log
    for key in ("step_seconds", "tokens_per_s", "total_seconds", "cost_usd"):
        assert data["error"][key] == pytest.approx(p[key] / m[key] - 1)
    report = (run_dir / "report.md").read_text()
    table = report[report.index("### Plan vs measured"):]
    for row in ("| peak memory per device |", "| step time |", "| tokens/s (all devices) |", "| total time, 4 steps |",
                "| cost at $0.10 per device-hour |", "| MFU while computing | 40% (assumed) |"):
        assert row in table, row
    assert f"{data['error']['peak_memory_bytes']:+.1%} |" in table


def test_calibrate_plans_with_the_mfu_the_runs_measured_and_says_so(run_dir, tmp_path, capsys):
    assert kiln("pretrain", f"out={run_dir}", *SHORT, "train.max_steps=4") == 0
    data = json.loads((run_dir / PLAN_VS_RUN).read_text())
    measured = data["calibration"]["mfu"]
    # one process, nothing exposed: the model FLOPs of the tokens it trained per second, over the peak
    flops = training_flops_per_token(preset("tiny", vocab_size=512, max_seq_len=64), 64)["total"]
    assert measured == pytest.approx(flops * data["measured"]["tokens_per_s"] / data["calibration"]["peak_flops_per_device"])
    assert 0 < measured < 1
    capsys.readouterr()

    def plan(*extra: str) -> dict:
        assert kiln("plan", "model.preset=llama3-8b", "tokens=1e10", "gpus=8", *extra, "--json") == 0
        return json.loads(capsys.readouterr().out)

    assumed, calibrated = plan(), plan(f"calibrate={run_dir}")
    assert assumed["assumptions"]["mfu"] == 0.4 and "calibration" not in assumed
    assert calibrated["assumptions"]["mfu"] == pytest.approx(measured)
    assert calibrated["assumptions"]["mfu_source"] == f"calibrate={run_dir}"
    assert calibrated["calibration"]["runs"][0]["run"] == str(run_dir)
    assert calibrated["calibration"]["assumed_mfu"] == 0.4
    # the same layout computes for 0.4 / measured times as long
    same = next(lay for lay in calibrated["layouts"] if lay["label"] == assumed["best"]["label"]
                and lay["micro_batch"] == assumed["best"]["micro_batch"])
    assert same["compute_s"] == pytest.approx(assumed["best"]["compute_s"] * 0.4 / measured)

    assert kiln("plan", "model.preset=llama3-8b", "tokens=1e10", "gpus=8", f"calibrate={run_dir},{run_dir}") == 0
    out = capsys.readouterr().out
    assert f"calibrated MFU {measured:.0%} while computing" in out
    assert f"calib   MFU {measured:.1%} the median of 2 runs': {measured:.1%} by {run_dir} (pretrain" in out
    assert "replaces the assumed 40% (calibrate=)" in out

    # a run that is not one, and a run whose plan was partial (its MFU would mislead), are one line each
    assert kiln("plan", f"calibrate={tmp_path / 'nothing'}") == 2
    assert "no plan_vs_run.json there" in capsys.readouterr().err
    partial = tmp_path / "rl-run"
    partial.mkdir()
    (partial / PLAN_VS_RUN).write_text(json.dumps({**data, "workload": "rl", "partial": ["rollouts are not planned"]}))
    assert kiln("plan", f"calibrate={partial}") == 2
    assert "rollouts are not planned" in capsys.readouterr().err
