"""Evolution routes: the tuning history and why (any role), and a rollback (admins).

GET  /api/v1/evolution            ?trials=N (1..200, default 20): active version, versions, last trials
POST /api/v1/evolution/rollback   (admin) optional {"reason": "..."}; 409 when there is nothing to roll back to
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from mongarsd.api.app import CTX
from mongarsd.api.auth import principal_of, require
from mongarsd.api.io import async_read_body, get_str, json_response, query_int, read_json
from mongarsd.errors import ValidationError
from mongarsd.maintenance.evolution import HISTORY_TRIALS, EvolutionEngine

MAX_TRIALS_LIMIT: Final = 200
MAX_REASON_CHARS: Final = 200


def _evolution(request: web.Request) -> EvolutionEngine:
    engine = request.app[CTX].evolution
    if engine is None:
        raise ValidationError(
            "the Evolution Engine is not enabled on this daemon (evolution.enabled, sommeil.enabled): nothing to roll back",
            param="evolution",
            status=409,
        )
    return engine


async def handle_history(request: web.Request) -> web.Response:
    trials = query_int(request, "trials", default=HISTORY_TRIALS, lo=1, hi=MAX_TRIALS_LIMIT)
    engine = request.app[CTX].evolution
    if engine is None:  # switched off by configuration: a report that says so, not an error
        reason = "evolution.enabled = false, or sommeil.enabled = false (trials run in idle time)"
        return json_response({"enabled": False, "reason": reason, "active": None, "versions": [], "trials": []})
    return json_response(await engine.async_history(trials=trials))


@require("admin")
async def handle_rollback(request: web.Request) -> web.Response:
    engine = _evolution(request)
    reason = None
    if (await async_read_body(request)).strip():
        reason = get_str(await read_json(request), "reason", max_len=MAX_REASON_CHARS, allow_empty=False)
    who = principal_of(request).user
    version = await engine.async_rollback(reason=(reason or "requested") + " (by " + who + ")")
    return json_response({"rolled_back": True, "active": version})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/evolution", handle_history)
    app.router.add_post("/api/v1/evolution/rollback", handle_rollback)
