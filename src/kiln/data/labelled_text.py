"""Labelled text for encoder fine-tuning: the embedded stdlib tasks or a JSONL of {text, label},
split by seed, tokenized, and served in padded batches; plus the masked-LM loader over token shards.

Embedded tasks (no download), from the functions of `classify.packages` in this interpreter's
standard library:

- `stdlib-order`: a function's source as written (`original`), or with its first ORDER_LINES lines
  (about what 128 tokens show) in a random order (`shuffled`). Both texts hold the same words, so
  a bag of words cannot tell them apart; reading in order can (the quickest cue: whether the text
  starts with its `def` line; docs/vision-and-encoders.md).
- `stdlib-packages`: a function's source, labelled with the package it comes from: a lexical task.
"""

from __future__ import annotations

import ast
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kiln.config import ClassifyConfig
from kiln.data.inputs import STDLIB_TASKS, check_classify_input
from kiln.data.sources import stdlib_root
from kiln.data.tokenizer import SPECIAL_TOKENS
from kiln.errors import KilnError

SPLITS = ("train", "val", "test")
MIN_FUNCTION_CHARS = 80
ORDER_LINES = 12  # lines stdlib-order may shuffle: about what 128 tokens show


@dataclass
class Example:
    text: str
    label: int


def _functions(package: str) -> list[str]:
    """The source of every function of a stdlib package, tests left out, in file order."""
    root = stdlib_root() / package
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    out = []
    for f in files:
        if "test" in f.parts or "tests" in f.parts or not f.is_file():
            continue
        try:
            src = f.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = src.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                seg = _segment(lines, node)
                if len(seg) >= MIN_FUNCTION_CHARS:
                    out.append(seg)
    return out


def _segment(lines: list[str], node: ast.AST) -> str:
    """The node's source text (ast.get_source_segment re-splits the whole file on every call)."""
    part = lines[node.lineno - 1 : node.end_lineno]
    if len(part) == 1:
        return part[0].encode()[node.col_offset : node.end_col_offset].decode(errors="replace")
    first = part[0].encode()[node.col_offset :].decode(errors="replace")
    last = part[-1].encode()[: node.end_col_offset].decode(errors="replace")
    return first + "".join(part[1:-1]) + last


def stdlib_examples(cc: ClassifyConfig) -> tuple[list[Example], list[str], Dropped]:
    """The embedded task named by `classify.input`: examples and class names."""
    if not cc.packages:
        raise KilnError("classify.packages is empty; name stdlib packages, e.g. classify.packages=json,email,http")
    missing = [p for p in cc.packages if not (stdlib_root() / p).exists() and not (stdlib_root() / f"{p}.py").exists()]
    if missing:
        raise KilnError(f"classify.packages names {missing} which this Python's standard library lacks; "
                        "choose packages under " + str(stdlib_root()))
    rng = random.Random(cc.seed)
    if cc.input == "stdlib-packages":
        classes = list(cc.packages)
        examples = [Example(seg, k) for k, p in enumerate(classes) for seg in _functions(p)]
    else:
        classes = ["original", "shuffled"]
        examples = []
        for p in cc.packages:
            for seg in _functions(p):
                lines = seg.splitlines()
                head = lines[:ORDER_LINES]
                if len(set(head)) < 4:
                    continue
                shuffled = head[:]
                label = int(rng.random() < 0.5)
                while label and shuffled == head:
                    rng.shuffle(shuffled)
                examples.append(Example("\n".join(shuffled + lines[ORDER_LINES:]), label))
    unique, dropped = deduplicated(examples, classes)
    return _capped(unique, len(classes), cc.max_per_class, rng), classes, dropped


def jsonl_examples(cc: ClassifyConfig) -> tuple[list[Example], list[str], Dropped]:
    """{text, label} rows of a JSONL file; a row without text or label is a one-line error naming it."""
    check_classify_input(cc.input)
    path = Path(cc.input)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise KilnError(f"{path}:{n} is not valid JSON; each line is one {{text, label}} object") from None
            text = row.get(cc.text_field) if isinstance(row, dict) else None
            label = row.get(cc.label_field) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip() or label is None or str(label).strip() == "":
                raise KilnError(f"{path}:{n} lacks a non-empty '{cc.text_field}' or '{cc.label_field}'; "
                                "fix the row or set classify.text_field / classify.label_field")
            rows.append((text, str(label)))
    classes = sorted({lab for _, lab in rows})
    if len(classes) < 2:
        raise KilnError(f"'{path}' has {len(classes)} distinct label(s); classification needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    examples = [Example(t, index[lab]) for t, lab in rows]
    unique, dropped = deduplicated(examples, classes)
    return _capped(unique, len(classes), cc.max_per_class, random.Random(cc.seed)), classes, dropped


@dataclass
class Dropped:
    """Examples left out before the split, and why: a text seen again with the same label (one
    copy kept: a repeated text in both training and test would inflate test accuracy), and texts
    seen with different labels (every copy left out: which label is right is unknown)."""

    duplicates: int = 0
    conflicting: int = 0  # examples (all copies) of texts labelled more than one way
    conflicting_texts: int = 0
    examples: list[str] = field(default_factory=list)  # a few of the conflicting texts, with their labels

    def describe(self) -> str:
        parts = []
        if self.duplicates:
            parts.append(f"{self.duplicates:,} repeated text(s) (same label; one copy kept)")
        if self.conflicting:
            parts.append(f"{self.conflicting:,} example(s) of {self.conflicting_texts:,} text(s) labelled more than "
                         "one way (all left out)")
        return "; ".join(parts) or "none"


def deduplicated(examples: list[Example], classes: list[str]) -> tuple[list[Example], Dropped]:
    """One example per distinct text, in first-seen order; a text given conflicting labels is left out."""
    labels: dict[str, set[int]] = {}
    for e in examples:
        labels.setdefault(e.text, set()).add(e.label)
    dropped = Dropped()
    seen, out = set(), []
    for e in examples:
        if len(labels[e.text]) > 1:
            dropped.conflicting += 1
            if e.text not in seen:
                seen.add(e.text)
                dropped.conflicting_texts += 1
                if len(dropped.examples) < 3:
                    names = "/".join(classes[k] for k in sorted(labels[e.text]))
                    dropped.examples.append(f"{e.text[:60]!r} ({names})")
        elif e.text in seen:
            dropped.duplicates += 1
        else:
            seen.add(e.text)
            out.append(e)
    return out, dropped


def _capped(examples: list[Example], n_classes: int, cap: int, rng: random.Random) -> list[Example]:
    if not cap:
        return examples
    out = []
    for k in range(n_classes):
        mine = [e for e in examples if e.label == k]
        rng.shuffle(mine)
        out += mine[:cap]
    return out


def split_examples(examples: list[Example], n_classes: int, val: float, test: float, seed: int) -> dict[str, list[Example]]:
    """Stratified: each class shuffled by `seed`, its test and validation shares cut off first."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for k in range(n_classes):
        mine = [examples[i] for i in rng.permutation([i for i, e in enumerate(examples) if e.label == k])]
        n_test, n_val = round(test * len(mine)), round(val * len(mine))
        out["test"] += mine[:n_test]
        out["val"] += mine[n_test : n_test + n_val]
        out["train"] += mine[n_test + n_val :]
    for s in SPLITS:
        out[s].sort(key=lambda e: (e.label, e.text))
    return out


def load_examples(cc: ClassifyConfig) -> tuple[dict[str, list[Example]], list[str], Dropped]:
    """The labelled examples split (stratified) into train / val / test, the class names, and what
    was left out before the split (repeated and conflicting texts)."""
    examples, classes, dropped = stdlib_examples(cc) if cc.input in STDLIB_TASKS else jsonl_examples(cc)
    splits = split_examples(examples, len(classes), cc.val_fraction, cc.test_fraction, cc.seed)
    empty = [s for s in SPLITS if not splits[s]]
    if empty:
        raise KilnError(f"the {', '.join(empty)} split(s) of classify.input={cc.input} are empty ({len(examples)} "
                        "examples); give more examples or raise classify.val_fraction / classify.test_fraction")
    return splits, classes, dropped


def class_counts(examples: list[Example], n_classes: int) -> list[int]:
    c = Counter(e.label for e in examples)
    return [c[k] for k in range(n_classes)]


# ---- batches -------------------------------------------------------------------------------------
def encode(examples: list[Example], tokenizer, bos_id: int, seq_len: int) -> list[np.ndarray]:
    """BOS + the text's token ids, cut to `seq_len` tokens."""
    encoded = tokenizer.encode_batch([e.text for e in examples])
    return [np.asarray([bos_id, *enc.ids[: seq_len - 1]], dtype=np.int64) for enc in encoded]


def padded_batch(ids: list[np.ndarray], labels: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` (1 = token) and `labels`."""
    t = max(len(x) for x in ids)
    out = np.full((len(ids), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), t), dtype=np.int64)
    for i, x in enumerate(ids):
        out[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return {"input_ids": torch.from_numpy(out), "attention_mask": torch.from_numpy(mask),
            "labels": torch.tensor(labels, dtype=torch.long)}


class ClassificationLoader:
    """Padded batches of labelled sequences for one data-parallel rank, in a permutation seeded by
    (seed, epoch); the loader interface every workload shares, resumable from two integers."""

    def __init__(self, ids: list[np.ndarray], labels: list[int], batch_size: int, seq_len: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if len(ids) < batch_size * world:
            raise KilnError(f"the training split has {len(ids)} examples, fewer than one global batch "
                            f"({batch_size}×{world}); lower train.batch_size or give more examples")
        self.ids, self.labels, self.pad_id = ids, labels, pad_id
        self.batch_size, self.seq_len, self.seed, self.rank, self.world = batch_size, seq_len, seed, rank, world
        self.epoch, self.pos = 0, 0
        self.batch_tokens = 0  # positions in the last batch
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))

    def next_batch(self) -> dict[str, torch.Tensor]:
        step = self.batch_size * self.world
        if self.pos + step > len(self.ids):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        mine = self._perm[self.pos + self.rank * self.batch_size : self.pos + (self.rank + 1) * self.batch_size]
        self.pos += step
        batch = padded_batch([self.ids[i] for i in mine], [self.labels[i] for i in mine], self.pad_id)
        self.batch_tokens = batch["input_ids"].numel()  # rows padded to this batch's longest: the trainer's tokens/s
        return batch

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "global_batch": self.batch_size * self.world}

    def load_state_dict(self, state: dict) -> None:
        step = self.batch_size * self.world
        self.epoch = state["epoch"]
        self.pos = state["pos"] if state["global_batch"] == step else state["pos"] // step * step
        self._perm = self._permutation(self.epoch)


def ordered_batches(ids: list[np.ndarray], labels: list[int], batch_size: int, pad_id: int, rank: int = 0,
                    world: int = 1) -> list[dict[str, torch.Tensor]]:
    """A split in order (the same batches every time); each data-parallel rank takes an equal share."""
    n = math.ceil(len(ids) / batch_size)
    per = n // world
    mine = range(n) if per == 0 else range(rank, per * world, world)
    return [padded_batch(ids[b * batch_size : (b + 1) * batch_size], labels[b * batch_size : (b + 1) * batch_size],
                         pad_id) for b in mine]


MASK = "<|mask|>"  # the masked-LM mask token: the first id after the tokenizer's own


def mask_tokens(ids: torch.Tensor, gen: torch.Generator, *, mask_id: int, vocab: int, rate: float,
                mask_share: float = 0.8, random_share: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: each ordinary token (special tokens never) is chosen with probability
    `rate`; a chosen one becomes the mask token (`mask_share`), a random ordinary token
    (`random_share`) or stays itself (the rest). Returns (inputs, labels): labels are the original
    ids at the chosen positions, -100 elsewhere. At least one token of the batch is chosen."""
    ordinary = ids >= len(SPECIAL_TOKENS)
    chosen = (torch.rand(ids.shape, generator=gen) < rate) & ordinary
    if not chosen.any() and ordinary.any():
        chosen.view(-1)[ordinary.view(-1).nonzero()[0]] = True
    kind = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(len(SPECIAL_TOKENS), vocab, ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[chosen & (kind < mask_share)] = mask_id
    swap = chosen & (kind >= mask_share) & (kind < mask_share + random_share)
    inputs[swap] = random_ids[swap]
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return inputs, labels


class MaskedTokenLoader:
    """Masked-LM batches over token shards: the token loader's windows, corrupted by `mask_tokens`
    with a generator seeded by (seed, batch number, rank), so a resumed run masks alike."""

    def __init__(self, inner, mask, seed: int, rank: int = 0) -> None:
        self.inner, self.mask, self.seed, self.rank = inner, mask, seed, rank
        self.count = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.inner.next_batch()
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, self.count, self.rank]).integers(2**62)))
        self.count += 1
        batch["input_ids"], batch["labels"] = self.mask(batch["input_ids"], gen)
        return batch

    @property
    def tokens_per_batch(self) -> int:
        return self.inner.tokens_per_batch

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.count = state["count"]
