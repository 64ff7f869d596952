"""The one-sided Mann-Whitney U test the Evolution Engine adopts settings by (pure, no SciPy).

H0: candidate and baseline samples come from the same distribution; H1: the candidate's values
tend to be larger. U counts the (candidate, baseline) pairs where the candidate is larger, ties
counting one half (Mann and Whitney 1947). Small samples without ties get the exact p-value,
from the null distribution of U counted by dynamic programming over the ways to interleave the
two samples; otherwise the normal approximation with the tie-corrected variance and a
continuity correction (as in SciPy's `method="asymptotic"`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Final

EXACT_MAX_PAIRS: Final = 400  # n1 * n2 up to this (20 x 20): exact p from the full null distribution


@dataclass(frozen=True, slots=True)
class MannWhitneyResult:
    """U of the first sample, the one-sided p-value (H1: first sample larger), and how p was found."""

    u: float
    p: float
    exact: bool


@cache
def u_distribution(n1: int, n2: int) -> tuple[int, ...]:
    """Return how many of the C(n1+n2, n1) interleavings give U = 0, 1, ..., n1*n2 (pure).

    Recurrence on the largest value: it belongs to the first sample (adding n2 to U) or to the
    second (adding nothing): f(n1, n2, u) = f(n1-1, n2, u-n2) + f(n1, n2-1, u).
    """
    if n1 < 0 or n2 < 0:
        raise ValueError("sample sizes must be >= 0")
    # rows[j][u] for the current n1 and every n2' = j <= n2
    rows = [[1] for _ in range(n2 + 1)]  # n1 = 0: U is 0 in exactly one way
    for i in range(1, n1 + 1):
        new: list[list[int]] = []
        for j in range(n2 + 1):
            counts = [0] * (i * j + 1)
            prev_i = rows[j]  # f(i-1, j, .)
            for u, c in enumerate(prev_i):
                counts[u + j] += c
            if j > 0:
                for u, c in enumerate(new[j - 1]):  # f(i, j-1, .)
                    counts[u] += c
            new.append(counts)
        rows = new
    return tuple(rows[n2])


def u_statistic(x: Sequence[float], y: Sequence[float]) -> float:
    """Return U of `x`: pairs with x > y, plus one half per tie (pure)."""
    u = 0.0
    for a in x:
        for b in y:
            if a > b:
                u += 1.0
            elif a == b:
                u += 0.5
    return u


def _tie_sizes(values: Sequence[float]) -> list[int]:
    counts: dict[float, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return [c for c in counts.values() if c > 1]


def mann_whitney_greater(x: Sequence[float], y: Sequence[float]) -> MannWhitneyResult:
    """One-sided Mann-Whitney U test of "x tends to be larger than y" (pure).

    ValueError when a sample is empty or holds a value that is not finite.
    """
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples need at least one value")
    if not all(math.isfinite(v) for v in (*x, *y)):
        raise ValueError("samples must be finite numbers")
    u = u_statistic(x, y)
    ties = _tie_sizes([*x, *y])
    if not ties and n1 * n2 <= EXACT_MAX_PAIRS:
        dist = u_distribution(n1, n2)
        total = math.comb(n1 + n2, n1)
        at_least = sum(dist[int(u) :])
        return MannWhitneyResult(u=u, p=min(1.0, at_least / total), exact=True)
    n = n1 + n2
    tie_term = sum(t**3 - t for t in ties) / (n * (n - 1)) if n > 1 else 0.0
    variance = n1 * n2 / 12.0 * ((n + 1) - tie_term)
    if variance <= 0.0:
        return MannWhitneyResult(u=u, p=1.0, exact=False)  # every value tied: no evidence either way
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(variance)
    return MannWhitneyResult(u=u, p=min(1.0, 0.5 * math.erfc(z / math.sqrt(2.0))), exact=False)


def median(values: Sequence[float]) -> float:
    """Return the median (ValueError when empty) (pure)."""
    if not values:
        raise ValueError("median of no values")
    s = sorted(values)
    mid = len(s) // 2
    return float(s[mid]) if len(s) % 2 else (s[mid - 1] + s[mid]) / 2.0
