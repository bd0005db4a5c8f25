"""OpenAI's `output_format` (png | jpeg | webp) and `output_compression` (0-100) on both image endpoints: links
(extension and content type), `b64_json`, streams and their previews, all in the asked format, sent by the official
`openai` SDK as its own parameters. A real uvicorn server runs the real pipeline (dev preset, size level 256)."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, client, data_uri, dev_settings, example_image, png_bytes, start_server  # noqa: E402

MODEL = "stepfun-ai/step1x-edit"
AUTH = {"Authorization": f"Bearer {KEY}"}
# output_format -> (file extension, media type, what Pillow reads the bytes as)
KINDS = {"png": (".png", "image/png", "PNG"), "jpeg": (".jpg", "image/jpeg", "JPEG"),
         "webp": (".webp", "image/webp", "WEBP")}
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = start_server(dev_settings(tmp_path_factory.mktemp("formats"), api_keys=KEY, queue_depth=8))
    yield server
    server.stop()


def opened(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def b64_bytes(server, **fields) -> bytes:
    """One b64_json image from the JSON endpoint (plain httpx: any field, any value)."""
    body = {"model": MODEL, "prompt": "p", "image": data_uri(), "steps": 1, "seed": 3, "response_format": "b64_json",
            **fields}
    r = httpx.post(server.api + "/images/generations", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text[:300]
    return base64.b64decode(r.json()["data"][0]["b64_json"])


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])  # (png, the default, is what every other test gets)
def test_links_and_b64_in_each_format_on_both_endpoints(srv, fmt):
    ext, media, pil = KINDS[fmt]
    c = client(srv)
    size = example_image().size
    linked = c.images.generate(model=MODEL, prompt="p", n=2, output_format=fmt,
                               extra_body={"image": data_uri(), "seed": 5, "steps": 1})
    files = []
    for item in linked.data:
        assert urlsplit(item.url).path.endswith(ext)
        r = httpx.get(item.url, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == media
        assert opened(r.content).format == pil and opened(r.content).size == size
        files.append(r.content)
    assert files[0] != files[1]  # two images (seeds 5 and 6), each encoded on its own
    # the same request through the multipart endpoint (as client.images.edit sends it) as b64_json: the same bytes
    # (the encoding is deterministic, also when the images are encoded in parallel)
    edited = c.images.edit(image=("in.png", png_bytes(), "image/png"), prompt="p", n=2, output_format=fmt,
                           response_format="b64_json", extra_body={"seed": 5, "steps": 1})
    assert [base64.b64decode(d.b64_json) for d in edited.data] == files


def test_output_compression_is_the_jpeg_and_webp_quality_and_png_ignores_it(srv):
    for fmt in ("jpeg", "webp"):
        default = b64_bytes(srv, output_format=fmt)
        if fmt == "jpeg":
            assert b64_bytes(srv, output_format=fmt, output_compression=100) == default  # OpenAI's default: 100
        small = b64_bytes(srv, output_format=fmt, output_compression=10)
        assert opened(small).format == KINDS[fmt][2] and len(small) < len(default) * 0.7, (fmt, len(small), len(default))
    png = b64_bytes(srv)  # lossless: OpenAI's API applies output_compression to jpeg and webp only, so do we
    assert b64_bytes(srv, output_format="png", output_compression=0) == png


def test_form_fields_pick_the_format_too(srv):
    files = {"image": ("in.png", png_bytes(), "image/png")}
    r = httpx.post(srv.api + "/images/edits", files=files, headers=AUTH, timeout=120,
                   data={"prompt": "p", "steps": "1", "seed": "3", "output_format": "jpeg", "output_compression": "10",
                         "response_format": "b64_json"})
    assert r.status_code == 200, r.text[:300]
    assert base64.b64decode(r.json()["data"][0]["b64_json"]) == b64_bytes(srv, output_format="jpeg",
                                                                           output_compression=10)
    for data, field in (({"output_format": "gif"}, "'output_format'"), ({"output_compression": "101"},
                                                                        "'output_compression'")):
        r = httpx.post(srv.api + "/images/edits", files=files, headers=AUTH, data={"prompt": "p", **data})
        assert r.status_code == 400 and field in r.json()["error"]["message"]


def test_streams_and_their_previews_carry_the_format(srv):
    events = list(client(srv).images.generate(
        model=MODEL, prompt="p", stream=True, partial_images=1, output_format="webp", output_compression=50,
        extra_body={"image": data_uri(), "steps": 3, "seed": 9}))
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    for e in events:
        assert e.output_format == "webp" and opened(base64.b64decode(e.b64_json)).format == "WEBP"
    assert base64.b64decode(events[-1].b64_json) == b64_bytes(srv, output_format="webp", output_compression=50,
                                                              steps=3, seed=9)
    # the multipart endpoint, raw: the event data names the format of its bytes
    r = httpx.post(srv.api + "/images/edits", headers=AUTH, timeout=120,
                   files={"image": ("in.png", png_bytes(), "image/png")},
                   data={"prompt": "p", "steps": "2", "stream": "true", "partial_images": "1", "output_format": "jpeg"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    datas = [json.loads(line[len("data: "):]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [d["type"] for d in datas] == ["image_edit.partial_image", "image_edit.completed"]
    for d in datas:
        assert d["output_format"] == "jpeg" and opened(base64.b64decode(d["b64_json"])).format == "JPEG"
