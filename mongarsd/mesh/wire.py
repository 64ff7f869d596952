"""Mesh message types and their msgpack encoding with strict, capped decoding.

Every message is `[type, body-map]`. Message types are append-only (never renumbered, never
reused). Decoding checks the size cap BEFORE msgpack sees the bytes, passes hard length caps to
msgpack, then validates every field's type, length and range; anything off raises WireError
and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NewType

import msgpack

from mongarsd.errors import WireError
from mongarsd.mesh import const

NodeId = NewType("NodeId", str)
Addr = tuple[str, int]


class MessageType(IntEnum):
    """Wire message types; append-only (SWIM/memberlist message kinds)."""

    PING = 0
    INDIRECT_PING = 1
    ACK = 2
    NACK = 3
    SUSPECT = 4
    ALIVE = 5
    DEAD = 6
    LEAVE = 7
    PUSH_PULL = 8
    USER_STATE = 9  # reserved: node state rides on signed ALIVE records
    COMPOUND = 10


class MemberState(IntEnum):
    """Member states as carried in push-pull entries; append-only."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node's self-description at one incarnation, signed by its Ed25519 identity."""

    node_id: NodeId
    incarnation: int
    addr: Addr
    public_key: bytes
    state: bytes  # encoded user state (mongarsd.mesh.state), exactly the signed bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target: NodeId


@dataclass(frozen=True, slots=True)
class IndirectPing:
    seq: int
    target: NodeId
    target_addr: Addr
    nack: bool


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    seq: int


@dataclass(frozen=True, slots=True)
class Suspect:
    node: NodeId
    incarnation: int
    source: NodeId


@dataclass(frozen=True, slots=True)
class Alive:
    record: NodeRecord


@dataclass(frozen=True, slots=True)
class Dead:
    node: NodeId
    incarnation: int
    source: NodeId


@dataclass(frozen=True, slots=True)
class Leave:
    """A graceful leave, signed by the leaving node so nobody can make another node leave."""

    node: NodeId
    incarnation: int
    signature: bytes


@dataclass(frozen=True, slots=True)
class PushPullEntry:
    record: NodeRecord
    state: MemberState
    incarnation: int
    leave_signature: bytes | None


@dataclass(frozen=True, slots=True)
class PushPull:
    join: bool
    entries: tuple[PushPullEntry, ...]


Message = Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | Leave | PushPull

# --- encoding -----------------------------------------------------------------------------


def _record_body(r: NodeRecord) -> dict[str, Any]:
    return {
        "n": r.node_id,
        "i": r.incarnation,
        "a": [r.addr[0], r.addr[1]],
        "k": r.public_key,
        "m": r.state,
        "s": r.signature,
    }


def _body(msg: Message) -> tuple[MessageType, dict[str, Any]]:
    if isinstance(msg, Ping):
        return MessageType.PING, {"q": msg.seq, "t": msg.target}
    if isinstance(msg, IndirectPing):
        return MessageType.INDIRECT_PING, {
            "q": msg.seq,
            "t": msg.target,
            "a": [msg.target_addr[0], msg.target_addr[1]],
            "k": msg.nack,
        }
    if isinstance(msg, Ack):
        return MessageType.ACK, {"q": msg.seq}
    if isinstance(msg, Nack):
        return MessageType.NACK, {"q": msg.seq}
    if isinstance(msg, Suspect):
        return MessageType.SUSPECT, {"n": msg.node, "i": msg.incarnation, "f": msg.source}
    if isinstance(msg, Dead):
        return MessageType.DEAD, {"n": msg.node, "i": msg.incarnation, "f": msg.source}
    if isinstance(msg, Alive):
        return MessageType.ALIVE, {"r": _record_body(msg.record)}
    if isinstance(msg, Leave):
        return MessageType.LEAVE, {"n": msg.node, "i": msg.incarnation, "s": msg.signature}
    entries = []
    for e in msg.entries:
        body: dict[str, Any] = {"r": _record_body(e.record), "s": int(e.state), "i": e.incarnation}
        if e.leave_signature is not None:
            body["l"] = e.leave_signature
        entries.append(body)
    return MessageType.PUSH_PULL, {"j": msg.join, "m": entries}


def encode_message(msg: Message) -> bytes:
    """Encode one message to msgpack bytes."""
    mtype, body = _body(msg)
    data: bytes = msgpack.packb([int(mtype), body], use_bin_type=True)
    return data


def encode_compound(parts: Sequence[bytes]) -> bytes:
    """Wrap already-encoded messages in one COMPOUND message (or return the single part)."""
    if len(parts) == 1:
        return parts[0]
    if len(parts) > const.MAX_COMPOUND_PARTS:
        raise WireError("too many compound parts")
    data: bytes = msgpack.packb([int(MessageType.COMPOUND), {"p": list(parts)}], use_bin_type=True)
    return data


def compound_overhead(part_len: int) -> int:
    """Return the extra bytes one part of `part_len` bytes costs inside a COMPOUND."""
    # bin header (2..5 bytes) plus a worst-case share of the array/map headers
    return part_len + (2 if part_len < 256 else 3 if part_len < 65536 else 5)


COMPOUND_FIXED_OVERHEAD_BYTES = 16  # [type, {"p": array32}] headers, generous

# --- decoding -----------------------------------------------------------------------------


def _unpack(data: bytes, max_bytes: int) -> Any:
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds cap {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max(const.MAX_PUSH_PULL_MEMBERS, const.MAX_COMPOUND_PARTS),
            max_map_len=64,
            max_ext_len=0,
        )
    except (ValueError, TypeError) as err:  # msgpack raises ValueError subclasses
        raise WireError("undecodable message") from err
    except RecursionError as err:  # pathological nesting
        raise WireError("message nested too deeply") from err


def _map(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{what} is not a map")
    return value


def _int(body: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WireError(f"field {key} is not an integer in [{lo}, {hi}]")
    return value


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if not isinstance(value, bool):
        raise WireError(f"field {key} is not a boolean")
    return value


def _bytes(body: dict[str, Any], key: str, lo: int, hi: int) -> bytes:
    value = body.get(key)
    if not isinstance(value, bytes) or not lo <= len(value) <= hi:
        raise WireError(f"field {key} is not {lo}..{hi} bytes")
    return value


def _node_id(body: dict[str, Any], key: str) -> NodeId:
    value = body.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= const.MAX_NODE_ID_LEN:
        raise WireError(f"field {key} is not a node id")
    return NodeId(value)


def _addr(body: dict[str, Any], key: str) -> Addr:
    value = body.get(key)
    if not isinstance(value, list) or len(value) != 2:
        raise WireError(f"field {key} is not an address")
    host, port = value
    if not isinstance(host, str) or not 0 < len(host) <= const.MAX_STR_LEN:
        raise WireError(f"field {key} host invalid")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise WireError(f"field {key} port invalid")
    return (host, port)


def _record(value: object) -> NodeRecord:
    body = _map(value, "record")
    return NodeRecord(
        node_id=_node_id(body, "n"),
        incarnation=_int(body, "i", 0, const.MAX_INCARNATION),
        addr=_addr(body, "a"),
        public_key=_bytes(body, "k", 32, 32),
        state=_bytes(body, "m", 0, const.MAX_STATE_BYTES),
        signature=_bytes(body, "s", 64, 64),
    )


def _decode_one(obj: Any, *, allow_compound: bool, max_bytes: int) -> list[Message]:
    if not isinstance(obj, list) or len(obj) != 2:
        raise WireError("message is not [type, body]")
    raw_type, raw_body = obj
    if isinstance(raw_type, bool) or not isinstance(raw_type, int):
        raise WireError("message type is not an integer")
    try:
        mtype = MessageType(raw_type)
    except ValueError as err:
        raise WireError(f"unknown message type {raw_type}") from err
    body = _map(raw_body, "body")
    if mtype is MessageType.PING:
        return [Ping(seq=_int(body, "q", 0, const.MAX_SEQ), target=_node_id(body, "t"))]
    if mtype is MessageType.INDIRECT_PING:
        return [
            IndirectPing(
                seq=_int(body, "q", 0, const.MAX_SEQ),
                target=_node_id(body, "t"),
                target_addr=_addr(body, "a"),
                nack=_bool(body, "k"),
            )
        ]
    if mtype is MessageType.ACK:
        return [Ack(seq=_int(body, "q", 0, const.MAX_SEQ))]
    if mtype is MessageType.NACK:
        return [Nack(seq=_int(body, "q", 0, const.MAX_SEQ))]
    if mtype is MessageType.SUSPECT or mtype is MessageType.DEAD:
        cls = Suspect if mtype is MessageType.SUSPECT else Dead
        return [
            cls(
                node=_node_id(body, "n"),
                incarnation=_int(body, "i", 0, const.MAX_INCARNATION),
                source=_node_id(body, "f"),
            )
        ]
    if mtype is MessageType.ALIVE:
        return [Alive(record=_record(body.get("r")))]
    if mtype is MessageType.LEAVE:
        return [
            Leave(
                node=_node_id(body, "n"),
                incarnation=_int(body, "i", 0, const.MAX_INCARNATION),
                signature=_bytes(body, "s", 64, 64),
            )
        ]
    if mtype is MessageType.PUSH_PULL:
        raw_entries = body.get("m")
        if not isinstance(raw_entries, list) or len(raw_entries) > const.MAX_PUSH_PULL_MEMBERS:
            raise WireError("push-pull entries invalid")
        entries = []
        for raw in raw_entries:
            e = _map(raw, "entry")
            try:
                state = MemberState(_int(e, "s", 0, 255))
            except ValueError as err:
                raise WireError("unknown member state") from err
            leave_sig = _bytes(e, "l", 64, 64) if "l" in e else None
            entries.append(
                PushPullEntry(
                    record=_record(e.get("r")),
                    state=state,
                    incarnation=_int(e, "i", 0, const.MAX_INCARNATION),
                    leave_signature=leave_sig,
                )
            )
        return [PushPull(join=_bool(body, "j"), entries=tuple(entries))]
    if mtype is MessageType.COMPOUND:
        if not allow_compound:
            raise WireError("nested compound")
        parts = body.get("p")
        if not isinstance(parts, list) or len(parts) > const.MAX_COMPOUND_PARTS:
            raise WireError("compound parts invalid")
        out: list[Message] = []
        for part in parts:
            if not isinstance(part, bytes):
                raise WireError("compound part is not bytes")
            out.extend(_decode_one(_unpack(part, max_bytes), allow_compound=False, max_bytes=max_bytes))
        return out
    raise WireError(f"unsupported message type {mtype.name}")


def decode_messages(data: bytes, *, max_bytes: int = const.MAX_UDP_PACKET_BYTES) -> list[Message]:
    """Decode a plaintext packet or frame (one message or a COMPOUND) or raise WireError."""
    return _decode_one(_unpack(data, max_bytes), allow_compound=True, max_bytes=max_bytes)
