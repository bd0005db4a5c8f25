"""Request heads (request line + headers) are bounded in size and in time, whichever HTTP parser uvicorn runs
(`api/httpserver.py`): a huge header is a 431 that costs the other requests nothing, a trickled one a 408, and
normal traffic (keep-alive, pipelining, slow bodies) is untouched. Every test runs against a real server started
with the production uvicorn options, once with httptools (uvicorn's choice when installed, as here) and once with
h11, over raw sockets. No timing is asserted but generous regression bounds; the measured numbers are in
docs/reliability.md (scripts/header_stall.py).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import weakref

import httpx
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, dev_settings, start_server  # noqa: E402

from step1x_edit.api.cli_serve import uvicorn_options  # noqa: E402
from step1x_edit.settings import Settings  # noqa: E402

pytestmark = pytest.mark.timeout(120)

HEADER_TIMEOUT_S = 1.5
MAX_HEADER_BYTES = 64 * 1024


class _IdlePipeline:
    """Ready at once and never asked to edit: these tests are about HTTP, and the event loop should be all theirs."""

    def run(self, requests, on_step=None):  # noqa: ANN001, ANN201
        raise RuntimeError("not used by these tests")

    def batch_key(self, req):  # noqa: ANN001, ANN201
        return 0

    def info(self) -> dict:
        return {"preset": "dev", "version": "v1.1", "device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module", params=["httptools", "h11"])
def srv(request, tmp_path_factory):
    settings = dev_settings(tmp_path_factory.mktemp("http"), api_keys=KEY, header_timeout_s=HEADER_TIMEOUT_S,
                            body_timeout_s=30)
    assert settings.max_header_bytes == MAX_HEADER_BYTES  # the default
    server = start_server(settings, pipeline_factory=_IdlePipeline, http=request.param)
    server.port = int(server.base_url.rsplit(":", 1)[1])
    yield server
    server.stop()


_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # bytes read past a response, per socket


def _read_answer(sock: socket.socket) -> tuple[int | None, dict[str, str], bytes]:
    """One response (status, headers, body by Content-Length), or (None, {}, b"") when the server just closed."""
    data = _PENDING.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            _PENDING[sock] = data
            raise
        if not chunk:
            return None, {}, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    body, _PENDING[sock] = body[:length], body[length:]
    return int(lines[0].split()[1]), headers, body


def _error(status: int | None, headers: dict[str, str], body: bytes, want: int, code: str) -> None:
    assert status == want, (status, body[:300])
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert error["param"] == headers["x-request-id"] and headers["connection"] == "close"


def _head(size: int, path: bytes = b"/health") -> bytes:
    """A GET whose request line + headers take exactly `size` bytes (one big header pads it)."""
    start = b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


# --- size -----------------------------------------------------------------------------------------------------------
def test_a_16_mb_header_is_431_and_other_requests_are_not_stalled(srv):
    """Was (httptools): read in full and answered 200; 64-96 MB stalled every other request for 1.4-2.5 s."""
    size = 16 * 1024 * 1024
    answer: dict = {}

    def attack() -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
                chunk = b"a" * (1 << 20)
                for _ in range(size // len(chunk)):
                    sock.sendall(chunk)
                sock.sendall(b"\r\n\r\n")
            except OSError as exc:  # the server may hang up once the lingering time is over
                answer["send_error"] = exc
            try:
                answer["response"] = _read_answer(sock)
            except OSError as exc:
                answer["recv_error"] = exc
        answer["seconds"] = time.monotonic() - t0

    worst = 0.0
    with httpx.Client(base_url=srv.base_url, timeout=30) as client:
        client.get("/health")  # a warm connection, as a busy client has
        attacker = threading.Thread(target=attack)
        attacker.start()
        while attacker.is_alive() or worst == 0.0:
            t0 = time.monotonic()
            assert client.get("/health").status_code == 200
            worst = max(worst, time.monotonic() - t0)
        attacker.join()
    assert "response" in answer, answer
    _error(*answer["response"], 431, "headers_too_large")
    assert answer["seconds"] < 10, answer
    assert worst < 2.0, f"a concurrent request waited {worst:.2f} s"


def test_heads_up_to_the_limit_pass_and_one_byte_more_is_431(srv):
    for size, want in ((MAX_HEADER_BYTES, 200), (MAX_HEADER_BYTES + 1, 431), (2 * MAX_HEADER_BYTES, 431)):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(_head(size))
            status, headers, body = _read_answer(sock)
            assert status == want, (size, status, body[:200])
    # many small headers count together, and so does a long URL
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(700))
    long_url = b"GET /health?" + b"q" * (MAX_HEADER_BYTES + 10) + b" HTTP/1.1\r\nHost: x\r\n"
    for head in (many + b"\r\n", long_url + b"\r\n"):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(head)
            _error(*_read_answer(sock), 431, "headers_too_large")


def test_a_big_body_right_after_small_headers_is_not_counted_as_headers(srv):
    """Headers and body often arrive in one read: only the bytes up to the end of the headers count."""
    body = json.dumps({"model": "nope", "prompt": "p", "image": "x" * (3 * MAX_HEADER_BYTES)}).encode()
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(head + body)
        status, _, answer = _read_answer(sock)
    assert status == 404 and json.loads(answer)["error"]["code"] == "model_not_found"


# --- time -----------------------------------------------------------------------------------------------------------
def test_trickled_headers_are_cut_with_408(srv):
    """Was: no deadline for headers at all (only the body had one), so a slow-loris client held the connection."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        answer = None
        for i in range(40):  # one header byte every 0.2 s: 8 s in all, far past the 1.5 s deadline
            try:
                sock.sendall(b"X-Slow: %d\r\n" % i if i % 5 == 0 else b"")
                sock.sendall(b"a")
            except OSError:
                break
            sock.settimeout(0.2)
            try:
                answer = _read_answer(sock)
                break
            except TimeoutError:
                continue
        assert answer is not None, "the server never cut the trickled headers"
        elapsed = time.monotonic() - t0
    _error(*answer, 408, "header_timeout")
    assert HEADER_TIMEOUT_S * 0.9 < elapsed < HEADER_TIMEOUT_S + 3, elapsed


def test_a_connection_that_never_sends_anything_is_closed_without_an_answer(srv):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        assert sock.recv(100) == b""  # closed by the server, nothing written
    assert time.monotonic() - t0 < HEADER_TIMEOUT_S + 3


def test_keep_alive_pipelining_and_slow_bodies_are_untouched(srv):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        # two pipelined requests in one write, then a third after a pause shorter than keep-alive (5 s) but
        # longer than the header timeout: the idle time between requests is not header time
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_answer(sock)[0] == 200 and _read_answer(sock)[0] == 200
        time.sleep(HEADER_TIMEOUT_S + 0.5)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_answer(sock)[0] == 200
        # a later request's headers are timed from its first byte
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        _error(*_read_answer(sock), 408, "header_timeout")
    # a body that takes longer than the header timeout is the body deadline's business (BODY_TIMEOUT_S), not this
    body = json.dumps({"model": "nope", "prompt": "p", "image": "x"}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall((f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode())
        for i in range(0, len(body), len(body) // 4 + 1):
            time.sleep(HEADER_TIMEOUT_S / 2)
            sock.sendall(body[i:i + len(body) // 4 + 1])
        status, _, answer = _read_answer(sock)
    assert status == 404 and json.loads(answer)["error"]["code"] == "model_not_found"


# --- the same options in production and tests --------------------------------------------------------------------
def test_serve_runs_the_bounded_protocol_the_tests_use(srv):
    from step1x_edit.api.httpserver import _HeadLimits

    options = uvicorn_options(Settings(max_header_bytes=8192, header_timeout_s=3))
    protocol = options["http"]
    assert issubclass(protocol, _HeadLimits) and (protocol.max_header_bytes, protocol.header_timeout_s) == (8192, 3)
    assert options["h11_max_incomplete_event_size"] == 8192
    try:
        import httptools  # noqa: F401
    except ImportError:
        assert protocol.__name__.startswith("H11")
    else:
        assert protocol.__name__.startswith("HttpTools")  # uvicorn's own choice, with the limits added
    assert issubclass(srv.server.config.http, _HeadLimits)
