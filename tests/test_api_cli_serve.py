"""`step1x-edit serve` through `api/cli_serve.py` in a real process: flags over environment, SIGTERM drains."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from openai import OpenAI

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, data_uri, free_port, wait_until  # noqa: E402

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
        def ready() -> bool:
            try:
                return httpx.get(base + "/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_until(ready, 180, 0.2), "".join(lines)
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


def test_access_log_never_shows_link_signatures():
    import logging

    from step1x_edit.api.cli_serve import _RedactLinkSignatures

    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/files/images/ab.png?expires=9&sig=deadbeef", "1.1", 200), None)
    assert _RedactLinkSignatures().filter(record)
    assert "deadbeef" not in record.getMessage() and "sig=[redacted]" in record.getMessage()
