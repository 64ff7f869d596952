"""Who is calling: principals, roles and per-route role requirements."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from mongarsd.errors import AuthError
from mongarsd.principal import PRINCIPAL, Principal

# The principal lives in mongarsd.principal (no project imports) so the mesh can read it too;
# it is re-exported here for the API side.
__all__ = [
    "LOCAL_ADMIN_USER",
    "PRINCIPAL",
    "REQUEST_ID",
    "Principal",
    "check_role",
    "is_loopback",
    "principal_of",
    "public",
    "require",
    "required_role",
]

_ROLE_ATTR = "__mongarsd_role__"
_RANK = {"peer": 1, "user": 1, "admin": 2}

H = TypeVar("H", bound=Callable[..., Any])


LOCAL_ADMIN_USER = "local"
REQUEST_ID = web.RequestKey("mongarsd_request_id", str)


def public(handler: H) -> H:
    """Mark a handler as reachable without credentials."""
    setattr(handler, _ROLE_ATTR, "public")
    return handler


def require(role: str) -> Callable[[H], H]:
    """Mark the least role a handler needs: 'user' (any token, the default), 'peer', or 'admin'."""

    def deco(handler: H) -> H:
        setattr(handler, _ROLE_ATTR, role)
        return handler

    return deco


def required_role(handler: Any) -> str:
    return str(getattr(handler, _ROLE_ATTR, "user"))


def check_role(principal: Principal, needed: str) -> None:
    """Raise AuthError(403) unless the principal may call a handler that needs `needed`."""
    if needed in ("public", "user"):
        if principal.role == "peer" and needed == "user":
            return  # peers forward user requests; they carry the origin user's identity
        return
    if needed == "peer" and principal.role in ("peer", "admin"):
        return
    if needed == "admin" and principal.role == "admin":
        return
    raise AuthError(f"this route needs the {needed} role; your token has the {principal.role} role", status=403)


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a unix socket path or garbage: not loopback


def principal_of(request: web.Request) -> Principal:
    principal: Principal | None = request.get(PRINCIPAL)
    if principal is None:
        raise AuthError("authentication required: send Authorization: Bearer <token>")
    return principal
