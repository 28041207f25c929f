"""Shared prompt prefixes: prompts that begin alike are prefilled once (like vLLM's automatic prefix
caching, simplified).

- Within one `Batch.add`: `shared_groups` picks groups of prompts that share their first P tokens
  (GRPO's group of completions of one prompt, `kiln generate`'s samples); the engine prefills each
  group's prefix once, copies its keys and values into every member's cache row, and prefills
  only each row's own rest.
- Across calls: a `PrefixCache` keeps the keys and values of recently prefilled prompts in blocks of
  `BLOCK` tokens, keyed by the whole prompt up to the block's end (so a block stands for one exact
  prefix), least recently used out first within a byte budget (`serve.prefix_cache_mb`). It belongs
  to one `Batch` over a model whose weights do not change (the server's): a model in training
  never gets one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

BLOCK = 32  # tokens per block of the prefix cache
MIN_SHARED = 16  # the shortest prefix worth a forward of its own within one add


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens `a` and `b` begin with alike (slices compared in C, by bisection)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def shared_groups(prompts: list[list[int]], min_shared: int = MIN_SHARED) -> list[tuple[int, list[int]]]:
    """Groups of prompts (indices into `prompts`) sharing their first P tokens, as (P, indices),
    chosen to save the most prefilled tokens: sum over groups of (members - 1) × P. Each P is at
    least `min_shared` and shorter than every member, so each row keeps a token of its own to
    prefill (its first-token logits). Prompts in no group are left out.

    The prompts are sorted, so prompts sharing a prefix sit together, and the sorted list is cut
    into runs by dynamic programming: 8 copies each of 8 prompts that share a short template make 8
    groups of whole prompts rather than one group of the template."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    n = len(order)
    lcp = [common_prefix(prompts[order[k]], prompts[order[k + 1]]) for k in range(n - 1)]
    best = [0] * (n + 1)  # best[j]: the most saved over the first j sorted prompts
    cut: list[tuple[int, int]] = [(j - 1, 0) for j in range(n + 1)]  # (start of the last group, its P)
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1], (j - 1, 0)
        p = len(prompts[order[j - 1]]) - 1
        for i in range(j - 2, -1, -1):  # the last group is order[i:j]
            p = min(p, lcp[i], len(prompts[order[i]]) - 1)
            if p < min_shared:
                break
            if best[i] + (j - i - 1) * p > best[j]:
                best[j], cut[j] = best[i] + (j - i - 1) * p, (i, p)
    groups, j = [], n
    while j > 0:
        i, p = cut[j]
        if j - i > 1:
            groups.append((p, [order[k] for k in range(i, j)]))
        j = i
    return groups[::-1]


class PrefixCache:
    """Keys and values of recently prefilled prompt prefixes, in blocks of `block` tokens, least
    recently used out first within `budget` bytes.

    A block is keyed by the prompt's ids up to the block's end, and holds the keys and values of
    that block's positions only: one (layers, 2, kv_heads, block, head_dim) tensor (the cache's
    layout; index 0 keys, 1 values), which are exact for any prompt that begins with the key. A
    hit touches its blocks deepest first, so a prefix's first blocks are the last to go (a later
    block without its parents is never found again, and ages out)."""

    def __init__(self, budget: int, block: int = BLOCK) -> None:
        self.budget, self.block = budget, block
        self.blocks: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def _touch(self, keys: list[tuple[int, ...]]) -> None:
        for key in reversed(keys):
            self.blocks.move_to_end(key)

    def lookup(self, prompt: list[int]) -> list[torch.Tensor]:
        """The cached blocks that begin `prompt`, in order, leaving at least its last token out."""
        keys, found = [], []
        end = self.block
        while end <= len(prompt) - 1:
            key = tuple(prompt[:end])
            hit = self.blocks.get(key)
            if hit is None:
                break
            keys.append(key)
            found.append(hit)
            end += self.block
        self._touch(keys)
        return found

    def store(self, prompt: list[int], read: Callable[[int, int], torch.Tensor]) -> None:
        """Keep the whole blocks of `prompt` not kept yet; `read(start, end)` gives a block's keys
        and values (a new tensor). Only as many blocks as the budget holds are kept."""
        keys, end = [], self.block
        while end <= len(prompt):
            key = tuple(prompt[:end])
            if key in self.blocks:
                self.blocks.move_to_end(key)
            else:
                kv = read(end - self.block, end)
                size = kv.numel() * kv.element_size()
                if size * (len(keys) + 1) > self.budget:
                    break
                self.blocks[key] = kv
                self.bytes += size
                while self.bytes > self.budget:
                    _, old = self.blocks.popitem(last=False)
                    self.bytes -= old.numel() * old.element_size()
            keys.append(key)
            end += self.block
        self._touch(keys)
