"""Sommeil routes: what the idle-time work is doing and did (any role), and a cycle now (admins)."""

from __future__ import annotations

from aiohttp import web

from mongarsd.api.app import CTX
from mongarsd.api.auth import require
from mongarsd.api.io import json_response, query_int
from mongarsd.errors import UnavailableError
from mongarsd.maintenance.sommeil import DEFAULT_RUNS_LIMIT, MAX_RUNS_LIMIT, Sommeil


def _sommeil(request: web.Request) -> Sommeil:
    sommeil = request.app[CTX].sommeil
    if sommeil is None:
        raise UnavailableError("Sommeil Paradoxal is not enabled on this daemon (sommeil.enabled)")
    return sommeil


async def handle_status(request: web.Request) -> web.Response:
    sommeil = _sommeil(request)
    limit = query_int(request, "limit", default=DEFAULT_RUNS_LIMIT, lo=1, hi=MAX_RUNS_LIMIT)
    status = sommeil.status()
    runs = await sommeil.async_runs(limit)
    return json_response({"state": status["state"], "status": status, "runs": runs})


@require("admin")
async def handle_run(request: web.Request) -> web.Response:
    """Start a forced cycle owned by the service; answer at once (409 while one runs)."""
    cycle = await _sommeil(request).async_start_cycle(forced=True)
    return json_response({"started": True, "cycle": cycle}, status=202)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/sommeil", handle_status)
    app.router.add_post("/api/v1/sommeil/run", handle_run)
