"""One edit request from validated fields to the response body; shared by both image endpoints.

Order matters for cost: cheap checks (model, fields) first, then the input image (decoded in a thread), then
admission; the handler then waits for the worker while watching for a client disconnect and the deadline, so an
abandoned or late job is dropped from the queue (or stopped between steps) instead of burning the GPU.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
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
from ..pipeline.types import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_STRENGTH, EditRequest
from ..settings import Settings
from ..storage.local import LocalImageStore
from .errors import APIError, bad_request
from .images import ImageLimits, ImageRef, encode_png, open_image
from .links import LinkFetcher
from .schemas import EditParams

log = logging.getLogger("step1x_edit.api")

_POLL_S = 0.2  # how often a waiting handler checks for a disconnected client


@dataclass
class Server:
    """Everything a request handler needs, built once per app."""

    settings: Settings
    engine: Engine
    store: LocalImageStore
    fetcher: LinkFetcher
    limits: ImageLimits
    metrics: Metrics
    started_at: int


def check_model(model: str | None) -> None:
    if model is not None and model != MODEL_ID:
        raise APIError(404, f"The model '{model[:200]}' does not exist: this server serves '{MODEL_ID}' "
                            "(field 'model')", code="model_not_found")


async def run_edit(server: Server, request: Request, params: EditParams, image: ImageRef) -> dict[str, Any]:
    created = int(time.time())
    deadline = time.monotonic() + server.settings.request_timeout_s
    job = await submit_edit(server, params, image)
    result = await _wait(server, request, job, deadline)

    t1 = time.monotonic()
    as_url = (params.response_format or "url") == "url"
    items = await anyio.to_thread.run_sync(_encode_outputs, server, result, as_url)
    server.metrics.observe_stage("output", time.monotonic() - t1)
    base = (server.settings.public_base_url or str(request.base_url)).rstrip("/")
    data_items = []
    for (kind, value), seed in zip(items, result.seeds, strict=True):
        data_items.append({"url": base + value, "seed": seed} if kind == "url" else {"b64_json": value, "seed": seed})
    return {"created": created, "data": data_items, "usage": usage_of(result)}


def usage_of(result: Any) -> dict[str, Any]:
    text, img_tokens = int(result.text_tokens), int(result.image_tokens)
    return {"input_tokens": text + img_tokens, "input_tokens_details": {"text_tokens": text, "image_tokens": img_tokens},
            "output_tokens": 0, "total_tokens": text + img_tokens}


async def submit_edit(server: Server, params: EditParams, image: ImageRef, *,
                      listener: Callable[[tuple], None] | None = None, partial_images: int = 0) -> Job:
    """Everything before the wait: readiness, the input image (fetched, decoded), admission. Every failure here is
    an APIError, raised before any response byte (streaming requests too). `listener`: see `Job.listener`."""
    if not server.engine.ready:  # before fetching links or decoding: refuse early while loading/shutting down
        raise _unavailable(server.engine.not_ready_reason())

    t0 = time.monotonic()
    data = image.data if image.data is not None else await server.fetcher.fetch(image.url or "")
    picture = await anyio.to_thread.run_sync(open_image, data, server.limits)
    server.metrics.observe_stage("input", time.monotonic() - t0)

    req = EditRequest(
        image=picture, prompt=params.prompt, negative_prompt=params.negative_prompt or "",
        n=params.n if params.n is not None else 1,
        steps=params.steps if params.steps is not None else DEFAULT_STEPS,
        guidance_scale=params.guidance_scale if params.guidance_scale is not None else DEFAULT_GUIDANCE,
        strength=params.strength if params.strength is not None else DEFAULT_STRENGTH,
        seed=params.seed if params.seed is not None else -1,
        size_level=params.size_level(), partial_images=partial_images,
    )
    try:
        job = server.engine.submit(req, listener=listener) if listener is not None else server.engine.submit(req)
    except QueueFull as exc:
        raise APIError(429, f"The server is busy: {exc}; retry later", code="queue_full",
                       headers={"Retry-After": str(_retry_after(server))}) from None
    except (EngineClosed, NotReady) as exc:
        raise _unavailable(str(exc)) from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    return job


def _encode_outputs(server: Server, result: Any, as_url: bool) -> list[tuple[str, str]]:
    out = []
    saved: list[str] = []
    try:
        for img in result.images:
            png = encode_png(img)
            if as_url:
                saved.append(server.store.save_png(png))
                out.append(("url", server.store.signed_path(saved[-1])))
            else:
                b64 = base64.b64encode(png).decode("ascii")
                out.append(("b64", "data:image/png;base64," + b64 if server.settings.b64_json_style == "data_uri"
                            else b64))
    except OSError as exc:
        # All or nothing: outputs of this request already stored would be orphans nobody has a link to.
        for image_id in saved:
            with contextlib.suppress(OSError):
                server.store.delete(image_id)
        raise storage_error(exc) from None
    return out


def storage_error(exc: OSError) -> APIError:
    """A failed write of an output: 507 when the disk (or quota) is full, else 500; the message says what to do."""
    log.error("storing an output image failed: %r", exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return APIError(507, "The server has no storage left for the output image; retry later, or ask for "
                             "response_format=b64_json (not stored)", code="insufficient_storage",
                        headers={"Retry-After": "60"})
    return APIError(500, "The output image could not be stored; retry later, or ask for response_format=b64_json",
                    code="storage_error")


async def _wait(server: Server, request: Request, job: Job, deadline: float) -> Any:
    """The job's result; 504 past the deadline, and the job dropped when the client goes away."""
    future = asyncio.wrap_future(job.future)
    # When the handler gives up first (timeout, disconnect), the job may still end with an exception that no one
    # awaits; retrieving it here keeps asyncio from logging "exception was never retrieved".
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                never_ran = job.cancel("timeout")
                server.metrics.jobs.labels("dropped_timeout").inc()
                raise APIError(504, f"The request timed out after {server.settings.request_timeout_s:g} s"
                               + (" in the queue" if never_ran else ""), code="timeout")
            done, _ = await asyncio.wait({future}, timeout=min(_POLL_S, remaining))
            if done:
                break
            if await request.is_disconnected():
                job.cancel("disconnected")
                server.metrics.jobs.labels("dropped_disconnect").inc()
                log.info("client of request %s went away; job dropped", request.scope["state"].get("request_id"))
                raise APIError(499, "Client closed the request", code="client_closed", type="client_closed")
    except asyncio.CancelledError:
        job.cancel("cancelled")
        raise
    exc = future.exception() if not future.cancelled() else Aborted("cancelled")
    if exc is None:
        return future.result()
    raise job_error(exc, request.scope["state"].get("request_id"))


def job_error(exc: BaseException, request_id: str | None) -> APIError:
    """The APIError for a job that ended with `exc` (shared with the streaming responses)."""
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if isinstance(exc, EngineClosed):
        return _unavailable(str(exc))
    if isinstance(exc, Aborted):
        return APIError(504, "The request was cancelled before it finished", code="timeout")
    if isinstance(exc, OutOfMemory):  # the worker freed its caches and carries on: worth a retry
        return APIError(503, "The server ran out of memory on this request; retry later, or ask for fewer images "
                             "(n) or a smaller size", code="out_of_memory", headers={"Retry-After": "10"})
    log.error("request %s failed in the pipeline: %r", request_id, exc)
    return APIError(500, f"The pipeline failed: {type(exc).__name__}", code="pipeline_error")


def _unavailable(reason: str) -> APIError:
    return APIError(503, f"Service unavailable: {reason}", code="not_ready", headers={"Retry-After": "5"})


def _retry_after(server: Server) -> int:
    """A rough wait: the queued images times a second each, at least 1 s (clients back off from there)."""
    stats = server.engine.stats()
    return max(1, min(60, stats["queued_images"] + stats["running_images"]))
