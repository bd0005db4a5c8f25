"""The pipeline deployment's replica: one engine (queue, micro-batching, the worker thread) and one pipeline on one
device, as in the single-process server, behind a Ray Serve streaming method.

Ray Serve sends each replica at most `max_ongoing_requests` requests at once; they go into the replica's own
engine, which batches compatible ones exactly as the single-process server does. `edit` streams back what the
ingress's `RemoteEngine` needs: ("admitted", replica id) once the engine has accepted the request, its events
("event", Started | Progress | Preview), then ("result", EditResult). A cancelled Ray request (the client went away)
cancels the job here, which drops it from the queue or stops it between steps.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from ..engine.replica import header_value
from ..engine.worker import Aborted, Engine
from ..pipeline.types import EditRequest
from ..settings import Settings

log = logging.getLogger("step1x_edit.deploy")

_DONE = object()


def serve_replica_id() -> str:
    """This Ray Serve replica's id (its unique id in the deployment), or the process's outside Serve."""
    try:
        from ray import serve

        return header_value(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not in a Serve replica
        from ..engine.replica import process_replica_id

        return process_replica_id()


class PipelineReplica:
    """The body of the `Step1XPipeline` deployment (deploy/app.py wraps it with `serve.deployment`)."""

    def __init__(self, settings: Settings, max_ongoing_requests: int) -> None:
        logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

        def build() -> Any:
            from ..pipeline.edit import build_pipeline

            return build_pipeline(settings)

        self.replica_id = serve_replica_id()
        # The local queue holds what Ray Serve sends at once; Ray's own queue (max_queued_requests) is the limit.
        self.engine = Engine(build, queue_depth=max(settings.queue_depth, max_ongoing_requests),
                             batch_max_images=settings.batch_max_images, batch_wait_s=settings.batch_wait_ms / 1000,
                             replica_id=self.replica_id)
        self.engine.start()
        self.engine.wait_loaded()
        if self.engine.load_error is not None:  # Ray Serve reports the deployment as failed, with this message
            raise RuntimeError(f"the model failed to load: {self.engine.load_error}")
        log.info("replica %s ready (pid %d): %s", self.replica_id, os.getpid(), self.engine.info)

    async def edit(self, request: EditRequest) -> AsyncIterator[tuple[str, Any]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:  # the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is gone
                pass

        job = await loop.run_in_executor(None, self.engine.submit, request, put)  # prepare: off the event loop
        job.future.add_done_callback(lambda _f: put(_DONE))
        try:
            yield "admitted", self.replica_id
            while (item := await events.get()) is not _DONE:
                yield "event", item
            if job.future.cancelled():
                raise Aborted("cancelled")
            error = job.future.exception()
            if error is not None:
                raise error
            yield "result", job.future.result()
        finally:  # also on cancellation (asyncio.CancelledError) and when the caller stops reading
            if not job.future.done():
                job.cancel("cancelled")

    def info(self) -> dict[str, Any]:
        return {**self.engine.info, "replica": self.replica_id, "pid": os.getpid()}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose worker thread died is replaced."""
        if not self.engine.ready:
            raise RuntimeError(self.engine.not_ready_reason())

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(5)
