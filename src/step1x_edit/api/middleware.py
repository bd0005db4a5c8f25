"""The outermost layer of every request: request id, auth, body-size limit, crash guard, request metrics.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware) so the handler still sees the real `receive` —
which disconnect detection depends on — and so authentication runs before any body byte is read: a client
without a key cannot make the server buffer 32 MiB.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine.metrics import Metrics
from ..engine.replica import HEADER as REPLICA_HEADER
from ..engine.replica import header_value, process_replica_id
from .auth import KeyChecker
from .errors import APIError, error_response

log = logging.getLogger("step1x_edit.api")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Paths that need a key (when keys are configured): the API itself, and /metrics (queue depth, traffic by route:
# not for everyone; Prometheus sends the same Bearer key, or STEP1X_METRICS_OPEN=1 leaves it open). Signed file
# links are capabilities of their own (like the hosted service's links); health and readiness are for probes.
_PROTECTED = ("/v1/",)
_UNPROTECTED = ("/v1/files/",)
METRICS_PATH = "/metrics"


def needs_key(path: str, *, metrics_open: bool = False) -> bool:
    if path == METRICS_PATH:
        return not metrics_open
    return path.startswith(_PROTECTED) and not path.startswith(_UNPROTECTED)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, keys: KeyChecker, max_body_bytes: int, metrics: Metrics,
                 body_timeout_s: float | None = None, metrics_open: bool = False,
                 replica_id: str | None = None) -> None:
        self.app = app
        self.replica_id = replica_id or process_replica_id()  # x-step1x-replica unless a handler names another
        self.metrics_open = metrics_open
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _CLIENT_ID.match(incoming) else f"req_{uuid.uuid4().hex}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.monotonic()
        status = {"code": 500, "sent": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message.setdefault("headers", [])
                replica = header_value(state.get("replica") or self.replica_id)  # the handler's job's replica
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("ascii")),
                                      (REPLICA_HEADER.encode("ascii"), replica.encode("ascii"))]
            await send(message)

        try:
            refusal = self._refuse(scope, headers, request_id)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
                return
            await self.app(scope, self._limited(receive), send_with_id)
        except Exception:  # noqa: BLE001 - anything that escaped the app's own handlers
            log.exception("unhandled error in request %s", request_id)
            if not status["sent"]:
                await error_response(500, "Internal server error", request_id)(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope.get("method", ""), label, str(status["code"])).inc()
            self.metrics.observe_stage("request", time.monotonic() - started)

    def _refuse(self, scope: Scope, headers: Headers, request_id: str):  # noqa: ANN202 - a Response or None
        if needs_key(scope.get("path", ""), metrics_open=self.metrics_open):
            reason = self.keys.check(headers.get("authorization"))
            if reason is not None:
                return error_response(401, reason, request_id, headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get("content-length")
        if declared and declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
            return error_response(413, f"Request body is too large: at most {self.max_body_bytes} bytes",
                                  request_id, code="payload_too_large")
        return None

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that counts body bytes (chunked uploads have no Content-Length) and stops at the limit, and
        that gives the body `body_timeout_s` to arrive in full (408). Once the body is complete, `receive` only
        reports a disconnect, and is left alone."""
        seen = 0
        limit = self.max_body_bytes
        deadline = None if self.body_timeout_s is None else time.monotonic() + self.body_timeout_s
        complete = False

        async def counted() -> Message:
            nonlocal seen, complete
            if complete or deadline is None:
                message = await receive()
            else:
                with anyio.move_on_after(max(0.0, deadline - time.monotonic())) as scope:
                    message = await receive()
                if scope.cancelled_caught:
                    raise APIError(408, f"The request body did not arrive within {self.body_timeout_s:g} s",
                                   code="body_timeout")
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise APIError(413, f"Request body is too large: at most {limit} bytes", code="payload_too_large")
                if not message.get("more_body", False):
                    complete = True
            else:
                complete = True  # http.disconnect: nothing more will come
            return message

        return counted
