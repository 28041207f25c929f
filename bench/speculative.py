"""Speculative decoding: the served model with its distilled student as draft (`serve.draft`) vs
plain decoding, and `transformers` plain and assisted (`assistant_model`) generation on the same
weights, at batch 1, greedy.

The teacher (`--run`, default `make demo`'s runs/quickstart) and the draft (`--draft`, default the
student `kiln distill` made of it, `<run>/student`) are exported with `kiln.post.export` and
loaded as `LlamaForCausalLM` for `transformers`. Each prompt of `PROMPTS` is decoded for
`--new-tokens` tokens (end tokens stop none, as for the peer) by every contender in turn, in
`--rounds` rounds, so host noise hits all alike; each figure is the median over rounds of the
decode tokens/s summed over the prompts (tokens after the first over the time after the first),
each ratio the median over rounds of the ratio within the round.
Prints tokens/s, ratios to kiln's plain decode and to `transformers`, the draft's acceptance
rate, and whether every contender's greedy tokens equal kiln's plain ones.

    python -P bench/speculative.py --run runs/quickstart
    python -P bench/speculative.py --run runs/quickstart --draft runs/quickstart/student --k 2,3,4 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import hf_generate, kiln_generate  # noqa: E402

from kiln.infer.generate import Engine  # noqa: E402
from kiln.post.export import export_hf  # noqa: E402

PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "import os\nimport sys\n\n\ndef main(",
           "class Stack:\n    def __init__(self):\n", "    for i in range(len(items)):\n"]


@torch.inference_mode()
def hf_assisted(model, assistant, ids: list[int], new: int) -> tuple[list[int], float]:
    """Tokens and decode seconds of `transformers`' assisted generation (the prefill timed apart)."""
    x = torch.tensor([ids])
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, eos_token_id=None, pad_token_id=0)
    t0 = time.perf_counter()
    model.generate(x, max_new_tokens=1, **kw)
    t1 = time.perf_counter()
    out = model.generate(x, max_new_tokens=new, assistant_model=assistant, **kw)
    t2 = time.perf_counter()
    return out[0, len(ids):].tolist(), (t2 - t1) - (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/quickstart")
    ap.add_argument("--draft", help="the draft run (default: <run>/student)")
    ap.add_argument("--k", default="2,3,4", help="drafted tokens per round, one contender each")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also kiln plain and drafted with compiled decode steps "
                                                           "(serve.compile=on; ~30 s cold per model on CPU)")
    args = ap.parse_args()
    run = Path(args.run)
    draft_run = Path(args.draft) if args.draft else run / "student"
    engine = Engine.from_run(run, "cpu")
    drafter = Engine.from_run(draft_run, "cpu")
    if drafter.tokenizer.get_vocab() != engine.tokenizer.get_vocab():
        raise SystemExit(f"{draft_run} has another tokenizer than {run}")
    draft = drafter.model
    ks = [int(x) for x in args.k.split(",")]
    prompts = [engine.encode_prompt(p) for p in PROMPTS]
    new = min(args.new_tokens, min(engine.context - len(p) - max(ks) - 2 for p in prompts))
    size = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in (("model", engine.model), ("draft", draft))}
    print(f"model {run} ({size['model']:.1f}M params, {engine.model.cfg.n_layers} layers, d {engine.model.cfg.d_model}); "
          f"draft {draft_run} ({size['draft']:.1f}M, {draft.cfg.n_layers} layers, d {draft.cfg.d_model}); "
          f"{len(prompts)} prompts, {new} new tokens each, batch 1, greedy, {torch.get_num_threads()} threads")

    contenders = {"kiln plain": lambda ids: kiln_generate(engine, ids, 1, new)}
    for k in ks:
        contenders[f"kiln draft k={k}"] = lambda ids, k=k: kiln_generate(engine, ids, 1, new, draft=draft, k=k)
        contenders[f"kiln draft k={k} always"] = lambda ids, k=k: kiln_generate(engine, ids, 1, new, draft=draft, k=k,
                                                                               adapt=False)
    if args.compile:
        contenders["kiln plain compiled"] = lambda ids: kiln_generate(engine, ids, 1, new, compile=True)
        for k in ks:
            contenders[f"kiln draft k={k} compiled"] = lambda ids, k=k: kiln_generate(engine, ids, 1, new, True,
                                                                                    draft=draft, k=k)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_transformers:
            from transformers import LlamaForCausalLM

            def hf(path: Path, name: str):
                return LlamaForCausalLM.from_pretrained(export_hf(path, Path(tmp) / name), attn_implementation="sdpa").eval()

            hf_model, hf_draft = hf(run, "model"), hf(draft_run, "draft")
            contenders["transformers"] = lambda ids: hf_generate(hf_model, ids, 1, new, torch.device("cpu"))
            contenders["transformers assisted"] = lambda ids: (lambda t, d: ([t], 0.0, d))(*hf_assisted(hf_model, hf_draft, ids, new))
        speeds = {name: [] for name in contenders}
        tokens: dict[str, list] = {}
        for r in range(args.rounds + 1):  # round 0 warms every contender up
            for name, fn in contenders.items():
                outs = [fn(ids) for ids in prompts]
                if r == 0:
                    tokens[name] = [o[0][0] for o in outs]
                    continue
                speeds[name].append(sum(new - 1 for _ in outs) / sum(o[2] for o in outs))
    med = {name: statistics.median(v) for name, v in speeds.items()}

    def ratio(name: str, to: str) -> float:  # the median of the rounds' ratios: the host's drift cancels
        return statistics.median(a / b for a, b in zip(speeds[name], speeds[to]))

    for name, v in med.items():
        line = f"{name:>22}: {v:7,.0f} decode tokens/s ({ratio(name, 'kiln plain'):.2f}x kiln plain"
        line += f", {ratio(name, 'transformers'):.2f}x transformers)" if "transformers" in med else ")"
        line += "" if tokens[name] == tokens["kiln plain"] else "  [greedy tokens differ from kiln plain]"
        print(line)
    for k in ks:  # acceptance, from one more pass with a fresh drafter
        from kiln.infer.engine import Batch, SamplingParams, Sequence
        from kiln.infer.speculative import attach

        b = Batch(engine.model, engine.tokenizer.get_vocab_size(), set(), 1, engine.context)
        attach(b, draft, k, adapt=False)
        for ids in prompts:
            b.add([Sequence(ids, SamplingParams(max_new_tokens=new, temperature=0.0), None)])
            while b.running:
                b.step()
        print(f"k={k}: the draft's tokens kept {b.drafter.acceptance:.0%}, "
              f"{1 + b.drafter.accepted / b.drafter.rounds:.2f} tokens per round of the model")


if __name__ == "__main__":
    main()
