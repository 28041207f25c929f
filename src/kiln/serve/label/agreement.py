"""Inter-labeller agreement: Cohen's kappa for two labellers, Fleiss' kappa for many.

Both measure agreement beyond what chance would give from how often each category is used:
1 is perfect agreement, 0 is chance level, below 0 worse than chance. Each returns None when
chance already explains everything (every label in one category), where kappa is undefined.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa of two labellers' labels on the same items, item by item."""
    if len(first) != len(second):
        raise ValueError("both labellers must label the same items")
    n = len(first)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(first, second)) / n
    c1, c2 = Counter(first), Counter(second)
    expected = sum(c1[k] * c2[k] for k in c1) / (n * n)
    if expected >= 1:
        return None
    return (observed - expected) / (1 - expected)


def fleiss_kappa(items: Sequence[Counter | dict]) -> float | None:
    """Fleiss' kappa over items, each a {category: number of labellers who chose it}.

    Items may have different numbers of labellers (each needs at least two): an item's agreement
    is the share of agreeing labeller couples among all its couples, and chance agreement comes
    from the categories' shares of all labels.
    """
    items = [Counter(i) for i in items if sum(i.values()) >= 2]
    if not items:
        return None
    agreement = []
    totals: Counter = Counter()
    for counts in items:
        n = sum(counts.values())
        agreement.append(sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)))
        totals.update(counts)
    observed = sum(agreement) / len(agreement)
    all_labels = sum(totals.values())
    expected = sum((c / all_labels) ** 2 for c in totals.values())
    if expected >= 1:
        return None
    return (observed - expected) / (1 - expected)
