"""`step1x-edit serve`: settings from the environment, CLI flags on top, then uvicorn.

`cli.py` (the lead's) owns the command tree and calls `add_serve_arguments` / `run_serve`. Flags default to None
so that only flags actually given override `STEP1X_*` variables. API keys have no flag on purpose: a key on the
command line is visible to every user of the machine (`ps`); use STEP1X_API_KEYS or --api-keys-file.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from .. import MODEL_ID

# flag -> (settings field, type, help)
_FLAGS: list[tuple[str, str, type, str]] = [
    ("--host", "host", str, "interface to listen on (STEP1X_HOST, default 127.0.0.1)"),
    ("--port", "port", int, "port to listen on (STEP1X_PORT, default 8000)"),
    ("--preset", "preset", str, "auto | dev | full (dev = tiny random weights, outputs are noise)"),
    ("--dit-path", "dit_path", Path, "DiT checkpoint (.safetensors) or diffusers directory"),
    ("--vae-path", "vae_path", Path, "VAE checkpoint"),
    ("--encoder-path", "encoder_path", Path, "Qwen2.5-VL-7B-Instruct directory"),
    ("--model-dir", "model_dir", Path, "diffusers-style directory or a folder of official files (STEP1X_MODEL_DIR)"),
    ("--version", "version", str, "auto | v1.0 | v1.1"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--dtype", "dtype", str, "auto | float32 | bfloat16 | float16"),
    ("--size-level", "size_level", int, "working area ~ size_level^2 pixels (default: full 1024, dev 512)"),
    ("--queue-depth", "queue_depth", int, "jobs that may wait for the worker before 429 (default 16)"),
    ("--batch-max-images", "batch_max_images", int, "images per pipeline call, n included (default 4)"),
    ("--batch-wait-ms", "batch_wait_ms", float, "how long an idle worker waits for batch companions (default 10)"),
    ("--request-timeout", "request_timeout_s", float, "seconds before a request gives 504 (default 600)"),
    ("--storage-dir", "storage_dir", Path, "where url outputs are kept (default data/images)"),
    ("--url-expiry", "url_expiry_s", int, "seconds a url link stays valid (default 604800 = 7 days)"),
    ("--public-base-url", "public_base_url", str, "base URL put in links (default: the request's own)"),
    ("--b64-style", "b64_json_style", str, "plain | data_uri: the form of b64_json (default plain)"),
    ("--api-keys-file", "api_keys_file", Path, "file with one API key a line"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body (default 32 MiB)"),
    ("--body-timeout", "body_timeout_s", float, "seconds a request body may take to arrive before 408 (default 60)"),
    ("--max-image-bytes", "max_image_bytes", int, "largest input image file (default 20 MiB)"),
    ("--max-image-pixels", "max_image_pixels", int, "largest input image in pixels (default 4096*4096)"),
    ("--log-level", "log_level", str, "critical | error | warning | info | debug"),
]


_CHOICES = {"preset": ["auto", "dev", "full"], "version": ["auto", "v1.0", "v1.1"],
            "dtype": ["auto", "float32", "bfloat16", "float16"], "b64_json_style": ["plain", "data_uri"],
            "log_level": ["critical", "error", "warning", "info", "debug"]}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, field, kind, help_text in _FLAGS:
        parser.add_argument(flag, dest=f"serve_{field}", type=kind, default=None, help=help_text,
                            choices=_CHOICES.get(field), metavar=None if field in _CHOICES else
                            flag.removeprefix("--").replace("-", "_").upper())
    from ..models.fastpath import add_performance_arguments

    add_performance_arguments(parser, prefix="serve_")
    parser.add_argument("--dit-fp8", dest="serve_dit_fp8", action="store_const", const=True, default=None,
                        help="keep the DiT's linear weights in float8 (about half the memory; STEP1X_DIT_FP8)")
    parser.add_argument("--allow-private-image-urls", dest="serve_allow_private_image_urls", action="store_const",
                        const=True, default=None,
                        help="let image links point at loopback/private addresses (tests, trusted networks only)")


def settings_from_args(args: argparse.Namespace):  # noqa: ANN201 - Settings
    """Settings from the environment with the given flags on top (pydantic-settings: init kwargs win)."""
    from ..settings import Settings

    overrides = {field: getattr(args, f"serve_{field}") for _, field, _, _ in _FLAGS}
    overrides["allow_private_image_urls"] = getattr(args, "serve_allow_private_image_urls", None)
    overrides["dit_fp8"] = getattr(args, "serve_dit_fp8", None)
    from ..models.fastpath import performance_overrides

    overrides.update(performance_overrides(args, prefix="serve_"))
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


class _RedactLinkSignatures(logging.Filter):
    """uvicorn's access log prints the full path; a file link's `sig=` would make the log a list of valid links."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            path = re.sub(r"([?&]sig=)[^&\s]+", r"\1[redacted]", record.args[2])
            record.args = (*record.args[:2], path, *record.args[3:])
        return True


def uvicorn_options(settings) -> dict:  # noqa: ANN001 - Settings
    """The `uvicorn.Config` arguments `serve` runs with; the tests start their servers with the same."""
    from .httpserver import uvicorn_http_options

    return dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=settings.shutdown_timeout_s or None, proxy_headers=True,
                **uvicorn_http_options(settings))


def run_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"step1x-edit serve: invalid setting: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(settings.log_level.upper())  # also when the caller configured logging first
    try:
        app = create_app(settings)
    except (OSError, ValueError) as exc:  # unreadable keys file, storage directory, ...
        print(f"step1x-edit serve: {exc}", file=sys.stderr)
        return 2
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"step1x-edit: serving {MODEL_ID} ({settings.resolved_preset()} preset) on http://{host}:{settings.port}/v1"
          f"  (health /health, readiness /ready, metrics /metrics)", flush=True)
    # a wildcard address is where the server listens, not where a browser goes: show this machine's loopback
    browse = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(settings.host, host)
    print(f"  playground  http://{browse}:{settings.port}/\n  API docs    http://{browse}:{settings.port}/docs",
          flush=True)
    logging.getLogger("uvicorn.access").addFilter(_RedactLinkSignatures())
    config = uvicorn.Config(app, **uvicorn_options(settings))
    server = uvicorn.Server(config)
    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal with the handlers it found installed. These
    # handlers make that re-raise a no-op, so a graceful stop exits with status 0 instead of "killed by signal".
    # (Before uvicorn installs its own, they ask for the same graceful stop.)
    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1
