"""Executors for `kiln prepare`'s per-task steps: in-process, N local worker processes, or Ray tasks.

All three run the same top-level functions (`kiln.data.tasks`) on the same jobs and return their
results in job order; each task writes its own completion marker, so any executor can resume
what another one started. Ray workers must see the work directory (a shared filesystem).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable

from tqdm import tqdm

from kiln.config import ExecutorConfig
from kiln.errors import KilnError


def _init_worker() -> None:
    # One tokenizer thread per worker process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    # Ctrl-C reaches the whole process group: the driver alone handles it (and terminates the pool),
    # so workers print no "Process ForkPoolWorker-1:" traceback of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _call(args):
    fn, i, job = args
    return i, fn(job)


class Executor:
    """Maps a task function over jobs. Use as a context manager; worker processes start on entry,
    before the driver uses any tokenizer threads (forking after that would disable them)."""

    def __init__(self, cfg: ExecutorConfig) -> None:
        self.cfg = cfg
        self.workers = cfg.workers or os.cpu_count() or 1
        # HF tokenizers' thread pool (started on first use) gets the same number of workers.
        os.environ.setdefault("RAYON_NUM_THREADS", str(self.workers))
        self.pool = None
        self.ray = None
        self._started_ray = False

    @property
    def label(self) -> str:
        return f"{self.cfg.kind} ({self.workers} workers)"

    def __enter__(self) -> Executor:
        if self.cfg.kind == "ray":
            self._start_ray()
        elif self.workers > 1:
            self.pool = mp.get_context("fork").Pool(self.workers, initializer=_init_worker)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            if exc[0] is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
        if self._started_ray:
            self.ray.shutdown()

    def _start_ray(self) -> None:
        try:
            import ray
        except ImportError:
            raise KilnError("data.executor.kind=ray needs Ray: pip install 'kiln[data]' (or pip install ray)") from None
        self.ray = ray
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
            if self.cfg.ray_address:
                ray.init(address=self.cfg.ray_address, **kwargs)
            else:
                ray.init(num_cpus=self.workers, **kwargs)
            self._started_ray = True

    def map(self, fn: Callable, jobs: list, desc: str, threaded: bool = False) -> list:
        """`fn(job)` for every job, in job order. `threaded` steps (tokenizing: HF tokenizers runs its own
        `workers` threads) run in this process under the local executor, as Ray tasks under Ray."""
        bar = tqdm(total=len(jobs), desc=desc, unit="task", disable=None)
        out: list = [None] * len(jobs)
        try:
            if self.ray is not None:
                remote = self.ray.remote(num_cpus=1)(fn)
                refs = {remote.remote(job): i for i, job in enumerate(jobs)}
                pending = list(refs)
                while pending:
                    ready, pending = self.ray.wait(pending, num_returns=1)
                    for r in ready:
                        out[refs[r]] = self._ray_get(r)
                        bar.update(1)
            elif self.pool is not None and len(jobs) > 1 and not threaded:
                for i, res in self.pool.imap_unordered(_call, [(fn, i, job) for i, job in enumerate(jobs)]):
                    out[i] = res
                    bar.update(1)
            else:
                for i, job in enumerate(jobs):
                    out[i] = fn(job)
                    bar.update(1)
        finally:
            bar.close()
        return out

    def _ray_get(self, ref):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, KilnError):
                raise KilnError(str(cause)) from None
            raise
