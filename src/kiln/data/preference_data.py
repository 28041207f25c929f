"""Preference pairs for `kiln reward` and `kiln dpo`: reading TRL's JSONL, rendering, batching.

A row is `{"prompt": ..., "chosen": ..., "rejected": ...}` (TRL's preference format), either
text (the prompt is a user turn, each completion an assistant turn) or conversational (message
lists; without "prompt", the turns `chosen` and `rejected` share form the prompt). Each side is
rendered in the run's chat format (`kiln.data.chat.ChatFormat`: kiln's, or an imported model's
template), so the loss-carrying tokens are the final assistant turn and its end-of-turn token. Rows that cannot be used are skipped and counted by reason (or, with
`preference.strict`, stop the run at the first one with its file and line).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kiln.data.chat import IGNORE, as_format, check_messages
from kiln.data.inputs import check_pairs
from kiln.errors import KilnError

# Skip reasons, counted in the run's log and metrics.
MALFORMED, IDENTICAL, PROMPT_TOO_LONG, TRUNCATED = "malformed", "identical", "prompt_too_long", "truncated"


@dataclass
class PairStats:
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first: dict = field(default_factory=dict)  # reason -> first example (file:line)
    truncated: int = 0

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first.setdefault(reason, where)

    def describe(self) -> str:
        parts = [f"{self.kept:,} of {self.rows:,} pairs kept"]
        parts += [f"{n:,} skipped: {r} (first: {self.first[r]})" for r, n in sorted(self.skipped.items())]
        if self.truncated:
            parts.append(f"{self.truncated:,} cut to train.seq_len")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "truncated": self.truncated, **{f"skipped_{k}": v for k, v in self.skipped.items()}}


def _side(value, role: str, where: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise KilnError(f"{where}: empty text")
        return [{"role": role, "content": value}]
    return check_messages(value, where)


def normalize_row(row, where: str) -> dict:
    """{prompt, chosen, rejected} as message lists, or a one-line KilnError naming what is wrong."""
    if not isinstance(row, dict):
        raise KilnError(f"{where}: a row must be a JSON object with 'prompt', 'chosen' and 'rejected'")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise KilnError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    if "prompt" in row:
        prompt = _side(row["prompt"], "user", f"{where} 'prompt'")
        chosen = _side(row["chosen"], "assistant", f"{where} 'chosen'")
        rejected = _side(row["rejected"], "assistant", f"{where} 'rejected'")
    else:  # implicit prompt: two whole conversations, the shared turns are the prompt
        chosen = check_messages(row["chosen"], f"{where} 'chosen'")
        rejected = check_messages(row["rejected"], f"{where} 'rejected'")
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise KilnError(f"{where}: without 'prompt', 'chosen' and 'rejected' must share their first turns")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if side[-1]["role"] != "assistant":
            raise KilnError(f"{where}: '{name}' must end with an assistant turn")
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if isinstance(row.get("kind"), str) and re.fullmatch(r"\w{1,40}", row["kind"]):
        out["kind"] = row["kind"]  # a label of the pair (e.g. how the rejection was made): held-out accuracy by kind
    return out


def read_pairs(path: str | Path, stats: PairStats, strict: bool = False, limit: int = 0,
               key: str = "preference.data") -> list[dict]:
    """Normalized rows of a preference JSONL file; unusable rows skipped and counted (or, strict, refused).
    `key` names the setting that gave `path`, for the errors."""
    p = check_pairs(path, key)
    rows = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit and len(rows) >= limit:
                break
            stats.rows += 1
            where = f"{p} line {n}"
            try:
                rows.append(normalize_row(json.loads(line), where))
            except (json.JSONDecodeError, KilnError) as e:
                problem = f"{where} is not JSON" if isinstance(e, json.JSONDecodeError) else str(e)
                if strict:
                    raise KilnError(f"{problem}; fix the row or drop preference.strict to skip it") from None
                stats.skip(MALFORMED, problem)
    if not stats.rows:
        raise KilnError(f"preference data '{path}' is empty (no rows); give a JSONL file of "
                        '{"prompt": ..., "chosen": ..., "rejected": ...} rows')
    return rows


def prompt_key(row: dict) -> str:
    return hashlib.sha256(json.dumps(row["prompt"], sort_keys=True).encode()).hexdigest()


def held_out_split(rows: list[dict], fraction: float, what: str = "preference pairs") -> tuple[list, list]:
    """(train, held-out) by prompt: every pair of a prompt lands on the same side, the same way on every run."""
    keys = sorted({prompt_key(r) for r in rows})
    n_val = max(1, round(fraction * len(keys)))
    if len(keys) < 2:
        raise KilnError(f"{len(rows)} {what} with {len(keys)} distinct prompt(s): too few to hold any out; "
                        "give more data or a separate held-out file")
    val = set(keys[:n_val])
    return [r for r in rows if prompt_key(r) not in val], [r for r in rows if prompt_key(r) in val]


@dataclass
class Pair:
    chosen: list[int]
    rejected: list[int]
    prompt_len: int  # tokens before the completion (shared by both sides)
    ref: tuple[float, float] | None = None  # the reference's summed log-probabilities, when precomputed
    kind: str = ""  # the row's "kind", if it had one


def _rendered(fmt, prompt: list[dict], completion: list[dict]) -> tuple[list[int], int]:
    r = fmt.render(prompt + completion, train_on="last")
    first = next(i for i, lab in enumerate(r.labels) if lab != IGNORE)
    return r.ids, first


def tokenize_pairs(fmt, rows: list[dict], seq_len: int, stats: PairStats) -> list[Pair]:
    """Render both sides of each row in `fmt` (the run's ChatFormat, or a kiln tokenizer). A completion
    running past `seq_len` is cut there (counted); a prompt leaving no room for one completion token,
    or two sides that are the same tokens, is skipped."""
    fmt = as_format(fmt)
    out = []
    for i, row in enumerate(rows):
        (c, pc), (r, pr) = _rendered(fmt, row["prompt"], row["chosen"]), _rendered(fmt, row["prompt"], row["rejected"])
        start = min(pc, pr)
        if c == r:
            stats.skip(IDENTICAL, f"pair {i}: chosen and rejected are the same")
            continue
        if max(pc, pr) >= seq_len:
            stats.skip(PROMPT_TOO_LONG, f"pair {i}: a prompt of {max(pc, pr)} tokens leaves no room in train.seq_len={seq_len}")
            continue
        if len(c) > seq_len or len(r) > seq_len:
            stats.truncated += 1
            c, r = c[:seq_len], r[:seq_len]
            if c == r:
                stats.skip(IDENTICAL, f"pair {i}: chosen and rejected are the same within train.seq_len={seq_len}")
                continue
        out.append(Pair(c, r, start, kind=row.get("kind", "")))
        stats.kept += 1
    return out


PAD_MULTIPLE = 32  # batch widths are rounded up to this, so a compiled model sees few distinct shapes


def batch_width(pairs: list[Pair], seq_len: int) -> int:
    """The longest side of any pair, rounded up to PAD_MULTIPLE, at most `seq_len`: pairs are
    padded to their batch's longest, not to the context (most pairs are a fraction of it)."""
    longest = max((max(len(p.chosen), len(p.rejected)) for p in pairs), default=1)
    return min(seq_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)


def pair_batch(pairs: list[Pair], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, width) ids, masks and next-token labels (the completion's tokens only) for each side, plus precomputed
    reference log-probabilities when every pair has them; width is `batch_width`."""
    batch = {}
    width = batch_width(pairs, seq_len)
    for side in ("chosen", "rejected"):
        ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
        for b, p in enumerate(pairs):
            seq = getattr(p, side)
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            # kiln's convention: labels[t] is the token position t predicts (the next one)
            labels[b, p.prompt_len - 1 : len(seq) - 1] = torch.tensor(seq[p.prompt_len:])
        batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"] = ids, mask, labels
    if pairs and all(p.ref is not None for p in pairs):
        batch["ref_chosen_logp"] = torch.tensor([p.ref[0] for p in pairs], dtype=torch.float64)
        batch["ref_rejected_logp"] = torch.tensor([p.ref[1] for p in pairs], dtype=torch.float64)
    return batch


class PairLoader:
    """Shuffled batches of pairs, a fresh order each epoch; each data-parallel rank takes its own
    slice of every global batch. Resumable (epoch and position)."""

    def __init__(self, pairs: list[Pair], batch_size: int, seq_len: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        if len(pairs) < batch_size * world:
            raise KilnError(f"{len(pairs)} training pairs are fewer than one batch ({batch_size}×{world} ranks); "
                            "give more pairs or lower train.batch_size")
        self.pairs, self.batch_size, self.seq_len, self.pad_id = pairs, batch_size, seq_len, pad_id
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.pos = 0, 0
        self.batch_tokens = 0  # positions in the last batch (both sides), for the trainer's tokens/s

    def _order(self) -> np.ndarray:
        return np.random.default_rng((self.seed, self.epoch)).permutation(len(self.pairs))

    def next_batch(self) -> dict[str, torch.Tensor]:
        step = self.batch_size * self.world
        if self.pos + step > len(self.pairs):
            self.epoch, self.pos = self.epoch + 1, 0
        order = self._order()
        start = self.pos + self.rank * self.batch_size
        chosen = [self.pairs[i] for i in order[start : start + self.batch_size]]
        self.pos += step
        batch = pair_batch(chosen, self.seq_len, self.pad_id)
        self.batch_tokens = 2 * batch["chosen_input_ids"].numel()
        return batch

    @property
    def tokens_per_batch(self) -> int:
        """The most a batch holds (every pair at train.seq_len): what train.tokens_per_step counts in."""
        return 2 * self.batch_size * self.seq_len

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def eval_pair_batches(pairs: list[Pair], batch_size: int, seq_len: int, pad_id: int, rank: int = 0,
                      world: int = 1) -> list[dict[str, torch.Tensor]]:
    """Every held-out pair once (this rank's share), in batches; when the pairs have kinds, each
    batch lists them under "kind" (the objectives then report accuracy by kind too)."""
    mine = pairs[rank::world]
    kinds = any(p.kind for p in pairs)
    batches = []
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        batch = pair_batch(chunk, seq_len, pad_id)
        if kinds:
            batch["kind"] = [p.kind or "other" for p in chunk]
        batches.append(batch)
    return batches


def by_kind(name: str, batch: dict, correct: torch.Tensor) -> dict[str, tuple[float, float]]:
    """`name_<kind>`: (right, count) of `correct` (one value per pair) for each kind in the batch."""
    out: dict[str, tuple[float, float]] = {}
    for i, kind in enumerate(batch.get("kind", [])):
        s, n = out.get(f"{name}_{kind}", (0.0, 0.0))
        out[f"{name}_{kind}"] = (s + float(correct[i]), n + 1)
    return out


def load_pairs(cfg, fmt, seq_len: int, what: str) -> tuple[list[Pair], list[Pair], PairStats, PairStats]:
    """Training and held-out pairs for `cfg.preference`, rendered in `fmt`: the user's JSONL, or the
    embedded default pairs. Malformed rows count in the training stats (the held-out file's in
    the held-out stats). Refuses a side with no usable pair in one line."""
    pc = cfg.preference
    train_stats, val_stats = PairStats(), PairStats()
    if pc.data:
        rows = read_pairs(pc.data, train_stats, pc.strict, pc.max_pairs)
        if pc.val_data:
            val_rows = read_pairs(pc.val_data, val_stats, pc.strict, key="preference.val_data")
        else:
            rows, val_rows = held_out_split(rows, pc.val_fraction)
            train_stats.rows -= len(val_rows)
            val_stats.rows = len(val_rows)
    else:
        from kiln.data.preference_default import default_pairs

        rows, val_rows = default_pairs(pc.max_pairs or 4000, pc.val_fraction, cfg.data.seed)
        rows, val_rows = ([normalize_row(r, f"default pair {r['source']}") for r in side] for side in (rows, val_rows))
        train_stats.rows, val_stats.rows = len(rows), len(val_rows)
    train = tokenize_pairs(fmt, rows, seq_len, train_stats)
    val = tokenize_pairs(fmt, val_rows, seq_len, val_stats)
    if not train:
        raise KilnError(f"{what}: no usable training pair ({train_stats.describe()}); fix the data or raise train.seq_len")
    if not val:
        raise KilnError(f"{what}: no usable held-out pair ({val_stats.describe()}); give preference.val_data or more pairs")
    return train, val, train_stats, val_stats
