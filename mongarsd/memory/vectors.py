"""In-RAM cosine index over L2-normalized float32 vectors, partitioned by user.

Each user owns one contiguous matrix (grown by doubling), so a search reads only the
caller's rows: isolation is structural (another user's vectors are never scored) and a
top-k is one matrix-vector product over a contiguous slice plus an argpartition. Rows are
removed by moving the last row into the hole (O(1)); ids map to rows through a dict.

A partition of `COARSE_MIN_ROWS` rows or more also gets a 4-bit copy (`coarse.py`), built
in the index's worker thread: a search scores that copy in one pass (a sixth of the bytes),
then rescores its best candidates and every row changed since the copy exactly in float32.
The copy is rebuilt once `REBUILD_FRACTION` of the rows changed; until it exists, and for
smaller partitions, the scan is exact.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import structlog

from mongarsd.errors import ValidationError
from mongarsd.memory import coarse
from mongarsd.memory.coarse import CoarseCopy

log = structlog.get_logger("mongarsd.memory.vectors")

INITIAL_ROWS = 64
SEARCH_CHUNK_ROWS = 16384  # bounded scratch memory and cache-friendly blocks
COARSE_MIN_ROWS = 20000  # below this an exact scan takes a few ms: no 4-bit copy
CANDIDATES_PER_K = 32  # rows of the 4-bit copy rescored exactly per requested hit
CANDIDATES_MIN = 256
REBUILD_FRACTION = 0.05  # rebuild the copy once this share of the rows changed since it
REBUILD_MIN_CHANGES = 1024
RETRY_AFTER_S = 600.0  # after a failed build (ONNX Runtime without MatMulNBits, no memory)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Hit:
    id: int
    score: float


class _Shard:
    """One user's vectors: ids[:n] and mat[:n] are live, the rest is spare capacity.

    With a 4-bit copy, `dirty` holds the ids whose vector the copy does not hold (inserted or
    replaced since its build began); while a build runs, `during` collects the same for the
    copy being built, plus rows moved under the builder.
    """

    __slots__ = ("build", "coarse", "dirty", "during", "ids", "mat", "n", "pos", "removed", "removed_during", "retry_at")

    def __init__(self, dim: int, capacity: int = INITIAL_ROWS) -> None:
        self.ids: I64 = np.zeros(capacity, dtype=np.int64)
        self.mat: F32 = np.zeros((capacity, dim), dtype=np.float32)
        self.n = 0
        self.pos: dict[int, int] = {}
        self.coarse: CoarseCopy | None = None
        self.build: Future[CoarseCopy] | None = None
        self.dirty: dict[int, None] = {}
        self.during: dict[int, None] = {}
        self.removed = 0  # rows removed since the copy's build began
        self.removed_during = 0
        self.retry_at = 0.0  # monotonic time before which no build starts (after a failure)

    def _changed(self, memory_id: int) -> None:
        if self.coarse is not None:
            self.dirty[memory_id] = None
        if self.build is not None:
            self.during[memory_id] = None

    def changes(self) -> int:
        """Rows changed since the current copy (or all rows without one)."""
        return self.n if self.coarse is None else len(self.dirty) + self.removed

    def reserve(self, rows: int) -> None:
        cap = self.mat.shape[0]
        if rows <= cap:
            return
        while cap < rows:
            cap *= 2
        ids = np.zeros(cap, dtype=np.int64)
        ids[: self.n] = self.ids[: self.n]
        mat = np.zeros((cap, self.mat.shape[1]), dtype=np.float32)
        mat[: self.n] = self.mat[: self.n]
        self.ids, self.mat = ids, mat

    def put(self, ids: Sequence[int], vecs: F32) -> None:
        new = [(i, v) for i, v in zip(ids, vecs, strict=True)]
        fresh = [(i, v) for i, v in new if i not in self.pos]
        for i, v in new:
            row = self.pos.get(i)
            if row is not None:
                self.mat[row] = v
                self._changed(i)
        for i, _ in fresh:
            self._changed(i)
        if not fresh:
            return
        self.reserve(self.n + len(fresh))
        start = self.n
        self.ids[start : start + len(fresh)] = [i for i, _ in fresh]
        self.mat[start : start + len(fresh)] = np.stack([v for _, v in fresh])
        for k, (i, _) in enumerate(fresh):
            self.pos[i] = start + k
        self.n += len(fresh)

    def remove(self, memory_id: int) -> bool:
        row = self.pos.pop(memory_id, None)
        if row is None:
            return False
        self.dirty.pop(memory_id, None)
        self.during.pop(memory_id, None)
        self.removed += 1
        if self.build is not None:
            self.removed_during += 1
        last = self.n - 1
        if row != last:
            moved = int(self.ids[last])
            self.ids[row] = moved
            self.mat[row] = self.mat[last]
            self.pos[moved] = row
            if self.build is not None:
                self.during[moved] = None  # the builder may have read either row
        self.n = last
        return True

    def search(self, query: F32, k: int) -> list[Hit]:
        n = self.n
        if n == 0 or k <= 0:
            return []
        copy = self.coarse
        if copy is not None and k * CANDIDATES_PER_K * 2 < n:
            return self._search_coarse(copy, query, k)
        scores = np.empty(n, dtype=np.float32)
        for lo in range(0, n, SEARCH_CHUNK_ROWS):
            hi = min(lo + SEARCH_CHUNK_ROWS, n)
            # einsum, not np.dot: a single-threaded SIMD loop. OpenBLAS's sgemv spins up its own
            # thread pool, which fights llama.cpp's threads for the same cores (10x p95 under load).
            np.einsum("ij,j->i", self.mat[lo:hi], query, out=scores[lo:hi])
        k = min(k, n)
        top = np.argpartition(scores, n - k)[n - k :] if k < n else np.arange(n)
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(int(self.ids[r]), float(scores[r])) for r in top]

    def _search_coarse(self, copy: CoarseCopy, query: F32, k: int) -> list[Hit]:
        """Candidates from the 4-bit copy plus every changed row, rescored exactly."""
        approx = copy.scores(query)
        m = len(approx)
        c = min(m, max(CANDIDATES_MIN, k * CANDIDATES_PER_K))
        cand = np.argpartition(approx, m - c)[m - c :] if c < m else np.arange(m)
        dirty = self.dirty
        changed = tuple(dirty)  # one atomic copy: the loop may add to it while a worker thread searches
        pos = self.pos
        rows = [r for i in copy.ids[cand].tolist() if i not in dirty and (r := pos.get(i)) is not None]
        rows.extend(r for i in changed if (r := pos.get(i)) is not None)
        live = np.unique(np.fromiter(rows, dtype=np.int64, count=len(rows)))
        live = live[live < self.n]
        if len(live) == 0:
            return []
        scores = np.einsum("ij,j->i", self.mat[live], query)
        k = min(k, len(live))
        top = np.argpartition(scores, len(live) - k)[len(live) - k :]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(int(self.ids[live[t]]), float(scores[t])) for t in top]


class VectorIndex:
    """Top-k cosine search per user over unit vectors held in RAM.

    Mutations and `maintain` belong to the event loop; `search` may also run in a worker thread.
    4-bit copies are built in the index's own worker thread when `maintain` finds them due (the
    owner calls it after loading and before searching); `close` stops that thread.
    """

    def __init__(self, dim: int, *, coarse_min_rows: int | None = None) -> None:
        if dim <= 0:
            raise ValueError("dim must be positive")
        self.dim = dim
        min_rows = COARSE_MIN_ROWS if coarse_min_rows is None else coarse_min_rows
        self.coarse_min_rows = min_rows if coarse.supported(dim) else 0  # 0: never a copy
        self._shards: dict[str, _Shard] = {}
        self._owner: dict[int, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self.builds_total = 0
        self.build_failures_total = 0

    def __len__(self) -> int:
        return len(self._owner)

    def count(self, user: str) -> int:
        shard = self._shards.get(user)
        return shard.n if shard is not None else 0

    def nbytes(self) -> int:
        """Bytes held by the matrices, id arrays (capacity included) and 4-bit copies."""
        return sum(s.mat.nbytes + s.ids.nbytes + (s.coarse.nbytes if s.coarse else 0) for s in self._shards.values())

    def coarse_rows(self, user: str) -> int:
        """Rows in `user`'s 4-bit copy (0 without one)."""
        shard = self._shards.get(user)
        return len(shard.coarse.ids) if shard is not None and shard.coarse is not None else 0

    def maintain(self) -> None:
        """Install finished 4-bit copies and start the builds that are due (event loop; cheap)."""
        if self._closed:
            return
        for user, shard in self._shards.items():
            if shard.build is not None and shard.build.done():
                self._install(user, shard)
            if shard.build is not None or time.monotonic() < shard.retry_at:
                continue
            if not self.coarse_min_rows or shard.n < self.coarse_min_rows:
                shard.coarse = None
                shard.dirty.clear()
                continue
            if shard.coarse is None or shard.changes() >= max(REBUILD_MIN_CHANGES, REBUILD_FRACTION * shard.n):
                self._start_build(shard)

    def settle(self, timeout: float | None = None) -> None:
        """Wait for running builds and install them (blocking: tests, benchmarks, start-up)."""
        self.maintain()
        for user, shard in list(self._shards.items()):
            if shard.build is not None:
                shard.build.exception(timeout)
                self._install(user, shard)

    def close(self) -> None:
        """Stop the build thread (blocking until a running build ends); searches stay possible."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _start_build(self, shard: _Shard) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mongarsd-vectors")
        n = shard.n
        ids = shard.ids[:n].copy()
        rows = shard.mat[:n]  # a view: later growth allocates a new matrix, moves are marked in `during`
        shard.during = {}
        shard.removed_during = 0
        shard.build = self._pool.submit(coarse.build, ids, rows)

    def _install(self, user: str, shard: _Shard) -> None:
        build, shard.build = shard.build, None
        assert build is not None
        err = None if build.cancelled() else build.exception()
        if build.cancelled() or err is not None:
            self.build_failures_total += 1
            shard.retry_at = time.monotonic() + RETRY_AFTER_S
            log.warning("vector_copy_failed", user_rows=shard.n, error=str(err) if err else "cancelled")
            shard.during = {}
            return
        copy = build.result()
        shard.coarse = copy
        shard.dirty, shard.during = shard.during, {}
        shard.removed, shard.removed_during = shard.removed_during, 0
        self.builds_total += 1
        log.info("vector_copy_built", rows=len(copy.ids), mb=round(copy.nbytes / 2**20, 1), build_s=round(copy.build_s, 2))

    def __contains__(self, memory_id: object) -> bool:
        return memory_id in self._owner

    def add(self, user: str, ids: Sequence[int], vectors: npt.ArrayLike) -> None:
        """Insert or replace vectors (one per id) in `user`'s partition."""
        vecs = self._check(vectors, len(ids))
        if len(ids) == 0:
            return
        for i in ids:
            owner = self._owner.get(i)
            if owner is not None and owner != user:
                # An id belongs to exactly one user; moving it is a delete then an insert.
                self._shards[owner].remove(i)
        shard = self._shards.get(user)
        if shard is None:
            shard = self._shards[user] = _Shard(self.dim)
        shard.put(list(ids), vecs)
        for i in ids:
            self._owner[i] = user

    def reserve(self, user: str, rows: int) -> None:
        """Pre-size `user`'s partition (e.g. to the row count at load) so it is not grown by doubling."""
        shard = self._shards.get(user)
        if shard is None:
            shard = self._shards[user] = _Shard(self.dim, max(rows, 1))
        shard.reserve(rows)

    def remove(self, memory_id: int) -> bool:
        owner = self._owner.pop(memory_id, None)
        if owner is None:
            return False
        shard = self._shards[owner]
        shard.remove(memory_id)
        if shard.n == 0:
            if shard.build is not None:
                shard.build.cancel()
            del self._shards[owner]
        return True

    def remove_many(self, ids: Iterable[int]) -> int:
        return sum(1 for i in ids if self.remove(i))

    def search(self, user: str, query: npt.ArrayLike, k: int) -> list[Hit]:
        """Return `user`'s k nearest vectors to `query`, best first (cosine = dot of unit vectors)."""
        q = self._check(query, None)
        shard = self._shards.get(user)
        if shard is None:
            return []
        return shard.search(q, k)

    def _check(self, arr: npt.ArrayLike, rows: int | None) -> F32:
        a = np.ascontiguousarray(arr, dtype=np.float32)
        if rows is None:
            if a.shape != (self.dim,):
                raise ValidationError(f"query vector must have shape ({self.dim},), got {a.shape}", param="vector")
        elif a.shape != (rows, self.dim):
            raise ValidationError(f"vectors must have shape ({rows}, {self.dim}), got {a.shape}", param="vector")
        if not np.all(np.isfinite(a)):
            raise ValidationError("vectors must be finite", param="vector")
        return a


def to_blob(vector: npt.ArrayLike) -> bytes:
    """Serialize one vector as little-endian float32 bytes (the SQLite BLOB format)."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes, dim: int) -> F32 | None:
    """Parse a BLOB written by to_blob; None if it does not hold exactly `dim` floats."""
    if len(blob) != dim * 4:
        return None
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)
