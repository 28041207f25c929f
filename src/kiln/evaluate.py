"""`kiln eval`: how good a model is, measured the same way for a run, a checkpoint or an export.

- bits per byte on the held-out split of the prepared data (the bytes per token of that split,
  as training's validation) and on any text file (its exact byte count);
- for code (the default corpus is Python's standard library), two task metrics on held-out
  files: next-line exact match (greedy) and the share of completions of held-out function
  headers that parse (`ast.parse`);
- every task example as a sample dump (`eval_samples.jsonl`), results in `eval.json` beside the
  model, and an "Evaluation" section in the run's report;
- optionally lm-evaluation-harness tasks through `kiln.post.lm_eval_adapter`.

Scores use only the tokenizer's ids: the padded vocabulary rows are left out of every softmax.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import random
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kiln import __version__
from kiln.config import Config, EvalConfig
from kiln.data.tokenizer import BOS, EOS
from kiln.errors import KilnError
from kiln.model.transformer import KVCache, Transformer
from kiln.runs import atomic_write_text, read_manifest, write_json
from kiln.train.checkpoint import load_model_tensors

# Scoring windows when eval.seq_len=0: the model's context, up to this (imported models may declare 128k).
DEFAULT_MAX_WINDOW = 2048


# ---- loading what is evaluated -----------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object  # tokenizers.Tokenizer
    device: torch.device
    kind: str  # "checkpoint" (of a run) or "hf" (a Hugging Face directory, e.g. a kiln export)
    source: Path  # the checkpoint or export directory
    home: Path  # where eval.json goes: the run, or the export directory
    data: Path | None  # prepared data whose held-out split is scored
    step: int | None

    @property
    def n_vocab(self) -> int:
        """Ids the tokenizer produces: the model's rows past them are padding."""
        from kiln.post.export import token_count

        return min(token_count(self.tokenizer), self.model.cfg.vocab_size)

    @property
    def bos(self) -> int:
        return self.tokenizer.token_to_id(BOS)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def load_model(spec: str | Path, device: str = "auto", allow_pickle: bool = False, key: str = "eval.path") -> LoadedModel:
    """A run (its newest intact checkpoint), a checkpoint directory, or a Hugging Face directory
    (a kiln export, or any Llama one), ready to score on `device`."""
    from kiln.post.export import read_checkpoint, read_hf
    from kiln.post.quantize import open_for_eval
    from kiln.train.parallel import pick_device

    path = Path(spec)
    dev = pick_device(device)
    quantized = open_for_eval(path, dev, key)  # a `kiln quantize` run or checkpoint, else None
    if quantized is not None:
        return LoadedModel(**quantized)
    if (path / "checkpoint.json").is_file() or (path / "checkpoints").is_dir():
        ck = read_checkpoint(path, key=key)
        model = Transformer(ck.model)
        load_model_tensors(model, ck.tensors, str(ck.path))
        data = ck.run / "data" if read_manifest(ck.run / "data") else (Path(ck.info["data"]) if ck.info.get("data") else None)
        loaded = LoadedModel(model, ck.tokenizer, dev, "checkpoint", ck.path, ck.run, data, ck.info.get("step"))
    elif (path / "config.json").is_file():
        hf = read_hf(path, allow_pickle)
        model = Transformer(hf.model)
        load_model_tensors(model, hf.tensors, str(path))
        loaded = LoadedModel(model, hf.tokenizer, dev, "hf", path, path, None, None)
    elif not path.exists():
        raise KilnError(f"{key}={spec} does not exist; name a run, a checkpoint directory or an export directory")
    elif (path / "tokenizer").is_dir() or (path / "data").is_dir():
        raise KilnError(f"{key}={spec} holds no checkpoint yet; train one first (kiln pretrain out={spec})")
    else:
        raise KilnError(f"{key}={spec} is not a run (checkpoints/), a checkpoint (checkpoint.json) or a Hugging Face "
                        "directory (config.json); point it at e.g. runs/NAME or runs/NAME/export/hf")
    loaded.model.init_buffers()
    loaded.model.to(dev).eval()
    return loaded


# ---- scoring ---------------------------------------------------------------------------------------
@torch.no_grad()
def score_windows(lm: LoadedModel, windows: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[tuple[float, bool]]:
    """For each (inputs, targets) window: the summed log-probability of `targets`, read at the last
    len(targets) positions of `inputs` (inputs[k] predicts the next token), and whether each target
    is the greedy choice."""
    out: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))  # similar lengths together
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = max(len(windows[i][0]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(windows[i][0])] = torch.tensor(windows[i][0])
        logits = lm.model(ids.to(lm.device))  # causal: the padding after a row's tokens never reaches them
        logp = F.log_softmax(logits[..., : lm.n_vocab].float(), dim=-1)
        for r, i in enumerate(idx):
            inputs, targets = windows[i]
            at = torch.arange(len(inputs) - len(targets), len(inputs), device=lm.device)
            tgt = torch.tensor(targets, device=lm.device)
            rows = logp[r, at]
            out[i] = (float(rows.gather(-1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all()))
    return out


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Windows that predict every token of `tokens` exactly once (lm-evaluation-harness's rolling
    scheme): the first starts from `prefix`; each later one predicts the next up to `max_len`
    tokens with as much context as fits, so the last window has a full context too."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    out = [([prefix, *tokens[: first - 1]], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(done + max_len, len(tokens))
        out.append((tokens[end - max_len - 1 : end - 1], tokens[done:end]))
        done = end
    return out


def read_text_file(path: Path) -> str:
    """A text file to score, or a one-line error (read before any scoring starts)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KilnError(f"eval.text: '{path}' does not exist; name a text file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KilnError(f"eval.text: '{path}' is not readable UTF-8 text ({e.__class__.__name__}); name a text file") from None
    if not text:
        raise KilnError(f"eval.text: '{path}' is empty; name a file with text in it")
    return text


def text_bits_per_byte(lm: LoadedModel, text: str, seq_len: int, batch_size: int) -> dict:
    """Bits per byte of a text, read as one document after <|bos|>, over its exact UTF-8 bytes."""
    tokens = lm.encode(text)
    scores = score_windows(lm, rolling_windows(tokens, lm.bos, seq_len), batch_size)
    nats = -sum(s for s, _ in scores)
    n_bytes = len(text.encode("utf-8"))
    return {"bpb": nats / math.log(2) / n_bytes, "tokens": len(tokens), "bytes": n_bytes}


@torch.no_grad()
def heldout_bits_per_byte(lm: LoadedModel, ddir: Path, seq_len: int, batch_size: int, max_batches: int) -> dict:
    """Bits per byte of the held-out (validation) split in windows of `seq_len`, with the split's
    bytes per token (what training's val_bpb uses, so the two compare)."""
    from kiln.data.shards import eval_batches, open_data

    man = open_data(ddir)
    val = man["splits"]["val"]
    batches = eval_batches(ddir, batch_size, seq_len, max_batches)
    if not batches:
        raise KilnError(f"the held-out split of '{ddir}' is shorter than one window of {seq_len + 1} tokens; "
                        "lower eval.seq_len or prepare more data")
    nats, count = 0.0, 0
    for b in batches:
        logits = lm.model(b["input_ids"].to(lm.device))
        labels = b["labels"].to(lm.device)
        nats += float(F.cross_entropy(logits[..., : lm.n_vocab].flatten(0, 1).float(), labels.flatten(), reduction="sum"))
        count += labels.numel()
    loss = nats / count
    return {"bpb": loss / math.log(2) * val["tokens"] / max(val["bytes"], 1), "loss": loss, "tokens": count,
            "seq_len": seq_len, "data": str(ddir), "unigram_bpb": man.get("unigram_bpb")}


# ---- generation -------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_generate(lm: LoadedModel, prompts: list[list[int]], max_new: int,
                    done: Callable[[int, list[int]], bool] | None = None, batch_size: int = 8) -> list[tuple[list[int], str]]:
    """Greedy continuations of token-id prompts, batched with the KV cache: each row stops at
    <|bos|> / <|eos|> ("end"), when `done(prompt index, new ids)` says so ("done"), or at its
    budget of `max_new` tokens within the model's context ("length"). Returns (new ids, why it stopped)."""
    cfg = lm.model.cfg
    stop = {lm.bos, lm.tokenizer.token_to_id(EOS)}
    out: list[tuple[list[int], str]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        if any(not p or len(p) >= cfg.max_seq_len for p in chunk):
            raise ValueError(f"prompts must hold 1 to {cfg.max_seq_len - 1} tokens")
        budget = [min(max_new, cfg.max_seq_len - len(p)) for p in chunk]
        width = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, : len(p)] = torch.tensor(p)
            mask[r, : len(p)] = 1
        cache = KVCache(cfg, len(chunk), min(cfg.max_seq_len, width + max(budget)), device=lm.device)
        logits = lm.model(ids.to(lm.device), attention_mask=mask.to(lm.device), cache=cache)
        last = logits[torch.arange(len(chunk)), torch.tensor([len(p) - 1 for p in chunk])]
        gen: list[list[int]] = [[] for _ in chunk]
        why: list[str | None] = [None] * len(chunk)
        for _ in range(max(budget)):
            nxt = last[:, : lm.n_vocab].argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                if why[r] is not None:
                    continue
                if t in stop:
                    why[r] = "end"
                    continue
                gen[r].append(t)
                if done is not None and done(s + r, gen[r]):
                    why[r] = "done"
                elif len(gen[r]) >= budget[r]:
                    why[r] = "length"
            if all(w is not None for w in why):
                break
            # rows already finished decode on (their output is ignored) until the batch is done
            last = lm.model(nxt[:, None], cache=cache)[:, -1]
        out += [(g, w or "length") for g, w in zip(gen, why)]
    return out


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


def _prompt_ids(lm: LoadedModel, text: str, room: int) -> list[int]:
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


def next_line_task(lm: LoadedModel, sources: list[tuple[str, ast.Module]], n: int, rng: random.Random,
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


def function_task(lm: LoadedModel, sources: list[tuple[str, ast.Module]], n: int, rng: random.Random,
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
    lm = load_model(run_dir, device, key=key)
    seq_len = min(ec.seq_len or min(lm.model.cfg.max_seq_len, DEFAULT_MAX_WINDOW), lm.model.cfg.max_seq_len)
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
        results["heldout"] = heldout_bits_per_byte(lm, ddir, seq_len, ec.batch_size, ec.max_batches)
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
        from kiln.post.lm_eval_adapter import run_harness

        results["harness"] = run_harness(lm, ec.harness_tasks, ec.harness_include, ec.harness_limit, ec.batch_size)
    results["notes"] = notes
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if write:
        write_json(lm.home / "eval.json", results)
        atomic_write_text(lm.home / "eval_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        if (lm.home / "checkpoints").is_dir():
            from kiln.report import write_evaluation

            write_evaluation(lm.home)
    return results


def _check_data_tokenizer(lm: LoadedModel, ddir: Path) -> None:
    """The held-out shards must be token ids of the model's own tokenizer."""
    from kiln.data.pipeline import tokenizer_path
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
        out.append(f"held-out bits/byte {h['bpb']:.4f}{base} over {h['tokens']:,} tokens in windows of {h['seq_len']}")
    for path, t in results.get("text", {}).items():
        out.append(f"{path}: {t['bpb']:.4f} bits/byte ({t['bytes']:,} bytes, {t['tokens']:,} tokens)")
    for name, t in results.get("tasks", {}).items():
        out.append(f"{name.replace('_', ' ')}: {100 * t['score']:.1f}% of {t['n']}")
    for task, metrics in results.get("harness", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        out.append(f"harness {task}: {shown}")
    return out + results.get("notes", [])


def run_eval(cfg: Config) -> dict:
    spec = cfg.eval.path or cfg.out
    results = evaluate_run(spec, cfg.eval, cfg.device, key="eval.path" if cfg.eval.path else "out")
    for line in summary_lines(results):
        print(f"eval: {line}")
    home = Path(results["model"])
    home = home.parent.parent if results["kind"] == "checkpoint" else home
    print(f"eval: results in {home / 'eval.json'}, samples in {home / 'eval_samples.jsonl'}")
    return results
