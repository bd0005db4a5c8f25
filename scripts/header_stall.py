"""Measure how long one huge request header stalls other requests (docs/reliability.md, "Request headers").

Starts the server the way the tests do (tests/server_fixtures.py: the same uvicorn options as `serve`), sends a
header of SIZE MB from a raw socket as fast as loopback takes it, and meanwhile times GET /health every 20 ms.
Prints the attacker's answer, how long it took, and the slowest /health.

    PYTHONPATH=src .venv/bin/python scripts/header_stall.py [SIZE_MB ...]   (default: 16 64)

On the project's 2-core CPU, before heads were bounded (httptools, no limit): 16 / 32 / 64 / 96 MB were answered
200 after 0.08 / 0.98 / 2.6 / 8.0 s, and a concurrent /health waited up to 0.05 / 0.5 / 1.4 / 2.5 s. With the
limits (api/httpserver.py): 431 after 0.01-0.03 s for every size, /health at most 3 ms.
"""

from __future__ import annotations

import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_fixtures import dev_settings, start_server  # noqa: E402


def attack(port: int, size: int, out: dict) -> None:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * (1 << 20)
        sent = 0
        try:
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
            sock.sendall(b"\r\n\r\n")
        except OSError as exc:  # the server closed the connection: it refused the header
            out["send_error"] = type(exc).__name__
        out["sent_mb"] = sent / (1 << 20)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data:
                    break
        except OSError as exc:
            out["recv_error"] = type(exc).__name__
    out["status"] = data.split(b"\r\n", 1)[0].decode("latin-1") or "(connection closed, no answer)"
    out["seconds"] = time.monotonic() - t0


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [16, 64]
    server = start_server(dev_settings(Path(tempfile.mkdtemp())))
    port = int(server.base_url.rsplit(":", 1)[1])
    try:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            for size_mb in sizes:
                client.get("/health")
                out: dict = {}
                worker = threading.Thread(target=attack, args=(port, size_mb << 20, out))
                worker.start()
                worst = 0.0
                count = 0
                while worker.is_alive():
                    t0 = time.monotonic()
                    assert client.get("/health").status_code == 200
                    worst = max(worst, time.monotonic() - t0)
                    count += 1
                    time.sleep(0.02)
                worker.join()
                print(f"{size_mb:3d} MB header: attacker got {out.get('status')!r} after {out['seconds']:.2f} s "
                      f"(sent {out.get('sent_mb', 0):.1f} MB{', ' + out['send_error'] if 'send_error' in out else ''});"
                      f" slowest of {count} concurrent /health: {worst * 1000:.0f} ms", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
