"""The Evolution Engine's one-sided Mann-Whitney U test against enumeration and table values."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from mongarsd.maintenance.stats import EXACT_MAX_PAIRS, mann_whitney_greater, median, u_distribution, u_statistic


def brute_force_p(x: list[float], y: list[float]) -> float:
    """P(U >= U_observed) under H0 by enumerating every split of the pooled values (exact, ties included)."""
    pooled = x + y
    observed = u_statistic(x, y)
    n1 = len(x)
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), n1):
        chosen = set(idx)
        a = [pooled[i] for i in idx]
        b = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        total += 1
        hits += u_statistic(a, b) >= observed - 1e-12
    return hits / total


@pytest.mark.parametrize(("n1", "n2"), [(1, 1), (2, 3), (3, 3), (4, 5), (5, 5), (6, 4), (7, 7)])
def test_u_distribution_counts_every_interleaving(n1: int, n2: int) -> None:
    dist = u_distribution(n1, n2)
    assert len(dist) == n1 * n2 + 1
    assert sum(dist) == math.comb(n1 + n2, n1)
    assert dist == dist[::-1]  # U is symmetric about n1*n2/2 under H0
    # against enumeration of which ranks the first sample takes
    counts = [0] * (n1 * n2 + 1)
    for ranks in itertools.combinations(range(n1 + n2), n1):
        counts[sum(ranks) - n1 * (n1 - 1) // 2] += 1
    assert tuple(counts) == dist


def test_table_values_for_five_and_five() -> None:
    # Mann-Whitney tables, n1 = n2 = 5: P(U <= 4) = 12/252 = 0.0476 (the one-sided 5% critical value), P(U <= 5) = 19/252
    dist = u_distribution(5, 5)
    assert sum(dist[:5]) == 12
    assert sum(dist[:6]) == 19
    assert dist[0] == 1 and dist[1] == 1 and dist[2] == 2 and dist[3] == 3 and dist[4] == 5


def test_perfect_separation_gives_the_smallest_exact_p() -> None:
    result = mann_whitney_greater([4.0, 5.0, 6.0], [1.0, 2.0, 3.0])
    assert result.exact
    assert result.u == 9.0
    assert result.p == pytest.approx(1 / 20)
    five = mann_whitney_greater([10.0, 11, 12, 13, 14], [1.0, 2, 3, 4, 5])
    assert five.p == pytest.approx(1 / 252)
    worse = mann_whitney_greater([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert worse.u == 0.0 and worse.p == pytest.approx(1.0)


def test_textbook_example() -> None:
    # SciPy's documentation example (males vs females): U1 = 17; two-sided exact p = 0.1111, so one-sided = 7/126
    males = [19.0, 22.0, 16.0, 29.0, 24.0]
    females = [20.0, 11.0, 17.0, 12.0]
    result = mann_whitney_greater(males, females)
    assert result.u == 17.0
    assert result.exact
    assert result.p == pytest.approx(7 / 126)
    assert 2 * result.p == pytest.approx(0.1111, abs=1e-4)


def test_exact_matches_enumeration_on_random_samples() -> None:
    rng = random.Random(7)
    for _ in range(30):
        n1, n2 = rng.randint(2, 6), rng.randint(2, 6)
        x = [rng.random() + rng.choice((0.0, 0.3)) for _ in range(n1)]
        y = [rng.random() for _ in range(n2)]
        result = mann_whitney_greater(x, y)
        assert result.exact
        assert result.p == pytest.approx(brute_force_p(x, y))


def test_ties_use_the_corrected_normal_approximation_close_to_the_permutation_p() -> None:
    x = [3.0, 4, 4, 5, 5, 5, 6, 7]
    y = [1.0, 2, 3, 3, 4, 4, 5, 2]
    result = mann_whitney_greater(x, y)
    assert not result.exact
    # by hand: U = 4 (x=3) + 2 * 6 (x=4) + 3 * 7.5 (x=5) + 8 + 8 = 54.5;
    # tied groups 2 (x2), 3 (x3), 4 (x4), 5 (x4): sum(t^3 - t) = 6 + 24 + 60 + 60 = 150
    assert result.u == 54.5
    n1 = n2 = 8
    n = 16
    var = n1 * n2 / 12 * ((n + 1) - 150 / (n * (n - 1)))
    z = (54.5 - 32 - 0.5) / math.sqrt(var)
    assert result.p == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    assert result.p == pytest.approx(brute_force_p(x, y), abs=0.01)


def test_large_samples_without_ties_use_the_approximation() -> None:
    x = [float(i) + 0.5 for i in range(25)]
    y = [float(i) for i in range(25)]
    assert EXACT_MAX_PAIRS < 25 * 25
    result = mann_whitney_greater(x, y)
    assert not result.exact
    assert 0.3 < result.p < 0.5  # nearly identical samples: no evidence


def test_all_tied_is_no_evidence() -> None:
    assert mann_whitney_greater([2.0, 2.0, 2.0], [2.0, 2.0, 2.0]).p == 1.0


@pytest.mark.parametrize(("x", "y"), [([], [1.0]), ([1.0], []), ([math.nan], [1.0]), ([1.0], [math.inf])])
def test_bad_samples_are_refused(x: list[float], y: list[float]) -> None:
    with pytest.raises(ValueError, match="sample"):
        mann_whitney_greater(x, y)


def test_median() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        median([])
