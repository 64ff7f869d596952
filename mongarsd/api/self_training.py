"""SelfTrainingEngine routes: the recall re-ranker's versions (anyone) and rollback (admins).

GET  /api/v1/self-training            {enabled, active: version|null, versions: [version...], min_examples,
                                       holdout_fraction}; a version is {id, created_at, active, adopted,
                                       reason, metrics, weights: {feature: weight}|null}
POST /api/v1/self-training/rollback   no body; {rolled_back: id, active: version|null, versions: [...]};
                                      409 when no version is active
"""

from __future__ import annotations

from aiohttp import web

from mongarsd.api.app import CTX
from mongarsd.api.auth import principal_of, require
from mongarsd.api.io import json_response
from mongarsd.errors import AuthError, UnavailableError
from mongarsd.maintenance.self_training import SelfTrainingEngine


def _engine(request: web.Request) -> SelfTrainingEngine:
    engine = request.app[CTX].self_training
    if engine is None:
        raise UnavailableError("self-training is not enabled on this daemon")
    return engine


async def handle_history(request: web.Request) -> web.Response:
    # The model is global but holds only numeric weights and aggregate figures: no user's data.
    return json_response(await _engine(request).async_history())


@require("admin")
async def handle_rollback(request: web.Request) -> web.Response:
    # The route's role marker already refuses non-admins; this keeps the rule if a marker is lost.
    principal = principal_of(request)
    if not principal.is_admin:
        raise AuthError(f"rolling the re-ranker back is for admins; your token has the {principal.role} role", status=403)
    return json_response(await _engine(request).async_rollback())


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/self-training", handle_history)
    app.router.add_post("/api/v1/self-training/rollback", handle_rollback)
