"""Bearer tokens: stored as SHA-256 hashes, each tied to a user and a role."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Literal

import aiosqlite

from mongarsd.const import TOKEN_CACHE_TTL_S, TOKEN_PREFIX
from mongarsd.errors import NotFoundError, ValidationError
from mongarsd.memory.db import Database

Role = Literal["admin", "user", "peer"]
ROLES: tuple[Role, ...] = ("admin", "user", "peer")
USER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_TOKEN_RE = re.compile(rf"^{TOKEN_PREFIX}([0-9a-f]{{12}})_([A-Za-z0-9_-]{{20,128}})$")


@dataclass(frozen=True)
class TokenInfo:
    id: str
    user: str
    role: Role
    label: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None

    def public(self) -> dict[str, object]:
        return {
            "id": self.id,
            "user": self.user,
            "role": self.role,
            "label": self.label,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "revoked": self.revoked_at is not None,
        }


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def validate_user_name(name: object, param: str = "user") -> str:
    if not isinstance(name, str) or not USER_NAME_RE.match(name):
        raise ValidationError(
            "user must be 1-64 characters: letters, digits, '_', '.', '@' or '-', starting with a letter or digit",
            param=param,
        )
    return name


class TokenStore:
    """Create, verify, list and revoke tokens in the store."""

    def __init__(self, *, db: Database) -> None:
        self._db = db
        # Short-lived verification cache: revocation takes effect within TOKEN_CACHE_TTL_S.
        self._cache: dict[str, tuple[float, TokenInfo]] = {}

    async def async_create(self, user: str, role: str, label: str = "") -> tuple[str, TokenInfo]:
        """Create a token; return the secret (shown once) and its record."""
        validate_user_name(user)
        if role not in ROLES:
            raise ValidationError(f"role must be one of {', '.join(ROLES)}, got {role!r}", param="role")
        if not isinstance(label, str) or len(label) > 200:
            raise ValidationError("label must be a string of at most 200 characters", param="label")
        token_id = secrets.token_hex(6)
        secret = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute("INSERT OR IGNORE INTO users(name, created_at) VALUES (?, ?)", (user, now))
            await conn.execute(
                "INSERT INTO tokens(id, user, role, hash, label, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, user, role, _hash(secret), label, now),
            )

        await self._db.async_write(op)
        return secret, TokenInfo(token_id, user, role, label, now, None, None)  # type: ignore[arg-type]

    async def async_verify(self, token: str) -> TokenInfo | None:
        """Return the live token's record, or None when unknown, malformed or revoked."""
        match = _TOKEN_RE.match(token)
        if not match:
            return None
        now = time.monotonic()
        cached = self._cache.get(token)
        if cached and now - cached[0] < TOKEN_CACHE_TTL_S:
            return cached[1]
        row = await self._db.async_fetchone("SELECT * FROM tokens WHERE id = ?", (match.group(1),))
        if row is None or row["revoked_at"] is not None or not hmac.compare_digest(row["hash"], _hash(token)):
            self._cache.pop(token, None)
            return None
        info = _info(row)
        if len(self._cache) > 1024:
            self._cache.clear()
        self._cache[token] = (now, info)
        return info

    async def async_list(self, user: str | None = None) -> list[TokenInfo]:
        if user is None:
            rows = await self._db.async_fetchall("SELECT * FROM tokens ORDER BY created_at")
        else:
            rows = await self._db.async_fetchall("SELECT * FROM tokens WHERE user = ? ORDER BY created_at", (user,))
        return [_info(r) for r in rows]

    async def async_get(self, token_id: str) -> TokenInfo:
        row = await self._db.async_fetchone("SELECT * FROM tokens WHERE id = ?", (token_id,))
        if row is None:
            raise NotFoundError(f"no token with id {token_id!r}", param="id")
        return _info(row)

    async def async_revoke(self, token_id: str) -> TokenInfo:
        info = await self.async_get(token_id)
        await self._db.async_execute("UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), token_id))
        self._cache.clear()
        return info

    async def async_count_live(self) -> int:
        row = await self._db.async_fetchone("SELECT count(*) AS n FROM tokens WHERE revoked_at IS NULL")
        return int(row["n"]) if row else 0


def _info(row: aiosqlite.Row) -> TokenInfo:
    return TokenInfo(row["id"], row["user"], row["role"], row["label"], row["created_at"], row["last_used_at"], row["revoked_at"])
