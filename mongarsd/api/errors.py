"""One error shape per API surface (DESIGN §6), chosen from the request path."""

from __future__ import annotations

import json
from typing import Any, Literal

from aiohttp import web

Surface = Literal["openai", "ollama", "native"]

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}
_NATIVE_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
}


def surface_of(path: str) -> Surface:
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    if path.startswith("/api/") and not path.startswith("/api/v1/") and path != "/api/v1":
        return "ollama"
    return "native"


def openai_code(status: int, param: str | None) -> str | None:
    """The `error.code` OpenAI gives for a status, when it gives one (clients branch on it) (pure)."""
    if status == 404 and param == "model":
        return "model_not_found"
    if status == 429:
        return "rate_limit_exceeded"
    return None


def error_body(surface: Surface, status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The error envelope of a surface; `code` is OpenAI's error code (the native surface keeps its own)."""
    if surface == "openai":
        oa_code = code or openai_code(status, param)
        return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"), "param": param, "code": oa_code}}
    if surface == "ollama":
        return {"error": message}
    body: dict[str, Any] = {"code": _NATIVE_CODES.get(status, "error"), "message": message}
    if param is not None:
        body["param"] = param
    return {"error": body}


def error_response(
    request: web.Request,
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = error_body(surface_of(request.path), status, message, param=param, code=code)
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)
