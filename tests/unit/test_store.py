"""The SQLite store: migrations, batched durable writes, savepoints, quick_check errors."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from mongarsd.errors import StoreError
from mongarsd.memory.db import Database
from mongarsd.memory.tokens import TokenStore


async def test_migrates_and_reports_version(tmp_path: Path) -> None:
    db = Database(path=tmp_path / "m.db", migrations=["CREATE TABLE a (x INTEGER) STRICT;", "CREATE TABLE b (y TEXT) STRICT;"])
    await db.async_start()
    try:
        assert db.schema_version == 2
        row = await db.async_fetchone("PRAGMA user_version")
        assert row is not None and row[0] == 2
        mode = await db.async_fetchone("PRAGMA journal_mode")
        assert mode is not None and mode[0] == "wal"
    finally:
        await db.async_stop()


def _sql(path: Path, statement: str) -> Any:
    """Run one statement on a fresh connection and return the first column of its first row (blocking)."""
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(statement).fetchone()
        conn.commit()
        return row[0] if row else None
    finally:
        conn.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    await asyncio.to_thread(_sql, path, "PRAGMA user_version = 99")
    db = Database(path=path)
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        await db.async_start()


async def test_corrupt_file_gives_clear_error_with_recovery_path(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    await asyncio.to_thread(path.write_bytes, b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"(corrupt|cannot open|not a database).*sqlite3 BROKEN.db .recover"):
        await Database(path=path).async_start()


async def test_concurrent_writes_are_batched_and_one_bad_write_does_not_sink_the_rest(tmp_path: Path) -> None:
    db = Database(path=tmp_path / "m.db", migrations=["CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL) STRICT;"])
    await db.async_start()
    try:

        async def put(k: int, v: str | None) -> int:
            return await db.async_execute("INSERT INTO t(k, v) VALUES (?, ?)", (k, v))

        results = await asyncio.gather(*(put(i, None if i == 7 else str(i)) for i in range(50)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert len(failures) == 1 and isinstance(failures[0], StoreError) and "NOT NULL" in str(failures[0])
        row = await db.async_fetchone("SELECT count(*) FROM t")
        assert row is not None and row[0] == 49
        assert db.transactions < 50  # writes were folded into fewer transactions
    finally:
        await db.async_stop()
    # Durable: a fresh connection sees every acknowledged write.
    assert await asyncio.to_thread(_sql, tmp_path / "m.db", "SELECT count(*) FROM t") == 49
    assert await asyncio.to_thread(_sql, tmp_path / "m.db", "PRAGMA integrity_check") == "ok"


async def test_tokens_are_hashed_verified_and_revocable(tmp_path: Path) -> None:
    db = Database(path=tmp_path / "m.db")
    await db.async_start()
    try:
        store = TokenStore(db=db)
        secret, info = await store.async_create("alice", "user", "laptop")
        raw = await db.async_fetchall("SELECT hash FROM tokens")
        assert secret not in str([tuple(r) for r in raw])  # only the hash is stored
        got = await store.async_verify(secret)
        assert got is not None and got.user == "alice" and got.role == "user"
        assert await store.async_verify(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
        assert await store.async_verify("garbage") is None
        await store.async_revoke(info.id)
        assert await store.async_verify(secret) is None
        assert await store.async_count_live() == 0
    finally:
        await db.async_stop()


async def test_write_op_exceptions_propagate_to_the_caller(tmp_path: Path) -> None:
    db = Database(path=tmp_path / "m.db")
    await db.async_start()
    try:

        async def op(conn: aiosqlite.Connection) -> None:
            raise ValueError("nope")

        with pytest.raises(StoreError, match="nope"):
            await db.async_write(op)
    finally:
        await db.async_stop()
