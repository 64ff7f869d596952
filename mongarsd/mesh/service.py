"""MeshService: identity, keyring, gossip, discovery, state publishing and request forwarding.

The mesh runs when a cluster keyring exists (installing a key is the intent to join), unless
`mesh.enabled = false`; `mesh.enabled = true` without a keyring is a configuration error.
Without the mesh only the identity is loaded (so the node id is stable) and the peer
routes still answer: the list shows this node alone and registered peers are stored. With the
mesh enabled the service joins the encrypted SWIM mesh, finds peers over mDNS and static
seeds/registered URLs, gossips this node's load once a second when it changes, and routes whole
generation requests to the best node (see scheduler.py), signed with this node's identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import ipaddress
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import structlog

from mongarsd import __version__
from mongarsd.const import PERSONA_MODEL_ID
from mongarsd.errors import AuthError, ConfigError, MeshError, WireError
from mongarsd.mesh import const
from mongarsd.mesh.breaker import BreakerBoard, BreakerState, CircuitBreaker
from mongarsd.mesh.forward import H_SIG, RequestVerifier, VerifiedPeer, boot_id, sign_headers
from mongarsd.mesh.gossip import GossipNode, MemberView, select_timing
from mongarsd.mesh.identity import NodeIdentity
from mongarsd.mesh.interfaces import async_select_host_interfaces
from mongarsd.mesh.keyring import Keyring, async_watch_keyring, key_id
from mongarsd.mesh.local import LocalInference, LocalStats, fit_state, read_temperature
from mongarsd.mesh.membership import EventKind
from mongarsd.mesh.peers import PeerStore, StaticPeer, url_host_port
from mongarsd.mesh.scheduler import NodeLoad, expected_tokens_of, load_from_state, rank, unseen_completions, unseen_forwards
from mongarsd.mesh.transport import UdpTcpTransport, free_port
from mongarsd.mesh.wire import Addr
from mongarsd.supervisor import TaskSupervisor

if TYPE_CHECKING:
    from mongarsd.board import BoardInfo
    from mongarsd.config import Config
    from mongarsd.memory.db import Database
    from mongarsd.mesh.discovery import Discovery, ServiceProps
    from mongarsd.metrics import Metrics

log = structlog.get_logger("mongarsd.mesh")

MESH_DIR: Final = "mesh"
IDENTITY_FILE: Final = "identity.key"
KEYRING_FILE: Final = "keyring.json"
PUBLISH_INTERVAL_S: Final = 1.0
TOKENS_EWMA_ALPHA: Final = 0.3
STATIC_REJOIN_INTERVAL_S: Final = 30.0
HELLO_TIMEOUT_S: Final = 3.0
MESSAGE_TIMEOUT_S: Final = 5.0
INBOX_MAX: Final = 64
# Answered forwards are kept this long (and at most this many per peer) for the scheduler to
# subtract until the peer's gossiped state shows them done: a few publish intervals is plenty.
FINISHED_KEEP_S: Final = 10.0
FINISHED_KEEP_MAX: Final = 256
MAX_JOIN_TASKS: Final = 32
MAX_MODEL_IDS: Final = 16
THROTTLE_FALLBACK_C: Final = 80.0
ALIVE_STATES: Final = frozenset({"alive", "suspect"})


@dataclasses.dataclass(slots=True)
class ForwardTrack:
    """One forward in flight; the caller sets `answered` once the peer served it (200)."""

    started: float
    answered: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class PeerRoute:
    """A peer to try for a forwarded request: its API base URL and its circuit breaker."""

    node_id: str
    base_url: str
    breaker: CircuitBreaker


def mesh_dir(state_dir: Path) -> Path:
    return state_dir / MESH_DIR


def keyring_path(state_dir: Path) -> Path:
    return mesh_dir(state_dir) / KEYRING_FILE


class MeshService:
    """The peer mesh: membership, discovery, scheduling and signed forwarding."""

    name = "mesh"
    start_timeout_s = 30.0
    stop_timeout_s = 4.0  # leave broadcast + sockets; part of the daemon stop budget (const.STOP_TIMEOUT_S)

    def __init__(
        self,
        *,
        config: Config,
        board: BoardInfo | None = None,
        llm: LocalInference | None = None,
        db: Database | None = None,
        metrics: Metrics | None = None,
        machine_id_path: Path = Path(const.MACHINE_ID_PATH),
        api_port: int | None = None,
        version: str = __version__,
        tasks: TaskSupervisor | None = None,
        defer_discovery: bool = False,
    ) -> None:
        self._cfg = config
        # The daemon advertises over mDNS only once its API listens (MdnsService); tools and tests
        # that run the mesh alone let async_start do it.
        self._defer_discovery = defer_discovery
        self._discovery_started = False
        self._mcfg = config.mesh
        self._board_profile = board.profile if board is not None and board.profile else "generic"
        self._llm = llm
        self._metrics = metrics
        self._machine_id_path = machine_id_path
        self._api_port = api_port if api_port is not None else int(config.server.port)
        self._version = version
        self._state_dir = Path(config.server.state_dir)
        self.store = PeerStore(db=db) if db is not None else None
        self.identity: NodeIdentity | None = None
        self.keyring: Keyring | None = None
        self.gossip: GossipNode | None = None
        self.discovery: Discovery | None = None
        self._session: aiohttp.ClientSession | None = None
        self._verifier: RequestVerifier | None = None
        self.breakers = BreakerBoard()
        self._local = LocalStats(llm, int(config.inference.slots))
        # Shared with the gossip node and discovery we build; each cancels only its own tasks on stop.
        self._tasks = tasks if tasks is not None else TaskSupervisor()
        self._pending: dict[str, list[float]] = {}  # peer -> wall-clock starts of forwards in flight
        self._finished: dict[str, deque[tuple[float, float]]] = {}  # peer -> (start, end) of answered forwards
        self.inbox: deque[dict[str, Any]] = deque(maxlen=INBOX_MAX)
        self._message_listeners: list[Callable[[dict[str, Any]], bool]] = []
        self.counters: Counter[str] = Counter()
        self.forward_failures: Counter[str] = Counter()
        self.forwards: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self._last_state: dict[str, Any] | None = None
        self._api_host = ""
        self._started = False
        self._left = False
        self._has_keyring = False

    # --- public -------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether the mesh runs: mesh.enabled, or (unset) whether a keyring was found at start."""
        return self._mcfg.enabled if self._mcfg.enabled is not None else self._has_keyring

    @property
    def running(self) -> bool:
        """Whether this node is in the mesh now (enabled, started, not left)."""
        return self.gossip is not None and self._started and not self._left

    @property
    def node_id(self) -> str | None:
        return self.identity.node_id if self.identity is not None else None

    async def async_start(self) -> None:
        if self._started:
            return
        self.identity = await asyncio.to_thread(
            NodeIdentity.load_or_create, mesh_dir(self._state_dir) / IDENTITY_FILE, machine_id_path=self._machine_id_path
        )
        self._has_keyring = await asyncio.to_thread(keyring_path(self._state_dir).exists)
        if not self.enabled:
            self._started = True
            why = "mesh.enabled is false" if self._mcfg.enabled is False else "no cluster keyring (mongarsd keys generate|install)"
            log.info("mesh_disabled", node=self.identity.node_id, reason=why)
            return
        try:
            await self._async_start_mesh()
        except BaseException:
            await self.async_stop()
            raise
        self._started = True

    async def async_stop(self) -> None:
        """Leave the mesh gracefully and release everything (idempotent)."""
        self._started = False
        if self._metrics is not None:
            self._metrics.remove_source(self._metrics_source)
        await self._tasks.async_stop(self.stop_timeout_s, owner=self)
        await self._async_stop_protocols()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def async_leave(self) -> bool:
        """Leave the mesh gracefully now (peers see a LEAVE, not a failure); False if not in it."""
        if not self.running:
            return False
        self._left = True
        await self._async_stop_protocols()
        log.info("mesh_left", node=self.node_id)
        return True

    def members(self) -> list[MemberView]:
        return self.gossip.members() if self.gossip is not None and not self._left else []

    def local_load(self) -> NodeLoad:
        """Return this node's load from live engine stats (fresher than its gossip)."""
        snap = self._local.snapshot()
        temp_throttled = bool(self._last_state.get("throttled")) if self._last_state else False
        return NodeLoad(
            node_id=self.node_id or "local",
            local=True,
            models_available=frozenset(snap["models_available"]) | frozenset(snap["models_loaded"]),
            models_loaded=frozenset(snap["models_loaded"]),
            slots_total=snap["slots_total"],
            slots_free=snap["slots_free"],
            queue_depth=snap["queue_depth"],
            tokens_per_s=self._local.tokens_per_s,
            throttled=temp_throttled,
        )

    def load_snapshot(self) -> dict[str, Any]:
        """This node's load in monGARS's /peer/load field names plus mongarsd's."""
        load = self.local_load()
        busy = load.busy_slots
        return {
            "scheduler_id": self.node_id,
            "queue_depth": load.queue_depth,
            "active_workers": busy,
            "concurrency": load.slots_total,
            "load_factor": round((load.queue_depth + busy) / max(1, load.slots_total), 4),
            "slots_total": load.slots_total,
            "slots_free": load.slots_free,
            "tokens_per_s": round(load.tokens_per_s, 3),
            "models_loaded": sorted(load.models_loaded),
        }

    async def async_static_peers(self) -> list[StaticPeer]:
        return await self.store.async_list() if self.store is not None else []

    async def async_register(self, url: str) -> tuple[bool, bool]:
        """Persist a static peer URL; join it now when in the mesh. Return (added, joined)."""
        if self.store is None:
            raise MeshError("no store to persist registered peers")
        added = await self.store.async_add(url)
        joined = await self._async_join_url(url) if self.running else False
        return added, joined

    async def async_unregister(self, url: str) -> bool:
        if self.store is None:
            raise MeshError("no store to persist registered peers")
        return await self.store.async_remove(url)

    def hello(self) -> dict[str, Any]:
        """What a node tells anyone who asks (the same facts its mDNS TXT publishes)."""
        return {
            "node_id": self.node_id,
            "fingerprint": self.identity.fingerprint if self.identity is not None else None,
            "version": self._version,
            "mesh": self.running,
            "gossip_port": self.gossip.addr[1] if self.gossip is not None and self.running else None,
            "ck": self.keyring.primary_key_id.hex() if self.keyring is not None and self.running else None,
        }

    # --- signed requests (the API checks them first, see api/forwarding.py) ---------------------

    @staticmethod
    def is_signed(headers: Mapping[str, str]) -> bool:
        return H_SIG in headers

    def verify_signed(self, *, method: str, path_qs: str, headers: Mapping[str, str], body: bytes) -> VerifiedPeer:
        """Check a node-signed request against live membership; AuthError if it fails."""
        verifier = self._verifier
        if verifier is None or not self.running:
            raise AuthError("peer-signed request, but this node is not in a mesh")
        return verifier.verify(method=method, path_qs=path_qs, headers=headers, body=body)

    # --- forwarding ---------------------------------------------------------------------------

    def plan(self, *, model: str, hops: int = 0, exclude: Iterable[str] = (), expected_tokens: int = 128) -> list[NodeLoad]:
        """Return the nodes to try for a request, best first (this node always included)."""
        peers = [
            load_from_state(
                m.node_id,
                m.meta,
                pending=unseen_forwards(self._pending.get(m.node_id, ()), state_at=m.updated_at),
                finished=unseen_completions(self._finished.get(m.node_id, ()), state_at=m.updated_at),
            )
            for m in self.members()
            if m.state == "alive" and m.node_id != self.node_id
        ]
        ranked = rank(
            self.local_load(),
            peers,
            model=model,
            hops=hops,
            hop_limit=int(self._mcfg.hop_limit),
            expected_tokens=expected_tokens,
            breaker_available=self.breakers.available,
            exclude=exclude,
        )
        return [r.node for r in ranked]

    def forward_routes(self, *, model: str, hops: int, sender: str | None, body: Mapping[str, Any]) -> list[PeerRoute]:
        """Peers worth trying before serving here, best first; empty when this node should serve."""
        if not self.running or self._session is None or self.identity is None or model == PERSONA_MODEL_ID:
            return []
        order = self.plan(model=model, hops=hops, exclude=[sender] if sender else [], expected_tokens=expected_tokens_of(body))
        routes: list[PeerRoute] = []
        for node in order:
            if node.local:
                break  # the peers worth trying come first; after them, this node serves
            member = self.gossip.member(node.node_id) if self.gossip is not None else None
            if member is None or member.state != "alive":
                continue
            host, port = member.meta.get("api_host"), member.meta.get("api_port")
            if not isinstance(host, str) or not isinstance(port, int):
                continue
            url_host = f"[{host}]" if ":" in host else host
            routes.append(PeerRoute(node.node_id, f"http://{url_host}:{port}", self.breakers.get(node.node_id)))
        return routes

    @property
    def http_session(self) -> aiohttp.ClientSession | None:
        """The client session for talking to peers (None outside the mesh)."""
        return self._session

    def sign_forward(self, node_id: str, *, method: str, path_qs: str, body: bytes, hops: int, user: str) -> dict[str, str]:
        """Headers that prove this node sends the request (Ed25519 over method, path, body, hops, user)."""
        if self.identity is None:
            raise MeshError("this node has no identity yet")
        return sign_headers(self.identity, target=node_id, method=method, path_qs=path_qs, body=body, hops=hops, user=user)

    @contextlib.contextmanager
    def track_forward(self, node_id: str) -> Iterator[ForwardTrack]:
        """Count a request in flight to a peer, so the scheduler sees its load before gossip does.

        When the caller marks it answered, its end is kept too: until the peer's next state
        arrives, the scheduler counts that slot free (see scheduler.unseen_completions).
        """
        # wall clock, as MemberView.updated_at (when we received the peer's current state)
        track = ForwardTrack(started=time.time())
        self._pending.setdefault(node_id, []).append(track.started)
        try:
            yield track
        finally:
            starts = self._pending.get(node_id)
            if starts is not None:
                with contextlib.suppress(ValueError):
                    starts.remove(track.started)
                if not starts:
                    del self._pending[node_id]
            if track.answered:
                self._note_finished(node_id, track.started, time.time())

    def _note_finished(self, node_id: str, started: float, ended: float) -> None:
        spans = self._finished.get(node_id)
        if spans is None:
            spans = self._finished[node_id] = deque(maxlen=FINISHED_KEEP_MAX)
        while spans and spans[0][1] < ended - FINISHED_KEEP_S:
            spans.popleft()
        spans.append((started, ended))

    # --- messages -----------------------------------------------------------------------------

    def add_message_listener(self, listener: Callable[[dict[str, Any]], bool]) -> None:
        """Show every received message to `listener` (loop-only, must not raise or block).

        A listener that returns True has consumed the message (a service's own payload, e.g.
        the Evolution Engine's signed tuning results): it does not go to the admins' inbox.
        """
        self._message_listeners.append(listener)

    def remove_message_listener(self, listener: Callable[[dict[str, Any]], bool]) -> None:
        with contextlib.suppress(ValueError):
            self._message_listeners.remove(listener)

    def receive_message(self, *, sender: str, user: str, message: Any) -> dict[str, Any]:
        item = {"from": sender, "user": user, "received_at": time.time(), "message": message}
        self.counters["messages_received"] += 1
        log.info("mesh_message_received", sender=sender, user=user)
        for listener in list(self._message_listeners):
            if listener(item):
                self.counters["messages_consumed"] += 1
                return item
        self.inbox.append(item)
        return item

    async def async_send_message(self, node_id: str, message: Any, *, user: str) -> int:
        """POST a small JSON message to a member's /api/v1/peer/message, signed; return its status."""
        import json

        member = self.gossip.member(node_id) if self.gossip is not None and self.running else None
        if member is None or member.state != "alive" or self._session is None or self.identity is None:
            raise MeshError(f"node {node_id} is not an alive member")
        host, port = member.meta.get("api_host"), member.meta.get("api_port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise MeshError(f"node {node_id} publishes no API address")
        path = "/api/v1/peer/message"
        raw = json.dumps({"message": message}).encode()
        headers = sign_headers(self.identity, target=node_id, method="POST", path_qs=path, body=raw, hops=1, user=user)
        headers["Content-Type"] = "application/json"
        try:
            async with self._session.post(
                f"http://{host}:{port}{path}", data=raw, headers=headers, timeout=aiohttp.ClientTimeout(total=MESSAGE_TIMEOUT_S)
            ) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError) as err:
            raise MeshError(f"cannot reach node {node_id}: {type(err).__name__}") from err

    # --- startup ------------------------------------------------------------------------------

    async def _async_start_mesh(self) -> None:
        assert self.identity is not None
        mcfg = self._mcfg
        path = keyring_path(self._state_dir)
        if not await asyncio.to_thread(path.exists):
            raise ConfigError(
                f"mesh.enabled is true but there is no cluster keyring at {path}. Create one on the first node with "
                f"`mongarsd keys generate --state-dir {self._state_dir}` and copy the key it prints to the others with "
                f"`mongarsd keys install KEY --state-dir DIR`"
            )
        self.keyring = await asyncio.to_thread(Keyring.load, path)
        await asyncio.to_thread(boot_id)  # read once here, not on the loop when the first forward is signed
        timing = select_timing(str(mcfg.timing))
        selection = await async_select_host_interfaces(tuple(mcfg.interfaces), skip_virtual=bool(mcfg.skip_virtual_interfaces))
        addrs = [a for i in selection.chosen for a in i.addresses("v4")]
        advertise_ip = str(mcfg.advertise_host) or (addrs[0] if addrs else "127.0.0.1")
        port = int(mcfg.gossip_port) or await asyncio.to_thread(free_port, str(mcfg.bind_host))
        self._api_host = self._api_host_for(advertise_ip)
        self._local.available = await self._async_available_models()
        state = await self._async_compute_state()
        self.gossip = GossipNode(
            identity=self.identity,
            keyring=self.keyring,
            transport=UdpTcpTransport(bind_host=str(mcfg.bind_host), port=port),
            cluster_label=str(mcfg.cluster_label),
            timing=timing,
            advertise_addr=(advertise_ip, port),
            state=state,
            tasks=self._tasks,
        )
        self._last_state = state
        await self.gossip.async_start()
        gossip = self.gossip
        self._verifier = RequestVerifier(local_node_id=self.identity.node_id, public_key_of=self._public_key_of)
        self._session = aiohttp.ClientSession()
        if mcfg.mdns or mcfg.seeds:
            # zeroconf is imported only when the mesh runs (a lone board does not pay for it), and
            # off the loop: an import reads files
            await asyncio.to_thread(importlib.import_module, "mongarsd.mesh.discovery")
            from mongarsd.mesh.discovery import Discovery, ServiceProps

            props = ServiceProps(
                version=self._version,
                board=self._board_profile,
                api_port=self._api_port if 0 < self._api_port < 65536 else 8642,
                gossip_port=port,
                fingerprint=self.identity.fingerprint,
                cluster_key_id=self.keyring.primary_key_id.hex(),
            )
            self.discovery = Discovery(
                node_id=self.identity.node_id,
                props=props,
                interfaces=selection.chosen,
                on_found=self._on_found,
                on_lost=self._on_lost,
                seeds=tuple(mcfg.seeds),
                on_seed=self._on_seed,
                advertise_addresses=[advertise_ip] if mcfg.advertise_host else None,
                mdns=bool(mcfg.mdns),
                tasks=self._tasks,
            )
            if not self._defer_discovery:
                await self.async_start_discovery()
        keyring_file = keyring_path(self._state_dir)
        for name, loop in (
            ("mesh-keyring-watch", lambda: self._async_keyring_watch_loop(keyring_file)),
            ("mesh-publish", self._async_publish_loop),
            ("mesh-events", lambda: self._async_event_loop(gossip)),
            ("mesh-static-peers", self._async_static_loop),
        ):
            self._tasks.spawn(name, loop, restart=True, owner=self)
        if self._metrics is not None:
            self._metrics.add_source(self._metrics_source)
        log.info(
            "mesh_service_started",
            node=self.identity.node_id,
            gossip=f"{advertise_ip}:{port}",
            api=f"{self._api_host}:{self._api_port}" if self._api_host else None,
            interfaces=list(selection.names),
            timing=mcfg.timing,
            ck=self.keyring.primary_key_id.hex(),
        )

    def _api_host_for(self, advertise_ip: str) -> str:
        host = str(self._cfg.server.host)
        if host in ("", "0.0.0.0", "::"):
            return advertise_ip
        try:
            if ipaddress.ip_address(host).is_loopback and not ipaddress.ip_address(advertise_ip).is_loopback:
                log.warning(
                    "mesh_api_on_loopback",
                    host=host,
                    hint="peers cannot forward requests to this node; listen on 0.0.0.0 or the LAN address",
                )
                return ""
        except ValueError:
            pass  # a host name: publish it as is
        return host

    async def async_start_discovery(self) -> None:
        """Advertise this node over mDNS and browse for peers (the daemon does it once the API listens)."""
        if self.discovery is not None and not self._discovery_started:
            await self.discovery.async_start()
            self._discovery_started = True

    async def async_stop_discovery(self) -> None:
        """Withdraw the mDNS advertisement (the daemon does it before the API drains); idempotent."""
        disc, self.discovery = self.discovery, None
        started, self._discovery_started = self._discovery_started, False
        if disc is not None and started:
            try:
                await disc.async_stop()
            except (MeshError, OSError) as err:  # keep stopping the rest
                log.warning("mesh_discovery_stop_failed", error=str(err))

    async def _async_stop_protocols(self) -> None:
        await self.async_stop_discovery()
        if self.gossip is not None:
            await self.gossip.async_stop()

    def _public_key_of(self, node_id: str) -> bytes | None:
        m = self.gossip.member(node_id) if self.gossip is not None else None
        return m.public_key if m is not None and m.state in ALIVE_STATES else None

    # --- state publishing ---------------------------------------------------------------------

    async def _async_available_models(self) -> list[str]:
        if self._llm is None:
            return []
        try:
            ids = await asyncio.to_thread(self._llm.available_ids)
        except OSError as err:  # models dir unreadable: publish nothing available
            log.warning("mesh_models_unreadable", error=str(err))
            return []
        return ids[:MAX_MODEL_IDS]

    async def _async_compute_state(self) -> dict[str, Any]:
        self._local.sample_rate()
        snap = self._local.snapshot()
        temp, throttled = await asyncio.to_thread(read_temperature)
        state: dict[str, Any] = {
            "version": self._version,
            "board": self._board_profile,
            "models_loaded": snap["models_loaded"][:MAX_MODEL_IDS],
            "models_available": snap["models_available"][:MAX_MODEL_IDS],
            "slots_total": snap["slots_total"],
            "slots_free": snap["slots_free"],
            "queue_depth": snap["queue_depth"],
            "tokens_per_s": round(self._local.tokens_per_s, 1),
            "throttled": throttled,
        }
        if temp is not None:
            state["temperature_c"] = round(temp)
        if self._api_host and 0 < self._api_port < 65536:
            state["api_host"] = self._api_host
            state["api_port"] = self._api_port
        return fit_state(state)

    async def _async_keyring_watch_loop(self, path: Path) -> None:
        """Follow keyring edits (install/use/remove) without a restart: Serf-style rotation, no downtime."""
        if self.keyring is not None:
            await async_watch_keyring(path, self.keyring, self._async_primary_key_changed)

    async def _async_primary_key_changed(self, primary: bytes) -> None:
        """Re-announce the cluster key id over mDNS once `keys use` picked a new primary key."""
        if self.discovery is not None:
            await self.discovery.async_update_props(dataclasses.replace(self.discovery.props, cluster_key_id=primary.hex()))

    async def _async_publish_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            if not self.running or self.gossip is None:
                continue
            ticks += 1
            if ticks % 30 == 0:
                self._local.available = await self._async_available_models()
            state = await self._async_compute_state()
            if state != self._last_state:
                try:
                    self.gossip.set_local_state(state)
                except WireError as err:  # our own state is invalid: a bug, but never fatal
                    log.error("mesh_state_rejected", error=str(err))
                    continue
                self._last_state = state

    async def _async_event_loop(self, gossip: GossipNode) -> None:
        q = gossip.subscribe()
        try:
            while True:
                ev = await q.get()
                self.events[ev.kind.value] += 1
                m = ev.member
                if ev.kind in (EventKind.FAIL, EventKind.LEAVE):
                    self._pending.pop(m.node_id, None)
                    self._finished.pop(m.node_id, None)
                # GossipNode logs joins/leaves/failures itself at info; keep ours for debugging.
                log.debug(
                    "mesh_event",
                    kind=ev.kind.value,
                    peer=m.node_id,
                    addr=f"{m.addr[0]}:{m.addr[1]}",
                    state=m.state,
                    incarnation=m.incarnation,
                )
        finally:
            gossip.unsubscribe(q)

    # --- discovery callbacks and joins --------------------------------------------------------

    def _our_key_ids(self) -> set[str]:
        if self.keyring is None:
            return set()
        installed = self.keyring.keys()
        return {key_id(k).hex() for k in installed}

    def _is_alive_member(self, node_id: str) -> bool:
        m = self.gossip.member(node_id) if self.gossip is not None else None
        return m is not None and m.state == "alive"

    def _on_found(self, node_id: str, addresses: tuple[str, ...], props: ServiceProps) -> None:
        if props.cluster_key_id not in self._our_key_ids():
            self.counters["discovery_refused_cluster_key"] += 1
            log.info("mesh_peer_refused", peer=node_id, reason="cluster_key", ck=props.cluster_key_id)
            return
        if node_id == self.node_id or self._is_alive_member(node_id):
            return
        self._spawn_join([(a, props.gossip_port) for a in addresses], f"mesh-join-{node_id}")

    def _on_lost(self, node_id: str) -> None:
        log.info("mesh_peer_unannounced", peer=node_id)

    def _on_seed(self, addr: Addr) -> None:
        self._spawn_join([addr], f"mesh-join-seed-{addr[0]}:{addr[1]}")

    def _spawn_join(self, addrs: list[Addr], name: str) -> None:
        if not self.running or self._tasks.count(owner=self) >= MAX_JOIN_TASKS:
            return
        self._tasks.spawn_once(name, self._async_join_first(addrs), owner=self)

    async def _async_join_first(self, addrs: list[Addr]) -> None:
        """Join through the first address that answers (addresses are ranked by discovery)."""
        for addr in addrs:
            if self.gossip is None or not self.running:
                return
            if await self.gossip.async_join([addr]) > 0:
                self.counters["joins_ok"] += 1
                return
        self.counters["joins_failed"] += 1

    async def _async_join_url(self, url: str) -> bool:
        """Ask a registered peer URL for its gossip port and join it; False when it fails."""
        if self._session is None or not self.running:
            return False
        host, _port = url_host_port(url)
        try:
            async with self._session.get(f"{url}/api/v1/peer/hello", timeout=aiohttp.ClientTimeout(total=HELLO_TIMEOUT_S)) as resp:
                if resp.status != 200:
                    return False
                hello = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            log.info("mesh_static_peer_unreachable", url=url, error=type(err).__name__)
            return False
        if not isinstance(hello, dict) or hello.get("ck") not in self._our_key_ids() or not isinstance(hello.get("gossip_port"), int):
            log.info("mesh_static_peer_refused", url=url, reason="cluster_key_or_not_meshed")
            return False
        if hello.get("node_id") == self.node_id or self._is_alive_member(str(hello.get("node_id"))):
            return True
        ok = await self.gossip.async_join([(host, int(hello["gossip_port"]))]) if self.gossip is not None else 0
        return ok > 0

    async def _async_static_loop(self) -> None:
        while True:
            for peer in await self.async_static_peers():
                if self.running:
                    await self._async_join_url(peer.url)
            await asyncio.sleep(STATIC_REJOIN_INTERVAL_S)

    # --- metrics ------------------------------------------------------------------------------

    def _metrics_source(self) -> Iterable[tuple[str, str, str, float, dict[str, str]]]:
        if self.gossip is not None:
            gm = self.gossip.metrics()
            for state, n in gm["members"].items():
                yield ("mongarsd_mesh_members", "gauge", "Mesh members by state (this node included).", float(n), {"state": state})
            for direction in ("sent", "received"):
                yield (
                    "mongarsd_mesh_packets_total",
                    "counter",
                    "Gossip packets.",
                    float(gm[f"packets_{direction}"]),
                    {"direction": direction},
                )
                yield ("mongarsd_mesh_bytes_total", "counter", "Gossip bytes.", float(gm[f"bytes_{direction}"]), {"direction": direction})
            for reason, n in gm["drops"].items():
                yield ("mongarsd_mesh_drops_total", "counter", "Gossip packets dropped, by reason.", float(n), {"reason": str(reason)})
            yield ("mongarsd_mesh_probe_failures_total", "counter", "Failed direct+indirect probes.", float(gm["probe_failures"]), {})
            yield ("mongarsd_mesh_awareness", "gauge", "Lifeguard local health multiplier score.", float(gm["awareness"]), {})
        for kind, n in self.events.items():
            yield ("mongarsd_mesh_events_total", "counter", "Membership events seen.", float(n), {"kind": kind})
        for peer, n in self.forwards.items():
            yield ("mongarsd_mesh_forwards_total", "counter", "Requests served by a peer.", float(n), {"peer": peer})
        for reason, n in self.forward_failures.items():
            yield ("mongarsd_mesh_forward_failures_total", "counter", "Forwards that failed, by reason.", float(n), {"reason": reason})
        if self._verifier is not None:
            for reason, n in self._verifier.rejected.items():
                yield (
                    "mongarsd_mesh_peer_requests_rejected_total",
                    "counter",
                    "Signed peer requests refused.",
                    float(n),
                    {"reason": reason},
                )
        for peer, b in self.breakers.items():
            yield (
                "mongarsd_mesh_breaker_open",
                "gauge",
                "1 when the peer's circuit breaker is open.",
                1.0 if b.state is BreakerState.OPEN else 0.0,
                {"peer": peer},
            )
        yield (
            "mongarsd_mesh_forward_fallback_local_total",
            "counter",
            "Requests run here after every better peer failed.",
            float(self.counters["forward_fallback_local"]),
            {},
        )


def member_public(m: MemberView, *, local_id: str | None, breaker: str | None) -> dict[str, Any]:
    """Describe a member for /api/v1/peer/list."""
    meta = dict(m.meta)
    api = (
        f"http://{meta['api_host']}:{meta['api_port']}"
        if isinstance(meta.get("api_host"), str) and isinstance(meta.get("api_port"), int)
        else None
    )
    return {
        "node_id": m.node_id,
        "self": m.node_id == local_id,
        "state": m.state,
        "incarnation": m.incarnation,
        "gossip": f"{m.addr[0]}:{m.addr[1]}",
        "api": api,
        "version": meta.get("version"),
        "board": meta.get("board"),
        "models_loaded": meta.get("models_loaded", []),
        "models_available": meta.get("models_available", []),
        "slots_free": meta.get("slots_free"),
        "queue_depth": meta.get("queue_depth"),
        "tokens_per_s": meta.get("tokens_per_s"),
        "temperature_c": meta.get("temperature_c"),
        "throttled": meta.get("throttled"),
        "breaker": breaker,
    }
