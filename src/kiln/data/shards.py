"""Token shards on disk and the loader that trains from them.

A prepared data directory holds `manifest.json` and, per split, `SPLIT_NNNNN.bin` (token ids,
uint16 or uint32, every document starting with BOS) with `SPLIT_NNNNN.idx.npy` (int64 offsets of
each document's first token). The loader memory-maps the shards and cuts them into windows of
`seq_len + 1` tokens, visited in a seeded permutation per epoch; its position is two integers,
so a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.runs import HeldOutWindows, read_manifest


class TokenShardWriter:
    """Appends documents' token ids to numbered shard files of at most `shard_tokens` tokens each
    (a single longer document makes a shard of its own): one by one with `add`, or a shard at
    a time with `add_shard` along the cuts `bounds` gives, which are the cuts `add` makes."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.dir, self.split, self.dtype, self.shard_tokens = Path(directory), split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self._parts: list[np.ndarray] = []
        self._starts: list[int] = []
        self._n = 0

    @staticmethod
    def bounds(lengths: np.ndarray, shard_tokens: int) -> np.ndarray:
        """Indices where shards start (and the end) for documents of `lengths` written in order."""
        ends = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        out, i = [0], 0
        while i < len(lengths):
            # the most documents from i whose tokens fit, and at least one
            i = max(i + 1, int(np.searchsorted(ends, ends[i] + shard_tokens, side="right")) - 1)
            out.append(i)
        return np.asarray(out, dtype=np.int64)

    def add(self, ids: np.ndarray) -> None:
        if self._n and self._n + len(ids) > self.shard_tokens:
            self._flush()
        self._starts.append(self._n)
        self._parts.append(ids.astype(self.dtype, copy=False))
        self._n += len(ids)

    def add_shard(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        """Write one whole shard: its tokens and each document's first offset in them."""
        self._flush()
        self._write(tokens.astype(self.dtype, copy=False), np.asarray(starts, dtype=np.int64))

    def _write(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):05d}"
        tokens.tofile(self.dir / f"{name}.bin")
        np.save(self.dir / f"{name}.idx.npy", starts)
        self.shards.append({"file": f"{name}.bin", "tokens": int(len(tokens)), "docs": len(starts)})

    def _flush(self) -> None:
        if not self._parts:
            return
        self._write(np.concatenate(self._parts), np.asarray(self._starts, dtype=np.int64))
        self._parts, self._starts, self._n = [], [], 0

    def close(self) -> list[dict]:
        self._flush()
        return self.shards


def open_data(path: str | Path) -> dict:
    """The manifest of a prepared data directory, checked for the files it lists."""
    path = Path(path)
    man = read_manifest(path)
    if man is None:
        raise KilnError(f"'{path}' holds no prepared data (manifest.json missing or unreadable); run `kiln prepare` first")
    for split in ("train", "val"):
        for shard in man["splits"].get(split, {}).get("shards", []):
            f = path / shard["file"]
            want = shard["tokens"] * np.dtype(man["dtype"]).itemsize
            if not f.is_file() or f.stat().st_size != want:
                raise KilnError(f"token shard '{f}' is missing or truncated; re-run `kiln prepare`")
    return man


def tokens_per_byte(man: dict) -> float:
    """The held-out split's tokens per byte of text (what turns nats per token into bits per byte)."""
    val = man["splits"]["val"]
    return val["tokens"] / max(val["bytes"], 1)


def _memmaps(path: Path, man: dict, split: str) -> list[np.ndarray]:
    shards = man["splits"].get(split, {}).get("shards", [])
    return [np.memmap(path / s["file"], dtype=man["dtype"], mode="r") for s in shards]


def _doc_starts(path: Path, man: dict, split: str) -> list[np.ndarray]:
    """Each shard's document start offsets (`*.idx.npy`), for document masks."""
    out = []
    for s in man["splits"].get(split, {}).get("shards", []):
        f = path / s["file"].replace(".bin", ".idx.npy")
        if not f.is_file():
            raise KilnError(f"'{f}' (document offsets) is missing; re-run `kiln prepare`, or set train.document_mask=false")
        out.append(np.load(f))
    return out


def window_batch(windows: list[np.ndarray], starts: list[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """A batch dict from windows of seq_len + 1 tokens: `input_ids`, `labels` (shifted by one) and,
    given each window's document starts (offsets within the window), `document_ids` and
    `positions` that restart at every document, so packed documents do not attend to each other."""
    buf = torch.from_numpy(np.stack(windows).astype(np.int64))
    batch = {"input_ids": buf[:, :-1], "labels": buf[:, 1:]}
    if starts is not None:
        t = buf.shape[1] - 1
        docs = np.zeros((len(windows), t), dtype=np.int64)
        for i, st in enumerate(starts):
            st = st[(st > 0) & (st < t)]
            docs[i, st] = 1
        docs = np.cumsum(docs, axis=1)
        idx = np.arange(t)[None, :].repeat(len(windows), 0)
        # position = index - index of the first token of the row's current document
        boundary = np.where(np.concatenate([np.ones((len(windows), 1), bool), docs[:, 1:] != docs[:, :-1]], 1), idx, 0)
        first = np.maximum.accumulate(boundary, axis=1)
        batch["document_ids"] = torch.from_numpy(docs)
        batch["positions"] = torch.from_numpy(idx - first)
    return batch


class TokenLoader:
    """Batches of `input_ids` and `labels`, (batch_size, seq_len) each, for one data-parallel rank.

    Implements the loader interface every workload shares (`next_batch`, `state_dict`,
    `load_state_dict`). Windows are visited in a permutation seeded by (seed, epoch); global
    batch k takes windows [k·world·B, (k+1)·world·B) of it and rank r its r-th slice, so ranks
    read disjoint data and every rank can recompute where it is from `state_dict()`. With
    `document_mask`, batches also carry `document_ids` and `positions` from the shards' document
    offsets (`*.idx.npy`), so attention stops at document boundaries.
    """

    def __init__(self, path: str | Path, split: str, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world: int = 1, document_mask: bool = False) -> None:
        self.path = Path(path)
        self.man = open_data(self.path)
        self.batch_size, self.seq_len, self.seed, self.rank, self.world = batch_size, seq_len, seed, rank, world
        self.maps = _memmaps(self.path, self.man, split)
        self.starts = _doc_starts(self.path, self.man, split) if document_mask else None
        counts = [max(0, (len(m) - 1) // seq_len) for m in self.maps]
        self.n_windows = sum(counts)
        if self.n_windows < batch_size * world:
            raise KilnError(
                f"the '{split}' split of '{self.path}' has {self.n_windows} windows of {seq_len + 1} tokens, fewer than "
                f"one global batch ({batch_size}×{world}); prepare more data or lower train.batch_size / train.seq_len"
            )
        self._shard_of = np.repeat(np.arange(len(counts)), counts)
        self._first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray | None]:
        s = self._shard_of[w]
        start = (w - self._first[s]) * self.seq_len
        doc_starts = None
        if self.starts is not None:
            st = self.starts[s]
            lo, hi = np.searchsorted(st, [start, start + self.seq_len])
            doc_starts = st[lo:hi] - start
        return self.maps[s][start : start + self.seq_len + 1], doc_starts

    def next_batch(self) -> dict[str, torch.Tensor]:
        step = self.batch_size * self.world
        if self.pos + step > self.n_windows:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        mine = self._perm[self.pos + self.rank * self.batch_size : self.pos + (self.rank + 1) * self.batch_size]
        self.pos += step
        windows, starts = zip(*(self._window(w) for w in mine))
        return window_batch(list(windows), list(starts) if self.starts is not None else None)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "world": self.world,
                "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if (state["seq_len"], state["batch_size"] * state["world"]) != (self.seq_len, self.batch_size * self.world):
            # A different global batch or window size: keep the share of the epoch already seen.
            frac = state["pos"] / max(1, self.n_windows)
            self.epoch, self.pos = state["epoch"], int(frac * self.n_windows) // (self.batch_size * self.world) * (
                self.batch_size * self.world)
        else:
            self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation(self.epoch)


def held_out_window(path: str | Path, seq_len: int) -> int:
    """The evaluation window the held-out split can fill: `seq_len`, or, when the split is shorter
    than one window of `seq_len` + 1 tokens, the longest one it holds (0: fewer than two tokens)."""
    path = Path(path)
    longest = max((len(m) for m in _memmaps(path, open_data(path), "val")), default=0)
    return max(0, min(seq_len, longest - 1))


def _windows(path: Path, man: dict, seq_len: int, document_mask: bool) -> tuple[list, list | None]:
    """Every consecutive window of `seq_len` + 1 tokens of the validation split, in order (with
    each window's document starts when `document_mask`)."""
    windows, starts = [], []
    doc_starts = _doc_starts(path, man, "val") if document_mask else None
    for si, m in enumerate(_memmaps(path, man, "val")):
        n = (len(m) - 1) // seq_len
        for i in range(n):
            windows.append(m[i * seq_len : i * seq_len + seq_len + 1])
            if doc_starts is not None:
                st = doc_starts[si]
                lo, hi = np.searchsorted(st, [i * seq_len, (i + 1) * seq_len])
                starts.append(st[lo:hi] - i * seq_len)
    return windows, (starts if doc_starts is not None else None)


def _batch_plan(n_windows: int, batch_size: int, max_batches: int, rank: int, world: int) -> tuple[int, range]:
    """(windows scored over all ranks, the batches `rank` takes). Every data-parallel rank must run
    the same number of batches (FSDP gathers weights in each forward): each takes an equal share,
    or, with fewer batches than ranks, all of them (the evaluator divides summed losses by summed
    counts, so copies do not change the result)."""
    n_batches = math.ceil(n_windows / batch_size)
    if max_batches:
        n_batches = min(max_batches, n_batches)
    per = n_batches // world
    if per == 0:
        return min(n_windows, n_batches * batch_size), range(n_batches)
    return min(n_windows, per * world * batch_size), range(rank, per * world, world)


def validation_windows(path: str | Path, batch_size: int, seq_len: int, max_batches: int, world: int = 1,
                       document_mask: bool = False) -> HeldOutWindows:
    """The windows `eval_batches` with these arguments scores, over all ranks together."""
    path = Path(path)
    windows, _ = _windows(path, open_data(path), seq_len, False)
    count, _ = _batch_plan(len(windows), batch_size, max_batches, 0, world)
    return HeldOutWindows(seq_len, count, document_mask)


def eval_batches(path: str | Path, batch_size: int, seq_len: int, max_batches: int, rank: int = 0, world: int = 1,
                 document_mask: bool = False) -> list[dict[str, torch.Tensor]]:
    """The validation split cut into consecutive windows: the same batches at every evaluation.
    With several data-parallel ranks each takes every world-th batch (the evaluator sums over ranks)."""
    path = Path(path)
    windows, starts = _windows(path, open_data(path), seq_len, document_mask)
    _, mine = _batch_plan(len(windows), batch_size, max_batches, rank, world)
    out = []
    for b in mine:
        sl = slice(b * batch_size, (b + 1) * batch_size)
        if windows[sl]:
            out.append(window_batch(windows[sl], starts[sl] if starts is not None else None))
    return out


def held_out_batches(path: str | Path, windows: HeldOutWindows, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """The batches of `windows` (one process), `batch_size` windows each."""
    path = Path(path)
    found, starts = _windows(path, open_data(path), windows.seq_len, windows.document_mask)
    count = min(windows.count or len(found), len(found))
    return [window_batch(found[i : min(i + batch_size, count)], starts[i : min(i + batch_size, count)]
                         if starts is not None else None) for i in range(0, count, batch_size)]
