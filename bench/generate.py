"""Generation speed: kiln's engine vs `transformers` `generate` on the same weights.

The run's checkpoint is exported with `kiln.post.export` and loaded as `LlamaForCausalLM` (SDPA
attention); kiln's engine eager, kiln's engine with its decode step compiled (`serve.compile`,
`kiln.infer.decode`) and `transformers` decode the same prompt greedily for `--new-tokens` tokens
(end tokens stop none of them), at batch 1 and 8, alternating in one process so host noise hits
all alike; the first round pays the compilation, and each figure is the best round's.
Prints prefill and decode tokens/s, the ratio, whether the greedy tokens are identical, and the
memory-bandwidth bound: the bytes one decode step must read (weights + KV cache) against this
machine's measured copy bandwidth.

    python -P bench/generate.py                              # a fresh `small` run (prepare + 3 steps)
    python -P bench/generate.py --run runs/quickstart --batches 1,8 --rounds 3
    python -P bench/generate.py --device cuda --preset llama3-1b
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from kiln import cli
from kiln.infer.engine import Batch, SamplingParams, Sequence
from kiln.infer.generate import Engine
from kiln.post.export import export_hf

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def make_run(root: Path, preset: str) -> Path:
    """A run with a real tokenizer and a checkpoint of `preset` (a few steps: speed does not need a good model)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus"
    corpus.mkdir()
    for pkg in ("json", "email", "http", "logging"):
        for f in sorted((stdlib / pkg).glob("*.py")):
            (corpus / f"{pkg}_{f.name}").write_bytes(f.read_bytes())
    run = root / "run"
    assert cli.main(["prepare", f"out={run}", f"data.input={corpus}", "data.tokenizer.vocab_size=4096"]) == 0
    assert cli.main(["pretrain", f"out={run}", f"model.preset={preset}", "train.max_steps=3", "train.seq_len=128",
                     "train.batch_size=2", "train.eval_batches=1", "train.tensorboard=false",
                     "train.progress=false", "train.warmup_steps=1"]) == 0
    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def kiln_generate(engine: Engine, ids: list[int], batch: int, new: int, compile: bool = False,
                  draft=None, k: int = 4, adapt: bool = True) -> tuple[list[list[int]], float, float]:
    """Tokens per row, prefill seconds, decode seconds (end tokens do not stop, as for the peer);
    with `draft`, decoded speculatively, `k` drafted tokens a round (`bench/speculative.py`), only
    while rounds pay (`adapt`) or whenever allowed."""
    b = Batch(engine.model, engine.tokenizer.get_vocab_size(), set(), batch, len(ids) + new, compile)
    if draft is not None:
        from kiln.infer.speculative import attach

        attach(b, draft, k, compile, adapt=adapt)
    seqs = [Sequence(ids, SamplingParams(max_new_tokens=new, temperature=0.0), engine.tokenizer) for _ in range(batch)]
    sync(engine.device)
    t0 = time.perf_counter()
    b.add(seqs)
    sync(engine.device)
    t1 = time.perf_counter()
    while b.running:
        b.step()
    sync(engine.device)
    return [s.tokens for s in seqs], t1 - t0, time.perf_counter() - t1


@torch.inference_mode()
def hf_generate(model, ids: list[int], batch: int, new: int, device) -> tuple[list[list[int]], float, float]:
    x = torch.tensor([ids] * batch, device=device)
    mask = torch.ones_like(x)
    kw = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)
    sync(device)
    t0 = time.perf_counter()
    model.generate(x, max_new_tokens=1, **kw)
    sync(device)
    t1 = time.perf_counter()
    out = model.generate(x, max_new_tokens=new, **kw)
    sync(device)
    t2 = time.perf_counter()
    prefill = t1 - t0
    return out[:, len(ids):].tolist(), prefill, (t2 - t1) - prefill


def copy_bandwidth(device: torch.device, mb: int = 256) -> float:
    """Bytes per second read and written by a large tensor copy."""
    src = torch.ones(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def step_bytes(engine: Engine, batch: int, context: int) -> int:
    """Bytes one decode step reads: every weight matrix (one embedding row per token) and the KV cache."""
    m = engine.model
    elem = next(m.parameters()).element_size()
    weights = sum(p.numel() for n, p in m.named_parameters() if n != "tok_emb.weight" or m.cfg.tie_embeddings)
    cfg = m.cfg
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context * batch
    return (weights + kv) * elem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a kiln run with a checkpoint (default: make one of --preset)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else make_run(Path(tmp), args.preset)
        engine = Engine.from_run(run, args.device)
        dtype = next(engine.model.parameters()).dtype
        hf = LlamaForCausalLM.from_pretrained(export_hf(run, Path(tmp) / "hf"), dtype=dtype,
                                              attn_implementation="sdpa").to(engine.device).eval()
        ids = engine.encode_prompt(PROMPT)
        new = min(args.new_tokens, engine.context - len(ids))
        bw = copy_bandwidth(engine.device)
        cfg = engine.model.cfg
        print(f"model: d_model {cfg.d_model}, {cfg.n_layers} layers, {sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f}M "
              f"params, {dtype}, {engine.device}; prompt {len(ids)} tokens, {new} new; copy bandwidth {bw / 1e9:.1f} GB/s")
        for batch in (int(b) for b in args.batches.split(",")):
            # alternate, so all three see the same host noise; the first round compiles (kept out by taking the best)
            runs = {"kiln": lambda b=batch: kiln_generate(engine, ids, b, new),
                    "kiln compiled": lambda b=batch: kiln_generate(engine, ids, b, new, compile=True),
                    "transformers": lambda b=batch: hf_generate(hf, ids, b, new, engine.device)}
            rows = {k: [] for k in runs}
            for _ in range(args.rounds):
                for k, fn in runs.items():
                    rows[k].append(fn())
            best = {k: (min(r[1] for r in v), min(r[2] for r in v)) for k, v in rows.items()}
            dec = {k: batch * (new - 1) / d for k, (_, d) in best.items()}
            pre = {k: batch * len(ids) / p for k, (p, _) in best.items()}
            bound = bw / step_bytes(engine, batch, len(ids) + new // 2) * batch
            ref = rows["transformers"][0][0]
            print(f"batch {batch}: decode tokens/s: " + ", ".join(
                f"{k} {dec[k]:,.0f}" + ("" if k == "transformers" else f" ({dec[k] / dec['transformers']:.2f}x)") for k in runs)
                + f"; prefill {pre['kiln']:,.0f} vs {pre['transformers']:,.0f} tokens/s ({pre['kiln'] / pre['transformers']:.2f}x); "
                f"bandwidth bound {bound:,.0f} tokens/s, kiln compiled at {dec['kiln compiled'] / bound:.0%}")
            for k in ("kiln", "kiln compiled"):
                same = all(r[0] == ref for r in rows[k])
                print(f"  {k}: greedy tokens identical to transformers: {same}")
                if not same:
                    got = rows[k][0][0][0]
                    first = next((i for i, (a, b) in enumerate(zip(got, ref[0])) if a != b), None)
                    print(f"    first difference at new token {first} (of {len(got)})")

if __name__ == "__main__":
    main()
