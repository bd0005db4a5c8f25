"""`stream: true` on both image endpoints: OpenAI's image events as server-sent events (`text/event-stream`).

What a stream carries, in order (each event is `event: <type>` plus one `data:` line of JSON with the same `type`):

- `<prefix>.progress` (only with `stream_progress: true`, this server's extension): `step` 0 when the job leaves
  the queue, then one per denoising step, with `total_steps`.
- `<prefix>.partial_image` (`partial_images` > 0): a preview of the current prediction of the clean image, for each
  of the `n` images (`image_index`), at up to `partial_images` evenly spaced steps; `partial_image_index` counts the
  preview steps from 0. A run with few steps may send fewer previews (OpenAI's API does the same).
- `<prefix>.completed`: one per image, in order, each with its `seed` and `image_index` (extra fields) and the
  whole request's `usage` (the same object on each; count it once).

`<prefix>` is `image_generation` on /v1/images/generations and `image_edit` on /v1/images/edits (the `type` values of
the `openai` SDK's `ImageGenStreamEvent` / `ImageEditStreamEvent`). Images are always `b64_json` (at the input's
size, in the request's `output_format` and `output_compression`, previews included, and in the server's b64
style); `output_format` in each event names that format; `response_format` does not apply to streams. Fields
OpenAI's events require and that mean nothing here are constants: `quality` "auto", `background` "opaque".

Everything that can be refused is refused before the stream starts, as the usual JSON error with its status (400,
401, 404, 413, 429, 503). A failure after that (pipeline error, timeout, shutdown) is an `error` event whose data
is `{"type": "error", "error": {message, type, param, code}}` (the error body); the `openai` SDK raises
`openai.APIError` with that message. No `[DONE]` line: the stream ends after the last `.completed` (or the error).
Comment lines (`: keep-alive`) are sent while a job waits, so proxies keep the connection. A client that goes away
mid-stream has its job dropped from the queue, or stopped between steps when its whole batch is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import anyio
from fastapi import Request
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engine.worker import Aborted
from ..pipeline.types import Preview, Progress, Started
from .errors import APIError, ErrorDetail, error_body, request_id_of
from .images import ImageRef, OutputFormat
from .protocol import EditParams
from .service import Server, client_gone, encode_b64, job_error, note_replica, submit_edit, timed_out, usage_of

log = logging.getLogger("step1x_edit.api")

KEEPALIVE_S = 10.0  # a comment line this often while nothing else is sent
_DONE = object()


# --- the events (for the OpenAPI document; the generator below writes the same fields) -----------------------------
class _StreamUsageDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class StreamUsage(BaseModel):
    input_tokens: int
    input_tokens_details: _StreamUsageDetails
    output_tokens: int
    total_tokens: int


class _ImageEventBase(BaseModel):
    b64_json: str = Field(description="The image in base64 (in `output_format`) at the input image's size")
    created_at: int = Field(description="Unix time (s) the event was made")
    size: str = Field(description="WIDTHxHEIGHT of the image")
    quality: Literal["auto"] = "auto"
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat = Field(description="The request's output_format: the format of `b64_json`")
    image_index: int = Field(description="Which of the request's `n` images (0-based)")


class PartialImageEvent(_ImageEventBase):
    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    partial_image_index: int = Field(description="0-based index of the preview step")
    step: int = Field(description="The denoising step after which the preview was taken")
    total_steps: int


class CompletedEvent(_ImageEventBase):
    type: Literal["image_generation.completed", "image_edit.completed"]
    seed: int = Field(description="The seed this image used")
    usage: StreamUsage = Field(description="The whole request's usage (the same on every completed event)")


class ProgressEvent(BaseModel):
    type: Literal["image_generation.progress", "image_edit.progress"]
    step: int = Field(description="Denoising steps done (0: the job has started)")
    total_steps: int
    created_at: int


class StreamErrorEvent(BaseModel):
    type: Literal["error"]
    error: ErrorDetail


_EVENT_MODELS = (PartialImageEvent, CompletedEvent, ProgressEvent, StreamErrorEvent)


def add_stream_docs(schema: dict[str, Any]) -> None:
    """Document the `text/event-stream` answer of both image endpoints in an OpenAPI document (in place)."""
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in _EVENT_MODELS:
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in doc.pop("$defs", {}).items():
            comps.setdefault(name, sub)
        comps[model.__name__] = doc
    for path in ("/v1/images/generations", "/v1/images/edits"):
        ok = schema.get("paths", {}).get(path, {}).get("post", {}).get("responses", {}).get("200")
        if ok is None:
            continue
        ok["description"] = "The images (JSON), or with `stream: true` server-sent events"
        ok.setdefault("content", {})["text/event-stream"] = {
            "schema": {"type": "string", "description":
                       "With `stream: true`: `event: <type>` / `data: <JSON>` pairs; each `data` is one of "
                       "PartialImageEvent, ProgressEvent (with `stream_progress`), CompletedEvent (one per image) or "
                       "StreamErrorEvent"},
            # OpenAPI 3.2's `itemSchema` (the schema of each event's data); an extension field in this 3.1 document
            "x-itemSchema": {"oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in _EVENT_MODELS]},
        }


# --- the response ------------------------------------------------------------------------------------------------
def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends: finished, failed, or cancelled because the client
    disconnected (Starlette cancels the body iterator then, possibly while it is suspended at a `yield`)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def stream_edit(server: Server, request: Request, params: EditParams, image: ImageRef,
                      prefix: Literal["image_generation", "image_edit"]) -> EventStreamResponse:
    """Submit the job (errors raise here, before any byte), then answer with its events as they come."""
    deadline = time.monotonic() + server.settings.request_timeout_s
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:  # any thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    job = await submit_edit(server, params, image, listener=put)
    note_replica(request, job)  # known at admission (a Ray request still queued for a replica: the ingress's id)
    # Runs in the thread that settles the future, after that thread's last progress event: _DONE comes last.
    job.future.add_done_callback(lambda _f: put(_DONE))
    request_id = request_id_of(request)
    state = {"finished": False}

    def on_close() -> None:
        if not (state["finished"] or job.future.done()):
            client_gone(server, job, request_id)

    def progress(step: int, total: int) -> bytes:
        kind = f"{prefix}.progress"
        return sse(kind, {"type": kind, "step": step, "total_steps": total, "created_at": int(time.time())})

    async def events() -> AsyncIterator[bytes]:
        yield b": accepted\n\n"
        partial_index = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state["finished"] = True
                yield _error(timed_out(server, job), request_id)
                return
            try:
                item = await asyncio.wait_for(queue.get(), min(remaining, KEEPALIVE_S))
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if item is _DONE:
                break
            if isinstance(item, Started) and params.stream_progress:
                yield progress(0, params.expected_steps())
            elif isinstance(item, Progress) and params.stream_progress:
                yield progress(item.step, item.total)
            elif isinstance(item, Preview):
                encoded = await anyio.to_thread.run_sync(encode_b64, server, params, item.images)
                kind = f"{prefix}.partial_image"
                for i, (b64, img) in enumerate(zip(encoded, item.images, strict=True)):
                    yield sse(kind, {"type": kind, **_image_fields(b64, img.size, params),
                                     "partial_image_index": partial_index,
                                     "image_index": i, "step": item.step, "total_steps": item.total})
                partial_index += 1

        future = job.future
        exc = future.exception() if not future.cancelled() else None
        if future.cancelled() or exc is not None:
            state["finished"] = True
            yield _error(job_error(exc or Aborted("cancelled"), request_id), request_id)
            return
        result = future.result()
        t0 = time.monotonic()
        encoded = await anyio.to_thread.run_sync(encode_b64, server, params, result.images)
        server.metrics.observe_stage("output", time.monotonic() - t0)
        usage = usage_of(result)
        kind = f"{prefix}.completed"
        for i, (b64, img, seed) in enumerate(zip(encoded, result.images, result.seeds, strict=True)):
            if i == len(encoded) - 1:
                state["finished"] = True
            yield sse(kind, {"type": kind, **_image_fields(b64, img.size, params), "image_index": i, "seed": seed,
                             "usage": usage})

    return EventStreamResponse(events(), on_close)


def _image_fields(b64: str, size: tuple[int, int], params: EditParams) -> dict[str, Any]:
    return {"b64_json": b64, "created_at": int(time.time()), "size": f"{size[0]}x{size[1]}", "quality": "auto",
            "background": "opaque", "output_format": params.output_format}


def _error(err: APIError, request_id: str | None) -> bytes:
    body = error_body(err.status, err.message, request_id, code=err.code, type=err.type)
    return sse("error", {"type": "error", **body})
