"""Every request field of `api/protocol.EditParams` reaches the same place through both endpoints: the JSON body of
/v1/images/generations and the multipart form of /v1/images/edits. A field added to the protocol without a sample
below fails `test_every_field_has_a_sample`; a field one endpoint drops fails the comparison."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import sys

import httpx
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, dev_settings, png_bytes, start_server  # noqa: E402

from step1x_edit.api.protocol import EditParams  # noqa: E402
from step1x_edit.pipeline.types import EditResult, PreparedEdit, Preview  # noqa: E402

MODEL = "stepfun-ai/step1x-edit"
AUTH = {"Authorization": f"Bearer {KEY}"}
# a value other than the default for every field
SAMPLES = {"prompt": "  two  spaces ", "n": 2, "strength": 0.5, "seed": 123, "steps": 7, "guidance_scale": 3.5,
           "negative_prompt": " neg ", "response_format": "b64_json", "size": "768x768", "stream": True,
           "partial_images": 2, "stream_progress": True, "loras": [{"name": "fix-hand", "scale": 0.5}],
           "output_format": "webp", "output_compression": 50}


class Recorder:
    """A pipeline stand-in that records each prepared request and answers with blank images."""

    def __init__(self) -> None:
        self.requests: list = []

    def info(self) -> dict:
        return {"preset": "dev", "version": "v1.1"}

    def prepare(self, req):
        self.requests.append(req)
        seeds = tuple(max(req.seed, 0) + i for i in range(req.n))
        return PreparedEdit(request=req, original_size=req.image.size, resized=req.image, seeds=seeds, key=("k",))

    def run(self, batch, *, on_step=None, on_preview=None, should_stop=None):
        out = []
        for j, p in enumerate(batch):
            blank = [Image.new("RGB", p.original_size) for _ in p.seeds]
            if p.request.partial_images and on_preview is not None:
                on_preview(j, Preview(1, 2, blank))
            on_step(1, 1)
            out.append(EditResult(blank, list(p.seeds), 1, 1))
        return out

    def release_memory(self) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    recorder = Recorder()
    srv = start_server(dev_settings(tmp_path_factory.mktemp("fields"), api_keys=KEY), pipeline_factory=lambda: recorder)
    srv.recorder = recorder
    yield srv
    srv.stop()


def _image(server, item: dict) -> tuple:
    """An output image as (format, digest of its bytes), from a link (with its content type) or from base64."""
    if "url" in item:
        r = httpx.get(item["url"], timeout=30)
        data, kind = r.content, r.headers["content-type"]
    else:
        data, kind = base64.b64decode(item["b64_json"].split(",")[-1]), "b64"
    return kind, Image.open(io.BytesIO(data)).format, hashlib.sha256(data).hexdigest()


def _observe(server, response: httpx.Response) -> tuple:
    """What a field can change: the pipeline's request (all but the image) and the answer's shape and images."""
    assert response.status_code == 200, response.text[:300]
    req = dataclasses.asdict(dataclasses.replace(server.recorder.requests[-1], image=None))
    if response.headers["content-type"].startswith("text/event-stream"):
        # (event names start with image_generation. / image_edit. by endpoint: compare what follows)
        events = [json.loads(line[len("data:"):]) for line in response.text.splitlines() if line.startswith("data:")]
        shape = [(e["type"].split(".")[-1], e.get("output_format"), e.get("b64_json") and _image(server, e))
                 for e in events]
    else:
        data = response.json()["data"]
        shape = (sorted(data[0]), [_image(server, item) for item in data])
    return req, shape


def _json(server, fields: dict) -> httpx.Response:
    body = {"model": MODEL, "prompt": "p", "image": "data:image/png;base64," + __import__("base64").b64encode(
        png_bytes()).decode(), **fields}
    return httpx.post(server.api + "/images/generations", json=body, headers=AUTH, timeout=60)


def _form(server, fields: dict) -> httpx.Response:
    data = {"prompt": "p", **{k: json.dumps(v) if isinstance(v, (bool, list)) else str(v) for k, v in fields.items()}}
    return httpx.post(server.api + "/images/edits", data=data, files={"image": ("i.png", png_bytes(), "image/png")},
                      headers=AUTH, timeout=60)


def test_every_field_has_a_sample():
    assert set(SAMPLES) == set(EditParams.model_fields)


@pytest.mark.parametrize("field", sorted(SAMPLES))
def test_field_reaches_the_pipeline_alike_through_json_and_multipart(server, field):
    base = {"stream": True} if field in ("partial_images", "stream_progress") else {}  # (they shape streams only)
    if field == "output_compression":
        base = {"output_format": "jpeg"}  # (the quality of jpeg and webp; png is lossless and ignores it)
    fields = {**base, field: SAMPLES[field]}
    default = _observe(server, _json(server, base))
    by_json = _observe(server, _json(server, fields))
    by_form = _observe(server, _form(server, fields))
    assert by_json == by_form
    assert by_json != default, f"{field} changed nothing"
