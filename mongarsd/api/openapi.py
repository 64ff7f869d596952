"""The OpenAPI 3.1 document, generated from the real route table and the models in api/schemas.py.

GET /openapi.json serves it (built on the first request, then cached) and GET /docs a page that
renders it in the browser without fetching anything else. Both are public, like /health: they
describe the API and hold nothing about this daemon's data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from mongarsd import __version__
from mongarsd.api.app import CTX
from mongarsd.api.auth import public, required_role
from mongarsd.api.docs_page import DOCS_HTML
from mongarsd.api.errors import surface_of
from mongarsd.api.io import dumps_bytes
from mongarsd.api.schemas import (
    ERROR_DESCRIPTIONS,
    ERROR_SCHEMAS,
    JSON,
    JSON_MEDIA,
    RETRY_STATUSES,
    TEXT_MEDIA,
    Param,
    Reply,
    RouteModel,
    model_for,
)
from mongarsd.errors import MongarsError

OPENAPI_VERSION: Final = "3.1.0"
SECURITY_SCHEME: Final = "bearer"
TAGS: Final = (
    ("openai", "OpenAI-compatible API (official SDKs, Open WebUI): /v1/*"),
    ("ollama", "Ollama-compatible API (Ollama clients, Home Assistant): /api/*"),
    ("native", "monGARS API: conversation, memory, profile, feedback (each user sees only their own data)"),
    ("admin", "Tokens"),
    ("peers", "The LAN mesh of mongarsd nodes"),
    ("ops", "Health, readiness, metrics, status and this documentation"),
)
ROLE_NOTES: Final = {
    "public": "No credentials needed.",
    "user": "Any valid token (admin, user or peer).",
    "peer": "A peer or admin token, or a request signed by a mesh node.",
    "admin": "An admin token.",
}
AUTH_DESCRIPTION: Final = (
    "`Authorization: Bearer <token>`; create one with `mongarsd token create --user NAME --role admin|user`. "
    "Requests from loopback count as the local admin without a token unless `auth.loopback_trusted = false`. "
    "An empty `Bearer ` header means no credentials; on trusted loopback a placeholder key that is not a "
    "mongarsd token (SDKs insist on one) is ignored. A malformed, invalid or revoked token is refused on every route."
)
RETRY_AFTER: Final = {"description": "Seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}


class UndocumentedRouteError(MongarsError):
    """A registered route has no model in api/schemas.py (a bug: add its model)."""


def operation_id(method: str, path: str) -> str:
    """A stable operationId from a method and a path template (pure)."""
    return method.lower() + "_" + (re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root")


def _parameter(param: Param, where: str) -> JSON:
    return {
        "name": param.name,
        "in": where,
        "required": param.required or where == "path",
        "description": param.description,
        "schema": param.schema,
    }


def _reply(reply: Reply) -> JSON:
    out: JSON = {"description": reply.description}
    if reply.content:
        out["content"] = {
            media: {"schema": schema if schema is not None else {"type": "string"}} for media, schema in reply.content.items()
        }
    if reply.headers:
        out["headers"] = {name: RETRY_AFTER for name in reply.headers if name == "Retry-After"}
    return out


def error_statuses(model: RouteModel, role: str) -> list[int]:
    """Every error status a route can answer: its handler's, plus what auth and rate limits add (pure)."""
    statuses = set(model.errors) | {401}  # a malformed or revoked token is refused even on public routes
    if model.path or model.query:
        statuses.add(400)  # a request line too long for the HTTP parser
    if role in ("admin", "peer"):
        statuses.add(403)
    if role != "public":
        statuses.add(429)  # per-token rate limit
    return sorted(statuses)


def build_operation(method: str, path: str, model: RouteModel, role: str) -> JSON:
    """One OpenAPI operation object (pure)."""
    notes = [model.description] if model.description else []
    notes.append("Auth: " + ROLE_NOTES.get(role, role))
    op: JSON = {
        "operationId": operation_id(method, path),
        "summary": model.summary,
        "description": " ".join(notes),
        "tags": [model.tag],
        "x-mongarsd-role": role,
        "security": [] if role == "public" else [{SECURITY_SCHEME: []}],
    }
    params = [_parameter(p, "path") for p in model.path] + [_parameter(p, "query") for p in model.query]
    if params:
        op["parameters"] = params
    if model.request is not None:
        op["requestBody"] = {"required": True, "content": {JSON_MEDIA: {"schema": model.request}}}
    if model.stream is not None:
        op["x-mongarsd-stream"] = model.stream
    responses: dict[str, JSON] = {str(status): _reply(reply) for status, reply in sorted(model.responses.items())}
    error_schema = ERROR_SCHEMAS[surface_of(path)]
    for status in error_statuses(model, role):
        if str(status) in responses:
            continue  # the route's own body for that status (e.g. /ready's 503)
        headers = ("Retry-After",) if status in RETRY_STATUSES else ()
        content: dict[str, JSON | None] = {JSON_MEDIA: error_schema}
        description = ERROR_DESCRIPTIONS[status]
        if status == 400 and (model.path or model.query):
            # aiohttp's parser refuses a request line over 8190 bytes before any handler runs, in plain text
            content[TEXT_MEDIA] = None
            description += "; a request line over 8190 bytes (long parameters) is refused in plain text"
        responses[str(status)] = _reply(Reply(description, content, headers))
    op["responses"] = responses
    return op


def build_document(app: web.Application, *, version: str = __version__) -> JSON:
    """Build the OpenAPI 3.1 document of every route in APP's router; raise UndocumentedRouteError for one without a model."""
    routes = list(app.router.routes())
    gets = {route.resource.canonical for route in routes if route.method == "GET" and route.resource is not None}
    paths: dict[str, dict[str, JSON]] = {}
    for route in routes:
        resource = route.resource
        if resource is None:
            continue
        path = resource.canonical
        if route.method == "HEAD" and path in gets:
            continue  # aiohttp adds HEAD to every GET route
        model = model_for(route.method, path)
        if model is None:
            raise UndocumentedRouteError(f"route {route.method} {path} has no model in mongarsd/api/schemas.py ROUTE_MODELS")
        paths.setdefault(path, {})[route.method.lower()] = build_operation(route.method, path, model, required_role(route.handler))
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "mongarsd",
            "version": version,
            "summary": "Private AI daemon: local LLM, memory, LAN mesh",
            "description": "OpenAI-compatible (/v1), Ollama-compatible (/api) and monGARS-native (/api/v1) HTTP APIs. "
            "Each surface answers errors in its own clients' shape. Generated from the daemon's route table.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "/"}],
        "tags": [{"name": name, "description": text} for name, text in TAGS],
        "paths": dict(sorted(paths.items())),
        "components": {"securitySchemes": {SECURITY_SCHEME: {"type": "http", "scheme": "bearer", "description": AUTH_DESCRIPTION}}},
    }


@dataclass(slots=True)
class _DocumentCache:
    """The document's JSON, built on the first request (the route table is complete and frozen by then)."""

    body: bytes | None = None


DOCUMENT_CACHE = web.AppKey("mongarsd_openapi_cache", _DocumentCache)


@public
async def handle_openapi(request: web.Request) -> web.Response:
    cache = request.app[DOCUMENT_CACHE]
    if cache.body is None:
        ctx = request.app.get(CTX)
        cache.body = dumps_bytes(build_document(request.app, version=ctx.version if ctx is not None else __version__))
    return web.Response(body=cache.body, content_type="application/json", charset="utf-8")


@public
async def handle_docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_HTML, content_type="text/html", charset="utf-8", headers={"Content-Security-Policy": CSP})


# The page needs nothing but itself and /openapi.json: say so to the browser.
CSP: Final = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


def setup_routes(app: web.Application) -> None:
    app[DOCUMENT_CACHE] = _DocumentCache()
    app.router.add_get("/openapi.json", handle_openapi)
    app.router.add_get("/docs", handle_docs)
