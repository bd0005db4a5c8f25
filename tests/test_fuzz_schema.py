"""Schema fuzzing: schemathesis generates requests from the server's own OpenAPI document and sends them to a real
server on 127.0.0.1 (dev preset, size level 256, an API key configured).

Every operation is fuzzed in schemathesis' positive mode (requests the schema allows) and negative mode (requests
it forbids: wrong types, missing fields, bad media types, no or wrong key). Checks on every response: no 5xx
(`not_a_server_error`), and every error is the OpenAI body `{"error": {"message", "type", "param", "code"}}` with
the request id in `param` and in `x-request-id`. Random strings are almost never images, so a quarter of the
positive image requests get a real small PNG/JPEG/WebP (with `steps` and `n` capped to keep the pipeline quick)
and go all the way through the pipeline. Bounded: a fixed number of examples per operation and mode (about 300
requests in all), every request with a client timeout; the server must still answer /health and /ready after.
"""

from __future__ import annotations

import base64
import io
import os
import sys

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, data_uri, dev_settings, start_server  # noqa: E402

pytestmark = pytest.mark.timeout(600)

MODEL = "stepfun-ai/step1x-edit"
# (method, path) -> examples per generation mode. Operations without parameters have little to vary.
OPERATIONS = {
    ("POST", "/v1/images/generations"): 40,
    ("POST", "/v1/images/edits"): 40,
    ("GET", "/v1/models"): 10,
    ("GET", "/v1/models/{model_id}"): 25,
    ("GET", "/v1/files/images/{name}"): 25,
    ("GET", "/health"): 3,
    ("GET", "/ready"): 3,
    ("GET", "/metrics"): 3,
}
CLIENT_TIMEOUT_S = 60
SEEN: list[tuple[str, str, int]] = []  # (operation, mode, status) of every fuzzed request


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    server = start_server(dev_settings(tmp, api_keys=KEY, queue_depth=64, request_timeout_s=120,
                                       max_body_bytes=4 * 1024 * 1024, max_image_bytes=2 * 1024 * 1024),
                          offline_links=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json", timeout=30)


def _header(response, name: str) -> str | None:
    value = response.headers.get(name) or response.headers.get(name.lower())
    if isinstance(value, list):
        return value[0] if value else None
    return value


def openai_error_shape(ctx, response, case) -> None:
    """A schemathesis check: every 4xx/5xx is the OpenAI error object and carries the request id."""
    if response.status_code < 400:
        return None
    request_id = _header(response, "x-request-id")
    assert request_id, f"{response.status_code} without x-request-id"
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an error object: {body!r}"
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, f"error fields: {sorted(error)}"
    assert isinstance(error["message"], str) and error["message"].strip(), "empty error message"
    assert isinstance(error["type"], str) and error["type"], "empty error type"
    assert error["param"] == request_id, "error.param is not the request id"
    if response.status_code in (429, 503):
        assert _header(response, "retry-after"), f"{response.status_code} without Retry-After"
    return None


def _tiny_image(fmt: str, size: tuple[int, int], mode: str) -> bytes:
    img = Image.linear_gradient("L").resize(size).convert(mode)
    buf = io.BytesIO()
    img.convert("RGB" if fmt == "JPEG" and mode not in ("RGB", "L", "CMYK") else img.mode).save(buf, fmt)
    return buf.getvalue()


valid_images = st.builds(
    _tiny_image, st.sampled_from(["PNG", "JPEG", "WEBP"]),
    st.tuples(st.integers(1, 96), st.integers(1, 96)).filter(lambda wh: max(wh) <= 8 * min(wh)),
    st.sampled_from(["RGB", "L", "RGBA"]))


def _make_runnable(body: dict, image: bytes, *, multipart: bool) -> None:
    """Give a generated body a real input image and keep its pipeline cost small (the fuzzing is about the
    contract, not about 50-step, 4-image runs)."""
    body["image"] = image if multipart else "data:image/png;base64," + base64.b64encode(image).decode()
    body.pop("image[]", None)
    for name, cap in (("steps", 2), ("n", 2)):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            body[name] = min(value, cap)
        elif isinstance(value, str) and value.strip().isdigit():
            body[name] = str(min(int(value), cap))
        elif name == "steps" and value is None:  # the default (20) is exercised elsewhere; keep this quick
            body[name] = 1
    body.pop("size", None)


def test_every_documented_operation_is_fuzzed(api_schema):
    documented = set()
    for result in api_schema.get_all_operations():
        op = result.ok()
        documented.add((op.method.upper(), op.path))
    assert documented == set(OPERATIONS), documented ^ set(OPERATIONS)


# Negative mode needs something to get wrong: operations without parameters or body only run positive.
CASES = [(m, p, mode) for m, p in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode is GenerationMode.POSITIVE or p.startswith("/v1/")]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_fuzz_operation(api_schema, fuzz_server, method, path, mode):
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode)
    image_endpoint = path.startswith("/v1/images/")

    @given(data=st.data())
    @settings(max_examples=OPERATIONS[(method, path)], deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    def run(data):
        case = data.draw(strategy, label="case")
        if (image_endpoint and mode is GenerationMode.POSITIVE and isinstance(case.body, dict)
                and data.draw(st.integers(0, 3), label="runnable") == 0):
            _make_runnable(case.body, data.draw(valid_images, label="image"), multipart=path.endswith("edits"))
        response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=CLIENT_TIMEOUT_S)
        SEEN.append((f"{method} {path}", mode.value, response.status_code))
        case.validate_response(response, checks=[not_a_server_error, openai_error_shape])

    run()


def test_server_is_alive_and_well_after_fuzzing(fuzz_server):
    assert httpx.get(fuzz_server.base_url + "/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(fuzz_server.base_url + "/ready", timeout=10).status_code == 200
    r = httpx.post(fuzz_server.api + "/images/generations", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": MODEL, "prompt": "p", "image": data_uri(), "steps": 1, "response_format": "b64_json"})
    assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
    assert fuzz_server.metric("step1x_running_jobs") == 0 and fuzz_server.metric("step1x_queue_depth") == 0
    # The run was real: a few hundred requests, and the pipeline ran for some of them.
    if len(SEEN) >= 100:  # the whole module ran (not a -k selection)
        statuses = {s for _, _, s in SEEN}
        assert 200 in statuses and 400 in statuses and 401 in statuses and 404 in statuses
        assert any(op.startswith("POST") and status == 200 for op, _, status in SEEN)
        assert all(status < 500 for _, _, status in SEEN)

