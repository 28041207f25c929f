"""The scaling-law fit (`kiln.scaling`): a known law recovered from noisy synthetic losses, a
held-out larger run forecast within its interval, the compute-optimal frontier, and `kiln plan
fit=` / `target_bpb=` on a synthetic scale.json."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.scaling import Fit, Law, fit

TRUE = Law(E=0.9, A=40.0, alpha=0.34, B=60.0, beta=0.28)


def _ladder(noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = np.repeat([1e5, 3e5, 1e6, 3e6], 3)
    d = np.concatenate([[20 * x / 2, 20 * x, 20 * x * 2] for x in [1e5, 3e5, 1e6, 3e6]])
    loss = TRUE.loss(n, d) * np.exp(noise * rng.standard_normal(len(n)))
    return n, d, loss


def test_fit_recovers_a_known_law():
    n, d, loss = _ladder(0.0)
    got = fit(n, d, loss, bootstrap=0).law
    for k in ("E", "alpha", "beta"):
        assert getattr(got, k) == pytest.approx(getattr(TRUE, k), rel=0.02), k
    assert got.A == pytest.approx(TRUE.A, rel=0.15) and got.B == pytest.approx(TRUE.B, rel=0.15)


def test_noisy_fit_forecasts_a_held_out_larger_run_within_its_interval():
    n, d, loss = _ladder(0.003, seed=1)
    f = fit(n, d, loss, bootstrap=40)
    assert f.law.E == pytest.approx(TRUE.E, rel=0.1)
    assert f.law.alpha == pytest.approx(TRUE.alpha, rel=0.25) and f.law.beta == pytest.approx(TRUE.beta, rel=0.25)
    big_n, big_d = 1e7, 4e8  # beyond every fitted point in both N and D
    measured = float(TRUE.loss(big_n, big_d)) * np.exp(0.003 * 0.5)
    fc = f.forecast(big_n, big_d)
    lo, hi = fc["interval"]
    assert lo < fc["bpb"] < hi and lo <= measured <= hi
    assert fc["bpb"] == pytest.approx(measured, rel=0.02)
    assert hi / lo < 1.2  # an interval, not a shrug


def test_frontier_and_cheapest_run():
    c = 1e18
    n, d = TRUE.optimal(c)
    assert 6 * n * d == pytest.approx(c)
    best = float(TRUE.loss(n, d))
    for k in (0.5, 2.0):  # any other split of the same compute is worse
        assert float(TRUE.loss(n * k, d / k)) > best
    f = Fit(TRUE)
    cheap = f.cheapest(best)
    assert cheap["compute"] == pytest.approx(c, rel=1e-6) and cheap["params"] == pytest.approx(n, rel=1e-4)
    with pytest.raises(KilnError, match="irreducible"):
        f.cheapest(TRUE.E - 0.01)


def test_fit_round_trips_through_json():
    n, d, loss = _ladder(0.002)
    f = fit(n, d, loss, bootstrap=5)
    g = Fit.from_dict(f.to_dict())
    assert g.forecast(1e7, 1e9) == f.forecast(1e7, 1e9)


# ---- kiln plan fit= / target_bpb= on a synthetic scale.json ------------------------------------
PLAN_LAW = Law(E=0.5, A=400.0, alpha=0.34, B=410.0, beta=0.28)


@pytest.fixture
def scale_dir(tmp_path):
    import json

    rng = np.random.default_rng(0)
    samples = [Law(PLAN_LAW.E * (1 + 0.01 * rng.standard_normal()), PLAN_LAW.A, PLAN_LAW.alpha, PLAN_LAW.B,
                   PLAN_LAW.beta * (1 + 0.01 * rng.standard_normal())) for _ in range(30)]
    (tmp_path / "scale.json").write_text(json.dumps({"fit": Fit(PLAN_LAW, samples, 0.005).to_dict()}))
    return tmp_path


def test_plan_forecasts_the_planned_run(scale_dir, capsys):
    import json

    from kiln import cli

    args = ["plan", "model.preset=llama3-1b", "tokens=1e11", f"fit={scale_dir}"]
    assert cli.main([*args, "json=true"]) == 0
    out = json.loads(capsys.readouterr().out)
    f = out["forecast"]
    n = out["model"]["params"]
    assert f["bpb"] == pytest.approx(float(PLAN_LAW.loss(n, 1e11)))
    lo, hi = f["interval"]
    assert lo < f["bpb"] < hi and hi - lo < 0.2 and f["tokens"] == 1e11
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert f"forecast  {f['bpb']:.4f} validation bits/byte (90% interval {lo:.4f}–{hi:.4f})" in text


def test_plan_target_bpb_gives_the_cheapest_run_with_its_cost(scale_dir, capsys):
    import json

    from kiln import cli

    args = ["plan", "model.preset=llama3-1b", "tokens=1e11", f"fit={scale_dir}", "target_bpb=0.62"]
    assert cli.main([*args, "json=true"]) == 0
    t = json.loads(capsys.readouterr().out)["target"]
    n_opt, d_opt = PLAN_LAW.optimal(t["compute"])
    assert float(PLAN_LAW.loss(n_opt, d_opt)) == pytest.approx(0.62, abs=1e-6)
    assert t["model"]["params"] == pytest.approx(n_opt, rel=0.15)  # the family's nearest shape
    assert t["forecast"]["bpb"] == pytest.approx(0.62, abs=0.005)
    assert t["tokens"] * t["model"]["params"] * 6 == pytest.approx(t["compute"])
    b = t["best"]
    assert b["gpus"] >= 1 and b["days"] > 0 and b["cost"] > 0 and b["gpu_hours"] > 0
    assert t["tokens"] / t["global_batch_tokens"] >= 1000  # a global batch the run can use: 1,000 steps at least
    assert cli.main(args) == 0
    assert "target    0.62 bits/byte: cheapest" in capsys.readouterr().out


def test_a_small_target_run_plans_a_batch_it_can_use_and_few_gpus(scale_dir, capsys):
    """A target the fit expects a small model to reach: the run is planned in global batches that
    give it 1,000 steps (not the 4M tokens of a frontier run, which would make it one step), so
    the data-parallel GPU count is what a batch of a few sequences can feed."""
    import json

    from kiln import cli

    assert cli.main(["plan", "model.preset=gpt2-124m", f"fit={scale_dir}", "target_bpb=5", "json=true"]) == 0
    t = json.loads(capsys.readouterr().out)["target"]
    batch = t["global_batch_tokens"]
    assert t["tokens"] < 1000 * 4_194_304 and batch < 4_194_304 and batch % 1024 == 0
    assert t["tokens"] / batch >= 1000 or batch == 1024
    assert t["best"]["gpus"] <= batch // 1024  # one sequence per data-parallel rank at most


def test_plan_fit_errors(scale_dir, tmp_path, capsys):
    from kiln import cli

    assert cli.main(["plan", "target_bpb=0.6"]) == 2
    assert "needs a scaling fit" in capsys.readouterr().err
    assert cli.main(["plan", f"fit={tmp_path / 'nowhere'}"]) == 2
    assert "run `kiln scale" in capsys.readouterr().err
    assert cli.main(["plan", f"fit={scale_dir}", "target_bpb=0.4"]) == 2
    assert "irreducible" in capsys.readouterr().err
