"""MeshService in-process: three nodes over real loopback UDP/TCP, real aiohttp apps, signed
forwarding with failover and stream passthrough; peer routes; URL validation; request signatures."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import structlog
from aiohttp import web

from mongarsd.api import peers as peer_routes
from mongarsd.api.app import CTX, AppContext, create_app
from mongarsd.api.auth import PRINCIPAL
from mongarsd.api.forwarding import REQ_HOPS, REQ_SENDER, async_authenticate_peer, async_maybe_forward
from mongarsd.board import BoardInfo
from mongarsd.config import Config, LoadedConfig, MeshConfig, ServerConfig
from mongarsd.errors import AuthError, ConfigError, ValidationError
from mongarsd.memory.db import Database
from mongarsd.memory.tokens import TokenStore
from mongarsd.mesh import keyring as keyring_mod
from mongarsd.mesh.forward import H_SERVED_BY, ReplayCache, RequestVerifier, make_nonce, sign_headers
from mongarsd.mesh.identity import NodeIdentity
from mongarsd.mesh.keyring import Keyring, generate_key, key_id
from mongarsd.mesh.peers import normalize_peer_url
from mongarsd.mesh.security import SenderWindow
from mongarsd.mesh.service import MeshService, keyring_path
from mongarsd.mesh.transport import free_port
from mongarsd.metrics import Metrics
from tests.mesh.cluster import wait_until

pytestmark = pytest.mark.timeout(60)

M = "smollm2-135m-instruct:q4_1"
MSGS = [{"role": "user", "content": "hi"}]  # the API validates request bodies before the (fake) handler runs

# --- URL validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://10.0.0.2:8642", "http://10.0.0.2:8642"),
        ("http://10.0.0.2:8642/", "http://10.0.0.2:8642"),
        ("  HTTP://Board.Local:9000  ", "http://board.local:9000"),
        ("http://board.local", "http://board.local:8642"),
        ("https://board.local", "https://board.local:443"),
        ("http://[fe80::1]:8642", "http://[fe80::1]:8642"),
    ],
)
def test_peer_url_normalized(raw: str, expected: str) -> None:
    assert normalize_peer_url(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        42,
        "ftp://host:21",
        "javascript:alert(1)",
        "http://user:pw@host:8642",
        "http://host:8642/#frag",
        "http://host:8642/?q=1",
        "http://host:8642/api/v1",
        "http://:8642",
        "http://host:0",
        "http://host:99999",
        "http://ho st:8642",
        "http://host\n:8642",
        "http://" + "a" * 600 + ":8642",
        "http://-bad-.local:8642",
    ],
)
def test_peer_url_rejected(raw: object) -> None:
    with pytest.raises(ValidationError) as info:
        normalize_peer_url(raw)
    assert info.value.param == "url"


# --- request signatures --------------------------------------------------------------------


class Keys:
    def __init__(self) -> None:
        self.sender = NodeIdentity.generate()
        self.target = NodeIdentity.generate()
        self.now = 1_700_000_000.0
        self.known: dict[str, bytes] = {self.sender.node_id: self.sender.public_key}
        self.verifier = RequestVerifier(
            local_node_id=self.target.node_id, public_key_of=self.known.get, clock=lambda: self.now, replay=ReplayCache(8)
        )

    def sign(self, body: bytes = b'{"x":1}', **kw: Any) -> dict[str, str]:
        args: dict[str, Any] = {
            "target": self.target.node_id,
            "method": "POST",
            "path_qs": "/v1/chat/completions",
            "body": body,
            "hops": 1,
            "user": "alice",
            "now_s": self.now,
            **kw,
        }
        return sign_headers(
            self.sender if "identity" not in kw else kw.pop("identity"), **{k: v for k, v in args.items() if k != "identity"}
        )

    def verify(self, headers: dict[str, str], body: bytes = b'{"x":1}', path: str = "/v1/chat/completions", method: str = "POST") -> Any:
        return self.verifier.verify(method=method, path_qs=path, headers=headers, body=body)


def test_signed_request_verifies_once() -> None:
    k = Keys()
    headers = k.sign()
    peer = k.verify(headers)
    assert (peer.node_id, peer.user, peer.hops) == (k.sender.node_id, "alice", 1)
    with pytest.raises(AuthError, match="replayed"):
        k.verify(headers)
    assert k.verifier.rejected == {"replay": 1}


def test_stale_and_future_timestamps_are_refused_for_unstamped_nonces() -> None:
    k = Keys()  # an older sender: random nonces, so only the wall clock vouches for freshness
    old = k.sign(now_s=k.now - 31, nonce="a" * 32)
    future = k.sign(now_s=k.now + 31, nonce="b" * 32)
    for h in (old, future):
        with pytest.raises(AuthError, match="window"):
            k.verify(h)
    assert k.verify(k.sign(now_s=k.now + 29, nonce="c" * 32)).user == "alice"


@pytest.mark.parametrize("skew_s", [-3 * 86400.0, -31.0, 31.0, 2 * 86400.0])
def test_forward_from_a_skewed_clock_is_accepted_once_and_logged(skew_s: float) -> None:
    k = Keys()  # issue 9: the sender's wall clock is days (or seconds) off ours
    headers = k.sign(now_s=k.now + skew_s)
    with structlog.testing.capture_logs() as logs:
        assert k.verify(headers).user == "alice"
        k.verify(k.sign(now_s=k.now + skew_s))
    skews = [e for e in logs if e["event"] == "mesh_peer_clock_skew"]
    assert len(skews) == 1 and skews[0]["peer"] == k.sender.node_id and skews[0]["skew_s"] == skew_s  # rate-limited
    with pytest.raises(AuthError, match="replayed"):
        k.verify(headers)
    assert k.verifier.rejected == {"replay": 1}


def test_stamped_forward_replayed_after_its_window_or_eviction_is_refused() -> None:
    k = Keys()
    k.verifier = RequestVerifier(
        local_node_id=k.target.node_id,
        public_key_of=k.known.get,
        clock=lambda: k.now,
        senders=SenderWindow(window_s=30.0, max_entries=4),
    )
    session = bytes(5)
    skewed = k.now - 5 * 86400  # nobody's wall clock matters below
    first = k.sign(now_s=skewed, nonce=make_nonce(session=session, position_us=1_000_000))
    held = k.sign(now_s=skewed, nonce=make_nonce(session=session, position_us=2_000_000))  # never delivered
    k.verify(first)
    for i in range(10):  # the sender moves on: more than the window, more than the cache holds
        k.verify(k.sign(now_s=skewed, nonce=make_nonce(session=session, position_us=40_000_000 + i)))
    for h in (first, held):
        with pytest.raises(AuthError, match="replay window"):
            k.verify(h)
    recent = k.sign(now_s=skewed, nonce=make_nonce(session=session, position_us=41_000_000))
    k.verify(recent)
    with pytest.raises(AuthError, match=r"replayed|replay window"):
        k.verify(recent)
    # Another boot of the same node is another timeline, trusted on first use.
    assert k.verify(k.sign(now_s=skewed, nonce=make_nonce(session=b"\x01" * 5, position_us=5))).user == "alice"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h: {**h, "X-Mongars-User": "mallory"},
        lambda h: {**h, "X-Mongars-Hops": "2"},
        lambda h: {**h, "X-Mongars-Nonce": "0" * 32},
        lambda h: {**h, "X-Mongars-Ts": str(int(h["X-Mongars-Ts"]) + 1)},
    ],
)
def test_tampered_headers_fail_the_signature(tamper: Callable[[dict[str, str]], dict[str, str]]) -> None:
    k = Keys()
    with pytest.raises(AuthError, match="does not verify"):
        k.verify(tamper(k.sign()))


def test_tampered_body_path_method_or_target_fail() -> None:
    k = Keys()
    with pytest.raises(AuthError, match="does not verify"):
        k.verify(k.sign(), body=b'{"x":2}')
    with pytest.raises(AuthError, match="does not verify"):
        k.verify(k.sign(), path="/api/v1/peer/leave")
    with pytest.raises(AuthError, match="does not verify"):
        k.verify(k.sign(), method="PUT")
    with pytest.raises(AuthError, match="does not verify"):
        k.verify(k.sign(target=NodeIdentity.generate().node_id))  # signed for another node


def test_forged_by_non_member_or_claiming_a_member_id() -> None:
    k = Keys()
    stranger = NodeIdentity.generate()
    with pytest.raises(AuthError, match="not a live member"):
        k.verify(k.sign(identity=stranger))
    forged = k.sign(identity=stranger)
    forged["X-Mongars-Node"] = k.sender.node_id  # claims to be the member, signs with its own key
    with pytest.raises(AuthError, match="does not verify"):
        k.verify(forged)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h: {k: v for k, v in h.items() if k != "X-Mongars-Nonce"},
        lambda h: {**h, "X-Mongars-Sig": "not base64!"},
        lambda h: {**h, "X-Mongars-Sig": "AAAA"},
        lambda h: {**h, "X-Mongars-Hops": "0"},
        lambda h: {**h, "X-Mongars-Hops": "99"},
        lambda h: {**h, "X-Mongars-User": ""},
        lambda h: {**h, "X-Mongars-Node": "../../etc"},
    ],
)
def test_malformed_headers_are_refused(tamper: Callable[[dict[str, str]], dict[str, str]]) -> None:
    k = Keys()
    with pytest.raises(AuthError, match=r"malformed|base64|length|range"):
        k.verify(tamper(k.sign()))


def test_forged_copies_do_not_burn_the_real_nonce() -> None:
    k = Keys()
    real = k.sign()
    with pytest.raises(AuthError):
        k.verify({**real, "X-Mongars-User": "mallory"})
    assert k.verify(real).user == "alice"


# --- in-process nodes ----------------------------------------------------------------------


class FakeLLM:
    """The bits of InferenceManager the mesh reads (mesh.local.LocalInference)."""

    def __init__(self, *, has_model: bool, loaded: bool, busy: int = 0, deferred: int = 0, slots: int = 2) -> None:
        self._ids = [M] if has_model else []
        self.is_loaded = loaded
        self.busy = busy
        self.deferred = deferred
        self.slots = slots

    def available_ids(self) -> list[str]:
        return list(self._ids)

    def decode_totals(self) -> tuple[float, float]:
        return 0.0, 0.0

    def loaded(self) -> list[Any]:
        if not self.is_loaded:
            return []
        return [SimpleNamespace(entry=SimpleNamespace(id=M), slots_total=self.slots, slots_busy=self.busy, requests_deferred=self.deferred)]


async def fake_generation(request: web.Request) -> web.StreamResponse:
    """Stand-in for the OpenAI handler: the mesh hook first, then a local answer."""
    ctx = request.app[CTX]
    body = json.loads(await request.read())
    resp: web.StreamResponse | None = await async_maybe_forward(
        request, ctx.mesh, body, model=body["model"], stream=bool(body.get("stream"))
    )
    if resp is not None:
        return resp
    principal = request[PRINCIPAL]
    answer = {"node": ctx.mesh.node_id, "user": principal.user, "role": principal.role, "hops": request.get(REQ_HOPS, 0)}
    if not body.get("stream"):
        return web.json_response(answer)
    sresp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await sresp.prepare(request)
    for i in range(3):
        await sresp.write(f"data: {json.dumps({**answer, 'i': i})}\n\n".encode())
    await sresp.write(b"data: [DONE]\n\n")
    await sresp.write_eof()
    return sresp


@web.middleware
async def emulate_auth_hook(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """What middlewares._authenticate does with api.forwarding.async_authenticate_peer.

    Innermost here, so it overrides the loopback admin; skipped when the real hook already ran.
    """
    mesh = request.app[CTX].mesh
    if REQ_SENDER not in request:
        try:
            peer = await async_authenticate_peer(request, mesh)
        except AuthError as err:
            return web.json_response({"error": str(err)}, status=401)
        if peer is not None:
            request[PRINCIPAL] = peer
    return await handler(request)


@dataclass
class Node:
    mesh: MeshService
    llm: FakeLLM
    db: Database
    runner: web.AppRunner
    url: str
    tokens: TokenStore

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.mesh.async_stop()
        await self.db.async_stop()


async def start_node(
    tmp: Path, i: int, key: bytes | None, *, llm: FakeLLM, seeds: tuple[str, ...] = (), enabled: bool | None = True
) -> Node:
    state = tmp / f"n{i}"
    await asyncio.to_thread(state.mkdir, parents=True, exist_ok=True)
    if key is not None:
        await asyncio.to_thread(Keyring(key).save, keyring_path(state))
    api_port = free_port()
    gport = free_port()
    cfg = Config(
        server=ServerConfig(host="127.0.0.1", port=api_port, state_dir=state),
        mesh=MeshConfig(
            enabled=enabled,
            bind_host="127.0.0.1",
            gossip_port=gport,
            interfaces=("lo",),
            mdns=False,
            seeds=seeds,
            timing="local",
            cluster_label="t",
        ),
    )
    db = Database(path=state / "mongarsd.db")
    await db.async_start()
    metrics = Metrics()
    board = BoardInfo(profile="generic", model="test", arch="x86_64", cores_logical=2, cores_physical=2)
    mesh = MeshService(config=cfg, board=board, llm=llm, db=db, metrics=metrics, machine_id_path=tmp / "machine-id")
    await mesh.async_start()
    tokens = TokenStore(db=db)
    ctx = AppContext(loaded=LoadedConfig(cfg, {}, "generic"), board=board, metrics=metrics, db=db, tokens=tokens, mesh=mesh)
    ctx.state.ready = True
    app = create_app(ctx, [peer_routes.setup_routes, lambda a: a.router.add_post("/v1/chat/completions", fake_generation)])
    app.middlewares.append(emulate_auth_hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", api_port).start()
    return Node(mesh, llm, db, runner, f"http://127.0.0.1:{api_port}", tokens)


@pytest_asyncio.fixture
async def trio(tmp_path: Path) -> AsyncIterator[list[Node]]:
    await asyncio.to_thread((tmp_path / "machine-id").write_text, "test-machine\n")
    key = generate_key()
    nodes: list[Node] = []
    try:
        a = await start_node(tmp_path, 0, key, llm=FakeLLM(has_model=True, loaded=True, busy=2, deferred=6))
        nodes.append(a)
        seed = f"127.0.0.1:{a.mesh.gossip.addr[1]}"  # type: ignore[union-attr]
        nodes.append(await start_node(tmp_path, 1, key, llm=FakeLLM(has_model=True, loaded=True), seeds=(seed,)))
        nodes.append(await start_node(tmp_path, 2, key, llm=FakeLLM(has_model=False, loaded=False), seeds=(seed,)))
        ids = {n.mesh.node_id for n in nodes}
        await wait_until(lambda: all({m.node_id for m in n.mesh.members() if m.state == "alive"} == ids for n in nodes), 10.0)
        # state published: everyone sees B's API address and loaded model
        b = nodes[1].mesh.node_id
        await wait_until(
            lambda: all((m := n.mesh.gossip.member(b)) is not None and M in m.meta.get("models_loaded", []) for n in nodes), 5.0
        )  # type: ignore[union-attr]
        yield nodes
    finally:
        for n in reversed(nodes):
            await n.stop()


async def post(url: str, body: Any, *, token: str | None = None, raw: bool = False) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as resp:
        text = await resp.text()
        return resp.status, dict(resp.headers), text if raw else json.loads(text)


async def test_busy_node_forwards_to_idle_peer_with_signed_origin_user(trio: list[Node]) -> None:
    a, b, _ = trio
    token, _ = await a.tokens.async_create("alice", "user")
    status, headers, doc = await post(a.url + "/v1/chat/completions", {"model": M, "messages": MSGS, "max_tokens": 4}, token=token)
    assert status == 200, doc
    assert headers[H_SERVED_BY] == b.mesh.node_id
    assert doc == {"node": b.mesh.node_id, "user": "alice", "role": "peer", "hops": 1}
    assert a.mesh.forwards[b.mesh.node_id] == 1
    metrics = (await asyncio.to_thread(a.mesh._metrics.render)).decode()  # type: ignore[union-attr]
    assert f'mongarsd_mesh_forwards_total{{peer="{b.mesh.node_id}"}} 1.0' in metrics
    assert 'mongarsd_mesh_members{state="alive"} 3.0' in metrics
    # The persona id never leaves the node (its memory lives here).
    status, headers, doc = await post(a.url + "/v1/chat/completions", {"model": "mongars", "messages": MSGS}, token=token)
    assert headers[H_SERVED_BY] == a.mesh.node_id and doc["node"] == a.mesh.node_id


async def test_an_answered_forward_frees_the_peer_slot_before_its_next_state(trio: list[Node]) -> None:
    a, b, _ = trio
    bid = b.mesh.node_id
    assert bid is not None
    status, headers, _ = await post(a.url + "/v1/chat/completions", {"model": M, "messages": MSGS, "max_tokens": 4})
    assert status == 200 and headers[H_SERVED_BY] == bid
    [(started, ended)] = a.mesh._finished[bid]
    assert started <= ended <= time.time()
    # B's state still shows a busy slot of ours that has answered: the plan counts it free.
    b.llm.busy = 1
    await wait_until(lambda: (m := a.mesh.gossip.member(bid)) is not None and m.meta.get("slots_free") == 1, 5.0)  # type: ignore[union-attr]
    state_at = a.mesh.gossip.member(bid).updated_at  # type: ignore[union-attr]
    a.mesh._note_finished(bid, state_at - 5.0, time.time())  # started before that state, answered after it
    [peer] = [n for n in a.mesh.plan(model=M) if n.node_id == bid]
    assert peer.finished == 1 and peer.busy_slots == 1
    # A forward the peer did not serve (refused, or failed) frees nothing.
    kept = list(a.mesh._finished[bid])
    with a.mesh.track_forward(bid):
        pass
    assert list(a.mesh._finished[bid]) == kept


async def test_stream_passes_through(trio: list[Node]) -> None:
    a, b, _ = trio
    status, headers, text = await post(a.url + "/v1/chat/completions", {"model": M, "messages": MSGS, "stream": True}, raw=True)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers[H_SERVED_BY] == b.mesh.node_id
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["i"] for e in events[:-1]] == [0, 1, 2]
    assert json.loads(events[0])["user"] == "local"  # loopback admin on A is the origin user


async def test_idle_local_node_serves_itself(trio: list[Node]) -> None:
    _, b, _ = trio
    status, headers, doc = await post(b.url + "/v1/chat/completions", {"model": M, "messages": MSGS})
    assert status == 200 and headers[H_SERVED_BY] == b.mesh.node_id and doc["hops"] == 0


async def test_peer_down_before_first_byte_fails_over_locally_and_opens_breaker(trio: list[Node]) -> None:
    a, b, _ = trio
    await b.runner.cleanup()  # B's API is gone but B still gossips: the worst case for a scheduler
    for _ in range(3):
        status, headers, doc = await post(a.url + "/v1/chat/completions", {"model": M, "messages": MSGS})
        assert status == 200 and headers[H_SERVED_BY] == a.mesh.node_id and doc["node"] == a.mesh.node_id
    breaker = a.mesh.breakers.get(b.mesh.node_id)
    assert breaker.state.value == "open"
    assert a.mesh.forward_failures["connect"] == 3
    # Open breaker: the plan no longer includes B at all.
    assert [n.node_id for n in a.mesh.plan(model=M)] == [a.mesh.node_id]


async def test_peer_killed_holding_a_forward_is_retried_here_at_once(trio: list[Node]) -> None:
    """A peer SIGKILLed while it holds a non-streamed forward: the kernel closes its socket, the
    forward fails at once (no FORWARD_READ_TIMEOUT_S wait) and the request runs on the next node."""
    a, b, _ = trio
    port = int(b.url.rsplit(":", 1)[1])
    await b.runner.cleanup()
    got = asyncio.Event()

    async def crash_after_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the forward arrived: B queues it ...
        got.set()
        await asyncio.sleep(0.2)
        writer.transport.abort()  # ... then dies: what the kernel does to a killed process's sockets

    server = await asyncio.start_server(crash_after_reading, "127.0.0.1", port)
    try:
        t0 = time.monotonic()
        status, headers, doc = await post(a.url + "/v1/chat/completions", {"model": M, "messages": MSGS})
        elapsed = time.monotonic() - t0
    finally:
        server.close()
        await server.wait_closed()
    assert got.is_set()
    assert status == 200 and headers[H_SERVED_BY] == a.mesh.node_id and doc["node"] == a.mesh.node_id
    assert elapsed < 5.0
    assert sum(a.mesh.forward_failures.values()) == 1


async def test_hop_limit_and_sender_exclusion(trio: list[Node]) -> None:
    a, b, _ = trio
    assert a.mesh.plan(model=M, hops=2)[0].node_id == a.mesh.node_id
    assert [n.node_id for n in a.mesh.plan(model=M, hops=1, exclude=[b.mesh.node_id])] == [a.mesh.node_id]


async def test_signed_replay_over_http_is_refused(trio: list[Node]) -> None:
    a, b, _ = trio
    body = json.dumps({"model": M, "messages": MSGS}).encode()
    headers = sign_headers(
        a.mesh.identity, target=b.mesh.node_id, method="POST", path_qs="/v1/chat/completions", body=body, hops=1, user="alice"
    )  # type: ignore[arg-type]
    headers["Content-Type"] = "application/json"
    async with aiohttp.ClientSession() as s:
        async with s.post(b.url + "/v1/chat/completions", data=body, headers=headers) as resp:
            assert resp.status == 200 and (await resp.json())["role"] == "peer"
        async with s.post(b.url + "/v1/chat/completions", data=body, headers=headers) as resp:
            assert resp.status == 401 and "replayed" in await resp.text()


async def test_messages_are_signed_and_land_in_the_inbox(trio: list[Node]) -> None:
    a, b, _ = trio
    status = await a.mesh.async_send_message(b.mesh.node_id, {"hello": "from a"}, user="node")
    assert status == 200
    assert list(b.mesh.inbox)[-1]["from"] == a.mesh.node_id and list(b.mesh.inbox)[-1]["message"] == {"hello": "from a"}
    user_token, _ = await b.tokens.async_create("bob", "user")
    status, _, _ = await post(b.url + "/api/v1/peer/message", {"message": "hi"}, token=user_token)
    assert status == 403  # a user token is not a peer
    status, _, _ = await post(b.url + "/api/v1/peer/message", {"message": "x" * 5000})
    assert status == 413
    async with aiohttp.ClientSession() as s, s.get(b.url + "/api/v1/peer/list") as resp:
        listing = await resp.json()
    assert listing["inbox"][0]["message"] == {"hello": "from a"}
    assert {m["node_id"] for m in listing["members"]} == {n.mesh.node_id for n in trio}


async def test_register_unregister_and_graceful_leave(trio: list[Node]) -> None:
    a, b, c = trio
    status, _, doc = await post(a.url + "/api/v1/peer/register", {"url": b.url + "/"})
    assert status == 200 and doc["status"] == "registered" and doc["joined"] is True
    status, _, doc = await post(a.url + "/api/v1/peer/register", {"url": b.url})
    assert status == 200 and doc["status"] == "already registered" and doc["count"] == 1
    status, _, doc = await post(a.url + "/api/v1/peer/register", {"url": "http://u:p@host:1"})
    assert status == 400 and doc["error"]["param"] == "url"
    status, _, _ = await post(a.url + "/api/v1/peer/unregister", {"url": "http://10.9.9.9:1"})
    assert status == 404
    status, _, doc = await post(a.url + "/api/v1/peer/unregister", {"url": b.url})
    assert status == 200 and doc["count"] == 0
    status, _, doc = await post(c.url + "/api/v1/peer/leave", {})
    assert status == 200 and doc["status"] == "left"
    await wait_until(lambda: (m := a.mesh.gossip.member(c.mesh.node_id)) is not None and m.state == "left", 5.0)  # type: ignore[union-attr]
    assert c.mesh.members() == [] and not c.mesh.running


async def test_disabled_mesh_lists_itself_and_stores_peers(tmp_path: Path) -> None:
    await asyncio.to_thread((tmp_path / "machine-id").write_text, "m\n")
    node = await start_node(tmp_path, 0, generate_key(), llm=FakeLLM(has_model=True, loaded=False), enabled=False)
    try:
        async with aiohttp.ClientSession() as s, s.get(node.url + "/api/v1/peer/list") as resp:
            doc = await resp.json()
            assert resp.headers[H_SERVED_BY] == node.mesh.node_id
        assert doc["mesh"] == {"enabled": False, "running": False}
        assert [m["node_id"] for m in doc["members"]] == [node.mesh.node_id]
        status, _, reg = await post(node.url + "/api/v1/peer/register", {"url": "http://10.0.0.9"})
        assert status == 200 and reg["joined"] is False
        assert [p.url for p in await node.mesh.async_static_peers()] == ["http://10.0.0.9:8642"]
        status, _, _ = await post(node.url + "/v1/chat/completions", {"model": M, "messages": MSGS})
        assert status == 200  # no mesh: always local
    finally:
        await node.stop()


async def test_a_keyring_starts_the_mesh_unless_disabled(tmp_path: Path) -> None:
    """Installing a key is the intent to join: mesh.enabled unset means "when a keyring exists"."""
    await asyncio.to_thread((tmp_path / "machine-id").write_text, "m\n")
    with_key = await start_node(tmp_path, 0, generate_key(), llm=FakeLLM(has_model=True, loaded=False), enabled=None)
    without_key = await start_node(tmp_path, 1, None, llm=FakeLLM(has_model=True, loaded=False), enabled=None)
    opted_out = await start_node(tmp_path, 2, generate_key(), llm=FakeLLM(has_model=True, loaded=False), enabled=False)
    try:
        assert with_key.mesh.enabled
        assert with_key.mesh.running
        assert with_key.mesh.gossip is not None
        assert not without_key.mesh.enabled
        assert not without_key.mesh.running
        assert not opted_out.mesh.enabled
        assert not opted_out.mesh.running
    finally:
        for node in (with_key, without_key, opted_out):
            await node.stop()


async def test_enabled_without_keyring_is_a_config_error(tmp_path: Path) -> None:
    cfg = Config(server=ServerConfig(state_dir=tmp_path), mesh=MeshConfig(enabled=True, interfaces=("lo",), mdns=False))
    await asyncio.to_thread((tmp_path / "machine-id").write_text, "m\n")
    mesh = MeshService(config=cfg, machine_id_path=tmp_path / "machine-id")
    with pytest.raises(ConfigError, match="keys generate"):
        await mesh.async_start()
    await mesh.async_stop()


async def test_identity_is_stable_and_regenerated_with_a_new_machine_id(tmp_path: Path) -> None:
    mid = tmp_path / "machine-id"
    cfg = Config(server=ServerConfig(state_dir=tmp_path))
    ids = []
    for content in ("one\n", "one\n", "two\n"):
        await asyncio.to_thread(mid.write_text, content)
        mesh = MeshService(config=dataclasses.replace(cfg), machine_id_path=mid)
        await mesh.async_start()
        ids.append(mesh.node_id)
        await mesh.async_stop()
    assert ids[0] == ids[1] != ids[2]


async def test_live_key_rotation_through_the_keyring_file_keeps_the_mesh(
    trio: list[Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `mongarsd keys install/use/remove` do: edit each node's keyring file; the running mesh follows.
    monkeypatch.setattr(keyring_mod, "KEYRING_POLL_S", 0.1)
    old = trio[0].mesh.keyring.primary_key  # type: ignore[union-attr]
    new = generate_key()
    paths = [keyring_path(tmp_path / f"n{i}") for i in range(3)]

    async def edit_all(step: Callable[[Keyring], None]) -> None:
        for p in paths:
            ring = await asyncio.to_thread(Keyring.load, p)
            step(ring)
            await asyncio.to_thread(ring.save, p)
            os.utime(p, ns=(time.time_ns(), time.time_ns() + 1))  # a distinct mtime even on coarse clocks

    # The loops already running pick up the shorter poll after their current sleep.
    await edit_all(lambda r: r.install(new))
    await wait_until(lambda: all(n.mesh.keyring.lookup(key_id(new)) == new for n in trio), 10.0)  # type: ignore[union-attr]
    await edit_all(lambda r: r.use(new))
    await wait_until(lambda: all(n.mesh.keyring.primary_key == new for n in trio), 10.0)  # type: ignore[union-attr]
    await edit_all(lambda r: r.remove(old))
    await wait_until(lambda: all(n.mesh.keyring.lookup(key_id(old)) is None for n in trio), 10.0)  # type: ignore[union-attr]
    ids = {n.mesh.node_id for n in trio}
    # A few probe rounds of every node on the new key alone.
    probes = [n.mesh.gossip.metrics()["probes"] for n in trio]  # type: ignore[union-attr]
    await wait_until(lambda: all(n.mesh.gossip.metrics()["probes"] >= p + 3 for n, p in zip(trio, probes, strict=True)), 10.0)  # type: ignore[union-attr]
    for n in trio:
        assert {m.node_id for m in n.mesh.members() if m.state == "alive"} == ids
        drops = n.mesh.gossip.metrics()["drops"]  # type: ignore[union-attr]
        assert drops.get("unknown_key", 0) == 0 and drops.get("decrypt_failed", 0) == 0, drops
