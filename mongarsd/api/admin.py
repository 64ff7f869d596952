"""Token administration: POST/GET/DELETE /api/v1/tokens."""

from __future__ import annotations

from aiohttp import web

from mongarsd.api.app import CTX
from mongarsd.api.auth import principal_of, require
from mongarsd.api.io import get_str, json_response, read_json, require_str
from mongarsd.errors import AuthError, NotFoundError


@require("admin")
async def handle_create(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    data = await read_json(request)
    user = require_str(data, "user", max_len=200)
    role = get_str(data, "role", default="user") or "user"
    label = get_str(data, "label", default="", max_len=200) or ""
    secret, info = await ctx.tokens.async_create(user, role, label)
    return json_response({"token": secret, **info.public()}, status=201)


async def handle_list(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    principal = principal_of(request)
    infos = await ctx.tokens.async_list(None if principal.is_admin else principal.user)
    return json_response({"tokens": [i.public() for i in infos]})


async def handle_revoke(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    principal = principal_of(request)
    token_id = request.match_info["token_id"]
    info = await ctx.tokens.async_get(token_id)
    if not principal.is_admin and info.user != principal.user:
        # Same answer as a missing token: do not reveal other users' token ids.
        raise NotFoundError(f"no token with id {token_id!r}", param="id")
    if principal.role == "peer":
        raise AuthError("peer tokens cannot revoke tokens", status=403)
    revoked = await ctx.tokens.async_revoke(token_id)
    return json_response({"revoked": revoked.id, "user": revoked.user})


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/tokens", handle_create)
    app.router.add_get("/api/v1/tokens", handle_list)
    app.router.add_delete("/api/v1/tokens/{token_id}", handle_revoke)
