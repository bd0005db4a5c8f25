"""`step1x-edit serve` through `api/cli_serve.py` in a real process: flags over environment, SIGTERM drains and answers
every admitted request."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest
from openai import OpenAI

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, data_uri, free_port, is_ready, wait_until  # noqa: E402

from step1x_edit.api.cli_serve import add_serve_arguments, settings_from_args  # noqa: E402

MODEL = "stepfun-ai/step1x-edit"
SERVE = [sys.executable, "-m", "step1x_edit.cli", "serve"]  # what `step1x-edit serve` / `make serve` run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser


def test_flags_override_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STEP1X_PORT", "9001")
    monkeypatch.setenv("STEP1X_QUEUE_DEPTH", "7")
    monkeypatch.setenv("STEP1X_B64_JSON_STYLE", "data_uri")
    s = settings_from_args(_parser().parse_args(["--port", "9002", "--storage-dir", str(tmp_path),
                                                 "--url-expiry", "60", "--allow-private-image-urls"]))
    assert (s.port, s.queue_depth, s.b64_json_style, s.url_expiry_s) == (9002, 7, "data_uri", 60)
    assert s.allow_private_image_urls is True and s.storage_dir == tmp_path
    assert settings_from_args(_parser().parse_args([])).allow_private_image_urls is False


def test_invalid_flag_value_exits_2(tmp_path):
    done = subprocess.run([*SERVE, "--size-level", "100", "--storage-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "size_level" in done.stderr


def test_queue_depth_zero_is_refused_at_start_up(tmp_path):
    """STEP1X_QUEUE_DEPTH=0 used to be accepted and then answer every request with 429, even on an idle server."""
    from pydantic import ValidationError

    from step1x_edit.settings import Settings

    with pytest.raises(ValidationError, match="queue_depth"):
        Settings(queue_depth=0)
    assert Settings(queue_depth=1).queue_depth == 1
    env = {**os.environ, "STEP1X_QUEUE_DEPTH": "0", "STEP1X_STORAGE_DIR": str(tmp_path)}
    done = subprocess.run(SERVE, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "queue_depth" in done.stderr and "greater than or equal to 1" in done.stderr


@pytest.mark.timeout(300)
def test_serve_answers_and_sigterm_drains_in_flight_work(tmp_path):
    port = free_port()
    env = {**os.environ, "STEP1X_API_KEYS": KEY, "STEP1X_SIZE_LEVEL": "256", "STEP1X_PRESET": "dev",
           "STEP1X_DEVICE": "cpu"}
    proc = subprocess.Popen([*SERVE, "--port", str(port), "--storage-dir",
                             str(tmp_path / "img"), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: is_ready(base), 180, 0.2), "".join(lines)
        client = OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        results: list[object] = []
        worker = threading.Thread(target=lambda: results.append(client.images.generate(
            model=MODEL, prompt="p", response_format="b64_json", extra_body={"image": data_uri(), "steps": 8})))
        worker.start()
        assert wait_until(lambda: "step1x_running_jobs 1.0" in httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text, 60)
        proc.send_signal(signal.SIGTERM)
        worker.join(120)
        assert proc.wait(120) == 0
        assert len(results) == 1 and results[0].data[0].b64_json  # the in-flight request was finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    output = "".join(lines)
    assert f"serving {MODEL} (dev preset) on http://127.0.0.1:{port}/v1" in output
    assert f"playground  http://127.0.0.1:{port}/\n" in output and f"API docs    http://127.0.0.1:{port}/docs" in output
    assert "no API key configured" not in output and KEY not in output


def _events(lines) -> list[tuple[str, dict]]:
    """(event, data) pairs of a server-sent event stream, from its lines as they arrive."""
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


def _is_503(err: dict, request_id: str | None) -> bool:
    """An OpenAI error body saying the server shut down, with the request id as `param`."""
    return (set(err) == {"message", "type", "param", "code"} and err["code"] == "not_ready"
            and "shut down" in err["message"] and err["param"] == request_id)


@pytest.mark.timeout(300)
def test_sigterm_with_more_work_than_the_drain_allows_answers_everyone(tmp_path):
    """SIGTERM with a long job running and three waiting behind it, and a 3 s drain: the running job is stopped and
    every admitted request gets an OpenAI-shaped 503 (streams: an `error` event) once the drain is over. uvicorn's
    graceful timeout used to fire first: plain-text 500s, streams cut without an event. (A job that finishes within
    the drain gets its result: `test_serve_answers_and_sigterm_drains_in_flight_work`.)"""
    port = free_port()
    env = {**os.environ, "STEP1X_API_KEYS": KEY, "STEP1X_SIZE_LEVEL": "256", "STEP1X_PRESET": "dev",
           "STEP1X_DEVICE": "cpu", "STEP1X_SHUTDOWN_TIMEOUT_S": "3", "STEP1X_BATCH_MAX_IMAGES": "1",
           "STEP1X_QUEUE_DEPTH": "8"}
    proc = subprocess.Popen([*SERVE, "--port", str(port), "--storage-dir", str(tmp_path / "img"),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "p", "image": data_uri(), "response_format": "b64_json"}
    out: dict[str, object] = {}

    def metric(name: str) -> float:
        text = httpx.get(base + "/metrics", headers=auth, timeout=10).text
        return next((float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " ")), 0.0)

    def stream(name: str, fields: dict) -> None:
        try:
            with httpx.stream("POST", base + "/v1/images/generations", headers=auth, timeout=300,
                              json={**body, **fields, "stream": True}) as r:
                out[name] = (r.status_code, r.headers.get("x-request-id"), _events(r.iter_lines()))
        except Exception as exc:  # noqa: BLE001 - reported by the assertions
            out[name] = exc

    def post(name: str, fields: dict) -> None:
        try:
            out[name] = httpx.post(base + "/v1/images/generations", headers=auth, timeout=300, json={**body, **fields})
        except Exception as exc:  # noqa: BLE001
            out[name] = exc

    def sdk(name: str, fields: dict) -> None:
        client = OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=300)
        try:
            if fields.get("stream"):
                out[name] = list(client.images.generate(model=MODEL, prompt="p", stream=True,
                                                        extra_body={"image": data_uri(), "steps": 2}))
            else:
                out[name] = client.images.generate(model=MODEL, prompt="p", extra_body={"image": data_uri(), "steps": 2})
        except Exception as exc:  # noqa: BLE001
            out[name] = exc

    try:
        assert wait_until(lambda: is_ready(base), 180, 0.2), "".join(lines)
        jobs = {"B": (post, {"steps": 50, "seed": 2}),  # runs for far longer than the drain
                "C": (stream, {"steps": 2, "seed": 3, "partial_images": 1}),  # C, D, E wait in the queue
                "D": (sdk, {}), "E": (sdk, {"stream": True})}
        threads = {name: threading.Thread(target=fn, args=(name, fields)) for name, (fn, fields) in jobs.items()}
        threads["B"].start()
        assert wait_until(lambda: metric("step1x_running_jobs") == 1, 120)
        for n, name in enumerate("CDE", 1):
            threads[name].start()
            assert wait_until(lambda n=n: metric("step1x_queue_depth") == n, 60)
        proc.send_signal(signal.SIGTERM)
        for t in threads.values():
            t.join(120)
        assert proc.wait(60) == 0, "".join(lines)[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = "".join(lines)
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
    assert "answered with 503" in log, log

    b = out["B"]  # running when the drain ran out: stopped, and a 503 in the error shape (not uvicorn's 500)
    assert isinstance(b, httpx.Response), b
    assert b.status_code == 503 and b.headers["content-type"] == "application/json", (b.status_code, b.text[:200])
    assert _is_503(b.json()["error"], b.headers["x-request-id"]) and "finished" in b.json()["error"]["message"]
    assert b.headers["retry-after"]
    status, request_id, events = out["C"]  # queued stream: an `error` event ends it
    assert status == 200 and [name for name, _ in events] == ["error"], events
    assert events[0][1]["type"] == "error" and _is_503(events[0][1]["error"], request_id)
    d = out["D"]  # queued, through the SDK: its 503 error, parsed
    assert isinstance(d, openai.InternalServerError) and d.status_code == 503 and d.code == "not_ready", d
    e = out["E"]  # queued SDK stream: the SDK raises the error event's message
    assert isinstance(e, openai.APIError) and "shut down before this job ran" in e.message, e


def test_access_log_never_shows_link_signatures():
    import logging

    from step1x_edit.api.cli_serve import _RedactLinkSignatures

    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/files/images/ab.png?expires=9&sig=deadbeef", "1.1", 200), None)
    assert _RedactLinkSignatures().filter(record)
    assert "deadbeef" not in record.getMessage() and "sig=[redacted]" in record.getMessage()
