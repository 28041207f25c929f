"""`kiln plan`: published facts (weights, Llama 3 GPU-hours, decode speed), measured CPU memory, MFU vs
HFU, per-workload token budgets, the CLI, and every `kiln plan` figure the README quotes."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch.utils.hooks import RemovableHandle

from kiln import cli
from kiln.config import TrainConfig
from kiln.model.config import ModelConfig, preset
from kiln.model.transformer import Transformer
from kiln.plan import (
    GPUS,
    Cluster,
    PlanConfig,
    PlanModelSection,
    TrainingJob,
    estimate_training_memory,
    evaluate_layout,
    inference_estimate,
    plan,
)
from kiln.train.metrics import allocation_peak
from kiln.train.objectives import next_token_loss
from kiln.train.optim import build_optimizer
from kiln.train.parallel import apply_activation_checkpointing

LLAMA3_405B = dict(d_model=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_hidden=53248)


def _gpu_hours(model: str, tokens: float, **kw) -> float:
    cfg = PlanConfig(model=PlanModelSection(preset=model, **kw.pop("shape", {})), tokens=tokens, gpu="H100", mfu=0.4,
                     **kw)
    return plan(cfg)["best"]["gpu_hours"]


# ---- published facts -------------------------------------------------------------------------
def test_70b_fp16_weights_take_140_gb():
    result = plan(PlanConfig(model=PlanModelSection(preset="llama3-70b"), workload="inference", precision="fp16"))
    h100 = next(r for r in result["by_gpu"] if r["gpu"] == "H100")
    assert h100["weights_per_gpu"] * h100["gpus"] == pytest.approx(140e9, rel=0.02)


def test_llama3_8b_gpu_hours_right_order_of_magnitude():
    # Meta reports 1.46M H100-hours for Llama 3.1 8B on 15T tokens. By 6·N·D + attention that is
    # ~17% MFU: the 8B ran far below the 405B's 38-43% (and the figure includes long-context
    # stages at up to 128k tokens). At an assumed 40% the plan says ~0.61M: 0.42× the report,
    # so this one is checked to within a factor of three, the 70B and 405B to within two.
    ratio = _gpu_hours("llama3-8b", 15e12) / 1.46e6
    assert 1 / 3 <= ratio <= 2, ratio


def test_llama3_70b_gpu_hours_within_2x_of_reported():
    ratio = _gpu_hours("llama3-70b", 15e12) / 7.0e6
    assert 0.5 <= ratio <= 2, ratio


def test_llama3_405b_gpu_hours_within_2x_of_reported():
    # 16k H100s and a 16M-token batch, as the Llama 3 paper describes; reported 30.84M H100-hours.
    hours = _gpu_hours("llama3-70b", 15.6e12, shape=LLAMA3_405B, gpus=16384, global_batch_tokens=16 * 2**20)
    assert 0.5 <= hours / 30.84e6 <= 2, hours


def test_decode_is_bound_by_hbm_bandwidth():
    model = preset("llama3-8b")
    row = inference_estimate(model, GPUS["H100"], "bf16", batch=1, context=1, price=2.5)
    assert row["bound"] == "memory"
    assert row["tokens_per_s"] == pytest.approx(3350e9 / 16e9, rel=0.05)
    assert row["usd_per_million_tokens"] == pytest.approx(2.5 / 3600 / row["tokens_per_s"] * 1e6)


# ---- the memory model ------------------------------------------------------------------------
def test_fsdp_sharding_shrinks_model_states():
    model = preset("llama3-8b")
    whole = estimate_training_memory(model, 1, 8192, "bf16")
    sharded = estimate_training_memory(model, 1, 8192, "bf16", dp_shard=8)
    assert sharded["optimizer"] == pytest.approx(whole["optimizer"] / 8)
    assert sharded["total"] < whole["total"] / 2
    assert whole["weights"] + whole["grads"] + whole["optimizer"] == pytest.approx(model.num_params() * 18)


def test_activation_checkpointing_shrinks_activations():
    model = preset("llama3-8b")
    plain = estimate_training_memory(model, 1, 8192, "bf16")
    ckpt = estimate_training_memory(model, 1, 8192, "bf16", activation_checkpointing=True)
    assert ckpt["activations"] < plain["activations"] / 10
    assert ckpt["optimizer"] == plain["optimizer"]


def _measure_step(cfg: ModelConfig, batch: int, seq_len: int, checkpointing: bool) -> dict[str, float]:
    """Bytes of one real kiln training step on CPU: params, grads, AdamW state, saved activations, peak.

    Saved activations are summed exactly with saved-tensor hooks (each storage once, parameters
    and buffers left out). With checkpointing the hooks see only each block's stored input; the
    block being recomputed in backward adds one block's activations, measured here by attributing
    saved tensors to the block whose forward saved them. "peak" is the most bytes the CPU
    allocator had handed out at once during a second step (profiler memory events), plus the
    parameters and optimizer state already live when it began.
    """
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0)
    optimizer = build_optimizer(model, TrainConfig())
    if checkpointing:
        apply_activation_checkpointing(model)
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, tuple[int, str]] = {}
    current = [""]
    hooks: list[RemovableHandle] = []
    for name, block in model.layers.items():
        hooks.append(block.register_forward_pre_hook(lambda _m, _a, name=name: current.__setitem__(0, name)))
        hooks.append(block.register_forward_hook(lambda *_: current.__setitem__(0, "")))

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned and ptr not in saved:
            saved[ptr] = (t.untyped_storage().nbytes(), current[0])
        return t

    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    data = {"input_ids": tokens[:, :-1].clone(), "labels": tokens[:, 1:].clone()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = next_token_loss(model, data)
    for h in hooks:
        h.remove()
    loss.backward()
    optimizer.step()
    params = {id(p): p for p in model.parameters()}.values()
    per_block: dict[str, int] = {}
    for nbytes, block in saved.values():
        per_block[block] = per_block.get(block, 0) + nbytes
    out = {
        "weights": sum(p.nbytes for p in params),
        "grads": sum(p.grad.nbytes for p in params),
        "optimizer": sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
        "activations": sum(nbytes for nbytes, _ in saved.values()),
        "one_block": max(v for k, v in per_block.items() if k),
    }
    del loss
    optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        next_token_loss(model, data).backward()
        optimizer.step()

    peak = allocation_peak(step)
    out["peak"] = out["weights"] + out["optimizer"] + peak
    return out


@pytest.mark.parametrize("shape, batch, seq_len", [
    (dict(name="tiny"), 4, 128),
    (dict(name="mini", n_layers=4), 4, 256),
    (dict(name="small", vocab_size=4096), 2, 256),  # grouped-query attention: 6 query heads share 2 KV heads
])
def test_memory_estimate_matches_measured_cpu_run(shape, batch, seq_len):
    shape = {"vocab_size": 512, **shape}
    cfg = preset(shape.pop("name"), **shape)
    plain = _measure_step(cfg, batch, seq_len, checkpointing=False)
    estimate = estimate_training_memory(cfg, batch, seq_len, "fp32")
    # The README quotes this bound ("within 4% over 6 configurations"): the phase model (see
    # estimate_training_memory) lands within 3.8% here, and the measurement is deterministic.
    assert estimate["total"] == pytest.approx(plain["peak"], rel=0.04)
    # The parts, too, and much closer: these are counted tensor by tensor.
    for part in ("weights", "grads", "optimizer"):
        assert estimate[part] == pytest.approx(plain[part], rel=0.01), part
    assert estimate["activations"] + estimate["logits"] == pytest.approx(plain["activations"], rel=0.01)

    ckpt = _measure_step(cfg, batch, seq_len, checkpointing=True)
    estimate_ckpt = estimate_training_memory(cfg, batch, seq_len, "fp32", activation_checkpointing=True)
    assert estimate_ckpt["total"] == pytest.approx(ckpt["peak"], rel=0.04)
    assert estimate_ckpt["activations"] + estimate_ckpt["logits"] == pytest.approx(
        ckpt["activations"] + plain["one_block"], rel=0.05)


# ---- MFU, HFU and checkpointing ------------------------------------------------------------
H100_CLUSTER = Cluster(GPUS["H100"], gpus_per_node=8, nvlink_bytes_s=450e9, ib_bytes_s=50e9, price=2.5,
                       max_memory_fraction=0.9)


def _job(checkpointing: str, lora_rank: int = 0) -> TrainingJob:
    return TrainingJob(preset("llama3-8b"), tokens=1e9, seq_len=8192, precision="bf16", mfu=0.4, micro_batch=1,
                       global_batch_tokens=2**20, lora_rank=lora_rank, activation_checkpointing=checkpointing)


def test_checkpointing_takes_the_same_time_at_the_same_mfu():
    # MFU counts model FLOPs only, so recomputing the forward costs HFU, not days: the same layout
    # with checkpointing on and off takes the same compute time, and on needs MFU × 4/3 of HFU
    # (a training step is forward + backward = 3 forwards; checkpointing adds a fourth).
    on = evaluate_layout(_job("on"), H100_CLUSTER, dp_replicate=1, dp_shard=8, tp=1, pp=1)
    off = evaluate_layout(_job("off"), H100_CLUSTER, dp_replicate=1, dp_shard=8, tp=1, pp=1)
    assert on.checkpointing and not off.checkpointing
    assert on.compute_s == pytest.approx(off.compute_s)
    assert on.days == pytest.approx(off.days)
    assert off.hfu == pytest.approx(0.4) and off.recompute_flops == 0
    assert on.hfu == pytest.approx(0.4 * 4 / 3)
    # 8B model FLOPs on 1e9 tokens at 8192 context: 6·N·D + attention ≈ 5.8e19; a third of it recomputed.
    assert on.recompute_flops == pytest.approx(5.8e19 / 3, rel=0.02)


def test_lora_recompute_is_a_larger_share():
    # LoRA skips the frozen weights' gradient, so its backward is cheaper and the recomputed
    # forward is a larger share of the step: HFU between MFU × 4/3 and MFU × 3/2.
    on = evaluate_layout(_job("on", lora_rank=16), H100_CLUSTER, dp_replicate=1, dp_shard=8, tp=1, pp=1)
    off = evaluate_layout(_job("off", lora_rank=16), H100_CLUSTER, dp_replicate=1, dp_shard=8, tp=1, pp=1)
    assert on.compute_s == pytest.approx(off.compute_s)
    assert 0.4 * 4 / 3 < on.hfu < 0.4 * 3 / 2


def test_plan_reports_hfu_in_table_and_json(capsys):
    args = ["plan", "model.preset=llama3-8b", "gpus=64", "tokens=1e9", "activation_checkpointing=on"]
    assert cli.main([*args, "json=true"]) == 0
    best = json.loads(capsys.readouterr().out)["best"]
    assert best["checkpointing"] and best["hfu"] == pytest.approx(0.4 * 4 / 3)
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "so MFU 40% takes HFU 53%" in out
    assert re.search(r"^  layout .* compute +exposed +bubble +step +HFU +days", out, re.M)


def test_unreachable_hfu_is_flagged():
    result = plan(PlanConfig(tokens=1e9, gpus=64, mfu=0.9, activation_checkpointing="on"))
    assert "needs HFU 120% for MFU 90%" in result["note"]


# ---- token budgets ---------------------------------------------------------------------------
@pytest.mark.parametrize("workload, tokens", [
    ("pretrain", 15e12), ("finetune-full", 1e9), ("finetune-lora", 1e9), ("inference", 1e9)])
def test_each_workload_has_its_own_default_token_budget(workload, tokens):
    result = plan(PlanConfig(workload=workload, model=PlanModelSection(preset="small"), seq_len=256,
                             global_batch_tokens=65536, gpus=8))
    assert result["tokens"] == tokens and result["tokens_default"]


def test_70b_lora_on_8_gpus_takes_days_not_decades(capsys):
    assert cli.main(["plan", "model.preset=llama3-70b", "workload=finetune-lora", "gpus=8"]) == 0
    out = capsys.readouterr().out
    assert "1B tokens (default for finetune-lora; set tokens=)" in out
    days = float(re.search(r"^ +([\d.]+) days,", out, re.M).group(1))
    assert 0.5 < days < 5, days
    assert cli.main(["plan", "model.preset=llama3-70b", "workload=finetune-lora", "gpus=8", "tokens=2e9"]) == 0
    out = capsys.readouterr().out
    assert "— 2B tokens, seq_len" in out and "default for" not in out
    assert float(re.search(r"^ +([\d.]+) days,", out, re.M).group(1)) == pytest.approx(2 * days, rel=0.05)


def test_inference_cost_column_says_what_it_costs(capsys):
    assert cli.main(["plan", "workload=inference", "model.preset=llama3-8b", "tokens=5e9"]) == 0
    out = capsys.readouterr().out
    assert "serving 5B tokens;" in out and "$ for 5B tokens" in out and "15T" not in out


# ---- the verb --------------------------------------------------------------------------------
def test_cli_prints_json(capsys):
    assert cli.main(["plan", "model.preset=llama3-8b", "json=true"]) == 0
    result = json.loads(capsys.readouterr().out)
    best = result["best"]
    assert best["fits"] and not best["comm_bound"]
    assert best["memory"]["total"] <= 80e9
    assert {r["gpu"] for r in result["by_gpu"]} == set(GPUS)
    assert result["assumptions"]["prices_are_assumptions"]


def test_a_pretraining_plan_of_too_few_steps_says_so_and_what_batch_to_plan(capsys):
    """2.5B tokens in 4M-token steps are 596 optimizer steps: the plan says so, with the batch that
    gives at least 1,000 steps (a power of two of sequences); enough steps, no warning."""
    from kiln.plan import MIN_PRETRAIN_STEPS, batch_for_steps

    assert batch_for_steps(2.5e9, 1024, 4_194_304) == 2_097_152  # 2048 sequences: 1,192 steps
    assert batch_for_steps(1e6, 1024, 4_194_304) == 1024  # one sequence at least (976 steps)
    assert batch_for_steps(1e12, 1024, 4_194_304) == 4_194_304  # 238k steps: the batch as planned
    assert cli.main(["plan", "model.preset=gpt2-124m", "tokens=2.5e9", "json=true"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == pytest.approx(2.5e9 / 4_194_304) and result["steps"] < MIN_PRETRAIN_STEPS
    assert "596 optimizer steps" in result["warning"] and "global_batch_tokens=2097152 gives 1,192 steps" in \
        result["warning"]
    assert cli.main(["plan", "model.preset=gpt2-124m", "tokens=2.5e9"]) == 0
    assert f"warning {result['warning']}" in capsys.readouterr().out
    for args in (["tokens=2.5e9", "global_batch_tokens=2097152"], ["tokens=1e11"], ["tokens=1e6", "workload=finetune-full"]):
        assert cli.main(["plan", "model.preset=gpt2-124m", *args, "json=true"]) == 0
        assert "warning" not in json.loads(capsys.readouterr().out)


def test_a_jobs_start_up_is_paid_on_every_gpu_so_a_small_run_stays_on_few(capsys):
    """Ten minutes before the first step on every GPU (`startup_minutes`): added to the days and
    paid for. Without it, cost does not depend on the count and a 2.5B-token GPT-2 run spreads over
    as many GPUs as its batch has sequences, for seconds."""
    runs = {}
    for minutes in (0, 10):
        assert cli.main(["plan", "model.preset=gpt2-124m", "tokens=2.5e9", f"startup_minutes={minutes}", "json=true"]) == 0
        runs[minutes] = json.loads(capsys.readouterr().out)["best"]
    assert runs[0]["gpus"] >= 1024 and runs[0]["days"] * 86400 < 10
    best = runs[10]
    assert best["gpus"] <= 8 and best["days"] * 86400 > 600
    train_s = best["days"] * 86400 - 600  # the steps' time, the start-up taken off
    assert best["gpu_hours"] == pytest.approx(best["gpus"] * (train_s + 600) / 3600)
    assert train_s == pytest.approx(2.5e9 / best["step_tokens"] * best["step_s"], rel=1e-6)


def test_cli_prints_tables_for_training_and_inference(capsys):
    assert cli.main(["plan", "model.preset=small", "tokens=1e9", "seq_len=256", "global_batch_tokens=65536"]) == 0
    out = capsys.readouterr().out
    assert "best" in out and "communication per step" in out and "an assumption" in out
    assert cli.main(["plan", "workload=inference", "model.preset=llama3-70b", "inference.batch=8"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in GPUS) and "$/M tokens" in out


def test_lora_needs_less_memory_than_full_fine_tuning():
    base = dict(model=PlanModelSection(preset="llama3-8b"), tokens=1e9, seq_len=4096, gpus=8)
    full = plan(PlanConfig(workload="finetune-full", **base))["best"]
    lora = plan(PlanConfig(workload="finetune-lora", **base))["best"]
    assert lora["memory"]["optimizer"] < full["memory"]["optimizer"] / 20
    assert lora["gpu_hours"] < full["gpu_hours"]


@pytest.mark.parametrize("args, message", [
    (["gpu=V100"], "choose one of A100, H100, H200, B200"),
    (["tokens=-1"], "'tokens' = -1.0 is out of range: it must be ≥ 0"),
    (["mfu=1.5"], "'mfu' = 1.5 is out of range: it must be > 0 and ≤ 1"),
    (["lora.rank=0"], "'lora.rank' = 0 is out of range: it must be ≥ 1"),
    (["inference.context=0"], "'inference.context' = 0 is out of range"),
    (["gpus=12"], "gpus=12 is not a whole number of nodes"),
    (["model.preset=llama9"], "'llama9'"),  # one line naming the bad preset (at load or at build)
    (["model.preset=llama3-70b", "gpus=8"], "does not fit on 8 × H100"),
    (["precision=fp8", "gpu=A100"], "no fp8"),
])
def test_bad_input_is_one_line(capsys, args, message):
    assert cli.main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ---- the README ------------------------------------------------------------------------------
README = Path(__file__).resolve().parents[1] / "README.md"
# The README is the front door; the `kiln plan` section (and its quoted output) is docs/planning.md.
DOCS = [README, *sorted((README.parent / "docs").glob("*.md"))]


def _readme_plan_examples() -> list[tuple[str, list[str]]]:
    """(arguments, quoted output lines) for each `kiln plan` command in the README and docs/*.md.

    An indented `$ kiln plan ARGS  # comment` line is followed by the lines of its output it
    quotes; "…" marks a cut. An inline `kiln plan ARGS` code span quotes nothing but must run.
    """
    examples = []
    for doc in DOCS:
        text = doc.read_text()
        lines = text.splitlines()
        for i, line in enumerate(lines):
            m = re.match(r" {4}\$ kiln plan ([^#]*)", line)
            if m:
                quoted = []
                for nxt in lines[i + 1:]:
                    if not nxt.startswith("    ") or nxt.lstrip().startswith("$ "):
                        break
                    quoted.append(nxt)
                examples.append((m.group(1).strip(), quoted))
        examples += [(m.group(1).strip(), []) for m in re.finditer(r"`kiln plan ([^`]*)`", text)]
    return examples


def _squash(line: str) -> str:
    return " ".join(line.split())


def _in_order(line: str, pieces: list[str]) -> bool:
    at = 0
    for piece in pieces:
        at = line.find(piece, at)
        if at < 0:
            return False
        at += len(piece)
    return True


def test_readme_quotes_plan_output():
    assert sum(1 for _, quoted in _readme_plan_examples() if quoted) >= 5


@pytest.mark.parametrize("args, quoted", _readme_plan_examples(), ids=lambda x: x if isinstance(x, str) else "")
def test_readme_plan_figures_are_what_plan_prints(capsys, args, quoted):
    # Every figure the README quotes from `kiln plan` is regenerated here from the command it
    # quotes: each quoted line, spaces squashed and cut at "…", must be in one output line, in order.
    assert cli.main(["plan", *args.split()]) == 0, capsys.readouterr().err
    out = [_squash(line) for line in capsys.readouterr().out.splitlines()]
    for line in quoted:
        pieces = [p for p in (_squash(x) for x in line.split("…")) if p]
        assert any(_in_order(o, pieces) for o in out), (
            f"README quotes {line.strip()!r}; `kiln plan {args}` does not print it")


# ---- what a person rents: the objective and the time/cost frontier ----------------------------
def _frontier_ok(points: list[dict]) -> bool:
    """No point is at least as fast and as cheap as another while better in one of the two."""
    return not any(q is not p and q["days"] <= p["days"] and q["cost"] <= p["cost"]
                   and (q["days"] < p["days"] or q["cost"] < p["cost"]) for p in points for q in points)


def test_headline_is_the_fastest_count_within_the_cost_tolerance(capsys):
    # 7B-class on 140B tokens: cost is nearly flat across GPU counts, so "the fewest GPUs that finish
    # within max_days" would rent 4 GPUs for two months. The default objective (balanced) takes the
    # fastest count whose cost is within cost_tolerance (5%) of the cheapest that finishes in time.
    result = plan(PlanConfig(tokens=140e9))
    best, counts = result["best"], [c for c in result["counts"] if c["days"] <= 90]
    fewest = min(counts, key=lambda p: p["gpus"])  # the old headline: 4 GPUs for two months
    assert best["days"] < fewest["days"] / 4 and best["cost"] <= fewest["cost"] * 1.05
    cheapest = min(p["cost"] for p in counts)
    assert best["days"] == min(p["days"] for p in counts if p["cost"] <= cheapest * 1.05)
    frontier = result["frontier"]  # cheapest first, each faster than the one before
    assert _frontier_ok(frontier) and best in frontier and frontier[0]["cost"] == pytest.approx(cheapest, rel=1e-6)
    assert [p["days"] for p in frontier] == sorted((p["days"] for p in frontier), reverse=True)
    cheapest = frontier[0]
    assert best["days"] == min(p["days"] for p in frontier if p["cost"] <= cheapest["cost"] * 1.05)
    assert result["objective"]["name"] == "balanced" and result["objective"]["cost_tolerance"] == 0.05
    # The other objectives, one config key each.
    cheap = plan(PlanConfig(tokens=140e9, objective="cheapest"))["best"]
    assert cheap["cost"] == cheapest["cost"] and cheap["days"] == cheapest["days"]
    fast = plan(PlanConfig(tokens=140e9, objective="fastest"))["best"]
    assert fast["days"] == min(p["days"] for p in frontier)
    wide = plan(PlanConfig(tokens=140e9, cost_tolerance=0.5))["best"]
    assert best["days"] >= wide["days"] and wide["cost"] <= cheapest["cost"] * 1.5
    # The table says what the rule is and shows the frontier it chose from.
    assert cli.main(["plan", "model.preset=llama3-8b", "tokens=140e9"]) == 0
    out = capsys.readouterr().out
    assert "objective balanced: the fastest GPU count costing at most 5% more than the cheapest" in out
    assert "time/cost frontier" in out and "cheapest" in out


def test_frontier_drops_dominated_counts():
    # Every count's best layout is in "counts"; the frontier keeps those no other count beats on both.
    result = plan(PlanConfig(tokens=140e9))
    counts, frontier = result["counts"], result["frontier"]
    assert len(frontier) < len(counts) or _frontier_ok(counts)
    for p in counts:
        if p not in frontier:
            assert any(q["days"] <= p["days"] and q["cost"] <= p["cost"] * (1 + 1e-6) for q in frontier)


# ---- step time: compute, exposed communication, pipeline bubble -----------------------------
def _job70(**kw) -> TrainingJob:
    base = dict(tokens=1.4e12, seq_len=8192, precision="bf16", mfu=0.4, micro_batch=0, global_batch_tokens=2**22,
                lora_rank=0, activation_checkpointing="auto")
    return TrainingJob(preset("llama3-70b"), **{**base, **kw})


def test_tensor_parallel_traffic_is_on_the_critical_path():
    # TP all-gathers / reduce-scatters sit between the matmuls of every layer: nothing hides them
    # (70B on 256 H100s as 8×2×8×2 with 32 micro-batches of 1 sequence: 2.67 s of TP traffic per step).
    lay = evaluate_layout(_job70(micro_batch=1), H100_CLUSTER, dp_replicate=8, dp_shard=2, tp=8, pp=2)
    tp_s = lay.comm["tp"]["seconds"]
    assert tp_s > 2 and lay.step_s >= lay.compute_s + tp_s
    assert lay.comm["tp"]["exposed"] == pytest.approx(tp_s)
    parts = lay.compute_s + lay.exposed_comm_s + lay.bubble_s
    assert lay.step_s == pytest.approx(parts)


def test_fsdp_traffic_hides_behind_compute_up_to_the_compute_it_overlaps():
    # One node of FSDP on NVLink: the gathers and reduce-scatters take far less than the compute they
    # overlap, so none of it is exposed and the step is the compute.
    job = _job("off")
    fast = evaluate_layout(job, H100_CLUSTER, dp_replicate=1, dp_shard=8, tp=1, pp=1)
    assert 0 < fast.comm["fsdp"]["seconds"] < fast.compute_s / 3 and fast.step_s == pytest.approx(fast.compute_s)
    # A slower link: the traffic outgrows the compute it overlaps phase by phase (the forward's
    # all-gather against the forward, the backward's all-gather + reduce-scatter against the
    # backward, twice the forward's compute). At 40 GB/s the forward's gather still hides and the
    # backward's traffic does not: exposed is the backward's excess alone, not traffic - compute.
    slow = dataclasses.replace(H100_CLUSTER, nvlink_bytes_s=40e9)
    lay = evaluate_layout(job, slow, dp_replicate=1, dp_shard=8, tp=1, pp=1)
    ag = lay.comm["fsdp"]["seconds"] / 4  # all-gather 2 bytes, again backward, reduce-scatter 4 (fp32)
    fwd, bwd = lay.compute_s / 3, lay.compute_s * 2 / 3
    assert ag < fwd and 3 * ag > bwd
    exposed = 3 * ag - bwd
    assert lay.step_s > max(lay.compute_s, 4 * ag) and lay.step_s == pytest.approx(lay.compute_s + exposed)
    assert lay.comm["fsdp"]["exposed"] == pytest.approx(exposed) and fast.comm["fsdp"]["exposed"] == 0


def test_ddp_gradient_all_reduce_overlaps_only_the_last_backward():
    # DDP skips the all-reduce on accumulation micro-batches and overlaps it with the last one's
    # backward: with m micro-batches the window is (2/3)·compute/m.
    job = _job("on")
    slow = dataclasses.replace(H100_CLUSTER, nvlink_bytes_s=20e9)
    lay = evaluate_layout(job, slow, dp_replicate=8, dp_shard=1, tp=1, pp=1)
    m, dp = lay.microbatches, lay.comm["dp"]
    assert m == 2**20 // 8192 // 8
    exposed = max(0, dp["seconds"] - lay.compute_s * 2 / 3 / m)
    assert exposed > 0 and lay.step_s == pytest.approx(lay.compute_s + exposed)
    assert dp["exposed"] == pytest.approx(exposed)


def test_pipeline_bubble_and_the_chosen_micro_batches():
    # 1F1B and GPipe idle (p-1)/(m+p-1) of the step; the planner picks the micro-batch size (so the
    # count m) and schedule that give the shortest step within memory.
    job = _job70()
    lay = evaluate_layout(job, H100_CLUSTER, dp_replicate=4, dp_shard=2, tp=8, pp=4)
    p, m = lay.pp, lay.microbatches
    assert lay.bubble_s / lay.step_s == pytest.approx((p - 1) / (m + p - 1), rel=0.05)
    assert lay.schedule in ("1f1b", "gpipe")
    seqs = job.global_batch_tokens // (8 * job.seq_len)
    options = [evaluate_layout(job, H100_CLUSTER, 4, 2, 8, 4, micro_batch=b, schedule=s)
               for b in (1, 2, 4, 8, 16) if seqs % b == 0 for s in ("1f1b", "gpipe")]
    assert lay.step_s == pytest.approx(min(o.step_s for o in options if o.fits))
    fewer = evaluate_layout(job, H100_CLUSTER, 4, 2, 8, 4, micro_batch=16, schedule="1f1b")
    assert fewer.microbatches == seqs // 16 and fewer.bubble_s > lay.bubble_s
    # GPipe holds every micro-batch's activations at once, 1F1B at most p: same bubble, more memory.
    gpipe = evaluate_layout(job, H100_CLUSTER, 4, 2, 8, 4, micro_batch=1, schedule="gpipe")
    onef = evaluate_layout(job, H100_CLUSTER, 4, 2, 8, 4, micro_batch=1, schedule="1f1b")
    assert gpipe.memory["total"] > onef.memory["total"] or gpipe.checkpointing and not onef.checkpointing


def test_plan_prints_the_step_time_breakdown(capsys):
    # 70B on 24 H100s: the planner picks tp 2 × pp 4, so the step has TP traffic and a bubble.
    assert cli.main(["plan", "model.preset=llama3-70b", "tokens=1e10", "gpus=24"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("        step "))
    nums = re.search(r"step ([\d.]+) s = compute ([\d.]+) s .*\+ exposed communication ([\d.]+) (m?s).*"
                     r"\+ pipeline bubble ([\d.]+) (m?s)", line)
    assert nums, line
    step, compute, comm, comm_unit, bubble, bubble_unit = nums.groups()
    total = float(compute) + float(comm) / (1000 if comm_unit == "ms" else 1) + \
        float(bubble) / (1000 if bubble_unit == "ms" else 1)
    assert float(step) == pytest.approx(total, abs=0.02)
    assert float(comm) > 1 and comm_unit == "s" and float(bubble) > 1 and bubble_unit == "s"
    assert re.search(r"exposed communication [\d.]+ s \(TP [\d.]+ s, PP \d+ ms\)", line)
    assert re.search(r"\(pp 4, \d+ micro-batches: \d+% idle\)", line)
    assert re.search(r"^  layout .* exposed +bubble +step", out, re.M)


# ---- advice only where it changes something -------------------------------------------------
def test_no_fit_advice_names_only_settings_that_differ_and_what_they_buy(capsys):
    # 70B on 16 H100s: the model states alone (18 B/param) overflow. Defaults are in effect, so the
    # error must not suggest micro_batch=1 or activation_checkpointing=auto; it names the fewest GPUs
    # and a bigger GPU that fit, each with the peak memory it gives.
    assert cli.main(["plan", "model.preset=llama3-70b", "gpus=16"]) == 2
    err = capsys.readouterr().err
    assert "micro_batch" not in err and "activation_checkpointing" not in err and "seq_len" not in err
    assert re.search(r"each of these fits: gpus=24 → peak [\d.]+ GB per GPU as 1×3×2×4; gpu=H200 \(141 GB\) → peak", err)
    assert err.count("\n") == 1
    # The user's own settings that stand in the way are named, each with what changing it buys.
    assert cli.main(["plan", "model.preset=llama3-70b", "gpus=64", "micro_batch=4", "activation_checkpointing=off"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"activation_checkpointing=auto \(yours is off\) → peak [\d.]+ GB per GPU as ", err), err
    assert re.search(r"micro_batch=1 \(yours is 4\) → peak [\d.]+ GB per GPU as ", err), err
    # A change already in effect is not advice: with checkpointing on, it is not suggested.
    assert cli.main(["plan", "model.preset=llama3-70b", "gpus=64", "micro_batch=4", "activation_checkpointing=on"]) in (0, 2)
    assert "activation_checkpointing=" not in capsys.readouterr().err
