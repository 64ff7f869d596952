"""Push-pull anti-entropy: full state exchange with one member over an encrypted TCP stream.

As memberlist's pushPull: on join, then every push_pull_interval (membership.py) with one
random live member, each side sends one sealed frame listing every member it knows, and
merges the other's. The initiator writes first; the responder merges before answering so
that its reply already carries any refutation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import structlog

from mongarsd.errors import MeshError, WireError
from mongarsd.mesh import const
from mongarsd.mesh.membership import Member
from mongarsd.mesh.security import Cipher, DropError, DropLog
from mongarsd.mesh.transport import Stream, Transport
from mongarsd.mesh.wire import Addr, Message, NodeId, PushPull, PushPullEntry, decode_messages, encode_message

log = structlog.get_logger("mongarsd.mesh.gossip")


def local_state(members: Mapping[NodeId, Member], *, join: bool) -> PushPull:
    """Return the push-pull message listing every member we know."""
    entries = tuple(
        PushPullEntry(record=m.record, state=m.state, incarnation=m.incarnation, leave_signature=m.leave_signature)
        for m in members.values()
    )
    return PushPull(join=join, entries=entries)


def seal_frame(cipher: Cipher, msg: Message) -> bytes:
    return cipher.seal(encode_message(msg), max_bytes=const.MAX_TCP_FRAME_BYTES)


def open_frame(cipher: Cipher, frame: bytes) -> PushPull:
    """Decrypt and decode one stream frame; DropError/WireError unless it is one push-pull."""
    plaintext = cipher.open(frame, max_bytes=const.MAX_TCP_FRAME_BYTES)
    msgs = decode_messages(plaintext, max_bytes=const.MAX_TCP_FRAME_BYTES)
    if len(msgs) != 1 or not isinstance(msgs[0], PushPull):
        raise DropError("malformed", "stream frame is not a push-pull")
    return msgs[0]


class AntiEntropy:
    """One node's push-pull exchanges, as initiator and as responder (loop-only).

    The cipher is passed per exchange: the node owns it (one cipher for packets and streams).
    """

    def __init__(
        self,
        *,
        transport: Transport,
        members: Mapping[NodeId, Member],
        merge: Callable[[PushPull, Addr], None],
        drops: DropLog,
        timeout_s: float,
    ) -> None:
        self._transport = transport
        self._members = members
        self._merge = merge
        self._drops = drops
        self._timeout_s = timeout_s
        self.ok = 0
        self.failed = 0

    async def async_push_pull(self, cipher: Cipher, addr: Addr, *, join: bool) -> None:
        """Exchange full state with the node at `addr`; raise MeshError on failure."""
        try:
            async with asyncio.timeout(self._timeout_s):
                stream = await self._transport.async_open_stream(addr)
                try:
                    await stream.async_write_frame(seal_frame(cipher, local_state(self._members, join=join)))
                    remote = open_frame(cipher, await stream.async_read_frame(const.MAX_TCP_FRAME_BYTES))
                finally:
                    await stream.async_close()
        except DropError as err:
            self.failed += 1
            self._drops.record(err.reason, f"{addr[0]}:{addr[1]}", str(err))
            raise MeshError(f"push-pull rejected: {err.reason}") from err
        except (MeshError, TimeoutError) as err:
            self.failed += 1
            raise MeshError(f"push-pull with {addr[0]}:{addr[1]} failed") from err
        self.ok += 1
        self._merge(remote, addr)

    async def async_answer(self, cipher: Cipher, stream: Stream) -> None:
        """Answer a push-pull opened by a peer; drop (and count) anything invalid."""
        peer = f"{stream.peer[0]}:{stream.peer[1]}"
        try:
            async with asyncio.timeout(self._timeout_s):
                remote = open_frame(cipher, await stream.async_read_frame(const.MAX_TCP_FRAME_BYTES))
                # Merge before answering so our reply already carries refutations.
                self._merge(remote, stream.peer)
                await stream.async_write_frame(seal_frame(cipher, local_state(self._members, join=False)))
        except DropError as err:
            self._drops.record(err.reason, peer, str(err))
        except WireError as err:
            self._drops.record("malformed", peer, str(err))
        except (MeshError, TimeoutError) as err:
            log.debug("mesh_stream_failed", peer=peer, error=repr(err))
