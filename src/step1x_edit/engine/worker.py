"""The worker thread that owns the pipeline, and the `Engine` the HTTP layer talks to.

All torch work happens on this one thread: the event loop only enqueues jobs and awaits their futures, so a
long denoise never stalls other connections, and the pipeline (not thread-safe, one device) is never entered twice.
The pipeline is built on the worker thread too, so the server answers `/health` while weights load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..pipeline.types import (
    Cancelled,
    EditRequest,
    EditResult,
    JobEvent,
    PipelineLost,
    PreparedEdit,
    Preview,
    PreviewCallback,
    Progress,
    Started,
    StepCallback,
    StopCheck,
)
from .metrics import Metrics
from .queue import EngineClosed, Job, JobQueue, QueueFull
from .replica import process_replica_id

log = logging.getLogger("step1x_edit.engine")

__all__ = ["Engine", "EngineClosed", "NotReady", "PipelineLike", "QueueFull", "Aborted", "OutOfMemory"]


# After a drain that ran out of time: how long to wait for the cancelled pipeline call to stop at its next step
# (one denoising step, or a VAE decode or encoder pass, which cannot be interrupted).
STOP_WAIT_S = 30.0


class PipelineLike(Protocol):
    """Everything the engine asks of `pipeline.edit.EditPipeline`: prepare a request at admission (any thread;
    ValueError = the client's mistake), run a batch of prepared requests with equal keys on the worker thread
    (reporting steps and previews, stopping between steps when asked: `Cancelled`), describe itself, and free
    memory after an out-of-memory error.

    Optional: `max_images(key)` (how many images one call may hold for that batch key: the device's free memory at
    that working size; the engine then batches below its setting), `watch(listener)` (a pipeline of several ranks
    calls `listener(reason)` when it can run nothing more, e.g. a rank died: the engine then fails its jobs with
    503 and stops) and `close()` (called once the worker stops: the pipeline's worker ranks are told to stop)."""

    def prepare(self, request: EditRequest) -> PreparedEdit: ...
    def run(self, batch: list[PreparedEdit], *, on_step: StepCallback | None = None,
            on_preview: PreviewCallback | None = None, should_stop: StopCheck | None = None) -> list[EditResult]: ...
    def info(self) -> dict[str, Any]: ...
    def release_memory(self) -> None: ...


class NotReady(Exception):
    """The pipeline is still loading, failed to load, or the worker died (HTTP 503)."""


class Aborted(Exception):
    """A pipeline call stopped between steps because every job in it was cancelled."""


class OutOfMemory(Exception):
    """The pipeline ran out of device (or host) memory on this job (HTTP 503); the worker freed its caches and
    goes on with the next job."""


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (= torch.cuda.OutOfMemoryError), other backends' "out of memory" RuntimeErrors, the
    CPU allocator's "can't allocate memory", and Python's MemoryError. Judged by name and message so the engine
    never has to import torch."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Engine:
    def __init__(self, pipeline_factory: Callable[[], PipelineLike], *, queue_depth: int, batch_max_images: int,
                 batch_wait_s: float = 0.0, metrics: Metrics | None = None, replica_id: str | None = None) -> None:
        self._factory = pipeline_factory
        self.replica_id = replica_id or process_replica_id()
        self.queue = JobQueue(queue_depth)
        self.batch_max_images = batch_max_images
        self.batch_wait_s = batch_wait_s
        self.metrics = metrics
        self.pipeline: PipelineLike | None = None
        self.info: dict[str, Any] = {}
        self.load_error: BaseException | None = None
        self._loaded = threading.Event()
        self._thread = threading.Thread(target=self._main, name="step1x-worker", daemon=True)
        self._running: list[Job] = []
        self.lost_reason: str | None = None
        self._lost_listeners: list[Callable[[str], None]] = []
        # Every admitted job until its future is settled, wherever it is (queued, taken, running): what a drain
        # that runs out of time must answer.
        self._admitted: set[Job] = set()
        self._admitted_lock = threading.Lock()
        self._shutdown_lock = threading.Lock()
        self._drained: bool | None = None  # the result of the shutdown, once it has run
        if metrics is not None:
            metrics.bind_engine(self.stats, lambda: self.ready)

    # --- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    @property
    def ready(self) -> bool:
        return (self.pipeline is not None and self._thread.is_alive() and not self.queue.closed)

    def not_ready_reason(self) -> str:
        if self.lost_reason is not None:
            return f"the pipeline stopped: {self.lost_reason}"
        if self.queue.closed:
            return "the server is shutting down"
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        if self.pipeline is None:
            return "the model is still loading"
        if not self._thread.is_alive():
            return "the worker thread has stopped"
        return ""

    def shutdown(self, timeout: float) -> bool:
        """Stop admission, let queued and running jobs finish for up to `timeout` s, then fail every admitted job
        still unanswered — queued, or in the running batch, which then stops at its next step — with EngineClosed
        (HTTP 503, or a stream's `error` event). Returns True when everything drained. Only the first call drains;
        later ones (the app's lifespan, after `serve` drained on SIGTERM) return its result at once."""
        with self._shutdown_lock:
            if self._drained is not None:
                return self._drained
            log.info("shutting down: draining admitted work (up to %g s)", timeout)
            self.queue.close()
            if self._thread.is_alive():
                self._thread.join(timeout)
            self.queue.clear()
            with self._admitted_lock:
                unanswered = [job for job in self._admitted if not job.future.done()]
            for job in unanswered:
                ran = job.started_at is not None
                # settled before cancelling: cancelling first would cancel a queued job's future (a 504, not a 503)
                job.settle(exc=EngineClosed("the server shut down before this job " + ("finished" if ran else "ran")))
                job.cancel("shutdown")  # a running batch stops between steps once all its jobs are cancelled
            if unanswered:
                log.warning("shutdown: %d admitted job(s) unfinished after %g s were answered with 503",
                            len(unanswered), timeout)
                if self.metrics:
                    self.metrics.jobs.labels("shutdown").inc(len(unanswered))
            self._drained = not self._thread.is_alive() and not unanswered
            if self._thread.is_alive() and self.pipeline is not None:  # (a pipeline still loading cannot be stopped)
                # The answers are out; now let the cancelled call reach its next step and return: a process that
                # exits while the worker is inside a torch call aborts ("terminate called without an active
                # exception") instead of exiting cleanly.
                self._thread.join(STOP_WAIT_S)
                if self._thread.is_alive():
                    log.warning("the worker is still inside a pipeline call %g s after the drain", STOP_WAIT_S)
            return self._drained

    def add_lost_listener(self, listener: Callable[[str], None]) -> None:
        """`listener(reason)` once the pipeline is lost (see `lost`); `serve` stops the server on it."""
        self._lost_listeners.append(listener)

    def lost(self, reason: str) -> None:
        """The pipeline can run nothing more (a rank of a multi-process pipeline died or failed): the running and
        queued jobs fail with EngineClosed (503), admission stops, the listeners are told. Any thread, once."""
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        log.error("pipeline lost: %s; failing the running and queued jobs", reason)
        self.queue.close()
        exc = EngineClosed(f"the pipeline stopped: {reason}")
        self.queue.clear()
        with self._admitted_lock:  # queued, taken or running: every admitted job not yet answered
            jobs = [j for j in self._admitted if not j.future.done()]
        for job in jobs:
            job.settle(exc=exc)
        if self.metrics and jobs:
            self.metrics.jobs.labels("failed").inc(len(jobs))
        for listener in self._lost_listeners:
            try:
                listener(reason)
            except Exception:  # noqa: BLE001
                log.exception("a lost-pipeline listener failed")

    # --- admission -----------------------------------------------------------------------------------------
    def submit(self, request: EditRequest, listener: Callable[[JobEvent], None] | None = None) -> Job:
        """Prepare and queue one request. Raises NotReady, EngineClosed, QueueFull, or ValueError (bad input, from
        `prepare`). The preparation (resize, seeds) runs on the caller's thread: call it from a worker thread, not
        the event loop. `listener` gets the job's events on the worker thread (see `Job.listener`)."""
        if self.queue.closed:
            raise EngineClosed("the server is shutting down")
        if not self.ready:
            raise NotReady(self.not_ready_reason())
        assert self.pipeline is not None
        job = Job(prepared=self.pipeline.prepare(request), listener=listener, replica=self.replica_id)
        with self._admitted_lock:
            self._admitted.add(job)
        try:
            self.queue.put(job)
        except (QueueFull, EngineClosed) as exc:
            with self._admitted_lock:
                self._admitted.discard(job)
            if self.metrics and isinstance(exc, QueueFull):
                self.metrics.jobs.labels("rejected_full").inc()
            raise
        job.future.add_done_callback(lambda _f: self._forget(job))
        return job

    def _forget(self, job: Job) -> None:
        with self._admitted_lock:
            self._admitted.discard(job)

    def stats(self) -> dict[str, int]:
        jobs, images = self.queue.stats()
        running = self._running
        return {"queued_jobs": jobs, "queued_images": images, "running_jobs": len(running),
                "running_images": sum(j.images for j in running)}

    # --- the worker thread ---------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.pipeline = self._factory()
            self.info = dict(self.pipeline.info())
            watch = getattr(self.pipeline, "watch", None)  # several ranks: a rank's death stops the engine
            if watch is not None:
                watch(self.lost)
            log.info("pipeline ready: %s", self.info)
        except BaseException as exc:  # noqa: BLE001 - reported through /ready and 503s
            self.load_error = exc
            log.exception("building the pipeline failed")
            return
        finally:
            self._loaded.set()
        while True:
            batch = self.queue.take_batch(self.batch_max_images, self.batch_wait_s, limit=self._fits)
            if batch is None:
                break
            live = [j for j in batch if _claim(j)]
            try:
                if live:
                    self._run_batch(live)
            except BaseException as exc:  # noqa: BLE001 - a bug here must not kill the only worker
                log.exception("worker error")
                for job in live:
                    job.settle(exc=RuntimeError(f"worker error: {exc!r}"))
                self._running = []
        close = getattr(self.pipeline, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001
                log.exception("closing the pipeline failed")
        log.info("worker stopped")

    def _fits(self, key: Any) -> int | None:
        """The pipeline's own limit on images per call for this batch key (`max_images`, when it has one: it
        knows the device's free memory and what a working size needs); None = only `batch_max_images`."""
        estimate = getattr(self.pipeline, "max_images", None)
        if estimate is None:
            return None
        try:
            return estimate(key)
        except Exception:  # noqa: BLE001 - an estimate must never stop the worker
            log.exception("max_images(%r) failed; batching by batch_max_images alone", key)
            return None

    def _run_batch(self, batch: list[Job]) -> None:
        now = time.monotonic()
        for job in batch:
            job.started_at = now
            if self.metrics:
                self.metrics.observe_stage("queue", now - job.enqueued_at)
        self._running = batch
        try:
            results = self._call(batch)
        except Cancelled:
            for job in batch:
                job.settle(exc=Aborted("cancelled by the client"))
            if self.metrics:
                self.metrics.jobs.labels("aborted").inc(len(batch))
            return
        except PipelineLost as exc:  # no retry: nothing can run any more
            self.lost(str(exc))
            return
        except Exception as exc:  # noqa: BLE001
            if is_out_of_memory(exc):
                exc = self._recover_from_oom(exc, batch)
            if len(batch) > 1:
                # One bad request (or an out-of-memory batch) must not fail its companions: retry them alone.
                log.warning("batch of %d failed (%s); retrying its jobs one by one", len(batch), exc)
                self._running = []
                for job in batch:
                    if job.cancelled:
                        job.settle(exc=Aborted("cancelled by the client"))
                    else:
                        self._run_batch([job])
                return
            if isinstance(exc, OutOfMemory):
                log.warning("%s", exc)
            else:
                log.log(logging.INFO if isinstance(exc, ValueError) else logging.ERROR,
                        "pipeline call failed: %r", exc, exc_info=not isinstance(exc, ValueError))
            batch[0].settle(exc=exc)
            if self.metrics:
                self.metrics.jobs.labels("oom" if isinstance(exc, OutOfMemory) else "failed").inc()
            return
        finally:
            self._running = []
        for job, result in zip(batch, results, strict=True):
            job.settle(result=result)
        if self.metrics:
            self.metrics.jobs.labels("done").inc(len(batch))

    def _recover_from_oom(self, exc: BaseException, batch: list[Job]) -> OutOfMemory:
        """Drop every reference to the failed call's tensors (they live on in the traceback's frames), then let
        the pipeline free its caches (`release_memory`: gc, and the CUDA caching allocator's blocks)."""
        images = sum(j.images for j in batch)
        message = (f"out of memory running {len(batch)} request(s), {images} image(s): "
                   f"{type(exc).__name__}: {str(exc)[:200]}")
        chained: BaseException | None = exc
        for _ in range(16):  # the exception and what it chains to (bounded: chains may, rarely, loop)
            if chained is None:
                break
            chained.__traceback__ = None
            chained = chained.__cause__ or chained.__context__
        try:
            assert self.pipeline is not None
            self.pipeline.release_memory()
        except Exception:  # noqa: BLE001 - recovery is best effort; the next job will tell
            log.exception("releasing memory after an out-of-memory error failed")
        return OutOfMemory(message)

    def _call(self, batch: list[Job]) -> list[EditResult]:
        assert self.pipeline is not None
        if self.metrics:
            self.metrics.batch_requests.observe(len(batch))
            self.metrics.batch_images.observe(sum(j.images for j in batch))

        def on_step(step: int, total: int) -> None:
            for job in batch:
                _notify(job, Progress(step, total))

        def on_preview(index: int, preview: Preview) -> None:
            _notify(batch[index], preview)

        for job in batch:
            _notify(job, Started())
        t0 = time.monotonic()
        results = self.pipeline.run([j.prepared for j in batch], on_step=on_step, on_preview=on_preview,
                                    should_stop=lambda: all(j.cancelled for j in batch))
        if len(results) != len(batch):
            raise RuntimeError(f"pipeline returned {len(results)} results for {len(batch)} requests")
        if self.metrics:
            self.metrics.observe_stage("pipeline", time.monotonic() - t0)
            for name, seconds in results[0].timings.items():
                self.metrics.observe_stage(f"pipeline_{name}", seconds)
        return results


def _claim(job: Job) -> bool:
    """Mark a taken job's future running; False when its client cancelled it or a shutdown that ran out of time
    answered it between `take_batch` and here."""
    try:
        return job.future.set_running_or_notify_cancel()
    except RuntimeError:  # already finished (EngineClosed from `shutdown`)
        return False


def _notify(job: Job, event: JobEvent) -> None:
    """Hand a progress event to the job's listener; a failing listener (its client gone) never fails the batch."""
    if job.listener is None or job.cancelled:
        return
    try:
        job.listener(event)
    except Exception:  # noqa: BLE001
        log.debug("progress listener failed", exc_info=True)
