"""Wire format: round trips, strict schema, caps before decode, fuzzing."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mongarsd.errors import WireError
from mongarsd.mesh import const, wire
from mongarsd.mesh.state import decode_state, encode_state, validate_state
from mongarsd.mesh.wire import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Leave,
    MemberState,
    MessageType,
    Nack,
    NodeId,
    NodeRecord,
    Ping,
    PushPull,
    PushPullEntry,
    Suspect,
    decode_messages,
    encode_compound,
    encode_message,
)

pytestmark = pytest.mark.timeout(60)

REC = NodeRecord(NodeId("abcd"), 3, ("10.0.0.1", 8643), b"k" * 32, encode_state({"queue_depth": 2}), b"s" * 64)
MESSAGES: list[wire.Message] = [
    Ping(1, NodeId("a")),
    IndirectPing(2, NodeId("b"), ("10.0.0.2", 8643), True),
    Ack(3),
    Nack(4),
    Suspect(NodeId("a"), 5, NodeId("b")),
    Dead(NodeId("a"), 6, NodeId("b")),
    Alive(REC),
    Leave(NodeId("a"), 7, b"x" * 64),
    PushPull(True, (PushPullEntry(REC, MemberState.SUSPECT, 4, None), PushPullEntry(REC, MemberState.LEFT, 4, b"l" * 64))),
]


def test_message_types_are_append_only() -> None:
    # Renumbering breaks mixed-version clusters: pin the numbers.
    assert [(t.name, t.value) for t in MessageType] == [
        ("PING", 0),
        ("INDIRECT_PING", 1),
        ("ACK", 2),
        ("NACK", 3),
        ("SUSPECT", 4),
        ("ALIVE", 5),
        ("DEAD", 6),
        ("LEAVE", 7),
        ("PUSH_PULL", 8),
        ("USER_STATE", 9),
        ("COMPOUND", 10),
    ]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: wire.Message) -> None:
    assert decode_messages(encode_message(msg), max_bytes=const.MAX_TCP_FRAME_BYTES) == [msg]


def test_compound_round_trip_and_no_nesting() -> None:
    parts = [encode_message(m) for m in MESSAGES[:8]]
    assert decode_messages(encode_compound(parts)) == MESSAGES[:8]
    nested = encode_compound([encode_compound(parts[:2]), parts[2]])
    with pytest.raises(WireError):
        decode_messages(nested)


def test_oversized_rejected_before_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("msgpack must not see oversized input")

    monkeypatch.setattr(msgpack, "unpackb", boom)
    with pytest.raises(WireError):
        decode_messages(b"\x90" * (const.MAX_UDP_PACKET_BYTES + 1))
    with pytest.raises(WireError):
        decode_state(b"\x80" * (const.MAX_STATE_BYTES + 1))


@pytest.mark.parametrize(
    "obj",
    [
        [0, {"q": -1, "t": "a"}],
        [0, {"q": 2**40, "t": "a"}],
        [0, {"q": True, "t": "a"}],
        [0, {"q": 1, "t": ""}],
        [0, {"q": 1, "t": "x" * 65}],
        [0, {"q": 1}],
        [1, {"q": 1, "t": "a", "a": ["h", 0], "k": True}],
        [1, {"q": 1, "t": "a", "a": ["h", 70000], "k": True}],
        [1, {"q": 1, "t": "a", "a": ["h", 1], "k": 1}],
        [5, {"r": {"n": "a", "i": 1, "a": ["h", 1], "k": b"short", "m": b"", "s": b"s" * 64}}],
        [8, {"j": True, "m": [{"r": 1, "s": 0, "i": 0}]}],
        [8, {"j": True, "m": [{"r": {}, "s": 9, "i": 0}]}],
        [9, {}],
        [99, {}],
        [0, []],
        [0],
        "ping",
        [10, {"p": [1]}],
    ],
)
def test_schema_violations_raise_wire_error(obj: object) -> None:
    with pytest.raises(WireError):
        decode_messages(msgpack.packb(obj, use_bin_type=True))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes_only_raise_wire_error(data: bytes) -> None:
    try:
        decode_messages(data)
    except WireError:
        pass


_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20) | st.binary(max_size=20)
_tree = st.recursive(
    _leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5) | st.integers(), c, max_size=4), max_leaves=30
)


@settings(max_examples=400, deadline=None)
@given(st.integers(-2, 12), _tree)
def test_fuzz_structured_messages_only_raise_wire_error(mtype: int, body: object) -> None:
    try:
        data = msgpack.packb([mtype, body], use_bin_type=True, strict_types=False)
    except (OverflowError, ValueError, TypeError):
        return
    try:
        decode_messages(data)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200))
def test_fuzz_state_decode(data: bytes) -> None:
    try:
        decode_state(data)
    except WireError:
        pass


def test_state_validation() -> None:
    good = {
        "version": "0.1",
        "board": "pi5",
        "models_loaded": ["m"],
        "slots_free": 2,
        "queue_depth": 0,
        "tokens_per_s": 9.5,
        "throttled": False,
        "api_port": 8642,
        "future_field": {"x": [1, 2]},
    }
    assert decode_state(encode_state(good)) == good
    for bad in (
        {"queue_depth": -1},
        {"queue_depth": True},
        {"api_port": 0},
        {"throttled": "no"},
        {"tokens_per_s": float("nan")},
        {"models_loaded": [1]},
        {"": 1},
        {"d": [[[[[1]]]]]},
    ):
        with pytest.raises(WireError):
            validate_state(bad)
    with pytest.raises(WireError):
        encode_state({"blob": "x" * const.MAX_STATE_BYTES})
