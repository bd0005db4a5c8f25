"""Limits on request heads (request line + headers) that hold whichever HTTP/1.1 parser uvicorn runs.

uvicorn bounds neither the size nor the time of a request's head with httptools (its choice when installed, as
here): a single 16-96 MB header was read in full — httptools joins the chunks of a header value on the event
loop, so every other request stalled for seconds — and a client trickling its headers could hold a connection
forever. With h11 the size is bounded (`h11_max_incomplete_event_size`) but not the time. The protocol classes
here add both limits to either parser, before the app sees anything:

- at most `max_header_bytes` bytes from a request's first byte to the end of its headers, else 431;
- at most `header_timeout_s` seconds for the same (counted from the connection's opening for its first request,
  from the first byte for later ones), else 408 — or a silent close when nothing was sent at all.

The refusal is an OpenAI error body with `Connection: close`. The connection then half-closes and drops what the
client is still sending for a moment (a lingering close), so a client that writes its whole request before reading
gets the answer instead of a connection reset.

`uvicorn_http_options(settings)` gives the `uvicorn.Config` arguments; `cli_serve.uvicorn_options` (what `serve`
runs) and the tests' servers use them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

log = logging.getLogger("step1x_edit.api")

LINGER_S = 2.0  # after a refusal: how long to drop what the client still sends before closing
_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


class _HeadLimits:
    """Mixed into uvicorn's H11Protocol / HttpToolsProtocol (before them in the MRO). Subclasses say when the
    parser is inside a request head (`_in_head`)."""

    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0

    # --- what the parser-specific subclasses provide ---------------------------------------------------------------
    def _in_head(self) -> bool:
        raise NotImplementedError

    # --- asyncio.Protocol ------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_active = False
        self._got_bytes = False
        self._lingering: asyncio.TimerHandle | None = None
        super().connection_made(transport)  # type: ignore[misc]
        self._start_head()  # the first request's head is timed from the connection's opening

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head()
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            return  # refused: dropped until the close
        self._got_bytes = True
        if not self._in_head():  # a body, or a pipelined request waiting for the previous answer
            self._stop_head()
            super().data_received(data)  # type: ignore[misc]
            return
        if not self._head_active:  # the first bytes of a later request on this connection
            self._start_head()
        room = self.max_header_bytes - self._head_bytes
        piece = data if len(data) <= room else data[:room]
        self._head_bytes += len(piece)
        cycle = self.cycle  # type: ignore[attr-defined]
        super().data_received(piece)  # type: ignore[misc]
        if self.transport.is_closing():  # type: ignore[attr-defined]
            return
        if self.cycle is not cycle or not self._in_head():  # type: ignore[attr-defined]
            self._stop_head()  # the head ended within `piece`
            if len(piece) < len(data):
                self.data_received(data[len(piece):])
        elif len(piece) < len(data):
            self._refuse(431, f"Request headers are too large: at most {self.max_header_bytes} bytes "
                              "for the request line and headers", "headers_too_large")

    # --- the limits ------------------------------------------------------------------------------------------------
    def _start_head(self) -> None:
        self._stop_head()
        self._head_active, self._head_bytes = True, 0
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)  # type: ignore[attr-defined]

    def _stop_head(self) -> None:
        self._head_active = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _busy(self) -> bool:
        cycle = self.cycle  # type: ignore[attr-defined]
        return cycle is not None and not cycle.response_complete

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():  # type: ignore[attr-defined]
            return
        if self._busy():  # an answer is still being produced: the connection is not idle; look again later
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)  # type: ignore[attr-defined]
            return
        if not self._got_bytes:  # a connection that never sent anything gets no answer, just a close
            self.transport.close()  # type: ignore[attr-defined]
            return
        self._refuse(408, f"The request headers did not arrive within {self.header_timeout_s:g} s",
                     "header_timeout")

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._stop_head()
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        client = getattr(self, "client", None)
        log.warning("refused a request from %s: %s (%d)", "%s:%d" % client if client else "?", message, status)
        if self._busy():  # the answer to an earlier pipelined request is being written: just hang up
            transport.close()
            return
        request_id = f"req_{uuid.uuid4().hex}"
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": request_id,
                                     "code": code}}).encode()
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\nx-request-id: {request_id}\r\n\r\n")
        transport.write(head.encode("ascii") + body)
        if transport.can_write_eof():
            transport.write_eof()  # the answer and a FIN; what the client still sends is read and dropped
            self._lingering = self.loop.call_later(LINGER_S, transport.close)  # type: ignore[attr-defined]
        else:
            transport.close()


def _h11_class() -> type[asyncio.Protocol]:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11WithHeadLimits(_HeadLimits, H11Protocol):
        def _in_head(self) -> bool:
            return self.conn.their_state is h11.IDLE

    return H11WithHeadLimits


def _httptools_class() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpToolsWithHeadLimits(_HeadLimits, HttpToolsProtocol):
        _head_open = True  # the parser is before the end of a request's headers

        def _in_head(self) -> bool:
            return self._head_open

        def on_headers_complete(self) -> None:
            self._head_open = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._head_open = True

    return HttpToolsWithHeadLimits


def protocol_class(settings: Any, implementation: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol (`auto`: httptools when installed, else h11, as uvicorn picks) with the
    settings' head limits."""
    if implementation == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:
            implementation = "h11"
        else:
            implementation = "httptools"
    base = {"h11": _h11_class, "httptools": _httptools_class}[implementation]()
    return type(base.__name__, (base,), {"max_header_bytes": settings.max_header_bytes,
                                         "header_timeout_s": settings.header_timeout_s})


def uvicorn_http_options(settings: Any, implementation: str = "auto") -> dict[str, Any]:
    """The `uvicorn.Config` arguments that bound request heads (h11's own bound set to the same size)."""
    return {"http": protocol_class(settings, implementation),
            "h11_max_incomplete_event_size": settings.max_header_bytes}
