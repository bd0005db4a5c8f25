"""Property tests (hypothesis) for the parts that take hostile input apart: image decoding, the `image` field,
multipart and JSON request parsing, and the address rule for image links.

The property is always the same: whatever comes in, the outcome is a value or one of *our* 4xx errors — never a
stray exception (which would be a 500), never a value outside the documented ranges. Bounded: each property runs
a fixed number of examples, no network, no pipeline.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from step1x_edit.api.errors import APIError, describe_validation_errors
from step1x_edit.api.images import ImageLimits, open_image, parse_image_field
from step1x_edit.api.links import is_public_address
from step1x_edit.api.protocol import SEED_MAX, EditFormParams, GenerationRequest, form_to_fields, validate_model
from step1x_edit.pipeline.imaging import to_rgb, working_size

LIMITS = ImageLimits(max_bytes=300_000, max_pixels=1000 * 1000)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
MODEL = "stepfun-ai/step1x-edit"


def _client_error(exc: APIError, *statuses: int) -> None:
    assert exc.status in (statuses or (400, 413)), (exc.status, exc.message)
    assert exc.message and exc.code


# --- image decoding -----------------------------------------------------------------------------------------------
def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@st.composite
def real_images(draw) -> bytes:
    """A small real PNG/JPEG/WebP in one of the modes clients send (palette, grey, alpha, 16-bit, CMYK)."""
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "WEBP"]))
    modes = {"PNG": ["RGB", "RGBA", "L", "LA", "P", "I;16", "1"], "JPEG": ["RGB", "L", "CMYK"],
             "WEBP": ["RGB", "RGBA"]}[fmt]
    mode = draw(st.sampled_from(modes))
    seed = draw(st.integers(0, 255))
    img = Image.linear_gradient("L").resize((w, h)).point(lambda v: (v + seed) % 256)
    return _encode(img.convert(mode), fmt)


def _decodes_or_refuses(data: bytes) -> None:
    try:
        img = open_image(data, LIMITS)
    except APIError as exc:
        _client_error(exc)
        return
    w, h = img.size
    assert w >= 1 and h >= 1 and w * h <= LIMITS.max_pixels
    rgb = to_rgb(img)  # what the pipeline does first: must work for every mode that decodes
    assert rgb.mode == "RGB" and rgb.size == img.size
    try:
        working_size(w, h, 256)
    except ValueError as exc:  # extreme aspect ratios: the pipeline's 400
        assert "aspect" in str(exc) or "narrow" in str(exc)


@FAST
@given(st.binary(max_size=2048))
def test_open_image_on_arbitrary_bytes(data):
    _decodes_or_refuses(data)


@FAST
@given(real_images(), st.data())
def test_open_image_on_damaged_real_images(data, draw):
    """Truncated, bit-flipped, spliced: every damaged image decodes (lossy formats are forgiving) or is a 400."""
    damage = draw.draw(st.sampled_from(["truncate", "flip", "splice", "none"]))
    blob = bytearray(data)
    if damage == "truncate":
        blob = blob[: draw.draw(st.integers(0, max(0, len(blob) - 1)))]
    elif damage == "flip":
        for _ in range(draw.draw(st.integers(1, 8))):
            i = draw.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << draw.draw(st.integers(0, 7))
    elif damage == "splice":
        i = draw.draw(st.integers(0, len(blob)))
        blob[i:i] = draw.draw(st.binary(min_size=1, max_size=64))
    _decodes_or_refuses(bytes(blob))
    if damage == "none":
        assert open_image(data, LIMITS).size >= (1, 1)


# --- the `image` field --------------------------------------------------------------------------------------------
@FAST
@given(st.text(max_size=400))
def test_image_field_on_arbitrary_text(text):
    try:
        ref = parse_image_field(text, LIMITS)
    except APIError as exc:
        _client_error(exc)
        assert "'image'" in exc.message
        return
    assert (ref.data is None) != (ref.url is None)
    if ref.url is not None:
        assert ref.url.lower().startswith(("http://", "https://"))


@FAST
@given(st.binary(min_size=1, max_size=3000), st.sampled_from(["", "data:image/png;base64,", "data:;base64,"]),
       st.lists(st.integers(0, 4000), max_size=5), st.booleans())
def test_base64_round_trips_with_whitespace_and_missing_padding(data, prefix, breaks, strip_padding):
    encoded = base64.b64encode(data).decode()
    if strip_padding:
        encoded = encoded.rstrip("=")
    for pos in sorted(breaks, reverse=True):  # line breaks anywhere, as MIME encoders put them
        pos = min(pos, len(encoded))
        encoded = encoded[:pos] + "\n" + encoded[pos:]
    text = prefix + encoded
    assume(not text.strip().lower().startswith(("http://", "https://")))
    assume(not (not prefix and ":" in text))
    assert parse_image_field(text, LIMITS).data == data


# --- request parsing ----------------------------------------------------------------------------------------------
FORM_NAMES = st.sampled_from(["prompt", "n", "seed", "steps", "strength", "guidance_scale", "negative_prompt",
                              "response_format", "size", "model", "stream", "stream_progress", "partial_images",
                              "user", "mask", "x"])
FORM_VALUES = st.one_of(
    st.text(max_size=30), st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.sampled_from(
        ["", " ", "1", "4", "0", "-1", "1e3", "nan", "inf", "-inf", "true", "false", "0x10", "1_000", "\u0662",
         "१", "٫5", "1.", ".5", "+3", "NaN", "Infinity", "url", "b64_json", MODEL, "512x512"]))


def _check_params(params) -> None:
    assert params.prompt and params.prompt.strip() and len(params.prompt) <= 8192
    assert params.n is None or 1 <= params.n <= 4
    assert params.steps is None or 1 <= params.steps <= 50
    assert params.seed is None or -1 <= params.seed <= SEED_MAX
    assert params.strength is None or (math.isfinite(params.strength) and 0 <= params.strength <= 1)
    assert params.guidance_scale is None or (math.isfinite(params.guidance_scale) and 1 <= params.guidance_scale <= 10)
    for name in ("n", "steps", "seed"):
        value = getattr(params, name)
        assert value is None or (type(value) is int), (name, value)


@FAST
@given(st.dictionaries(FORM_NAMES, FORM_VALUES, max_size=8))
def test_multipart_fields_parse_or_400(form):
    try:
        params = validate_model(EditFormParams, form_to_fields(form))
    except APIError as exc:
        _client_error(exc, 400)
        return
    _check_params(params)


@FAST
@given(st.integers(-(10**40), 10**40), st.sampled_from(["n", "seed", "steps"]))
def test_multipart_integers_are_exact(value, name):
    try:
        fields = form_to_fields({name: str(value)})
    except APIError as exc:
        _client_error(exc, 400)
        assert len(str(abs(value))) > 30  # only absurdly long numbers are refused here
        return
    assert fields[name] == value and type(fields[name]) is int


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
BODY_NAMES = st.sampled_from(["model", "prompt", "image", "n", "seed", "steps", "strength", "guidance_scale",
                              "negative_prompt", "response_format", "size", "stream", "partial_images", "user"])


@FAST
@given(st.dictionaries(BODY_NAMES, JSON_VALUES, max_size=10),
       st.fixed_dictionaries({"model": st.just(MODEL), "prompt": st.text(min_size=1, max_size=10),
                              "image": st.just("abc")}), st.booleans())
def test_json_bodies_validate_or_400(fields, base, with_base):
    body = {**base, **fields} if with_base else fields
    try:
        params = validate_model(GenerationRequest, body)
    except APIError as exc:
        _client_error(exc, 400)
        assert "'" in exc.message or "body" in exc.message.lower()  # names a field (or the body)
        return
    _check_params(params)
    assert isinstance(params.model, str) and isinstance(params.image, str) and params.image


@FAST
@given(st.lists(st.fixed_dictionaries({
    "loc": st.lists(st.one_of(st.text(max_size=8), st.integers(0, 5)), max_size=4).map(tuple),
    "type": st.sampled_from(["missing", "json_invalid", "int_type", "greater_than", "dict_type", "literal_error",
                             "string_pattern_mismatch", "x"]),
    "msg": st.text(max_size=20)}), max_size=8))
def test_validation_errors_always_give_one_sentence(errors):
    message, code = describe_validation_errors(errors)
    assert isinstance(message, str) and message and isinstance(code, str) and code


# --- the whole request path up to admission (in-process ASGI, engine not started: valid requests are 503) ---------
@pytest.fixture(scope="module")
def asgi_client(tmp_path_factory):
    from starlette.testclient import TestClient

    from step1x_edit.api.app import create_app
    from step1x_edit.settings import Settings

    app = create_app(Settings(storage_dir=tmp_path_factory.mktemp("props"), preset="dev",
                              max_body_bytes=64 * 1024, max_image_bytes=32 * 1024))
    return TestClient(app, raise_server_exceptions=False)  # no `with`: no lifespan, the pipeline is never built


def _assert_error_response(r, allowed: tuple[int, ...]) -> None:
    assert r.status_code in allowed, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == r.headers["x-request-id"]


@FAST
@given(st.one_of(st.binary(max_size=600),
                 st.builds(lambda d: json.dumps(d, allow_nan=True).encode(), st.dictionaries(BODY_NAMES, JSON_VALUES))))
def test_any_json_body_gets_a_clean_4xx_or_503(asgi_client, raw):
    r = asgi_client.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    _assert_error_response(r, (400, 404, 413, 503))


@FAST
@given(st.binary(max_size=600), st.sampled_from([
    "multipart/form-data; boundary=xyz", "multipart/form-data", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary="]))
def test_any_form_body_gets_a_clean_4xx_or_503(asgi_client, raw, ctype):
    body = raw if "xyz" not in ctype else b"--xyz\r\n" + raw + b"\r\n--xyz--\r\n"
    r = asgi_client.post("/v1/images/edits", content=body, headers={"content-type": ctype})
    _assert_error_response(r, (400, 404, 413, 503))


# --- the address rule for image links -----------------------------------------------------------------------------
@FAST
@given(st.integers(0, 2**32 - 1))
def test_ipv4_embedded_in_ipv6_is_judged_by_the_ipv4_address(n):
    v4 = ipaddress.IPv4Address(n)
    verdict = is_public_address(v4)
    mapped = ipaddress.IPv6Address(f"::ffff:{v4}")
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | n)
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (n << 80))
    assert is_public_address(mapped) == verdict
    assert is_public_address(nat64) == verdict
    assert is_public_address(sixtofour) == verdict
    if verdict:
        for net in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                    "100.64.0.0/10", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"):
            assert v4 not in ipaddress.ip_network(net)


@FAST
@given(st.integers(0, 2**128 - 1))
def test_ipv6_rule_never_admits_local_ranges(n):
    ip = ipaddress.IPv6Address(n)
    if is_public_address(ip):
        for net in ("::1/128", "fe80::/10", "fc00::/7", "ff00::/8", "::/128", "2001:db8::/32"):
            assert ip not in ipaddress.ip_network(net)
