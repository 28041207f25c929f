"""`kiln eval`: how good a model is, measured the same way for a run, a checkpoint or an export.

- bits per byte on the held-out split of the prepared data (the bytes per token of that split,
  as training's validation) and on any text file (its exact byte count);
- for code (the default corpus is Python's standard library), two task metrics on held-out
  files: next-line exact match (greedy) and the share of completions of held-out function
  headers that parse (`ast.parse`);
- every task example as a sample dump (`eval_samples.jsonl`), results in `eval.json` beside the
  model, and an "Evaluation" section in the run's report;
- optionally lm-evaluation-harness tasks through `kiln.eval.harness`.

Scores use only the tokenizer's ids: the padded vocabulary rows are left out of every softmax.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import textwrap
import time
from pathlib import Path

import numpy as np

from kiln import __version__
from kiln.config import Config, EvalConfig
from kiln.errors import KilnError
from kiln.eval.scoring import (
    describe_heldout,
    greedy_generate,
    heldout_bits_per_byte,
    read_text_file,
    run_windows,
    text_bits_per_byte,
)
from kiln.infer.load import Loaded, load
from kiln.report import write_section
from kiln.runs import HeldOutWindows, atomic_write_text, read_manifest, write_json


# ---- code tasks on held-out files -------------------------------------------------------------------
def heldout_documents(ddir: Path, tokenizer, limit: int = 400) -> list[str]:
    """The texts of the held-out split's documents (up to `limit`), decoded from the token shards."""
    from kiln.data.shards import open_data

    man = open_data(ddir)
    docs = []
    for shard in man["splits"]["val"]["shards"]:
        ids = np.memmap(ddir / shard["file"], dtype=man["dtype"], mode="r")
        idx = ddir / shard["file"].replace(".bin", ".idx.npy")
        if not idx.is_file():
            raise KilnError(f"'{idx}' (document offsets) is missing; re-run `kiln prepare`")
        starts = list(np.load(idx)) + [len(ids)]
        for a, b in zip(starts[:-1], starts[1:]):
            docs.append(tokenizer.decode([int(t) for t in ids[a + 1 : b]]))  # skip the leading <|bos|>
            if len(docs) >= limit:
                return docs
    return docs


def python_sources(docs: list[str]) -> list[tuple[str, ast.Module]]:
    out = []
    for d in docs:
        try:
            out.append((d, ast.parse(d)))
        except (SyntaxError, ValueError, RecursionError):
            continue
    return out


def _prompt_ids(lm: Loaded, text: str, room: int) -> list[int]:
    """`text` as a prompt of at most `room` tokens: <|bos|> + all of it, or its last tokens."""
    ids = lm.encode(text)
    return [lm.bos, *ids] if len(ids) < room else ids[-room:]


def next_line_examples(sources: list[tuple[str, ast.Module]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """Up to `n` (prompt, expected line) pairs: a held-out file up to the end of a line's text, and
    the next non-blank line (the blank lines between are the model's to write)."""
    cands = []
    for text, _ in sources:
        offset = 0
        for i, line in enumerate(text.splitlines(keepends=True)):
            if i > 0 and line.strip() and text[:offset].strip():
                cands.append((text[:offset].rstrip(), line.rstrip()))
            offset += len(line)
    return rng.sample(cands, min(n, len(cands)))


def predicted_line(text: str, final: bool = False) -> str | None:
    """The line a continuation predicts once it is whole (with `final`, as far as it got): the first
    non-blank line after the prompt's line ends, or the prompt's own line if the model extends it."""
    parts = text.split("\n")
    if parts[0].strip():
        return parts[0] if len(parts) > 1 or final else None
    whole = [p for p in (parts[1:] if final else parts[1:-1]) if p.strip()]
    return whole[0] if whole else ("" if final else None)


def next_line_task(lm: Loaded, sources: list[tuple[str, ast.Module]], n: int, rng: random.Random,
                   batch_size: int, max_line_tokens: int = 48) -> tuple[dict, list[dict]]:
    """Greedy next-line prediction on held-out files; exact match ignores trailing whitespace only."""
    examples = next_line_examples(sources, n, rng)
    room = lm.model.cfg.max_seq_len - max_line_tokens
    gens = greedy_generate(lm, [_prompt_ids(lm, p, room) for p, _ in examples], max_line_tokens,
                           lambda _, ids: predicted_line(lm.tokenizer.decode(ids)) is not None, batch_size)
    samples = []
    for (prompt, want), (ids, _) in zip(examples, gens):
        got = predicted_line(lm.tokenizer.decode(ids), final=True)
        samples.append({"task": "next_line", "prompt_tail": prompt[-300:], "expected": want, "completion": got,
                        "match": got.rstrip() == want})
    return {"score": sum(s["match"] for s in samples) / max(len(samples), 1), "n": len(samples)}, samples


def function_examples(sources: list[tuple[str, ast.Module]], n: int, rng: random.Random) -> list[tuple[str, str, int]]:
    """Up to `n` held-out functions as (prompt: the file up to the end of the header, header: the
    `def` line(s), indentation of the `def`)."""
    cands = []
    for text, tree in sources:
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.body[0].lineno <= node.lineno:
                continue
            last = node.body[0].lineno - 1  # the header ends on the last line before the body ending in ':'
            while last > node.lineno and not lines[last - 1].rstrip().endswith(":"):
                last -= 1
            if lines[last - 1].rstrip().endswith(":"):
                def_line = lines[node.lineno - 1]
                cands.append(("".join(lines[:last]).rstrip(), "".join(lines[node.lineno - 1 : last]).rstrip(),
                              len(def_line) - len(def_line.lstrip())))
    return rng.sample(cands, min(n, len(cands)))


def function_body(text: str, indent: int) -> str | None:
    """The body a continuation of a header wrote, once a line indented no deeper than the `def`
    (`indent`) shows that it has ended; None while it may go on."""
    lines = text.split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            return "\n".join(lines[:i])
    return None


def parses(header: str, body: str) -> bool:
    """Whether the header and its body form valid Python (an empty body does not)."""
    try:
        ast.parse(textwrap.dedent(header + body))
        return True
    except (SyntaxError, ValueError, RecursionError):
        return False


def function_task(lm: Loaded, sources: list[tuple[str, ast.Module]], n: int, rng: random.Random,
                  max_new: int, batch_size: int) -> tuple[dict, list[dict]]:
    """Complete held-out functions from their header, with the file before it as context: the share
    of completions that parse. A body cut by the token budget (at most half the model's context,
    the prompt having the rest) keeps only its whole lines."""
    max_new = min(max_new, lm.model.cfg.max_seq_len // 2)
    room = lm.model.cfg.max_seq_len - max_new
    examples = function_examples(sources, n, rng)
    gens = greedy_generate(lm, [_prompt_ids(lm, p, room) for p, _, _ in examples], max_new,
                           lambda i, ids: function_body(lm.tokenizer.decode(ids), examples[i][2]) is not None,
                           batch_size)
    samples = []
    for (_, header, indent), (ids, why) in zip(examples, gens):
        text = lm.tokenizer.decode(ids)
        body = function_body(text, indent)
        if body is None:  # ended by the end token (all of it) or the budget (its whole lines)
            body = text if why == "end" else text[: text.rfind("\n")] if "\n" in text else ""
        samples.append({"task": "function_completion", "header": header, "completion": body,
                        "parses": parses(header, body), "stopped": why})
    score = sum(s["parses"] for s in samples) / max(len(samples), 1)
    return {"score": score, "n": len(samples), "max_new_tokens": max_new}, samples


# ---- the whole evaluation ------------------------------------------------------------------------------
def evaluate_run(run_dir: str | Path, ec: EvalConfig | None = None, device: str = "auto",
                 write: bool = True, key: str = "out") -> dict:
    """Evaluate a run (its newest intact checkpoint), a checkpoint or a Hugging Face directory; returns
    the results and, with `write`, saves eval.json and eval_samples.jsonl beside it and adds the
    "Evaluation" section to a run's report."""
    ec = ec or EvalConfig()
    t0 = time.perf_counter()
    if ec.harness_tasks and importlib.util.find_spec("lm_eval") is None:
        raise KilnError("eval.harness_tasks needs lm-evaluation-harness: pip install lm-eval")
    texts = {p: read_text_file(Path(p)) for p in ec.text}
    lm = load(run_dir, device, key=key)
    seq_len = run_windows(lm, ec.seq_len).seq_len  # text files' windows: the held-out split's
    results: dict = {"model": str(lm.source), "kind": lm.kind, "step": lm.step, "kiln_version": __version__,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    samples: list[dict] = []
    notes: list[str] = []
    ddir = Path(ec.data_path) if ec.data_path else lm.data
    if ddir is not None and read_manifest(ddir) is None:
        if ec.data_path:
            raise KilnError(f"eval.data_path={ec.data_path} holds no prepared data (manifest.json); run `kiln prepare` first")
        notes.append(f"held-out data '{ddir}' is gone; only text files and harness tasks were scored")
        ddir = None
    if ddir is not None:
        _check_data_tokenizer(lm, ddir)
        windows = run_windows(lm, ec.seq_len, ec.windows)
        h = heldout_bits_per_byte(lm.model, ddir, windows, lm.n_vocab, ec.batch_size)
        h["as_validated"] = HeldOutWindows.from_dict(lm.info.get("validation")) == windows and not h["note"]
        results["heldout"] = h
    elif not ec.text and not ec.harness_tasks:
        raise KilnError(f"{lm.source} has no prepared data to score; give eval.data_path=DIR (prepared with its tokenizer) "
                        "or eval.text=FILE")
    if ec.text:
        results["text"] = {p: text_bits_per_byte(lm, text, seq_len, ec.batch_size) for p, text in texts.items()}
    if ddir is not None and ec.tasks and ec.num_examples:
        sources = python_sources(heldout_documents(ddir, lm.tokenizer))
        if sources:
            rng = random.Random(0)  # the same examples at every evaluation, so checkpoints compare
            tasks = {}
            tasks["next_line_exact_match"], s1 = next_line_task(lm, sources, ec.num_examples, rng, ec.batch_size)
            tasks["function_parse_rate"], s2 = function_task(lm, sources, ec.num_examples, rng, ec.max_new_tokens,
                                                             ec.batch_size)
            results["tasks"] = tasks
            samples += s1 + s2
        else:
            notes.append("no held-out document parses as Python; the code tasks were skipped")
    if ec.harness_tasks:
        from kiln.eval.harness import run_harness

        results["harness"] = run_harness(lm, ec.harness_tasks, ec.harness_include, ec.harness_limit, ec.batch_size)
    results["notes"] = notes
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if write:
        write_json(lm.home / "eval.json", results)
        atomic_write_text(lm.home / "eval_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        if (lm.home / "checkpoints").is_dir():
            write_section(lm.home, "evaluation", evaluation_section(lm.home))
    return results


def _check_data_tokenizer(lm: Loaded, ddir: Path) -> None:
    """The held-out shards must be token ids of the model's own tokenizer."""
    from kiln.data.layout import tokenizer_path
    from kiln.data.tokenizer import load_tokenizer

    tpath = tokenizer_path(ddir, read_manifest(ddir))
    if not tpath.is_file() or load_tokenizer(tpath).get_vocab() != lm.tokenizer.get_vocab():
        raise KilnError(f"the data in '{ddir}' was prepared with a different tokenizer than {lm.source}'s; "
                        "give eval.data_path= a directory prepared with the model's tokenizer")


def summary_lines(results: dict) -> list[str]:
    """The results as short lines (the CLI prints them; the report says the same)."""
    out = []
    h = results.get("heldout")
    if h:
        base = f" (unigram baseline {h['unigram_bpb']:.3f})" if h.get("unigram_bpb") else ""
        same = ", the windows training validated on" if h.get("as_validated") else ""
        out.append(f"held-out bits/byte {h['bpb']:.4f}{base} {describe_heldout(h)}{same}")
        if h.get("note"):
            out.append(h["note"])
    for path, t in results.get("text", {}).items():
        out.append(f"{path}: {t['bpb']:.4f} bits/byte ({t['bytes']:,} bytes, {t['tokens']:,} tokens)")
    for name, t in results.get("tasks", {}).items():
        out.append(f"{name.replace('_', ' ')}: {100 * t['score']:.1f}% of {t['n']}")
    for task, metrics in results.get("harness", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        out.append(f"harness {task}: {shown}")
    return out + results.get("notes", [])


def evaluation_section(run: Path) -> list[str]:
    """The "Evaluation" section from the run's eval.json (written by `kiln eval`), or nothing."""
    try:
        results = json.loads((run / "eval.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    step = f" at step {results['step']}" if results.get("step") is not None else ""
    lines = ["## Evaluation", "", f"`kiln eval` of `{results['model']}`{step} ({results.get('created', '')}):", ""]
    lines += [f"- {line}" for line in summary_lines(results)]
    try:
        examples = [s for s in map(json.loads, (run / "eval_samples.jsonl").read_text().splitlines())
                    if s.get("task") == "function_completion"][:3]
    except (OSError, json.JSONDecodeError):
        examples = []
    if examples:
        lines += ["", "Function completions from held-out headers (greedy):"]
        for s in examples:
            lines += ["", f"{'parses' if s.get('parses') else 'does not parse'}:", "", "```python",
                      s.get("header", "") + s.get("completion", ""), "```"]
    return lines + ["", "All results: [eval.json](eval.json); every example: [eval_samples.jsonl](eval_samples.jsonl).", ""]


def run_eval(cfg: Config) -> dict:
    spec = cfg.eval.path or cfg.out
    results = evaluate_run(spec, cfg.eval, cfg.device, key="eval.path" if cfg.eval.path else "out")
    for line in summary_lines(results):
        print(f"eval: {line}")
    home = Path(results["model"])
    home = home.parent.parent if results["kind"] == "checkpoint" else home
    print(f"eval: results in {home / 'eval.json'}, samples in {home / 'eval_samples.jsonl'}")
    return results
