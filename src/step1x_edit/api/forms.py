"""Request bodies read strictly: forms whose text is valid UTF-8, and no field sent twice.

Starlette's form parser decodes a text part that is not valid in its charset as latin-1, and a urlencoded value
with bad percent-escapes with U+FFFD, so a prompt in broken UTF-8 would be edited as mojibake; JSON bodies in bad
UTF-8 are a 400 (errors.py). Here both kinds of form refuse it with a 400 too. A multipart form may declare another
charset; one that is unknown or not a text encoding is a 400, and so is a part name or text that does not decode in
it — whatever the codec raises (`punycode`, `idna`, `undefined` raise UnicodeError, not UnicodeDecodeError). A field
given twice (JSON keys, form fields) is ambiguous — proxies and this server might each pick a different copy — so it
is a 400 as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header

from .errors import bad_request

IMAGE_FIELDS = ("image", "image[]")


_DECODE_ERRORS = (UnicodeError, LookupError)  # UnicodeError: also codecs that fail without UnicodeDecodeError


class _StrictMultiPartParser(MultiPartParser):
    """Starlette's parser, except that the declared charset must be a known text encoding, and that part names and
    text parts must decode in it (UTF-8 unless declared). Starlette would fall back to latin-1 (and let a
    UnicodeError that is not a UnicodeDecodeError escape as a 500)."""

    async def parse(self) -> FormData:
        _, params = parse_options_header(self.headers.get("content-type", ""))
        declared = params.get(b"charset")
        if declared is not None:
            name = declared.decode("latin-1")
            try:  # (not b"": decoding nothing skips the codec lookup)
                b"-".decode(name)  # LookupError: unknown, or not a text encoding (base64, rot13, ...)
            except (LookupError, ValueError):  # ValueError: a NUL in the name; UnicodeError: the `undefined` codec
                raise MultiPartException(f"charset {name[:40]!r} cannot be used: send UTF-8") from None
        return await super().parse()

    def _charset_name(self) -> str:
        return getattr(self, "_charset", "") or "utf-8"

    def on_headers_finished(self) -> None:
        charset = self._charset_name()
        _, options = parse_options_header(self._current_part.content_disposition)
        try:
            options.get(b"name", b"").decode(charset)
            # the file name (unused) keeps Starlette's latin-1 fallback; only errors that escape it end up here
            super().on_headers_finished()
        except _DECODE_ERRORS:
            raise MultiPartException(f"a part's name or file name is not valid {charset} text") from None

    def on_part_end(self) -> None:
        part = getattr(self, "_current_part", None)
        if part is not None and part.file is None:
            charset = self._charset_name()
            try:
                bytes(part.data).decode(charset)
            except _DECODE_ERRORS:
                name = str(part.field_name)[:64]
                raise MultiPartException(f"Field '{name}' is not valid {charset} text") from None
        super().on_part_end()


async def read_form(request: Request, *, max_files: int, max_fields: int, max_part_size: int) -> FormData:
    """The multipart or urlencoded form of `request`; 400 for malformed forms and text that is not valid UTF-8."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        parser = _StrictMultiPartParser(request.headers, request.stream(), max_files=max_files,
                                        max_fields=max_fields, max_part_size=max_part_size)
        try:
            return await parser.parse()
        except MultiPartException as exc:
            raise bad_request(f"Invalid multipart form: {exc.message}", code="invalid_form") from None
    body = await request.body()
    try:
        text = body.decode("ascii")  # urlencoded bodies are ASCII; the text's UTF-8 travels in %-escapes
        pairs = parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict",
                          max_num_fields=max_fields)
    except UnicodeDecodeError:
        raise bad_request("Invalid form: the fields are not valid UTF-8 text", code="invalid_form") from None
    except ValueError as exc:  # too many fields
        raise bad_request(f"Invalid form: {exc}", code="invalid_form") from None
    return FormData(pairs)


def text_fields(items: Iterable[tuple[str, str | UploadFile]], known: Iterable[str]) -> dict[str, str]:
    """The form's text fields by name; a known field (or a text `image`) given twice is a 400."""
    known = set(known)
    texts: dict[str, str] = {}
    for name, value in items:
        if not isinstance(value, str):
            continue
        if name in texts and (name in known or name in IMAGE_FIELDS):
            if name in IMAGE_FIELDS:
                raise bad_request("'image': exactly one input image is supported, got more than one")
            raise bad_request(f"Field '{name}' was sent more than once: send each field once", code="duplicate_field")
        texts[name] = value
    return texts


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise bad_request(f"Field '{key[:64]}' appears more than once in the JSON body: send each field once",
                              code="duplicate_field")
        seen[key] = value
    return seen


async def reject_duplicate_json_keys(request: Request) -> None:
    """FastAPI dependency: 400 when a JSON object in the body repeats a key. FastAPI has already parsed the body
    (so it is valid JSON and cached); this second parse only looks at the keys."""
    body = await request.body()
    if not body or b'"' not in body:
        return
    try:
        json.loads(body, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):  # not ours to report: FastAPI's validation does
        return
