"""Curiosity route: the caller's own research, open and finished (never another user's)."""

from __future__ import annotations

from aiohttp import web

from mongarsd.api.app import CTX
from mongarsd.api.auth import principal_of
from mongarsd.api.io import json_response, query_int
from mongarsd.cognition.cortex import LIST_LIMIT_MAX, STATUSES, Cortex
from mongarsd.errors import UnavailableError, ValidationError


def _cortex(request: web.Request) -> Cortex:
    cortex = request.app[CTX].cortex
    if cortex is None:
        raise UnavailableError("the curiosity engine is not enabled on this daemon (curiosity.enabled, and Iris must be enabled)")
    return cortex


async def handle_list_research(request: web.Request) -> web.Response:
    cortex = _cortex(request)
    user = principal_of(request).user
    limit = query_int(request, "limit", default=50, lo=1, hi=LIST_LIMIT_MAX)
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise ValidationError(f"query parameter 'status' must be one of {', '.join(STATUSES)}, got {status[:40]!r}", param="status")
    research = await cortex.async_list(user, limit=limit, status=status)
    counts = await cortex.async_counts(user)
    return json_response({"research": research, "open": counts["open"], "finished": counts["finished"]})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/curiosity", handle_list_research)
