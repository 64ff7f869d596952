"""Pure SWIM/Lifeguard decisions, tested without I/O."""

from __future__ import annotations

import random

import pytest

from mongarsd.mesh.awareness import Awareness, probe_delta
from mongarsd.mesh.membership import (
    EventKind,
    Member,
    ProbeOrder,
    gossip_targets,
    on_alive,
    on_dead,
    on_leave,
    on_suspect,
    push_pull_interval,
    reapable,
    retransmit_limit,
)
from mongarsd.mesh.suspicion import Suspicion, expected_confirmations, suspicion_bounds, suspicion_timeout
from mongarsd.mesh.wire import MemberState, NodeId, NodeRecord

pytestmark = pytest.mark.timeout(10)

ME = NodeId("me")
X = NodeId("x")


def rec(node: str = "x", inc: int = 1, state: bytes = b"\x80", port: int = 1) -> NodeRecord:
    return NodeRecord(NodeId(node), inc, ("h", port), b"k" * 32, state, b"s" * 64)


def member(node: str = "x", inc: int = 1, state: MemberState = MemberState.ALIVE) -> Member:
    return Member(NodeId(node), inc, state, rec(node, inc), {}, changed_at=0.0, updated_at=0.0)


def alive(cur: Member | None, r: NodeRecord):  # type: ignore[no-untyped-def]
    return on_alive(cur, r, {}, local_id=ME, now=1.0, wall=1.0)


def test_alive_unknown_node_joins() -> None:
    d = alive(None, rec())
    assert d.member is not None and d.member.state is MemberState.ALIVE
    assert d.event is EventKind.JOIN and d.rebroadcast


@pytest.mark.parametrize("state", list(MemberState))
def test_alive_needs_strictly_higher_incarnation(state: MemberState) -> None:
    assert alive(member(inc=3, state=state), rec(inc=3)).ignored
    assert alive(member(inc=3, state=state), rec(inc=2)).ignored
    d = alive(member(inc=3, state=state), rec(inc=4))
    assert d.member is not None and d.member.state is MemberState.ALIVE and d.member.incarnation == 4
    if state in (MemberState.DEAD, MemberState.LEFT):
        assert d.event is EventKind.JOIN
    assert d.stop_suspicion == (state is MemberState.SUSPECT)


def test_alive_with_new_state_is_an_update() -> None:
    d = alive(member(inc=1), rec(inc=2, state=b"\x81\xa1a\x01"))
    assert d.event is EventKind.UPDATE


def test_alive_about_ourselves_from_a_previous_life_is_refuted() -> None:
    me = member("me", inc=2)
    assert on_alive(me, rec("me", inc=5), {}, local_id=ME, now=0, wall=0).refute == 6
    assert on_alive(me, rec("me", inc=1), {}, local_id=ME, now=0, wall=0).ignored
    # same incarnation, different content: not ours -> refute
    assert on_alive(me, rec("me", inc=2, port=9), {}, local_id=ME, now=0, wall=0).refute == 3


def test_suspect_precedence() -> None:
    assert on_suspect(None, 1, local_id=ME, now=0).ignored
    assert on_suspect(member(inc=3), 2, local_id=ME, now=0).ignored
    d = on_suspect(member(inc=3), 3, local_id=ME, now=5)
    assert d.member is not None and d.member.state is MemberState.SUSPECT and d.start_suspicion
    assert d.member.changed_at == 5
    assert on_suspect(member(inc=3, state=MemberState.SUSPECT), 3, local_id=ME, now=0).confirm
    assert on_suspect(member(inc=3, state=MemberState.DEAD), 3, local_id=ME, now=0).ignored


def test_suspected_local_node_refutes() -> None:
    assert on_suspect(member("me", inc=4), 4, local_id=ME, now=0).refute == 5
    assert on_suspect(member("me", inc=4), 9, local_id=ME, now=0).refute == 10
    assert on_suspect(member("me", inc=4), 3, local_id=ME, now=0).ignored


def test_dead_precedence_and_refutation() -> None:
    d = on_dead(member(inc=2, state=MemberState.SUSPECT), 2, local_id=ME, now=0, wall=0)
    assert d.member is not None and d.member.state is MemberState.DEAD
    assert d.event is EventKind.FAIL and d.stop_suspicion
    assert on_dead(member(inc=3), 2, local_id=ME, now=0, wall=0).ignored
    assert on_dead(member(inc=3, state=MemberState.DEAD), 3, local_id=ME, now=0, wall=0).ignored
    assert on_dead(member("me", inc=3), 3, local_id=ME, now=0, wall=0).refute == 4


def test_leave() -> None:
    d = on_leave(member(inc=2), 2, b"s" * 64, local_id=ME, leaving=False, now=0, wall=0)
    assert d.member is not None and d.member.state is MemberState.LEFT and d.event is EventKind.LEAVE
    assert on_leave(member(inc=2, state=MemberState.LEFT), 2, b"s", local_id=ME, leaving=False, now=0, wall=0).ignored
    assert on_leave(member("me", inc=2), 2, b"s", local_id=ME, leaving=True, now=0, wall=0).ignored
    assert on_leave(member("me", inc=2), 2, b"s", local_id=ME, leaving=False, now=0, wall=0).refute == 3


def test_retransmit_limit_grows_with_log_n() -> None:
    assert retransmit_limit(4, 1) == 4
    assert retransmit_limit(4, 9) == 4
    assert retransmit_limit(4, 10) == 8
    assert retransmit_limit(4, 1000) == 16


def test_push_pull_interval_scales_above_32() -> None:
    assert push_pull_interval(30.0, 10) == 30.0
    assert push_pull_interval(30.0, 64) == 60.0
    assert push_pull_interval(30.0, 1000) > 60.0


def test_suspicion_timeout_shrinks_with_confirmations() -> None:
    lo, hi = suspicion_bounds(suspicion_mult=4, max_timeout_mult=6, n_members=100, probe_interval_s=1.0)
    assert lo == pytest.approx(8.0) and hi == pytest.approx(48.0)
    k = expected_confirmations(suspicion_mult=4, n_members=100)
    assert k == 2
    times = [suspicion_timeout(confirmations=c, k=k, min_s=lo, max_s=hi) for c in range(4)]
    assert times[0] == hi and times[-1] == lo
    assert times == sorted(times, reverse=True)
    assert expected_confirmations(suspicion_mult=4, n_members=3) == 0  # tiny cluster


def test_suspicion_counts_distinct_confirmers_only() -> None:
    s = Suspicion(X, 1, origin=NodeId("a"), started_at=10.0, k=2, min_s=1.0, max_s=4.0)
    assert s.deadline() == 14.0
    assert not s.confirm(NodeId("a"))  # the accuser does not confirm itself
    assert s.confirm(NodeId("b"))
    assert not s.confirm(NodeId("b"))
    assert 11.0 < s.deadline() < 14.0
    assert s.confirm(NodeId("c"))
    assert s.deadline() == 11.0
    assert not s.confirm(NodeId("d"))  # k reached


def test_awareness_bounds_and_scaling() -> None:
    a = Awareness(max_multiplier=4)
    assert a.apply(-1).score == 0
    assert a.apply(10).score == 3
    assert a.apply(2).scale(0.5) == 1.5
    assert probe_delta(acked=True, expected_nacks=3, nacks=0) == -1
    assert probe_delta(acked=False, expected_nacks=3, nacks=3) == 0  # helpers answered: not our fault
    assert probe_delta(acked=False, expected_nacks=3, nacks=1) == 2
    assert probe_delta(acked=False, expected_nacks=0, nacks=0) == 1


def test_probe_order_visits_every_live_member_once_per_pass() -> None:
    members = {NodeId(n): member(n) for n in "abcdef"}
    members[NodeId("d")] = member("d", state=MemberState.DEAD)
    members[ME] = member("me")
    order = ProbeOrder()
    rng = random.Random(1)
    first = [order.next(members, ME, rng) for _ in range(5)]
    assert sorted(m.node_id for m in first if m is not None) == ["a", "b", "c", "e", "f"]
    second = [order.next(members, ME, rng) for _ in range(5)]
    assert sorted(m.node_id for m in second if m is not None) == ["a", "b", "c", "e", "f"]
    assert ProbeOrder().next({ME: member("me")}, ME, rng) is None


def test_gossip_targets_include_recently_dead_only() -> None:
    m_dead_old = Member(NodeId("old"), 1, MemberState.DEAD, rec("old"), {}, changed_at=0.0, updated_at=0.0)
    m_dead_new = Member(NodeId("new"), 1, MemberState.DEAD, rec("new"), {}, changed_at=95.0, updated_at=0.0)
    pool = [member("a"), m_dead_old, m_dead_new, member("me")]
    got = gossip_targets(pool, ME, count=10, now=100.0, gossip_to_dead_s=10.0, rng=random.Random(0))
    assert {m.node_id for m in got} == {"a", "new"}
    assert reapable(pool, now=100.0, reap_after_s=50.0) == ["old"]
