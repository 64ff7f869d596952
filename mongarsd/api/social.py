"""Social routes (admin only): accounts in the vault and posting to a Mastodon-compatible instance.

GET    /api/v1/social/accounts          accounts (never a token) with their breaker state
POST   /api/v1/social/accounts          {name, instance, token, max_chars?, replace?}
DELETE /api/v1/social/accounts/{name}
POST   /api/v1/social/post              {account, status, visibility?, spoiler_text?, language?,
                                         idempotency_key?} (or an Idempotency-Key header):
                                         201 when posted, 200 with replayed: true when that key
                                         was posted already
"""

from __future__ import annotations

import math

from aiohttp import web

from mongarsd.api.app import CTX
from mongarsd.api.auth import principal_of, require
from mongarsd.api.errors import error_response
from mongarsd.api.io import get_bool, get_int, get_str, json_response, read_json, require_str
from mongarsd.errors import AuthError, UnavailableError, ValidationError
from mongarsd.social.mastodon import MAX_IDEMPOTENCY_KEY_CHARS, MAX_SPOILER_CHARS, validate_idempotency_key
from mongarsd.social.service import BreakerOpenError, SocialService
from mongarsd.social.vault import MAX_MAX_CHARS, MAX_TOKEN_CHARS, MAX_URL_CHARS

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_NAME_CHARS = 64
MAX_LANGUAGE_CHARS = 8
MAX_RETRY_AFTER_S = 3600


def _social(request: web.Request) -> SocialService:
    # The route's role marker already refuses non-admins; this keeps the rule if a marker is lost.
    principal = principal_of(request)
    if not principal.is_admin:
        raise AuthError(f"social accounts and posting are for admins; your token has the {principal.role} role", status=403)
    svc = request.app[CTX].social
    if svc is None:
        raise UnavailableError("social posting is not enabled on this daemon")
    return svc


@require("admin")
async def handle_list_accounts(request: web.Request) -> web.Response:
    svc = _social(request)
    return json_response({"accounts": await svc.async_list_accounts()})


@require("admin")
async def handle_add_account(request: web.Request) -> web.Response:
    svc = _social(request)
    body = await read_json(request)
    name = require_str(body, "name", max_len=MAX_NAME_CHARS)
    instance = require_str(body, "instance", max_len=MAX_URL_CHARS)
    token = require_str(body, "token", max_len=MAX_TOKEN_CHARS)
    max_chars = get_int(body, "max_chars", lo=1, hi=MAX_MAX_CHARS)
    replace = get_bool(body, "replace", default=False)
    info, replaced = await svc.async_add_account(name, instance, token, max_chars=max_chars, replace=replace)
    return json_response({**info.public(), "replaced": replaced}, status=200 if replaced else 201)


@require("admin")
async def handle_remove_account(request: web.Request) -> web.Response:
    svc = _social(request)
    info = await svc.async_remove_account(request.match_info["name"])
    return json_response({"removed": info.name, "instance": info.instance})


@require("admin")
async def handle_post(request: web.Request) -> web.Response:
    svc = _social(request)
    body = await read_json(request)
    account = require_str(body, "account", max_len=MAX_NAME_CHARS)
    status = require_str(body, "status", max_len=MAX_MAX_CHARS)
    visibility = get_str(body, "visibility", max_len=16)
    spoiler_text = get_str(body, "spoiler_text", max_len=MAX_SPOILER_CHARS)
    language = get_str(body, "language", max_len=MAX_LANGUAGE_CHARS)
    key = get_str(body, "idempotency_key", max_len=MAX_IDEMPOTENCY_KEY_CHARS)
    header_key = request.headers.get(IDEMPOTENCY_HEADER)
    if header_key is not None:
        header_key = validate_idempotency_key(header_key.strip(), param=IDEMPOTENCY_HEADER)
        if key is not None and key != header_key:
            raise ValidationError(
                f"the {IDEMPOTENCY_HEADER} header and 'idempotency_key' differ; send one of them", param="idempotency_key"
            )
        key = header_key
    try:
        result = await svc.async_post(
            account, status, idempotency_key=key, visibility=visibility, spoiler_text=spoiler_text, language=language
        )
    except BreakerOpenError as err:
        retry = str(min(MAX_RETRY_AFTER_S, max(1, math.ceil(err.retry_after_s))))
        return error_response(request, 503, str(err), param="account", headers={"Retry-After": retry})
    headers = {IDEMPOTENCY_HEADER: str(result["idempotency_key"])}
    return json_response(result, status=200 if result["replayed"] else 201, headers=headers)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/social/accounts", handle_list_accounts)
    app.router.add_post("/api/v1/social/accounts", handle_add_account)
    app.router.add_delete("/api/v1/social/accounts/{name}", handle_remove_account)
    app.router.add_post("/api/v1/social/post", handle_post)
