"""GossipNode: the thin async loops around the pure SWIM/Lifeguard decisions.

The node owns the member table and applies every change to it (alive, suspect, dead, leave,
refutation); each protocol concern lives in its own module, as in memberlist:
- probe.Prober: direct and indirect probes with nacks, awareness, suspicion timers;
- broadcast.BroadcastQueue: the transmit-limited piggyback queue;
- push_pull.AntiEntropy: full state exchange over encrypted streams.

Loops (named supervised tasks owned by the node, restarted with backoff if they crash, cancelled on stop):
- probe: one member per (awareness-scaled) interval, direct ping, then k indirect pings with
  nacks; silence -> Suspect (SWIM §4, Lifeguard LHM);
- gossip: piggybacked broadcasts to a few random members every gossip interval;
- push-pull: full state exchange with one random member over an encrypted stream;
- timers: suspicion deadlines -> Dead, reaping, reconnect attempts to failed members.
Every received packet is authenticated, size-capped and schema-checked; bad ones are dropped,
counted and rate-limit logged, never raised out of the receive path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import structlog

from mongarsd.errors import ConfigError, MeshError, WireError
from mongarsd.mesh import const
from mongarsd.mesh.broadcast import BroadcastQueue, packet_budget
from mongarsd.mesh.identity import NodeIdentity, Verifier, sign_leave, sign_record
from mongarsd.mesh.keyring import Keyring
from mongarsd.mesh.membership import (
    Decision,
    EventKind,
    Member,
    gossip_targets,
    live_others,
    on_alive,
    on_dead,
    on_leave,
    on_suspect,
    push_pull_interval,
    reapable,
)
from mongarsd.mesh.probe import Prober
from mongarsd.mesh.push_pull import AntiEntropy
from mongarsd.mesh.security import Cipher, DropError, DropLog, log_clock_sync_state
from mongarsd.mesh.state import decode_state, encode_state
from mongarsd.mesh.suspicion import suspicion_bounds
from mongarsd.mesh.transport import Stream, Transport
from mongarsd.mesh.wire import (
    Ack,
    Addr,
    Alive,
    Dead,
    IndirectPing,
    Leave,
    MemberState,
    Message,
    Nack,
    NodeId,
    NodeRecord,
    Ping,
    PushPull,
    Suspect,
    decode_messages,
    encode_compound,
    encode_message,
)
from mongarsd.supervisor import TaskSupervisor

log = structlog.get_logger("mongarsd.mesh.gossip")

INDIRECT_TASK: Final = "mesh-indirect"  # one-shot helpers; names repeat
RECONNECT_TASK: Final = "mesh-reconnect"
REAP_CHECK_INTERVAL_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Timing:
    """Protocol timing; presets follow memberlist's DefaultLANConfig/DefaultLocalConfig."""

    probe_interval_s: float
    probe_timeout_s: float
    indirect_checks: int
    suspicion_mult: int
    suspicion_max_timeout_mult: int
    gossip_interval_s: float
    gossip_nodes: int
    gossip_to_dead_s: float
    push_pull_interval_s: float
    retransmit_mult: int
    stream_timeout_s: float
    reconnect_interval_s: float
    reap_after_s: float
    leave_propagate_s: float
    tick_s: float
    awareness_max_multiplier: int = const.AWARENESS_MAX_MULTIPLIER


# memberlist's DefaultLANConfig as it is (what Serf agents run): probe every 1 s, detection at
# 30 nodes ~8 s. Kept as a preset and as the bench's "previous timing" column of P10.
MEMBERLIST_LAN = Timing(
    probe_interval_s=1.0,
    probe_timeout_s=0.5,
    indirect_checks=3,
    suspicion_mult=4,
    suspicion_max_timeout_mult=6,
    gossip_interval_s=0.2,
    gossip_nodes=3,
    gossip_to_dead_s=30.0,
    push_pull_interval_s=30.0,
    retransmit_mult=4,
    stream_timeout_s=10.0,
    reconnect_interval_s=30.0,
    reap_after_s=24 * 3600.0,
    leave_propagate_s=1.0,
    tick_s=0.1,
)

# The default (`mesh.timing = "lan"`): memberlist's LAN rules with probes and gossip rounds twice
# as often, for a home LAN of boards. Suspicion timeouts scale with the probe interval
# (suspicion.py), so a crash is detected in about half the time (~4.5 s at 30 nodes vs ~8 s) for
# about twice the probe traffic (~0.5 KB/s per node, far below any LAN's capacity); an update
# reaches everyone about twice as fast for the same bytes (each broadcast is still sent a
# bounded number of times, only in rounds half as far apart). What keeps a busy board (llama.cpp
# on every core) from being declared dead is unchanged, only twice as fast: a silent probe only
# makes the target *suspect*; it hears so (buddy ping + gossip) and refutes within the suspicion
# timeout (>= 2 s, and up to 6x that until two other members independently confirm, Lifeguard
# §IV-B); three indirect probers with nacks tell "target silent" from "we are slow", and a node
# that misses acks stretches its own probe interval and timeout up to 8x (Lifeguard LHM) rather
# than accusing others. Timing is local: nodes on either preset interoperate on the same wire.
LAN = dataclasses.replace(MEMBERLIST_LAN, probe_interval_s=0.5, probe_timeout_s=0.25, gossip_interval_s=0.1)

LOCAL = Timing(
    probe_interval_s=0.2,
    probe_timeout_s=0.08,
    indirect_checks=2,
    suspicion_mult=4,
    suspicion_max_timeout_mult=4,
    gossip_interval_s=0.05,
    gossip_nodes=3,
    gossip_to_dead_s=3.0,
    push_pull_interval_s=2.0,
    retransmit_mult=4,
    stream_timeout_s=2.0,
    reconnect_interval_s=0.5,
    reap_after_s=60.0,
    leave_propagate_s=0.2,
    tick_s=0.02,
)

# `mesh.timing` picks one by name; "lan" is what a daemon runs without configuration.
PRESETS: Mapping[str, Timing] = MappingProxyType({"lan": LAN, "local": LOCAL, "memberlist": MEMBERLIST_LAN})
DEFAULT_PRESET: Final = "lan"


def select_timing(name: str | None) -> Timing:
    """Return the preset named `name` (the default one for None or ""); ConfigError if unknown."""
    key = (name or DEFAULT_PRESET).strip().lower()
    timing = PRESETS.get(key)
    if timing is None:
        raise ConfigError(f"mesh.timing must be one of {sorted(PRESETS)}, not {name!r}")
    return timing


def failure_detection_bound_s(timing: Timing, n_members: int) -> float:
    """Return a generous bound on the time for all members to mark a crashed node dead.

    Up to one full probe pass (n intervals, though usually ~1), the max suspicion timeout, and
    a few gossip rounds for dissemination.
    """
    _, max_s = suspicion_bounds(
        suspicion_mult=timing.suspicion_mult,
        max_timeout_mult=timing.suspicion_max_timeout_mult,
        n_members=n_members,
        probe_interval_s=timing.probe_interval_s,
    )
    return n_members * timing.probe_interval_s + max_s + 10 * timing.gossip_interval_s


@dataclass(frozen=True, slots=True)
class MemberView:
    """A read-only snapshot of one member for callers (API, scheduler)."""

    node_id: NodeId
    addr: Addr
    state: str
    incarnation: int
    meta: Mapping[str, Any]
    updated_at: float
    public_key: bytes


@dataclass(frozen=True, slots=True)
class MemberEvent:
    kind: EventKind
    member: MemberView


def _view(m: Member) -> MemberView:
    return MemberView(
        node_id=m.node_id,
        addr=m.addr,
        state=m.state.name.lower(),
        incarnation=m.incarnation,
        meta=MappingProxyType(dict(m.meta)),
        updated_at=m.updated_at,
        public_key=m.record.public_key,
    )


@dataclass(slots=True)
class _Counters:
    packets_sent: int = 0
    packets_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    refutations: int = 0
    events_dropped: int = 0
    handler_errors: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class GossipNode:
    """One SWIM+Lifeguard member: membership, failure detection and state dissemination."""

    name = "mesh-gossip"
    start_timeout_s = 10.0
    stop_timeout_s = 10.0

    def __init__(
        self,
        *,
        identity: NodeIdentity,
        keyring: Keyring,
        transport: Transport,
        cluster_label: str = "mongars",
        timing: Timing = LAN,
        advertise_addr: Addr | None = None,
        state: Mapping[str, Any] | None = None,
        revoked: Iterable[str] = (),
        rng: random.Random | None = None,
        tasks: TaskSupervisor | None = None,
    ) -> None:
        self.identity = identity
        self.keyring = keyring
        self.timing = timing
        self._transport = transport
        self._label = cluster_label
        self._advertise = advertise_addr
        self._cipher = Cipher(keyring=keyring, cluster_label=cluster_label)
        self._verifier = Verifier(label=cluster_label, revoked=revoked)
        self._drops = DropLog()
        self._rng = rng if rng is not None else random.Random()
        self._state_bytes = encode_state(state or {})
        self._members: dict[NodeId, Member] = {}
        self._broadcasts = BroadcastQueue(retransmit_mult=timing.retransmit_mult, n_nodes=self._n_live)
        self._prober = Prober(node_id=identity.node_id, timing=timing, rng=self._rng, send=self._send)
        self._anti_entropy = AntiEntropy(
            transport=transport, members=self._members, merge=self._merge, drops=self._drops, timeout_s=timing.stream_timeout_s
        )
        self._incarnation = 0
        self._subscribers: list[asyncio.Queue[MemberEvent]] = []
        # Loops restart with backoff if they crash: a node whose probe loop died must not look healthy.
        self._tasks = tasks if tasks is not None else TaskSupervisor()
        self._running = False
        self._leaving = False
        self._counters = _Counters()
        self._last_reconnect = 0.0
        self._last_reap = 0.0

    # --- public API --------------------------------------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    @property
    def addr(self) -> Addr:
        return self._advertise if self._advertise is not None else self._transport.local_addr

    @property
    def incarnation(self) -> int:
        return self._incarnation

    async def async_start(self) -> None:
        """Bind the transport, announce ourselves and start the protocol loops."""
        if self._running:
            return
        self._transport.set_handlers(self._on_packet, self._async_on_stream)
        await self._transport.async_start()
        self._running = True
        self._leaving = False
        self._incarnation += 1
        self._set_local_record()
        # Pin our own key so a replayed leave of ours from a past life is verified, then refuted.
        self._verifier.check_record(self._members[self.node_id].record)
        for name, loop in (
            ("probe", self._async_probe_loop),
            ("gossip", self._async_gossip_loop),
            ("push-pull", self._async_push_pull_loop),
            ("timers", self._async_timer_loop),
        ):
            self._tasks.spawn(f"mesh-{name}-{self.node_id}", loop, restart=True, owner=self)
        log.info("mesh_started", node=self.node_id, addr=f"{self.addr[0]}:{self.addr[1]}")
        log_clock_sync_state()  # issue 9: tolerated by peers, but say so

    async def async_stop(self) -> None:
        """Leave gracefully (signed LEAVE, gossiped for a moment), then stop; idempotent."""
        if not self._running:
            return
        self._leaving = True
        sig = sign_leave(self.identity, label=self._label, incarnation=self._incarnation)
        leave = Leave(node=self.node_id, incarnation=self._incarnation, signature=sig)
        self._apply_leave(leave, from_self=True)
        # Send it directly to a few members, then let the gossip loop spread it a little.
        targets = live_others(self._members.values(), self.node_id)
        for m in self._rng.sample(targets, min(len(targets), 2 * self.timing.gossip_nodes)):
            self._send(m.addr, [leave])
        if targets:
            await asyncio.sleep(self.timing.leave_propagate_s)
        await self._async_shutdown()
        log.info("mesh_stopped", node=self.node_id)

    async def async_kill(self) -> None:
        """Stop abruptly without a LEAVE, as a crash would (for tests and fatal errors)."""
        if self._running:
            await self._async_shutdown()

    async def async_join(self, addrs: Iterable[Addr]) -> int:
        """Push-pull with each seed address; return how many answered."""
        ok = 0
        for addr in addrs:
            if addr == self.addr:
                continue
            try:
                await self._async_push_pull(addr, join=True)
            except MeshError as err:
                log.info("mesh_join_failed", node=self.node_id, peer=f"{addr[0]}:{addr[1]}", error=str(err))
                continue
            ok += 1
        return ok

    def members(self) -> list[MemberView]:
        """Return every known member (ourselves included), sorted by node id."""
        return [_view(m) for _, m in sorted(self._members.items())]

    def member(self, node_id: str) -> MemberView | None:
        m = self._members.get(NodeId(node_id))
        return _view(m) if m is not None else None

    def set_local_state(self, state: Mapping[str, Any]) -> None:
        """Replace our gossiped user state (validated; raises WireError if invalid/too big)."""
        self._state_bytes = encode_state(state)
        if self._running:
            self._incarnation += 1
            self._set_local_record()

    def subscribe(self, maxsize: int = const.EVENT_QUEUE_MAX) -> asyncio.Queue[MemberEvent]:
        """Return a queue receiving membership events (dropped and counted when full)."""
        q: asyncio.Queue[MemberEvent] = asyncio.Queue(maxsize)
        self._subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[MemberEvent]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(q)

    def revoke(self, node_id: str) -> None:
        """Refuse every future record from `node_id` and mark it dead now."""
        self._verifier.revoke(node_id)
        cur = self._members.get(NodeId(node_id))
        if cur is not None and node_id != self.node_id:
            self._apply_dead(Dead(node=cur.node_id, incarnation=cur.incarnation, source=self.node_id))

    def metrics(self) -> dict[str, Any]:
        """Return counters: packets, drops by reason, members by state, awareness."""
        c = self._counters
        by_state = {s.name.lower(): 0 for s in MemberState}
        for m in self._members.values():
            by_state[m.state.name.lower()] += 1
        return {
            "packets_sent": c.packets_sent,
            "packets_received": c.packets_received,
            "bytes_sent": c.bytes_sent,
            "bytes_received": c.bytes_received,
            "drops": dict(self._drops.counts),
            "members": by_state,
            "probes": self._prober.probes,
            "probe_failures": self._prober.probe_failures,
            "refutations": c.refutations,
            "push_pulls_ok": self._anti_entropy.ok,
            "push_pulls_failed": self._anti_entropy.failed,
            "events_dropped": c.events_dropped,
            "handler_errors": c.handler_errors,
            "broadcasts_queued": len(self._broadcasts),
            "awareness": self._prober.awareness.score,
            "incarnation": self._incarnation,
        }

    # --- lifecycle helpers -------------------------------------------------------------------

    async def _async_shutdown(self) -> None:
        self._running = False
        await self._tasks.async_stop(self.stop_timeout_s, owner=self)
        self._prober.cancel_waiters()
        await self._transport.async_stop()

    def _emit(self, kind: EventKind, m: Member) -> None:
        event = MemberEvent(kind, _view(m))
        for q in self._subscribers:
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                self._counters.events_dropped += 1

    def _set_local_record(self) -> None:
        record = sign_record(
            self.identity,
            label=self._label,
            incarnation=self._incarnation,
            addr=self.addr,
            state=self._state_bytes,
        )
        now, wall = asyncio.get_running_loop().time(), time.time()
        self._members[self.node_id] = Member(
            node_id=self.node_id,
            incarnation=self._incarnation,
            state=MemberState.LEFT if self._leaving else MemberState.ALIVE,
            record=record,
            meta=decode_state(self._state_bytes),
            changed_at=now,
            updated_at=wall,
        )
        self._broadcasts.queue(self.node_id, encode_message(Alive(record)))

    def _refute(self, incarnation: int) -> None:
        self._incarnation = max(self._incarnation + 1, incarnation)
        self._prober.on_refute()
        self._counters.refutations += 1
        self._set_local_record()
        log.info("mesh_refuted", node=self.node_id, incarnation=self._incarnation)

    # --- sending -----------------------------------------------------------------------------

    def _n_live(self) -> int:
        return sum(1 for m in self._members.values() if m.state in (MemberState.ALIVE, MemberState.SUSPECT))

    def _send(self, addr: Addr, msgs: list[Message], *, piggyback: bool = True) -> None:
        parts = [encode_message(m) for m in msgs]
        if piggyback:
            self._broadcasts.piggyback(parts)
        if not parts:
            return
        self._send_raw(addr, encode_compound(parts))

    def _send_raw(self, addr: Addr, plaintext: bytes) -> None:
        try:
            packet = self._cipher.seal(plaintext)
        except WireError as err:  # a single oversized message: a bug, never sent
            log.error("mesh_packet_too_large", size=len(plaintext), error=str(err))
            return
        self._counters.packets_sent += 1
        self._counters.bytes_sent += len(packet)
        self._transport.send_packet(addr, packet)

    # --- receiving ---------------------------------------------------------------------------

    def _on_packet(self, data: bytes, addr: Addr) -> None:
        if not self._running:
            return
        self._counters.packets_received += 1
        self._counters.bytes_received += len(data)
        try:
            plaintext = self._cipher.open(data, peer=f"{addr[0]}:{addr[1]}")
            msgs = decode_messages(plaintext)
        except DropError as err:
            self._drops.record(err.reason, f"{addr[0]}:{addr[1]}", str(err))
            return
        except WireError as err:
            self._drops.record("malformed", f"{addr[0]}:{addr[1]}", str(err))
            return
        for msg in msgs:
            try:
                self._handle(msg, addr)
            except DropError as err:
                self._drops.record(err.reason, f"{addr[0]}:{addr[1]}", str(err))
            except WireError as err:
                self._drops.record("malformed", f"{addr[0]}:{addr[1]}", str(err))
            except Exception as err:  # a handler bug must not kill the receive path
                self._counters.handler_errors += 1
                log.exception("mesh_handler_error", peer=f"{addr[0]}:{addr[1]}", error=repr(err))

    def _handle(self, msg: Message, addr: Addr) -> None:
        if isinstance(msg, Ping):
            self._prober.on_ping(msg, addr)
        elif isinstance(msg, Ack):
            self._prober.on_ack(msg)
        elif isinstance(msg, Nack):
            self._prober.on_nack(msg)
        elif isinstance(msg, IndirectPing):
            if self._tasks.count(INDIRECT_TASK, owner=self) >= const.MAX_PENDING_INDIRECT:
                raise DropError("queue_full", "too many indirect probes")
            self._tasks.spawn_once(INDIRECT_TASK, self._prober.async_indirect(msg, addr), owner=self)
        elif isinstance(msg, Alive):
            self._apply_alive(msg.record)
        elif isinstance(msg, Suspect):
            self._apply_suspect(msg)
        elif isinstance(msg, Dead):
            self._apply_dead(msg)
        elif isinstance(msg, Leave):
            self._apply_leave(msg, from_self=False)
        else:  # PushPull over UDP is not allowed
            raise WireError("unexpected message over UDP")

    # --- applying decisions ------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _commit(self, d: Decision, node: NodeId, msg: Message) -> None:
        if d.refute is not None:
            if not self._leaving:  # a leaving node does not argue about being dead
                self._refute(d.refute)
            return
        if d.stop_suspicion:
            self._prober.stop_suspicion(node)
        if d.member is not None:
            self._members[node] = d.member
        if d.rebroadcast:
            self._broadcasts.queue(node, encode_message(msg))
        if d.event is not None and d.member is not None:
            self._emit(d.event, d.member)
            log.info("mesh_member_" + d.event.value, node=self.node_id, member=node, incarnation=d.member.incarnation)

    def _apply_alive(self, record: NodeRecord) -> None:
        cur = self._members.get(record.node_id)
        # Cheap precedence check first; verify the signature only for news.
        if cur is not None and record.node_id != self.node_id and (record.incarnation <= cur.incarnation):
            return
        if self._verifier.is_revoked(record.node_id):
            raise DropError("revoked")
        meta = decode_state(record.state)
        d = on_alive(cur, record, meta, local_id=self.node_id, now=self._now(), wall=time.time())
        if d.ignored:
            return
        reason = self._verifier.check_record(record)
        if reason is not None:
            raise DropError(reason)
        self._commit(d, record.node_id, Alive(record))

    def _apply_suspect(self, msg: Suspect) -> None:
        cur = self._members.get(msg.node)
        d = on_suspect(cur, msg.incarnation, local_id=self.node_id, now=self._now())
        if d.ignored:
            return
        if d.confirm:
            if self._prober.confirm_suspicion(msg):
                self._broadcasts.queue(msg.node, encode_message(msg))
            return
        if d.start_suspicion:
            self._prober.start_suspicion(msg, n_live=self._n_live(), now=self._now())
            log.info("mesh_member_suspect", node=self.node_id, member=msg.node, source=msg.source, incarnation=msg.incarnation)
        self._commit(d, msg.node, msg)

    def _apply_dead(self, msg: Dead) -> None:
        cur = self._members.get(msg.node)
        d = on_dead(cur, msg.incarnation, local_id=self.node_id, now=self._now(), wall=time.time())
        if not d.ignored:
            self._commit(d, msg.node, msg)

    def _apply_leave(self, msg: Leave, *, from_self: bool) -> None:
        cur = self._members.get(msg.node)
        if from_self:
            assert cur is not None
            self._members[msg.node] = Member(
                node_id=cur.node_id,
                incarnation=msg.incarnation,
                state=MemberState.LEFT,
                record=cur.record,
                meta=cur.meta,
                changed_at=self._now(),
                updated_at=time.time(),
                leave_signature=msg.signature,
            )
            self._broadcasts.queue(msg.node, encode_message(msg))
            return
        if cur is None or msg.incarnation < cur.incarnation:
            return
        reason = self._verifier.check_leave(msg.node, msg.incarnation, msg.signature)
        if reason is not None:
            raise DropError(reason)
        d = on_leave(
            cur,
            msg.incarnation,
            msg.signature,
            local_id=self.node_id,
            leaving=self._leaving,
            now=self._now(),
            wall=time.time(),
        )
        if not d.ignored:
            self._commit(d, msg.node, msg)

    # --- loops ------------------------------------------------------------------------------

    async def _async_probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            interval = self._prober.interval_s()
            await self._async_probe_round(started + interval)
            await asyncio.sleep(max(0.0, started + interval - loop.time()))

    async def _async_probe_round(self, deadline: float) -> None:
        silent = await self._prober.async_probe(self._members, deadline)
        if silent is None:
            return
        cur = self._members.get(silent.node_id)
        # As memberlist's suspectNode: a failed probe of a member already suspect is one more independent
        # confirmation, which shortens its Lifeguard suspicion timeout (Lifeguard §IV-B).
        if cur is not None and cur.state in (MemberState.ALIVE, MemberState.SUSPECT):
            self._apply_suspect(Suspect(cur.node_id, cur.incarnation, self.node_id))

    async def _async_gossip_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.gossip_interval_s)
            self._gossip_round()

    def _gossip_round(self) -> None:
        if not self._broadcasts:
            return
        targets = gossip_targets(
            self._members.values(),
            self.node_id,
            count=self.timing.gossip_nodes,
            now=self._now(),
            gossip_to_dead_s=self.timing.gossip_to_dead_s,
            rng=self._rng,
        )
        budget = packet_budget()
        limit = self._broadcasts.transmit_limit()
        for m in targets:
            parts = self._broadcasts.take(budget, limit)
            if not parts:
                break
            self._send_raw(m.addr, encode_compound(parts))

    # --- push-pull ----------------------------------------------------------------------------

    async def _async_push_pull(self, addr: Addr, *, join: bool) -> None:
        """Exchange full state with the node at `addr`; raise MeshError on failure."""
        await self._anti_entropy.async_push_pull(self._cipher, addr, join=join)

    async def _async_on_stream(self, stream: Stream) -> None:
        await self._anti_entropy.async_answer(self._cipher, stream)

    def _merge(self, remote: PushPull, addr: Addr) -> None:
        """Apply a remote full state (memberlist mergeState semantics)."""
        peer = f"{addr[0]}:{addr[1]}"
        for e in remote.entries:
            try:
                rec = e.record
                if e.state is MemberState.ALIVE:
                    self._apply_alive(rec)
                    continue
                if rec.node_id not in self._members:
                    continue  # never learn a node from a report of its death
                if e.state is MemberState.LEFT and e.leave_signature is not None and self._verifier.check_record(rec) is None:
                    self._apply_leave(Leave(rec.node_id, e.incarnation, e.leave_signature), from_self=False)
                    continue
                # Remote dead/suspect is only a suspicion here: we probe it ourselves.
                self._apply_suspect(Suspect(rec.node_id, e.incarnation, NodeId("push-pull")))
            except DropError as err:
                self._drops.record(err.reason, peer, str(err))
            except WireError as err:
                self._drops.record("malformed", peer, str(err))

    async def _async_push_pull_loop(self) -> None:
        while True:
            await asyncio.sleep(push_pull_interval(self.timing.push_pull_interval_s, self._n_live()))
            pool = [m for m in live_others(self._members.values(), self.node_id) if m.state is MemberState.ALIVE]
            if pool:
                target = self._rng.choice(pool)
                with contextlib.suppress(MeshError):
                    await self._async_push_pull(target.addr, join=False)

    # --- timers ------------------------------------------------------------------------------

    async def _async_timer_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.tick_s)
            self._timer_round()

    def _timer_round(self) -> None:
        now = self._now()
        for node in self._prober.expired_suspicions(now):
            cur = self._members.get(node)
            if cur is not None and cur.state is MemberState.SUSPECT:
                self._apply_dead(Dead(node, cur.incarnation, self.node_id))
        # Reaping scans every member: at most a few times per reap period, not every tick.
        if now - self._last_reap >= min(REAP_CHECK_INTERVAL_S, self.timing.reap_after_s / 4):
            self._last_reap = now
            for node in reapable(self._members.values(), now=now, reap_after_s=self.timing.reap_after_s):
                if node != self.node_id:
                    del self._members[node]
                    self._verifier.forget(node)
        if now - self._last_reconnect >= self.timing.reconnect_interval_s and not self._helpers_busy():
            self._last_reconnect = now
            failed = [m for m in self._members.values() if m.state is MemberState.DEAD]
            if failed:
                target = self._rng.choice(failed)
                self._tasks.spawn_once(RECONNECT_TASK, self._async_reconnect(target.addr), owner=self)

    def _helpers_busy(self) -> bool:
        return self._tasks.count(RECONNECT_TASK, owner=self) > 0

    async def _async_reconnect(self, addr: Addr) -> None:
        # Serf-style: a failed member may be back after a partition heals.
        with contextlib.suppress(MeshError):
            await self._async_push_pull(addr, join=False)
