"""Request validation: a route's JSON body is checked against its model (api/schemas.py) before its handler runs.

Only the top-level shape is checked here: the body is an object, each declared property has one
of its declared JSON types, required properties are present. Null reads as absent, as in the
handlers. The handlers keep their detailed checks (ranges, nested shapes). The parsed body is
kept on the request (api/io.JSON_BODY) so the handler's read_json does not parse it again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Final

from aiohttp import web

from mongarsd.api.io import kind_of, read_json
from mongarsd.api.schemas import JSON, RouteModel, model_for
from mongarsd.errors import ValidationError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _is_integer(value: object) -> bool:
    # as api/io.get_int: 3.0 is an integer (JSON Schema 2020-12 agrees), a bool is not
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


_TYPE_CHECKS: Final[Mapping[str, Callable[[object], bool]]] = {
    "string": lambda v: isinstance(v, str),
    "integer": _is_integer,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}
_TYPE_WORDS: Final[Mapping[str, str]] = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "an object",
    "null": "null",
}


def declared_types(schema: JSON) -> tuple[str, ...]:
    """The JSON types a property schema declares with `type` (empty: any) (pure)."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return (kind,)
    if isinstance(kind, list):
        return tuple(k for k in kind if isinstance(k, str))
    return ()


def check_body(body: Mapping[str, Any], schema: JSON, *, lenient: Collection[str] = ()) -> None:
    """Raise ValidationError naming the first declared property that is missing or of the wrong JSON type (pure).

    Properties are checked in the order the model declares them (the order the handler reads
    them, so the first complaint is the handler's). Null reads as absent; properties in
    `lenient` are only checked for presence.
    """
    required = set(schema.get("required", ()))
    properties: Mapping[str, JSON] = schema.get("properties", {})
    for name, prop in properties.items():
        value = body.get(name)
        if value is None:
            if name in required:
                raise ValidationError(f"'{name}' is required", param=name)
            continue
        if name in lenient:
            continue
        types = [k for k in declared_types(prop) if k != "null"]
        if types and not any(_TYPE_CHECKS[k](value) for k in types):
            expected = " or ".join(_TYPE_WORDS[k] for k in types)
            raise ValidationError(f"'{name}' must be {expected}, got {kind_of(value)}", param=name)
    for name in sorted(required - set(properties)):
        if body.get(name) is None:
            raise ValidationError(f"'{name}' is required", param=name)


def route_model(request: web.Request) -> RouteModel | None:
    """The model of the route a request matched, if any (HEAD, 404 and 405 have none)."""
    info = request.match_info
    if info is None or info.http_exception is not None or info.route is None or info.route.resource is None:
        return None
    return model_for(request.method, info.route.resource.canonical)


async def async_check_request(request: web.Request) -> None:
    """Parse and check the JSON body of a request whose route has a request model."""
    model = route_model(request)
    if model is None or model.request is None:
        return
    body = await read_json(request)  # kept on the request: the handler's read_json reuses it
    check_body(body, model.request, lenient=model.lenient)


@web.middleware
async def validation_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a body that does not have its route's shape before the handler runs (after auth)."""
    await async_check_request(request)
    return await handler(request)
