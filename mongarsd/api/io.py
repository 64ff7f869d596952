"""Request-body helpers that turn bad input into ValidationError naming the field."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from mongarsd.errors import ValidationError

MAX_JSON_DEPTH = 64


async def read_json(request: web.Request) -> dict[str, Any]:
    """Read a JSON object body or raise ValidationError saying what is wrong with it."""
    raw = await request.read()  # aiohttp enforces client_max_size here (413)
    if not raw.strip():
        raise ValidationError("request body is empty; expected a JSON object", param="body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValidationError(f"request body is not valid UTF-8 (byte {err.start})", param="body") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValidationError(f"request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}", param="body") from None
    except RecursionError:
        raise ValidationError("request body is nested too deeply", param="body") from None
    if not isinstance(data, dict):
        raise ValidationError(f"request body must be a JSON object, got {type(data).__name__}", param="body")
    return data


def get_str(
    data: Mapping[str, Any],
    key: str,
    *,
    required: bool = False,
    default: str | None = None,
    max_len: int | None = None,
    allow_empty: bool = True,
) -> str | None:
    value = data.get(key, default)
    if value is None:
        if required:
            raise ValidationError(f"'{key}' is required", param=key)
        return None
    if not isinstance(value, str):
        raise ValidationError(f"'{key}' must be a string, got {type(value).__name__}", param=key)
    if not allow_empty and not value.strip():
        raise ValidationError(f"'{key}' must not be empty", param=key)
    if max_len is not None and len(value) > max_len:
        raise ValidationError(
            f"'{key}' is too long ({len(value)} characters; at most {max_len})", param=key, status=413 if max_len > 10000 else 400
        )
    if "\x00" in value:
        raise ValidationError(f"'{key}' must not contain NUL characters", param=key)
    return value


def get_number(
    data: Mapping[str, Any],
    key: str,
    *,
    default: float | None = None,
    lo: float | None = None,
    hi: float | None = None,
    integer: bool = False,
) -> float | None:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"'{key}' must be a number, got {type(value).__name__}", param=key)
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise ValidationError(f"'{key}' must be an integer", param=key)
    if not math.isfinite(value):
        raise ValidationError(f"'{key}' must be a finite number", param=key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValidationError(f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
    return int(value) if integer else float(value)


def get_bool(data: Mapping[str, Any], key: str, *, default: bool) -> bool:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValidationError(f"'{key}' must be true or false, got {type(value).__name__}", param=key)
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


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(data, ensure_ascii=False), status=status, content_type="application/json", headers=headers)
