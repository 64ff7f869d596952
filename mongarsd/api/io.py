"""Request-body helpers that turn bad input into ValidationError naming the field."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from typing import Any

import structlog
from aiohttp import web

from mongarsd.errors import ValidationError
from mongarsd.sanitize import MAX_JSON_INT_DIGITS, bounded_int, clean_text, has_surrogates

log = structlog.get_logger("mongarsd.api.io")

MAX_JSON_DEPTH = 64  # nested objects/lists in a request body
BODY_READ_TIMEOUT_S = 30.0  # a client must finish sending its request body within this
MAX_NUMBER_MAGNITUDE = 2.0**63  # integers fields never need more; larger values are range errors
# The request's parsed JSON body: parsed once (by the validation middleware or the handler), then reused.
JSON_BODY = web.RequestKey("mongarsd_json_body", dict)


def _refuse_constant(name: str) -> float:
    raise ValidationError("request body is not valid JSON: " + name + " is not a JSON value", param="body")


def _join(where: str, key: str) -> str:
    return key if not where else where + "." + key


def sanitize_json(value: Any, *, where: str = "") -> Any:
    """Clean every string (keys too) and refuse non-finite numbers and deep nesting, naming the field.

    Mutates containers in place (they are freshly parsed) and returns the cleaned value.
    """
    if isinstance(value, str):
        return clean_text(value)
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        node, at, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValidationError(
                "'" + (at or "body") + "' is nested too deeply (at most " + str(MAX_JSON_DEPTH) + " levels)", param=at or "body"
            )
        entries: list[tuple[Any, Any]]
        if isinstance(node, dict):
            if any(has_surrogates(k) for k in node):
                items = [(clean_text(k), v) for k, v in node.items()]
                node.clear()
                node.update(items)
            entries = list(node.items())
        elif isinstance(node, list):
            entries = list(enumerate(node))
        else:
            entries = []
        for key, item in entries:
            path = _join(at, key) if isinstance(key, str) else (at or "body") + "[" + str(key) + "]"
            if isinstance(item, str):
                node[key] = clean_text(item)
            elif isinstance(item, float) and not math.isfinite(item):
                raise _non_finite(path)
            elif isinstance(item, dict | list):
                stack.append((item, path, depth + 1))
        if isinstance(node, float) and not math.isfinite(node):
            raise _non_finite(at or "body")
    return value


def _non_finite(path: str) -> ValidationError:
    return ValidationError(
        "'" + path + "' is out of range: numbers must be finite, integers at most " + str(MAX_JSON_INT_DIGITS) + " digits",
        param=path,
    )


def parse_json_text(text: str) -> Any:
    """Parse JSON text strictly (no NaN/Infinity, bounded integers) and sanitize it (pure)."""
    try:
        data = json.loads(text, parse_int=bounded_int, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise ValidationError(f"request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}", param="body") from None
    except RecursionError:
        raise ValidationError("request body is nested too deeply", param="body") from None
    return sanitize_json(data)


async def async_read_body(request: web.Request) -> bytes:
    """Read the whole request body, bounded in size (413) and time (408); a broken one is a 400."""
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            return await request.read()  # aiohttp enforces client_max_size here (413)
    except web.RequestPayloadError as err:  # a body that cannot be decoded (bad gzip, broken chunks)
        raise ValidationError("request body could not be read: " + str(err).replace("\n", " ").strip()[:200], param="body") from None
    except TimeoutError:
        raise ValidationError(
            "request body was not received within " + str(int(BODY_READ_TIMEOUT_S)) + " s", param="body", status=408
        ) from None


async def read_json(request: web.Request) -> dict[str, Any]:
    """Read a JSON object body or raise ValidationError saying what is wrong with it; parsed once per request."""
    cached: dict[str, Any] | None = request.get(JSON_BODY)
    if cached is not None:
        return cached
    raw = await async_read_body(request)
    if not raw.strip():
        raise ValidationError("request body is empty; expected a JSON object", param="body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValidationError(f"request body is not valid UTF-8 (byte {err.start})", param="body") from None
    data = parse_json_text(text)
    if not isinstance(data, dict):
        raise ValidationError(f"request body must be a JSON object, got {type(data).__name__}", param="body")
    request[JSON_BODY] = data
    return data


def kind_of(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def get_str(
    data: Mapping[str, Any],
    key: str,
    *,
    default: str | None = None,
    max_len: int | None = None,
    allow_empty: bool = True,
    prefix: str = "",
) -> str | None:
    """Read an optional string field (null reads as absent), naming the field in errors (pure)."""
    value = data.get(key)
    name = prefix + key
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValidationError(f"'{name}' must be a string, got {kind_of(value)}", param=name)
    if not allow_empty and not value.strip():
        raise ValidationError(f"'{name}' must not be empty", param=name)
    if max_len is not None and len(value) > max_len:
        raise ValidationError(
            f"'{name}' is too long ({len(value)} characters; at most {max_len})", param=name, status=413 if max_len > 10000 else 400
        )
    if "\x00" in value:
        raise ValidationError(f"'{name}' must not contain NUL characters", param=name)
    return value


def require_str(data: Mapping[str, Any], key: str, *, max_len: int | None = None, allow_empty: bool = False, prefix: str = "") -> str:
    """Read a required string field (pure)."""
    value = get_str(data, key, max_len=max_len, allow_empty=allow_empty, prefix=prefix)
    if value is None:
        raise ValidationError(f"'{prefix}{key}' is required", param=prefix + key)
    return value


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def get_number(
    data: Mapping[str, Any],
    key: str,
    *,
    default: float | None = None,
    lo: float | None = None,
    hi: float | None = None,
    integer: bool = False,
    prefix: str = "",
) -> float | None:
    """Read an optional number (null reads as absent), range-checked before any conversion (pure)."""
    value = data.get(key)
    name = prefix + key
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"'{name}' must be a number, got {kind_of(value)}", param=name)
    # compare before converting: a huge int overflows float(), an infinite float int()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(f"'{name}' must be a finite number", param=name)
    if abs(value) > MAX_NUMBER_MAGNITUDE:
        raise ValidationError(f"'{name}' is out of range", param=name)
    if integer and not (isinstance(value, int) or value.is_integer()):
        raise ValidationError(f"'{name}' must be an integer, got {value!r}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            rng = "between " + _fmt(lo) + " and " + _fmt(hi)
        elif lo is not None:
            rng = "at least " + _fmt(lo)
        else:
            rng = "at most " + _fmt(hi if hi is not None else 0)
        raise ValidationError(f"'{name}' must be {rng}, got {_fmt(value)}", param=name)
    return int(value) if integer else float(value)


def get_int(data: Mapping[str, Any], key: str, *, lo: int | None = None, hi: int | None = None, prefix: str = "") -> int | None:
    """Read an optional integer field (pure)."""
    value = get_number(data, key, lo=lo, hi=hi, integer=True, prefix=prefix)
    return None if value is None else int(value)


def get_bool(data: Mapping[str, Any], key: str, *, default: bool, prefix: str = "") -> bool:
    """Read an optional boolean (null reads as absent) (pure)."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValidationError(f"'{prefix}{key}' must be true or false, got {kind_of(value)}", param=prefix + key)
    return value


def query_int(request: web.Request, key: str, *, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(f"query parameter '{key}' must be an integer, got {raw[:40]!r}", param=key) from None
    if not lo <= value <= hi:
        raise ValidationError(f"query parameter '{key}' must be between {lo} and {hi}, got {value}", param=key)
    return value


def dumps_bytes(data: Any, *, compact: bool = False) -> bytes:
    """Serialise JSON as UTF-8; a lone surrogate that slipped into stored data is answered as U+FFFD."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":") if compact else None)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        log.warning("response_lone_surrogate_replaced")
        return clean_text(text).encode("utf-8")


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps_bytes(data), status=status, content_type="application/json", charset="utf-8", headers=headers)
