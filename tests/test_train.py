"""The training loop: it learns, accumulation is exact, the spike guard skips and stops, schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY_TRAIN, check_plan_vs_run, kiln
from kiln.config import Config, TrainConfig, load
from kiln.data.shards import TokenLoader
from kiln.errors import KilnError
from kiln.model.transformer import Transformer
from kiln.train import parallel
from kiln.train.objectives import LanguageModeling
from kiln.train.optim import lr_at
from kiln.train.trainer import Trainer
from kiln.workloads.common import model_config_for


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_learns_and_logs_every_field(run_dir):
    assert kiln("pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=80", "train.lr=1e-2", "train.batch_size=16",
                "train.log_every=5", "train.eval_every=40", "train.ckpt_every=40") == 0
    m = metrics(run_dir)
    for field in ("step", "loss", "lr", "tokens_per_s", "mfu", "grad_norm", "elapsed_s"):
        assert field in m[1], field
    evals = [r for r in m if "val_bpb" in r]
    assert [r["step"] for r in evals] == [0, 40, 80]
    assert m[-1]["loss"] < math.log(512) - 1.0  # from ~ln(512) at init down well below
    baseline = json.loads((run_dir / "data" / "manifest.json").read_text())["unigram_bpb"]
    assert evals[-1]["val_bpb"] < baseline  # better than token frequencies alone
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000080"
    planned = check_plan_vs_run(run_dir)
    assert abs(planned["error"]["peak_memory_bytes"]) < 0.1


def _trainer(run_dir, overrides, objective=None):
    cfg = load(Config, None, [f"out={run_dir}", *TINY_TRAIN, *overrides])
    env = parallel.init_env(cfg)
    torch.manual_seed(0)
    model = parallel.build_model(lambda: Transformer(model_config_for(cfg, 512)), cfg, env, lambda m: m.init_weights(0))
    loader = TokenLoader(run_dir / "data", "train", cfg.train.batch_size, cfg.train.seq_len, 0)
    return Trainer(cfg, model, env, loader, objective or LanguageModeling())


def test_gradient_accumulation_equals_the_larger_batch(run_dir):
    big = _trainer(run_dir, ["train.batch_size=8"])
    acc = _trainer(run_dir, ["train.batch_size=4", "train.tokens_per_step=512"])
    assert acc.accum == 2
    lb, _, _ = big.train_step()
    la, _, _ = acc.train_step()
    assert la == pytest.approx(lb, rel=1e-5)
    for pb, pa in zip(big.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-4)


def test_tokens_per_step_must_be_a_multiple_of_the_micro_batch(run_dir):
    with pytest.raises(KilnError, match="not a multiple of one micro-batch"):
        _trainer(run_dir, ["train.tokens_per_step=300"])


def test_spike_guard_skips_bad_steps_then_stops_the_run(run_dir):
    calls = {"n": 0}

    class Flaky(LanguageModeling):
        def loss(self, model, batch):
            calls["n"] += 1
            loss, metrics = super().loss(model, batch)
            return (loss * float("nan") if calls["n"] in (3,) or calls["n"] >= 8 else loss), metrics

    tr = _trainer(run_dir, ["train.max_steps=20", "train.max_bad_steps=3", "train.ckpt_every=1000",
                            "train.eval_every=1000"], objective=Flaky())
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    with pytest.raises(KilnError, match="training diverged: 3 bad steps in a row"):
        tr.fit()
    assert tr.guard.skipped == 4  # step 3, then 8, 9, 10
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())  # NaN never reached the weights
    assert any(not torch.equal(before[n], p) for n, p in tr.model.named_parameters())


def test_schedules_warm_up_then_decay_to_the_floor():
    tc = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=100)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(100, tc) == pytest.approx(0.1)
    assert lr_at(55, tc) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0
    assert lr_at(90, wsd) == pytest.approx(0.5) and lr_at(100, wsd) == pytest.approx(0.0)


def test_weight_decay_applies_to_matrices_only(run_dir):
    tr = _trainer(run_dir, [])
    decay, no_decay = tr.optimizer.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])


def test_activation_checkpointing_gives_the_same_gradients(run_dir):
    plain = _trainer(run_dir, [])
    ac = _trainer(run_dir, ["train.activation_checkpointing=true"])
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    assert all(isinstance(b, CheckpointWrapper) for b in ac.model.layers.values())  # the config key applied it
    assert plain.train_step()[0] == pytest.approx(ac.train_step()[0], rel=1e-6)
    for a, b in zip(plain.model.parameters(), ac.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_cpu_allocator_tuning_stops_per_step_page_faults():
    import resource

    from kiln.hardware import tune_cpu_allocator

    assert tune_cpu_allocator()

    def faults_for_big_allocations() -> int:
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.ones(8 << 20).sum()  # 32 MB, freed each time
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

    faults_for_big_allocations()
    assert faults_for_big_allocations() < 1000  # untuned glibc faults ~8000 pages per 32 MB block


def test_an_interrupted_run_names_the_checkpoint_a_rerun_continues_from(run_dir, capsys, monkeypatch):
    """Ctrl-C during a training verb: the one line says which checkpoint `kiln VERB out=...`
    continues from and which steps it will redo."""
    from kiln.train.trainer import Trainer

    real = Trainer.train_step

    def interrupted_at_step_4(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_step_4)
    assert kiln("pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=6", "train.ckpt_every=2") == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kiln pretrain: interrupted after step 3;") and "checkpoint of step 2" in err
    assert f"kiln pretrain out={run_dir}" in err and err.endswith("redoing step 3")


@pytest.mark.parametrize("retimed_rate", [1e15, 1e3])
def test_an_mfu_above_100_percent_retimes_the_peak_and_is_never_printed_as_a_result(
        run_dir, capsys, monkeypatch, tmp_path, retimed_rate):
    """The matmul peak timed while the host was busy reads low, so a step's MFU reads above 100%:
    the Trainer re-times the peak and recomputes that step's MFU; if it still reads above 100%
    the line marks it unreliable instead of printing it as a figure."""
    from kiln import hardware

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "_PEAK_CACHE", {})
    rates = iter([1e3] * 5 + [retimed_rate] * 100)  # 5 timings at 1024³ at the start, then the re-times
    monkeypatch.setattr(hardware, "measure_matmul_peak", lambda device, *a, **kw: next(rates))
    t = _trainer(run_dir, ["train.max_steps=4", "train.log_every=1", "train.eval_every=100", "train.ckpt_every=100"])
    t.flops_per_token = 1e6  # ~1e9 FLOP/s on this host: far above a 1 kFLOP/s "peak"
    t.fit()
    out = capsys.readouterr().out
    steps = [line for line in out.splitlines() if line.startswith("pretrain: step ") and "| loss " in line]
    assert len(steps) == 4 and "warm-up: not timed" in steps[0]  # the first step is warm-up: no MFU
    steps = steps[1:]
    assert "re-timed" in out
    m = [r for r in metrics(run_dir) if "mfu" in r]
    for line, r in zip(steps, m):
        mfu = line.split("| MFU ")[1].split(" |")[0]
        if retimed_rate > 1e9:  # the re-time found the real peak: that step's MFU is recomputed against it
            assert r["mfu"] <= 1 and r["peak_flops"] == retimed_rate and "mfu_unreliable" not in r
            assert mfu.endswith("%") and float(mfu[:-1]) <= 100
        else:  # still above 100%: marked, not printed as a result
            assert r["mfu"] > 1 and r["mfu_unreliable"] is True
            assert "unreliable" in mfu
    if retimed_rate > 1e9:
        assert sum("re-timed" in line for line in out.splitlines()) == 1  # later steps read ≤ 100%


def _seconds(text: str) -> float:
    h = m = s = 0
    for value, unit in __import__("re").findall(r"(\d+)([hms])", text):
        h, m, s = (int(value), m, s) if unit == "h" else (h, int(value), s) if unit == "m" else (h, m, int(value))
    return 3600 * h + 60 * m + s


@pytest.mark.parametrize("resumed", [False, True], ids=["first-step", "first-step-after-resume"])
def test_a_slow_first_step_is_warm_up_left_out_of_tok_s_mfu_and_eta(run_dir, capsys, monkeypatch, resumed):
    """torch.compile's warm-up makes the first step of a run (and of a resume) slow: its line says
    warm-up instead of a rate, and the next lines' tok/s, MFU and ETA do not count it."""
    slow_s = 3.0
    if resumed:
        _trainer(run_dir, ["train.max_steps=2", "train.ckpt_every=2", "train.eval_every=100"]).fit()
        capsys.readouterr()
    t = _trainer(run_dir, ["train.max_steps=6", "train.log_every=1", "train.eval_every=100", "train.ckpt_every=100",
                           *(["resume=auto"] if resumed else [])])
    if resumed:
        t.resume_from(t.ckpt.latest_intact())
    first = t.step + 1
    real = Trainer.train_step

    def compiling_first(self):
        if self.step == first - 1:
            import time

            time.sleep(slow_s)  # what compiling the blocks costs the first step
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", compiling_first)
    t.fit()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("pretrain: step ") and "| loss " in ln]
    assert [int(ln.split()[2].split("/")[0]) for ln in lines] == list(range(first, 7))
    assert "warm-up" in lines[0] and "tok/s" not in lines[0].split("warm-up")[0] and "MFU " not in lines[0], lines[0]
    assert lines[0].endswith("ETA after warm-up"), lines[0]
    for ln in lines[1:]:
        assert "warm-up" not in ln and "| MFU " in ln, ln
        assert _seconds(ln.split("ETA ")[1]) < slow_s, ln  # the remaining steps at the steady rate
    m = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    assert m[first].get("warmup") is True and "tokens_per_s" not in m[first] and "mfu" not in m[first]
    second = m[first + 1]
    assert "warmup" not in second and t.tokens_per_step / second["tokens_per_s"] < slow_s / 2
    assert second["elapsed_s"] >= slow_s  # the run's own clock still counts it
