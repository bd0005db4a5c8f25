"""The FastAPI app: routes of the hosted API plus operations endpoints, wired to one engine and one store.

`create_app(settings)` is all a caller needs (`cli_serve.py`, tests). The pipeline is built on the worker thread
after start-up, so `/health` answers at once and `/ready` turns 200 when the weights are loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import MODEL_ID, __version__
from ..engine.metrics import Metrics
from ..engine.worker import Engine, PipelineLike
from ..models.layouts import resolve_preset
from ..settings import Settings
from ..storage import ImageStore, StorageError, open_store
from .auth import KeyChecker, load_keys
from .errors import APIError, ErrorResponse, bad_request, install_error_handlers
from .forms import IMAGE_FIELDS, read_form, reject_duplicate_json_keys, text_fields
from .images import ImageLimits, ImageRef, parse_image_field
from .links import LinkFetcher, Resolver, system_resolver
from .middleware import RequestContextMiddleware
from .protocol import (EditFormParams, GenerationRequest, ImagesResponse, ModelCard, ModelList, edit_form_openapi,
                      form_lists, form_to_fields, validate_model)
from .service import Server, check_model, run_edit
from .playground import add_playground
from .streaming import add_stream_docs, stream_edit

log = logging.getLogger("step1x_edit.api")

_ERR = {"model": ErrorResponse}
IMAGE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_ERR, "description": "Invalid request (the message names the field)"},
    401: {**_ERR, "description": "Missing or invalid API key"},
    404: {**_ERR, "description": "Unknown model"},
    413: {**_ERR, "description": "Body or image too large"},
    429: {**_ERR, "description": "Queue full (see Retry-After)"},
    500: {**_ERR, "description": "Internal error"},
    503: {**_ERR, "description": "Not ready or shutting down"},
    504: {**_ERR, "description": "Timed out"},
    507: {**_ERR, "description": "No storage left for the output (response_format=url)"},
}


def _default_factory(settings: Settings) -> Callable[[], PipelineLike]:
    def build() -> PipelineLike:
        # torch is imported on the worker thread, not by the api; several ranks: the worker ranks start here
        from ..pipeline.parallel import build_any_pipeline

        return build_any_pipeline(settings)

    return build


def create_app(settings: Settings | None = None, *, pipeline_factory: Callable[[], PipelineLike] | None = None,
               resolver: Resolver | None = None, engine_factory: Callable[[Metrics], Engine] | None = None) -> FastAPI:
    """`engine_factory(metrics)`: an engine other than the local worker thread with the same interface (Ray Serve's
    ingress forwards jobs to its pipeline deployment: deploy/)."""
    settings = settings or Settings()
    metrics = Metrics()
    keys = KeyChecker(load_keys(settings))
    if engine_factory is not None:
        engine = engine_factory(metrics)
    else:
        engine = Engine(pipeline_factory or _default_factory(settings), queue_depth=settings.queue_depth,
                        batch_max_images=settings.batch_max_images, batch_wait_s=settings.batch_wait_ms / 1000,
                        metrics=metrics)
    store = open_store(settings)
    limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    fetcher = LinkFetcher(max_bytes=settings.max_image_bytes, timeout_s=settings.image_fetch_timeout_s,
                          max_redirects=settings.image_fetch_max_redirects,
                          allow_private=settings.allow_private_image_urls, resolver=resolver or system_resolver)
    server = Server(settings=settings, engine=engine, store=store, fetcher=fetcher, limits=limits, metrics=metrics,
                    started_at=int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if keys.open:
            log.warning("no API key configured (STEP1X_API_KEYS / STEP1X_API_KEYS_FILE): the API is open to anyone "
                        "who can reach it")
        if resolve_preset(settings) == "dev":
            log.warning("DEV PRESET: tiny random weights, every output image is noise")  # (the hint: pipeline)
        engine.start()
        janitor = asyncio.create_task(_janitor(store, settings.janitor_interval_s))
        try:
            yield
        finally:
            janitor.cancel()
            await drain()  # at once when `serve` (api/shutdown.DrainingServer) already drained on SIGTERM

    async def drain() -> bool:
        """Stop admission, let the engine finish admitted work for up to `shutdown_timeout_s`, answer the rest with
        503 (api/shutdown.py runs this before uvicorn closes connections). The engine's shutdown blocks, so it runs
        on a daemon thread: a forced exit (a second signal) must not wait for it, as it would for a pool thread."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()

        def run() -> None:
            try:
                result: bool | BaseException = engine.shutdown(settings.shutdown_timeout_s)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                result = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone (forced exit): nobody waits any more
                loop.call_soon_threadsafe(_resolve, done, result)

        threading.Thread(target=run, name="step1x-drain", daemon=True).start()
        return await done

    app = FastAPI(title="Step1X-Edit server", version=__version__, lifespan=lifespan,
                  description=f"OpenAI-compatible image editing with {MODEL_ID}. See the schemas for the fields "
                              "that are ignored.")
    app.state.server = server
    app.state.drain = drain
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, keys=keys, max_body_bytes=settings.max_body_bytes, metrics=metrics,
                       body_timeout_s=settings.body_timeout_s, metrics_open=settings.metrics_open,
                       replica_id=engine.replica_id)
    _add_routes(app, server)
    add_playground(app)
    _fix_openapi(app)
    return app


def _add_routes(app: FastAPI, server: Server) -> None:
    settings = server.settings

    @app.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
              responses=IMAGE_ERRORS, summary="Edit an image (the hosted API's JSON form)",
              dependencies=[Depends(reject_duplicate_json_keys)])
    async def generations(body: GenerationRequest, request: Request) -> Any:
        check_model(body.model)
        ref = await anyio.to_thread.run_sync(parse_image_field, body.image, server.limits)
        if body.stream:
            return await stream_edit(server, request, body, ref, "image_generation")
        return await run_edit(server, request, body, ref)

    @app.post("/v1/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
              responses=IMAGE_ERRORS, openapi_extra=edit_form_openapi(),
              summary="Edit an image (multipart, as client.images.edit sends it)")
    async def edits(request: Request) -> Any:
        ctype = request.headers.get("content-type", "").lower()
        if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise bad_request("This endpoint takes multipart/form-data (fields 'image' and 'prompt')",
                              code="invalid_content_type")
        form = await read_form(request, max_files=8, max_fields=200, max_part_size=settings.max_body_bytes)
        try:
            items = list(form.multi_items())
            files = [v for k, v in items if k in IMAGE_FIELDS and not isinstance(v, str)]
            texts = text_fields(items, EditFormParams.model_fields)
            image_texts = [t for t in (texts.pop(k, None) for k in IMAGE_FIELDS) if t]
            image_text = image_texts[0] if image_texts else None
            fields = form_to_fields(texts)
            for name, value in form_lists(items).items():  # `loras[][name]`, as the openai SDK sends extra_body
                if name in fields:
                    raise bad_request(f"Field '{name}' was sent both as JSON text and as {name}[][...] fields: "
                                      "send it once", code="duplicate_field")
                fields[name] = value
            params = validate_model(EditFormParams, fields)
            check_model(params.model)
            if len(files) + len(image_texts) > 1:
                raise bad_request("'image': exactly one input image is supported, got "
                                  f"{len(files) + len(image_texts)}")
            if files:
                upload = files[0]
                if upload.size is not None and upload.size > settings.max_image_bytes:
                    raise APIError(413, f"'image' is too large: at most {settings.max_image_bytes} bytes",
                                   code="image_too_large")
                ref = ImageRef(data=await upload.read())
            elif image_text:
                ref = await anyio.to_thread.run_sync(parse_image_field, image_text, server.limits)
            else:
                raise bad_request("Missing required field 'image'", code="missing_required_parameter")
        finally:
            await form.close()
        if params.stream:
            return await stream_edit(server, request, params, ref, "image_edit")
        return await run_edit(server, request, params, ref)

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERR}, summary="The served model")
    async def models() -> Any:
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={401: _ERR, 404: _ERR})
    async def model(model_id: str) -> Any:
        check_model(model_id)
        return _model_card(server)

    @app.get("/v1/files/images/{name}", response_class=StreamingResponse, responses={
        200: {"content": {m: {"schema": {"type": "string", "format": "binary"}}
                          for m in ("image/png", "image/jpeg", "image/webp")}, "description": "The image"},
        404: {**_ERR, "description": "Unknown, tampered or expired link"},
        503: {**_ERR, "description": "The output store cannot be reached"}}, summary="A stored output (signed link)")
    async def image_file(name: str, expires: str | None = None, sig: str | None = None) -> Any:
        try:
            blob = await anyio.to_thread.run_sync(server.store.open, name, expires, sig)
        except StorageError as exc:
            log.error("reading output %s failed: %r", name[:64], exc)
            raise APIError(503, "The output store cannot be reached; retry later", code="storage_unavailable",
                           headers={"Retry-After": "10"}) from None
        if blob is None:
            raise APIError(404, "Image not found: the link is invalid or has expired", code="not_found")
        remaining = max(0, int(expires or 0) - int(time.time()))
        headers = {"Cache-Control": f"private, max-age={remaining}"}
        if blob.size is not None:
            headers["Content-Length"] = str(blob.size)
        return StreamingResponse(blob.chunks, media_type=blob.media_type, headers=headers)

    @app.get("/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses={503: _ERR}, summary="Readiness: weights loaded and worker alive")
    async def ready() -> Any:
        if not server.engine.ready:
            raise APIError(503, f"Not ready: {server.engine.not_ready_reason()}", code="not_ready",
                           headers={"Retry-After": "5"})
        return {"status": "ready", "model": MODEL_ID, **server.engine.info}

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics (the API key, when keys are set)",
             openapi_extra=None if settings.metrics_open else {"security": [{"bearer": []}]},
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Metrics"},
                        401: {**_ERR, "description": "Missing or invalid API key (STEP1X_METRICS_OPEN=1: none needed)"}})
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _resolve(future: asyncio.Future, result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _model_card(server: Server) -> dict[str, Any]:
    info = server.engine.info
    settings = server.settings
    preset = info.get("preset") or resolve_preset(settings)
    version = info.get("version") or (None if settings.version == "auto" else settings.version)
    return {"id": MODEL_ID, "object": "model", "created": server.started_at, "owned_by": "stepfun-ai",
            "version": version, "preset": preset, "dev_preset": preset == "dev", "ready": server.engine.ready,
            "device": info.get("device"), "dtype": info.get("dtype"), "loras": info.get("loras", [])}


async def _janitor(store: ImageStore, interval_s: float) -> None:
    """Delete expired outputs now and every `interval_s`; a failure is logged and retried next round."""
    while True:
        try:
            await anyio.to_thread.run_sync(store.expire)
        except Exception:  # noqa: BLE001
            log.exception("janitor failed")
        await asyncio.sleep(interval_s)


def _fix_openapi(app: FastAPI) -> None:
    """Validation errors are 400 with the error body here, not FastAPI's 422: say so in the schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path_item in schema.get("paths", {}).values():
            for op in path_item.values():
                responses = op.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    responses["400"] = {"description": "Invalid request",
                                        "content": {"application/json": {"schema": {
                                            "$ref": "#/components/schemas/ErrorResponse"}}}}
        comps = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            comps.pop(name, None)
        # FastAPI passes schemas through float-typed bounds (2^63-1 would become 2^63): use pydantic's own.
        comps["GenerationRequest"] = GenerationRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(comps["GenerationRequest"].pop("$defs", {}))  # (the item schemas it refers to: LoraRef)
        schema["paths"]["/v1/images/edits"]["post"]["requestBody"] = edit_form_openapi()["requestBody"]
        add_stream_docs(schema)
        _integral_bounds(schema)
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer"}
        for path, path_item in schema.get("paths", {}).items():
            if path.startswith("/v1/") and not path.startswith("/v1/files/"):
                for op in path_item.values():
                    op["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _integral_bounds(node: Any) -> None:
    """`maximum: 4.0` -> `4` (exact while below 2^53), so integer fields keep integer bounds."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "default") and \
                    isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                node[key] = int(value)
            else:
                _integral_bounds(value)
    elif isinstance(node, list):
        for item in node:
            _integral_bounds(item)


__all__ = ["create_app"]
