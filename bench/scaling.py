"""Data-parallel scaling on this machine: tokens/s per process for 1 vs 2 processes (DDP, FSDP2),
and how much of a step is communication.

Three 2-process variants alternate inside one torchrun launch, so host noise hits them alike:
`independent` (each process trains its own copy, no communication: the compute time of one step
under exactly the CPU contention of the other two), `ddp` and `fsdp`. The communication share of a
step is (t_layout − t_independent) / t_layout: everything data parallelism adds (collectives,
waiting for the slower rank, FSDP's gather/shard copies). The bare collectives are timed too, at
one step's volume: DDP all-reduces every gradient once; FSDP2 all-gathers the weights in forward
and again in backward and reduce-scatters the gradients.

It also measures each layout's per-rank peak memory for one step and prints it beside
`kiln plan`'s estimate for the same model, batch and layout.

    python bench/scaling.py                       # the "small" preset (13.8M params), seq 256, batch 8
    python bench/scaling.py --preset mini --steps 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.config import TrainConfig
from kiln.model.config import preset
from kiln.model.transformer import Transformer
from kiln.plan import estimate_training_memory
from kiln.train.metrics import allocation_peak
from kiln.train.optim import build_optimizer

VOCAB = 8192


def make_model(args, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset(args.preset, vocab_size=VOCAB, max_seq_len=args.seq))
    model.init_weights(seed)
    return model


def step_fn(model, opt, clip):
    def step(x, y):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step, x, y, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step(x, y)
    return (time.perf_counter() - t0) / n


def local_bytes(tensors) -> int:
    """Bytes this rank holds for `tensors` (a DTensor counts its local shard only)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def measured_peak(step, x, y, model, opt) -> int:
    """Most bytes live at once on this rank during one training step.

    The parameters and optimizer state live when the step starts, plus the peak of what the CPU
    allocator hands out during it (profiler memory events): activations, gradients, logits, and
    FSDP's gathered weights and DDP's buckets.
    """
    params = list({id(p): p for p in model.parameters()}.values())
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    base = local_bytes(params) + local_bytes(state)
    peak = allocation_peak(lambda: step(x, y))
    return base + peak


def batch(args, seed: int):
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=g)
    return xy[:, :-1], xy[:, 1:]


def worker(args, out: Path) -> None:
    """Inside torchrun (2 ranks, 1 thread each): time single / independent / DDP / FSDP2 steps, alternating.
    `single` is rank 0 alone with every core while rank 1 waits (blocked in a barrier, not spinning)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from kiln.train.parallel import ParallelEnv, apply_ddp, apply_fsdp, clip_grad_norm

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    env = ParallelEnv(device=torch.device("cpu"), rank=rank, world=world, dp_rank=rank, dp_world=world)
    steps, steps_opt = {}, {}
    plain = make_model(args)
    opt = steps_opt["independent"] = build_optimizer(plain, TrainConfig())
    steps["independent"] = step_fn(plain, opt, lambda: torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0))
    ddp = apply_ddp(make_model(args), mesh["dp"])
    opt = steps_opt["ddp"] = build_optimizer(ddp, TrainConfig())
    steps["ddp"] = step_fn(ddp, opt, lambda: torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0))
    fsdp = make_model(args)
    apply_fsdp(fsdp, mesh["dp"], bf16=False)
    opt = steps_opt["fsdp"] = build_optimizer(fsdp, TrainConfig())
    steps["fsdp"] = step_fn(fsdp, opt, lambda: clip_grad_norm(fsdp, 1.0, env))
    x, y = batch(args, 1 + rank)
    for step in steps.values():
        step(x, y)  # warm up: allocations, DDP buckets, FSDP lazy init
    times: dict[str, list[float]] = {k: [] for k in ("single", *steps)}
    for _ in range(args.rounds):
        dist.barrier()
        if rank == 0:
            torch.set_num_threads(os.cpu_count())
            times["single"].append(time_steps(steps["independent"], x, y, args.steps))
            torch.set_num_threads(1)
        else:
            times["single"].append(0.0)
        for name, step in steps.items():
            dist.barrier()
            times[name].append(time_steps(step, x, y, args.steps))
    models = {"independent": (plain, steps_opt["independent"]), "ddp": (ddp, steps_opt["ddp"]),
              "fsdp": (fsdp, steps_opt["fsdp"])}
    peaks = torch.tensor([float(measured_peak(steps[k], x, y, m, o)) for k, (m, o) in models.items()])
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    n = sum(p.numel() for p in plain.parameters())
    flat = torch.randn(n)
    shard = torch.empty(n // world)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        dist.all_reduce(flat)
    allreduce = (time.perf_counter() - t0) / args.steps
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        dist.all_gather_single(flat[: shard.numel() * world], shard)
        dist.all_gather_single(flat[: shard.numel() * world], shard)
        dist.reduce_scatter_single(shard, flat[: shard.numel() * world])
    gather_scatter = (time.perf_counter() - t0) / args.steps
    med = torch.tensor([statistics.median(v) for v in times.values()])
    dist.all_reduce(med, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
    if rank == 0:
        res = dict(zip(times, med.tolist()))
        res |= {"collective_ddp": allreduce, "collective_fsdp": gather_scatter, "params": n,
                "peak_bytes": dict(zip(models, peaks.tolist()))}
        out.write_text(json.dumps(res))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="sequences per process per step")
    ap.add_argument("--steps", type=int, default=2, help="steps per timing")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    ap.add_argument("--worker", metavar="OUT.json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args, Path(args.worker))
        return
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scaling.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python",
               sys.executable, "-P", __file__,  # -P: bench/'s own modules must not shadow the stdlib's
               "--worker", str(out), "--preset", args.preset, "--seq", str(args.seq), "--batch", str(args.batch),
               "--steps", str(args.steps), "--rounds", str(args.rounds)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        two = json.loads(out.read_text())
    t1 = two["single"]
    print(f"\n{args.preset}: {two['params'] / 1e6:.1f}M params, {args.batch}×{args.seq} tokens per process per step, "
          f"fp32, gloo, {os.cpu_count()} CPUs")
    print(f"{'layout':<26}{'s/step':>8}{'tok/s/proc':>12}{'tok/s total':>13}{'comm share':>12}{'collectives':>13}")
    print(f"{'1 process (all threads)':<26}{t1:>8.3f}{tokens / t1:>12.0f}{tokens / t1:>13.0f}{'-':>12}{'-':>13}")
    base = two["independent"]
    rows = [("2 × independent (no comm)", base, None), ("2 × DDP", two["ddp"], two["collective_ddp"]),
            ("2 × FSDP2", two["fsdp"], two["collective_fsdp"])]
    for name, t, coll in rows:
        share = f"{(t - base) / t:.0%}" if coll is not None else "-"
        bare = f"{coll / t:.0%}" if coll is not None else "-"
        print(f"{name:<26}{t:>8.3f}{tokens / t:>12.0f}{2 * tokens / t:>13.0f}{share:>12}{bare:>13}")
    print("comm share: (t − t_independent) / t; collectives: the bare all-reduce (DDP) or "
          "2 all-gathers + reduce-scatter (FSDP2) of one step's volume, / t")
    model_cfg = preset(args.preset, vocab_size=VOCAB, max_seq_len=args.seq)
    print(f"\nper-rank peak memory of one step, measured vs `kiln plan`'s estimate (fp32, {args.batch}×{args.seq}):")
    print(f"{'layout':<26}{'measured MB':>12}{'kiln plan MB':>14}{'plan/measured':>15}")
    for name, label, shard in (("independent", "1 replica (no comm)", 1), ("ddp", "2 × DDP", 1),
                               ("fsdp", "2 × FSDP2", 2)):
        est = estimate_training_memory(model_cfg, args.batch, args.seq, "fp32", dp_shard=shard)["total"]
        got = two["peak_bytes"][name]
        print(f"{label:<26}{got / 1e6:>12.1f}{est / 1e6:>14.1f}{est / got:>15.2f}")


if __name__ == "__main__":
    main()
