"""kiln's MinHash dedup vs datatrove's MinHash pipeline on the same corpus, the same n-grams, bands and rows.

Corpus: the Python stdlib (.py files) plus a WARC built from local HTML (pydoc's HTML pages of
stdlib modules, rendered here, so every machine has them), extracted to text by kiln's reader,
with planted exact copies and near copies (~1% of words changed) at known rates. Both tools see
the same list of texts; we time each one's duplicate decision (signatures → buckets → clusters),
single process, and compare the removed sets with each other and with the planted truth.

    python bench/dedup.py [--pages 400] [--exact-rate 0.1] [--near-rate 0.1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from kiln.config import ReaderConfig
from kiln.data.dedup import MinHasher, lsh_clusters
from kiln.data.document import BadInput, StageStats
from kiln.data.extract import ExtractHtml
from kiln.data.sources import read_warc, stdlib_files

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__hello__", "__phello__", "pydoc",
        "lib2to3", "ensurepip", "venv", "xxsubtype", "xxlimited", "xxlimited_35", "_xxsubinterpreters"}


def pydoc_pages(n: int) -> list[tuple[str, str]]:
    """HTML documentation pages of up to `n` stdlib modules, rendered by pydoc."""
    import importlib
    import pydoc

    pages = []
    warnings.simplefilter("ignore")
    for name in sorted(sys.stdlib_module_names):
        if len(pages) >= n or name in SKIP or name.startswith("_"):
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                mod = importlib.import_module(name)
                html = pydoc.html.page(pydoc.describe(mod), pydoc.html.document(mod, name))
        except Exception:
            continue
        pages.append((f"https://docs.local/{name}.html", html))
    return pages


def plant(texts: list[str], exact_rate: float, near_rate: float, seed: int = 0):
    """Append exact copies and near copies of random texts; return (texts, planted kind per text)."""
    rng = random.Random(seed)
    n = len(texts)
    kinds = ["orig"] * n
    out = list(texts)
    for kind, rate in (("exact", exact_rate), ("near", near_rate)):
        for i in rng.sample(range(n), int(rate * n)):
            t = texts[i]
            if kind == "near":
                words = t.split(" ")
                for j in rng.sample(range(len(words)), max(1, len(words) // 100)):
                    words[j] = "planted"
                t = " ".join(words)
            out.append(t)
            kinds.append(kind)
    order = list(range(n, len(out)))
    rng.shuffle(order)  # copies after the originals, in random order
    return out[:n] + [out[i] for i in order], kinds[:n] + [kinds[i] for i in order]


def kiln_dedup(texts: list[str], n_grams: int, bands: int, rows: int) -> set[int]:
    h = MinHasher(n_grams, bands, rows, seed=1)
    sig, valid = h.signatures(texts)
    roots = lsh_clusters(lambda b: sig[:, b * rows : (b + 1) * rows], len(texts), bands, rows, valid)
    return set(np.flatnonzero(roots != np.arange(len(texts))).tolist())


def datatrove_dedup(texts: list[str], n_grams: int, bands: int, rows: int, work: Path) -> set[int]:
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        """datatrove's English tokenizer needs spaCy; its text is already simplified, so split on spaces."""

        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return []

    cfg = MinhashConfig(n_grams=n_grams, num_buckets=bands, hashes_per_bucket=rows)

    def reader(data, rank=0, world_size=1):
        for i, t in enumerate(texts):
            yield Document(text=t, id=str(i))

    logs = work / "logs"
    run = dict(logging_dir=str(logs), skip_completed=False)
    sig_step = MinhashDedupSignature(str(work / "sigs"), config=cfg, language=Whitespace())
    if sig_step.config.hash_config.hash_fc == "xxhash":  # xxhash ≥ 3.5 takes bytes; datatrove passes str
        import xxhash

        sig_step._hash_func = lambda s: xxhash.xxh64_intdigest(s.encode())
    LocalPipelineExecutor([reader, sig_step],
                          tasks=1, workers=1, **{**run, "logging_dir": str(logs / "1")}).run()
    LocalPipelineExecutor([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)],
                          tasks=bands, workers=1, **{**run, "logging_dir": str(logs / "2")}).run()
    LocalPipelineExecutor([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)],
                          tasks=1, workers=1, **{**run, "logging_dir": str(logs / "3")}).run()
    f = work / "remove" / "000000.remove"
    return set(np.fromfile(f, dtype="<u4").tolist()) if f.exists() else set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=400)
    ap.add_argument("--exact-rate", type=float, default=0.1)
    ap.add_argument("--near-rate", type=float, default=0.1)
    ap.add_argument("--n-grams", type=int, default=5)
    ap.add_argument("--bands", type=int, default=14)
    ap.add_argument("--rows", type=int, default=8)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    with contextlib.suppress(ImportError):
        from loguru import logger

        logger.remove()

    code = [f.read_text(errors="replace") for f in stdlib_files()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from warcio.statusandheaders import StatusAndHeaders
        from warcio.warcwriter import WARCWriter

        pages = pydoc_pages(args.pages)
        with open(tmp / "docs.warc.gz", "wb") as fh:
            w = WARCWriter(fh, gzip=True)
            for url, html in pages:
                hdr = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
                w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(html.encode()), http_headers=hdr))
        ex = ExtractHtml()
        bad = BadInput(StageStats("read"))
        web = [d.text for d in map(ex.process, read_warc(tmp / "docs.warc.gz", ReaderConfig(), bad))
               if not isinstance(d, str)]
        web, kinds = plant(web, args.exact_rate, args.near_rate)
        texts = code + web
        kinds = ["code"] * len(code) + kinds
        mb = sum(map(len, texts)) / 1e6
        print(f"corpus: {len(code)} stdlib files + {len(web)} WARC pages from pydoc HTML "
              f"({kinds.count('exact')} planted exact, {kinds.count('near')} planted near copies); {mb:.1f} MB")
        print(f"MinHash: {args.n_grams}-grams, {args.bands} bands × {args.rows} rows, one process each")

        t = time.perf_counter()
        k = kiln_dedup(texts, args.n_grams, args.bands, args.rows)
        tk = time.perf_counter() - t
        t = time.perf_counter()
        d = datatrove_dedup(texts, args.n_grams, args.bands, args.rows, tmp / "dt")
        td = time.perf_counter() - t

    n = len(texts)
    print(f"kiln:      {tk:6.2f} s  {n / tk:8.0f} docs/s  removed {len(k)}")
    print(f"datatrove: {td:6.2f} s  {n / td:8.0f} docs/s  removed {len(d)}")
    print(f"speed ratio kiln/datatrove: {td / tk:.2f}x  (target ≥ 2x)")
    union = k | d
    agree_set = len(k & d) / max(len(union), 1)
    agree_doc = 1 - len(k ^ d) / n
    print(f"agreement: removed-set Jaccard {agree_set:.3f}; same keep/drop decision on {agree_doc:.4f} of documents "
          f"(target ≥ 0.95)")
    planted = {i for i, kd in enumerate(kinds) if kd in ("exact", "near")}
    near = {i for i, kd in enumerate(kinds) if kd == "near"}
    web_idx = {i for i, kd in enumerate(kinds) if kd != "code"}
    for name, removed in (("kiln", k), ("datatrove", d)):
        r_web = removed & web_idx
        precision = len(r_web & planted) / max(len(r_web), 1)
        recall = len(removed & planted) / max(len(planted), 1)
        recall_near = len(removed & near) / max(len(near), 1)
        print(f"{name:10s} vs planted (WARC part): precision {precision:.3f}, recall {recall:.3f}, "
              f"near-duplicate recall {recall_near:.3f} (target ≥ 0.95)")


if __name__ == "__main__":
    main()
