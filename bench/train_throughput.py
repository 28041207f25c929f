"""Training throughput: kiln's model and loop vs Hugging Face `LlamaForCausalLM` in a plain loop.

Same architecture and shapes (Llama: RMSNorm, RoPE, SwiGLU, GQA, tied embeddings), same batch,
same AdamW, fp32 on this CPU, SDPA attention for both. The two alternate in one process, so host
noise hits both alike. Also measures this machine's fp32 matmul peak at the model's own matmul
shapes and reports each side's MFU against it.

    python bench/train_throughput.py                 # quickstart size and d_model 512
    python bench/train_throughput.py --sizes 512 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kiln.config import Config, TrainConfig, load
from kiln.hardware import tune_cpu_allocator
from kiln.model.config import ModelConfig, preset
from kiln.model.transformer import Transformer
from kiln.train.objectives import next_token_loss
from kiln.train.optim import build_optimizer
from kiln.train.parallel import apply_compile


def hf_model(mc: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.d_model, intermediate_size=mc.ffn_hidden,
        num_hidden_layers=mc.n_layers, num_attention_heads=mc.n_heads, num_key_value_heads=mc.n_kv_heads,
        max_position_embeddings=mc.max_seq_len, rope_theta=mc.rope_theta, rms_norm_eps=mc.norm_eps,
        tie_word_embeddings=mc.tie_embeddings, attention_bias=False, mlp_bias=False,
    )
    hc._attn_implementation = "sdpa"
    return LlamaForCausalLM(hc)


def matmul_peak(mc: ModelConfig, tokens: int, seconds: float = 1.0) -> float:
    """fp32 FLOP/s over the forward matmul shapes of one block plus the LM head (and their backward)."""
    d, f, v = mc.d_model, mc.ffn_hidden, mc.vocab_size
    kv = mc.n_kv_heads * mc.head_dim
    shapes = [(tokens, d, d), (tokens, d, kv), (tokens, d, kv), (tokens, d, d), (tokens, d, f), (tokens, d, f),
              (tokens, f, d), (tokens, d, v)]
    mats = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        mats += [(a, b), (a @ b, b.t().contiguous()), (a.t().contiguous(), a @ b)]  # fwd, grad-input, grad-weight
    flops = sum(2 * x.shape[0] * x.shape[1] * y.shape[1] for x, y in mats)
    for x, y in mats:
        x @ y
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for x, y in mats:
            x @ y
        reps += 1
    return flops * reps / (time.perf_counter() - t0)


def make_step(model, opt, loss_fn):
    """One training step as the loop does it: loss, backward, clip, AdamW, zero grads."""

    def step(x, y):
        loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def kiln_step_fn(mc: ModelConfig, tc: TrainConfig, compile_blocks: bool = False):
    torch.manual_seed(0)
    model = Transformer(mc)
    model.init_weights(0)
    if compile_blocks:
        apply_compile(model)
    return make_step(model, build_optimizer(model, tc), lambda m, x, y: next_token_loss(m, {"input_ids": x, "labels": y}))


def hf_step_fn(mc: ModelConfig, tc: TrainConfig):
    torch.manual_seed(0)
    model = hf_model(mc)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=True)
    model.train()

    def loss_fn(m, x, y):
        return F.cross_entropy(m(input_ids=x).logits.flatten(0, 1).float(), y.flatten())

    return make_step(model, opt, loss_fn)


def time_steps(step, x, y, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step(x, y)
    return (time.perf_counter() - t0) / n


def bench(mc: ModelConfig, batch: int, seq: int, steps: int, rounds: int, compile_blocks: bool = False) -> dict:
    tc = TrainConfig()
    x = torch.randint(0, mc.vocab_size, (batch, seq))
    y = torch.randint(0, mc.vocab_size, (batch, seq))
    sides = {"kiln": kiln_step_fn(mc, tc), "hf": hf_step_fn(mc, tc)}
    if compile_blocks:
        sides["kiln+compile"] = kiln_step_fn(mc, tc, compile_blocks=True)
    for s in sides.values():  # warm up allocator and kernels
        time_steps(s, x, y, 2)
    times = {k: [] for k in sides}
    peaks = []
    for _ in range(rounds):
        peaks.append(matmul_peak(mc, batch * seq, 0.5))
        for name, s in sides.items():
            times[name].append(time_steps(s, x, y, steps))
    tokens = batch * seq
    fpt = mc.flops_per_token(seq)
    peak = statistics.median(peaks)
    res = {"peak_gflops": peak / 1e9, "params_m": mc.num_params() / 1e6}
    for name, ts in times.items():
        tps = tokens / statistics.median(ts)
        res[name] = {"tokens_per_s": tps, "mfu": tps * fpt / peak}
    res["ratio"] = res["kiln"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="quickstart,512", help="comma list: 'quickstart' and/or d_model values")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (0 = the recipe's / 8)")
    ap.add_argument("--compile", action="store_true", help="also time kiln with torch.compile (~1 min of compile)")
    args = ap.parse_args()
    # kiln's trainer tunes glibc's allocator at start; in one process the HF side gets it too.
    tune_cpu_allocator()
    q: Config = load(Config, "recipes/quickstart.yaml")
    vocab = q.data.tokenizer.vocab_size
    for size in args.sizes.split(","):
        if size == "quickstart":
            over = q.model.overrides()
            over.setdefault("max_seq_len", q.train.seq_len)
            mc = preset(q.model.preset, vocab_size=vocab, **over)
            batch, seq, label = args.batch or q.train.batch_size, q.train.seq_len, f"quickstart ({q.model.preset})"
        else:
            d = int(size)
            mc = ModelConfig(vocab_size=vocab, d_model=d, n_layers=8, n_heads=d // 64, n_kv_heads=max(1, d // 128),
                             max_seq_len=256)
            batch, seq, label = args.batch or 8, 256, f"d_model {d}"
        r = bench(mc, batch, seq, args.steps, args.rounds, args.compile)
        print(
            f"{label}: {r['params_m']:.1f}M params, batch {batch}×{seq}, fp32 matmul peak at these shapes "
            f"{r['peak_gflops']:.0f} GFLOP/s\n"
            f"  kiln         {r['kiln']['tokens_per_s']:8.0f} tokens/s  MFU {100 * r['kiln']['mfu']:5.1f}%\n"
            f"  transformers {r['hf']['tokens_per_s']:8.0f} tokens/s  MFU {100 * r['hf']['mfu']:5.1f}%\n"
            + (f"  kiln+compile {r['kiln+compile']['tokens_per_s']:8.0f} tokens/s  MFU "
               f"{100 * r['kiln+compile']['mfu']:5.1f}%\n" if "kiln+compile" in r else "")
            + f"  ratio kiln/transformers: {r['ratio']:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
