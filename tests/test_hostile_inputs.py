"""Hostile inputs against the real server (dev preset, size level 256): broken and exotic images, bombs, odd
sizes and colour modes, bad text encodings, huge prompts, wrong JSON types, duplicate fields, out-of-range and
non-finite numbers, unknown models.

Each one gets the right 4xx with a message that names the problem — or, when it is a valid image after all
(1x1, 8:1, CMYK, palette, 16-bit, alpha, animated WebP/PNG), an output of the input's size. Animated images are
edited from their first frame; GIF is not an accepted format (PNG, JPEG, WebP only).
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import socket
import struct
import sys
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, dev_settings, example_image, png_bytes, start_server  # noqa: E402

pytestmark = pytest.mark.timeout(300)

MODEL = "stepfun-ai/step1x-edit"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_server(dev_settings(tmp_path_factory.mktemp("hostile"), api_keys=KEY, body_timeout_s=1.5),
                           offline_links=True)
    yield running
    running.stop()


# --- helpers --------------------------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def generate(server, image: bytes | str, **fields) -> httpx.Response:
    body = {"model": MODEL, "prompt": "make it brighter", "steps": 1, "guidance_scale": 1,
            "response_format": "b64_json",
            "image": image if isinstance(image, str) else "data:image/png;base64," + b64(image), **fields}
    return httpx.post(server.api + "/images/generations", json=body, headers=AUTH, timeout=120)


def post_raw(server, raw: bytes, content_type: str = "application/json", path: str = "/images/generations"):
    return httpx.post(server.api + path, content=raw, headers={**AUTH, "content-type": content_type}, timeout=120)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:400])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == r.headers["x-request-id"]
    return err


def output_size(r: httpx.Response) -> tuple[int, int]:
    assert r.status_code == 200, r.text[:400]
    return Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header claims width x height RGB pixels (a decompression bomb)."""
    rows = zlib.compress(b"\0" * ((width * 3 + 1) * 4), 9)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", rows) + _chunk(b"IEND", b""))


RGB = example_image((64, 48))
PNG, JPEG, WEBP = encode(RGB, "PNG"), encode(RGB, "JPEG", quality=90), encode(RGB, "WEBP", quality=80)


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _corrupt(data: bytes, at: int, junk: bytes) -> bytes:
    return data[:at] + junk + data[at + len(junk):]


# --- images that must be refused --------------------------------------------------------------------------------
REFUSED = [
    ("png-truncated-10%", PNG[: len(PNG) // 10], 400, "could not be decoded"),
    ("png-truncated-90%", PNG[: len(PNG) * 9 // 10], 400, "could not be decoded"),
    ("png-truncated-header", PNG[:20], 400, "'image'"),
    ("png-bad-idat", _corrupt(PNG, len(PNG) // 2, b"\xff" * 24), 400, "could not be decoded"),
    ("png-bad-header", _corrupt(PNG, 12, b"\0" * 16), 400, "not a PNG, JPEG or WebP"),
    ("jpeg-truncated-10%", JPEG[: len(JPEG) // 10], 400, "could not be decoded"),
    ("jpeg-truncated-60%", JPEG[: len(JPEG) * 6 // 10], 400, "truncated"),
    ("jpeg-bad-header", _corrupt(JPEG, 12, b"\0" * 16), 400, "could not be decoded"),
    ("webp-truncated-50%", WEBP[: len(WEBP) // 2], 400, "could not be decoded"),
    ("webp-bad-header", _corrupt(WEBP, 8, b"XXXX"), 400, "not a PNG, JPEG or WebP"),
    ("png-bomb-50000x50000", png_claiming(50_000, 50_000), 413, "too large"),
    ("png-bomb-20000x20000", png_claiming(20_000, 20_000), 413, "400000000 pixels"),
    ("png-bomb-5000x5000", png_claiming(5000, 5000), 413, "5000x5000 pixels"),
    ("png-5000x5000-real", encode(Image.new("L", (5000, 5000)), "PNG"), 413, "5000x5000"),
    ("png-text-chunk-bomb", PNG[:-12] + _chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 20_000_000, 9)) + PNG[-12:],
     400, "could not be decoded"),
    ("gif-animated", _animated("GIF"), 400, "not a PNG, JPEG or WebP"),
    ("tiff", encode(RGB, "TIFF"), 400, "not a PNG, JPEG or WebP"),
    ("bmp", encode(RGB, "BMP"), 400, "not a PNG, JPEG or WebP"),
    ("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 400, "not a PNG, JPEG or WebP"),
    ("html", b"<!doctype html><html><body>hello</body></html>", 400, "not a PNG, JPEG or WebP"),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 400, "not a PNG, JPEG or WebP"),
    ("empty-png-signature", b"\x89PNG\r\n\x1a\n", 400, "'image'"),
    ("aspect-9:1", encode(Image.new("RGB", (900, 100)), "PNG"), 400, "aspect ratio 900x100"),
    ("aspect-1:9", encode(Image.new("RGB", (10, 90)), "PNG"), 400, "aspect ratio 10x90"),
    ("aspect-1x1000", encode(Image.new("RGB", (1, 1000)), "PNG"), 400, "aspect ratio"),
]


@pytest.mark.parametrize("name,data,status,fragment", REFUSED, ids=[r[0] for r in REFUSED])
def test_broken_and_hostile_images_are_refused(server, name, data, status, fragment):
    err = error_of(generate(server, data), status)
    assert fragment in err["message"] and "image" in err["message"], err["message"]
    assert err["code"] in ("invalid_image", "image_too_large", "invalid_value")


# --- images that are valid after all ----------------------------------------------------------------------------
def _palette_with_transparency() -> bytes:
    img = RGB.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


def _sixteen_bit() -> bytes:
    arr = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    return encode(img, "PNG")


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(RGB, "JPEG", exif=exif)


ACCEPTED = [
    ("1x1", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), (1, 1)),
    ("2x1", encode(Image.new("RGB", (2, 1)), "PNG"), (2, 1)),
    ("aspect-8:1", encode(Image.new("RGB", (800, 100)), "PNG"), (800, 100)),
    ("aspect-1:8", encode(Image.new("RGB", (16, 128)), "PNG"), (16, 128)),
    ("cmyk-jpeg", encode(RGB.convert("CMYK"), "JPEG"), (64, 48)),
    ("palette", encode(RGB.convert("P"), "PNG"), (64, 48)),
    ("palette-transparency", _palette_with_transparency(), (64, 48)),
    ("16-bit-grey", _sixteen_bit(), (64, 48)),
    ("grey", encode(RGB.convert("L"), "PNG"), (64, 48)),
    ("grey-alpha", encode(RGB.convert("LA"), "PNG"), (64, 48)),
    ("rgba", encode(RGB.convert("RGBA"), "PNG"), (64, 48)),
    ("1-bit", encode(RGB.convert("1"), "PNG"), (64, 48)),
    ("rgba-webp", encode(RGB.convert("RGBA"), "WEBP", lossless=True), (64, 48)),
    ("animated-webp", _animated("WEBP"), (40, 30)),
    ("animated-png", _animated("PNG"), (40, 30)),
    ("progressive-jpeg", encode(RGB, "JPEG", progressive=True), (64, 48)),
    ("exif-rotated-jpeg", _exif_rotated(), (48, 64)),
    ("jpeg-damaged-scan", _corrupt(JPEG, len(JPEG) * 2 // 3, b"\x13\x37" * 4), (64, 48)),
]


@pytest.mark.parametrize("name,data,size", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_unusual_but_valid_images_are_edited(server, name, data, size):
    assert output_size(generate(server, data)) == size


def test_multipart_uploads_get_the_same_answers(server):
    def edit(data: bytes, **fields) -> httpx.Response:
        return httpx.post(server.api + "/images/edits", files={"image": ("in.bin", data, "image/png")},
                          data={"prompt": "p", "steps": "1", "response_format": "b64_json", **fields},
                          headers=AUTH, timeout=120)

    assert "could not be decoded" in error_of(edit(PNG[: len(PNG) // 2]), 400)["message"]
    assert "too large" in error_of(edit(png_claiming(50_000, 50_000)), 413)["message"]
    assert "not a PNG, JPEG or WebP" in error_of(edit(_animated("GIF")), 400)["message"]
    assert output_size(edit(encode(RGB.convert("CMYK"), "JPEG"))) == (64, 48)
    assert output_size(edit(_animated("WEBP"))) == (40, 30)


# --- text: encodings and sizes ------------------------------------------------------------------------------------
def _json(**fields) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "p", "image": "data:image/png;base64," + b64(png_bytes()),
                       "steps": 1, **fields}).encode()


def test_invalid_utf8_json_body_is_400(server):
    raw = _json().replace(b'"prompt": "p"', b'"prompt": "caf\xe9 \xff\xfe"')
    err = error_of(post_raw(server, raw), 400)
    assert "UTF-8" in err["message"] and err["code"] == "invalid_json"


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_lone_surrogates_in_json_text_are_400(server, field):
    raw = _json().replace(b'"steps": 1', f'"steps": 1, "{field}": "a\\ud800b"'.encode())
    err = error_of(post_raw(server, raw), 400)
    assert f"'{field}'" in err["message"]


def test_invalid_utf8_in_forms_is_400(server):
    files = {"image": ("in.png", png_bytes(), "image/png"), "prompt": (None, b"caf\xe9 \xff")}
    r = httpx.post(server.api + "/images/edits", files=files, data={"steps": "1"}, headers=AUTH, timeout=60)
    err = error_of(r, 400)
    assert "'prompt'" in err["message"] and "utf-8" in err["message"].lower()
    # urlencoded: the UTF-8 travels in %-escapes, which must decode too
    body = "prompt=caf%E9&image=" + b64(png_bytes()).replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    err = error_of(post_raw(server, body.encode(), "application/x-www-form-urlencoded", "/images/edits"), 400)
    assert "UTF-8" in err["message"]
    # and valid UTF-8 goes through both ways
    files["prompt"] = (None, "café ☕".encode())
    assert httpx.post(server.api + "/images/edits", files=files, data={"steps": "1"}, headers=AUTH,
                      timeout=60).status_code == 200


def _multipart(parts: list[tuple[bytes, bytes]], charset: str | None) -> tuple[bytes, str]:
    """A multipart body built by hand: (Content-Disposition parameters, value) per part."""
    boundary = b"b0undary7x"
    body = b""
    for disposition, value in parts:
        body += b"--" + boundary + b"\r\nContent-Disposition: form-data; " + disposition + b"\r\n\r\n" + value + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    ctype = "multipart/form-data; boundary=" + boundary.decode() + (f"; charset={charset}" if charset else "")
    return body, ctype


@pytest.mark.parametrize("charset,name,value", [
    # codecs whose decoding fails with UnicodeError (not UnicodeDecodeError): was a 500
    ("punycode", b"prompt", b"make it snowy!"), ("idna", b"prompt", b"xn--a"), ("undefined", b"prompt", b"p"),
    # the same codecs on the part's name (Starlette decodes it with the declared charset too): was a 500
    ("punycode", b"x y!", b"p"), ("idna", b"xn--zz-", b"p"),
    # not a text encoding, or no encoding at all: was read as latin-1 (mojibake) or a 500
    ("base64", b"prompt", b"cA=="), ("rot13", b"prompt", b"p"), ("no-such-charset", b"prompt", b"caf\xc3\xa9"),
    # a name in bytes that are not UTF-8: was silently read as latin-1
    (None, b"pr\xf6mpt", b"p"),
])
def test_form_charsets_that_cannot_decode_are_400(server, charset, name, value):
    """Every place the form's declared charset is used (charset lookup, part names, text values) answers a 400
    `invalid_form` when it does not decode, whatever the codec raises."""
    body, ctype = _multipart([(b'name="image"; filename="in.png"', png_bytes()),
                              (b'name="' + name + b'"', value), (b'name="steps"', b"1")], charset)
    err = error_of(post_raw(server, body, ctype, "/images/edits"), 400)
    assert err["code"] == "invalid_form", err


def test_form_charsets_that_decode_are_used(server):
    for charset in ("utf-8", "UTF8", "latin-1", "iso-8859-1"):
        body, ctype = _multipart([(b'name="image"; filename="in.png"', png_bytes()),
                                  (b'name="prompt"', "café".encode(charset)), (b'name="steps"', b"1")], charset)
        assert post_raw(server, body, ctype, "/images/edits").status_code == 200, charset
    # a file name that is not valid UTF-8 is still read as Starlette reads it (latin-1): the name is not used
    body, ctype = _multipart([(b'name="image"; filename="caf\xe9.png"', png_bytes()),
                              (b'name="prompt"', b"p"), (b'name="steps"', b"1")], None)
    assert post_raw(server, body, ctype, "/images/edits").status_code == 200


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_one_megabyte_prompts_are_400(server, field):
    err = error_of(post_raw(server, _json(**{field: "a" * 1_000_000})), 400)
    assert f"'{field}'" in err["message"] and "8192" in err["message"]
    r = httpx.post(server.api + "/images/edits", files={"image": ("a.png", png_bytes(), "image/png")},
                   data={"prompt": "p", field: "é" * 1_000_000}, headers=AUTH, timeout=60)
    assert f"'{field}'" in error_of(r, 400)["message"]


def test_prompts_at_the_limit_and_with_odd_characters_work(server):
    for prompt in ("x" * 8192, "a\x00b", "🙂" * 100, "\u202eright-to-left", "  padded  "):
        assert output_size(generate(server, png_bytes(), prompt=prompt)) == (64, 96), prompt


# --- JSON structure and numbers -----------------------------------------------------------------------------------
WRONG_TYPES = [("prompt", 1), ("prompt", ["a"]), ("prompt", None), ("n", "2"), ("n", 2.0), ("n", True),
               ("steps", 2.5), ("steps", "10"), ("seed", True), ("seed", "42"), ("strength", "0.5"),
               ("guidance_scale", [3]), ("negative_prompt", {"a": 1}), ("response_format", 1), ("image", 1),
               ("image", {"url": "x"}), ("model", []), ("size", 512)]


@pytest.mark.parametrize("field,value", WRONG_TYPES, ids=[f"{f}={v!r}" for f, v in WRONG_TYPES])
def test_wrong_json_types_are_400_naming_the_field(server, field, value):
    err = error_of(post_raw(server, _json(**{field: value})), 400)
    assert f"'{field}'" in err["message"]


NUMBERS = [("n", "0"), ("n", "5"), ("n", "-1"), ("n", "NaN"), ("n", "Infinity"), ("steps", "-3"), ("steps", "0"),
           ("steps", "51"), ("steps", "NaN"), ("strength", "NaN"), ("strength", "Infinity"), ("strength", "-Infinity"),
           ("strength", "1e400"), ("guidance_scale", "NaN"), ("guidance_scale", "-Infinity"), ("seed", "Infinity"),
           ("seed", "-2"), ("seed", "9223372036854775808"), ("seed", "1e3")]


@pytest.mark.parametrize("field,literal", NUMBERS, ids=[f"{f}={v}" for f, v in NUMBERS])
def test_out_of_range_and_non_finite_numbers_are_400(server, field, literal):
    raw = _json().replace(b'"steps": 1', f'"steps": 1, "{field}": {literal}'.encode())
    if field == "steps":
        raw = _json().replace(b'"steps": 1', f'"steps": {literal}'.encode())
    err = error_of(post_raw(server, raw), 400)
    assert f"'{field}'" in err["message"], err["message"]


def test_non_finite_numbers_in_ignored_fields_are_ignored(server):
    raw = _json().replace(b'"steps": 1', b'"steps": 1, "quality": NaN, "user": Infinity')
    assert post_raw(server, raw).status_code == 200


def test_huge_numbers_and_deep_nesting_are_400(server):
    raw = _json().replace(b'"steps": 1', b'"steps": 1, "seed": ' + b"9" * 5000)
    err = error_of(post_raw(server, raw), 400)
    assert "digits" in err["message"] and err["code"] == "invalid_json"
    nested = _json().replace(b'"steps": 1', b'"steps": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000)
    err = error_of(post_raw(server, nested), 400)
    assert "nested too deeply" in err["message"]


def test_duplicate_json_fields_are_400(server):
    raw = _json().replace(b'"steps": 1', b'"steps": 1, "prompt": "another"')
    err = error_of(post_raw(server, raw), 400)
    assert "'prompt'" in err["message"] and err["code"] == "duplicate_field"
    raw = _json().replace(b'"steps": 1', b'"steps": 1, "user": {"a": 1, "a": 2}')
    assert error_of(post_raw(server, raw), 400)["code"] == "duplicate_field"


def test_duplicate_form_fields_are_400(server):
    files = [("image", ("in.png", png_bytes(), "image/png")), ("prompt", (None, b"a")), ("prompt", (None, b"b")),
             ("steps", (None, b"1"))]
    err = error_of(httpx.post(server.api + "/images/edits", files=files, headers=AUTH, timeout=60), 400)
    assert "'prompt'" in err["message"] and err["code"] == "duplicate_field"
    files[2] = ("steps", (None, b"2"))
    assert "'steps'" in error_of(httpx.post(server.api + "/images/edits", files=files, headers=AUTH), 400)["message"]
    # unknown fields are ignored, repeated or not
    files[2] = ("user", (None, b"u"))
    files.append(("user", (None, b"v")))
    assert httpx.post(server.api + "/images/edits", files=files, headers=AUTH, timeout=60).status_code == 200
    # two images, one as a file and one as text, is one too many
    files = [("image", ("in.png", png_bytes(), "image/png")), ("image[]", (None, b64(png_bytes()).encode())),
             ("prompt", (None, b"p"))]
    err = error_of(httpx.post(server.api + "/images/edits", files=files, headers=AUTH, timeout=60), 400)
    assert "exactly one input image" in err["message"] and "got 2" in err["message"]


@pytest.mark.parametrize("value", ["\u0662", "١", "1_0", "0x2", "２"])
def test_form_numbers_must_be_ascii_decimal(server, value):
    r = httpx.post(server.api + "/images/edits", files={"image": ("a.png", png_bytes(), "image/png")},
                   data={"prompt": "p", "n": value}, headers=AUTH, timeout=60)
    assert "'n'" in error_of(r, 400)["message"]


@pytest.mark.parametrize("raw,fragment", [
    (b"null", "JSON object"), (b'"text"', "JSON object"), (b"[]", "JSON object"), (b"", "missing"),
    (b"{", "not valid JSON"), (b"\xef\xbb\xbf{}", "Missing required field"),
])
def test_bodies_that_are_not_objects(server, raw, fragment):
    err = error_of(post_raw(server, raw), 400)
    assert fragment.lower() in err["message"].lower(), err["message"]


def test_unknown_model_is_404_and_wrong_content_type_is_400(server):
    err = error_of(post_raw(server, _json(model="dall-e-3")), 404)
    assert "'dall-e-3'" in err["message"] and err["code"] == "model_not_found"
    err = error_of(post_raw(server, _json(model="x" * 100_000)), 404)
    assert len(err["message"]) < 400  # the echo is cut
    r = post_raw(server, _json(), "text/plain")
    assert r.status_code == 400
    r = post_raw(server, _json(), "application/json", "/images/edits")
    assert "multipart/form-data" in error_of(r, 400)["message"]


# --- slow clients -----------------------------------------------------------------------------------------------
def _trickle(server, payload: bytes, pieces: int, pause_s: float) -> tuple[int, bytes, float]:
    """Send the request body in `pieces` with `pause_s` between them (at most ~10 s in all); returns the status
    line's code, the response body and how long the answer took."""
    port = int(server.base_url.rsplit(":", 1)[1])
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     f"Authorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode())
        step = -(-len(payload) // pieces)
        try:
            for i in range(pieces):
                sock.sendall(payload[i * step:(i + 1) * step])
                if select.select([sock], [], [], pause_s)[0]:  # the server answered before the body was complete
                    break
        except OSError:  # the server answered and closed while we were still sending
            pass
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body, time.monotonic() - t0


def test_slow_loris_uploads_are_cut_with_408(server):
    status, body, elapsed = _trickle(server, _json(), pieces=40, pause_s=0.25)  # would take 10 s for a few KB
    assert status == 408 and elapsed < 4
    err = json.loads(body)["error"]
    assert err["code"] == "body_timeout" and "1.5 s" in err["message"]
    # a slow but steady upload that finishes in time is fine
    status, body, _ = _trickle(server, _json(), pieces=3, pause_s=0.2)
    assert status == 200, body[:300]
    assert httpx.get(server.base_url + "/health").status_code == 200
