"""Per-user profile rows (mimicry + personality JSON) and explicit feedback."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import aiosqlite
import structlog

from mongarsd.errors import NotFoundError, ValidationError
from mongarsd.memory.db import Database
from mongarsd.sanitize import bounded_int, clean_value

log = structlog.get_logger("mongarsd.memory.profiles")

MAX_COMMENT_CHARS = 2000

JsonDict = dict[str, Any]
ProfileUpdate = Callable[[JsonDict, JsonDict], tuple[JsonDict, JsonDict]]


@dataclass(frozen=True, slots=True)
class ProfileRow:
    user: str
    mimicry: JsonDict
    personality: JsonDict
    updated_at: float | None


def _loads(raw: Any) -> JsonDict:
    try:
        value = json.loads(raw, parse_int=bounded_int) if isinstance(raw, str) else {}
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        log.warning("profile_row_unreadable")
        return {}  # a damaged row falls back to defaults rather than breaking every turn
    if not isinstance(value, dict):
        return {}
    cleaned, changed = clean_value(value)
    if changed:
        # written by an older version: answer it repaired; the next update stores the repaired form
        log.warning("profile_row_repaired", reason="lone surrogates replaced with U+FFFD")
    return cast(JsonDict, cleaned)


class ProfileStore:
    """Read and atomically update profile rows through the single writer."""

    def __init__(self, *, db: Database) -> None:
        self._db = db

    async def async_get(self, user: str) -> ProfileRow:
        row = await self._db.async_fetchone("SELECT mimicry, personality, updated_at FROM profiles WHERE user = ?", (user,))
        if row is None:
            return ProfileRow(user, {}, {}, None)
        return ProfileRow(user, _loads(row["mimicry"]), _loads(row["personality"]), float(row["updated_at"]))

    async def async_update(self, user: str, update: ProfileUpdate) -> ProfileRow:
        """Apply `update(mimicry, personality) -> (mimicry, personality)` read-modify-write inside one transaction.

        The read happens on the writer connection inside the write transaction, so two
        concurrent turns of one user never lose each other's update.
        """

        async def op(conn: aiosqlite.Connection) -> ProfileRow:
            async with conn.execute("SELECT mimicry, personality FROM profiles WHERE user = ?", (user,)) as cur:
                row = await cur.fetchone()
            mim, per = (_loads(row[0]), _loads(row[1])) if row is not None else ({}, {})
            mim, per = update(mim, per)
            now = time.time()
            await conn.execute(
                "INSERT INTO profiles(user, mimicry, personality, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(user) DO UPDATE SET mimicry = excluded.mimicry, personality = excluded.personality, updated_at = excluded.updated_at",
                (user, json.dumps(mim), json.dumps(per), now),
            )
            return ProfileRow(user, mim, per, now)

        result: ProfileRow = await self._db.async_write(op)
        return result

    async def async_add_feedback(self, user: str, *, rating: int, message_id: int | None = None, comment: str = "") -> int:
        """Record feedback on one of the user's own messages; NotFoundError for anyone else's."""
        if rating not in (-1, 0, 1):
            raise ValidationError("rating must be -1, 0 or 1", param="rating")
        if len(comment) > MAX_COMMENT_CHARS:
            raise ValidationError(f"comment is too long (at most {MAX_COMMENT_CHARS} characters)", param="comment")

        async def op(conn: aiosqlite.Connection) -> int:
            if message_id is not None:
                async with conn.execute("SELECT 1 FROM messages WHERE user = ? AND id = ?", (user, message_id)) as cur:
                    if await cur.fetchone() is None:
                        return -1  # never raise foreign errors inside a write op: the writer only expects store errors
            cur2 = await conn.execute(
                "INSERT INTO feedback(user, message_id, rating, comment, created_at) VALUES (?, ?, ?, ?, ?)",
                (user, message_id, rating, comment, time.time()),
            )
            return int(cur2.lastrowid or 0)

        fid: int = await self._db.async_write(op)
        if fid < 0:
            raise NotFoundError(f"message {message_id} not found", param="message_id")
        return fid
