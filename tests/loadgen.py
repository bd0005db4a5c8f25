"""A small load generator, run by the load tests as a second process: N concurrent edit requests to a server on
127.0.0.1, then one JSON line on stdout with what each request got back.

    python tests/loadgen.py --base http://127.0.0.1:PORT --key KEY --requests 12 [--hangups 3] [--rounds 2]

Bounded: `--requests` per round, `--rounds` rounds, every request with a timeout, the whole run with a deadline.
`--hangups` extra clients per round send a request and close the connection at once (clients that disconnect).
Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

import httpx
from PIL import Image

MODEL = "stepfun-ai/step1x-edit"


def _image() -> str:
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((48, 32)).convert("RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _one(base: str, key: str, body: dict, timeout: float, out: list, start: threading.Barrier) -> None:
    start.wait(30)
    t0 = time.monotonic()
    try:
        r = httpx.post(base + "/v1/images/generations", json=body, timeout=timeout,
                       headers={"Authorization": f"Bearer {key}"})
        item = {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                "request_id": r.headers.get("x-request-id"), "elapsed": time.monotonic() - t0}
        if r.status_code == 200:
            item["urls"] = [d["url"] for d in r.json()["data"]]
            item["seeds"] = [d["seed"] for d in r.json()["data"]]
        else:
            item["error"] = r.json().get("error")
    except httpx.HTTPError as exc:
        item = {"status": None, "exception": type(exc).__name__, "elapsed": time.monotonic() - t0}
    out.append(item)


def _hangup(base: str, key: str, body: dict, start: threading.Barrier) -> None:
    start.wait(30)
    parts = urlsplit(base)
    payload = json.dumps(body).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        time.sleep(0.3)  # long enough to be admitted, then gone


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--hangups", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--deadline", type=float, default=300)
    args = parser.parse_args()
    if urlsplit(args.base).hostname not in ("127.0.0.1", "localhost", "::1"):
        print("loadgen only talks to loopback", file=sys.stderr)
        return 2
    if args.requests > 200 or args.rounds > 10:
        print("loadgen is bounded: at most 200 requests a round, 10 rounds", file=sys.stderr)
        return 2
    image = _image()
    deadline = time.monotonic() + args.deadline
    rounds = []
    for r in range(args.rounds):
        if time.monotonic() > deadline:
            break
        results: list[dict] = []
        start = threading.Barrier(args.requests + args.hangups)
        threads = [threading.Thread(target=_one, daemon=True, args=(
            args.base, args.key, {"model": MODEL, "prompt": f"load {r}-{i}", "image": image, "steps": args.steps,
                                  "seed": 1000 * r + i}, args.timeout, results, start))
            for i in range(args.requests)]
        threads += [threading.Thread(target=_hangup, daemon=True, args=(
            args.base, args.key, {"model": MODEL, "prompt": f"gone {r}-{i}", "image": image, "steps": 50}, start))
            for i in range(args.hangups)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        rounds.append(results)
    print(json.dumps({"rounds": rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
