"""The commands on several ranks, as users run them: `serve --cfg-parallel 2` answering the API (openai SDK), and the
group's life: a worker rank's death gives the job in flight a 503 and stops every rank (status 1), SIGTERM drains
then stops every rank (status 0), the workers leave when rank 0 is killed; `edit` on two ranks writes the
single-process image. Real processes (two Gloo ranks on the CPU, dev preset); slow (each start imports torch twice).
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import numpy as np
import openai
import psutil
import pytest
from openai import OpenAI
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, data_uri, free_port, is_ready, png_bytes, wait_until  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "stepfun-ai/step1x-edit"
CLI = [sys.executable, "-m", "step1x_edit.cli"]
ENV = {**os.environ, "STEP1X_API_KEYS": KEY, "STEP1X_SIZE_LEVEL": "256", "STEP1X_PRESET": "dev",
       "STEP1X_DEVICE": "cpu"}


class Served:
    """`step1x-edit serve` with the given flags in a subprocess; its output collected."""

    def __init__(self, tmp_path, *flags: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*CLI, "serve", "--port", str(self.port), "--storage-dir", str(tmp_path / "img"),
                                      *flags], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_ready(self) -> None:
        assert wait_until(lambda: is_ready(self.base), 300, 0.2), self.output

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def workers(self) -> list[psutil.Process]:
        """The spawned worker ranks (not multiprocessing's resource tracker)."""
        return [c for c in psutil.Process(self.proc.pid).children(recursive=True)
                if "spawn_main" in " ".join(c.cmdline())]

    def running_jobs(self) -> float:
        text = httpx.get(self.base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).text
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("step1x_running_jobs "))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.reader.join(10)


def _gone(procs: list[psutil.Process], timeout: float = 30) -> bool:
    return wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs), timeout)


def test_server_on_two_ranks_answers_the_api_and_stops_when_a_rank_dies(tmp_path):
    served = Served(tmp_path, "--cfg-parallel", "2")
    try:
        served.wait_ready()
        ready = httpx.get(served.base + "/ready", timeout=5).json()
        assert ready["parallel"] == "cfg-parallel 2 = 2 ranks"
        (worker,) = served.workers()
        client = OpenAI(base_url=served.base + "/v1", api_key=KEY, max_retries=0, timeout=180)

        # JSON, seeded: the same request twice gives the same bytes
        first, again = (client.images.generate(
            model=MODEL, prompt="make it snowy", response_format="b64_json",
            extra_body={"image": data_uri(), "steps": 3, "seed": 11, "negative_prompt": "blurry"}) for _ in range(2))
        assert first.data[0].seed == 11 and first.data[0].b64_json == again.data[0].b64_json
        assert first.usage.input_tokens > 0
        # multipart, n=2, a link
        edited = client.images.edit(image=("in.png", png_bytes(), "image/png"), prompt="anime", n=2,
                                    extra_body={"seed": 7, "steps": 2})
        assert [d.seed for d in edited.data] == [7, 8]
        got = httpx.get(edited.data[0].url, timeout=10)
        assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (64, 96)
        # a client mistake is still a 400 naming the field
        with pytest.raises(openai.BadRequestError, match="steps"):
            client.images.generate(model=MODEL, prompt="p", extra_body={"image": data_uri(), "steps": 0})
        # streaming with a preview and progress events
        events = list(client.images.edit(image=("in.png", png_bytes(), "image/png"), prompt="anime", stream=True,
                                         partial_images=1, extra_body={"steps": 4, "seed": 3,
                                                                       "stream_progress": True}))
        kinds = [e.type for e in events]
        assert "image_edit.partial_image" in kinds and kinds[-1] == "image_edit.completed"
        assert base64.b64decode(events[-1].b64_json)[:8] == b"\x89PNG\r\n\x1a\n"

        # a worker rank dies while a job runs: that job gets a 503, the server and every rank stop (status 1)
        results: list[object] = []

        def long_request() -> None:
            try:
                results.append(client.images.generate(model=MODEL, prompt="p",
                                                       extra_body={"image": data_uri(), "steps": 50}))
            except openai.APIStatusError as exc:
                results.append(exc)

        thread = threading.Thread(target=long_request)
        thread.start()
        assert wait_until(lambda: served.running_jobs() == 1.0, 60, 0.05)
        worker.kill()
        thread.join(60)
        (failure,) = results
        assert isinstance(failure, openai.APIStatusError) and failure.status_code == 503, failure
        assert "the pipeline stopped: rank 1" in failure.message
        assert served.proc.wait(60) == 1
        assert _gone([worker])
    finally:
        served.close()
    assert "stopped: rank 1" in served.output and "exited with code -9" in served.output


def test_sigterm_drains_the_job_in_flight_then_stops_every_rank(tmp_path):
    served = Served(tmp_path, "--ring-degree", "2")
    try:
        served.wait_ready()
        workers = served.workers()
        assert len(workers) == 1
        client = OpenAI(base_url=served.base + "/v1", api_key=KEY, max_retries=0, timeout=180)
        results: list[object] = []
        thread = threading.Thread(target=lambda: results.append(client.images.generate(
            model=MODEL, prompt="p", response_format="b64_json", extra_body={"image": data_uri(), "steps": 12})))
        thread.start()
        assert wait_until(lambda: served.running_jobs() == 1.0, 60, 0.05)
        served.proc.send_signal(signal.SIGTERM)
        for worker in workers:  # Ctrl-C / `systemctl stop` reach the workers too: they wait for rank 0
            worker.send_signal(signal.SIGTERM)
        thread.join(120)
        assert len(results) == 1 and results[0].data[0].b64_json  # finished, not cut off
        assert served.proc.wait(120) == 0
        assert _gone(workers)
    finally:
        served.close()


def test_workers_leave_when_rank0_is_killed(tmp_path):
    served = Served(tmp_path, "--ulysses-degree", "2")
    try:
        served.wait_ready()
        workers = served.workers()
        served.proc.kill()
        assert _gone(workers, 30)
    finally:
        served.close()


def test_edit_command_on_two_ranks_writes_the_one_process_image(tmp_path, examples_dir):
    args = ["edit", str(examples_dir / "0003.png"), "Change image to anime style", "--seed", "5", "--steps", "3",
            "--negative", "blurry"]
    env = {k: v for k, v in ENV.items() if k != "STEP1X_API_KEYS"}
    one = subprocess.run([*CLI, *args, "-o", str(tmp_path / "one.png")], env=env, capture_output=True, text=True,
                         timeout=300)
    two = subprocess.run([*CLI, *args, "-o", str(tmp_path / "two.png"), "--cfg-parallel", "2"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert "cfg-parallel 2 = 2 ranks)" in two.stdout
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("one", "two"))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


def test_bench_tiny_on_two_ranks_reports_once(tmp_path, capsys):
    """`bench --tiny --ring-degree 2`: the same run on both ranks (the DiT ring-parallel), rank 0's report; the
    step cache, which cannot run on several ranks, is left out with a word."""
    from step1x_edit.cli import main as cli_main

    out = tmp_path / "bench.md"
    assert cli_main(["bench", "--tiny", "--ring-degree", "2", "--modes", "eager,cache", "--no-baseline",
                     "--no-parity", "--steps", "2", "--step-iters", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "cache mode does not run on several ranks" in captured.err
    report = out.read_text()
    assert "| parallel | ring 2 = 2 ranks" in report and captured.out.count("# Step1X-Edit speed") == 1
    assert re.search(r"\| eager \| 256² \| 1152 \| [\d.]+ \|", report)
