"""Middlewares: request ids, metrics and error envelopes; CORS; auth and rate limits; request validation."""

from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from mongarsd.api.auth import LOCAL_ADMIN_USER, PRINCIPAL, REQUEST_ID, Principal, check_role, is_loopback, required_role
from mongarsd.api.errors import error_response
from mongarsd.api.forwarding import async_authenticate_peer
from mongarsd.api.streaming import CLIENT_CLOSED_STATUS
from mongarsd.api.validation import validation_middleware
from mongarsd.const import PASSIVE_PATHS, TOKEN_PREFIX
from mongarsd.errors import (
    AuthError,
    ContextOverflowError,
    EmbedderUnavailableError,
    InferenceError,
    MeshError,
    ModelError,
    NotFoundError,
    OverloadedError,
    StoreError,
    UnavailableError,
    UnknownModelError,
    ValidationError,
)

if TYPE_CHECKING:
    from mongarsd.api.app import AppContext

log = structlog.get_logger("mongarsd.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RATE_BUCKETS_MAX = 10_000
REQUEST_ID_HEADER = "X-Request-Id"
EMBEDDER_RETRY_AFTER_S = 5
STORE_RETRY_AFTER_S = 2
MAX_RETRY_AFTER_S = 30  # no hint ever asks a client to wait longer (a longer wait makes clients give up)


class TokenBuckets:
    """Per-key token buckets with bounded memory (least recently used keys evicted)."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = RATE_BUCKETS_MAX) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float:
        """Take one token; return 0 when allowed, else the seconds to wait."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


def _route_label(request: web.Request) -> str:
    info = request.match_info
    route = info.route if info is not None else None
    resource = route.resource if route else None
    return resource.canonical if resource is not None else "unmatched"


def build_middlewares(ctx: AppContext) -> list[Callable[..., Awaitable[web.StreamResponse]]]:
    cfg = ctx.loaded.config
    buckets = TokenBuckets(cfg.auth.rate_limit_rps, cfg.auth.rate_limit_burst)
    allowed_origins = set(cfg.server.cors_origins)

    @web.middleware
    async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get(REQUEST_ID_HEADER, "")
        if not (0 < len(rid) <= 64 and rid.replace("-", "").isalnum()):
            rid = secrets.token_hex(8)
        request[REQUEST_ID] = rid
        structlog.contextvars.bind_contextvars(request_id=rid)
        t0 = time.monotonic()
        ctx.state.inflight += 1
        ctx.state.drained.clear()
        work = request.path not in PASSIVE_PATHS
        if work:
            ctx.state.work_started()
        status = 500
        try:
            resp = await _translate(request, handler)
            status = resp.status
            if not resp.prepared:
                resp.headers[REQUEST_ID_HEADER] = rid
            return resp
        finally:
            ctx.state.inflight -= 1
            if ctx.state.inflight == 0:
                ctx.state.drained.set()
            if work:
                ctx.state.work_ended()
            route = _route_label(request)
            ctx.metrics.http_requests.labels(route, request.method, str(status)).inc()
            ctx.metrics.http_latency.labels(route).observe(time.monotonic() - t0)
            structlog.contextvars.unbind_contextvars("request_id")

    async def _translate(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = exc.reason
            if exc.status == 404:
                message = f"no route {request.method} {request.path}"
            elif exc.status == 405:
                message = f"method {request.method} is not allowed on {request.path}"
            elif exc.status == 413:
                message = f"request body too large (limit {cfg.server.max_body_bytes} bytes)"
            return error_response(request, exc.status, message, headers=_passthrough_headers(exc))
        except ContextOverflowError as err:
            return error_response(request, err.status, str(err), param=err.param, code="context_length_exceeded")
        except ValidationError as err:
            return error_response(request, err.status, str(err), param=err.param)
        except AuthError as err:
            headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            return error_response(request, err.status, str(err), headers=headers)
        except NotFoundError as err:
            return error_response(request, 404, str(err), param=err.param)
        except OverloadedError as err:
            retry = str(min(MAX_RETRY_AFTER_S, max(1, math.ceil(err.retry_after_s))))
            return error_response(request, err.status, str(err), headers={"Retry-After": retry})
        except ModelError as err:
            status = 404 if isinstance(err, UnknownModelError) else 422
            return error_response(request, status, str(err), param="model")
        except EmbedderUnavailableError as err:
            return error_response(request, 503, str(err), headers={"Retry-After": str(EMBEDDER_RETRY_AFTER_S)} if err.transient else None)
        except UnavailableError as err:
            return error_response(request, 503, str(err))  # disabled by configuration: no Retry-After
        except StoreError as err:
            log.error("request_failed", path=request.path, error=str(err), transient=err.transient)
            headers = {"Retry-After": str(STORE_RETRY_AFTER_S)} if err.transient else None
            return error_response(request, 503, f"{type(err).__name__}: {err}", headers=headers)
        except (InferenceError, MeshError) as err:
            log.error("request_failed", path=request.path, error=str(err))
            return error_response(request, 503, f"{type(err).__name__}: {err}", headers={"Retry-After": str(STORE_RETRY_AFTER_S)})
        except ConnectionResetError:
            # the client went away (mid-body or mid-stream): nothing can be answered, nothing to report
            log.info("client_disconnected", path=request.path)
            return web.Response(status=CLIENT_CLOSED_STATUS)
        except Exception as err:  # last resort: log with the request id, never leak a trace
            log.error("unhandled_error", path=request.path, error=repr(err), exc_info=True)
            return error_response(request, 500, f"internal error (request id {request[REQUEST_ID]})")

    @web.middleware
    async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and (origin in allowed_origins or "*" in allowed_origins)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not allowed:
                return error_response(request, 403, "cross-origin requests are not allowed (server.cors_origins)")
            resp: web.StreamResponse = web.Response(status=204)
        else:
            resp = await handler(request)
        if allowed and origin is not None and not resp.prepared:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, DELETE, OPTIONS"
            resp.headers["Vary"] = "Origin"
        return resp

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route if request.match_info is not None else None
        needed = required_role(route.handler) if route is not None and request.match_info.http_exception is None else "public"
        principal = await _authenticate(request)
        if principal is not None:
            request[PRINCIPAL] = principal
        if needed == "public":
            return await handler(request)
        if principal is None:
            raise AuthError("authentication required: send Authorization: Bearer <token> (create one with `mongarsd token create`)")
        check_role(principal, needed)
        # The origin node already charged the user's bucket for a signed forward; admission control still bounds it.
        forwarded = principal.role == "peer" and (principal.token_id or "").startswith("peer:")
        throttled = (not principal.loopback or principal.token_id) and not forwarded
        wait = buckets.take(principal.rate_key) if throttled else 0.0
        if wait > 0:
            raise OverloadedError(f"rate limit exceeded for this token ({cfg.auth.rate_limit_rps:g} requests/s)", retry_after_s=wait)
        return await handler(request)

    async def _authenticate(request: web.Request) -> Principal | None:
        # A node-signed forward is checked first, so one arriving over loopback is never the local admin.
        if ctx.mesh is not None:
            # a signed request's body is read here (bounded: api.io.async_read_body) to check its signature
            peer: Principal | None = await async_authenticate_peer(request, ctx.mesh)
            if peer is not None:
                return peer
        header = request.headers.get("Authorization")
        if header is not None and header.strip().lower() == "bearer":
            # `Bearer ` with an empty key (Open WebUI's RAG calls, SDKs without a key) means no credentials
            header = None
        loopback = is_loopback(request.remote)
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
            if loopback and cfg.auth.loopback_trusted and not token.strip().startswith(TOKEN_PREFIX):
                # SDKs insist on some api_key ("x", "ollama", "sk-..."): on trusted loopback that placeholder
                # grants nothing beyond what no header grants. Real mongarsd tokens are always verified.
                return Principal(user=LOCAL_ADMIN_USER, role="admin", token_id=None, loopback=True)
            info = await ctx.tokens.async_verify(token.strip())
            if info is None:
                raise AuthError("invalid or revoked token")
            return Principal(user=info.user, role=info.role, token_id=info.id, loopback=loopback)
        if loopback and cfg.auth.loopback_trusted:
            return Principal(user=LOCAL_ADMIN_USER, role="admin", token_id=None, loopback=True)
        return None

    # validation runs after auth (an unauthenticated caller learns nothing about bodies) and
    # inside the envelope, so each surface answers its refusals in its own error shape
    return [envelope_middleware, cors_middleware, auth_middleware, validation_middleware]


async def async_add_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Stamp X-Request-Id on every response as its headers go out, streamed ones included."""
    rid = request.get(REQUEST_ID)
    if isinstance(rid, str) and REQUEST_ID_HEADER not in response.headers:
        response.headers[REQUEST_ID_HEADER] = rid


def _passthrough_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
