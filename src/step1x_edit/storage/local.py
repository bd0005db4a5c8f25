"""Output images in a local directory behind HMAC-signed, expiring links.

A link is `/v1/files/images/<id>.png?expires=<unix>&sig=<hmac>`: the signature covers the file name and the expiry,
so a client can neither extend a link nor guess another file's. The signing key is a setting or, when unset, a
random key kept in the storage directory so that links (and files) survive a restart. A janitor deletes files
older than the expiry; the expiry in the link is checked on every read as well, so a file the janitor has not yet
reached is still refused once its link has expired.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import time
import uuid
from pathlib import Path

log = logging.getLogger("step1x_edit.storage")

_ID = re.compile(r"\A[0-9a-f]{32}\Z")  # \Z, not $: "$" would also match before a trailing newline
_KEY_FILE = ".signing-key"


def ascii_decimal(text: str | None, *, max_digits: int) -> int | None:
    """`text` as a non-negative integer when it is 1 to `max_digits` ASCII digits, else None.

    For fields taken from URLs and headers: `str.isdigit()` is also true for superscripts and circled digits
    (`²`, `①`), on which `int()` then fails, and `int()` itself reads other scripts' and full-width digits (`١`, `１`),
    so a field checked with those two could crash a request or give one value several spellings."""
    if not text or len(text) > max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def _load_or_create_key(directory: Path) -> bytes:
    """The directory's persistent random key (created 0600 on first use; a concurrent creator wins the race)."""
    path = directory / _KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes().strip()
        if len(key) >= 32:
            return key
        raise RuntimeError(f"signing key file {path} is too short; delete it to make a new one") from None
    key = secrets.token_hex(32).encode("ascii")
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


class LocalImageStore:
    """Saves PNGs under `directory`, signs and verifies links, and purges expired files."""

    def __init__(self, directory: Path, *, expiry_s: int, key: bytes | None = None,
                 clock=time.time) -> None:  # noqa: ANN001 - clock is a zero-argument callable returning seconds
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.expiry_s = int(expiry_s)
        self._key = key if key else _load_or_create_key(self.directory)
        self._clock = clock

    # --- writing -------------------------------------------------------------------------------------------
    def save_png(self, data: bytes) -> str:
        """Store PNG bytes atomically (temp file + rename); returns the new image id."""
        image_id = uuid.uuid4().hex
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self._path(image_id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return image_id

    def delete(self, image_id: str) -> None:
        """Remove a stored image (a request that failed after storing part of its outputs); unknown ids are ignored."""
        if _ID.match(image_id or ""):
            self._path(image_id).unlink(missing_ok=True)

    # --- links ---------------------------------------------------------------------------------------------
    def _sign(self, image_id: str, expires: int) -> str:
        msg = f"{image_id}.png:{expires}".encode("ascii")
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def signed_path(self, image_id: str) -> str:
        """`/v1/files/images/<id>.png?expires=…&sig=…`, valid for `expiry_s` from now."""
        expires = int(self._clock()) + self.expiry_s
        return f"/v1/files/images/{image_id}.png?expires={expires}&sig={self._sign(image_id, expires)}"

    def resolve(self, image_id: str, expires: str | None, sig: str | None) -> Path | None:
        """The file behind a link, or None when the link is malformed, tampered, expired or the file is gone."""
        when = ascii_decimal(expires, max_digits=12)
        if not _ID.match(image_id or "") or when is None or not sig or not sig.isascii():
            return None  # (compare_digest refuses non-ASCII text with a TypeError)
        if not hmac.compare_digest(self._sign(image_id, when), sig.lower()):
            return None
        if when < self._clock():
            return None
        path = self._path(image_id)
        return path if path.is_file() else None

    # --- janitor -------------------------------------------------------------------------------------------
    def purge_expired(self) -> int:
        """Delete images (and stale temp files) older than the expiry; returns how many were removed."""
        cutoff = self._clock() - self.expiry_s
        removed = 0
        for path in self.directory.iterdir():
            name = path.name
            is_image = name.endswith(".png") and _ID.match(name[:-4])
            if not (is_image or name.startswith(".tmp-")):
                continue
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("janitor removed %d expired image(s) from %s", removed, self.directory)
        return removed

    def _path(self, image_id: str) -> Path:
        return self.directory / f"{image_id}.png"
