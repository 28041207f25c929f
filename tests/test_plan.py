"""`kiln plan`: published facts (weights, Llama 3 GPU-hours, decode speed), measured CPU memory, MFU vs
HFU, per-workload token budgets, the CLI, and every `kiln plan` figure the README quotes."""

from __future__ import annotations

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
    assert re.search(r"^  layout .* compute +HFU +days", out, re.M)


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
