"""The serving loop: one thread admits waiting sequences into free rows of a `Batch` and steps
it, while request handlers submit, stream and cancel from other threads (continuous batching);
and the counters `/metrics` reports.

Everything that touches the model runs on the loop's thread: loading it (when the scheduler is
given a loader), the decode step's warm-up (compiling it, and on CUDA recording its graphs, which
torch keeps per thread), every step, and other forwards a request needs (`call`, e.g. scoring
log-probabilities), run between steps. Other threads only queue work under a lock. That keeps the
process at one OpenMP thread pool: libgomp lets its idle workers spin between parallel regions
(ready for the next op) only while the process's OpenMP threads, summed over every OS thread that
ever ran a parallel region, fit the CPUs; a second pool (a model loaded on the main thread and
stepped on this one, a forward on an HTTP worker thread) puts every worker to sleep between ops,
and a small model's decode, thousands of short ops per second, pays a wake-up for each.

A failure inside a step ends the sequences it touched with an error and the loop goes on: no
request can stop the server.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from kiln.infer.engine import Sequence, ThreadState
from kiln.infer.generate import Engine

log = logging.getLogger("kiln.serve")


class QueueFull(Exception):
    """No room for more waiting sequences (or the loop is shutting down)."""


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts, self.sum, self.count = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.bounds):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        total = 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {total}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Scheduler:
    """Owns the running batch and its thread. `submit(seqs)` queues sequences (all or none;
    `QueueFull` past `max_queue` waiting), `cancel(seqs)` takes them out at the next step (their
    rows free at once), `wait(seqs)` blocks until they finish, `call(fn)` runs `fn()` on the
    loop's thread between steps, `stop()` ends the loop.

    `engine` is an `Engine`, or a function that loads one: then it is loaded on the loop's thread
    (what `kiln serve` does; see the module's note on thread pools). `compile` is a bool or a
    function of the loaded engine. The constructor returns once the thread has loaded the engine
    and warmed the decode step up (a load or warm-up that fails is raised here, and the thread
    ends), so the first request does not pay for compiling. `prefix_cache_mb`: the batch keeps the
    keys and values of recent prompt prefixes in this many MiB (`serve.prefix_cache_mb`; 0 = none)."""

    def __init__(self, engine: Engine | Callable[[], Engine], max_batch: int, max_queue: int,
                 max_len: int | None = None, compile: bool | Callable[[Engine], bool] = False,
                 window_s: float = 10.0, prefix_cache_mb: float = 0.0) -> None:
        self.engine: Engine | None = engine if isinstance(engine, Engine) else None
        self._load = None if self.engine is not None else engine
        self._batch_args = (max_batch, max_len, compile, prefix_cache_mb)
        self.max_queue = max_queue
        self.waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._cancelled: list[Sequence] = []
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()
        self._stopping = False
        # counters for /metrics
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.finished: dict[str, int] = {}
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens/s
        self._ready = threading.Event()
        self._failed: BaseException | None = None  # what the warm-up raised
        self._thread_state = ThreadState.capture()  # this thread's torch settings, for the loop's thread
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            self._thread.join()
            raise self._failed

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- called from any thread --------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.batch.seqs)

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            room = self.max_queue + self.batch.free_rows() - len(self.waiting)
            if len(seqs) > room:
                raise QueueFull(f"the queue is full ({len(self.waiting)} waiting, {self.max_queue} allowed)")
            now = time.perf_counter()
            for s in seqs:
                s.submitted = now
            self.waiting.extend(seqs)
            self._cond.notify_all()

    def cancel(self, seqs: list[Sequence]) -> None:
        with self._cond:
            for s in seqs:
                if s.finish_reason is None and not s.cancelled:
                    s.cancelled = True
                    self._cancelled.append(s)
            self._cond.notify_all()

    def wait(self, seqs: list[Sequence], timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: all(s.finish_reason is not None for s in seqs), timeout)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the loop's thread before its next step; the future holds what it returns
        or raises (`asyncio.wrap_future` awaits it). A forward that is not generation (scoring a
        prompt's log-probabilities) runs here rather than on the caller's thread, so the process
        keeps one thread pool and the batch is never stepped meanwhile."""
        done: Future = Future()
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            self._calls.append((fn, done))
            self._cond.notify_all()
        return done

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        now = time.perf_counter()
        with self._cond:
            recent = [(t, n) for t, n in self._recent if t >= now - self._window_s]
        return sum(n for _, n in recent) / self._window_s

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop; sequences still queued or running end as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- the loop's thread -------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._stopping or self.waiting or self._cancelled or self._calls or self.batch.running)

    def _run(self) -> None:
        try:
            self._thread_state.apply()  # the creating thread's thread count, grad mode off
            if self.engine is None:
                self.engine = self._load()
            rows, max_len, compile, prefix_cache_mb = self._batch_args
            if callable(compile):
                compile = compile(self.engine)
            self.batch = self.engine.new_batch(rows, max_len, compile, warm=False, prefix_cache_mb=prefix_cache_mb)
            self.batch.warm_up()  # on this thread, which steps the batch from now on
        except BaseException as e:  # noqa: BLE001 - handed to the constructor, which raises it
            self._failed = e
            return
        finally:
            self._ready.set()
        self._loop()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(self._has_work)
                if self._stopping:
                    for s in [*self.waiting, *self.batch.running]:
                        self.batch.remove(s, "cancelled")
                    self.waiting.clear()
                    for _, done in self._calls:
                        done.set_exception(QueueFull("the server is shutting down"))
                    self._calls.clear()
                    self._cond.notify_all()
                    return
                calls, self._calls = self._calls, deque()
                cancelled, self._cancelled = self._cancelled, []
                for s in cancelled:
                    if s in self.waiting:
                        self.waiting.remove(s)
                    self.batch.remove(s, "cancelled")
                admit = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.batch.free_rows()))]
            for fn, done in calls:
                if done.set_running_or_notify_cancel():
                    try:
                        done.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - the caller's to raise
                        done.set_exception(e)
            before = self.batch.running
            handed = self.batch.handed
            try:
                if admit:
                    self.batch.add(admit)
                    self.prompt_tokens += sum(len(s.prompt) for s in admit)
                    for s in admit:
                        self.ttft.observe(s.ttft_s or 0.0)
                stepped = len(self.batch.running)
                if stepped:
                    self.batch.step()
                produced = self.batch.handed - handed  # a speculative step hands a row several
            except Exception as e:  # noqa: BLE001 - a failed step ends its sequences, never the server
                log.exception("generation step failed")
                for s in {*admit, *before, *self.batch.running}:
                    self.batch.remove(s, "error", f"generation failed: {type(e).__name__}: {e}")
                produced = 0
            self._account([*cancelled, *before, *admit], produced)

    def _account(self, touched: list[Sequence], produced: int) -> None:
        now = time.perf_counter()
        with self._cond:
            self.generated_tokens += produced
            self._recent.append((now, produced))
            while self._recent and self._recent[0][0] < now - self._window_s:
                self._recent.popleft()
            ended = [s for s in touched if s.finish_reason is not None]
            for s in ended:
                self.finished[s.finish_reason] = self.finished.get(s.finish_reason, 0) + 1
                if s.finish_reason in ("stop", "length"):
                    self.latency.observe(s.latency_s or 0.0)
            if ended:
                self._cond.notify_all()

    def _draft_lines(self) -> list[str]:
        drafter = self.batch.drafter
        if drafter is None:
            return []
        return ["# HELP kiln_draft_tokens_proposed_total Tokens the draft model proposed (speculative decoding).",
                "# TYPE kiln_draft_tokens_proposed_total counter", f"kiln_draft_tokens_proposed_total {drafter.proposed}",
                "# HELP kiln_draft_tokens_accepted_total Proposed tokens the served model kept.",
                "# TYPE kiln_draft_tokens_accepted_total counter", f"kiln_draft_tokens_accepted_total {drafter.accepted}"]

    def metrics(self) -> list[str]:
        """Prometheus text lines for the engine's state and counters."""
        lines = [
            "# HELP kiln_queue_depth Sequences waiting for a row of the running batch.",
            "# TYPE kiln_queue_depth gauge", f"kiln_queue_depth {self.queue_depth}",
            "# HELP kiln_running_sequences Sequences decoding in the running batch.",
            "# TYPE kiln_running_sequences gauge", f"kiln_running_sequences {self.running}",
            "# HELP kiln_batch_rows Rows of the running batch (the most sequences that decode together).",
            "# TYPE kiln_batch_rows gauge", f"kiln_batch_rows {self.batch.rows}",
            "# HELP kiln_tokens_per_second Generated tokens per second over the last window.",
            "# TYPE kiln_tokens_per_second gauge", f"kiln_tokens_per_second {self.tokens_per_s():.3f}",
            "# HELP kiln_prompt_tokens_total Prompt tokens prefilled.",
            "# TYPE kiln_prompt_tokens_total counter", f"kiln_prompt_tokens_total {self.prompt_tokens}",
            "# HELP kiln_prompt_tokens_cached_total Prompt tokens whose keys and values were copied from a shared "
            "prefix (the prefix cache, or a prompt of the same admission) instead of prefilled.",
            "# TYPE kiln_prompt_tokens_cached_total counter",
            f"kiln_prompt_tokens_cached_total {self.batch.prompt_tokens_reused}",
            *self._draft_lines(),
            "# HELP kiln_generated_tokens_total Tokens generated.",
            "# TYPE kiln_generated_tokens_total counter", f"kiln_generated_tokens_total {self.generated_tokens}",
            "# HELP kiln_sequences_finished_total Sequences finished, by reason.",
            "# TYPE kiln_sequences_finished_total counter",
        ]
        lines += [f'kiln_sequences_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
        lines += self.ttft.lines("kiln_time_to_first_token_seconds", "Time from submission to the first token.")
        lines += self.latency.lines("kiln_sequence_latency_seconds", "Time from submission to the last token.")
        return lines
