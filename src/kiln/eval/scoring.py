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
from torch import nn

from kiln.data.shards import held_out_batches, held_out_window, open_data, tokens_per_byte
from kiln.errors import KilnError
from kiln.infer.generate import generate, greedy
from kiln.infer.load import Loaded
from kiln.runs import HeldOutWindows
from kiln.train.objectives import bits_per_byte, model_inputs, token_cross_entropy

# Held-out windows of a model whose training recorded none (a Hugging Face directory): its context,
# up to this (imported models may declare 128k), and this many of them.
DEFAULT_MAX_WINDOW = 2048
DEFAULT_WINDOWS = 400


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


def run_windows(lm: Loaded | None = None, seq_len: int = 0, count: int = 0, *, info: dict | None = None,
                context: int = 0) -> HeldOutWindows:
    """The held-out windows a model's figures are measured on: the ones its training validated
    on (checkpoint.json's `validation`), with `seq_len` / `count` overriding theirs when set;
    without a record (a Hugging Face directory, an imported run), windows of the model's context
    (at most DEFAULT_MAX_WINDOW tokens), DEFAULT_WINDOWS of them."""
    info = lm.info if lm is not None else (info or {})
    context = lm.model.cfg.max_seq_len if lm is not None else context
    recorded = HeldOutWindows.from_dict(info.get("validation"))
    base = recorded or HeldOutWindows(min(context, DEFAULT_MAX_WINDOW), DEFAULT_WINDOWS)
    return HeldOutWindows(min(seq_len or base.seq_len, context), count or base.count, base.document_mask)


@torch.no_grad()
def heldout_bits_per_byte(model: nn.Module, ddir: Path, windows: HeldOutWindows, vocab: int, batch_size: int = 8,
                          reference: nn.Module | None = None) -> dict:
    """Held-out bits per byte: next-token cross-entropy over the tokenizer's `vocab` ids on
    `windows` of the prepared held-out split, at the split's tokens per byte. Training's `val_bpb`
    is this figure on the windows the run records, so a model gets one held-out number
    wherever it is printed. With a `reference` model (the float one) also the mean
    KL(reference ‖ model) per token and the share of positions where both pick the same top token:
    measures of closeness that bits per byte over a few windows are too coarse for.

    A split shorter than one window is scored in the longest window it holds (`note` says so)."""
    man = open_data(ddir)
    fits = held_out_window(ddir, windows.seq_len)
    if not fits:
        raise KilnError(f"the held-out split of '{ddir}' holds no tokens to score; prepare it with a larger "
                        "data.val_fraction")
    note = ""
    if fits < windows.seq_len:
        note = (f"the held-out split of '{ddir}' is shorter than one window of {windows.seq_len + 1} tokens; "
                f"scored in windows of {fits} tokens")
        windows = HeldOutWindows(fits, windows.count, windows.document_mask)
    device = next(model.buffers()).device
    nats = count = kl = same = 0.0
    for b in held_out_batches(ddir, windows, batch_size):
        labels = b["labels"].to(device)
        logits = model(b["input_ids"].to(device), **{k: v.to(device) for k, v in model_inputs(b).items()})
        nats += float(token_cross_entropy(logits, labels, vocab)[0])
        count += labels.numel()
        if reference is not None:
            ref = reference(b["input_ids"].to(device), **{k: v.to(device) for k, v in model_inputs(b).items()})
            logp, ref_logp = logits[..., :vocab].float().log_softmax(-1), ref[..., :vocab].float().log_softmax(-1)
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            same += float((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    loss = nats / count
    out = {"bpb": bits_per_byte(loss, tokens_per_byte(man)), "loss": loss, "tokens": int(count),
           "windows": windows.to_dict(), "seq_len": windows.seq_len, "data": str(ddir),
           "unigram_bpb": man.get("unigram_bpb"), "note": note}
    if reference is not None:
        out.update(kl_to_float=kl / count, top1_agreement=same / count)
    return out


def describe_heldout(h: dict) -> str:
    """Where a held-out figure was measured, for the line that prints it."""
    w = HeldOutWindows.from_dict(h["windows"])
    return f"over {h['tokens']:,} tokens: {w.describe()}"


# ---- generation -------------------------------------------------------------------------------------
def greedy_generate(lm: Loaded, prompts: list[list[int]], max_new: int,
                    done: Callable[[int, list[int]], bool] | None = None, batch_size: int = 8) -> list[tuple[list[int], str]]:
    """Greedy continuations of token-id prompts (`kiln.infer.generate`, `batch_size` rows at once):
    each row stops at <|bos|> / <|eos|> ("end"), when `done(prompt index, new ids)` says so
    ("done"), or at its budget of `max_new` tokens within the model's context ("length").
    Returns (new ids, why it stopped)."""
    stop = {i for i in (lm.bos, *lm.chat_format.eos) if i is not None}
    seqs = generate(lm.model, prompts, greedy(max_new), stop_ids=stop, vocab=lm.n_vocab, rows=batch_size, until=done)
    return [(s.tokens, {"end": "end", "until": "done"}.get(s.ended_by, "length")) for s in seqs]
