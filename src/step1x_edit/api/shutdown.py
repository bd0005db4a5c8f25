"""A graceful stop in the right order: stop taking connections, drain the engine, answer everyone, then close.

uvicorn's own shutdown (SIGTERM, SIGINT) waits for open connections for up to `timeout_graceful_shutdown`, cancels
the handlers still running, and only then runs the app's lifespan shutdown — where the engine used to drain. With
more queued work than that wait, every request still waiting got uvicorn's plain-text 500 and streams were cut
without an `error` event, before the engine had even stopped admitting work.

`DrainingServer` runs the app's drain first (`app.state.drain`, set by `create_app`): the listening sockets close
and idle keep-alive connections are closed (busy ones close after their answer), the engine stops admission,
finishes what it can within `shutdown_timeout_s` and fails the rest with `EngineClosed`, so each admitted request
ends in its result or an OpenAI-shaped 503 (a stream: an `error` event). Only then does uvicorn's own shutdown
run, whose wait (`timeout_graceful_shutdown`, see `cli_serve.uvicorn_options`) now only covers writing those
answers. A second signal (uvicorn's force exit) stops waiting for the drain.

This subclasses uvicorn's `Server` because uvicorn has no hook between "stop accepting" and "wait for
connections"; the steps it repeats afterwards (closing listeners, shutting connections down) are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

log = logging.getLogger("step1x_edit.api")


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` whose shutdown drains the app (`drain`, default `app.state.drain`) before closing
    connections."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[Any]] | None = None) -> None:
        super().__init__(config)
        state = getattr(config.app, "state", None)
        self._drain = drain or getattr(state, "drain", None)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._drain is not None:
            for server in self.servers:  # no new connections
                server.close()
            for connection in list(self.server_state.connections):  # idle keep-alive: closed; busy: after the answer
                connection.shutdown()
            drain = asyncio.ensure_future(self._drain())
            while not drain.done() and not self.force_exit:
                await asyncio.wait({drain}, timeout=0.1)
            if drain.done() and not drain.cancelled() and drain.exception() is not None:
                log.error("draining the engine failed: %r", drain.exception())
            elif not drain.done():
                log.warning("forced exit: not waiting for the drain")
                drain.cancel()
        await super().shutdown(sockets)
