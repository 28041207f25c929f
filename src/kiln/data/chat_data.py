"""Conversation datasets for fine-tuning: JSONL in, packed batches with loss on assistant tokens out.

Two record formats, one per line (mixed freely in one file):

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}          # = one user turn and one assistant reply

Each conversation is rendered in the run's chat format (`kiln.data.chat.ChatFormat.render`: kiln's
own, or an imported model's template): labels only on assistant tokens and their end-of-turn token
(or only the last assistant turn). A bad record (not JSON, neither format, an
unknown role, empty content) is skipped and counted by reason with its first example, or stops
the run with one line under `strict`. A conversation longer than the context is dropped and
counted, or truncated and counted; never cut silently. A file with nothing usable is an error.

Batches pack several conversations into each row of `seq_len` tokens. `document_ids` and
`positions` that restart at every conversation keep them apart (attention stops at the
boundary, as if each were alone), padding fills the rest of a row and carries no loss. The
packing of an epoch is a pure function of (seed, epoch), so the loader's position is two
integers and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kiln.data.chat import IGNORE, as_format, check_messages
from kiln.data.inputs import check_conversations
from kiln.errors import KilnError

# Reasons a record is skipped (counted, with the first example's one-line description).
NOT_JSON, NOT_A_CONVERSATION, MALFORMED, NO_TARGET, TOO_LONG = (
    "not JSON", "neither messages nor prompt/completion", "malformed messages", "no assistant turn",
    "longer than the context")


@dataclass
class ChatStats:
    """What reading and tokenizing a file did: kept, skipped (by reason), truncated, token counts."""

    records: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_problem: dict[str, str] = field(default_factory=dict)  # reason -> the first such record's line
    truncated: int = 0  # kept, cut to the context (sft.too_long=truncate)
    truncated_to_no_target: int = 0  # of those, cut before any assistant token: they teach nothing
    tokens: int = 0
    target_tokens: int = 0

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.first_problem.setdefault(reason, detail)

    def describe(self) -> str:
        """One line: kept, and every skip reason with its first example."""
        parts = [f"{self.kept:,} of {self.records:,} conversations kept ({self.target_tokens:,} of "
                 f"{self.tokens:,} tokens carry a loss)"]
        for reason, n in self.skipped.most_common():
            parts.append(f"{n:,} skipped: {reason} (first: {self.first_problem[reason]})")
        if self.truncated:
            parts.append(f"{self.truncated:,} truncated to the context ({self.truncated_to_no_target:,} of them "
                         "lost every assistant token)")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"records": self.records, "kept": self.kept, "skipped": dict(self.skipped),
                "first_problem": self.first_problem, "truncated": self.truncated,
                "truncated_to_no_target": self.truncated_to_no_target, "tokens": self.tokens,
                "target_tokens": self.target_tokens}


def record_messages(record, where: str) -> list[dict]:
    """The messages of one parsed record (either format), or a KilnError saying what is wrong."""
    if isinstance(record, dict) and "messages" in record:
        return check_messages(record["messages"], where)
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        p, c = record["prompt"], record["completion"]
        if not (isinstance(p, str) and p.strip() and isinstance(c, str) and c.strip()):
            raise KilnError(f"{where}: 'prompt' and 'completion' must both be non-empty text")
        return [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
    raise KilnError(f"{where}: a record needs 'messages' (a list of {{role, content}}) or 'prompt' and 'completion'")


def read_conversations(path: str | Path, stats: ChatStats, strict: bool = False,
                       key: str = "sft.data") -> list[list[dict]]:
    """Every usable conversation of a JSONL file; the rest counted in `stats` (or, `strict`, an error).
    `key` names the setting that gave `path`, for the errors."""
    path = check_conversations(path, key)
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            stats.records += 1
            where = f"{path} line {n}"
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problem = f"{where} is not JSON ({str(e).split(':')[0]})"
                if strict:
                    raise KilnError(f"{problem}; fix the line or drop sft.strict to skip it") from None
                stats.skip(NOT_JSON, problem)
                continue
            try:
                messages = record_messages(record, where)
            except KilnError as e:
                if strict:
                    raise KilnError(f"{e}; fix the record or drop sft.strict to skip it") from None
                known = isinstance(record, dict) and ("messages" in record or {"prompt", "completion"} <= set(record))
                stats.skip(MALFORMED if known else NOT_A_CONVERSATION, str(e))
                continue
            if not any(m["role"] == "assistant" for m in messages):
                stats.skip(NO_TARGET, f"{where} has no assistant turn to learn")
                continue
            out.append(messages)
    if not stats.records:
        raise KilnError(f"'{path}' is empty (no records); give a JSONL file of {{\"messages\": [...]}} or "
                        "{\"prompt\", \"completion\"} records")
    return out


@dataclass
class Example:
    """One rendered conversation: `ids` and aligned `labels` (IGNORE where no loss)."""

    ids: np.ndarray
    labels: np.ndarray

    @property
    def length(self) -> int:
        """Positions it fills in a packed row: every token but the last is an input."""
        return len(self.ids) - 1


def tokenize(fmt, conversations: list[list[dict]], seq_len: int, stats: ChatStats,
             too_long: str = "drop", train_on: str = "assistant") -> list[Example]:
    """Render each conversation in `fmt` (the run's ChatFormat, or a kiln tokenizer: kiln's format);
    one longer than `seq_len` inputs is dropped or truncated (counted)."""
    fmt = as_format(fmt)
    out = []
    for messages in conversations:
        r = fmt.render(messages, train_on=train_on)
        ids, labels = np.asarray(r.ids, dtype=np.int64), np.asarray(r.labels, dtype=np.int64)
        if len(ids) - 1 > seq_len:
            if too_long == "drop":
                stats.skip(TOO_LONG, f"a conversation of {len(ids)} tokens > train.seq_len={seq_len} + 1")
                continue
            ids, labels = ids[: seq_len + 1], labels[: seq_len + 1]
            stats.truncated += 1
            stats.truncated_to_no_target += int(not (labels[1:] != IGNORE).any())
        stats.kept += 1
        stats.tokens += len(ids) - 1
        stats.target_tokens += int((labels[1:] != IGNORE).sum())
        out.append(Example(ids, labels))
    return out


def held_out_split(conversations: list[list[dict]], fraction: float) -> tuple[list, list]:
    """(train, held-out): the ⌈fraction·n⌉ conversations whose content hashes lowest are held out,
    so the split does not depend on the file's order and a conversation never changes side."""
    def key(c):
        return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()

    if len(conversations) < 2:
        raise KilnError(f"{len(conversations)} usable conversation(s): too few to hold any out; give more data "
                        "or a separate sft.val_data")
    order = sorted(range(len(conversations)), key=lambda i: key(conversations[i]))
    held = set(order[: max(1, math.ceil(fraction * len(conversations)))])
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


# ---- packing -------------------------------------------------------------------------------
def pack_rows(lengths: list[int], seq_len: int, window: int = 64) -> list[list[int]]:
    """Group example indices, in the given order, into rows of at most `seq_len` positions: each
    goes into the first of the last `window` open rows with room (first fit), else a new row."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r in range(max(0, len(rows) - window), len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    return rows


def packed_batch(examples: list[Example], rows: list[list[int]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `labels` (next token, IGNORE off the assistant turns and on padding), and
    `document_ids` / `positions` restarting at every conversation (padding is one more document)."""
    b = len(rows)
    ids = np.full((b, seq_len), pad_id, dtype=np.int64)
    labels = np.full((b, seq_len), IGNORE, dtype=np.int64)
    docs = np.zeros((b, seq_len), dtype=np.int64)
    pos = np.zeros((b, seq_len), dtype=np.int64)
    for r, row in enumerate(rows):
        t = 0
        for d, i in enumerate(row):
            ex, n = examples[i], examples[i].length
            ids[r, t : t + n] = ex.ids[:-1]
            labels[r, t : t + n] = ex.labels[1:]
            docs[r, t : t + n] = d
            pos[r, t : t + n] = np.arange(n)
            t += n
        docs[r, t:] = len(row)
        pos[r, t:] = np.arange(seq_len - t)
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "document_ids": torch.from_numpy(docs), "positions": torch.from_numpy(pos)}


class PackedChatLoader:
    """Packed batches of (batch_size, seq_len) for one data-parallel rank: the shared loader
    interface (`next_batch`, `state_dict`, `load_state_dict`, `tokens_per_batch`).

    Each epoch shuffles the examples with (seed, epoch) and packs them into rows; global batch k
    takes rows [k·world·B, (k+1)·world·B) and rank r its r-th slice of B rows.
    """

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        if any(e.length > seq_len for e in examples):
            raise ValueError("every example must fit seq_len; tokenize() drops or truncates the others")
        self.examples, self.batch_size, self.seq_len, self.pad_id = examples, batch_size, seq_len, pad_id
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.pos = 0, 0
        self._rows = self._pack(0)
        self._fill = sum(e.length for e in examples) / max(1, len(self._rows) * seq_len)
        if len(self._rows) < batch_size * world:
            raise KilnError(f"{len(examples):,} conversations pack into {len(self._rows)} rows of {seq_len} tokens, "
                            f"fewer than one global batch ({batch_size}×{world}); give more data or lower "
                            "train.batch_size")

    def _pack(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        rows = pack_rows([self.examples[i].length for i in order], self.seq_len)
        return [[int(order[j]) for j in row] for row in rows]

    def next_batch(self) -> dict[str, torch.Tensor]:
        step = self.batch_size * self.world
        if self.pos + step > len(self._rows):
            self.epoch, self.pos = self.epoch + 1, 0
            self._rows = self._pack(self.epoch)
        start = self.pos + self.rank * self.batch_size
        rows = self._rows[start : start + self.batch_size]
        self.pos += step
        return packed_batch(self.examples, rows, self.seq_len, self.pad_id)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def fill(self) -> float:
        """Share of the first epoch's row positions that hold a conversation token rather than padding."""
        return self._fill

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "world": self.world,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self._rows = self._pack(self.epoch)
        same = (state["seq_len"], state["batch_size"] * state["world"], state["examples"]) == (
            self.seq_len, self.batch_size * self.world, len(self.examples))
        if same:
            self.pos = state["pos"]
        else:  # another global batch or data: keep the share of the epoch already seen
            step = self.batch_size * self.world
            self.pos = int(state["pos"] / max(1, state["examples"]) * len(self.examples)) // step * step
            self.pos = min(self.pos, max(0, len(self._rows) - step))


def packed_eval_batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int, max_batches: int = 0,
                        rank: int = 0, world: int = 1) -> list[dict[str, torch.Tensor]]:
    """The held-out examples packed in order, the same batches at every evaluation; with several
    data-parallel ranks each takes every world-th batch (the evaluator sums over ranks). Every rank
    gets as many batches, the last ones padding only if need be (no loss, nothing counted): under
    FSDP a forward is a collective, so a rank with one batch fewer would leave the others waiting."""
    rows = pack_rows([e.length for e in examples], seq_len)
    n = math.ceil(len(rows) / batch_size)
    if max_batches:
        n = min(n, max_batches)
    n = world * math.ceil(n / world)
    return [packed_batch(examples, (rows[b * batch_size : (b + 1) * batch_size] + [[]] * batch_size)[:batch_size],
                         seq_len, pad_id) for b in range(rank, n, world)]
