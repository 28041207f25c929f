"""Deduplication: exact (hash of normalized text) and near-duplicate MinHash LSH; n-gram decontamination.

MinHash: text → lowercase words (punctuation dropped, digits folded) → word n-gram shingles
hashed to 32 bits → `bands × rows` minimum hashes per document, computed for a whole batch of
documents at once with numpy (multiply-shift hashing in cache-sized chunks, `np.minimum.reduceat`). Documents whose
signatures agree on every row of some band (equal band keys) are candidate duplicates; candidates
are merged into clusters, and each cluster keeps its first document (lowest corpus index).

`lsh_clusters` clusters a stream in one process (the `minhash_dedup` stage outside `kiln prepare`,
and the reference the sharded path is tested against); `kiln prepare` runs the same decisions as
tasks over buckets on disk (`kiln.data.sharded_dedup`), using `band_keys` and `pair_components`.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from kiln.data.document import Document, Stage, StageStats, doc_record

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
_DIGITS = re.compile(r"\d+")
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_BASE = 0x100000001B3  # odd, so invertible modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)
MAX32 = np.uint32(0xFFFFFFFF)


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, element-wise (uint64 arithmetic wraps): a well-spread 64-bit hash of z."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def dedup_text(text: str) -> str:
    """The text MinHash compares: lowercase words separated by single spaces, numbers folded to 0."""
    return _DIGITS.sub("0", _NON_WORD.sub(" ", text.lower())).strip()


def exact_key(text: str) -> bytes:
    """16-byte hash of the whitespace-normalized text."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _powers(base: int, n: int) -> np.ndarray:
    p = np.full(n, base, dtype=np.uint64)
    if n:
        p[0] = 1
    return np.cumprod(p, dtype=np.uint64)


def shingle_hashes(texts: Sequence[str], n_grams: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of the word n-grams of each text, concatenated, and the count per text.

    Words are hashed with a polynomial rolling hash over UTF-8 bytes (all texts at once), n-grams
    by mixing their words' hashes; a text with fewer than `n_grams` words has no shingles.
    """
    norm = [dedup_text(t) for t in texts]
    joined = "\n".join(norm).encode("utf-8", "surrogatepass")
    b = np.frombuffer(joined, dtype=np.uint8)
    if not len(b):
        return np.zeros(0, np.uint32), np.zeros(len(texts), np.int64)
    sep = np.flatnonzero((b == 32) | (b == 10))
    starts = np.concatenate([[0], sep + 1])
    ends = np.concatenate([sep, [len(b)]])
    nonempty = ends > starts
    starts, ends = starts[nonempty], ends[nonempty]
    prefix = np.zeros(len(b) + 1, dtype=np.uint64)
    np.cumsum(b.astype(np.uint64) * _powers(_BASE, len(b)), dtype=np.uint64, out=prefix[1:])
    inv = _powers(_BASE_INV, len(b) + 1)
    words = mix64((prefix[ends] - prefix[starts]) * inv[starts] + (ends - starts).astype(np.uint64))
    # which text each word belongs to: texts are separated by newlines in `joined`
    text_starts = np.concatenate([[0], np.cumsum([len(t.encode("utf-8", "surrogatepass")) + 1 for t in norm])[:-1]])
    doc_of_word = np.searchsorted(text_starts, starts, side="right") - 1
    m = len(words) - n_grams + 1
    if m <= 0:
        return np.zeros(0, np.uint32), np.zeros(len(texts), np.int64)
    g = np.zeros(m, dtype=np.uint64)
    for j in range(n_grams):
        g = g * np.uint64(0x9E3779B97F4A7C15) + words[j : j + m]
    valid = doc_of_word[:m] == doc_of_word[n_grams - 1 :]
    sh = (mix64(g[valid]) >> np.uint64(32)).astype(np.uint32)
    counts = np.bincount(doc_of_word[:m][valid], minlength=len(texts)).astype(np.int64)
    return sh, counts


class MinHasher:
    """`bands × rows` hash permutations over 32-bit shingles; signatures for many texts at once."""

    def __init__(self, n_grams: int = 5, bands: int = 14, rows: int = 8, seed: int = 1,
                 chunk_shingles: int = 1 << 12, batch_chars: int = 4 << 20) -> None:
        self.n_grams, self.bands, self.rows, self.chunk = n_grams, bands, rows, chunk_shingles
        self.batch_chars = batch_chars
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 1 << 63, size=bands * rows, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=bands * rows, dtype=np.uint64)

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def signatures(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures (len(texts), bands·rows) uint32, has_shingles bool) for `texts`, in batches of ~4 MB."""
        sigs, valid, i = [], [], 0
        while i < len(texts) or not sigs:
            j, size = i, 0
            while j < len(texts) and (j == i or size + len(texts[j]) <= self.batch_chars):
                size += len(texts[j])
                j += 1
            s, v = self._signatures(texts[i:j])
            sigs.append(s)
            valid.append(v)
            i = j
        return np.concatenate(sigs), np.concatenate(valid)

    def _signatures(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        sh, counts = shingle_hashes(texts, self.n_grams)
        sig = np.full((len(texts), self.num_perm), MAX32, dtype=np.uint32)
        doc_of = np.repeat(np.arange(len(texts)), counts)
        for c0 in range(0, len(sh), self.chunk):
            # multiply-shift: the high 32 bits of a·x + b (mod 2**64) for 32-bit shingles x
            x = sh[c0 : c0 + self.chunk, None].astype(np.uint64)
            h = ((x * self.a + self.b) >> np.uint64(32)).astype(np.uint32)
            d = doc_of[c0 : c0 + self.chunk]
            seg = np.flatnonzero(np.concatenate([[True], d[1:] != d[:-1]]))
            mins = np.minimum.reduceat(h, seg, axis=0)
            rows = d[seg]
            sig[rows] = np.minimum(sig[rows], mins)
        return sig, counts > 0


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def union(self, x: int, y: int) -> None:
        """Merge the clusters of x and y; the smaller index becomes the root (the document kept)."""
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            if rx < ry:
                self.parent[ry] = rx
            else:
                self.parent[rx] = ry

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def band_multipliers(rows: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed + 1).integers(1, 1 << 63, size=rows, dtype=np.uint64) | np.uint64(1)


def band_keys(columns: np.ndarray, band: int, mult: np.ndarray) -> np.ndarray:
    """One 64-bit key per document for band `band` from its (n, rows) signature columns: equal
    columns give equal keys (distinct columns collide with probability 2**-64)."""
    return mix64((np.asarray(columns).astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64) + np.uint64(band))


def lsh_clusters(band_columns, n_docs: int, bands: int, rows: int, valid: np.ndarray, seed: int = 1) -> np.ndarray:
    """Each document's cluster root (its own index when it has no near duplicate), in one process.

    `band_columns(b)` returns the (n_docs, rows) signature columns of band b, so a caller can
    stream them from disk one band at a time.
    """
    uf = UnionFind(n_docs)
    mult = band_multipliers(rows, seed)
    idx = np.flatnonzero(valid)
    for band in range(bands):
        keys = band_keys(np.asarray(band_columns(band))[idx], band, mult)
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        same = np.flatnonzero(sk[1:] == sk[:-1])
        for i in same:
            uf.union(int(idx[order[i]]), int(idx[order[i + 1]]))
    return uf.roots()


def pair_components(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the documents named in `pairs` (k, 2), sorted; each one's root: the smallest document of its
    connected component). Vectorized label propagation with pointer jumping: memory is a few
    arrays the size of the pairs, however large the corpus they come from."""
    docs = np.unique(pairs)
    a, b = np.searchsorted(docs, pairs[:, 0]), np.searchsorted(docs, pairs[:, 1])
    label = np.arange(len(docs))
    while True:
        # Each label is a member of its document's component no larger than it; lower both ends
        # of every pair to their smaller label, then follow labels to their own labels.
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        while not np.array_equal(jumped := new[new], new):
            new = jumped
        if np.array_equal(new, label):
            return docs, docs[label]
        label = new


def cluster_sizes(roots: np.ndarray) -> dict[int, int]:
    """{cluster size: number of clusters} for clusters of two or more documents."""
    sizes = Counter(np.bincount(roots, minlength=len(roots)).tolist())
    return {int(k): int(v) for k, v in sorted(sizes.items()) if k > 1}


class ExactDedup(Stage):
    """Keep the first document of each exact text (hash of the whitespace-normalized text).

    In `kiln prepare` this is a global step: keys are computed per task, first occurrences
    across the whole corpus are kept. `run` does the same over one stream.
    """

    name = "exact_dedup"
    global_step = True

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def process(self, doc: Document) -> Document | str:
        key = exact_key(doc.text)
        if key in self.seen:
            return "exact_duplicate"
        self.seen.add(key)
        return doc


class MinhashDedup(Stage):
    """Near-duplicate removal with MinHash LSH: word `n_grams`, `bands` × `rows` hashes, union-find clusters.

    The defaults (5-grams, 14 × 8) catch pairs with Jaccard similarity ≳ 0.75 with high probability.
    In `kiln prepare` signatures are computed per task and clustering runs once over the corpus.
    """

    name = "minhash_dedup"
    global_step = True

    def __init__(self, n_grams: int = 5, bands: int = 14, rows: int = 8, seed: int = 1) -> None:
        self.hasher = MinHasher(n_grams, bands, rows, seed)
        self.n_grams, self.bands, self.rows, self.seed = n_grams, bands, rows, seed

    def run(self, docs: Iterable[Document], stats: StageStats) -> Iterator[Document]:
        docs = list(docs)
        sig, valid = self.hasher.signatures([d.text for d in docs])
        roots = lsh_clusters(lambda b: sig[:, b * self.rows : (b + 1) * self.rows], len(docs), self.bands,
                             self.rows, valid, self.seed)
        for i, d in enumerate(docs):
            if roots[i] != i:
                stats.drop(d.id, "near_duplicate", doc_record(d))
            else:
                yield d


def ngram_set(texts: Iterable[str], n: int) -> set[int]:
    out: set[int] = set()
    for t in texts:
        w = dedup_text(t).split()
        out.update(hash(tuple(w[i : i + n])) for i in range(len(w) - n + 1))
    return out


class Decontaminate(Stage):
    """Drop documents sharing more than `max_overlap` word `n_grams` with held-out/eval texts (`path`:
    a text file, a directory of them, or a JSONL file whose `text_field` holds the texts)."""

    name = "decontaminate"

    def __init__(self, path: str = "", n_grams: int = 13, max_overlap: int = 0, text_field: str = "text") -> None:
        if not path:
            raise ValueError("decontaminate needs path: the held-out / evaluation texts to remove overlaps with")
        from kiln.config import ReaderConfig
        from kiln.data.document import BadInput
        from kiln.data.sources import plan_tasks, read_task

        reader = ReaderConfig(text_field=text_field, html="never")
        if not Path(path).exists():
            raise ValueError(f"decontaminate path '{path}' does not exist")
        bad = BadInput(StageStats("decontaminate_read"))
        texts = (d.text for t in plan_tasks(path, reader, 1 << 62) for d in read_task(t, reader, bad))
        self.n, self.max_overlap = n_grams, max_overlap
        self.grams = ngram_set(texts, n_grams)

    def process(self, doc: Document) -> Document | str:
        w = dedup_text(doc.text).split()
        hits = sum(hash(tuple(w[i : i + self.n])) in self.grams for i in range(len(w) - self.n + 1))
        return "contaminated" if hits > self.max_overlap else doc
