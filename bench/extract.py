"""HTML extraction throughput: the `extract` stage (a killable child process per worker) vs extracting in-process.

The old stage called the extractor in the worker itself under a SIGALRM time limit, which cannot
interrupt C code; the new one sends each page to a child process it can kill. Both see the same
pages: pydoc's HTML pages of stdlib modules (rendered here, so every machine has them), extracted
with the same extractor, by one process and by a pool of `--workers` processes (as `kiln prepare`
runs them); after one untimed pass (the child starts once per worker in a real run), the two ways
alternate for `--rounds` rounds and the best of each counts. Then one hostile page (divs nested
`--depth` deep, never closed) under a 1 s limit: how long each way takes to give up on it.

    python bench/extract.py [--pages 300] [--rounds 3] [--workers N] [--extractor resiliparse] [--depth 16000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

from dedup import pydoc_pages

from kiln.data.document import Document
from kiln.data.extract import ExtractHtml, html_to_text

_STAGE: dict[str, ExtractHtml] = {}  # per process: the new way's stage, its child kept across rounds


def old_way(pages: list[str], extractor: str) -> int:
    for html in pages:
        html_to_text(html, extractor)
    return len(pages)


def new_way(pages: list[str], extractor: str) -> int:
    stage = _STAGE.setdefault(extractor, ExtractHtml(extractor, timeout_s=60))
    for html in pages:
        out = stage.process(Document(html, "page", {"html": True}))
        assert not isinstance(out, str) or out == "extract_empty", out
    return len(pages)


def _call(args):
    fn, pages, extractor = args
    return fn(pages, extractor)


def compare(pages: list[str], extractor: str, rounds: int, pool) -> tuple[float, float]:
    """Best seconds of the old and the new way over `pages`, in this process or split over `pool`."""
    chunks = [pages[i::pool._processes] for i in range(pool._processes)] if pool else [pages]

    def timed(fn) -> float:
        t = time.perf_counter()
        if pool:
            pool.map(_call, [(fn, c, extractor) for c in chunks], chunksize=1)
        else:
            fn(pages, extractor)
        return time.perf_counter() - t

    timed(old_way), timed(new_way)  # untimed: imports, the children's start, warm caches
    old, new = [], []
    for _ in range(rounds):
        old.append(timed(old_way))
        new.append(timed(new_way))
    return min(old), min(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--extractor", default="resiliparse", choices=["resiliparse", "trafilatura"])
    ap.add_argument("--depth", type=int, default=16000, help="nesting of the hostile page (0: skip it)")
    args = ap.parse_args()

    pages = [html for _, html in pydoc_pages(args.pages)]
    mb = sum(len(p.encode()) for p in pages) / 1e6
    print(f"{len(pages)} pydoc HTML pages, {mb:.1f} MB ({1e3 * mb / len(pages):.0f} kB/page); "
          f"extractor {args.extractor}; best of {args.rounds} alternating rounds")
    with mp.get_context("fork").Pool(args.workers) as pool:
        for label, p in (("1 process", None), (f"{args.workers} worker processes", pool)):
            t_old, t_new = compare(pages, args.extractor, args.rounds, p)
            print(f"{label}:")
            print(f"  old (in-process, limit cannot stop C code): {len(pages) / t_old:8.1f} pages/s  "
                  f"{mb / t_old:6.2f} MB/s")
            print(f"  new (killable child process):               {len(pages) / t_new:8.1f} pages/s  "
                  f"{mb / t_new:6.2f} MB/s")
            print(f"  throughput ratio new/old: {t_old / t_new:.3f}")

    if args.depth:
        hostile = "<html><body>" + "<div>" * args.depth + "never closed"
        t = time.perf_counter()
        html_to_text(hostile, args.extractor)
        t_old = time.perf_counter() - t
        stage = ExtractHtml(args.extractor, timeout_s=1.0)
        t = time.perf_counter()
        result = stage.process(Document(hostile, "hostile", {"html": True}))
        t_new = time.perf_counter() - t
        print(f"hostile page ({args.depth} nested divs, {len(hostile) / 1e3:.0f} kB), limit 1 s: old returns after "
              f"{t_old:.1f} s (the alarm waits for the C code); new gives up after {t_new:.1f} s ({result})")


if __name__ == "__main__":
    main()
