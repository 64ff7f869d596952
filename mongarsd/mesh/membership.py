"""Pure SWIM membership decisions: member states, incarnations and precedence rules.

Precedence (SWIM §4.2, as refined by memberlist/Lifeguard), for a member at incarnation j:
- Alive(i) overrides Alive/Suspect(j) iff i > j, and revives Dead/Left(j) iff i > j;
- Suspect(i) overrides Alive(j) iff i >= j; on a Suspect member it only confirms;
- Dead(i) overrides Alive/Suspect(j) iff i >= j;
- a node that hears itself suspected or declared dead refutes with incarnation i + 1.
Functions here take the current member and a message and return a Decision; no I/O, no clock.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from mongarsd.mesh.wire import Addr, MemberState, NodeId, NodeRecord


class EventKind(StrEnum):
    """Membership events delivered to subscribers."""

    JOIN = "join"
    LEAVE = "leave"
    FAIL = "fail"
    UPDATE = "update"


@dataclass(frozen=True, slots=True)
class Member:
    """What this node believes about one member (itself included)."""

    node_id: NodeId
    incarnation: int  # may exceed record.incarnation after a Suspect/Dead at a higher one
    state: MemberState
    record: NodeRecord
    meta: Mapping[str, Any]
    changed_at: float  # monotonic time of the last state change
    updated_at: float  # wall-clock time of the last accepted update
    leave_signature: bytes | None = None

    @property
    def addr(self) -> Addr:
        return self.record.addr


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a message: new member value, gossip, event, refutation, timers."""

    member: Member | None = None
    rebroadcast: bool = False
    event: EventKind | None = None
    refute: int | None = None  # re-announce ourselves at this incarnation
    start_suspicion: bool = False
    confirm: bool = False
    stop_suspicion: bool = False
    ignored: bool = False


IGNORE = Decision(ignored=True)


def on_alive(
    cur: Member | None,
    record: NodeRecord,
    meta: Mapping[str, Any],
    *,
    local_id: NodeId,
    now: float,
    wall: float,
) -> Decision:
    """Decide on an (already authenticated) ALIVE record."""
    if record.node_id == local_id:
        if cur is None:
            return IGNORE
        mine = cur.record
        # A record of ours we did not produce in this life (restart, clone): outbid it.
        if record.incarnation > cur.incarnation or (
            record.incarnation == cur.incarnation and (record.state != mine.state or record.addr != mine.addr)
        ):
            return Decision(refute=record.incarnation + 1)
        return IGNORE
    if cur is None:
        member = Member(
            node_id=record.node_id,
            incarnation=record.incarnation,
            state=MemberState.ALIVE,
            record=record,
            meta=dict(meta),
            changed_at=now,
            updated_at=wall,
        )
        return Decision(member=member, rebroadcast=True, event=EventKind.JOIN)
    if record.incarnation <= cur.incarnation:
        return IGNORE
    revived = cur.state in (MemberState.DEAD, MemberState.LEFT)
    changed = record.state != cur.record.state or record.addr != cur.record.addr
    member = replace(
        cur,
        incarnation=record.incarnation,
        state=MemberState.ALIVE,
        record=record,
        meta=dict(meta),
        changed_at=now if cur.state is not MemberState.ALIVE else cur.changed_at,
        updated_at=wall,
        leave_signature=None,
    )
    event = EventKind.JOIN if revived else EventKind.UPDATE if changed else None
    return Decision(
        member=member,
        rebroadcast=True,
        event=event,
        stop_suspicion=cur.state is MemberState.SUSPECT,
    )


def on_suspect(cur: Member | None, incarnation: int, *, local_id: NodeId, now: float) -> Decision:
    """Decide on a SUSPECT message about `cur`."""
    if cur is None or incarnation < cur.incarnation:
        return IGNORE
    if cur.node_id == local_id:
        return Decision(refute=incarnation + 1)
    if cur.state is MemberState.SUSPECT:
        return Decision(confirm=True)
    if cur.state is not MemberState.ALIVE:
        return IGNORE
    member = replace(cur, incarnation=incarnation, state=MemberState.SUSPECT, changed_at=now)
    return Decision(member=member, rebroadcast=True, start_suspicion=True)


def on_dead(cur: Member | None, incarnation: int, *, local_id: NodeId, now: float, wall: float) -> Decision:
    """Decide on a DEAD message (or our own suspicion timeout) about `cur`."""
    if cur is None or incarnation < cur.incarnation:
        return IGNORE
    if cur.node_id == local_id:
        return Decision(refute=incarnation + 1)
    if cur.state in (MemberState.DEAD, MemberState.LEFT):
        return IGNORE
    member = replace(cur, incarnation=incarnation, state=MemberState.DEAD, changed_at=now, updated_at=wall)
    return Decision(
        member=member,
        rebroadcast=True,
        event=EventKind.FAIL,
        stop_suspicion=cur.state is MemberState.SUSPECT,
    )


def on_leave(
    cur: Member | None,
    incarnation: int,
    signature: bytes,
    *,
    local_id: NodeId,
    leaving: bool,
    now: float,
    wall: float,
) -> Decision:
    """Decide on an (already authenticated) LEAVE of `cur`."""
    if cur is None or incarnation < cur.incarnation:
        return IGNORE
    if cur.node_id == local_id:
        # A leave of ours from a previous life must not take us down now.
        return IGNORE if leaving else Decision(refute=incarnation + 1)
    if cur.state is MemberState.LEFT:
        return IGNORE
    member = replace(
        cur,
        incarnation=incarnation,
        state=MemberState.LEFT,
        changed_at=now,
        updated_at=wall,
        leave_signature=signature,
    )
    return Decision(
        member=member,
        rebroadcast=True,
        event=EventKind.LEAVE,
        stop_suspicion=cur.state is MemberState.SUSPECT,
    )


# --- selection helpers (pure; randomness passed in) ----------------------------------------

LIVE_STATES = (MemberState.ALIVE, MemberState.SUSPECT)


def retransmit_limit(retransmit_mult: int, n_members: int) -> int:
    """Return how many times a broadcast is piggybacked: mult * ceil(log10(n + 1))."""
    return retransmit_mult * max(1, math.ceil(math.log10(n_members + 1)))


def push_pull_interval(base_s: float, n_members: int) -> float:
    """Scale the push-pull interval above 32 members so total stream load stays flat."""
    threshold = 32
    if n_members <= threshold:
        return base_s
    return base_s * (math.ceil(math.log2(n_members) - math.log2(threshold)) + 1)


def live_others(members: Iterable[Member], local_id: NodeId) -> list[Member]:
    """Return the alive or suspect members other than ourselves."""
    return [m for m in members if m.node_id != local_id and m.state in LIVE_STATES]


def gossip_targets(
    members: Iterable[Member],
    local_id: NodeId,
    *,
    count: int,
    now: float,
    gossip_to_dead_s: float,
    rng: random.Random,
) -> list[Member]:
    """Pick up to `count` gossip targets: live members and the recently dead (to refute)."""
    pool = [m for m in members if m.node_id != local_id and (m.state in LIVE_STATES or now - m.changed_at < gossip_to_dead_s)]
    return rng.sample(pool, min(count, len(pool)))


def reapable(members: Iterable[Member], *, now: float, reap_after_s: float) -> list[NodeId]:
    """Return dead or left members old enough to forget."""
    return [m.node_id for m in members if m.state in (MemberState.DEAD, MemberState.LEFT) and now - m.changed_at >= reap_after_s]


@dataclass(slots=True)
class ProbeOrder:
    """Round-robin over a shuffled member list, reshuffled each pass (SWIM §4.3)."""

    order: list[NodeId] = field(default_factory=list)
    index: int = 0

    def next(self, members: Mapping[NodeId, Member], local_id: NodeId, rng: random.Random) -> Member | None:
        """Return the next live member to probe, or None if there is none."""
        for _ in range(2):
            while self.index < len(self.order):
                node = self.order[self.index]
                self.index += 1
                m = members.get(node)
                if m is not None and m.node_id != local_id and m.state in LIVE_STATES:
                    return m
            self.order = [m.node_id for m in live_others(members.values(), local_id)]
            rng.shuffle(self.order)
            self.index = 0
        return None
