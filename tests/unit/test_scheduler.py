"""Scheduler decisions: model loaded first, then expected completion time, local on ties."""

from __future__ import annotations

import pytest

from mongarsd.mesh.scheduler import (
    DEFAULT_EXPECTED_TOKENS,
    NodeLoad,
    expected_completion_s,
    expected_tokens_of,
    load_from_state,
    rank,
    unseen_completions,
)

M = "smollm2-135m-instruct:q4_1"


def node(node_id: str, *, local: bool = False, loaded: bool = True, available: bool = True, **kw: object) -> NodeLoad:
    models = frozenset({M})
    return NodeLoad(
        node_id=node_id,
        local=local,
        models_available=models if available else frozenset(),
        models_loaded=models if loaded else frozenset(),
        **{"slots_total": 4, "slots_free": 4, "tokens_per_s": 20.0, **kw},  # type: ignore[arg-type]
    )


def order(local: NodeLoad, peers: list[NodeLoad], **kw: object) -> list[str]:
    return [r.node.node_id for r in rank(local, peers, model=M, hops=kw.pop("hops", 0), hop_limit=kw.pop("hop_limit", 2), **kw)]  # type: ignore[arg-type]


def test_idle_equal_nodes_stay_local() -> None:
    assert order(node("me", local=True), [node("a"), node("b")])[0] == "me"


def test_busy_local_forwards_to_idle_peer() -> None:
    me = node("me", local=True, slots_free=0, queue_depth=4)
    assert order(me, [node("a")]) == ["a", "me"]


def test_loaded_beats_faster_but_unloaded() -> None:
    me = node("me", local=True, loaded=False)
    assert order(me, [node("a", tokens_per_s=5.0)])[0] == "a"


def test_peer_without_the_model_is_never_chosen() -> None:
    me = node("me", local=True, slots_free=0, queue_depth=10)
    assert order(me, [node("a", loaded=False, available=False)]) == ["me"]


def test_peer_with_model_on_disk_is_a_candidate() -> None:
    me = node("me", local=True, loaded=False, available=False)
    assert order(me, [node("a", loaded=False)]) == ["a", "me"]


def test_lowest_expected_completion_wins_among_peers() -> None:
    me = node("me", local=True, slots_free=0, queue_depth=8)
    slow = node("slow", tokens_per_s=4.0)  # 32 s
    busy = node("busy", slots_free=0, queue_depth=2)  # 16 s
    fast = node("fast", tokens_per_s=40.0)  # 3.2 s; me: 25.6 s
    assert order(me, [slow, busy, fast]) == ["fast", "busy", "me", "slow"]


def test_tie_margin_keeps_local_unless_clearly_better() -> None:
    me = node("me", local=True, tokens_per_s=20.0)
    assert order(me, [node("a", tokens_per_s=22.0)])[0] == "me"  # 10 % faster: not worth a hop
    assert order(me, [node("a", tokens_per_s=30.0)])[0] == "a"  # 50 % faster: forward


def test_open_breaker_skips_peer() -> None:
    me = node("me", local=True, slots_free=0, queue_depth=4)
    assert order(me, [node("a"), node("b")], breaker_available=lambda n: n != "a") == ["b", "me"]


def test_hop_limit_forces_local() -> None:
    me = node("me", local=True, slots_free=0, queue_depth=50)
    assert order(me, [node("a")], hops=2, hop_limit=2) == ["me"]
    assert order(me, [node("a")], hops=1, hop_limit=2)[0] == "a"


def test_sender_is_excluded_to_avoid_ping_pong() -> None:
    me = node("me", local=True, slots_free=0, queue_depth=50)
    assert order(me, [node("a")], hops=1, exclude=["a"]) == ["me"]


def test_pending_forwards_count_as_load() -> None:
    me = node("me", local=True, slots_free=0, queue_depth=2)
    assert order(me, [node("a", pending=0)])[0] == "a"
    assert order(me, [node("a", pending=12)])[0] == "me"


def test_answered_forwards_free_the_peer_slots_its_state_still_shows_busy() -> None:
    me = node("me", local=True, slots_free=0, queue_depth=1)
    full = {"slots_free": 0, "queue_depth": 0}
    assert order(me, [node("a", **full)])[0] == "me"  # both full: local wins the tie
    assert order(me, [node("a", **full, finished=2)])[0] == "a"  # two of its four slots are free by now
    # never below an idle peer, and pending forwards still count on top
    idle = node("a", finished=3)
    assert expected_completion_s(idle, expected_tokens=100, model=M) == expected_completion_s(node("a"), expected_tokens=100, model=M)
    assert expected_completion_s(node("a", **full, finished=2, pending=2), expected_tokens=100, model=M) == expected_completion_s(
        node("a", **full), expected_tokens=100, model=M
    )


def test_unseen_completions_count_forwards_the_state_still_shows_running() -> None:
    state_at = 100.0
    spans = [
        (90.0, 101.0),  # started before the state, answered after it: the state shows it busy
        (95.0, 99.0),  # answered before the state: the state shows it done
        (99.9, 102.0),  # started within the lag: counted as pending, not busy
        (80.0, 100.0),  # answered exactly when the state arrived: assume the state saw it
    ]
    assert unseen_completions(spans, state_at=state_at) == 1
    assert unseen_completions(spans, state_at=state_at, lag_s=0.0) == 2
    assert unseen_completions(spans, state_at=103.0) == 0  # a newer state shows them all
    assert unseen_completions([], state_at=state_at) == 0


def test_a_peer_state_carries_finished_forwards_but_never_negative() -> None:
    meta = {"models_loaded": [M], "slots_total": 4, "slots_free": 0, "api_host": "10.0.0.2", "api_port": 8642}
    assert load_from_state("a", meta, finished=2).finished == 2
    assert load_from_state("a", meta, finished=-1).finished == 0


def test_unreachable_peer_and_self_in_peers_are_ignored() -> None:
    me = node("me", local=True, slots_free=0, queue_depth=9)
    assert order(me, [node("a", reachable=False), node("me")]) == ["me"]


def test_local_worse_peers_come_after_local_in_failover_order() -> None:
    me = node("me", local=True, slots_free=2)
    better = node("better", tokens_per_s=60.0)
    worse = node("worse", tokens_per_s=5.0)
    assert order(me, [worse, better]) == ["better", "me", "worse"]


def test_throttled_is_slower() -> None:
    a, b = node("a"), node("b", throttled=True)
    assert expected_completion_s(b, expected_tokens=100, model=M) > expected_completion_s(a, expected_tokens=100, model=M)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"max_tokens": 7}, 7),
        ({"max_completion_tokens": 9, "max_tokens": 7}, 9),
        ({"options": {"num_predict": 5}}, 5),
        ({"max_tokens": True}, DEFAULT_EXPECTED_TOKENS),
        ({"max_tokens": -3}, DEFAULT_EXPECTED_TOKENS),
        ({"options": "x"}, DEFAULT_EXPECTED_TOKENS),
        ({}, DEFAULT_EXPECTED_TOKENS),
    ],
)
def test_expected_tokens_of(body: dict[str, object], expected: int) -> None:
    assert expected_tokens_of(body) == expected


def test_load_from_state_tolerates_garbage() -> None:
    load = load_from_state(
        "x",
        {
            "models_loaded": [M, 3],
            "slots_total": "many",
            "slots_free": -5,
            "queue_depth": 2.9,
            "tokens_per_s": float("nan"),
            "api_host": "10.0.0.1",
            "api_port": 8642,
        },
    )
    assert load.models_loaded == frozenset({M}) and M in load.models_available
    assert load.slots_total == 1 and load.slots_free == 0 and load.queue_depth == 2 and load.tokens_per_s == 0.0
    assert load.reachable
    assert not load_from_state("y", {}).reachable
