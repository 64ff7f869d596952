"""Piggybacked broadcasts: memberlist's TransmitLimitedQueue and how it fills UDP packets.

Every membership change (alive, suspect, dead, leave) is queued once per node, a newer one
replacing the older, and sent retransmit_limit(mult, n) = mult * ceil(log10(n + 1)) times
(membership.py), fewest transmissions first: piggybacked on every outgoing packet with room
left, and in the packets of each gossip round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mongarsd.mesh import const
from mongarsd.mesh.membership import retransmit_limit
from mongarsd.mesh.wire import COMPOUND_FIXED_OVERHEAD_BYTES, NodeId, compound_overhead


def packet_budget(parts: Sequence[bytes] = ()) -> int:
    """Return the bytes left for broadcasts in one UDP packet already carrying `parts`."""
    return (
        const.MAX_UDP_PACKET_BYTES
        - const.ENVELOPE_OVERHEAD_BYTES
        - COMPOUND_FIXED_OVERHEAD_BYTES
        - sum(compound_overhead(len(p)) for p in parts)
    )


@dataclass(slots=True)
class _Broadcast:
    key: NodeId
    payload: bytes
    transmits: int = 0


class BroadcastQueue:
    """Transmit-limited broadcasts; a newer one about the same node replaces the older."""

    def __init__(self, *, retransmit_mult: int, n_nodes: Callable[[], int], max_items: int = const.BROADCAST_QUEUE_MAX) -> None:
        self._items: dict[NodeId, _Broadcast] = {}
        self._retransmit_mult = retransmit_mult
        self._n_nodes = n_nodes  # live members now: the limit grows with the cluster
        self._max_items = max_items
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def transmit_limit(self) -> int:
        """Return how many times each broadcast is sent in a cluster of the current size."""
        return retransmit_limit(self._retransmit_mult, self._n_nodes())

    def queue(self, key: NodeId, payload: bytes) -> None:
        self._items.pop(key, None)
        if len(self._items) >= self._max_items:
            # drop the most transmitted (least useful) item
            worst = max(self._items.values(), key=lambda b: b.transmits)
            del self._items[worst.key]
            self.dropped += 1
        self._items[key] = _Broadcast(key, payload)

    def take(self, budget: int, limit: int) -> list[bytes]:
        """Return broadcasts fitting in `budget` bytes, fewest transmissions first."""
        out: list[bytes] = []
        for b in sorted(self._items.values(), key=lambda b: b.transmits):
            cost = compound_overhead(len(b.payload))
            if cost > budget:
                continue
            budget -= cost
            out.append(b.payload)
            b.transmits += 1
            if b.transmits >= limit:
                del self._items[b.key]
            if budget < 8 or len(out) >= const.MAX_COMPOUND_PARTS - 1:
                break
        return out

    def piggyback(self, parts: list[bytes]) -> None:
        """Append to a packet's `parts` the broadcasts that fit in the rest of it."""
        budget = packet_budget(parts)
        if budget > 0:
            parts.extend(self.take(budget, self.transmit_limit()))
