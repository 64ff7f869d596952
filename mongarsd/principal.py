"""Who is calling: the principal every layer may read, and the request key it travels under.

This module imports nothing from the project, so the API (which authenticates) and the mesh
(which authenticates signed peer requests and forwards on behalf of a user) can both use it
without the mesh depending on the API.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final, Literal

from aiohttp import web

Role = Literal["admin", "user", "peer"]


@dataclass(frozen=True)
class Principal:
    user: str
    role: Role
    token_id: str | None
    loopback: bool

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def rate_key(self) -> str:
        return self.token_id or f"local:{self.user}"


PRINCIPAL: Final = web.RequestKey("mongarsd_principal", Principal)


def is_loopback_host(host: str) -> bool:
    """Tell whether HOST (a name or an address) is this machine's loopback (pure)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
