"""Bearer-key authentication: keys from settings, compared in constant time, never logged.

Keys are kept only as SHA-256 digests, so a comparison costs the same whatever the key's length or which key
matches, and a memory dump or a stray log line cannot show a key. No key configured means the server is open;
`app.py` warns about that at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from ..settings import Settings

_OWS = " \t"


def load_keys(settings: Settings) -> list[str]:
    """Keys from `STEP1X_API_KEYS` (comma-separated) and `STEP1X_API_KEYS_FILE` (one a line, `#` comments)."""
    keys: list[str] = []
    if settings.api_keys is not None:
        keys += [k.strip() for k in settings.api_keys.get_secret_value().split(",")]
    if settings.api_keys_file is not None:
        text = Path(settings.api_keys_file).read_text(encoding="utf-8")
        keys += [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [k for k in keys if k]


class KeyChecker:
    """Holds digests of the configured keys; `check` answers whether an Authorization header is acceptable."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]

    @property
    def open(self) -> bool:
        return not self._digests

    def check(self, authorization: str | None) -> str | None:
        """None when allowed, else the reason (a message that never contains the key)."""
        if self.open:
            return None
        if not authorization:
            return "Missing API key: send it as 'Authorization: Bearer <key>'"
        # Only SP and HTAB are whitespace here (RFC 9110 OWS). str.strip() would also remove 0x85 and 0xA0 — bytes
        # of a UTF-8 key ending in `х`, `à`, `Š` (the value arrives latin-1-decoded) — and so accept `sk-a\xa0`.
        scheme, _, token = authorization.strip(_OWS).partition(" ")
        token = token.strip(_OWS)
        if scheme.lower() != "bearer" or not token:
            return "Malformed Authorization header: expected 'Bearer <key>'"
        digest = hashlib.sha256(_raw_bytes(token)).digest()
        ok = False
        for known in self._digests:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(digest, known)
        return None if ok else "Incorrect API key provided"


def _raw_bytes(token: str) -> bytes:
    """The key's bytes as sent: HTTP header values arrive decoded as latin-1, so a UTF-8 key (non-ASCII) is
    recovered by encoding back to latin-1; anything else (a caller passing text) is taken as UTF-8."""
    try:
        return token.encode("latin-1")
    except UnicodeEncodeError:
        return token.encode("utf-8", "surrogateescape")
