"""Admission and micro-batching: a bounded FIFO of jobs that the worker thread takes in compatible batches.

Why a hand-made queue rather than `queue.Queue`: the worker must take *several* jobs at once — the oldest plus
any later ones with the same batch key, up to an image budget — and cancelled jobs must vanish from the queue
(and from its depth) without the worker ever seeing them. One lock and one condition variable do all of it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from ..pipeline.types import JobEvent, PreparedEdit


class QueueFull(Exception):
    """Admission refused: `depth` jobs are already waiting (HTTP 429)."""


class EngineClosed(Exception):
    """Admission refused: the engine is shutting down (HTTP 503)."""


@dataclass(eq=False)
class Job:
    """One request's work. `future` gets the pipeline's result (or its exception) from the worker thread."""

    prepared: PreparedEdit  # the request as the pipeline prepared it at admission
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    cancelled: bool = False
    cancel_reason: str = ""
    # Called on the worker thread with the job's events (Started, Progress, Preview) while it runs (streaming); it
    # must be quick and thread-safe (api/streaming.py hands the events to the event loop). Errors it raises are
    # logged and ignored.
    listener: Callable[[JobEvent], None] | None = None
    replica: str | None = None  # the replica that runs (ran) it: the x-step1x-replica header (engine/replica.py)

    @property
    def key(self) -> Hashable:
        """Equal keys may share one pipeline call."""
        return self.prepared.key

    @property
    def images(self) -> int:
        """Images this job adds to a batch (its `n`)."""
        return self.prepared.images

    def cancel(self, reason: str = "cancelled") -> bool:
        """Drop the job. True if it never reached the pipeline; a running job only stops if its whole batch is
        cancelled (the worker checks between steps)."""
        if not self.cancelled:
            self.cancelled = True
            self.cancel_reason = reason
        return self.future.cancel()

    def settle(self, *, result: Any = None, exc: BaseException | None = None) -> None:
        """Resolve the future once; an already-resolved one (a shutdown or cancel race) is left alone. Both the
        local worker and the Ray front end (deploy/remote_engine.py) resolve jobs through here."""
        if self.future.done():
            return
        with contextlib.suppress(InvalidStateError):  # resolved concurrently
            if exc is not None:
                self.future.set_exception(exc)
            else:
                self.future.set_result(result)


class JobQueue:
    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self.closed = False

    def put(self, job: Job) -> None:
        with self._cond:
            if self.closed:
                raise EngineClosed("the server is shutting down")
            self._purge()
            if len(self._jobs) >= self.depth:
                raise QueueFull(f"the queue is full ({self.depth} jobs waiting)")
            self._jobs.append(job)
            self._cond.notify_all()

    def take_batch(self, max_images: int, wait_s: float = 0.0, idle_timeout: float | None = None,
                   limit: Callable[[Hashable], int | None] | None = None) -> list[Job] | None:
        """Block until a job is waiting; return it with compatible later jobs (same key) within `max_images`.

        The oldest job always goes, even when its own `n` exceeds the budget. With `wait_s` > 0 the batch waits
        that long for companions when it is not yet full. `limit(key)` may lower the budget for that key (the
        pipeline's estimate of what fits in the device's free memory at that working size; None = no lower
        limit). Returns None once closed and empty (the worker exits), or an empty list when `idle_timeout`
        passes with nothing to do.
        """
        with self._cond:
            while True:
                self._purge()
                if self._jobs:
                    break
                if self.closed:
                    return None
                if not self._cond.wait(idle_timeout) and idle_timeout is not None:
                    return []
            first = self._jobs.popleft()
            if limit is not None:
                fits = limit(first.key)
                if fits is not None and fits < max_images:
                    max_images = max(1, fits)
            batch, total = [first], first.images
            deadline = time.monotonic() + wait_s
            while True:
                for job in list(self._jobs):
                    if total >= max_images:
                        break
                    if not job.cancelled and job.key == first.key and total + job.images <= max_images:
                        self._jobs.remove(job)
                        batch.append(job)
                        total += job.images
                remaining = deadline - time.monotonic()
                if total >= max_images or remaining <= 0 or self.closed:
                    break
                self._cond.wait(remaining)
            return batch

    def close(self) -> None:
        """Stop admission; jobs already queued are still handed out (graceful drain)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def clear(self) -> list[Job]:
        """Remove and return every waiting job (used when a drain runs out of time)."""
        with self._cond:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs

    def stats(self) -> tuple[int, int]:
        """(waiting jobs, waiting images), cancelled jobs excluded."""
        with self._cond:
            live = [j for j in self._jobs if not j.cancelled]
            return len(live), sum(j.images for j in live)

    def _purge(self) -> None:
        """Forget cancelled jobs (their clients are gone); they never reach the pipeline."""
        if any(j.cancelled or j.future.cancelled() for j in self._jobs):
            self._jobs = deque(j for j in self._jobs if not (j.cancelled or j.future.cancelled()))
