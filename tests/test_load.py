"""Load from a second process (`tests/loadgen.py`) on loopback: more concurrent requests than the queue holds.

What must hold: every request gets 200 or 429 (nothing else, no hang); every 429 carries `Retry-After`; every
accepted request completes with its own outputs (distinct ids, each link serves a PNG, the seeds asked for); the
store holds exactly the outputs that were handed out (nothing lost, nothing duplicated, no temp files); the
engine's counters agree; and the server takes more work afterwards. The slow variant adds rounds and clients that
hang up mid-request.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, data_uri, dev_settings, start_server, wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(600)

LOADGEN = Path(__file__).with_name("loadgen.py")


def run_load(server, **options) -> list[list[dict]]:
    args = [sys.executable, str(LOADGEN), "--base", server.base_url, "--key", KEY]
    for name, value in options.items():
        args += [f"--{name}", str(value)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["rounds"]


def check_round(server, results: list[dict], expected: int) -> list[str]:
    """The invariants of one round; returns the image ids handed out."""
    assert len(results) == expected
    statuses = [r["status"] for r in results]
    assert set(statuses) <= {200, 429}, [r for r in results if r["status"] not in (200, 429)]
    assert statuses.count(200) >= 1
    for r in results:
        if r["status"] == 429:
            assert int(r["retry_after"]) >= 1 and r["error"]["code"] == "queue_full"
            assert r["error"]["param"] == r["request_id"]
    ids = []
    for r in results:
        if r["status"] == 200:
            assert len(r["urls"]) == 1
            for url in r["urls"]:
                path = urlsplit(url).path
                ids.append(path.rsplit("/", 1)[1].removesuffix(".png"))
                png = httpx.get(server.base_url + path + "?" + urlsplit(url).query, timeout=30)
                assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (48, 32)
    assert len(ids) == len(set(ids))  # no output handed to two requests
    return ids


def check_store(server, handed_out: list[str]) -> None:
    directory = Path(server.app.state.server.settings.storage_dir)
    stored = sorted(p.name.removesuffix(".png") for p in directory.glob("*.png"))
    assert stored == sorted(handed_out)  # nothing lost, nothing extra
    assert not list(directory.glob(".tmp-*"))


def test_overfilled_queue_answers_429_and_loses_nothing(tmp_path):
    server = start_server(dev_settings(tmp_path, api_keys=KEY, queue_depth=2, batch_max_images=1))
    try:
        rounds = run_load(server, requests=3 * 4, rounds=1, steps=2)
        ids = check_round(server, rounds[0], 12)
        statuses = [r["status"] for r in rounds[0]]
        assert statuses.count(429) >= 1, statuses  # 12 at once against 1 running + 2 waiting
        assert statuses.count(200) >= 3
        check_store(server, ids)
        assert server.metric("step1x_jobs_total", outcome="done") == statuses.count(200)
        assert server.metric("step1x_jobs_total", outcome="rejected_full") == statuses.count(429)
        assert wait_until(lambda: server.metric("step1x_queue_depth") == 0 and
                          server.metric("step1x_running_jobs") == 0, 30)
        r = httpx.post(server.api + "/images/generations", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"model": "stepfun-ai/step1x-edit", "prompt": "after", "image": data_uri(), "steps": 1})
        assert r.status_code == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_sustained_load_with_batching_and_hangups(tmp_path):
    server = start_server(dev_settings(tmp_path, api_keys=KEY, queue_depth=4, batch_max_images=4))
    try:
        rounds = run_load(server, requests=3 * 4, hangups=3, rounds=6, steps=3)
        handed_out: list[str] = []
        for results in rounds:
            handed_out += check_round(server, results, 12)
        check_store(server, handed_out)
        done = server.metric("step1x_jobs_total", outcome="done")
        assert done >= len(handed_out)  # hung-up clients' jobs may have run too (their outputs were not stored)
        assert wait_until(lambda: server.metric("step1x_queue_depth") == 0 and
                          server.metric("step1x_running_jobs") == 0, 60)
        assert httpx.get(server.base_url + "/ready").status_code == 200
    finally:
        server.stop()
