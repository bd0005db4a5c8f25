"""The ingress's engine under Ray Serve: the `Engine` interface of engine/worker.py, over a deployment handle.

Why: the HTTP app (api/) talks to one object with `submit`, `ready`, `info`, `stats`, `start`, `shutdown`; with Ray
Serve the queue and the device are in other processes (the pipeline deployment's replicas, deploy/replica.py). This
class keeps api/service.py and api/streaming.py unchanged: `submit` sends the request through Ray Serve's router
(which spreads requests over replicas, queues them when every replica is at `max_ongoing_requests`, and refuses
beyond `max_queued_requests`), and returns a `Job` whose future and listener a thread fills from the replica's
stream of events.

Mapping onto the engine's errors (and so onto the HTTP answers api/service.py already gives):
- Ray Serve's `BackPressureError` (its queue is full) -> `QueueFull` -> 429 with Retry-After, before any byte;
- the replica's own refusals (a ValueError from `prepare`, its local queue full, not ready) -> the same exceptions;
- a replica that dies or becomes unreachable while it holds the request -> `ReplicaLost` (an `EngineClosed`) ->
  a 503 for that request only (an `error` event on a stream that has started); other requests go on;
- a cancelled request (client gone, deadline) -> the Ray request is cancelled, which stops it on the replica.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..engine.metrics import Metrics
from ..engine.queue import EngineClosed, Job, QueueFull
from ..engine.replica import process_replica_id
from ..engine.worker import Aborted, NotReady, OutOfMemory
from ..pipeline.types import EditRequest

log = logging.getLogger("step1x_edit.deploy")

# How long `submit` waits for a replica to accept a request before answering "queued" (it is then in Ray Serve's
# queue, which is bounded by max_queued_requests). Ray refuses an over-full queue at once, well within this.
ADMISSION_WAIT_S = 2.0


class ReplicaLost(EngineClosed):
    """The replica that held the request died or cannot be reached (HTTP 503; the request may be retried)."""


@dataclass(eq=False)
class RemoteJob(Job):
    """A job whose work runs on a pipeline replica: `n` images, `response` the Ray streaming response."""

    n: int = 1
    response: Any = None

    @property
    def key(self) -> Any:  # batching happens on the replica
        return None

    @property
    def images(self) -> int:
        return self.n

    def cancel(self, reason: str = "cancelled") -> bool:
        never_ran = super().cancel(reason)
        response = self.response
        if response is not None:  # Ray's cancel may wait for the router: never on the caller's (event loop) thread
            threading.Thread(target=_cancel_quietly, args=(response,), daemon=True, name="step1x-cancel").start()
        return never_ran


def _cancel_quietly(response: Any) -> None:
    try:
        response.cancel()
    except Exception:  # noqa: BLE001 - best effort: the request may have finished or its replica died
        log.debug("cancelling a Ray request failed", exc_info=True)


def translate(exc: BaseException) -> BaseException:
    """The engine exception for what a Ray Serve call raised (see the module docstring)."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    if isinstance(exc, sex.BackPressureError):
        return QueueFull(f"every replica is busy and Ray Serve's queue is full ({exc})")
    if isinstance(exc, (sex.RequestCancelledError, rex.TaskCancelledError)):
        return Aborted("cancelled")
    if isinstance(exc, rex.RayTaskError):  # an exception raised on the replica, carried over
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        if cause is not exc:
            return translate(cause)
    if isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError, rex.WorkerCrashedError, rex.RaySystemError,
                        rex.ObjectLostError, rex.GetTimeoutError, sex.DeploymentUnavailableError)) or \
            type(exc).__name__ in ("ReplicaUnavailableError", "ActorDiedError"):
        return ReplicaLost(f"the replica running this request stopped ({type(exc).__name__}); retry the request")
    if isinstance(exc, ValueError | QueueFull | EngineClosed | NotReady | OutOfMemory | Aborted):
        return type(exc)(*exc.args)  # the replica's own refusal, re-raised as a clean exception of the same kind
    return RuntimeError(f"{type(exc).__name__}: {str(exc)[:500]}")


class RemoteEngine:
    """`Engine` for the ingress deployment: jobs run on the pipeline deployment's replicas (see the module doc)."""

    def __init__(self, handle: Any, *, metrics: Metrics | None = None, replica_id: str | None = None,
                 admission_wait_s: float = ADMISSION_WAIT_S) -> None:
        self._handle = handle
        self.replica_id = replica_id or process_replica_id()  # the ingress's own id (responses no replica ran)
        self.admission_wait_s = admission_wait_s
        self.info: dict[str, Any] = {}
        self.load_error: BaseException | None = None
        self.closed = False
        self._jobs: set[RemoteJob] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._loaded = threading.Event()
        if metrics is not None:
            metrics.bind_engine(self.stats, lambda: self.ready)

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._fetch_info, name="step1x-ray-info", daemon=True).start()

    def _fetch_info(self) -> None:
        """Ready once a replica has answered `info` (its weights are loaded: replicas build them in __init__)."""
        while not self.closed:
            try:
                info = dict(self._handle.info.remote().result(timeout_s=30))
                info.pop("pid", None)  # (for operators' tools; not for /ready and /v1/models)
                info.pop("replica", None)
                self.info = info
                self.load_error = None
                self._loaded.set()
                log.info("pipeline deployment ready: %s", self.info)
                return
            except Exception as exc:  # noqa: BLE001 - not deployed yet, or failing: reported by /ready
                self.load_error = translate(exc)
                log.warning("pipeline deployment not reachable yet: %r", exc)
                time.sleep(2)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    @property
    def ready(self) -> bool:
        return bool(self.info) and not self.closed

    def not_ready_reason(self) -> str:
        if self.closed:
            return "the server is shutting down"
        if self.load_error is not None:
            return f"the pipeline deployment is not available: {self.load_error}"
        if not self.info:
            return "the model is still loading"
        return ""

    def shutdown(self, timeout: float) -> bool:
        """Stop admission, let requests in flight finish for up to `timeout` s, then fail (and cancel) the rest."""
        deadline = time.monotonic() + timeout
        with self._idle:
            self.closed = True
            while self._jobs and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            leftovers = list(self._jobs)
        for job in leftovers:
            job.settle(exc=EngineClosed("the server shut down before this job finished"))
            job.cancel("shutdown")
        return not leftovers

    # --- admission ------------------------------------------------------------------------------------------------
    def submit(self, request: EditRequest, listener: Any = None) -> Job:
        """Send one request to the pipeline deployment; returns once a replica has accepted it, or it waits in Ray
        Serve's queue. Raises QueueFull (Ray's queue is full), ValueError (the replica's `prepare` refused it),
        NotReady / EngineClosed. Blocking: call it from a worker thread, as api/service.py does."""
        if self.closed:
            raise EngineClosed("the server is shutting down")
        if not self.ready:
            raise NotReady(self.not_ready_reason())
        job = RemoteJob(prepared=None, listener=listener, n=request.n)  # type: ignore[arg-type] - prepared remotely
        decided = threading.Event()
        refused: list[BaseException] = []
        with self._lock:
            self._jobs.add(job)
        try:
            job.response = self._handle.options(stream=True).edit.remote(request)
        except Exception as exc:  # noqa: BLE001
            self._forget(job)
            raise translate(exc) from None
        threading.Thread(target=self._consume, args=(job, decided, refused), name="step1x-ray-job",
                         daemon=True).start()
        decided.wait(self.admission_wait_s)
        if refused:
            raise refused[0]
        return job

    def _consume(self, job: RemoteJob, decided: threading.Event, refused: list[BaseException]) -> None:
        """Read the replica's stream: ("admitted", replica id), ("event", Started | Progress | Preview), then
        ("result", EditResult). Settles the job's future exactly once, whatever happens."""
        try:
            for kind, value in job.response:
                if kind == "admitted":
                    job.replica = value
                    job.started_at = time.monotonic()
                    if not job.future.set_running_or_notify_cancel():  # cancelled while it was queued
                        _cancel_quietly(job.response)
                        return
                    decided.set()
                elif kind == "event":
                    if job.listener is not None and not job.cancelled:
                        try:
                            job.listener(value)
                        except Exception:  # noqa: BLE001 - a gone listener never fails the job
                            log.debug("progress listener failed", exc_info=True)
                elif kind == "result":
                    job.settle(result=value)
            if not job.future.done():
                job.settle(exc=ReplicaLost("the replica's answer ended without a result; retry the request"))
        except BaseException as exc:  # noqa: BLE001 - every failure becomes the job's (or submit's) error
            error = translate(exc)
            if isinstance(error, ReplicaLost):
                log.warning("request lost its replica %s: %r", job.replica or "(not yet assigned)", exc)
            if not decided.is_set() and isinstance(error, ValueError | QueueFull | NotReady | EngineClosed):
                refused.append(error)  # submit is still waiting: refuse before the answer starts (400/429/503)
            elif isinstance(error, QueueFull):  # refused after submit gave up waiting: still a retry-later
                error = ReplicaLost(f"the server is busy: {error}; retry later")
            job.settle(exc=error)
        finally:
            decided.set()
            self._forget(job)

    def _forget(self, job: RemoteJob) -> None:
        with self._idle:
            self._jobs.discard(job)
            self._idle.notify_all()

    def stats(self) -> dict[str, int]:
        with self._lock:
            jobs = list(self._jobs)
        running = [j for j in jobs if j.replica is not None]
        queued = [j for j in jobs if j.replica is None]
        return {"queued_jobs": len(queued), "queued_images": sum(j.images for j in queued),
                "running_jobs": len(running), "running_images": sum(j.images for j in running)}
