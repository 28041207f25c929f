"""Scoring and generating with a loaded model, as evaluation and the harness adapter share them:
log-probabilities of target tokens in windows, lm-evaluation-harness's rolling windows, bits per
byte of a text or of a prepared held-out split, and greedy continuations with stop tests.

Scores use only the tokenizer's ids: the padded vocabulary rows are left out of every softmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.data.tokenizer import EOS
from kiln.errors import KilnError
from kiln.infer.generate import generate, greedy
from kiln.infer.load import Loaded

# Scoring windows when eval.seq_len=0: the model's context, up to this (imported models may declare 128k).
DEFAULT_MAX_WINDOW = 2048


# ---- scoring ---------------------------------------------------------------------------------------
@torch.no_grad()
def score_windows(lm: Loaded, windows: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[tuple[float, bool]]:
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


def text_bits_per_byte(lm: Loaded, text: str, seq_len: int, batch_size: int) -> dict:
    """Bits per byte of a text, read as one document after <|bos|>, over its exact UTF-8 bytes."""
    tokens = lm.encode(text)
    scores = score_windows(lm, rolling_windows(tokens, lm.bos, seq_len), batch_size)
    nats = -sum(s for s, _ in scores)
    n_bytes = len(text.encode("utf-8"))
    return {"bpb": nats / math.log(2) / n_bytes, "tokens": len(tokens), "bytes": n_bytes}


@torch.no_grad()
def heldout_bits_per_byte(lm: Loaded, ddir: Path, seq_len: int, batch_size: int, max_batches: int) -> dict:
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
def greedy_generate(lm: Loaded, prompts: list[list[int]], max_new: int,
                    done: Callable[[int, list[int]], bool] | None = None, batch_size: int = 8) -> list[tuple[list[int], str]]:
    """Greedy continuations of token-id prompts (`kiln.infer.generate`, `batch_size` rows at once):
    each row stops at <|bos|> / <|eos|> ("end"), when `done(prompt index, new ids)` says so
    ("done"), or at its budget of `max_new` tokens within the model's context ("length").
    Returns (new ids, why it stopped)."""
    stop = {lm.bos, lm.tokenizer.token_to_id(EOS)}
    seqs = generate(lm.model, prompts, greedy(max_new), stop_ids=stop, vocab=lm.n_vocab, rows=batch_size, until=done)
    return [(s.tokens, {"end": "end", "until": "done"}.get(s.ended_by, "length")) for s in seqs]
