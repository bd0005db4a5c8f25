"""Start-up and time-outs of the real server (dev preset); restarts and SIGTERM are in test_api_server.py and
test_api_cli_serve.py.

The pipeline factory here is the real `build_pipeline` behind a gate, so the test decides when the weights
"finish loading" and can look at the server before that.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import httpx
import openai
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import client, data_uri, dev_settings, start_server, wait_until  # noqa: E402

from step1x_edit.pipeline.edit import build_pipeline  # noqa: E402

MODEL = "stepfun-ai/step1x-edit"
pytestmark = pytest.mark.timeout(300)


class Gate:
    """Holds the real pipeline build until `open()`; `abandon()` makes a still-waiting build give up."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.event = threading.Event()
        self.abandoned = False

    def factory(self):
        assert self.event.wait(300)
        if self.abandoned:
            raise RuntimeError("test finished before the pipeline was needed")
        return build_pipeline(self.settings)

    def open(self) -> None:
        self.event.set()

    def abandon(self) -> None:
        self.abandoned = True
        self.event.set()


def test_not_ready_until_loaded_then_timeouts_stop_the_work(tmp_path, caplog):
    settings = dev_settings(tmp_path, request_timeout_s=3)
    gate = Gate(settings)
    caplog.set_level(logging.WARNING, logger="step1x_edit.api")
    server = start_server(settings, pipeline_factory=gate.factory, wait_ready=False)
    try:
        assert "no API key configured" in caplog.text and "DEV PRESET" in caplog.text
        # --- before the weights are loaded: alive, not ready, requests get 503 --------------------------------
        assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
        ready = httpx.get(server.base_url + "/ready")
        assert ready.status_code == 503 and "still loading" in ready.json()["error"]["message"]
        assert ready.headers["retry-after"] and ready.headers["x-request-id"]
        with pytest.raises(openai.InternalServerError) as exc:
            client(server, None).images.generate(model=MODEL, prompt="p", extra_body={"image": data_uri()})
        assert exc.value.status_code == 503 and "loading" in exc.value.message
        assert exc.value.response.headers["retry-after"]
        card = httpx.get(server.api + "/models").json()["data"][0]
        assert card["ready"] is False and card["preset"] == "dev" and card["dev_preset"] is True
        gate.open()
        assert wait_until(lambda: httpx.get(server.base_url + "/ready").status_code == 200, 120)
        info = httpx.get(server.base_url + "/ready").json()
        assert info["preset"] == "dev" and info["version"] == "v1.1" and info["device"] == "cpu"
        assert httpx.get(server.api + "/models").json()["data"][0]["ready"] is True

        # --- past its deadline: 504, and the running batch stops at the next step -----------------------------
        with pytest.raises(openai.InternalServerError) as exc:  # 768 working size, 50 steps: minutes on CPU
            client(server, None).images.generate(model=MODEL, prompt="p", size="768x768",
                                            extra_body={"image": data_uri(), "steps": 50})
        assert exc.value.status_code == 504 and "timed out after 3 s" in exc.value.message
        assert exc.value.type == "timeout_error" and exc.value.param == exc.value.response.headers["x-request-id"]
        assert server.metric("step1x_jobs_total", outcome="dropped_timeout") == 1
        assert wait_until(lambda: server.metric("step1x_jobs_total", outcome="aborted") == 1, 120)
        assert server.metric("step1x_running_jobs") == 0
    finally:
        gate.abandon()
        server.stop()
    assert not server.thread.is_alive()
    assert server.app.state.server.engine.queue.closed


def test_dev_preset_start_up_gives_one_hint_for_real_weights(tmp_path, caplog):
    """Start-up used to print two different hints (STEP1X_DIT_PATH/VAE_PATH/ENCODER_PATH from the app, `download`
    or STEP1X_MODEL_DIR from the pipeline); the README says the latter. Now the app says "DEV PRESET" and the
    pipeline gives the one hint."""
    caplog.set_level(logging.WARNING)
    server = start_server(dev_settings(tmp_path))
    server.stop()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("DEV PRESET" in line for line in lines)
    hints = [line for line in lines if "real model" in line or "STEP1X_" in line and "PATH" in line]
    assert len(hints) == 1 and "step1x-edit download" in hints[0] and "STEP1X_MODEL_DIR" in hints[0], hints
