"""SQLite store: WAL, one batching writer connection, a reader connection, migrations."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import structlog

from mongarsd.errors import MongarsError, StoreError
from mongarsd.memory.migrations import migrate
from mongarsd.supervisor import TaskSupervisor

log = structlog.get_logger("mongarsd.memory.db")

# SQLite result codes after which the same write can succeed later (sqlite3.h)
TRANSIENT_SQLITE_CODES = frozenset({5, 6, 13})  # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_FULL


def is_transient(err: sqlite3.Error) -> bool:
    """Tell whether retrying a failed statement later can succeed (disk full, busy, locked)."""
    code = getattr(err, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in TRANSIENT_SQLITE_CODES


T = TypeVar("T")
WriteOp = Callable[[aiosqlite.Connection], Awaitable[Any]]

BUSY_TIMEOUT_MS = 5000
WRITE_BATCH_MAX = 64  # operations folded into one transaction
WRITE_QUEUE_MAX = 4096
# Below this much free space a chat turn is refused before generating: its answer could not be
# stored (SQLite needs room for the WAL frames of a turn), so the board spares the compute.
STORE_MIN_FREE_BYTES = 256 * 1024

RECOVERY_HINT = (
    "stop mongarsd, move the damaged file aside, then either restore a backup or salvage it with "
    "`sqlite3 BROKEN.db .recover | sqlite3 {path}` and start again"
)


def _connect_sync(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        # a file that is not a database fails here: close it now, not whenever the traceback
        # that references this frame is collected (the file stayed open until then)
        conn.close()
        raise
    return conn


def open_and_migrate(path: Path, migrations: list[str] | None = None) -> int:
    """Check integrity and bring the schema up to date (blocking: run in a thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = _connect_sync(path)
    except sqlite3.DatabaseError as err:
        raise StoreError(f"cannot open database {path}: {err}; {RECOVERY_HINT.format(path=path)}") from err
    try:
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"database {path} is corrupt ({err}); {RECOVERY_HINT.format(path=path)}") from err
        if rows != [("ok",)]:
            problems = "; ".join(r[0] for r in rows[:5])
            raise StoreError(f"database {path} failed quick_check: {problems}; {RECOVERY_HINT.format(path=path)}")
        return migrate(conn, migrations)
    finally:
        conn.close()


@dataclass
class _Pending:
    op: WriteOp
    future: asyncio.Future[Any]


class Database:
    """The store service: every write goes through one connection and one queue."""

    name = "store"
    start_timeout_s = 3600.0  # migrations may take long on an SD card; never cut them short
    stop_timeout_s = 3.0  # the queue is drained by then: the HTTP drain ran first

    def __init__(self, *, path: Path, migrations: list[str] | None = None, tasks: TaskSupervisor | None = None) -> None:
        self.path = path
        self._migrations = migrations
        # The writer is fatal: if it dies, every later write would wait forever, so the daemon
        # stops (non-zero) and systemd restarts it. Tools and tests without a daemon own theirs.
        self._tasks = tasks if tasks is not None else TaskSupervisor()
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self.schema_version = 0
        self.writes = 0
        self.transactions = 0

    async def async_start(self) -> None:
        self.schema_version = await asyncio.to_thread(open_and_migrate, self.path, self._migrations)
        self._writer = await self._open()
        self._reader = await self._open()
        await self._reader.execute("PRAGMA query_only=ON")
        self._queue = asyncio.Queue(WRITE_QUEUE_MAX)
        self._task = self._tasks.spawn("store-writer", self._async_writer_loop, restart=False, fatal=True)

    async def _open(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.row_factory = aiosqlite.Row
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", f"busy_timeout={BUSY_TIMEOUT_MS}"):
            await conn.execute(f"PRAGMA {pragma}")
        return conn

    async def async_stop(self) -> None:
        if self._task is not None:
            # Let queued writes finish: nothing acknowledged may be lost (unless the writer died).
            if self._queue is not None and not self._task.done():
                await self._queue.join()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    @property
    def running(self) -> bool:
        return self._writer is not None

    async def async_check_space(self) -> None:
        """Raise a transient StoreError when the store's filesystem is (nearly) full."""
        try:
            free = (await asyncio.to_thread(shutil.disk_usage, self.path.parent)).free
        except OSError:
            return  # cannot tell: let the write itself say
        if free < STORE_MIN_FREE_BYTES:
            raise StoreError(f"database or disk is full: {free} bytes free where the store lives; free some space", transient=True)

    async def async_write(self, op: WriteOp) -> Any:
        """Run `op` inside a write transaction; return once it is durably committed."""
        if self._queue is None:
            raise StoreError("the store is not running", transient=True)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(op, fut))
        return await fut

    async def async_execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute one write statement durably; return the last row id."""

        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute(sql, params)
            return cur.lastrowid or 0

        result: int = await self.async_write(op)
        return result

    async def async_fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        if self._reader is None:
            raise StoreError("the store is not running", transient=True)
        try:
            async with self._reader.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as err:
            raise StoreError(f"query failed: {err}") from err

    async def async_fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self.async_fetchall(sql, params)
        return rows[0] if rows else None

    async def _async_writer_loop(self) -> None:
        queue, conn = self._queue, self._writer
        if queue is None or conn is None:
            raise StoreError("the store writer started before the store opened")
        try:
            await self._async_write_forever(queue, conn)
        except BaseException as err:
            # Nothing may wait on a dead writer: refuse new writes, fail the queued ones.
            self._queue = None
            reason = "the store is stopping" if isinstance(err, asyncio.CancelledError) else f"the store writer failed: {err}"
            while not queue.empty():
                item = queue.get_nowait()
                queue.task_done()
                if not item.future.done():
                    item.future.set_exception(StoreError(reason, transient=True))
            raise

    async def _async_write_forever(self, queue: asyncio.Queue[_Pending], conn: aiosqlite.Connection) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < WRITE_BATCH_MAX and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._async_commit_batch(conn, batch)
            finally:
                for _ in batch:
                    queue.task_done()

    async def _async_commit_batch(self, conn: aiosqlite.Connection, batch: Iterable[_Pending]) -> None:
        results: list[tuple[_Pending, Any, BaseException | None]] = []
        t0 = time.monotonic()
        try:
            await conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                # A savepoint per operation: one bad write does not sink its neighbours.
                await conn.execute("SAVEPOINT op")
                try:
                    value = await item.op(conn)
                except Exception as err:  # one op's failure belongs to its caller, not to the writer loop
                    await conn.execute("ROLLBACK TO op")
                    await conn.execute("RELEASE op")
                    results.append((item, None, err))
                    continue
                await conn.execute("RELEASE op")
                results.append((item, value, None))
            await conn.execute("COMMIT")
        except sqlite3.Error as err:
            log.error("store_commit_failed", error=str(err))
            try:
                await conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # no transaction left to roll back
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(StoreError(f"write failed: {err}", transient=is_transient(err)))
            return
        self.transactions += 1
        for item, value, error in results:
            self.writes += 1
            if item.future.done():
                continue
            if error is None:
                item.future.set_result(value)
            else:
                exc = error if isinstance(error, MongarsError) else StoreError(f"write failed: {error}")
                item.future.set_exception(exc)
        log.debug("store_batch_committed", ops=len(results), ms=round((time.monotonic() - t0) * 1000, 2))
