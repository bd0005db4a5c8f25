"""`step1x-edit serve`: settings from the environment, CLI flags on top, then uvicorn.

Every setting is a flag (`cli_args.py` derives them from `settings.py`); flags default to None so that only flags
actually given override `STEP1X_*` variables. API keys have no flag on purpose: a key on the command line is visible
to every user of the machine (`ps`); use STEP1X_API_KEYS or --api-keys-file.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys

from pydantic import ValidationError

from .. import MODEL_ID
from ..cli_args import add_settings_arguments, settings_from_args


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)


class _RedactLinkSignatures(logging.Filter):
    """uvicorn's access log prints the full path; a file link's `sig=` would make the log a list of valid links."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            path = re.sub(r"([?&]sig=)[^&\s]+", r"\1[redacted]", record.args[2])
            record.args = (*record.args[:2], path, *record.args[3:])
        return True


# After the engine's drain (api/shutdown.py), how long uvicorn waits for the answers to be written: output encoding
# and storage of jobs that finished at the end of the drain, 503s and `error` events to slow readers. uvicorn's
# timer starts only once the drain is over, so a stop takes at most shutdown_timeout_s + this.
ANSWER_GRACE_S = 30.0


def uvicorn_options(settings) -> dict:  # noqa: ANN001 - Settings
    """The `uvicorn.Config` arguments `serve` runs with; the tests start their servers with the same (and the same
    server class, `shutdown.DrainingServer`)."""
    from .httpserver import uvicorn_http_options

    return dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=ANSWER_GRACE_S, proxy_headers=True, **uvicorn_http_options(settings))


def run_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"step1x-edit serve: invalid setting: {exc}", file=sys.stderr)
        return 2
    if settings.cfg_parallel * settings.ulysses_degree * settings.ring_degree > 1:
        from ..pipeline.parallel import startup_problems  # imports torch: only with several ranks

        bad = startup_problems(settings)
        if bad:
            print("step1x-edit serve: " + "\n  ".join(["impossible parallel settings:", *bad]), file=sys.stderr)
            return 2
    import uvicorn

    from .app import create_app
    from .shutdown import DrainingServer

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(settings.log_level.upper())  # also when the caller configured logging first
    try:
        app = create_app(settings)
    except (OSError, ValueError) as exc:  # unreadable keys file, storage directory, ...
        print(f"step1x-edit serve: {exc}", file=sys.stderr)
        return 2
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    from ..models.layouts import resolve_preset

    print(f"step1x-edit: serving {MODEL_ID} ({resolve_preset(settings)} preset) on http://{host}:{settings.port}/v1"
          f"  (health /health, readiness /ready, metrics /metrics)", flush=True)
    # a wildcard address is where the server listens, not where a browser goes: show this machine's loopback
    browse = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(settings.host, host)
    print(f"  playground  http://{browse}:{settings.port}/\n  API docs    http://{browse}:{settings.port}/docs",
          flush=True)
    logging.getLogger("uvicorn.access").addFilter(_RedactLinkSignatures())
    config = uvicorn.Config(app, **uvicorn_options(settings))
    server = DrainingServer(config)  # SIGTERM: the engine drains (503 for what is left) before connections close
    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal with the handlers it found installed. These
    # handlers make that re-raise a no-op, so a graceful stop exits with status 0 instead of "killed by signal".
    # (Before uvicorn installs its own, they ask for the same graceful stop.)
    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    # Several ranks: when one dies the engine fails its jobs (503) and the server stops, so that every rank exits
    # together (status 1, for a supervisor to restart the group).
    engine = app.state.server.engine
    engine.add_lost_listener(lambda reason: setattr(server, "should_exit", True))
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if engine.lost_reason is not None:
        print(f"step1x-edit serve: stopped: {engine.lost_reason}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)  # a rank may still sit in a collective that only its timeout would end: do not wait for it
    return 0 if server.started else 1
