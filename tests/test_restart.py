"""SIGTERM while the server is busy, then a restart on the same port and storage directory.

`step1x-edit serve` runs as a real process (dev preset). With one job running and two waiting, SIGTERM must let all
three finish and answer (graceful drain), refuse nothing already admitted, exit with status 0, and leave no temp
files; after a restart the links handed out before still serve the same bytes, and tampered ones still do not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, data_uri, free_port, is_ready, wait_until  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "stepfun-ai/step1x-edit"
SERVE = [sys.executable, "-m", "step1x_edit.cli", "serve"]


def _start(port: int, storage: Path, log: list[str]) -> subprocess.Popen:
    env = {**os.environ, "STEP1X_API_KEYS": KEY, "STEP1X_PRESET": "dev", "STEP1X_DEVICE": "cpu",
           "STEP1X_SIZE_LEVEL": "256", "STEP1X_BATCH_MAX_IMAGES": "1", "STEP1X_QUEUE_DEPTH": "4"}
    proc = subprocess.Popen([*SERVE, "--port", str(port), "--storage-dir", str(storage), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    base = f"http://127.0.0.1:{port}"

    assert wait_until(lambda: is_ready(base), 180, 0.2), "".join(log)
    return proc


def _metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_sigterm_drains_admitted_work_and_links_survive_a_restart(tmp_path):
    port, storage, log = free_port(), tmp_path / "images", []
    base = f"http://127.0.0.1:{port}"
    proc = _start(port, storage, log)
    results: dict[int, httpx.Response | Exception] = {}

    def one(seed: int, steps: int) -> None:
        try:
            results[seed] = httpx.post(base + "/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"},
                                       timeout=300, json={"model": MODEL, "prompt": "p", "image": data_uri(),
                                                          "steps": steps, "seed": seed})
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[seed] = exc

    try:
        threads = [threading.Thread(target=one, args=(1, 12))]
        threads[0].start()
        assert wait_until(lambda: _metric(base, "step1x_running_jobs") == 1, 60)
        threads += [threading.Thread(target=one, args=(seed, 2)) for seed in (2, 3)]
        for t in threads[1:]:
            t.start()
        assert wait_until(lambda: _metric(base, "step1x_queue_depth") == 2, 60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(300)
        assert proc.wait(120) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert sorted(results) == [1, 2, 3]
    for seed, r in results.items():
        assert isinstance(r, httpx.Response) and r.status_code == 200, (seed, r)
    links = {seed: r.json()["data"][0]["url"] for seed, r in results.items()}
    assert not list(storage.glob(".tmp-*"))
    stored = {p.name for p in storage.glob("*.png")}
    assert len(stored) == 3

    # --- restart on the same port and directory: the links are still good -------------------------------------
    log2: list[str] = []
    proc = _start(port, storage, log2)
    try:
        for url in links.values():
            assert url.startswith(base)
            r = httpx.get(url, timeout=30)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
            tampered = url.replace("expires=", "expires=1")
            assert httpx.get(tampered, timeout=30).status_code == 404
        assert {p.name for p in storage.glob("*.png")} == stored
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
