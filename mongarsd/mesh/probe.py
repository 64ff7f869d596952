"""SWIM failure detection: direct and indirect probes, Lifeguard awareness, suspicions.

Each round pings the next member of a shuffled round-robin order (SWIM §4.3); without an ack
within the awareness-scaled timeout, k other members ping it for us and nack if they get no
answer either (Lifeguard §IV-A: their silence counts against our own health). A member that
stays silent is suspected; a suspicion turns into death after a timeout that shrinks with
each independent confirmation (Lifeguard §IV-B, see suspicion.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from mongarsd.mesh import const
from mongarsd.mesh.awareness import Awareness, probe_delta
from mongarsd.mesh.membership import Member, ProbeOrder, live_others
from mongarsd.mesh.suspicion import Suspicion, expected_confirmations, suspicion_bounds
from mongarsd.mesh.wire import Ack, Addr, IndirectPing, MemberState, Message, Nack, NodeId, Ping, Suspect


class ProbeTiming(Protocol):
    """The timing values failure detection reads (gossip.Timing has them)."""

    @property
    def probe_interval_s(self) -> float: ...
    @property
    def probe_timeout_s(self) -> float: ...
    @property
    def indirect_checks(self) -> int: ...
    @property
    def suspicion_mult(self) -> int: ...
    @property
    def suspicion_max_timeout_mult(self) -> int: ...
    @property
    def awareness_max_multiplier(self) -> int: ...


@dataclass(slots=True)
class AckWaiter:
    future: asyncio.Future[None]
    nacks: int = 0


class Prober:
    """One node's failure detector: probe rounds, acks and nacks, awareness, suspicions (loop-only)."""

    def __init__(
        self,
        *,
        node_id: NodeId,
        timing: ProbeTiming,
        rng: random.Random,
        send: Callable[[Addr, list[Message]], None],
    ) -> None:
        self._node_id = node_id
        self._timing = timing
        self._rng = rng
        self._send = send
        self.awareness = Awareness(max_multiplier=timing.awareness_max_multiplier)
        self._order = ProbeOrder()
        self._acks: dict[int, AckWaiter] = {}
        self._seq = rng.randrange(const.MAX_SEQ)
        self._suspicions: dict[NodeId, Suspicion] = {}
        self.probes = 0
        self.probe_failures = 0

    # --- probing -----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % (const.MAX_SEQ + 1)
        return self._seq

    def _register_ack(self, seq: int) -> AckWaiter:
        waiter = AckWaiter(asyncio.get_running_loop().create_future())
        self._acks[seq] = waiter
        return waiter

    def interval_s(self) -> float:
        """Return the time between probe rounds, stretched while we are unhealthy."""
        return self.awareness.scale(self._timing.probe_interval_s)

    async def async_probe(self, members: Mapping[NodeId, Member], deadline: float) -> Member | None:
        """Probe the next member until `deadline`; return it if it stayed silent, else None."""
        target = self._order.next(members, self._node_id, self._rng)
        if target is None:
            return None
        self.probes += 1
        seq = self._next_seq()
        waiter = self._register_ack(seq)
        loop = asyncio.get_running_loop()
        helpers: list[Member] = []
        try:
            msgs: list[Message] = [Ping(seq, target.node_id)]
            if target.state is MemberState.SUSPECT:
                # Lifeguard buddy system: tell a suspect directly so it can refute in time.
                msgs.append(Suspect(target.node_id, target.incarnation, self._node_id))
            self._send(target.addr, msgs)
            timeout = self.awareness.scale(self._timing.probe_timeout_s)
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(waiter.future)
            except TimeoutError:
                pool = [
                    m for m in live_others(members.values(), self._node_id) if m.node_id != target.node_id and m.state is MemberState.ALIVE
                ]
                helpers = self._rng.sample(pool, min(self._timing.indirect_checks, len(pool)))
                for h in helpers:
                    self._send(h.addr, [IndirectPing(seq, target.node_id, target.addr, True)])
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - loop.time())):
                        await asyncio.shield(waiter.future)
        finally:
            self._acks.pop(seq, None)
        acked = waiter.future.done() and not waiter.future.cancelled()
        self.awareness = self.awareness.apply(probe_delta(acked=acked, expected_nacks=len(helpers), nacks=waiter.nacks))
        if acked:
            return None
        if not waiter.future.done():
            waiter.future.cancel()
        self.probe_failures += 1
        return target

    async def async_indirect(self, req: IndirectPing, requester: Addr) -> None:
        """Ping `req.target` for `requester`; relay the ack, or a nack if asked for one."""
        seq = self._next_seq()
        waiter = self._register_ack(seq)
        try:
            self._send(req.target_addr, [Ping(seq, req.target)])
            try:
                async with asyncio.timeout(self._timing.probe_timeout_s):
                    await waiter.future
            except TimeoutError:
                if req.nack:
                    self._send(requester, [Nack(req.seq)])
                return
            self._send(requester, [Ack(req.seq)])
        finally:
            self._acks.pop(seq, None)

    def on_ping(self, msg: Ping, addr: Addr) -> None:
        if msg.target == self._node_id:
            self._send(addr, [Ack(msg.seq)])

    def on_ack(self, msg: Ack) -> None:
        waiter = self._acks.get(msg.seq)
        if waiter is not None and not waiter.future.done():
            waiter.future.set_result(None)

    def on_nack(self, msg: Nack) -> None:
        waiter = self._acks.get(msg.seq)
        if waiter is not None:
            waiter.nacks += 1

    def on_refute(self) -> None:
        """Lifeguard: being suspected hints we are slow; raise our own awareness."""
        self.awareness = self.awareness.apply(1)

    def cancel_waiters(self) -> None:
        """Cancel every probe still waiting for an ack (on shutdown)."""
        for waiter in self._acks.values():
            waiter.future.cancel()
        self._acks.clear()

    # --- suspicions --------------------------------------------------------------------------

    def start_suspicion(self, msg: Suspect, *, n_live: int, now: float) -> None:
        """Start the Lifeguard suspicion timer of `msg.node` for a cluster of `n_live` members."""
        min_s, max_s = suspicion_bounds(
            suspicion_mult=self._timing.suspicion_mult,
            max_timeout_mult=self._timing.suspicion_max_timeout_mult,
            n_members=n_live,
            probe_interval_s=self._timing.probe_interval_s,
        )
        k = expected_confirmations(suspicion_mult=self._timing.suspicion_mult, n_members=n_live)
        self._suspicions[msg.node] = Suspicion(
            node=msg.node,
            incarnation=msg.incarnation,
            origin=msg.source,
            started_at=now,
            k=k,
            min_s=min_s,
            max_s=max_s,
        )

    def confirm_suspicion(self, msg: Suspect) -> bool:
        """Count `msg` as a confirmation of the running suspicion; True if it is new (re-gossip it)."""
        s = self._suspicions.get(msg.node)
        return s is not None and s.incarnation == msg.incarnation and s.confirm(msg.source)

    def stop_suspicion(self, node: NodeId) -> None:
        self._suspicions.pop(node, None)

    def expired_suspicions(self, now: float) -> list[NodeId]:
        """Remove and return the suspicions whose timeout has passed."""
        expired = [node for node, s in self._suspicions.items() if now >= s.deadline()]
        for node in expired:
            del self._suspicions[node]
        return expired
