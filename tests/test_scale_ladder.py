"""`kiln scale`: a 2×2 micro-ladder of tiny pretraining runs, each an ordinary run directory, fitted
and checked on its held-out run; scale.json and the report section; a rerun keeps finished rungs."""

from __future__ import annotations

import json

from conftest import TINY_TRAIN, kiln


def test_micro_ladder_fits_forecasts_and_resumes(tmp_path, prepared, capsys):
    out = tmp_path / "scale"
    args = ["scale", f"out={out}", f"data.path={prepared / 'data'}", *TINY_TRAIN, "train.ckpt_every=1000",
            "scale.widths=[32,64]", "scale.tokens_per_param=[0.01,0.02]", "scale.min_steps=4", "scale.bootstrap=5"]
    assert kiln(*args) == 0
    data = json.loads((out / "scale.json").read_text())
    points = data["points"]
    assert len(points) == 4 and sum(p["held_out"] for p in points) == 1
    held = max(points, key=lambda p: p["compute"])
    assert held["held_out"] and held["name"] == data["held_out"]["name"]
    for p in points:  # each rung an ordinary run: config, metrics, checkpoint, its own report
        run = out / p["run"]
        assert (run / "metrics.jsonl").is_file() and (run / "report.md").is_file() and (run / "checkpoints").is_dir()
        assert 0 < p["bpb"] < 20 and p["compute"] == 6 * p["params"] * p["tokens"]
    h = data["held_out"]
    lo, hi = h["interval"]
    assert lo <= h["forecast"] <= hi and h["measured"] == held["bpb"]
    assert h["underdetermined"]  # 3 runs fitted for 5 parameters: said, not hidden
    assert "the interval means nothing" in capsys.readouterr().out
    assert set(data["fit"]["law"]) == {"E", "A", "alpha", "B", "beta"} and len(data["frontier"]) > 2
    report = (out / "report.md").read_text()
    assert "## Scaling ladder" in report and "Held-out check" in report and "![loss against compute](scale.png)" in report
    assert (out / "scale.png").stat().st_size > 1000
    capsys.readouterr()
    assert kiln(*args) == 0  # resumable: every rung finished, nothing trains again
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, kept") == 4 and "== prepare" not in printed


def test_too_small_a_ladder_is_refused(tmp_path, prepared, capsys):
    assert kiln("scale", f"out={tmp_path / 's'}", f"data.path={prepared / 'data'}", *TINY_TRAIN,
                "scale.widths=[64]", "scale.tokens_per_param=[0.01,0.02]") == 2
    assert "at least 4 runs" in capsys.readouterr().err
