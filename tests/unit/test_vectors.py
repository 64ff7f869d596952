"""VectorIndex: exact top-k equals brute force, strict per-user partitions, growth and removal."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mongarsd.errors import ValidationError
from mongarsd.memory import vectors
from mongarsd.memory.vectors import VectorIndex, from_blob, to_blob

DIM = 16


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    m = rng.standard_normal((n, DIM)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_search_matches_brute_force_across_growth() -> None:
    rng = np.random.default_rng(1)
    idx = VectorIndex(DIM)
    data = _unit(rng, 1000)  # grows 64 -> 1024 rows by doubling
    for start in range(0, 1000, 97):
        chunk = range(start, min(start + 97, 1000))
        idx.add("alice", list(chunk), data[list(chunk)])
    q = _unit(rng, 1)[0]
    hits = idx.search("alice", q, 10)
    expected = np.argsort(-(data @ q))[:10]
    assert [h.id for h in hits] == expected.tolist()
    assert hits[0].score == pytest.approx(float(data[expected[0]] @ q), rel=1e-5)
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))


def test_search_crosses_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vectors, "SEARCH_CHUNK_ROWS", 7)
    rng = np.random.default_rng(2)
    data = _unit(rng, 50)
    idx = VectorIndex(DIM)
    idx.add("u", list(range(50)), data)
    q = data[33]
    assert idx.search("u", q, 1)[0].id == 33
    assert [h.id for h in idx.search("u", q, 50)] == np.argsort(-(data @ q)).tolist()


def test_users_never_see_each_other() -> None:
    rng = np.random.default_rng(3)
    a, b = _unit(rng, 20), _unit(rng, 20)
    idx = VectorIndex(DIM)
    idx.add("alice", list(range(20)), a)
    idx.add("bob", list(range(100, 120)), b)
    # Bob's exact vector as the query: Alice's search must still return only Alice's ids.
    assert {h.id for h in idx.search("alice", b[0], 50)} == set(range(20))
    assert idx.search("bob", b[0], 1)[0].id == 100
    assert idx.search("carol", a[0], 5) == []


def test_remove_moves_last_row_and_keeps_results_exact() -> None:
    rng = np.random.default_rng(4)
    data = _unit(rng, 30)
    idx = VectorIndex(DIM)
    idx.add("u", list(range(30)), data)
    for gone in (0, 29, 15):
        assert idx.remove(gone)
    assert not idx.remove(15)
    assert len(idx) == 27 and idx.count("u") == 27
    keep = [i for i in range(30) if i not in (0, 29, 15)]
    q = data[5]
    assert [h.id for h in idx.search("u", q, 27)] == [keep[i] for i in np.argsort(-(data[keep] @ q))]


def test_readd_replaces_vector_and_moves_owner() -> None:
    rng = np.random.default_rng(5)
    v = _unit(rng, 2)
    idx = VectorIndex(DIM)
    idx.add("u", [1], v[:1])
    idx.add("u", [1], v[1:])
    assert idx.count("u") == 1
    assert idx.search("u", v[1], 1)[0].score == pytest.approx(1.0, abs=1e-5)
    idx.add("w", [1], v[1:])
    assert idx.count("u") == 0 and idx.count("w") == 1


def test_rejects_bad_shapes_and_non_finite() -> None:
    idx = VectorIndex(DIM)
    with pytest.raises(ValidationError):
        idx.add("u", [1], np.zeros((1, DIM + 1), np.float32))
    with pytest.raises(ValidationError):
        idx.search("u", np.zeros(DIM - 1, np.float32), 1)
    bad = np.zeros((1, DIM), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ValidationError):
        idx.add("u", [1], bad)


def test_blob_roundtrip_and_wrong_length() -> None:
    v = np.arange(DIM, dtype=np.float32) / DIM
    blob = to_blob(v)
    assert len(blob) == DIM * 4
    back = from_blob(blob, DIM)
    assert back is not None and np.array_equal(back, v)
    assert from_blob(blob[:-4], DIM) is None


def test_reserve_sizes_partition_exactly() -> None:
    rng = np.random.default_rng(6)
    idx = VectorIndex(DIM)
    idx.reserve("u", 100)
    idx.add("u", list(range(100)), _unit(rng, 100))
    assert idx.nbytes() == 100 * (DIM * 4 + 8)  # no doubling slack
    idx.add("u", [100], _unit(rng, 1))
    assert idx.nbytes() == 200 * (DIM * 4 + 8)
