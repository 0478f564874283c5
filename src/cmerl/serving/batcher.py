"""Dynamic batching: concurrent requests are merged into engine batches, run in one worker thread.

Each HTTP request submits a *job* (its tokenized items and scoring options). The worker thread waits for
the first job, keeps collecting jobs for at most ``max_wait_s`` (or until ``max_batch_items`` items are
waiting), then scores the jobs that share the same options in one engine call and hands each job its own
slice of the results. With batching off, every job is scored on its own, in arrival order.

The wait is adaptive when the server supplies ``expected``: a callable telling how many more submissions
are on their way (HTTP requests being parsed). With none expected, a lone request runs at once, so one
client sees no batching delay; under concurrency, the first job waits for the others.

The queue is bounded by ``max_queue_items`` items waiting: a job that does not fit raises
:class:`QueueFull` (the server answers 503 with ``Retry-After``). :meth:`DynamicBatcher.close` stops
taking jobs (:class:`ShuttingDown`) and lets the worker finish the ones already queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cmerl.scoring.types import ResponseScore, ScoreRequest


class QueueFull(RuntimeError):
    """The bounded queue has no room for the job; ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(RuntimeError):
    """The batcher is closing and takes no new jobs."""


@dataclass(frozen=True)
class Options:
    """Scoring options; only jobs with equal options share an engine call."""

    entropy: bool = False
    self_certainty: bool = False
    top_k: int = 0


@dataclass
class _Job:
    requests: list[ScoreRequest]
    options: Options
    future: concurrent.futures.Future
    enqueued: float = field(default_factory=time.monotonic)


ScoreFn = Callable[[list[ScoreRequest], Options], list[ResponseScore]]


class DynamicBatcher:
    """Merges concurrent jobs into engine batches; see module docstring.

    Args:
        score_fn: runs the engine: ``(requests, options) -> one ResponseScore per request``.
        max_batch_items: items merged into one engine call (a bigger single job still runs whole).
        max_wait_s: how long the first job of a batch may wait for company.
        max_queue_items: items allowed to wait; more raises :class:`QueueFull`.
        enabled: ``False`` scores every job alone (batching off).
        on_batch: called after each engine call with ``(items, tokens, seconds)`` (metrics).
        expected: how many more jobs are about to be submitted (``None``: always wait ``max_wait_s``).
    """

    def __init__(self, score_fn: ScoreFn, *, max_batch_items: int = 64, max_wait_s: float = 0.005,
                 max_queue_items: int = 4096, enabled: bool = True,
                 on_batch: Callable[[int, int, float], None] | None = None,
                 expected: Callable[[], int] | None = None):
        if max_batch_items < 1 or max_queue_items < 1 or max_wait_s < 0:
            raise ValueError("max_batch_items and max_queue_items must be >= 1 and max_wait_s >= 0")
        self.score_fn = score_fn
        self.max_batch_items = int(max_batch_items)
        self.max_wait_s = float(max_wait_s)
        self.max_queue_items = int(max_queue_items)
        self.enabled = enabled
        self.on_batch = on_batch
        self.expected = expected
        self._outstanding = 0  # jobs submitted and not finished
        self._queue: deque[_Job] = deque()
        self._queued_items = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._recent_rate = 0.0  # items per second of the engine, smoothed (for Retry-After)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="cmerl-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs; return when the worker has finished every queued job (or after ``timeout``)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queued_items(self) -> int:
        return self._queued_items

    @property
    def outstanding_jobs(self) -> int:
        return self._outstanding

    # ------------------------------------------------------------------ submitting
    def submit(self, requests: Sequence[ScoreRequest], options: Options = Options()) -> concurrent.futures.Future:
        """Queue a job; the future resolves to one :class:`ResponseScore` per request, in order."""
        job = _Job(list(requests), options, concurrent.futures.Future())
        n = len(job.requests)
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if self._queued_items + n > self.max_queue_items and self._queued_items > 0:
                raise QueueFull(f"queue full ({self._queued_items} items waiting, limit {self.max_queue_items})",
                                self._retry_after())
            self._queue.append(job)
            self._queued_items += n
            self._outstanding += 1
            self._cond.notify_all()
        if self._thread is None:
            self.start()
        return job.future

    async def score(self, requests: Sequence[ScoreRequest], options: Options = Options()) -> list[ResponseScore]:
        if not requests:
            return []
        return await asyncio.wrap_future(self.submit(requests, options))

    def _retry_after(self) -> float:
        if self._recent_rate <= 0:
            return 1.0
        return min(30.0, max(1.0, self._queued_items / self._recent_rate))

    # ------------------------------------------------------------------ the worker thread
    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing, and everything queued has been scored
                if self.enabled and self.max_wait_s > 0:
                    deadline = self._queue[0].enqueued + self.max_wait_s
                    while (self._queued_items < self.max_batch_items and not self._closing
                           and (self.expected is None or self.expected() > 0)):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                jobs = self._take()
            try:
                self._run(jobs)
            finally:
                with self._cond:
                    self._outstanding -= len(jobs)

    def _take(self) -> list[_Job]:
        jobs = [self._queue.popleft()]
        items = len(jobs[0].requests)
        while self.enabled and self._queue and items + len(self._queue[0].requests) <= self.max_batch_items:
            job = self._queue.popleft()
            jobs.append(job)
            items += len(job.requests)
        self._queued_items -= items
        return jobs

    def _run(self, jobs: list[_Job]) -> None:
        groups: dict[Options, list[_Job]] = {}
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                groups.setdefault(job.options, []).append(job)
        for options, group in groups.items():
            try:
                self._score_group(group, options)
            except Exception as exc:  # noqa: BLE001 - isolate the failing job, keep serving the others
                if len(group) == 1:
                    group[0].future.set_exception(exc)
                    continue
                for job in group:
                    try:
                        self._score_group([job], options)
                    except Exception as single_exc:  # noqa: BLE001
                        job.future.set_exception(single_exc)

    def _score_group(self, group: list[_Job], options: Options) -> None:
        requests = [r for job in group for r in job.requests]
        t0 = time.perf_counter()
        results = self.score_fn(requests, options)
        seconds = time.perf_counter() - t0
        if len(results) != len(requests):
            raise RuntimeError(f"engine returned {len(results)} scores for {len(requests)} requests")
        if seconds > 0:
            rate = len(requests) / seconds
            self._recent_rate = rate if self._recent_rate == 0 else 0.8 * self._recent_rate + 0.2 * rate
        if self.on_batch is not None:
            self.on_batch(len(requests), sum(len(r.input_ids) for r in requests), seconds)
        start = 0
        for job in group:
            n = len(job.requests)
            job.future.set_result(results[start:start + n])
            start += n
