"""kiln's tokenize stage vs raw HF `tokenizers` encode_batch: the same texts, tokenizer and worker count.

kiln's figure is `kiln.data.tasks.tokenize_task` over the corpus split into prepare's tasks (read the
task's documents, encode, write ids and lengths); the peer is one `encode_batch` over all texts in memory.

    python bench/tokenize.py [--workers 2] [--vocab 4096]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # both sides: the same thread count

    from kiln.config import DataConfig, ExecutorConfig
    from kiln.data.document import Document
    from kiln.data.executor import Executor
    from kiln.data.sources import Task, stdlib_files
    from kiln.data.tasks import Job, save_docs, tokenize_task
    from kiln.data.tokenizer import train_tokenizer

    texts = [f.read_text(errors="replace") for f in stdlib_files()]
    mb = sum(map(len, texts)) / 1e6
    tok = train_tokenizer(texts[::8], args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok.save(str(work / "tokenizer.json"))
        n_tasks = 8
        jobs = []
        for k in range(n_tasks):
            part = texts[k::n_tasks]
            save_docs(work / "post" / f"{k:05d}.docs", [Document(t, str(i)) for i, t in enumerate(part)])
            jobs.append(Job(Task(k, (), "text"), DataConfig(), [], str(work), str(work / "tokenizer.json")))

        t = time.perf_counter()
        encs = tok.encode_batch(texts, add_special_tokens=False)
        raw = time.perf_counter() - t
        n_tokens = sum(len(e.ids) for e in encs)
        del encs

        with Executor(ExecutorConfig(workers=args.workers)) as ex:
            t = time.perf_counter()
            res = ex.map(tokenize_task, jobs, "tokenize", threaded=True)
            kiln = time.perf_counter() - t
    assert sum(r["tokens"] for r in res) == n_tokens + len(texts)  # + one BOS per document
    print(f"corpus: {len(texts)} stdlib files, {mb:.1f} MB, {n_tokens:,} tokens; vocab {args.vocab}; "
          f"{args.workers} workers")
    print(f"raw encode_batch:     {raw:6.2f} s  {n_tokens / raw / 1e6:6.2f} M tokens/s")
    print(f"kiln tokenize stage:  {kiln:6.2f} s  {n_tokens / kiln / 1e6:6.2f} M tokens/s (incl. reading docs, "
          "writing ids)")
    print(f"ratio kiln/raw: {raw / kiln:.2f}x  (target ≥ 0.9x)")


if __name__ == "__main__":
    main()
