"""Output storage behind one interface (`base.ImageStore`); `open_store` picks the backend from the settings."""

from __future__ import annotations

from typing import Any

from .base import Blob, ImageStore, StorageError, StorageFull, StorageUnavailable

__all__ = ["Blob", "ImageStore", "StorageError", "StorageFull", "StorageUnavailable", "open_store"]


def open_store(settings: Any) -> ImageStore:
    """The store the settings name: the local directory `storage_dir` (default)."""
    from .local import LocalImageStore

    key = settings.url_signing_key.get_secret_value().encode() if settings.url_signing_key else None
    return LocalImageStore(settings.storage_dir, expiry_s=settings.url_expiry_s, key=key)
