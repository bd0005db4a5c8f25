"""Image handling (`api/images.py`): the `image` string forms, formats, limits, bombs, EXIF orientation; and the
outputs' encoding (`encode_image`, `encode_images`)."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib

import pytest
from PIL import Image

from step1x_edit.api.errors import APIError
import numpy as np

from step1x_edit.api import images
from step1x_edit.api.images import ImageLimits, encode_image, encode_images, open_image, parse_image_field

LIMITS = ImageLimits(max_bytes=200_000, max_pixels=500 * 500)


def _img_bytes(fmt: str, size=(40, 30), color=(10, 200, 30), **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt, **kw)
    return buf.getvalue()


def _status(exc: pytest.ExceptionInfo) -> tuple[int, str]:
    return exc.value.status, exc.value.message


PNG = _img_bytes("PNG")
B64 = base64.b64encode(PNG).decode()


@pytest.mark.parametrize("value", [
    "data:image/png;base64," + B64,
    "data:image/jpeg;base64," + B64,  # the declared type is not trusted: the bytes are sniffed
    "DATA:image/png;BASE64," + B64,
    B64,
    B64.rstrip("="),  # padding may be missing
    "\n".join(B64[i:i + 76] for i in range(0, len(B64), 76)),  # MIME line breaks
    "  " + B64 + "\n",
])
def test_inline_forms_decode_to_the_same_bytes(value):
    ref = parse_image_field(value, LIMITS)
    assert ref.url is None and ref.data == PNG


@pytest.mark.parametrize("value", ["http://example.com/a.png", "HTTPS://example.com/a.png?x=1"])
def test_links_are_recognised(value):
    ref = parse_image_field(value, LIMITS)
    assert ref.url == value and ref.data is None


@pytest.mark.parametrize("value,fragment", [
    ("", "is empty"),
    ("   ", "is empty"),
    ("ftp://example.com/a.png", "scheme 'ftp'"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("data:image/png,notbase64", "must be base64"),
    ("data:image/png;base64", "malformed data URI"),
    ("not base64 at all!", "not valid base64"),
    ("QUJD$$$", "not valid base64"),
    ("A", "not valid base64"),
    ("====", "not valid base64"),
])
def test_bad_image_strings_are_400_and_name_the_field(value, fragment):
    with pytest.raises(APIError) as exc:
        parse_image_field(value, LIMITS)
    status, message = _status(exc)
    assert status == 400 and "'image'" in message and fragment in message


def test_oversized_base64_is_413_before_decoding():
    big = "A" * (LIMITS.max_bytes * 2)
    with pytest.raises(APIError) as exc:
        parse_image_field(big, LIMITS)
    assert exc.value.status == 413


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"lossless": True})])
def test_png_jpeg_webp_open(fmt, kw):
    img = open_image(_img_bytes(fmt, **kw), LIMITS)
    assert img.size == (40, 30)
    assert img.convert("RGB").getpixel((5, 5))[1] > 150


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused(fmt):
    with pytest.raises(APIError) as exc:
        open_image(_img_bytes(fmt), LIMITS)
    assert exc.value.status == 400 and "PNG, JPEG or WebP" in exc.value.message


@pytest.mark.parametrize("data", [b"hello, I am text", b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, PNG[: len(PNG) // 2]])
def test_non_images_and_truncated_images_are_400(data):
    with pytest.raises(APIError) as exc:
        open_image(data, LIMITS)
    assert exc.value.status == 400 and "'image'" in exc.value.message


def test_too_many_bytes_is_413():
    with pytest.raises(APIError) as exc:
        open_image(b"\0" * (LIMITS.max_bytes + 1), LIMITS)
    assert exc.value.status == 413


def test_too_many_pixels_is_413():
    with pytest.raises(APIError) as exc:
        open_image(_img_bytes("PNG", size=(600, 600)), LIMITS)
    assert exc.value.status == 413 and "600x600" in exc.value.message


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (all-zero rows compress to almost nothing)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    raw = zlib.compress(b"\0" * ((width + 1) * 64), 9)  # only a few rows: the header is what matters
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(100_000, 100_000), (30_000, 30_000), (1000, 1000)])
def test_decompression_bombs_are_refused_from_the_header(size):
    bomb = _png_bomb(*size)
    assert len(bomb) < LIMITS.max_bytes
    with pytest.raises(APIError) as exc:
        open_image(bomb, LIMITS)
    assert exc.value.status == 413


def test_exif_orientation_is_left_to_the_pipeline():
    """The decoder hands the image on as stored, EXIF included: the pipeline's `prepare` applies the orientation
    once, for the API and the CLI alike (tests/test_pipeline.py::test_exif_orientation_is_applied_once)."""
    out = open_image(_rotated_jpeg(), LIMITS)
    assert out.size == (40, 20) and out.getexif().get(0x0112) == 6


def _rotated_jpeg() -> bytes:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_first_frame_of_animated_webp():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    out = open_image(buf.getvalue(), LIMITS)
    assert out.convert("RGB").getpixel((8, 8))[0] > 200


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_encoding_is_deterministic_in_every_format(fmt, pil):
    img = Image.radial_gradient("L").convert("RGB").resize((96, 64))
    data = encode_image(img, fmt)
    assert data == encode_image(img.copy(), fmt)  # same pixels -> same bytes (no timestamps)
    out = Image.open(io.BytesIO(data))
    assert out.format == pil and out.size == img.size
    if fmt == "png":  # lossless, at any output_compression (ignored for png, as in OpenAI's API)
        assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(img))
        assert encode_image(img, fmt, 0) == encode_image(img, fmt, 100) == data
    else:  # output_compression is the quality; OpenAI's default is 100
        assert encode_image(img, fmt, 100) == data and len(encode_image(img, fmt, 5)) < len(data)
    rgba = img.convert("RGBA")
    assert Image.open(io.BytesIO(encode_image(rgba, fmt))).format == pil  # JPEG has no alpha: converted


def test_images_are_encoded_in_parallel_with_the_serial_bytes_in_order(monkeypatch):
    photos = [Image.effect_mandelbrot((128, 96), (-2 + i / 4, -1.2, 1, 1.2), 60 + i).convert("RGB") for i in range(4)]
    serial = [encode_image(img, "png") for img in photos]
    assert len(set(serial)) == 4
    threads: list[str] = []
    real = images.encode_image

    def spy(img, fmt="png", compression=None):
        threads.append(threading.current_thread().name)
        return real(img, fmt, compression)

    monkeypatch.setattr(images, "encode_image", spy)
    assert encode_images(photos, "png") == serial
    assert all(name.startswith("step1x-encode") for name in threads) and len(threads) == 4
    threads.clear()
    assert encode_images(photos[:1], "webp", 50) == [real(photos[0], "webp", 50)]
    assert threads == [threading.current_thread().name]  # one image: no thread hop
