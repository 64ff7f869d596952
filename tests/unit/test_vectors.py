"""VectorIndex: exact top-k equals brute force, strict per-user partitions, growth and removal."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mongarsd.errors import ValidationError
from mongarsd.memory import coarse, vectors
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


# ---- 4-bit copies of large partitions (coarse.py): real ONNX Runtime sessions, small sizes ----

CDIM = 64  # two 32-value blocks


def _clustered(rng: np.random.Generator, n: int, topics: int = 40, noise: float = 0.6) -> np.ndarray:
    centers = rng.standard_normal((topics, CDIM)).astype(np.float32)
    m = centers[rng.integers(0, topics, n)] + noise * rng.standard_normal((n, CDIM)).astype(np.float32)
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


def _exact_top(data: dict[int, np.ndarray], q: np.ndarray, k: int) -> list[int]:
    ids = np.fromiter(data, dtype=np.int64)
    mat = np.stack([data[i] for i in ids.tolist()])
    return ids[np.argsort(-(mat @ q), kind="stable")[:k]].tolist()


def _copy_index(rng: np.random.Generator, n: int) -> tuple[VectorIndex, dict[int, np.ndarray]]:
    data = _clustered(rng, n)
    idx = VectorIndex(CDIM, coarse_min_rows=1000)
    idx.add("u", list(range(n)), data)
    idx.maintain()
    idx.settle(timeout=60)
    return idx, {i: data[i] for i in range(n)}


def test_quantize_layout_and_error_bound() -> None:
    rng = np.random.default_rng(10)
    rows = _clustered(rng, 50)
    packed, scales = coarse.quantize(rows)
    assert packed.shape == (50, CDIM // 32, 16) and packed.dtype == np.uint8
    assert scales.shape == (50 * CDIM // 32,)
    q = np.empty((50, CDIM // 32, 32), dtype=np.int16)
    q[:, :, 0::2] = packed & 0x0F  # low nibble: even element
    q[:, :, 1::2] = packed >> 4
    back = ((q - 8) * scales.reshape(50, -1)[:, :, None]).reshape(50, CDIM)
    err = np.abs(back - rows).reshape(50, -1, 32).max(axis=2)
    assert np.all(err <= scales.reshape(50, -1) / 2 + 1e-6)


def test_session_scores_match_the_dequantized_rows() -> None:
    rng = np.random.default_rng(11)
    rows = _clustered(rng, 300)
    copy = coarse.build(np.arange(300, dtype=np.int64), rows)
    q = rows[7]
    packed, scales = coarse.quantize(rows)
    codes = np.empty((300, CDIM // 32, 32), dtype=np.int16)
    codes[:, :, 0::2] = packed & 0x0F
    codes[:, :, 1::2] = packed >> 4
    deq = ((codes - 8) * scales.reshape(300, -1)[:, :, None]).reshape(300, CDIM)
    got = copy.scores(q)
    assert got.shape == (300,)
    assert np.max(np.abs(got - deq @ q)) < 0.02  # int8 query in the kernel: small extra error
    assert int(np.argmax(got)) == 7


def test_copy_search_is_exact_on_clustered_data() -> None:
    rng = np.random.default_rng(12)
    idx, data = _copy_index(rng, 6000)
    try:
        assert idx.coarse_rows("u") == 6000 and idx.builds_total == 1
        queries = _clustered(rng, 50)
        for q in queries:
            hits = idx.search("u", q, 10)
            assert [h.id for h in hits] == _exact_top(data, q, 10)
            assert hits[0].score == pytest.approx(float(data[hits[0].id] @ q), abs=1e-5)  # exact rescoring
    finally:
        idx.close()


def test_rows_changed_after_the_copy_are_scored_exactly() -> None:
    rng = np.random.default_rng(13)
    idx, data = _copy_index(rng, 3000)
    try:
        q = _clustered(rng, 1)[0]
        idx.add("u", [5], q[None, :])  # replaced: now the best match, the copy holds the old vector
        data[5] = q
        idx.add("u", [9000], q[None, :])  # new: not in the copy at all
        data[9000] = q
        top = _exact_top(data, q, 10)
        idx.remove(top[2])
        del data[top[2]]
        assert idx.coarse_rows("u") == 3000  # below the rebuild threshold: same copy
        hits = idx.search("u", q, 10)
        assert {h.id for h in hits[:2]} == {5, 9000}  # equal vectors: either order
        assert [h.id for h in hits][2:] == _exact_top(data, q, 10)[2:]
    finally:
        idx.close()


def test_copy_is_rebuilt_once_enough_rows_changed() -> None:
    rng = np.random.default_rng(14)
    idx, data = _copy_index(rng, 2000)
    try:
        more = _clustered(rng, 1100)  # > max(1024, 5 %) changes
        idx.add("u", list(range(2000, 3100)), more)
        data.update({2000 + i: more[i] for i in range(1100)})
        idx.maintain()
        idx.settle(timeout=60)
        assert idx.builds_total == 2 and idx.coarse_rows("u") == 3100
        q = more[17]
        assert [h.id for h in idx.search("u", q, 10)] == _exact_top(data, q, 10)
    finally:
        idx.close()


def test_changes_while_a_copy_is_built_stay_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    gate = threading.Event()
    real_build = coarse.build

    def slow_build(ids: np.ndarray, rows: np.ndarray, **kw: object) -> coarse.CoarseCopy:
        assert gate.wait(30)
        return real_build(ids, rows)

    monkeypatch.setattr(coarse, "build", slow_build)
    rng = np.random.default_rng(15)
    n = 2500
    base = _clustered(rng, n)
    idx = VectorIndex(CDIM, coarse_min_rows=1000)
    try:
        idx.add("u", list(range(n)), base)
        data = {i: base[i] for i in range(n)}
        idx.maintain()  # the build starts and waits on the gate
        # Meanwhile: removals move the last rows into holes, replacements and inserts change rows.
        for victim in range(0, 400, 3):
            idx.remove(victim)
            del data[victim]
        fresh = _clustered(rng, 201)
        for j in range(200):
            idx.add("u", [10 + 3 * j + 1], fresh[j][None, :])
            data[10 + 3 * j + 1] = fresh[j]
        idx.add("u", [50_000], fresh[200][None, :])
        data[50_000] = fresh[200]
        gate.set()
        idx.settle(timeout=60)
        assert idx.coarse_rows("u") == n
        for q in list(fresh[:20]) + list(_clustered(rng, 20)):
            assert [h.id for h in idx.search("u", q, 10)] == _exact_top(data, q, 10)
    finally:
        gate.set()
        idx.close()


def test_failed_build_leaves_the_exact_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ids: np.ndarray, rows: np.ndarray, **kw: object) -> coarse.CoarseCopy:
        raise RuntimeError("no kernel")

    monkeypatch.setattr(coarse, "build", broken)
    rng = np.random.default_rng(16)
    data = _clustered(rng, 1500)
    idx = VectorIndex(CDIM, coarse_min_rows=1000)
    try:
        idx.add("u", list(range(1500)), data)
        idx.maintain()
        idx.settle(timeout=30)
        assert idx.build_failures_total == 1 and idx.coarse_rows("u") == 0
        idx.maintain()
        idx.settle(timeout=30)
        assert idx.build_failures_total == 1  # no retry loop: the next try waits RETRY_AFTER_S
        q = data[3]
        assert [h.id for h in idx.search("u", q, 10)] == np.argsort(-(data @ q), kind="stable")[:10].tolist()
    finally:
        idx.close()


def test_small_partitions_and_odd_dimensions_get_no_copy() -> None:
    rng = np.random.default_rng(17)
    idx = VectorIndex(DIM, coarse_min_rows=10)  # 16 values: not whole 32-value blocks
    idx.add("u", list(range(100)), _unit(rng, 100))
    idx.maintain()
    assert idx.coarse_rows("u") == 0
    idx.close()
    big = VectorIndex(CDIM, coarse_min_rows=1000)
    big.add("u", list(range(999)), _clustered(rng, 999))
    big.maintain()
    assert big.coarse_rows("u") == 0
    big.close()


def test_close_stops_the_build_thread() -> None:
    import threading

    rng = np.random.default_rng(18)
    idx, data = _copy_index(rng, 1200)
    idx.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("mongarsd-vectors")]
    q = data[4]
    assert idx.search("u", q, 1)[0].id == 4  # searches still work after close
    idx.add("u", [99_999], q[None, :])
    idx.maintain()  # closed: no new build
    assert idx.coarse_rows("u") == 1200
