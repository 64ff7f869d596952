"""Lifeguard dynamic suspicion: the timeout shrinks as independent confirmations arrive.

timeout(c) = max(min_s, max_s - (max_s - min_s) * log(c + 1) / log(k + 1)) where c is the
number of distinct confirmers so far and k the number expected (Lifeguard §IV-B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mongarsd.mesh.wire import NodeId


def suspicion_bounds(*, suspicion_mult: float, max_timeout_mult: float, n_members: int, probe_interval_s: float) -> tuple[float, float]:
    """Return (min, max) suspicion timeouts for a cluster of `n_members` (memberlist rules)."""
    node_scale = max(1.0, math.log10(max(1, n_members)))
    min_s = suspicion_mult * node_scale * probe_interval_s
    return min_s, min_s * max_timeout_mult


def expected_confirmations(*, suspicion_mult: int, n_members: int) -> int:
    """Return k, the confirmations worth waiting for (none in tiny clusters)."""
    k = suspicion_mult - 2
    # n - 2: neither the suspect nor ourselves can confirm
    return k if n_members - 2 >= k else 0


def suspicion_timeout(*, confirmations: int, k: int, min_s: float, max_s: float) -> float:
    """Return the suspicion timeout after `confirmations` independent confirmations."""
    if k <= 0:
        return min_s
    frac = math.log(confirmations + 1) / math.log(k + 1)
    return max(min_s, max_s - (max_s - min_s) * frac)


@dataclass(slots=True)
class Suspicion:
    """One running suspicion: start time, incarnation and distinct confirmers."""

    node: NodeId
    incarnation: int
    origin: NodeId  # the first accuser; not counted as a confirmation
    started_at: float
    k: int
    min_s: float
    max_s: float
    confirmers: set[NodeId] = field(default_factory=set)

    def confirm(self, source: NodeId) -> bool:
        """Count a confirmation; return True if `source` is new (worth re-gossiping)."""
        if source == self.origin or source in self.confirmers or len(self.confirmers) >= self.k:
            return False
        self.confirmers.add(source)
        return True

    def deadline(self) -> float:
        """Return the time at which the suspect is declared dead."""
        return self.started_at + suspicion_timeout(confirmations=len(self.confirmers), k=self.k, min_s=self.min_s, max_s=self.max_s)
