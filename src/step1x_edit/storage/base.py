"""The storage interface: where `url` outputs live, and the signed, expiring links that reach them.

The HTTP layer only ever calls `put` (store an encoded image, get its name), `link` (the URL to hand out), `open`
(the object behind a link, or None when the link is tampered, expired or the object is gone), `delete` and
`expire` (the janitor). Backends (`local.py`; an object store) implement the four primitives at the bottom; the
link signing is shared (`LinkSigner`), so any server holding the same key serves any other's links.

A link is `/v1/files/images/<name>?expires=<unix>&sig=<hmac>` with `<name>` = 32 hex digits + `.png|.jpg|.webp`:
the signature covers the name and the expiry, so a client can neither extend a link nor guess another object's.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# output format -> (file extension, media type)
FORMATS = {"png": ("png", "image/png"), "jpeg": ("jpg", "image/jpeg"), "webp": ("webp", "image/webp")}
MEDIA_TYPES = {ext: media for ext, media in FORMATS.values()}
NAME = re.compile(r"\A[0-9a-f]{32}\.(png|jpg|webp)\Z")  # \Z, not $: "$" also matches before a trailing newline
LINK_PREFIX = "/v1/files/images/"


class StorageError(Exception):
    """An output could not be stored or read (HTTP 500 unless a subclass says more)."""


class StorageFull(StorageError):
    """No space (or quota) left for the output (HTTP 507)."""


class StorageUnavailable(StorageError):
    """The store cannot be reached right now (HTTP 503): worth a retry."""


def ascii_decimal(text: str | None, *, max_digits: int) -> int | None:
    """`text` as a non-negative integer when it is 1 to `max_digits` ASCII digits, else None.

    For fields taken from URLs and headers: `str.isdigit()` is also true for superscripts and circled digits
    (`²`, `①`), on which `int()` then fails, and `int()` itself reads other scripts' and full-width digits (`١`, `１`),
    so a field checked with those two could crash a request or give one value several spellings."""
    if not text or len(text) > max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def new_name(fmt: str) -> str:
    """A fresh object name for an output in `fmt` (png | jpeg | webp)."""
    return f"{uuid.uuid4().hex}.{FORMATS[fmt][0]}"


def media_type(name: str) -> str:
    return MEDIA_TYPES[name.rsplit(".", 1)[-1]]


class LinkSigner:
    """HMAC-SHA256 over `<name>:<expires>`; links valid for at least `expiry_s` from when they are made (the
    expiry is rounded up to the next whole second, so a link never lives shorter than promised)."""

    def __init__(self, key: bytes, expiry_s: int, clock: Callable[[], float] = time.time) -> None:
        self._key, self.expiry_s, self._clock = key, int(expiry_s), clock

    def sign(self, name: str, expires: int) -> str:
        return hmac.new(self._key, f"{name}:{expires}".encode("ascii"), hashlib.sha256).hexdigest()

    def link(self, name: str) -> str:
        expires = math.ceil(self._clock()) + self.expiry_s
        return f"{LINK_PREFIX}{name}?expires={expires}&sig={self.sign(name, expires)}"

    def verify(self, name: str, expires: str | None, sig: str | None) -> int | None:
        """The expiry (unix seconds) when the link is well-formed, untampered and unexpired; else None. Every field
        comes from the URL, so each is checked as ASCII first (compare_digest refuses non-ASCII text)."""
        when = ascii_decimal(expires, max_digits=12)
        if not NAME.match(name or "") or when is None or not sig or not sig.isascii():
            return None
        if not hmac.compare_digest(self.sign(name, when), sig.lower()):
            return None
        return when if when >= self._clock() else None

    def now(self) -> float:
        return self._clock()


@dataclass
class Blob:
    """A stored object being read: its size, media type and bytes in chunks (`close` when not read to the end)."""

    size: int | None
    media_type: str
    chunks: Iterator[bytes]
    close: Callable[[], None] = lambda: None


class ImageStore(ABC):
    """Outputs behind signed links. Subclasses implement `_write`, `_read`, `_remove` and `expire`."""

    def __init__(self, signer: LinkSigner) -> None:
        self.signer = signer

    @property
    def expiry_s(self) -> int:
        return self.signer.expiry_s

    def put(self, data: bytes, fmt: str = "png") -> str:
        """Store one encoded image; returns its name. Raises StorageError (StorageFull, StorageUnavailable)."""
        name = new_name(fmt)
        self._write(name, data, FORMATS[fmt][1])
        return name

    def link(self, name: str) -> str:
        """The URL to hand out for `name`: a path on this server (the API prefixes its base URL) or an absolute URL."""
        return self.signer.link(name)

    def open(self, name: str, expires: str | None, sig: str | None) -> Blob | None:
        """The object behind a link, or None when the link is malformed, tampered, expired or the object is gone."""
        if self.signer.verify(name, expires, sig) is None:
            return None
        return self._read(name)

    def delete(self, name: str) -> None:
        """Remove an object (a request that failed after storing part of its outputs); unknown names are ignored."""
        if NAME.match(name or ""):
            self._remove(name)

    @abstractmethod
    def _write(self, name: str, data: bytes, media: str) -> None: ...

    @abstractmethod
    def _read(self, name: str) -> Blob | None: ...

    @abstractmethod
    def _remove(self, name: str) -> None: ...

    @abstractmethod
    def expire(self) -> int:
        """Delete objects older than the expiry; returns how many were removed."""
