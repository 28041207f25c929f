"""Text overlap: the SFT docstring task's metric and the docstring reward of `kiln rl`."""

from __future__ import annotations

import re
from collections import Counter


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def word_f1(reply: str, reference: str) -> float:
    """Unigram F1 between the words of a reply and of the reference (ROUGE-1 F): 1 = the same
    words, 0 = none shared. Cheap, order-blind, and honest about partial answers."""
    got, want = Counter(words(reply)), Counter(words(reference))
    common = sum((got & want).values())
    if not common:
        return float(not got and not want)
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)
