"""Outputs in an S3-compatible object store (AWS S3, MinIO, SeaweedFS, Ceph, R2, ...), through boto3.

Why: replicas behind one endpoint must all serve every link, so the outputs cannot live on one replica's disk.
Objects are `<prefix><name>` in one bucket; boto3 is imported lazily (the `[s3]` extra), so the plain install works
without it. Two kinds of links:

- this server's signed links (default): every replica holding the same `STEP1X_URL_SIGNING_KEY` verifies the link
  and streams the object from the store, so the key is required (a random per-process key would make each replica
  refuse the others' links);
- S3 presigned GET URLs (`STEP1X_S3_PRESIGNED=true`): the client downloads from the store itself; SigV4 caps their
  life at 7 days (the hosted API's expiry), and links signed with temporary credentials (instance roles) end
  when those credentials do.

Failures: a store that cannot be reached (connection refused or reset, timeouts, 5xx, throttling) is
`StorageUnavailable` (HTTP 503); no space or quota is `StorageFull` (507); anything else (no such bucket, access
denied) is `StorageError` (500: a configuration to fix). Expired objects are deleted by the janitor (`expire`, a
listing of the prefix by LastModified) or by a bucket lifecycle rule (README, "Scaling out").
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from .base import NAME, Blob, ImageStore, LinkSigner, StorageError, StorageFull, StorageUnavailable, media_type

log = logging.getLogger("step1x_edit.storage")

SIGV4_MAX_EXPIRY_S = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live
MIN_KEY_CHARS = 32
_CHUNK = 256 * 1024
# S3 error codes that mean "down or overloaded, retry later" (the rest are configuration or client errors)
_UNAVAILABLE_CODES = {"ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
                      "503", "500", "502", "504", "Throttling", "ThrottlingException"}
_FULL_CODES = {"QuotaExceeded", "XMinioStorageFull", "InsufficientStorage", "507", "EntityTooLarge"}


def parse_storage_url(url: str) -> tuple[str, str]:
    """`s3://BUCKET/PREFIX` -> (bucket, prefix ending in "/" or empty). ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"STEP1X_STORAGE_URL must look like s3://BUCKET/PREFIX, got {url!r}")
    prefix = parts.path.strip("/")
    return parts.netloc, (prefix + "/") if prefix else ""


def _import_boto3() -> Any:
    try:
        import boto3  # noqa: F401
        import botocore  # noqa: F401
    except ImportError:
        raise ValueError("STEP1X_STORAGE_URL=s3://... needs boto3, which is in the [s3] extra: "
                         "pip install 'step1x-edit-server[s3]' (in the checkout: .venv/bin/pip install -c "
                         "constraints.txt -e '.[s3]')") from None
    return boto3


class S3ImageStore(ImageStore):
    """Objects `<prefix><name>` in `bucket`; links signed by this server (default) or presigned by S3."""

    def __init__(self, url: str, *, expiry_s: int, key: bytes | None, endpoint_url: str | None = None,
                 presigned: bool = False, clock: Callable[[], float] = time.time, client: Any = None) -> None:
        self.bucket, self.prefix = parse_storage_url(url)
        self.presigned = presigned
        if presigned and expiry_s > SIGV4_MAX_EXPIRY_S:
            raise ValueError(f"STEP1X_S3_PRESIGNED: S3 presigned links live at most 7 days ({SIGV4_MAX_EXPIRY_S} s); "
                             f"STEP1X_URL_EXPIRY_S is {expiry_s}")
        if not presigned and (key is None or len(key) < MIN_KEY_CHARS):
            raise ValueError(
                "STEP1X_STORAGE_URL=s3://... serves links from any replica, so every replica needs the same link key: "
                f"set STEP1X_URL_SIGNING_KEY (at least {MIN_KEY_CHARS} characters, the same on every replica, e.g. "
                "`export STEP1X_URL_SIGNING_KEY=$(openssl rand -hex 32)`), or STEP1X_S3_PRESIGNED=true for S3 "
                "presigned links")
        # Presigned mode hands out no links of this server's own; the signer is still there for the interface.
        super().__init__(LinkSigner(key or secrets.token_hex(32).encode(), expiry_s, clock))
        self.endpoint_url = endpoint_url
        self._client = client or self._make_client(endpoint_url)
        from botocore.exceptions import BotoCoreError, ClientError

        self._boto_error, self._client_error = BotoCoreError, ClientError

    @staticmethod
    def _make_client(endpoint_url: str | None) -> Any:
        boto3 = _import_boto3()
        from botocore.config import Config

        session = boto3.session.Session()  # the standard credential chain: environment, profiles, instance roles
        config = Config(
            signature_version="s3v4",  # presigned links: SigV4 (SigV2 is gone from AWS and from most servers)
            # path-style for other servers (bucket names need no DNS there); AWS picks its own
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # fail fast: a request's thread must not hang on a store that is down (it answers 503 instead)
            connect_timeout=3, read_timeout=20, retries={"max_attempts": 2, "mode": "standard"},
            region_name=session.region_name or "us-east-1",
        )
        return session.client("s3", endpoint_url=endpoint_url, config=config)

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _error(self, exc: Exception, action: str) -> StorageError:
        """The storage error for a boto3 failure (see the module docstring)."""
        where = f"s3://{self.bucket}/{self.prefix}"
        if isinstance(exc, self._client_error):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            text = f"{where}: {action} failed: {code or status} {err.get('Message', '')}".strip()
            if code in _FULL_CODES or status == "507":
                return StorageFull(text)
            if code in _UNAVAILABLE_CODES or status.startswith("5"):
                return StorageUnavailable(text)
            return StorageError(text)
        return StorageUnavailable(f"{where}: {action} failed: {type(exc).__name__}: {exc}")  # connection, timeout

    def _call(self, action: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except (self._boto_error, self._client_error) as exc:
            error = self._error(exc, action)
            log.error("%s", error)
            raise error from exc

    # --- the interface --------------------------------------------------------------------------------------------
    def check(self) -> None:
        """At start-up: the bucket exists and these credentials may use it. Raises ValueError for a configuration
        that cannot work (no such bucket, access denied); a store that is down now is only logged (it may come
        back; until then url outputs answer 503)."""
        try:
            self._call("HeadBucket", self._client.head_bucket)
        except StorageUnavailable as exc:
            log.warning("the object store cannot be reached at start-up (url outputs answer 503 until it can): %s",
                        exc)
        except StorageError as exc:
            raise ValueError(f"STEP1X_STORAGE_URL: {exc} (does the bucket exist, and may these credentials use "
                             "it?)") from None

    def link(self, name: str) -> str:
        if not self.presigned:
            return super().link(name)
        try:
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(name)}, ExpiresIn=self.expiry_s)
        except (self._boto_error, self._client_error) as exc:  # signing is local: only a missing credential
            raise StorageError(f"presigning s3://{self.bucket}/{self._key(name)} failed: {exc}") from exc

    def _write(self, name: str, data: bytes, media: str) -> None:
        # put_object returns once the store has the whole object: the link is handed out only after that
        self._call("PutObject", self._client.put_object, Key=self._key(name), Body=data, ContentType=media)

    def _read(self, name: str) -> Blob | None:
        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
        except self._client_error as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            error = self._error(exc, "GetObject")
            log.error("%s", error)
            raise error from exc
        except self._boto_error as exc:
            error = self._error(exc, "GetObject")
            log.error("%s", error)
            raise error from exc
        body = obj["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(_CHUNK)
            finally:
                body.close()

        return Blob(obj.get("ContentLength"), media_type(name), chunks(), body.close)

    def _remove(self, name: str) -> None:
        self._call("DeleteObject", self._client.delete_object, Key=self._key(name))

    def expire(self) -> int:
        """Delete this server's objects under the prefix whose LastModified is older than the expiry (other keys
        under the prefix are left alone); returns how many were removed."""
        cutoff = self.signer.now() - self.expiry_s - 1  # - 1: links round their expiry up (LinkSigner)
        paginator = self._client.get_paginator("list_objects_v2")
        removed = 0
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                old = [{"Key": item["Key"]} for item in page.get("Contents", [])
                       if NAME.match(item["Key"][len(self.prefix):]) and item["LastModified"].timestamp() < cutoff]
                if old:
                    self._call("DeleteObjects", self._client.delete_objects, Delete={"Objects": old, "Quiet": True})
                    removed += len(old)
        except (self._boto_error, self._client_error) as exc:
            raise self._error(exc, "ListObjectsV2") from exc
        if removed:
            log.info("janitor removed %d expired image(s) from s3://%s/%s", removed, self.bucket, self.prefix)
        return removed
