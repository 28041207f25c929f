"""LoRA vs full fine-tuning on the same model: peak memory and tokens/s of a training step.

Both train the same base (same weights, batch and AdamW as `kiln sft` builds it); LoRA freezes
the base and trains rank-r adapters on all seven projections of every block. The two alternate
in one process, so host noise hits both alike.

Peak memory of a step: on CUDA the allocator's peak; on CPU what is live before the step (weights,
optimizer state) plus the most the allocator hands out during it (activations, gradients,
temporaries; `kiln.train.metrics.allocation_peak`). `kiln plan workload=finetune-lora` estimates
the same two quantities; this measures them.

    python bench/lora.py                          # the quickstart model (mini), seq 256, batch 8, rank 16
    python bench/lora.py --preset small --rank 8 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kiln.config import LoRAConfig, TrainConfig
from kiln.hardware import tune_cpu_allocator
from kiln.model.config import preset
from kiln.model.lora import apply_lora, init_lora
from kiln.model.transformer import Transformer
from kiln.train.metrics import allocation_peak
from kiln.train.objectives import next_token_loss
from kiln.train.optim import build_optimizer


def trainer_step(mc, rank: int, device: torch.device):
    """(one training step, the model): loss, backward, clip, AdamW, zero grads, as the loop runs it."""
    torch.manual_seed(0)
    model = Transformer(mc)
    model.init_weights(0)
    if rank:
        apply_lora(model, LoRAConfig(rank=rank))
        init_lora(model, 0)
    model.to(device).train()
    opt = build_optimizer(model, TrainConfig(lr=1e-4))

    def step(batch):
        loss = next_token_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, model, opt


def static_bytes(model, opt) -> int:
    """Weights and optimizer state: what is live between steps."""
    seen = {id(p): p for p in model.parameters()}
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in [*seen.values(), *state])


def peak_bytes(step, model, opt, batch, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return static_bytes(model, opt) + allocation_peak(lambda: step(batch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    mc = preset(args.preset, vocab_size=args.vocab, max_seq_len=max(args.seq, preset(args.preset).max_seq_len))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device)}
    sides = {"full": trainer_step(mc, 0, device), f"LoRA r={args.rank}": trainer_step(mc, args.rank, device)}
    for step, _, _ in sides.values():  # warm up: optimizer state exists, allocator primed
        step(batch)
    peaks = {name: peak_bytes(*side, batch, device) for name, side in sides.items()}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (step, _, _) in sides.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates[name].append(args.steps * args.batch * args.seq / (time.perf_counter() - t0))
    print(f"bench/lora.py: preset {args.preset} ({mc.num_params() / 1e6:.1f}M params), vocab {args.vocab}, seq "
          f"{args.seq}, batch {args.batch}, {device}, {torch.get_num_threads()} threads")
    print(f"{'':14}{'trainable':>14}{'peak memory':>14}{'tokens/s':>12}")
    for name, (_, model, _) in sides.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{name:14}{trainable:>14,}{peaks[name] / 2**20:>11.1f} MB{statistics.median(rates[name]):>12,.0f}")
    full, lora = list(sides)
    print(f"LoRA / full: peak memory {peaks[lora] / peaks[full]:.2f}×, tokens/s "
          f"{statistics.median(rates[lora]) / statistics.median(rates[full]):.2f}×")


if __name__ == "__main__":
    main()
