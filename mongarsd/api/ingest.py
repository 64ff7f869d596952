"""Iris ingestion routes: POST, GET and DELETE /api/v1/ingest (own documents; shared ones for admins)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from mongarsd.api.app import CTX
from mongarsd.api.auth import Principal, principal_of
from mongarsd.api.io import get_bool, get_str, json_response, read_json
from mongarsd.cognition.iris.extract import fingerprint
from mongarsd.cognition.iris.ingest import SHARED_OWNER, Ingestor, IngestResult
from mongarsd.errors import AuthError, UnavailableError, ValidationError
from mongarsd.memory.tokens import validate_user_name

MAX_PATH_CHARS: Final = 4096
MAX_TITLE_CHARS: Final = 300
MAX_SOURCE_CHARS: Final = 2048
MAX_URL_CHARS: Final = 2048
TEXT_CONTENT_TYPES: Final = ("text/plain", "text/markdown", "text/html")
DATA_CONTENT_TYPES: Final = (*TEXT_CONTENT_TYPES, "application/pdf")  # a file's bytes, base64 in 'data'
DATA_SOURCE_PREFIX: Final = "data:"
TEXT_SOURCE_PREFIX: Final = "text:"


def _ingestor(request: web.Request) -> Ingestor:
    ingestor = request.app[CTX].ingestor
    if ingestor is None:
        raise UnavailableError("document ingestion is not enabled on this daemon ([iris] enabled = false)")
    return ingestor


def resolve_owner(principal: Principal, *, shared: bool, user: str | None) -> str:
    """Whose documents a request reads or writes: the caller's own; admins may name a user or the shared set (pure)."""
    if shared and user is not None:
        raise ValidationError("give either 'shared' or 'user', not both", param="shared")
    if shared:
        if not principal.is_admin:
            raise AuthError(
                "shared documents (seen by every user's recall) need the admin role; "
                f"your token has the {principal.role} role: leave out 'shared' to use your own documents",
                status=403,
            )
        return SHARED_OWNER
    if user is not None and user != principal.user:
        if not principal.is_admin:
            raise AuthError(f"only an admin may use another user's documents; you are {principal.user!r}", status=403)
        return validate_user_name(user)
    return principal.user


def _query_bool(request: web.Request, key: str) -> bool:
    raw = request.query.get(key)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise ValidationError(f"query parameter '{key}' must be true or false, got {raw[:40]!r}", param=key)


def _owner_from_query(request: web.Request) -> str:
    user = request.query.get("user")
    return resolve_owner(principal_of(request), shared=_query_bool(request, "shared"), user=user or None)


def _body_response(owner: str, results: list[IngestResult]) -> dict[str, Any]:
    return {
        "owner": owner,
        "shared": owner == SHARED_OWNER,
        "results": [r.public() for r in results],
        "ingested": sum(1 for r in results if r.error is None and not r.duplicate),
        "duplicates": sum(1 for r in results if r.error is None and r.duplicate),
        "errors": sum(1 for r in results if r.error is not None),
    }


def _one_target(body: Mapping[str, Any]) -> str:
    given = [k for k in ("url", "path", "text", "data") if body.get(k) is not None]
    if len(given) != 1:
        raise ValidationError(
            "give exactly one of 'url' (a page to fetch), 'path' (a file or folder on the daemon's host, admins), 'text' "
            "or 'data' (a file's bytes in base64, with its content_type)" + (f"; got {', '.join(given)}" if given else ""),
            param="body",
        )
    return given[0]


async def handle_ingest(request: web.Request) -> web.Response:
    ingestor = _ingestor(request)
    principal = principal_of(request)
    body = await read_json(request)
    target = _one_target(body)
    shared = get_bool(body, "shared", default=False)
    owner = resolve_owner(principal, shared=shared, user=get_str(body, "user", max_len=64, allow_empty=False))
    results: list[IngestResult]
    if target == "url":
        url = get_str(body, "url", max_len=MAX_URL_CHARS, allow_empty=False) or ""
        results = [await ingestor.async_ingest_url(url.strip(), owner=owner)]
    elif target == "path":
        if not principal.is_admin:
            raise AuthError(
                "ingesting a 'path' reads files on the daemon's host and needs the admin role; send the document as 'text' instead",
                status=403,
            )
        raw = get_str(body, "path", max_len=MAX_PATH_CHARS, allow_empty=False) or ""
        path = Path(raw)
        if not path.is_absolute():
            raise ValidationError(f"'path' must be an absolute path on the daemon's host, got {raw[:200]!r}", param="path")
        results = await ingestor.async_ingest_path(path, owner=owner)
    elif target == "data":
        results = [await _async_ingest_data(ingestor, body, owner)]
    else:
        text = get_str(body, "text", allow_empty=False) or ""
        title = get_str(body, "title", default="", max_len=MAX_TITLE_CHARS) or ""
        content_type = get_str(body, "content_type", default="text/plain", max_len=64) or "text/plain"
        if content_type not in TEXT_CONTENT_TYPES:
            raise ValidationError("'content_type' must be one of " + ", ".join(TEXT_CONTENT_TYPES), param="content_type")
        data = text.encode("utf-8")
        source = (get_str(body, "source", max_len=MAX_SOURCE_CHARS) or "").strip()
        if not source:
            # Distinct texts must not replace each other: without a name, the text names itself.
            source = TEXT_SOURCE_PREFIX + fingerprint(text)[:16]
        results = [await ingestor.async_ingest_bytes(data, content_type + "; charset=utf-8", source=source, owner=owner, title=title)]
    return json_response(_body_response(owner, results), status=201)


async def _async_ingest_data(ingestor: Ingestor, body: Mapping[str, Any], owner: str) -> IngestResult:
    """A file sent by the client (`mongarsd ingest FILE` sends small files this way): base64 bytes and their type."""
    raw = get_str(body, "data", allow_empty=False) or ""
    try:
        data = base64.b64decode(raw, validate=True)
    except ValueError:  # binascii.Error, or characters outside ASCII
        raise ValidationError("'data' must be base64 (the file's bytes)", param="data") from None
    content_type = get_str(body, "content_type", max_len=64, allow_empty=False)
    if content_type not in DATA_CONTENT_TYPES:
        raise ValidationError("'content_type' must be one of " + ", ".join(DATA_CONTENT_TYPES) + " with 'data'", param="content_type")
    title = get_str(body, "title", default="", max_len=MAX_TITLE_CHARS) or ""
    source = (get_str(body, "source", max_len=MAX_SOURCE_CHARS) or "").strip() or DATA_SOURCE_PREFIX + hashlib.sha256(data).hexdigest()[:16]
    return await ingestor.async_ingest_bytes(data, content_type, source=source, owner=owner, title=title)


async def handle_list(request: web.Request) -> web.Response:
    ingestor = _ingestor(request)
    owner = _owner_from_query(request)
    return json_response({"owner": owner, "shared": owner == SHARED_OWNER, "documents": await ingestor.async_list(owner)})


async def handle_delete(request: web.Request) -> web.Response:
    ingestor = _ingestor(request)
    raw = request.match_info["document_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise ValidationError(f"document id must be a positive integer, got {raw[:40]!r}", param="id")
    owner = _owner_from_query(request)
    await ingestor.async_delete(owner, int(raw))
    return json_response({"deleted": int(raw), "owner": owner})


def setup_routes(app: web.Application) -> None:
    """Register the Iris ingestion routes."""
    r = app.router
    r.add_post("/api/v1/ingest", handle_ingest)
    r.add_get("/api/v1/ingest", handle_list)
    r.add_delete("/api/v1/ingest/{document_id}", handle_delete)
