"""Token healing: function completions after a docstring, without and with it.

Held-out Python functions (the run's held-out split, as `kiln eval`'s code tasks read it) whose
body goes on after a docstring are cut right after the docstring's line, newline included:
`def f(x):\\n    \"\"\"Return x.\"\"\"\\n`. That prompt ends in a lone "\\n", where the run's BPE
merged the newline with the next line's indentation in training. Each is completed greedily
(`kiln.infer.generate`, end tokens and the budget stop it, or the first line indented no deeper
than the `def`) with `SamplingParams.heal` off and on, and scored as the function-completion
task scores a completion: the share whose body parses, here with at least one statement after
the docstring (a function that ends at once does not count: it parses, and is the failure
healing is for). Prints the parse rate off, on, and their ratio, one line each, and how often
the function was ended at once.

    python -P bench/token_healing.py                                   # /tmp/demo/runs/quickstart
    python -P bench/token_healing.py --run runs/quickstart --n 128 --device cuda
"""

from __future__ import annotations

import argparse
import ast
import random
import sys
import textwrap
import time
from pathlib import Path

from kiln.eval.evaluate import heldout_documents, python_sources
from kiln.infer import healing
from kiln.infer.engine import SamplingParams
from kiln.infer.generate import generate
from kiln.infer.load import load


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def examples(sources: list[tuple[str, ast.Module]], n: int, seed: int = 0) -> list[tuple[str, str, int]]:
    """Up to `n` (prompt: the file up to the docstring's last line, newline included; head: the
    function's `def` line(s) and docstring; indentation of the `def`) of functions whose body goes
    on after its docstring."""
    cands = []
    for text, tree in sources:
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
                continue
            end = doc.end_lineno  # the docstring's last line: the prompt ends with its newline
            if node.body[1].lineno <= end or not lines[end - 1].endswith("\n") or node.decorator_list:
                continue
            def_line = lines[node.lineno - 1]
            cands.append(("".join(lines[:end]), "".join(lines[node.lineno - 1 : end]), indent_of(def_line)))
    return random.Random(seed).sample(cands, min(n, len(cands)))


def body_of(text: str, indent: int) -> str | None:
    """The body lines a completion wrote, once a non-blank line indented no deeper than the `def`
    shows the function has ended; None while it may go on."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.strip() and indent_of(line) <= indent:
            return "\n".join(lines[:i])
    return None


def completes(head: str, body: str) -> bool:
    """Whether the function's head (def + docstring) and body parse, with a statement after the docstring."""
    if not body.strip():
        return False
    try:
        ast.parse(textwrap.dedent(head + body))
        return True
    except (SyntaxError, ValueError, RecursionError):
        return False


def run_side(lm, exs: list[tuple[str, str, int]], heal: bool, max_new: int, rows: int) -> list[dict]:
    room = lm.model.cfg.max_seq_len - max_new
    prompts = []
    for prompt, _, _ in exs:
        ids = lm.encode(prompt)
        prompts.append([lm.bos, *ids] if len(ids) < room else ids[-room:])
    # what the completion's decoded ids start with that the prompt already has (the healed "\n")
    skip = [len(p.text) if heal and (p := healing.plan(lm.tokenizer, ids)) else 0 for ids in prompts]
    decode = lm.tokenizer.decode

    def done(i: int, ids: list[int]) -> bool:
        return body_of(decode(ids)[skip[i]:], exs[i][2]) is not None

    stop = {i for i in (lm.bos, *lm.chat_format.eos) if i is not None}
    seqs = generate(lm.model, prompts, SamplingParams(max_new, temperature=0.0, heal=heal), stop_ids=stop,
                    tokenizer=lm.tokenizer, vocab=lm.n_vocab, rows=rows, until=done)
    out = []
    for (_, head, indent), seq, k in zip(exs, seqs, skip):
        assert k == len(seq.heal_text)
        text = decode(seq.tokens)[k:]
        body = body_of(text, indent)
        if body is None:  # ended by an end token (all of it) or the budget (its whole lines)
            body = text if seq.ended_by == "end" else text[: text.rfind("\n")] if "\n" in text else ""
        out.append({"parses": completes(head, body), "ended_at_once": not body.strip(), "healed": bool(k),
                    "first": decode(seq.tokens[:1])})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="/tmp/demo/runs/quickstart", help="a trained run (its newest checkpoint)")
    ap.add_argument("--n", type=int, default=64, help="held-out functions")
    ap.add_argument("--max-new", type=int, default=128, help="new tokens per completion at most")
    ap.add_argument("--rows", type=int, default=16, help="rows decoding at once")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if not Path(args.run).exists():
        print(f"bench/token_healing.py: no run at {args.run}; train one (make demo) or pass --run", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    lm = load(args.run, args.device)
    if lm.data is None:
        print(f"bench/token_healing.py: {args.run} has no prepared data (its held-out split is the test set)",
              file=sys.stderr)
        return 2
    exs = examples(python_sources(heldout_documents(lm.data, lm.tokenizer)), args.n)
    if not exs:
        print("bench/token_healing.py: no held-out function has a body after its docstring", file=sys.stderr)
        return 2
    max_new = min(args.max_new, lm.model.cfg.max_seq_len // 2)
    off = run_side(lm, exs, False, max_new, args.rows)
    on = run_side(lm, exs, True, max_new, args.rows)
    n = len(exs)
    rate_off, rate_on = sum(r["parses"] for r in off) / n, sum(r["parses"] for r in on) / n
    print(f"run {lm.source} (step {lm.step}), {n} held-out functions cut after the docstring's newline, greedy, "
          f"max_new_tokens={max_new}, {sum(r['healed'] for r in on)} prompts healed, device {lm.device}, "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"heal off: parse rate {rate_off:.3f} ({sum(r['parses'] for r in off)}/{n}); "
          f"ended at once {sum(r['ended_at_once'] for r in off)}/{n}")
    print(f"heal on:  parse rate {rate_on:.3f} ({sum(r['parses'] for r in on)}/{n}); "
          f"ended at once {sum(r['ended_at_once'] for r in on)}/{n}")
    print(f"ratio on/off: {rate_on / rate_off:.2f}x" if rate_off else f"ratio on/off: inf (off is 0, on is {rate_on:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
