"""Helpers for the API tests: a real uvicorn server in a thread, a local image web server, small real images.

Everything listens on 127.0.0.1 only. The API server runs the real pipeline on the `dev` preset at size level
256 so an edit takes about a second on CPU.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI
from PIL import Image

SHARED = Path(os.environ.get("STEP1X_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
EXAMPLES = SHARED / "examples"
KEY = "sk-test-0123456789abcdef"


def client(server, key: str | None = KEY) -> OpenAI:
    """The official client against a test server: no retries (a test sees every answer), a long timeout (2 cores)."""
    return OpenAI(base_url=server.api, api_key=key or "unused", max_retries=0, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_image(size: tuple[int, int] = (64, 96)) -> Image.Image:
    """A real photo (shared/examples/0000.jpg) shrunk so that tests stay fast; a gradient if it is missing."""
    path = EXAMPLES / "0000.jpg"
    if path.is_file():
        with Image.open(path) as img:
            return img.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    return img


def png_bytes(img: Image.Image | None = None) -> bytes:
    buf = io.BytesIO()
    (img or example_image()).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes | None = None) -> str:
    return "data:image/png;base64," + base64.b64encode(data or png_bytes()).decode()


# --- the API server -------------------------------------------------------------------------------------------------
@dataclass
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    app: Any
    server: Any  # uvicorn.Server
    thread: threading.Thread
    key: str | None = None  # one of the configured API keys (None: the server is open)

    @property
    def api(self) -> str:
        return self.base_url + "/v1"

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent); sends the API key (/metrics needs it when keys are set)."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        resp = httpx.get(self.base_url + "/metrics", headers=headers, timeout=10)
        resp.raise_for_status()
        text = resp.text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            if head == name or (want and head == f"{name}{{{want}}}"):
                return float(value)
        return 0.0

    def stop(self, timeout: float = 60) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def is_ready(base_url: str, timeout: float = 2) -> bool:
    """`GET /ready` answers 200 (False while the server is not listening yet or still loading)."""
    try:
        return httpx.get(base_url + "/ready", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(check: Callable[[], bool], timeout: float = 60, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False


def start_server(settings: Any, *, pipeline_factory: Callable[[], Any] | None = None,
                 wait_ready: bool = True, timeout: float = 120, resolver: Any = None,
                 offline_links: bool = False, http: str = "auto") -> RunningServer:
    """`resolver`: a fake DNS for image links. `offline_links`: image links are refused before any lookup or
    connection (fuzzing sends random URLs; nothing may leave the machine). The uvicorn options and server class are
    `serve`'s own (`cli_serve.uvicorn_options`, `shutdown.DrainingServer`) but for the address and log level; `http`
    picks the HTTP parser (`auto`, as `serve`: httptools when installed; or `h11`, `httptools`)."""
    import uvicorn

    from step1x_edit.api.app import create_app
    from step1x_edit.api.cli_serve import uvicorn_options
    from step1x_edit.api.httpserver import uvicorn_http_options
    from step1x_edit.api.shutdown import DrainingServer

    port = free_port()
    app = create_app(settings, pipeline_factory=pipeline_factory, resolver=resolver)
    if offline_links:
        from step1x_edit.api.links import LinkFetcher

        async def no_dns(host: str, port: int) -> list[str]:
            raise OSError("name resolution is disabled in this test")

        app.state.server.fetcher = LinkFetcher(max_bytes=settings.max_image_bytes, timeout_s=2, max_redirects=0,
                                               resolver=no_dns, address_allowed=lambda ip: False)
    options = {**uvicorn_options(settings), "host": "127.0.0.1", "port": port, "log_level": "warning",
               "lifespan": "on", **uvicorn_http_options(settings, http)}
    config = uvicorn.Config(app, **options)
    server = DrainingServer(config)  # as `serve`: stopping drains the engine before connections close
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    from step1x_edit.api.auth import load_keys

    keys = load_keys(settings)
    running = RunningServer(f"http://127.0.0.1:{port}", app, server, thread, keys[0] if keys else None)
    if not wait_until(lambda: server.started, timeout):
        raise RuntimeError("the server did not start")
    if wait_ready:
        def ready() -> bool:
            return httpx.get(running.base_url + "/ready", timeout=5).status_code == 200
        if not wait_until(ready, timeout, 0.1):
            raise RuntimeError("the server did not become ready")
    return running


def dev_settings(tmp: Path, **overrides: Any):
    from step1x_edit.settings import Settings

    values: dict[str, Any] = dict(preset="dev", size_level=256, device="cpu", storage_dir=tmp / "images",
                                  batch_wait_ms=5)
    values.update(overrides)
    return Settings(**values)


# --- a local web server for image links --------------------------------------------------------------------------
Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class ImageSite:
    """A threaded HTTP server on 127.0.0.1 with routes added by tests; records the Host header of each request."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: list[tuple[str, str]] = []  # (path, Host header)
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                site.hits.append((self.path, self.headers.get("Host", "")))
                route = site.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404)
                    return
                route(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add_bytes(self, path: str, body: bytes, content_type: str = "image/png", *, length: bool = True) -> None:
        def route(h: http.server.BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", content_type)
            if length:
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)
            else:  # close-delimited body: no length announced, so only streaming can cap it
                h.send_header("Connection", "close")
                h.end_headers()
                for i in range(0, len(body), 8192):
                    h.wfile.write(body[i:i + 8192])
                h.close_connection = True
        self.routes[path] = route

    def add_redirect(self, path: str, location: str, status: int = 302) -> None:
        def route(h: http.server.BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()
        self.routes[path] = route

    def add_slow(self, path: str, delay_s: float) -> None:
        def route(h: http.server.BaseHTTPRequestHandler) -> None:
            time.sleep(delay_s)
            with contextlib.suppress(OSError):
                h.send_response(200)
                h.send_header("Content-Length", "0")
                h.end_headers()
        self.routes[path] = route

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def image_site() -> Iterator[ImageSite]:
    site = ImageSite()
    try:
        yield site
    finally:
        site.close()
