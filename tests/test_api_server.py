"""The HTTP service end to end: a real uvicorn server with the real pipeline (dev preset, size level 256), driven
by the official `openai` SDK, by curl, and by raw sockets (for disconnects).

Two servers: `main` (API keys, loopback image links allowed for the local image site) and `aux` (open, links
checked, queue depth 1, small input limits, `data:` b64 style, a public base URL, 1 s link expiry).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import (KEY, SHARED, client, data_uri, dev_settings, example_image, image_site, png_bytes,  # noqa: E402
                             start_server, wait_until)

MODEL = "stepfun-ai/step1x-edit"
SEED_FILE = SHARED / "seed" / "step1x-edit-api.txt"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def main(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main")
    server = start_server(dev_settings(tmp, api_keys=KEY, allow_private_image_urls=True, queue_depth=4))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def aux(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aux")
    server = start_server(dev_settings(
        tmp, queue_depth=1, max_body_bytes=2 * 1024 * 1024, max_image_bytes=1024 * 1024,
        max_image_pixels=1_000_000, b64_json_style="data_uri", public_base_url="https://img.example.test/base",
        url_expiry_s=3, janitor_interval_s=0.5))
    yield server
    server.stop()


def decode_b64(value: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(value.removeprefix("data:image/png;base64,"))))


# --- the seed's own examples ----------------------------------------------------------------------------------------
def test_seed_python_example(main, monkeypatch):
    monkeypatch.setenv("BASE_URL", main.api)
    monkeypatch.setenv("API_KEY", KEY)
    image_base64_string = base64.b64encode(png_bytes()).decode()
    # --- verbatim from the seed, with the placeholder filled in ---
    client = OpenAI(
        base_url=os.getenv("BASE_URL", "https://api.umodelverse.ai/v1"),
        api_key=os.getenv("API_KEY", "$MODELVERSE_API_KEY")
    )
    response = client.images.generate(
        model="stepfun-ai/step1x-edit",
        prompt="Convert to quick pencil sketch",
        extra_body={
            "image": f"data:image/png;base64,{image_base64_string}",
            "negative_prompt": "blurry, low quality"
        }
    )
    print(response.data[0].url)
    # ---
    assert abs(response.created - time.time()) < 120
    url = response.data[0].url
    assert url.startswith(main.base_url + "/v1/files/images/") and "expires=" in url and "sig=" in url
    assert response.data[0].b64_json is None and isinstance(response.data[0].seed, int)
    fetched = httpx.get(url, timeout=30)  # links need no key: they are signed
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(fetched.content))
    assert out.format == "PNG" and out.size == example_image().size
    usage = response.usage
    details = usage.input_tokens_details
    assert details.text_tokens > 0 and details.image_tokens > 0
    assert usage.input_tokens == usage.total_tokens == details.text_tokens + details.image_tokens


SEED_CURL = """curl --location 'https://api.umodelverse.ai/v1/images/generations' \\
--header "Authorization: Bearer $MODELVERSE_API_KEY" \\
--header 'Content-Type: application/json' \\
--data '{
"model": "stepfun-ai/step1x-edit",
"prompt": "Convert to quick pencil sketch",
"image": "data:image/png;base64,{image_base64_string}",
"negative_prompt": "blurry, low quality"
}'"""


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_seed_curl_example_byte_for_byte(main):
    if SEED_FILE.is_file():
        assert SEED_CURL in SEED_FILE.read_text(encoding="utf-8")
    # A real photo, shrunk so that the base64 fits in one command-line argument (Linux caps one at 128 KiB).
    command = SEED_CURL.replace("https://api.umodelverse.ai", main.base_url).replace(
        "{image_base64_string}", base64.b64encode(png_bytes()).decode())
    done = subprocess.run(["bash", "-c", command + " --silent --show-error"], capture_output=True, timeout=120,
                          env={**os.environ, "MODELVERSE_API_KEY": KEY})
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert set(body) == {"created", "data", "usage"}
    assert set(body["data"][0]) == {"url", "seed"}
    assert body["usage"]["input_tokens_details"]["image_tokens"] > 0
    png = httpx.get(body["data"][0]["url"], timeout=30).content
    assert Image.open(io.BytesIO(png)).size == example_image().size


# --- determinism, n, formats ----------------------------------------------------------------------------------------
def test_same_seed_gives_identical_bytes_in_both_formats(main):
    c = client(main)
    kwargs = dict(model=MODEL, prompt="make the sky purple")
    extra = {"image": data_uri(), "seed": 1234, "steps": 2}
    first = c.images.generate(**kwargs, response_format="b64_json", extra_body=extra)
    second = c.images.generate(**kwargs, response_format="b64_json", extra_body=extra)
    assert first.data[0].b64_json == second.data[0].b64_json
    assert first.data[0].seed == second.data[0].seed == 1234
    assert not first.data[0].b64_json.startswith("data:")  # plain base64 by default (OpenAI's form)
    via_url = c.images.generate(**kwargs, extra_body=extra)
    assert httpx.get(via_url.data[0].url, timeout=30).content == base64.b64decode(first.data[0].b64_json)


def test_random_seed_is_reported_and_reproduces_the_image(main):
    c = client(main)
    extra = {"image": base64.b64encode(png_bytes()).decode(), "steps": 1}  # bare base64 this time
    first = c.images.generate(model=MODEL, prompt="p", response_format="b64_json", extra_body=extra)
    seed = first.data[0].seed
    assert 0 <= seed < 2**63
    again = c.images.generate(model=MODEL, prompt="p", response_format="b64_json", extra_body={**extra, "seed": seed})
    assert again.data[0].b64_json == first.data[0].b64_json


def test_n4_gives_four_distinct_images_with_consecutive_seeds(main):
    resp = client(main).images.generate(model=MODEL, prompt="add snow", n=4, response_format="b64_json",
                                        extra_body={"image": data_uri(), "seed": 7, "steps": 2})
    assert [d.seed for d in resp.data] == [7, 8, 9, 10]
    blobs = [d.b64_json for d in resp.data]
    assert len(set(blobs)) == 4
    assert all(decode_b64(b).size == example_image().size for b in blobs)
    # image i is reproducible alone with seed + i — up to float rounding: fp32 kernels on a batch of 4 and of 1
    # round differently, so a few pixels may differ by one level (the same request twice is byte-identical).
    third = client(main).images.generate(model=MODEL, prompt="add snow", response_format="b64_json",
                                         extra_body={"image": data_uri(), "seed": 9, "steps": 2})
    alone = np.asarray(decode_b64(third.data[0].b64_json), dtype=int)
    batched = np.asarray(decode_b64(blobs[2]), dtype=int)
    assert np.abs(alone - batched).max() <= 2 and (alone != batched).mean() < 0.01


def test_size_picks_the_working_area_and_other_sizes_are_ignored(main):
    c = client(main)
    extra = {"image": data_uri(), "steps": 1, "seed": 11}
    default = c.images.generate(model=MODEL, prompt="p", response_format="b64_json", extra_body=extra)
    ignored = c.images.generate(model=MODEL, prompt="p", response_format="b64_json", size="1536x1024",
                                extra_body=extra)
    larger = c.images.generate(model=MODEL, prompt="p", response_format="b64_json", size="512x512",
                               extra_body=extra)
    assert ignored.data[0].b64_json == default.data[0].b64_json
    # the encoder sees the image at the working size: more image tokens at 512 than at the server's 256
    assert larger.usage.input_tokens_details.image_tokens > default.usage.input_tokens_details.image_tokens
    assert decode_b64(larger.data[0].b64_json).size == example_image().size  # output keeps the input's size


# --- the multipart endpoint ---------------------------------------------------------------------------------------
def test_sdk_images_edit_multipart_matches_json_endpoint(main):
    c = client(main)
    png = png_bytes()
    extra = {"seed": 5, "steps": 2, "guidance_scale": 1, "strength": 1.0, "negative_prompt": "", "stream": False}
    edited = c.images.edit(image=("in.png", png, "image/png"), prompt="make it night", n=2,
                           response_format="b64_json", size="auto", extra_body=extra)
    assert [d.seed for d in edited.data] == [5, 6]
    generated = c.images.generate(model=MODEL, prompt="make it night", n=2, response_format="b64_json",
                                  size="auto", extra_body={**extra, "image": data_uri(png)})
    assert [d.b64_json for d in edited.data] == [d.b64_json for d in generated.data]
    # guidance 1 skips the negative branch: fewer text tokens than a guided request
    guided = c.images.generate(model=MODEL, prompt="make it night", response_format="b64_json",
                               extra_body={"image": data_uri(png), "seed": 5, "steps": 1, "guidance_scale": 2.0})
    assert guided.usage.input_tokens_details.text_tokens > edited.usage.input_tokens_details.text_tokens


def test_sdk_images_edit_with_a_list_and_a_url_response(main):
    c = client(main)
    resp = c.images.edit(image=[("in.png", png_bytes(), "image/png")], prompt="p", model=MODEL,
                         extra_body={"steps": 1})
    assert resp.data[0].url.startswith(main.base_url)
    with pytest.raises(openai.BadRequestError, match="exactly one input image"):
        c.images.edit(image=[("a.png", png_bytes(), "image/png"), ("b.png", png_bytes(), "image/png")], prompt="p")


def test_raw_multipart_empty_strings_are_defaults(main):
    files = {"image": ("in.jpg", _jpeg(), "image/jpeg")}
    data = {"prompt": "p", "n": "", "seed": "", "negative_prompt": "", "steps": "1", "response_format": "b64_json",
            "mask": "", "user": "someone"}
    r = httpx.post(main.api + "/images/edits", files=files, data=data, headers=_auth(), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 1 and body["data"][0]["seed"] >= 0


@pytest.mark.parametrize("data,fragment", [
    ({"prompt": "p", "n": "five"}, "'n'"),
    ({"prompt": "p", "steps": "0"}, "'steps'"),
    ({"prompt": "p", "stream": "sure"}, "'stream'"), ({"prompt": "p", "partial_images": "4"}, "'partial_images'"),
    ({"prompt": "p", "guidance_scale": "abc"}, "'guidance_scale'"),
    ({"prompt": ""}, "'prompt'"),
    ({"n": "1"}, "Missing required field 'prompt'"),
])
def test_multipart_validation(main, data, fragment):
    r = httpx.post(main.api + "/images/edits", files={"image": ("a.png", png_bytes(), "image/png")}, data=data,
                   headers=_auth(), timeout=30)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]


def test_multipart_without_image_and_wrong_content_type(main):
    r = httpx.post(main.api + "/images/edits", data={"prompt": "p"}, files={"other": ("x", b"1")}, headers=_auth())
    assert r.status_code == 400 and r.json()["error"]["message"] == "Missing required field 'image'"
    r = httpx.post(main.api + "/images/edits", json={"prompt": "p"}, headers=_auth())
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


# --- image links ----------------------------------------------------------------------------------------------------
def _jpeg(size=(64, 48), orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    example_image(size).save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def test_image_link_fetched_and_exif_orientation_applied(main):
    with image_site() as site:
        site.add_bytes("/photo.jpg", _jpeg((64, 48), orientation=6), "image/jpeg")
        site.add_redirect("/short", "/photo.jpg")
        resp = client(main).images.generate(model=MODEL, prompt="p", response_format="b64_json",
                                            extra_body={"image": site.url("/short"), "steps": 1})
        assert decode_b64(resp.data[0].b64_json).size == (48, 64)  # the displayed orientation
        assert [h[0] for h in site.hits] == ["/short", "/photo.jpg"]
        with pytest.raises(openai.BadRequestError, match="HTTP 404"):
            client(main).images.generate(model=MODEL, prompt="p", extra_body={"image": site.url("/nope.png")})


def test_links_to_private_addresses_are_refused_without_traffic(aux):
    with image_site() as site:
        site.add_bytes("/a.png", png_bytes())
        for url in (site.url("/a.png"), site.url("/a.png", host="localhost"), "http://169.254.169.254/latest/",
                    "http://[::1]/a.png", "http://10.0.0.1/a.png"):
            with pytest.raises(openai.BadRequestError) as exc:
                client(aux).images.generate(model=MODEL, prompt="p", extra_body={"image": url})
            assert "'image'" in exc.value.message and "non-public" in exc.value.message
        with pytest.raises(openai.BadRequestError, match="scheme 'file'"):
            client(aux).images.generate(model=MODEL, prompt="p", extra_body={"image": "file:///etc/passwd"})
        assert site.hits == []


# --- validation and errors ------------------------------------------------------------------------------------------
BAD_FIELDS = [
    ({"n": 0}, "'n'"), ({"n": 5}, "'n'"), ({"n": "2"}, "'n'"), ({"n": 1.5}, "'n'"),
    ({"strength": 1.5}, "'strength'"), ({"strength": -0.1}, "'strength'"), ({"strength": "high"}, "'strength'"),
    ({"seed": -2}, "'seed'"), ({"seed": 2**63}, "'seed'"), ({"seed": "42"}, "'seed'"),
    ({"steps": 0}, "'steps'"), ({"steps": 51}, "'steps'"), ({"steps": 2.5}, "'steps'"),
    ({"guidance_scale": 0.5}, "'guidance_scale'"), ({"guidance_scale": 11}, "'guidance_scale'"),
    ({"negative_prompt": ["a"]}, "'negative_prompt'"), ({"response_format": "png"}, "'response_format'"),
    ({"stream": "true"}, "'stream'"), ({"partial_images": 4}, "'partial_images'"), ({"image": ""}, "'image'"), ({"image": "%%%notbase64"}, "'image'"),
    ({"image": base64.b64encode(b"just some text, not an image").decode()}, "'image'"),
    ({"image": base64.b64encode(b"GIF89a" + b"\0" * 30).decode()}, "'image'"),
    ({"output_format": "gif"}, "'output_format'"), ({"output_format": "PNG"}, "'output_format'"),
    ({"output_compression": 101}, "'output_compression'"), ({"output_compression": -1}, "'output_compression'"),
    ({"output_compression": 50.5}, "'output_compression'"), ({"output_compression": "50"}, "'output_compression'"),
]


@pytest.mark.parametrize("extra,fragment", BAD_FIELDS, ids=[str(e[0])[:30] for e in BAD_FIELDS])
def test_every_invalid_field_is_a_400_naming_it(main, extra, fragment):
    body = {"image": data_uri(), **extra}
    with pytest.raises(openai.BadRequestError) as exc:
        client(main).images.generate(model=MODEL, prompt="p", extra_body=body)
    err = exc.value
    assert fragment in err.message and err.message.startswith("Error code: 400 - ")
    assert err.type == "invalid_request_error" and err.code
    assert err.param == err.response.headers["x-request-id"]  # param carries the request id (as the seed says)


@pytest.mark.parametrize("body,fragment", [
    ({"prompt": "p", "image": "x"}, "Missing required field 'model'"),
    ({"model": MODEL, "image": "x"}, "Missing required field 'prompt'"),
    ({"model": MODEL, "prompt": "p"}, "Missing required field 'image'"),
    ([1, 2], "JSON object"),
])
def test_missing_fields_and_non_object_bodies(main, body, fragment):
    r = httpx.post(main.api + "/images/generations", json=body, headers=_auth())
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]


def test_malformed_json_and_missing_content_type(main):
    r = httpx.post(main.api + "/images/generations", content=b'{"model": ', headers=_auth("application/json"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(main.api + "/images/generations", content=b'{"model": "x"}', headers=_auth())
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_unknown_model_is_404(main):
    with pytest.raises(openai.NotFoundError) as exc:
        client(main).images.generate(model="dall-e-3", prompt="p", extra_body={"image": data_uri()})
    assert "'dall-e-3'" in exc.value.message and exc.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client(main).images.edit(image=("a.png", png_bytes(), "image/png"), prompt="p", model="gpt-image-1")
    with pytest.raises(openai.NotFoundError):
        client(main).models.retrieve("gpt-4o")


def test_auth(main):
    r = httpx.post(main.api + "/images/generations", json={"model": MODEL})
    assert r.status_code == 401 and r.json()["error"]["message"].startswith("Missing API key")
    assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["param"] == r.headers["x-request-id"]
    wrong = OpenAI(base_url=main.api, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        wrong.images.generate(model=MODEL, prompt="p", extra_body={"image": data_uri()})
    assert "Incorrect API key" in exc.value.message and "wrong-key" not in exc.value.message
    with pytest.raises(openai.AuthenticationError):
        wrong.images.edit(image=("a.png", png_bytes(), "image/png"), prompt="p")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    # auth comes before anything else: even a malformed body gets 401 without a key
    assert httpx.post(main.api + "/images/generations", content=b"{").status_code == 401
    for open_path in ("/health", "/ready", "/openapi.json"):
        assert httpx.get(main.base_url + open_path).status_code == 200, open_path
    assert httpx.get(main.base_url + "/metrics").status_code == 401  # metrics need the key too (when keys are set)
    assert httpx.get(main.base_url + "/metrics", headers=_auth()).status_code == 200


def test_request_id_on_every_response(main):
    responses = [
        httpx.get(main.base_url + "/health"), httpx.get(main.base_url + "/nope"),
        httpx.delete(main.base_url + "/health"), httpx.get(main.api + "/models"),
        httpx.get(main.api + "/models", headers=_auth()), httpx.get(main.api + "/files/images/abc.png"),
        httpx.get(main.base_url + "/metrics"), httpx.get(main.base_url + "/openapi.json"),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids) and len(set(ids)) == len(ids)
    for r in responses:
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert r.json()["error"]["param"] == r.headers["x-request-id"]
    assert [r.status_code for r in responses[:3]] == [200, 404, 405]
    mine = httpx.get(main.base_url + "/health", headers={"x-request-id": "trace-42"})
    assert mine.headers["x-request-id"] == "trace-42"
    junk = httpx.get(main.base_url + "/health", headers={"x-request-id": "bad id with spaces"})
    assert junk.headers["x-request-id"].startswith("req_")


def test_models_endpoint(main):
    models = client(main).models.list()
    card = models.data[0]
    assert [m.id for m in models.data] == [MODEL]
    assert card.owned_by == "stepfun-ai" and card.version == "v1.1"
    assert card.preset == "dev" and card.dev_preset is True and card.ready is True
    assert client(main).models.retrieve(MODEL).id == MODEL


def test_signed_links_tampering_is_404(main):
    resp = client(main).images.generate(model=MODEL, prompt="p", extra_body={"image": data_uri(), "steps": 1})
    url = resp.data[0].url
    assert httpx.get(url).status_code == 200
    parts = urlsplit(url)
    sig = parts.query.split("sig=")[1]
    bad = [url.replace(sig, sig[:-1] + ("0" if sig[-1] != "0" else "1")), url.split("&sig=")[0],
           url.replace("expires=", "expires=9"), url.replace(parts.path, "/v1/files/images/" + "0" * 32 + ".png")]
    for link in bad:
        r = httpx.get(link)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_links_and_files_survive_a_restart(main):
    resp = client(main).images.generate(model=MODEL, prompt="p", extra_body={"image": data_uri(), "steps": 1})
    link = resp.data[0].url
    png = httpx.get(link).content
    # A second server on the same storage directory (the pipeline is not needed to serve files: never built).
    never = threading.Event()

    def no_pipeline():
        never.wait(300)
        raise RuntimeError("not needed by this test")

    settings = main.app.state.server.settings.model_copy()
    again = start_server(settings, pipeline_factory=no_pipeline, wait_ready=False)
    try:
        moved = again.base_url + link.removeprefix(main.base_url)
        fetched = httpx.get(moved)
        assert fetched.status_code == 200 and fetched.content == png
        assert httpx.get(again.base_url + "/ready").status_code == 503
    finally:
        never.set()
        again.stop()


def test_metrics_report_requests_queue_batches_and_stages(main):
    client(main).images.generate(model=MODEL, prompt="p", extra_body={"image": data_uri(), "steps": 1})
    text = httpx.get(main.base_url + "/metrics", headers=_auth()).text
    for needle in ('step1x_http_requests_total{method="POST",route="/v1/images/generations",status="200"}',
                   'step1x_http_requests_total{method="POST",route="/v1/images/generations",status="400"}',
                   "step1x_queue_depth 0.0", "step1x_batch_images_bucket", "step1x_batch_requests_count",
                   'step1x_stage_seconds_bucket{le="0.005",stage="queue"}', 'stage="pipeline_denoise"',
                   'stage="input"', 'stage="output"', 'stage="request"', "step1x_ready 1.0"):
        assert needle in text, needle


# --- limits, queue, disconnects (aux: queue depth 1, 2 MiB bodies, 1 MiB / 1 MP images) --------------------------
def test_body_and_image_limits_are_413(aux):
    c = client(aux)
    with pytest.raises(openai.APIStatusError) as exc:
        c.images.generate(model=MODEL, prompt="p", extra_body={"image": "A" * (3 * 1024 * 1024)})
    assert exc.value.status_code == 413 and "too large" in exc.value.message
    # chunked upload (no Content-Length): counted while streaming
    chunks = (b'{"model": "x", "image": "' + b"A" * 65536 * 40 + b'"}' for _ in range(1))
    r = httpx.post(aux.api + "/images/generations", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    noise = base64.b64encode(os.urandom(1_100_000)).decode()
    with pytest.raises(openai.APIStatusError) as exc:
        c.images.generate(model=MODEL, prompt="p", extra_body={"image": noise})
    assert exc.value.status_code == 413 and "'image'" in exc.value.message
    wide = io.BytesIO()
    Image.new("RGB", (1200, 1000)).save(wide, "PNG")
    with pytest.raises(openai.APIStatusError) as exc:
        c.images.generate(model=MODEL, prompt="p", extra_body={"image": data_uri(wide.getvalue())})
    assert exc.value.status_code == 413 and "1200x1000" in exc.value.message
    with pytest.raises(openai.APIStatusError) as exc:
        c.images.edit(image=("big.png", os.urandom(1_100_000), "image/png"), prompt="p")
    assert exc.value.status_code == 413


def test_data_uri_b64_style_public_base_url_and_link_expiry(aux):
    c = client(aux)
    resp = c.images.generate(model=MODEL, prompt="p", response_format="b64_json",
                             extra_body={"image": data_uri(), "steps": 1})
    assert resp.data[0].b64_json.startswith("data:image/png;base64,")
    resp = c.images.generate(model=MODEL, prompt="p", response_format="b64_json", output_format="jpeg",
                             extra_body={"image": data_uri(), "steps": 1})  # the media type follows the format
    assert resp.data[0].b64_json.startswith("data:image/jpeg;base64,/9j/")
    resp = c.images.generate(model=MODEL, prompt="p", extra_body={"image": data_uri(), "steps": 1, "seed": 3})
    url = resp.data[0].url
    assert url.startswith("https://img.example.test/base/v1/files/images/")
    local = aux.base_url + url.removeprefix("https://img.example.test/base")
    assert httpx.get(local).status_code == 200
    image_id = urlsplit(url).path.rsplit("/", 1)[1]
    stored = Path(aux.app.state.server.settings.storage_dir) / image_id
    assert stored.is_file()
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    time.sleep(max(0.0, expires - time.time()) + 1.1)  # links expire after 3 s on this server
    assert httpx.get(local).status_code == 404
    assert wait_until(lambda: not stored.exists(), timeout=10)  # the janitor removed the file


def _raw_post(server, body: dict, key: str | None = None) -> socket.socket:
    """A request on a bare socket, so that the test can hang up while it waits."""
    payload = json.dumps(body).encode()
    port = int(server.base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    sock.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"{auth}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def test_queue_full_429_then_disconnects_drop_queued_and_abort_running_jobs(aux):
    base = {"model": MODEL, "prompt": "p", "image": data_uri(), "steps": 50}
    calls_before = aux.metric("step1x_batch_requests_count")
    running = _raw_post(aux, {**base, "seed": 1})
    assert wait_until(lambda: aux.metric("step1x_running_jobs") == 1, 30)
    queued = _raw_post(aux, {**base, "seed": 2})
    assert wait_until(lambda: aux.metric("step1x_queue_depth") == 1, 30)

    with pytest.raises(openai.RateLimitError) as exc:
        client(aux).images.generate(model=MODEL, prompt="p", extra_body={"image": data_uri(), "steps": 1})
    assert "queue is full" in exc.value.message and int(exc.value.response.headers["retry-after"]) >= 1

    queued.close()  # the waiting client goes away: its job leaves the queue unseen
    assert wait_until(lambda: aux.metric("step1x_queue_depth") == 0, 10)
    assert wait_until(lambda: aux.metric("step1x_jobs_total", outcome="dropped_disconnect") == 1, 10)
    running.close()  # the running client goes away: its batch stops between steps
    assert wait_until(lambda: aux.metric("step1x_jobs_total", outcome="aborted") == 1, 30)
    assert wait_until(lambda: aux.metric("step1x_running_jobs") == 0, 10)
    assert aux.metric("step1x_batch_requests_count") == calls_before + 1  # the queued job never ran
    assert aux.metric("step1x_jobs_total", outcome="rejected_full") == 1
    # and the server still works
    resp = client(aux).images.generate(model=MODEL, prompt="p", extra_body={"image": data_uri(), "steps": 1})
    assert resp.data[0].url


def test_concurrent_compatible_requests_share_a_batch(main):
    calls_before = main.metric("step1x_batch_requests_count")
    blocker = _raw_post(main, {"model": MODEL, "prompt": "p", "image": data_uri(), "steps": 6}, key=KEY)
    assert wait_until(lambda: main.metric("step1x_running_jobs") == 1, 30)
    results: list[object] = []

    def one(seed: int) -> None:
        results.append(client(main).images.generate(
            model=MODEL, prompt="p", response_format="b64_json",
            extra_body={"image": data_uri(), "steps": 2, "seed": seed}))

    threads = [threading.Thread(target=one, args=(s,)) for s in (100, 200, 300)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    blocker.close()
    assert sorted(r.data[0].seed for r in results) == [100, 200, 300]
    # the blocker's call, then one call for the three requests that waited together
    assert main.metric("step1x_batch_requests_count") - calls_before == 2
    assert main.metric("step1x_batch_requests_sum") >= 4


def _auth(content_type: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {KEY}"}
    if content_type:
        headers["Content-Type"] = content_type
    return headers
