"""Output storage behind one interface (`base.ImageStore`); `open_store` picks the backend from the settings."""

from __future__ import annotations

from typing import Any

from .base import Blob, ImageStore, StorageError, StorageFull, StorageUnavailable

__all__ = ["Blob", "ImageStore", "StorageError", "StorageFull", "StorageUnavailable", "open_store"]


def open_store(settings: Any) -> ImageStore:
    """The store the settings name: an S3-compatible bucket when `storage_url` is set (s3.py), else the local
    directory `storage_dir` (default). Raises ValueError for a configuration that cannot work (the message says
    what to set)."""
    key = settings.url_signing_key.get_secret_value().encode() if settings.url_signing_key else None
    storage_url = getattr(settings, "storage_url", None)
    if storage_url:
        from .s3 import S3ImageStore

        store = S3ImageStore(storage_url, expiry_s=settings.url_expiry_s, key=key,
                             endpoint_url=settings.s3_endpoint_url, presigned=settings.s3_presigned)
        store.check()
        return store
    from .local import LocalImageStore

    return LocalImageStore(settings.storage_dir, expiry_s=settings.url_expiry_s, key=key)
