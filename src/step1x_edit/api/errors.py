"""OpenAI-shaped errors: one exception type, one body shape, one place that maps every failure onto them.

The hosted API (and so the `openai` SDK) expects `{"error": {"message", "type", "param", "code"}}`; the seed says
`param` carries the request id. The SDK builds its exception text from `error.message` and picks the exception
class from the status code, so every failure path — ours, FastAPI's validation, Starlette's 404/405, crashes — must
come out through `error_response`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("step1x_edit.api")

# status -> (type, default code); types follow OpenAI's vocabulary where it has one.
_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "payload_too_large"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "service_unavailable"),
    504: ("timeout_error", "timeout"),
    507: ("server_error", "insufficient_storage"),
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None  # the request id (as the hosted API does)
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(StarletteHTTPException):
    """Raised anywhere in the request path; rendered as the OpenAI error body with `status`.

    Subclassing Starlette's HTTPException lets it pass through FastAPI's body reader untouched (it re-raises
    HTTPException), which matters for the streaming body-size limit raised from inside `receive`.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        type: str | None = None,  # noqa: A002 - the field is called `type` in the wire format
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        kind, default_code = _KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", ""))
        self.status = status
        self.message = message
        self.code = code or default_code or None
        self.type = type or kind


def bad_request(message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code)


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def error_body(status: int, message: str, request_id: str | None, *, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:  # noqa: A002
    kind, default_code = _KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", ""))
    return {"error": {"message": message, "type": type or kind, "param": request_id, "code": code or default_code}}


def error_response(status: int, message: str, request_id: str | None, *, code: str | None = None,
                   type: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:  # noqa: A002
    return JSONResponse(error_body(status, message, request_id, code=code, type=type), status_code=status,
                        headers=headers)


# Pydantic's wording where it would puzzle a client.
_FRIENDLIER = {
    ("prompt", "string_pattern_mismatch"): "must not be blank",
    ("stream", "literal_error"): "streaming is not supported by this server; send false or omit it",
}


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str]:
    """One readable sentence naming the offending field(s), and an error code, from pydantic/FastAPI errors."""
    parts: list[str] = []
    code = "invalid_value"
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header", "form")]
        field = ".".join(loc)
        etype = err.get("type", "")
        if etype == "json_invalid":
            return "Request body is not valid JSON: " + str(err.get("ctx", {}).get("error", "decode error")), "invalid_json"
        if etype == "missing":
            if not field:
                return ("Request body is missing: send a JSON object with Content-Type: application/json",
                        "missing_body")
            parts.append(f"Missing required field '{field}'")
            code = "missing_required_parameter"
            continue
        if not field and etype in ("model_attributes_type", "dict_type", "model_type"):
            return ("Request body must be a JSON object (Content-Type: application/json)", "invalid_body")
        msg = _FRIENDLIER.get((field, etype)) or str(err.get("msg", "invalid value"))
        parts.append(f"Invalid value for '{field or 'body'}': {msg}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts) or "Invalid request", code


# FastAPI's message when reading the JSON body fails with something other than a JSON syntax error.
_FASTAPI_BODY_ERROR = "There was an error parsing the body"


def describe_body_error(cause: BaseException | None) -> tuple[str, str]:
    """A clear message for a JSON body that json.loads could not take: bad UTF-8, absurd nesting, huge integers."""
    if isinstance(cause, UnicodeError):
        return "Request body is not valid UTF-8: send a UTF-8 encoded JSON object", "invalid_json"
    if isinstance(cause, RecursionError):
        return "Request body is not acceptable JSON: it is nested too deeply", "invalid_json"
    if isinstance(cause, ValueError) and "digits" in str(cause):  # Python's int-conversion limit (4300 digits)
        return "Request body is not acceptable JSON: a number in it has too many digits", "invalid_json"
    if isinstance(cause, ValueError):
        return f"Request body is not acceptable JSON: {str(cause)[:200]}", "invalid_json"
    return "Request body could not be read as JSON", "invalid_json"


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure FastAPI/Starlette can produce onto the error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, request_id_of(request), code=exc.code, type=exc.type,
                              headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, code = describe_validation_errors(list(exc.errors()))
        return error_response(400, message, request_id_of(request), code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            message = f"Not found: {request.method} {request.url.path}"
        elif status == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        elif status == 413:
            message = "Request body is too large"
        elif status == 400 and exc.detail == _FASTAPI_BODY_ERROR:
            message, code = describe_body_error(exc.__cause__)
            return error_response(400, message, request_id_of(request), code=code)
        else:
            message = str(exc.detail)
        headers = dict(exc.headers) if exc.headers else None
        if status >= 500:
            log.error("HTTP %s for request %s: %s", status, request_id_of(request), exc.detail)
        return error_response(status, message, request_id_of(request), headers=headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in request %s", request_id_of(request))
        return error_response(500, "Internal server error", request_id_of(request))
