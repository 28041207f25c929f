"""Token healing: a text prompt's last token backed off, and the first generated token made to
extend its text.

A prompt that ends in the middle of what the tokenizer merges in training ends on a token the
model seldom saw there: `def f(x):\\n    \"\"\"Return x.\"\"\"\\n` ends in a lone "\\n", where the
byte-level BPE wrote "\\n   " (the newline with the next line's indentation) in every function it
trained on, so the model reads "the next line is not indented" and ends the function. Healing
prefills the prompt without its last token and lets the first new token be any token whose text
starts with that token's text ("\\n", "\\n   ", "\\n       ", ...): the model writes the boundary
as it learnt it. The text handed back skips what the prompt already had (a first token "\\n   "
after a backed-off "\\n" streams as "   "), so the output is still what comes after the prompt.

One token is backed off, and only when the vocabulary holds longer tokens that extend its text
(else there is nothing to heal: the prompt runs as given). `kiln.infer.engine.Sequence` plans it
(`SamplingParams.heal`) and `Batch` applies it; the vocabulary's texts are indexed once per
tokenizer.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

from kiln.data.tokenizer import token_count


@dataclass(frozen=True)
class Healing:
    """How one prompt is healed: `backoff` tokens (1) left out of the prefill, their `text`, and
    the ids the first new token may be (every token whose text starts with `text`, the backed-off
    token included)."""

    backoff: int
    text: str
    allowed: tuple[int, ...]


class VocabIndex:
    """A tokenizer's token texts (each id decoded alone), sorted, so the tokens whose text starts
    with a string are one contiguous run found by bisection."""

    def __init__(self, tokenizer) -> None:
        n = token_count(tokenizer)  # its largest id + 1: an imported vocabulary may have holes (they decode to "")
        texts = tokenizer.decode_batch([[i] for i in range(n)])  # special tokens decode to "" too
        self.texts = texts
        self.order = sorted((i for i in range(n) if texts[i]), key=texts.__getitem__)
        self.keys = [texts[i] for i in self.order]
        self._extending: dict[str, tuple[int, ...]] = {}

    def extending(self, text: str) -> tuple[int, ...]:
        """Ids of the tokens whose text starts with `text` (sorted), cached per text."""
        got = self._extending.get(text)
        if got is None:
            ids, i = [], bisect.bisect_left(self.keys, text)
            while i < len(self.keys) and self.keys[i].startswith(text):
                ids.append(self.order[i])
                i += 1
            got = self._extending[text] = tuple(sorted(ids))
        return got


_INDEXES: dict[int, tuple[object, VocabIndex]] = {}  # id(tokenizer) -> (the tokenizer, kept alive; its index)
_LOCK = threading.Lock()


def vocab_index(tokenizer) -> VocabIndex:
    """The tokenizer's `VocabIndex`, built at its first use (a decode of every id) and kept."""
    with _LOCK:
        got = _INDEXES.get(id(tokenizer))
        if got is None or got[0] is not tokenizer:
            got = _INDEXES[id(tokenizer)] = (tokenizer, VocabIndex(tokenizer))
        return got[1]


def plan(tokenizer, prompt: list[int]) -> Healing | None:
    """How to heal `prompt` (token ids of a text prompt), or None when there is nothing to heal: a
    prompt of one token, a last token with no text (a special token), one split inside a character,
    one whose text alone differs from its text in the prompt, or one no longer token extends."""
    if tokenizer is None or len(prompt) < 2:
        return None
    index = vocab_index(tokenizer)
    last = prompt[-1]
    if not 0 <= last < len(index.texts):
        return None
    text = index.texts[last]
    if not text or "\ufffd" in text:
        return None
    tail = prompt[-8:]
    if tokenizer.decode(tail) != tokenizer.decode(tail[:-1]) + text:  # not its text in context
        return None
    allowed = index.extending(text)
    if all(i == last for i in allowed):  # no longer token: nothing to heal
        return None
    return Healing(1, text, allowed)
