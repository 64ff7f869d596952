"""Statically registered peers: URL validation (pure) and their persisted table.

A registered peer is another mongarsd's API base URL (`http://board.local:8642`). With the mesh
enabled the service asks that URL for its gossip port and joins it, which serves networks where
multicast does not pass; with the mesh disabled the list is kept for when it is enabled.
Registering a URL already present is idempotent (200, "already registered"), as in monGARS.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from mongarsd.errors import ValidationError

MAX_URL_CHARS: Final = 512
MAX_STATIC_PEERS: Final = 256
_HOST_RE: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def normalize_peer_url(raw: object) -> str:
    """Validate a peer API URL and return its canonical form `scheme://host:port` (pure).

    Rules: http or https; a host (DNS name or IP literal); an explicit or default port; no user
    info, query or fragment; no path beyond "/"; at most MAX_URL_CHARS characters.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise ValidationError("url must be a non-empty string like http://host:8642", param="url")
    text = raw.strip()
    if len(text) > MAX_URL_CHARS:
        raise ValidationError(f"url is longer than {MAX_URL_CHARS} characters", param="url")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValidationError("url must not contain spaces or control characters", param="url")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as err:
        raise ValidationError(f"url is invalid: {err}", param="url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValidationError("url scheme must be http or https", param="url")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValidationError("url must not contain credentials", param="url")
    if parts.fragment or "#" in text:
        raise ValidationError("url must not contain a fragment", param="url")
    if parts.query or "?" in text:
        raise ValidationError("url must not contain a query", param="url")
    if parts.path not in ("", "/"):
        raise ValidationError("url must be the peer's base URL without a path", param="url")
    host = parts.hostname or ""
    if not host:
        raise ValidationError("url must name a host", param="url")
    try:
        ip = ipaddress.ip_address(host)
        host_out = f"[{ip}]" if ip.version == 6 else str(ip)
    except ValueError:
        if not _HOST_RE.fullmatch(host):
            raise ValidationError("url host is not a valid host name or IP address", param="url") from None
        host_out = host.lower().rstrip(".")
    if port is None:
        port = 443 if scheme == "https" else 8642
    if not 0 < port < 65536:
        raise ValidationError("url port must be 1-65535", param="url")
    return urlunsplit((scheme, f"{host_out}:{port}", "", "", ""))


def url_host_port(url: str) -> tuple[str, int]:
    """Return (host, port) of a normalized peer URL (pure)."""
    parts = urlsplit(url)
    return (parts.hostname or "", int(parts.port or 0))


@dataclass(frozen=True, slots=True)
class StaticPeer:
    url: str
    added_at: float

    def public(self) -> dict[str, Any]:
        return {"url": self.url, "added_at": self.added_at}


class PeerStore:
    """The `peers` table (one writer: the Database's queue)."""

    def __init__(self, *, db: Any) -> None:
        self._db = db

    async def async_list(self) -> list[StaticPeer]:
        rows = await self._db.async_fetchall("SELECT url, added_at FROM peers ORDER BY url")
        return [StaticPeer(str(r[0]), float(r[1])) for r in rows]

    async def async_add(self, url: str) -> bool:
        """Add a normalized URL; return False when it was already registered."""
        existing = await self._db.async_fetchone("SELECT 1 FROM peers WHERE url = ?", (url,))
        if existing is not None:
            return False
        count = await self._db.async_fetchone("SELECT COUNT(*) FROM peers")
        if count is not None and int(count[0]) >= MAX_STATIC_PEERS:
            raise ValidationError(f"at most {MAX_STATIC_PEERS} peers can be registered", param="url", status=409)
        await self._db.async_execute("INSERT OR IGNORE INTO peers (url, added_at) VALUES (?, ?)", (url, time.time()))
        return True

    async def async_remove(self, url: str) -> bool:
        """Remove a URL; return False when it was not registered."""
        existing = await self._db.async_fetchone("SELECT 1 FROM peers WHERE url = ?", (url,))
        if existing is None:
            return False
        await self._db.async_execute("DELETE FROM peers WHERE url = ?", (url,))
        return True
