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
    # 2: conversations, memories (+ FTS5), profiles, feedback (owner: hippocampus)
    """
    CREATE TABLE sessions (
        user        TEXT NOT NULL,
        id          TEXT NOT NULL,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL,
        PRIMARY KEY (user, id)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX sessions_user_updated ON sessions(user, updated_at);
    CREATE TABLE messages (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        user        TEXT NOT NULL,
        session_id  TEXT NOT NULL,
        role        TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content     TEXT NOT NULL,
        created_at  REAL NOT NULL,
        expires_at  REAL,
        model       TEXT,
        tokens      INTEGER,
        FOREIGN KEY (user, session_id) REFERENCES sessions(user, id) ON DELETE CASCADE
    ) STRICT;
    CREATE INDEX messages_user_session ON messages(user, session_id, id);
    CREATE INDEX messages_user ON messages(user, id);
    CREATE INDEX messages_expiry ON messages(expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE memories (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        user         TEXT NOT NULL,
        text         TEXT NOT NULL,
        embedding    BLOB,
        embed_model  TEXT,
        importance   REAL NOT NULL DEFAULT 0.5,
        kind         TEXT NOT NULL DEFAULT 'fact',
        source       TEXT NOT NULL DEFAULT 'user',
        provenance   TEXT,
        session_id   TEXT,
        message_id   INTEGER,
        created_at   REAL NOT NULL,
        expires_at   REAL
    ) STRICT;
    CREATE INDEX memories_user ON memories(user, id);
    CREATE INDEX memories_expiry ON memories(expires_at) WHERE expires_at IS NOT NULL;
    CREATE INDEX memories_unembedded ON memories(id) WHERE embedding IS NULL;
    CREATE VIRTUAL TABLE memories_fts USING fts5(
        text, content='memories', content_rowid='id', tokenize='unicode61 remove_diacritics 2'
    );
    CREATE TRIGGER memories_ai AFTER INSERT ON memories BEGIN
        INSERT INTO memories_fts(rowid, text) VALUES (new.id, new.text);
    END;
    CREATE TRIGGER memories_ad AFTER DELETE ON memories BEGIN
        INSERT INTO memories_fts(memories_fts, rowid, text) VALUES ('delete', old.id, old.text);
    END;
    CREATE TRIGGER memories_au AFTER UPDATE OF text ON memories BEGIN
        INSERT INTO memories_fts(memories_fts, rowid, text) VALUES ('delete', old.id, old.text);
        INSERT INTO memories_fts(rowid, text) VALUES (new.id, new.text);
    END;
    CREATE TABLE profiles (
        user         TEXT PRIMARY KEY,
        mimicry      TEXT NOT NULL DEFAULT '{}',
        personality  TEXT NOT NULL DEFAULT '{}',
        updated_at   REAL NOT NULL
    ) STRICT;
    CREATE TABLE feedback (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        user        TEXT NOT NULL,
        message_id  INTEGER,
        rating      INTEGER NOT NULL CHECK (rating BETWEEN -1 AND 1),
        comment     TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL
    ) STRICT;
    CREATE INDEX feedback_user ON feedback(user, id);
    """,
    # 3: statically registered mesh peers (owner: mesh)
    """
    CREATE TABLE peers (
        url       TEXT PRIMARY KEY,
        added_at  REAL NOT NULL
    ) STRICT;
    """,
    # 4: tool turns in the conversation history (Mains Virtuelles and clients' tools): a 'tool'
    # role, the calls an assistant turn made, and which call a tool turn answers
    """
    CREATE TABLE messages_v4 (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        user          TEXT NOT NULL,
        session_id    TEXT NOT NULL,
        role          TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
        content       TEXT NOT NULL,
        created_at    REAL NOT NULL,
        expires_at    REAL,
        model         TEXT,
        tokens        INTEGER,
        tool_calls    TEXT,
        tool_call_id  TEXT,
        tool_name     TEXT,
        FOREIGN KEY (user, session_id) REFERENCES sessions(user, id) ON DELETE CASCADE
    ) STRICT;
    INSERT INTO messages_v4(id, user, session_id, role, content, created_at, expires_at, model, tokens)
        SELECT id, user, session_id, role, content, created_at, expires_at, model, tokens FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_v4 RENAME TO messages;
    CREATE INDEX messages_user_session ON messages(user, session_id, id);
    CREATE INDEX messages_user ON messages(user, id);
    CREATE INDEX messages_expiry ON messages(expires_at) WHERE expires_at IS NOT NULL;
    """,
    # 5: Iris documents (a user's own, or shared under owner '*') and Cortex research (owner: cognition)
    """
    CREATE TABLE documents (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        owner         TEXT NOT NULL,
        source        TEXT NOT NULL,
        title         TEXT NOT NULL DEFAULT '',
        fingerprint   TEXT NOT NULL,
        content_type  TEXT NOT NULL DEFAULT '',
        bytes         INTEGER NOT NULL,
        chunks        INTEGER NOT NULL,
        fetched_at    REAL NOT NULL,
        UNIQUE (owner, fingerprint)
    ) STRICT;
    CREATE INDEX documents_owner_source ON documents(owner, source);
    ALTER TABLE memories ADD COLUMN document_id INTEGER REFERENCES documents(id) ON DELETE CASCADE;
    CREATE INDEX memories_document ON memories(document_id) WHERE document_id IS NOT NULL;
    CREATE TABLE research (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        user         TEXT NOT NULL,
        query        TEXT NOT NULL,
        topics       TEXT NOT NULL DEFAULT '[]',
        status       TEXT NOT NULL CHECK (status IN ('open', 'running', 'done', 'nothing_found', 'failed')),
        reason       TEXT NOT NULL DEFAULT '',
        sources      TEXT NOT NULL DEFAULT '[]',
        memories     INTEGER NOT NULL DEFAULT 0,
        created_at   REAL NOT NULL,
        finished_at  REAL
    ) STRICT;
    CREATE INDEX research_user ON research(user, id);
    """,
    # 6: Sommeil's runs, the Evolution Engine's versions and trials, the SelfTrainingEngine's
    # re-ranker versions and the recall log that feedback labels (owner: maintenance)
    """
    CREATE TABLE sommeil_runs (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        job          TEXT NOT NULL,
        started_at   REAL NOT NULL,
        finished_at  REAL,
        status       TEXT NOT NULL CHECK (status IN ('running', 'done', 'paused', 'cancelled', 'failed', 'skipped')),
        summary      TEXT NOT NULL DEFAULT '{}'
    ) STRICT;
    CREATE INDEX sommeil_runs_job ON sommeil_runs(job, id);
    CREATE TABLE evolution_versions (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at   REAL NOT NULL,
        settings     TEXT NOT NULL,
        measurements TEXT NOT NULL DEFAULT '{}',
        reason       TEXT NOT NULL DEFAULT '',
        origin       TEXT NOT NULL DEFAULT 'local',
        board        TEXT NOT NULL DEFAULT '',
        model        TEXT NOT NULL DEFAULT '',
        active       INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1))
    ) STRICT;
    CREATE TABLE evolution_trials (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at   REAL NOT NULL,
        settings     TEXT NOT NULL,
        samples      TEXT NOT NULL DEFAULT '[]',
        baseline     TEXT NOT NULL DEFAULT '[]',
        p_value      REAL,
        outcome      TEXT NOT NULL,
        reason       TEXT NOT NULL DEFAULT '',
        origin       TEXT NOT NULL DEFAULT 'local'
    ) STRICT;
    CREATE TABLE reranker_versions (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at   REAL NOT NULL,
        weights      TEXT NOT NULL,
        metrics      TEXT NOT NULL DEFAULT '{}',
        reason       TEXT NOT NULL DEFAULT '',
        active       INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1))
    ) STRICT;
    CREATE TABLE recall_log (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        user         TEXT NOT NULL,
        message_id   INTEGER NOT NULL,
        memory_id    INTEGER NOT NULL,
        rank         INTEGER NOT NULL,
        features     TEXT NOT NULL,
        created_at   REAL NOT NULL
    ) STRICT;
    CREATE INDEX recall_log_message ON recall_log(user, message_id);
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
