"""Scale-out figures, measured in one run on this machine (dev preset, CPU):

1. Ray start-up: `ray.init` of a local instance, then `serve.run` of the application until /ready.
2. Requests/s of the same load through Ray Serve with 1 and with 2 CPU replicas, and through the single-process
   server (`step1x-edit serve`, the baseline: same run, same load, measured beside each Ray figure).
3. Per image: storing an output (`ImageStore.put`) and reading it back through a link (`open` + read) in the local
   directory vs an S3-compatible store (SeaweedFS on 127.0.0.1), for a 1024x1536 PNG (the example photo's size).

    PYTHONPATH=src .venv/bin/python bench/scale_out.py [--requests 16 --concurrency 4 --steps 8]

Prints a Markdown table (bench/RESULTS-scale-out.md has the last one, with the machine).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from s3_fixtures import BUCKET, SeaweedFS, aws_env  # noqa: E402
from server_fixtures import EXAMPLES, data_uri, dev_settings, free_port, wait_until  # noqa: E402

MODEL = "stepfun-ai/step1x-edit"
LINK_KEY = "bench-link-key-0123456789abcdef0123456789"


def load(base: str, requests: int, concurrency: int, steps: int) -> tuple[float, list[int], set[str]]:
    """requests/s of `requests` edits sent `concurrency` at a time; the status codes; the replicas seen."""
    image = data_uri()

    def one(i: int) -> httpx.Response:
        return httpx.post(base + "/v1/images/generations", timeout=600, json={
            "model": MODEL, "prompt": "make it snowy", "image": image, "steps": steps, "seed": i,
            "response_format": "b64_json"})

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - t0
    return requests / elapsed, [r.status_code for r in answers], {r.headers.get("x-step1x-replica") for r in answers}


_procs: list = []


def start_single(directory: Path, threads: int | None = None) -> str:
    """`step1x-edit serve` in its own process (as the Ray replicas are), dev preset; returns its base URL. `threads`:
    OMP_NUM_THREADS for torch (Ray gives a replica with num_cpus=1 one thread; default: torch's own choice)."""
    import subprocess

    port = free_port()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), "STEP1X_PRESET": "dev", "STEP1X_DEVICE": "cpu", "STEP1X_SIZE_LEVEL": "256",
           "STEP1X_BATCH_MAX_IMAGES": "4", "STEP1X_REQUEST_TIMEOUT_S": "900", "STEP1X_QUEUE_DEPTH": "64"}
    _procs.append(subprocess.Popen([sys.executable, "-m", "step1x_edit.cli", "serve", "--port", str(port),
                                    "--storage-dir", str(directory), "--log-level", "warning"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(base + "/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(ready, 300, 0.5), "the baseline server did not start"
    return base


def stop_single() -> None:
    for proc in _procs:
        proc.terminate()
        proc.wait(120)


def store_latency(store, data: bytes, rounds: int) -> tuple[float, float]:
    """Median seconds of put (store one image) and of open + read through its link."""
    from urllib.parse import parse_qs, urlsplit

    puts, reads = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        name = store.put(data, "png")
        puts.append(time.perf_counter() - t0)
        q = parse_qs(urlsplit(store.link(name)).query)
        t0 = time.perf_counter()
        blob = store.open(name, q["expires"][0], q["sig"][0])
        assert blob is not None and len(b"".join(blob.chunks)) == len(data)
        reads.append(time.perf_counter() - t0)
        store.delete(name)
    return statistics.median(puts), statistics.median(reads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--store-rounds", type=int, default=30)
    args = parser.parse_args()

    import ray
    from PIL import Image
    from ray import serve

    from step1x_edit.deploy.app import APP_NAME, build_application
    from step1x_edit.storage.local import LocalImageStore
    from step1x_edit.storage.s3 import S3ImageStore

    tmp = Path(tempfile.mkdtemp(prefix="step1x-bench-"))
    rows: list[tuple[str, str]] = []
    weed = SeaweedFS(tmp / "seaweedfs")
    with aws_env(weed.env()):
        weed.start()
        try:
            # --- 3. the store, per image ------------------------------------------------------------------------
            buf = io.BytesIO()
            with Image.open(EXAMPLES / "0000.jpg") as img:
                img.convert("RGB").save(buf, "PNG")
            png = buf.getvalue()
            local = LocalImageStore(tmp / "local", expiry_s=3600, key=LINK_KEY.encode())
            s3 = S3ImageStore(f"s3://{BUCKET}/bench/", expiry_s=3600, key=LINK_KEY.encode(),
                              endpoint_url=weed.endpoint)
            store_latency(s3, png, 3)  # warm the connection pool
            lp, lr = store_latency(local, png, args.store_rounds)
            sp, sr = store_latency(s3, png, args.store_rounds)
            size = f"{img.size[0]}x{img.size[1]} PNG, {len(png) / 1e6:.2f} MB, median of {args.store_rounds}"
            rows += [("store one output: local directory (put)", f"{lp * 1000:.1f} ms ({size})"),
                     ("store one output: S3 / SeaweedFS (put)", f"{sp * 1000:.1f} ms (+{(sp - lp) * 1000:.1f} ms)"),
                     ("read it back through its link: local", f"{lr * 1000:.1f} ms"),
                     ("read it back through its link: S3 / SeaweedFS", f"{sr * 1000:.1f} ms (+{(sr - lr) * 1000:.1f} ms)")]

            # --- 2. the baseline (a `step1x-edit serve` process), then Ray with 1 and 2 replicas -----------------
            # The baseline is measured again beside each Ray figure: the machine may be shared, so the load
            # average is printed with every figure, and each Ray figure has a baseline taken minutes from it.
            single = start_single(tmp / "single")
            single_1t = start_single(tmp / "single-1t", threads=1)
            try:
                port = free_port()
                t0 = time.perf_counter()
                ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR",
                         log_to_driver=False, namespace="step1x-bench")
                t_init = time.perf_counter() - t0
                rows.append(("Ray start-up: ray.init (local instance)", f"{t_init:.1f} s"))
                try:
                    serve.start(http_options={"host": "127.0.0.1", "port": port})
                    base = f"http://127.0.0.1:{port}"
                    for replicas in ("1", "2"):
                        settings = dev_settings(tmp / f"ray{replicas}", replicas=replicas, batch_max_images=4,
                                                max_ongoing_requests=4, queue_depth=64, request_timeout_s=900)
                        t0 = time.perf_counter()
                        serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
                        assert wait_until(lambda: httpx.get(base + "/ready", timeout=5).status_code == 200, 300, 0.2)
                        rows.append((f"Ray deploy, {replicas} replica(s), until /ready",
                                     f"{time.perf_counter() - t0:.1f} s"))
                        for name, url in ((f"single-process server (baseline before {replicas} replica(s))",
                                           single),
                                          (f"single-process server, 1 torch thread (baseline before {replicas} "
                                           "replica(s))", single_1t),
                                          (f"Ray Serve, {replicas} CPU replica(s)", base)):
                            load(url, 2, 2, args.steps)  # warm-up
                            before = os.getloadavg()[0]
                            rps, codes, seen = load(url, args.requests, args.concurrency, args.steps)
                            assert set(codes) == {200}, codes
                            rows.append((name, f"{rps:.2f} requests/s ({len(seen)} replica(s) answered; load "
                                               f"average {before:.1f} -> {os.getloadavg()[0]:.1f})"))
                        serve.delete(APP_NAME)
                finally:
                    serve.shutdown()
                    ray.shutdown()
            finally:
                stop_single()
        finally:
            weed.stop()

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"ray {ray.__version__}; load: {args.requests} requests, {args.concurrency} at a time, dev preset, "
          f"size level 256, {args.steps} steps, b64_json\n")
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
