"""monGARS peer routes under /api/v1/peer, and the X-Mongars-Served-By response header.

GET  /api/v1/peer/list        (user)  this node, mesh members, registered peers; inbox for admins
POST /api/v1/peer/register    (admin) {url}: persist a peer API URL; idempotent (200 either way)
POST /api/v1/peer/unregister  (admin) {url}: 404 when it was not registered
GET  /api/v1/peer/load        (peer)  this node's load (monGARS field names + slots, tokens/s)
POST /api/v1/peer/message     (peer)  {message}: a small JSON message from a node-signed peer
POST /api/v1/peer/leave       (admin) leave the mesh gracefully
GET  /api/v1/peer/hello       (public) node id, gossip port, cluster key id (what mDNS publishes)
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from mongarsd.api.app import CTX
from mongarsd.api.auth import principal_of, public, require
from mongarsd.api.io import async_read_body, read_json
from mongarsd.errors import AuthError, MeshError, NotFoundError, ValidationError
from mongarsd.mesh.forward import H_SERVED_BY
from mongarsd.mesh.peers import normalize_peer_url
from mongarsd.mesh.service import MeshService, member_public

MAX_MESSAGE_BYTES: Final = 4096


def _mesh(request: web.Request) -> MeshService:
    mesh = request.app[CTX].mesh
    if not isinstance(mesh, MeshService):
        raise MeshError("the mesh service is not configured in this daemon")
    return mesh


@require("user")
async def handle_list(request: web.Request) -> web.Response:
    mesh = _mesh(request)
    principal = principal_of(request)
    members = [
        member_public(m, local_id=mesh.node_id, breaker=None if m.node_id == mesh.node_id else mesh.breakers.get(m.node_id).state.value)
        for m in mesh.members()
    ]
    if not members:
        members = [{"node_id": mesh.node_id, "self": True, "state": "alive" if mesh.node_id else "unknown", "load": mesh.load_snapshot()}]
    body: dict[str, Any] = {
        "node_id": mesh.node_id,
        "mesh": {"enabled": mesh.enabled, "running": mesh.running},
        "members": members,
        "static": [p.public() for p in await mesh.async_static_peers()],
    }
    if principal.is_admin:
        body["inbox"] = list(mesh.inbox)
    return web.json_response(body)


@require("admin")
async def handle_register(request: web.Request) -> web.Response:
    mesh = _mesh(request)
    url = normalize_peer_url((await read_json(request)).get("url"))
    added, joined = await mesh.async_register(url)
    count = len(await mesh.async_static_peers())
    return web.json_response({"status": "registered" if added else "already registered", "url": url, "count": count, "joined": joined})


@require("admin")
async def handle_unregister(request: web.Request) -> web.Response:
    mesh = _mesh(request)
    url = normalize_peer_url((await read_json(request)).get("url"))
    if not await mesh.async_unregister(url):
        raise NotFoundError(f"peer {url} is not registered", param="url")
    count = len(await mesh.async_static_peers())
    return web.json_response({"status": "unregistered", "url": url, "count": count})


@require("peer")
async def handle_load(request: web.Request) -> web.Response:
    return web.json_response(_mesh(request).load_snapshot())


@require("peer")
async def handle_message(request: web.Request) -> web.Response:
    mesh = _mesh(request)
    principal = principal_of(request)
    signed_by = (
        principal.token_id[5:] if principal.role == "peer" and principal.token_id and principal.token_id.startswith("peer:") else None
    )
    if signed_by is None and not principal.is_admin:
        raise AuthError("peer messages must be signed by a mesh node", status=403)
    raw = await async_read_body(request)
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ValidationError(f"peer message is larger than {MAX_MESSAGE_BYTES} bytes", param="message", status=413)
    body = await read_json(request)
    if "message" not in body:
        raise ValidationError('body must be {"message": <JSON value>}', param="message")
    message = body["message"]
    if message is None or message in ("", {}, []):
        raise ValidationError("message must not be empty", param="message")
    item = mesh.receive_message(sender=signed_by or f"admin:{principal.user}", user=principal.user, message=message)
    return web.json_response({"status": "received", "from": item["from"]})


@require("admin")
async def handle_leave(request: web.Request) -> web.Response:
    mesh = _mesh(request)
    left = await mesh.async_leave()
    return web.json_response({"status": "left" if left else "not in a mesh", "node_id": mesh.node_id})


@public
async def handle_hello(request: web.Request) -> web.Response:
    return web.json_response(_mesh(request).hello())


async def _served_by(request: web.Request, response: web.StreamResponse) -> None:
    """Name the node that served every response; a forwarded one keeps the peer's header."""
    mesh = request.app[CTX].mesh
    node = mesh.node_id if mesh is not None else None
    if node and H_SERVED_BY not in response.headers:
        response.headers[H_SERVED_BY] = node


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/peer/list", handle_list)
    app.router.add_post("/api/v1/peer/register", handle_register)
    app.router.add_post("/api/v1/peer/unregister", handle_unregister)
    app.router.add_get("/api/v1/peer/load", handle_load)
    app.router.add_post("/api/v1/peer/message", handle_message)
    app.router.add_post("/api/v1/peer/leave", handle_leave)
    app.router.add_get("/api/v1/peer/hello", handle_hello)
    app.on_response_prepare.append(_served_by)
