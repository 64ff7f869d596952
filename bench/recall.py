"""P7: top-10 recall latency over 100k memories (384-d) — mongarsd's numpy index vs sqlite-vec.

Both sides search the same seeded, clustered, L2-normalized vectors (one user owning all
100k rows: the worst case for a per-user partition) with the same queries. The reference
is sqlite-vec's brute-force KNN (`vec0`, cosine), loaded into Debian's /usr/bin/python3
(whose sqlite3 module can load extensions; the venv's cannot) in a subprocess; without
sqlite-vec it falls back to a plain SQL scan with a Python cosine function, and says so.

    .venv/bin/python -m bench.recall [--n 100000] [--queries 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import psutil

from bench.common import REPO, describe_machine, make_entry, skipped_entry

N_MEMORIES: Final = 100_000
DIM: Final = 384
N_QUERIES: Final = 300
WARMUP_QUERIES: Final = 20
TOP_K: Final = 10
N_CLUSTERS: Final = 2000
NOISE: Final = 0.6
SEED: Final = 7
INSERT_BATCH: Final = 1000
SQLITE_VEC_DIR: Final = REPO / ".cache" / "sqlite-vec"  # `pip install --target .cache/sqlite-vec sqlite-vec`
SYSTEM_PYTHON: Final = "/usr/bin/python3"
REFERENCE_TIMEOUT_S: Final = 1800.0

F32 = npt.NDArray[np.float32]


def make_data(n: int, n_queries: int, seed: int = SEED) -> tuple[F32, F32]:
    """Seeded clustered unit vectors (like sentence embeddings: topics plus noise) and queries near them."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((N_CLUSTERS, DIM)).astype(np.float32)
    data = centers[rng.integers(0, N_CLUSTERS, n)] + NOISE * rng.standard_normal((n, DIM)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = data[rng.integers(0, n, n_queries)] + NOISE * rng.standard_normal((n_queries, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(data, dtype=np.float32), np.ascontiguousarray(queries, dtype=np.float32)


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def measure_index(data: F32, queries: F32) -> dict[str, Any]:
    """Insert throughput, RSS and search latency of mongarsd.memory.vectors.VectorIndex."""
    from mongarsd.memory.vectors import VectorIndex

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    idx = VectorIndex(DIM)
    t0 = time.perf_counter()
    for lo in range(0, len(data), INSERT_BATCH):
        hi = min(lo + INSERT_BATCH, len(data))
        idx.add("bench", list(range(lo + 1, hi + 1)), data[lo:hi])
    insert_s = time.perf_counter() - t0
    # The 4-bit copy a partition this size gets is built in the index's worker thread; a daemon
    # serves exact scans meanwhile. Measured here: that build, then searches in steady state.
    t1 = time.perf_counter()
    idx.settle()
    copy_build_s = time.perf_counter() - t1
    rss1 = proc.memory_info().rss
    try:
        for q in queries[:WARMUP_QUERIES]:
            idx.search("bench", q, TOP_K)
        lat: list[float] = []
        results: list[list[int]] = []
        for q in queries:
            t = time.perf_counter()
            hits = idx.search("bench", q, TOP_K)
            lat.append((time.perf_counter() - t) * 1000)
            results.append([h.id for h in hits])
    finally:
        idx.close()
    # recall against an exact float32 top-10 over every query (ids are row + 1)
    exact = [list(np.argpartition(-(data @ q), TOP_K)[:TOP_K] + 1) for q in queries]
    per_query = [len(set(a) & set(b)) / TOP_K for a, b in zip(results, exact, strict=True)]
    agree = float(np.mean(per_query))
    return {
        "copy_rows": idx.coarse_rows("bench"),
        "copy_build_s": copy_build_s,
        "recall_min": float(min(per_query)),
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "insert_per_s": len(data) / insert_s,
        "index_mb": idx.nbytes() / 2**20,
        "rss_delta_mb": (rss1 - rss0) / 2**20,
        "recall_at_10_vs_exact": agree,
        "results": results,
    }


async def async_measure_sqlite_store(data: F32, tmp: Path) -> dict[str, Any]:
    """Insert throughput of embeddings as BLOBs through the daemon's store, and the index load time at start."""
    from mongarsd.memory.db import Database
    from mongarsd.memory.hippocampus import Hippocampus
    from mongarsd.memory.vectors import to_blob

    db = Database(path=tmp / "recall.db")
    await db.async_start()
    try:
        blobs = [to_blob(v) for v in data]
        t0 = time.perf_counter()
        for lo in range(0, len(blobs), INSERT_BATCH):
            rows = [("bench", f"memory {i}", b, "bench", 0.0) for i, b in enumerate(blobs[lo : lo + INSERT_BATCH], start=lo)]

            async def op(conn: Any, rows: list[tuple[str, str, bytes, str, float]] = rows) -> None:
                await conn.executemany("INSERT INTO memories(user, text, embedding, embed_model, created_at) VALUES (?, ?, ?, ?, ?)", rows)

            await db.async_write(op)
        insert_s = time.perf_counter() - t0
        hippo = Hippocampus(db=db)
        t1 = time.perf_counter()
        await hippo.async_start()
        load_s = time.perf_counter() - t1
        loaded = len(hippo.index)
        await hippo.async_stop()
    finally:
        await db.async_stop()
    return {"sqlite_insert_per_s": len(data) / insert_s, "load_s": load_s, "loaded": loaded}


REFERENCE_SCRIPT: Final = textwrap.dedent(
    """
    import json, math, sqlite3, struct, sys, time
    data_path, query_path, n, nq, dim, k, warm, mode = sys.argv[1:9]
    n, nq, dim, k, warm = int(n), int(nq), int(dim), int(k), int(warm)
    raw = open(data_path, "rb").read()
    qraw = open(query_path, "rb").read()
    row = dim * 4
    conn = sqlite3.connect(":memory:")
    out = {"mode": mode}
    if mode == "sqlite-vec":
        import sqlite_vec
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
        out["version"] = conn.execute("select vec_version()").fetchone()[0]
        conn.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{dim}] distance_metric=cosine)")
        sql = "SELECT rowid FROM v WHERE embedding MATCH ? AND k = ? ORDER BY distance"
        ins = "INSERT INTO v(rowid, embedding) VALUES (?, ?)"
    else:
        conn.execute("CREATE TABLE v (rowid INTEGER PRIMARY KEY, embedding BLOB)")
        def cos(a, b):
            x = struct.unpack(f"{dim}f", a); y = struct.unpack(f"{dim}f", b)
            return sum(p * q for p, q in zip(x, y))
        conn.create_function("cos", 2, cos, deterministic=True)
        sql = "SELECT rowid FROM v ORDER BY cos(embedding, ?) DESC LIMIT ?"
        ins = "INSERT INTO v(rowid, embedding) VALUES (?, ?)"
    t0 = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(ins, ((i + 1, raw[i * row:(i + 1) * row]) for i in range(n)))
    conn.execute("COMMIT")
    out["insert_per_s"] = n / (time.perf_counter() - t0)
    lat, res = [], []
    for j in range(nq):
        q = qraw[j * row:(j + 1) * row]
        t = time.perf_counter()
        ids = [r[0] for r in conn.execute(sql, (q, k))]
        dt = (time.perf_counter() - t) * 1000
        if j >= warm:
            lat.append(dt)
            res.append(ids)
    out["lat_ms"] = lat
    out["results"] = res
    print(json.dumps(out))
    """
)


def measure_reference(data: F32, queries: F32, tmp: Path, *, n_queries: int) -> dict[str, Any]:
    """Run the sqlite-vec (or plain SQL) reference in the system Python; raise RuntimeError if neither can run."""
    mode = "sqlite-vec" if (SQLITE_VEC_DIR / "sqlite_vec").is_dir() else "python-sql-scan"
    if not Path(SYSTEM_PYTHON).exists():
        raise RuntimeError(f"{SYSTEM_PYTHON} not found")
    if mode == "python-sql-scan":
        # A Python cosine over 100k rows takes seconds per query: keep the run bounded.
        n_queries = min(n_queries, 5)
    data_path, query_path, script = tmp / "data.f32", tmp / "queries.f32", tmp / "ref.py"
    data.astype("<f4").tofile(data_path)
    script.write_text(REFERENCE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(SQLITE_VEC_DIR)}
    env.pop("PYTHONHOME", None)
    warm = min(WARMUP_QUERIES, max(n_queries // 10, 1)) if mode == "sqlite-vec" else 0
    cmd = [
        SYSTEM_PYTHON,
        str(script),
        str(data_path),
        str(query_path),
        str(len(data)),
        str(n_queries + warm),
        str(DIM),
        str(TOP_K),
        str(warm),
        mode,
    ]
    # The subprocess gets the warm-up queries first (same first queries as ours), then the measured ones.
    qs = np.concatenate([queries[:warm], queries[:n_queries]]) if warm else queries[:n_queries]
    qs.astype("<f4").tofile(query_path)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=REFERENCE_TIMEOUT_S, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"reference failed ({proc.returncode}): {proc.stderr[-500:]}")
    out: dict[str, Any] = json.loads(proc.stdout)
    lat = out.pop("lat_ms")
    out["p50_ms"] = percentile(lat, 50)
    out["p95_ms"] = percentile(lat, 95)
    out["queries"] = len(lat)
    return out


def run(results: dict[str, Any], *, n: int = N_MEMORIES, n_queries: int = N_QUERIES, log: Any = print) -> None:
    """Measure P7 into results (called by bench.run)."""
    data, queries = make_data(n, n_queries)
    load_before = os.getloadavg()
    ours = measure_index(data, queries)
    log(f"  P7 numpy index: p50 {ours['p50_ms']:.2f} ms, p95 {ours['p95_ms']:.2f} ms over {n} vectors")
    with tempfile.TemporaryDirectory(prefix="mongarsd-p7-") as tmpdir:
        tmp = Path(tmpdir)
        store = asyncio.run(async_measure_sqlite_store(data, tmp))
        try:
            ref = measure_reference(data, queries, tmp, n_queries=n_queries)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as err:
            ref = None
            ref_error = str(err)
    ref_results = ref.pop("results", []) if ref else []
    agree = (
        float(np.mean([len(set(a) & set(b)) / TOP_K for a, b in zip(ours["results"], ref_results, strict=False)])) if ref_results else None
    )
    ours.pop("results")
    details: dict[str, Any] = {
        "method": (
            f"{n} seeded clustered unit vectors ({N_CLUSTERS} topics, noise {NOISE}), one user owning all rows; "
            f"{n_queries} queries after {WARMUP_QUERIES} warm-up; top-{TOP_K} cosine (a 4-bit copy picks candidates, "
            "rescored exactly in float32), latency of one search call; recall_at_10 = mean share of the exact "
            "float32 top-10 found, over every query"
        ),
        "ours": {k: round(v, 4) if isinstance(v, float) else v for k, v in ours.items()},
        "store": {k: round(v, 4) if isinstance(v, float) else v for k, v in store.items()},
        "reference": ref if ref else {"error": ref_error},
        "top10_agreement_with_reference": agree,
        # Both sides share the machine with whatever else runs: say how busy it was.
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "blas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    if ref is None:
        results["P7"] = {
            **skipped_entry("P7", "reference could not run: " + ref_error),
            "value": round(ours["p95_ms"], 3),
            "details": details,
        }
        return
    log(f"  P7 reference ({ref['mode']}): p50 {ref['p50_ms']:.2f} ms, p95 {ref['p95_ms']:.2f} ms")
    entry = make_entry(
        "P7",
        value=ours["p95_ms"],
        reference=ref["p95_ms"],
        unit="ms",
        recall_at_10=round(ours["recall_at_10_vs_exact"], 4),
        details=details,
    )
    entry.setdefault("machine", describe_machine())
    results["P7"] = entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recall", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=N_MEMORIES)
    parser.add_argument("--queries", type=int, default=N_QUERIES)
    args = parser.parse_args(argv)
    import logging

    import structlog

    # A CLI of its own: keep the store's debug lines off stdout, which carries the JSON.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr), wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING)
    )
    results: dict[str, Any] = {}
    run(results, n=args.n, n_queries=args.queries)
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
