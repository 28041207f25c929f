"""`kiln plan`: published facts (weights, Llama 3 GPU-hours, decode speed), measured CPU memory, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.hooks import RemovableHandle

from kiln import cli
from kiln.config import TrainConfig
from kiln.model.transformer import ModelConfig, Transformer, preset
from kiln.plan import (
    GPUS,
    PlanConfig,
    PlanModelConfig,
    estimate_training_memory,
    inference_estimate,
    plan,
)
from kiln.train.metrics import allocation_peak
from kiln.train.objectives import next_token_loss
from kiln.train.optim import build_optimizer
from kiln.train.parallel import apply_activation_checkpointing

LLAMA3_405B = dict(d_model=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_hidden=53248)


def _gpu_hours(model: str, tokens: float, **kw) -> float:
    cfg = PlanConfig(model=PlanModelConfig(preset=model, **kw.pop("shape", {})), tokens=tokens, gpu="H100", mfu=0.4,
                     **kw)
    return plan(cfg)["best"]["gpu_hours"]


# ---- published facts -------------------------------------------------------------------------
def test_70b_fp16_weights_take_140_gb():
    result = plan(PlanConfig(model=PlanModelConfig(preset="llama3-70b"), workload="inference", precision="fp16"))
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
    inputs, targets = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = next_token_loss(model, (inputs, targets))
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
        next_token_loss(model, (inputs, targets)).backward()
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
    # The issue asks for 25%; the phase model (see estimate_training_memory) lands within 5%.
    assert estimate["total"] == pytest.approx(plain["peak"], rel=0.10)
    # The parts, too, and much closer: these are counted tensor by tensor.
    for part in ("weights", "grads", "optimizer"):
        assert estimate[part] == pytest.approx(plain[part], rel=0.01), part
    assert estimate["activations"] + estimate["logits"] == pytest.approx(plain["activations"], rel=0.01)

    ckpt = _measure_step(cfg, batch, seq_len, checkpointing=True)
    estimate_ckpt = estimate_training_memory(cfg, batch, seq_len, "fp32", activation_checkpointing=True)
    assert estimate_ckpt["total"] == pytest.approx(ckpt["peak"], rel=0.10)
    assert estimate_ckpt["activations"] + estimate_ckpt["logits"] == pytest.approx(
        ckpt["activations"] + plain["one_block"], rel=0.05)


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
    base = dict(model=PlanModelConfig(preset="llama3-8b"), tokens=1e9, seq_len=4096, gpus=8)
    full = plan(PlanConfig(workload="finetune-full", **base))["best"]
    lora = plan(PlanConfig(workload="finetune-lora", **base))["best"]
    assert lora["memory"]["optimizer"] < full["memory"]["optimizer"] / 20
    assert lora["gpu_hours"] < full["gpu_hours"]


@pytest.mark.parametrize("args, message", [
    (["gpu=V100"], "choose one of A100, H100, H200, B200"),
    (["tokens=0"], "tokens=0 must be positive"),
    (["model.preset=llama3-70b", "gpus=8"], "does not fit on 8 × H100"),
    (["precision=fp8", "gpu=A100"], "no fp8"),
])
def test_bad_input_is_one_line(capsys, args, message):
    assert cli.main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
