"""`stream: true` on both image endpoints, consumed by the official `openai` SDK's streaming iterator and by raw
HTTP: OpenAI's event types, previews, one completed event per image, errors before and during the stream, and
disconnects. A real uvicorn server runs the real pipeline (dev preset, size level 256)."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, client, data_uri, dev_settings, example_image, png_bytes, start_server, wait_until  # noqa: E402

from step1x_edit.pipeline.types import PreparedEdit  # noqa: E402

MODEL = "stepfun-ai/step1x-edit"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = start_server(dev_settings(tmp_path_factory.mktemp("stream"), api_keys=KEY, queue_depth=4))
    yield server
    server.stop()


def png_of(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


def raw_events(server, body: dict, path: str = "/images/generations") -> tuple[httpx.Response, list[tuple[str, dict]]]:
    """(response, [(event name, data)]) read with plain httpx and a minimal SSE parser."""
    resp = httpx.post(server.api + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    events = []
    for block in resp.text.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if lines:
            fields = dict(ln.split(": ", 1) for ln in lines)
            events.append((fields["event"], json.loads(fields["data"])))
    return resp, events


def test_generations_stream_with_the_sdk(srv):
    size = example_image().size
    stream = client(srv).images.generate(model=MODEL, prompt="Convert to quick pencil sketch", stream=True,
                                         partial_images=2, extra_body={"image": data_uri(), "steps": 4, "seed": 21})
    events = list(stream)
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert [type(e).__name__ for e in events] == ["ImageGenPartialImageEvent"] * 2 + ["ImageGenCompletedEvent"]
    assert [e.partial_image_index for e in partials] == [0, 1]
    for e in partials + completed:
        assert png_of(e.b64_json).size == size and e.size == f"{size[0]}x{size[1]}"
        assert e.output_format == "png" and abs(e.created_at - time.time()) < 120
    (done,) = completed
    assert done.usage.input_tokens == done.usage.total_tokens > 0 and done.usage.input_tokens_details.image_tokens > 0
    assert done.seed == 21 and done.image_index == 0  # extra fields
    # previews do not change the result: the same request without streaming gives the same bytes
    plain = client(srv).images.generate(model=MODEL, prompt="Convert to quick pencil sketch", response_format="b64_json",
                                        extra_body={"image": data_uri(), "steps": 4, "seed": 21})
    assert plain.data[0].b64_json == done.b64_json


def test_edits_stream_with_the_sdk_and_no_partial_images(srv):
    stream = client(srv).images.edit(image=("in.png", png_bytes(), "image/png"), prompt="make it snowy", stream=True,
                                     extra_body={"steps": 2, "seed": 4})
    events = list(stream)  # partial_images defaults to 0: only the completed event
    assert [e.type for e in events] == ["image_edit.completed"]
    assert type(events[0]).__name__ == "ImageEditCompletedEvent" and events[0].seed == 4
    assert png_of(events[0].b64_json).size == example_image().size

    stream = client(srv).images.edit(image=("in.png", png_bytes(), "image/png"), prompt="make it snowy", stream=True,
                                     partial_images=1, extra_body={"steps": 3, "seed": 4})
    assert [(e.type, getattr(e, "partial_image_index", None)) for e in stream] == [
        ("image_edit.partial_image", 0), ("image_edit.completed", None)]


def test_n2_streams_one_completed_event_per_image(srv):
    stream = client(srv).images.generate(model=MODEL, prompt="p", n=2, stream=True, partial_images=1,
                                         extra_body={"image": data_uri(), "steps": 2, "seed": 100})
    events = list(stream)
    assert [(e.type.rsplit(".", 1)[1], e.image_index) for e in events] == [
        ("partial_image", 0), ("partial_image", 1), ("completed", 0), ("completed", 1)]
    assert [e.seed for e in events[2:]] == [100, 101]
    assert events[2].b64_json != events[3].b64_json
    assert events[2].usage == events[3].usage  # the request's usage, repeated (count it once)


def test_progress_events_on_request(srv):
    resp, events = raw_events(srv, {"model": MODEL, "prompt": "p", "image": data_uri(), "steps": 5, "strength": 0.5,
                                    "stream": True, "stream_progress": True, "partial_images": 1})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-request-id"] and resp.headers["cache-control"] == "no-cache"
    names = [name for name, _ in events]
    assert all(name == data["type"] for name, data in events)
    progress = [(d["step"], d["total_steps"]) for n, d in events if n == "image_generation.progress"]
    assert progress == [(0, 3), (1, 3), (2, 3), (3, 3)]  # img2img: 5 steps from index int(0.5 * 5) = 2
    assert names.index("image_generation.partial_image") > names.index("image_generation.progress")
    assert names[-1] == "image_generation.completed"


@pytest.mark.parametrize("extra,fragment", [({"steps": 0}, "'steps'"), ({"partial_images": 4}, "'partial_images'"),
                                            ({"partial_images": -1}, "'partial_images'"),
                                            ({"stream": "yes"}, "'stream'"), ({"image": "%%%"}, "'image'")])
def test_invalid_streaming_request_is_a_plain_json_400(srv, extra, fragment):
    with pytest.raises(openai.BadRequestError) as exc:
        client(srv).images.generate(model=MODEL, prompt="p", stream=True,
                                    extra_body={"image": data_uri(), "steps": 2, **extra})
    assert fragment in exc.value.message
    assert exc.value.response.headers["content-type"] == "application/json"


def test_unknown_model_and_missing_key_are_json_errors_before_the_stream(srv):
    with pytest.raises(openai.NotFoundError):
        client(srv).images.generate(model="dall-e-3", prompt="p", stream=True, extra_body={"image": data_uri()})
    anonymous = OpenAI(base_url=srv.api, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.images.edit(image=("in.png", png_bytes(), "image/png"), prompt="p", stream=True)


def _open_stream(server, body: dict) -> tuple[httpx.Client, httpx.Response]:
    http = httpx.Client(timeout=120)
    req = http.build_request("POST", server.api + "/images/generations", json=body,
                             headers={"Authorization": f"Bearer {KEY}"})
    return http, http.send(req, stream=True)


def test_disconnect_mid_stream_drops_the_job(srv):
    body = {"model": MODEL, "prompt": "p", "image": data_uri(), "steps": 50, "stream": True, "stream_progress": True}
    aborted, dropped = srv.metric("step1x_jobs_total", outcome="aborted"), srv.metric(
        "step1x_jobs_total", outcome="dropped_disconnect")
    http_a, running = _open_stream(srv, {**body, "seed": 1})
    lines = running.iter_lines()
    assert wait_until(lambda: '"step":2' in next(lines), 60)  # the job is running and streaming progress
    http_b, queued = _open_stream(srv, {**body, "seed": 2, "steps": 49})  # another batch key: waits in the queue
    assert wait_until(lambda: srv.metric("step1x_queue_depth") == 1, 30)
    queued.close()
    http_b.close()  # the waiting client goes away: its job leaves the queue unseen
    assert wait_until(lambda: srv.metric("step1x_queue_depth") == 0, 10)
    running.close()
    http_a.close()  # the streaming client goes away: its batch stops between steps
    assert wait_until(lambda: srv.metric("step1x_jobs_total", outcome="aborted") == aborted + 1, 30)
    assert wait_until(lambda: srv.metric("step1x_running_jobs") == 0, 10)
    assert srv.metric("step1x_jobs_total", outcome="dropped_disconnect") == dropped + 2
    # and the server still streams
    assert [e.type for e in client(srv).images.generate(model=MODEL, prompt="p", stream=True,
                                                        extra_body={"image": data_uri(), "steps": 1})] == [
        "image_generation.completed"]


class _FailingPipeline:
    """Runs one step, then fails: the error reaches the client as an SSE `error` event."""

    def info(self):
        return {"preset": "dev", "version": "v1.1"}

    def prepare(self, req):
        return PreparedEdit(request=req, original_size=req.image.size, resized=req.image, seeds=(1,), key=("k",))

    def run(self, batch, *, on_step=None, **kw):
        on_step(1, 2)
        raise RuntimeError("boom")

    def release_memory(self):
        pass


def test_failure_after_the_stream_started_is_an_error_event(tmp_path):
    server = start_server(dev_settings(tmp_path, api_keys=KEY), pipeline_factory=_FailingPipeline)
    try:
        resp, events = raw_events(server, {"model": MODEL, "prompt": "p", "image": data_uri(), "stream": True,
                                           "stream_progress": True})
        assert resp.status_code == 200
        assert [n for n, _ in events] == ["image_generation.progress", "image_generation.progress", "error"]
        err = events[-1][1]
        assert err["type"] == "error" and err["error"]["type"] == "server_error"
        assert err["error"]["code"] == "pipeline_error" and err["error"]["param"] == resp.headers["x-request-id"]
        with pytest.raises(openai.APIError) as exc:  # the SDK raises with the message
            list(client(server).images.generate(model=MODEL, prompt="p", stream=True,
                                                extra_body={"image": data_uri()}))
        assert "The pipeline failed: RuntimeError" in exc.value.message
    finally:
        server.stop()


def test_openapi_documents_the_event_stream(tmp_path):
    from step1x_edit.api.app import create_app
    from step1x_edit.settings import Settings

    doc = create_app(Settings(storage_dir=tmp_path)).openapi()
    for path in ("/v1/images/generations", "/v1/images/edits"):
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        refs = {r["$ref"].rsplit("/", 1)[1] for r in content["text/event-stream"]["x-itemSchema"]["oneOf"]}
        assert refs == {"PartialImageEvent", "CompletedEvent", "ProgressEvent", "StreamErrorEvent"}
        assert all(name in doc["components"]["schemas"] for name in refs)
    props = doc["components"]["schemas"]["GenerationRequest"]["properties"]
    partial = props["partial_images"]
    assert (partial["type"], partial["minimum"], partial["maximum"], partial["default"]) == ("integer", 0, 3, 0)
    form = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["stream"]["type"] == "boolean" and "partial_images" in form["properties"]
    json.dumps(doc)


def test_many_concurrent_streams_each_get_their_own_events(srv):
    results: dict[int, list[str]] = {}

    def one(seed: int) -> None:
        stream = client(srv).images.generate(model=MODEL, prompt="p", stream=True, partial_images=1,
                                             extra_body={"image": data_uri(), "steps": 2, "seed": seed})
        results[seed] = [f"{e.type}:{getattr(e, 'seed', '')}" for e in stream]

    threads = [threading.Thread(target=one, args=(s,)) for s in (7, 8, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {s: ["image_generation.partial_image:", f"image_generation.completed:{s}"] for s in (7, 8, 9)}
