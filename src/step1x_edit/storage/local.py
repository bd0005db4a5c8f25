"""Outputs in a local directory (the default store).

The signing key is a setting or, when unset, a random key kept in the storage directory so that links (and files)
survive a restart. A janitor (`expire`) deletes files older than the expiry; the expiry in the link is checked on
every read as well, so a file the janitor has not yet reached is still refused once its link has expired.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path

from .base import NAME, Blob, ImageStore, LinkSigner, StorageError, StorageFull, media_type

log = logging.getLogger("step1x_edit.storage")

_KEY_FILE = ".signing-key"
_CHUNK = 256 * 1024


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


class LocalImageStore(ImageStore):
    """Files under `directory`, written atomically (temp file + rename)."""

    def __init__(self, directory: Path, *, expiry_s: int, key: bytes | None = None,
                 clock=time.time) -> None:  # noqa: ANN001 - clock is a zero-argument callable returning seconds
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        super().__init__(LinkSigner(key if key else _load_or_create_key(self.directory), expiry_s, clock))

    def _write(self, name: str, data: bytes, media: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.directory / name)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                log.error("storing %s in %s failed: %r", name, self.directory, exc)
                kind = StorageFull if exc.errno in (errno.ENOSPC, errno.EDQUOT) else StorageError
                raise kind(f"{self.directory}: {exc.strerror or exc}") from exc
            raise

    def _read(self, name: str) -> Blob | None:
        try:
            fh = open(self.directory / name, "rb")  # noqa: SIM115 - closed by the reader (Blob.close)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"{self.directory}: {exc.strerror or exc}") from exc
        size = os.fstat(fh.fileno()).st_size

        def chunks():
            try:
                while block := fh.read(_CHUNK):
                    yield block
            finally:
                fh.close()

        return Blob(size, media_type(name), chunks(), fh.close)

    def _remove(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)

    def expire(self) -> int:
        """Delete images (and stale temp files) older than the expiry; returns how many were removed."""
        cutoff = self.signer.now() - self.expiry_s - 1  # - 1: links round their expiry up (LinkSigner)
        removed = 0
        for path in self.directory.iterdir():
            if not (NAME.match(path.name) or path.name.startswith(".tmp-")):
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
