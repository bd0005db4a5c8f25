"""Turning the request's `image` into a checked PIL image: data URI, bare base64, raw upload bytes.

Everything a client sends is hostile until proven otherwise: sizes are checked before work is spent (base64
length before decoding, the header's pixel count before the pixels are decoded), only PNG/JPEG/WebP are opened,
and the image is handed on as decoded (EXIF orientation, colour modes: the pipeline's `prepare` deals with those,
for the API and the CLI alike). Links are fetched by `links.py` and end up here as bytes.

The other direction too: `encode_image` / `encode_images` turn the pipeline's outputs into PNG, JPEG or WebP bytes
(OpenAI's `output_format` and `output_compression`).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, get_args

from PIL import Image, UnidentifiedImageError

from .errors import APIError, bad_request

FORMATS = ("PNG", "JPEG", "WEBP")
_B64_JUNK = re.compile(rb"[\s]")
_B64_OK = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int  # encoded size of one input image
    max_pixels: int  # width * height after decoding the header


@dataclass(frozen=True)
class ImageRef:
    """What the `image` field points at: inline bytes or a link still to fetch."""

    data: bytes | None = None
    url: str | None = None


def parse_image_field(value: str, limits: ImageLimits, field: str = "image") -> ImageRef:
    """Classify and (for inline data) decode the `image` string; raises 400/413 APIErrors naming `field`."""
    text = value.strip()
    if not text:
        raise bad_request(f"'{field}' is empty: send a data URI, base64 data or an http(s) link")
    lower = text[:16].lower()
    if lower.startswith(("http://", "https://")):
        return ImageRef(url=text)
    if lower.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep:
            raise bad_request(f"'{field}' is a malformed data URI: no ',' after the media type")
        if not header.lower().endswith(";base64"):
            raise bad_request(f"'{field}' data URI must be base64-encoded (data:image/png;base64,...)")
        # The declared media type is not trusted either way: the bytes are sniffed when decoded.
        return ImageRef(data=decode_base64(payload, limits, field))
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        scheme = text.split(":", 1)[0]
        raise bad_request(f"'{field}' link scheme '{scheme}' is not allowed: only http and https links are fetched")
    return ImageRef(data=decode_base64(text, limits, field))


def decode_base64(payload: str, limits: ImageLimits, field: str = "image") -> bytes:
    """Strict standard base64 (whitespace and missing padding tolerated); size checked before decoding."""
    raw = _B64_JUNK.sub(b"", payload.encode("ascii", "replace"))
    if len(raw) * 3 // 4 > limits.max_bytes + 2:
        raise APIError(413, f"'{field}' is too large: at most {limits.max_bytes} bytes of image data",
                       code="image_too_large")
    raw = raw.rstrip(b"=")
    if not raw or not _B64_OK.match(raw) or len(raw) % 4 == 1:
        raise bad_request(f"'{field}' is not valid base64 data, a data URI, or an http(s) link", code="invalid_image")
    try:
        data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"'{field}' is not valid base64 data", code="invalid_image") from None
    if len(data) > limits.max_bytes:
        raise APIError(413, f"'{field}' is too large: at most {limits.max_bytes} bytes of image data",
                       code="image_too_large")
    return data


def open_image(data: bytes, limits: ImageLimits, field: str = "image") -> Image.Image:
    """Decode PNG/JPEG/WebP bytes, orientation applied; refuses bombs, oversized and non-images (400/413)."""
    if len(data) > limits.max_bytes:
        raise APIError(413, f"'{field}' is too large: at most {limits.max_bytes} bytes of image data",
                       code="image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = img.size  # from the header: nothing decoded yet
            if width < 1 or height < 1:
                raise bad_request(f"'{field}' has an empty size {width}x{height}", code="invalid_image")
            if width * height > limits.max_pixels:
                raise APIError(413, f"'{field}' is too large: {width}x{height} pixels, at most {limits.max_pixels}",
                               code="image_too_large")
            img.load()  # the first frame only, for animated WebP/PNG
            return img
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses before we see the header's size; its message has the pixel count.
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f": {int(claimed.group(1))} pixels, at most {limits.max_pixels}" if claimed else ""
        raise APIError(413, f"'{field}' is too large{size} (decompression bomb refused)",
                       code="image_too_large") from None
    except UnidentifiedImageError:
        raise bad_request(f"'{field}' is not a PNG, JPEG or WebP image", code="invalid_image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise bad_request(f"'{field}' could not be decoded: {exc}", code="invalid_image") from None


# --- outputs -------------------------------------------------------------------------------------------------------
# The output formats of OpenAI's image API (`output_format`); media types and file names are the store's
# (storage/base.py FORMATS), so a link, a data URI and an event name the same type for the same bytes.
OutputFormat = Literal["png", "jpeg", "webp"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
# PNG's zlib level, picked by measurement (bench/encode.py, table in bench/ENCODING.md): on real 1024x1536 photos
# level 1 encodes in about 0.6x the time of level 4 (the level used before) for files ~7 % larger, and has the least
# encode + send time at 100 Mbit/s of all levels. PNG is lossless: the level never changes a pixel.
PNG_LEVEL = 1
# OpenAI: `output_compression` "defaults to 100" and applies to jpeg and webp only.
DEFAULT_QUALITY = 100
# Pillow's encoders release the GIL, so an n-image answer encodes on several cores at once (bench/ENCODING.md).
# One pool for all requests (its threads start on first use), so concurrent answers share a bounded set of threads.
_ENCODERS = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="step1x-encode")


def encode_image(img: Image.Image, fmt: str = "png", compression: int | None = None) -> bytes:
    """One output image as `fmt` (png | jpeg | webp) bytes, deterministic (no timestamps or other metadata): the
    same pixels and arguments always give the same bytes.

    `compression` is OpenAI's `output_compression` (0-100): for JPEG and WebP the encoder's quality (100, the
    default as in OpenAI's API, loses least; WebP stays lossy); for PNG, which is lossless, it is ignored as
    OpenAI's API ignores it there (a client copying OpenAI's example sends 100 with png, which must not select the
    slowest zlib level) and the PNG is written at `PNG_LEVEL`."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}")
    if img.mode not in ("RGB", "L"):  # JPEG has no alpha; the pipeline's outputs are RGB already
        img = img.convert("RGB")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    else:
        quality = DEFAULT_QUALITY if compression is None else compression
        img.save(buf, format=fmt.upper(), quality=quality)
    return buf.getvalue()


def encode_images(images: list[Image.Image], fmt: str = "png", compression: int | None = None) -> list[bytes]:
    """`encode_image` for each image, several at once on a shared thread pool; results in order."""
    if len(images) <= 1:
        return [encode_image(img, fmt, compression) for img in images]
    return list(_ENCODERS.map(lambda img: encode_image(img, fmt, compression), images))
