"""One edit request from validated fields to the response body; shared by both image endpoints and streaming.

The walk: `submit_edit` (readiness, the input image fetched and decoded in a thread, then the engine prepares and
queues the request — also in a thread, since preparing resizes the image) -> `wait_for_job` (the result, watching
the deadline and the client) -> `store_outputs` (encoded in the request's `output_format`, several images at once,
then a link from the store) or `encode_b64` -> the body.
Cheap checks come first; an abandoned or late job is dropped from the queue (or stopped between steps) instead of
burning the GPU.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request

from .. import MODEL_ID
from ..engine.metrics import Metrics
from ..engine.queue import EngineClosed, Job, QueueFull
from ..engine.worker import Aborted, Engine, NotReady, OutOfMemory
from ..pipeline.types import EditResult, JobEvent
from ..settings import Settings
from ..storage import ImageStore, StorageError, StorageFull, StorageUnavailable
from ..storage.base import FORMATS
from .errors import APIError, bad_request, request_id_of
from .images import ImageLimits, ImageRef, encode_images, open_image
from .links import LinkFetcher
from .protocol import EditParams

log = logging.getLogger("step1x_edit.api")

_POLL_S = 0.2  # how often a waiting handler checks for a disconnected client


@dataclass
class Server:
    """Everything a request handler needs, built once per app."""

    settings: Settings
    engine: Engine
    store: ImageStore
    fetcher: LinkFetcher
    limits: ImageLimits
    metrics: Metrics
    started_at: int


def check_model(model: str | None) -> None:
    if model is not None and model != MODEL_ID:
        raise APIError(404, f"The model '{model[:200]}' does not exist: this server serves '{MODEL_ID}' "
                            "(field 'model')", code="model_not_found")


async def run_edit(server: Server, request: Request, params: EditParams, image: ImageRef) -> dict[str, Any]:
    """The JSON answer of both image endpoints."""
    created = int(time.time())
    deadline = time.monotonic() + server.settings.request_timeout_s
    job = await submit_edit(server, params, image)
    result = await wait_for_job(server, request, job, deadline)
    note_replica(request, job)
    t1 = time.monotonic()
    if params.response_format == "url":
        names = await anyio.to_thread.run_sync(store_outputs, server, params, result.images)
        base = (server.settings.public_base_url or str(request.base_url)).rstrip("/")
        links = [server.store.link(name) for name in names]
        data = [{"url": base + link if link.startswith("/") else link, "seed": seed}
                for link, seed in zip(links, result.seeds, strict=True)]
    else:
        encoded = await anyio.to_thread.run_sync(encode_b64, server, params, result.images)
        data = [{"b64_json": b64, "seed": seed} for b64, seed in zip(encoded, result.seeds, strict=True)]
    server.metrics.observe_stage("output", time.monotonic() - t1)
    return {"created": created, "data": data, "usage": usage_of(result)}


def note_replica(request: Request, job: Job) -> None:
    """The replica that ran `job` goes out in the x-step1x-replica header (the middleware writes it)."""
    if job.replica:
        request.scope.setdefault("state", {})["replica"] = job.replica


def usage_of(result: EditResult) -> dict[str, Any]:
    text, img_tokens = int(result.text_tokens), int(result.image_tokens)
    return {"input_tokens": text + img_tokens, "input_tokens_details": {"text_tokens": text, "image_tokens": img_tokens},
            "output_tokens": 0, "total_tokens": text + img_tokens}


async def submit_edit(server: Server, params: EditParams, image: ImageRef, *,
                      listener: Callable[[JobEvent], None] | None = None) -> Job:
    """Everything before the wait: readiness, the input image (fetched, decoded), preparation and admission. Every
    failure here is an APIError, raised before any response byte (streaming requests too)."""
    if not server.engine.ready:  # before fetching links or decoding: refuse early while loading/shutting down
        raise unavailable(server.engine.not_ready_reason())

    t0 = time.monotonic()
    data = image.data if image.data is not None else await server.fetcher.fetch(image.url or "")
    picture = await anyio.to_thread.run_sync(open_image, data, server.limits)
    server.metrics.observe_stage("input", time.monotonic() - t0)
    try:
        return await anyio.to_thread.run_sync(server.engine.submit, params.to_edit_request(picture), listener)
    except QueueFull as exc:
        raise APIError(429, f"The server is busy: {exc}; retry later", code="queue_full",
                       headers={"Retry-After": str(_retry_after(server))}) from None
    except (EngineClosed, NotReady) as exc:
        raise unavailable(str(exc)) from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def encode_b64(server: Server, params: EditParams, images: list[Any]) -> list[str]:
    """The images in the request's `output_format`, base64 in the server's `b64_json` style (plain, or as a data
    URI with the format's media type)."""
    prefix = f"data:{FORMATS[params.output_format][1]};base64," if server.settings.b64_json_style == "data_uri" else ""
    return [prefix + base64.b64encode(data).decode("ascii")
            for data in encode_images(images, params.output_format, params.output_compression)]


def store_outputs(server: Server, params: EditParams, images: list[Any]) -> list[str]:
    """Encode (in the request's `output_format`, several images at once) and store every image; all or nothing:
    outputs of this request already stored are removed when a later one fails (they would be orphans nobody has a
    link to). Returns the stored names."""
    encoded = encode_images(images, params.output_format, params.output_compression)
    names: list[str] = []
    try:
        for data in encoded:
            names.append(server.store.put(data, params.output_format))
    except StorageError as exc:
        for name in names:
            with contextlib.suppress(StorageError, OSError):
                server.store.delete(name)
        raise storage_error(exc) from None
    return names


def storage_error(exc: StorageError) -> APIError:
    """A failed write of an output: 507 when the store is full, 503 when it cannot be reached, else 500; the
    message says what to do."""
    log.error("storing an output image failed: %r", exc)
    if isinstance(exc, StorageFull):
        return APIError(507, "The server has no storage left for the output image; retry later, or ask for "
                             "response_format=b64_json (not stored)", code="insufficient_storage",
                        headers={"Retry-After": "60"})
    if isinstance(exc, StorageUnavailable):
        return APIError(503, "The output store cannot be reached; retry later, or ask for response_format=b64_json",
                        code="storage_unavailable", headers={"Retry-After": "10"})
    return APIError(500, "The output image could not be stored; retry later, or ask for response_format=b64_json",
                    code="storage_error")


def timed_out(server: Server, job: Job) -> APIError:
    """The job ran past the request's deadline: drop it (from the queue, or between steps) and say so (504)."""
    never_ran = job.cancel("timeout")
    server.metrics.jobs.labels("dropped_timeout").inc()
    return APIError(504, f"The request timed out after {server.settings.request_timeout_s:g} s"
                    + (" in the queue" if never_ran else ""), code="timeout")


def client_gone(server: Server, job: Job, request_id: str | None) -> None:
    """The client went away: drop its job."""
    job.cancel("disconnected")
    server.metrics.jobs.labels("dropped_disconnect").inc()
    log.info("client of request %s went away; job dropped", request_id)


async def wait_for_job(server: Server, request: Request, job: Job, deadline: float) -> EditResult:
    """The job's result; 504 past the deadline, and the job dropped when the client goes away."""
    future = asyncio.wrap_future(job.future)
    # When the handler gives up first (timeout, disconnect), the job may still end with an exception that no one
    # awaits; retrieving it here keeps asyncio from logging "exception was never retrieved".
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timed_out(server, job)
            done, _ = await asyncio.wait({future}, timeout=min(_POLL_S, remaining))
            if done:
                break
            if await request.is_disconnected():
                client_gone(server, job, request_id_of(request))
                raise APIError(499, "Client closed the request", code="client_closed", type="client_closed")
    except asyncio.CancelledError:
        job.cancel("cancelled")
        raise
    exc = future.exception() if not future.cancelled() else Aborted("cancelled")
    if exc is None:
        return future.result()
    raise job_error(exc, request_id_of(request))


def job_error(exc: BaseException, request_id: str | None) -> APIError:
    """The APIError for a job that ended with `exc` (shared with the streaming responses)."""
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if isinstance(exc, EngineClosed):
        return unavailable(str(exc))
    if isinstance(exc, Aborted):
        return APIError(504, "The request was cancelled before it finished", code="timeout")
    if isinstance(exc, OutOfMemory):  # the worker freed its caches and carries on: worth a retry
        return APIError(503, "The server ran out of memory on this request; retry later, or ask for fewer images "
                             "(n) or a smaller size", code="out_of_memory", headers={"Retry-After": "10"})
    log.error("request %s failed in the pipeline: %r", request_id, exc)
    return APIError(500, f"The pipeline failed: {type(exc).__name__}", code="pipeline_error")


def unavailable(reason: str) -> APIError:
    return APIError(503, f"Service unavailable: {reason}", code="not_ready", headers={"Retry-After": "5"})


def _retry_after(server: Server) -> int:
    """A rough wait: the queued images times a second each, at least 1 s (clients back off from there)."""
    stats = server.engine.stats()
    return max(1, min(60, stats["queued_images"] + stats["running_images"]))
