"""Lifeguard local health awareness: a score that stretches probe intervals and timeouts.

Lifeguard (Dadgar et al., 2018, "Local Health Multiplier"): a node that misses acks/nacks is
more likely slow itself than surrounded by dead peers, so it waits longer before accusing.
"""

from __future__ import annotations

from dataclasses import dataclass

from mongarsd.mesh import const


@dataclass(frozen=True, slots=True)
class Awareness:
    """Health score in [0, max_multiplier - 1]; 0 is healthy."""

    score: int = 0
    max_multiplier: int = const.AWARENESS_MAX_MULTIPLIER

    def apply(self, delta: int) -> Awareness:
        """Return the awareness after adding `delta`, clamped to the valid range."""
        score = min(max(self.score + delta, 0), self.max_multiplier - 1)
        return Awareness(score=score, max_multiplier=self.max_multiplier)

    def scale(self, duration_s: float) -> float:
        """Scale a probe interval or timeout by the current health (x1 .. x max)."""
        return duration_s * (self.score + 1)


def probe_delta(*, acked: bool, expected_nacks: int, nacks: int) -> int:
    """Return the awareness change after one probe round (Lifeguard LHM rules).

    Success lowers the score; a failed probe raises it by one for a direct-only probe, or by
    the number of indirect helpers that did not even send a nack (their silence says the
    problem is more likely on our side).
    """
    if acked:
        return -1
    if expected_nacks > 0:
        return max(expected_nacks - nacks, 0)
    return 1
