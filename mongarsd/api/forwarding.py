"""Forwarding a generation request to a better mesh node: the HTTP side of the mesh.

The mesh (mongarsd.mesh) decides where a request should run, signs it with this node's
identity and keeps each peer's circuit breaker; this module reads and answers HTTP: it checks
signed requests arriving from peers, relays a request to a peer and passes its answer (whole,
or streamed) back to the client.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Final

import structlog
from aiohttp import ClientConnectionResetError, ClientError, ClientSession, ClientTimeout, web

from mongarsd.api.io import async_read_body
from mongarsd.mesh.forward import H_SERVED_BY
from mongarsd.mesh.service import MeshService, PeerRoute
from mongarsd.principal import PRINCIPAL, Principal

log = structlog.get_logger("mongarsd.api.forwarding")

REQ_HOPS: Final = web.RequestKey("mongarsd_mesh_hops", int)
REQ_SENDER: Final = web.RequestKey("mongarsd_mesh_sender", str)

FORWARD_CONNECT_TIMEOUT_S: Final = 3.0
FORWARD_READ_TIMEOUT_S: Final = 120.0  # longest silence from a peer before it counts as failed
MAX_FORWARD_RESPONSE_BYTES: Final = 16 * 1024 * 1024  # non-streamed answers are buffered
STREAM_CHUNK_BYTES: Final = 16384
# Statuses after which another node may do better: we were refused (auth, load) or it broke.
RETRY_STATUSES: Final = frozenset({401, 403, 404, 408, 429, 500, 502, 503, 504})
BREAKER_STATUSES: Final = frozenset({500, 502, 503, 504})
_PASS_HEADERS: Final = ("Content-Type", "Cache-Control", H_SERVED_BY, "X-Accel-Buffering", "Retry-After")


class PeerFailure(Exception):
    """A forward failed before any byte reached the client; another node may be tried.

    `breaker` says whether it counts against the peer's circuit breaker (connection errors,
    timeouts, 5xx) or not (the peer answered sensibly: busy, model gone, refused).
    """

    def __init__(self, reason: str, *, breaker: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.breaker = breaker


class ClientGone(Exception):
    """The client disconnected while we relayed a stream."""


async def async_relay(
    session: ClientSession, *, url: str, request: web.Request, body: bytes, headers: Mapping[str, str], stream: bool
) -> web.StreamResponse:
    """POST to a peer; raise PeerFailure until the first byte, then pass the stream through.

    A non-streamed answer is read whole (capped) before we answer, so any failure is retryable.
    A streamed one is committed to the client at its first chunk; a failure after that ends the
    client's stream (SSE/NDJSON clients see it end early) and is counted, not retried.
    """
    timeout = ClientTimeout(
        total=None, connect=FORWARD_CONNECT_TIMEOUT_S, sock_connect=FORWARD_CONNECT_TIMEOUT_S, sock_read=FORWARD_READ_TIMEOUT_S
    )
    try:
        upstream = await session.post(
            url, data=body, headers={**headers, "Content-Type": request.headers.get("Content-Type", "application/json")}, timeout=timeout
        )
    except (ClientError, TimeoutError, OSError) as err:
        raise PeerFailure(f"connect: {type(err).__name__}", breaker=True) from err
    async with upstream:
        if upstream.status in RETRY_STATUSES:
            raise PeerFailure(f"status {upstream.status}", breaker=upstream.status in BREAKER_STATUSES)
        out_headers = {k: upstream.headers[k] for k in _PASS_HEADERS if k in upstream.headers}
        if not stream:
            try:
                data = await upstream.content.read(MAX_FORWARD_RESPONSE_BYTES + 1)
            except (ClientError, TimeoutError, OSError) as err:
                raise PeerFailure(f"read: {type(err).__name__}", breaker=True) from err
            if len(data) > MAX_FORWARD_RESPONSE_BYTES:
                raise PeerFailure("response too large", breaker=False)
            ctype = out_headers.pop("Content-Type", "application/json")
            resp = web.Response(status=upstream.status, body=data, headers=out_headers)
            resp.headers["Content-Type"] = ctype
            return resp
        try:
            first = await upstream.content.readany()
        except (ClientError, TimeoutError, OSError) as err:
            raise PeerFailure(f"first byte: {type(err).__name__}", breaker=True) from err
        if not first:
            raise PeerFailure("empty stream", breaker=True)
        sresp = web.StreamResponse(status=upstream.status, headers=out_headers)
        try:
            await sresp.prepare(request)
            await sresp.write(first)
        except (ConnectionResetError, ClientConnectionResetError) as err:
            raise ClientGone() from err
        while True:
            try:
                chunk = await upstream.content.readany()
            except (ClientError, TimeoutError, OSError) as err:
                raise StreamBroken(sresp, f"mid-stream: {type(err).__name__}") from err
            if not chunk:
                break
            try:
                await sresp.write(chunk)
            except (ConnectionResetError, ClientConnectionResetError) as err:
                raise ClientGone() from err
        await sresp.write_eof()
        return sresp


class StreamBroken(Exception):
    """The peer failed after the stream was committed to the client; `response` is prepared."""

    def __init__(self, response: web.StreamResponse, reason: str) -> None:
        super().__init__(reason)
        self.response = response
        self.reason = reason


async def async_authenticate_peer(request: web.Request, mesh: MeshService) -> Principal | None:
    """Return the peer principal of a node-signed request, None if unsigned; AuthError if bad."""
    if not mesh.is_signed(request.headers):
        return None
    body = await async_read_body(request)
    peer = mesh.verify_signed(method=request.method, path_qs=request.path_qs, headers=request.headers, body=body)
    request[REQ_HOPS] = peer.hops
    request[REQ_SENDER] = peer.node_id
    return Principal(user=peer.user, role="peer", token_id=f"peer:{peer.node_id}", loopback=False)


async def async_maybe_forward(
    request: web.Request, mesh: MeshService, body: Mapping[str, Any], *, model: str, stream: bool
) -> web.StreamResponse | None:
    """Serve the request on a better peer and return its response, or None to run it here."""
    principal = request.get(PRINCIPAL)
    if not isinstance(principal, Principal):
        return None
    hops = request.get(REQ_HOPS, 0)
    routes = mesh.forward_routes(model=model, hops=hops, sender=request.get(REQ_SENDER), body=body)
    if not routes:
        return None
    raw = await async_read_body(request)
    for route in routes:
        resp = await _async_try_peer(request, mesh, route, raw, hops=hops, user=principal.user, stream=stream)
        if resp is not None:
            return resp
    mesh.counters["forward_fallback_local"] += 1
    return None


async def _async_try_peer(
    request: web.Request, mesh: MeshService, route: PeerRoute, raw: bytes, *, hops: int, user: str, stream: bool
) -> web.StreamResponse | None:
    session = mesh.http_session
    breaker = route.breaker
    if session is None or not breaker.allow():
        return None
    headers = mesh.sign_forward(route.node_id, method=request.method, path_qs=request.path_qs, body=raw, hops=hops + 1, user=user)
    t0 = time.monotonic()
    with mesh.track_forward(route.node_id) as track:
        try:
            resp = await async_relay(
                session, url=route.base_url + request.path_qs, request=request, body=raw, headers=headers, stream=stream
            )
            track.answered = resp.status == HTTPStatus.OK
        except PeerFailure as err:
            if err.breaker:
                breaker.record_failure()
            else:
                breaker.record_success()  # it answered: alive, merely unable to take this one
            mesh.forward_failures[err.reason.split(":")[0].split(" ")[0]] += 1
            log.warning("mesh_forward_failed", peer=route.node_id, addr=route.base_url, reason=err.reason, breaker=breaker.state.value)
            return None
        except StreamBroken as err:
            breaker.record_failure()
            mesh.forward_failures["mid_stream"] += 1
            log.warning("mesh_forward_broken_mid_stream", peer=route.node_id, addr=route.base_url, reason=err.reason)
            return err.response
        except ClientGone:
            breaker.record_success()
            mesh.counters["forward_client_gone"] += 1
            raise ConnectionResetError("client went away during a forwarded stream") from None
        except BaseException:
            breaker.release()
            raise
    breaker.record_success()
    mesh.forwards[route.node_id] += 1
    log.info(
        "mesh_forwarded",
        peer=route.node_id,
        path=request.path,
        stream=stream,
        status=resp.status,
        elapsed_ms=round((time.monotonic() - t0) * 1000, 1),
    )
    return resp
