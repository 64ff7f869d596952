"""Forward-only numbered schema migrations, tracked with PRAGMA user_version.

Append new migrations at the end; never edit or renumber a released one.
"""

from __future__ import annotations

import sqlite3

import structlog

from mongarsd.errors import StoreError

log = structlog.get_logger("mongarsd.memory.migrations")

MIGRATIONS: list[str] = [
    # 1: identities and credentials
    """
    CREATE TABLE users (
        name        TEXT PRIMARY KEY,
        created_at  REAL NOT NULL
    ) STRICT;
    CREATE TABLE tokens (
        id           TEXT PRIMARY KEY,
        user         TEXT NOT NULL REFERENCES users(name),
        role         TEXT NOT NULL CHECK (role IN ('admin', 'user', 'peer')),
        hash         TEXT NOT NULL,
        label        TEXT NOT NULL DEFAULT '',
        created_at   REAL NOT NULL,
        last_used_at REAL,
        revoked_at   REAL
    ) STRICT;
    CREATE INDEX tokens_user ON tokens(user);
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;
    """,
]


def migrate(conn: sqlite3.Connection, migrations: list[str] | None = None) -> int:
    """Apply pending migrations in one transaction each (blocking: run in a thread)."""
    steps = MIGRATIONS if migrations is None else migrations
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > len(steps):
        raise StoreError(
            f"database schema version {current} is newer than this mongarsd knows ({len(steps)}); "
            "upgrade mongarsd or restore a backup made by this version"
        )
    for version in range(current + 1, len(steps) + 1):
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _split(steps[version - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            conn.execute("ROLLBACK")
            raise StoreError(f"migration {version} failed: {err}") from err
        log.info("migration_applied", version=version)
    return len(steps)


def _split(script: str) -> list[str]:
    """Split a migration script into statements, keeping trigger bodies whole."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
