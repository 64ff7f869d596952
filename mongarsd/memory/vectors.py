"""In-RAM exact cosine index over L2-normalized float32 vectors, partitioned by user.

Each user owns one contiguous matrix (grown by doubling), so a search reads only the
caller's rows: isolation is structural (another user's vectors are never scored) and a
top-k is one matrix-vector product over a contiguous slice plus an argpartition. Rows are
removed by moving the last row into the hole (O(1)); ids map to rows through a dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mongarsd.errors import ValidationError

INITIAL_ROWS = 64
SEARCH_CHUNK_ROWS = 16384  # bounded scratch memory and cache-friendly blocks

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Hit:
    id: int
    score: float


class _Shard:
    """One user's vectors: ids[:n] and mat[:n] are live, the rest is spare capacity."""

    __slots__ = ("ids", "mat", "n", "pos")

    def __init__(self, dim: int, capacity: int = INITIAL_ROWS) -> None:
        self.ids: I64 = np.zeros(capacity, dtype=np.int64)
        self.mat: F32 = np.zeros((capacity, dim), dtype=np.float32)
        self.n = 0
        self.pos: dict[int, int] = {}

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
        last = self.n - 1
        if row != last:
            moved = int(self.ids[last])
            self.ids[row] = moved
            self.mat[row] = self.mat[last]
            self.pos[moved] = row
        self.n = last
        return True

    def search(self, query: F32, k: int) -> list[Hit]:
        n = self.n
        if n == 0 or k <= 0:
            return []
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


class VectorIndex:
    """Exact top-k cosine search per user over unit vectors held in RAM (loop-only, not thread-safe)."""

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError("dim must be positive")
        self.dim = dim
        self._shards: dict[str, _Shard] = {}
        self._owner: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def count(self, user: str) -> int:
        shard = self._shards.get(user)
        return shard.n if shard is not None else 0

    def nbytes(self) -> int:
        """Bytes held by the matrices and id arrays (capacity included)."""
        return sum(s.mat.nbytes + s.ids.nbytes for s in self._shards.values())

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
