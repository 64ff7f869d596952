"""Connection hygiene for the HTTP server: head and idle deadlines, per-client and global caps.

aiohttp bounds a connection waiting for a request only by `keepalive_timeout` (counted from
connecting in 3.14.5; releases up to at least 3.14.3 wait for a first request forever), gives a
request head that trickles in (slowloris) no deadline of its own, and accepts any number of
connections. This module adds, per connection, one deadline timer and, per server, a registry that
sheds the connection idle the longest when a cap is reached, so slow clients from one address (all
local users share 127.0.0.1) cannot lock out the others. Only connections with a request in progress
are never shed; when every connection of the client (or of the server) is busy, the new one is closed.

Hooks into aiohttp, each pinned by tests/integration/test_connections.py: `web.Server.__call__`
(the asyncio protocol factory) and its public `request_factory`, `RequestHandler.finish_response`,
`force_close` and the asyncio protocol callbacks; `AppRunner._make_server` and the `_kwargs` a
`web.Server` hands to each handler are the two private names relied on.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

import structlog
from aiohttp import StreamReader, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage

from mongarsd.const import (
    HTTP_HEADER_TIMEOUT_S,
    HTTP_KEEPALIVE_TIMEOUT_S,
    HTTP_MAX_CONNECTIONS_PER_CLIENT,
    HTTP_MAX_CONNECTIONS_TOTAL,
)

log = structlog.get_logger("mongarsd.api.connections")

IPV6_CLIENT_PREFIX_LEN: Final = 64  # one IPv6 client (one LAN, one host) holds a whole /64 (RFC 4291 §2.5.4)
UNKNOWN_CLIENT: Final = "unknown"

# Phases of a connection that has no request in progress, named in logs.
PHASE_FIRST_HEAD = "first_head"  # connected, the first request head not complete yet
PHASE_IDLE = "idle"  # keep-alive: a response finished, no byte of the next request yet
PHASE_HEAD = "head"  # keep-alive: the next request head started, not complete yet

REASON_CLIENT_CAP = "client_cap"
REASON_TOTAL_CAP = "total_cap"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Deadlines and caps for the HTTP server's connections."""

    header_timeout_s: float = HTTP_HEADER_TIMEOUT_S
    keepalive_timeout_s: float = HTTP_KEEPALIVE_TIMEOUT_S
    max_per_client: int = HTTP_MAX_CONNECTIONS_PER_CLIENT
    max_total: int = HTTP_MAX_CONNECTIONS_TOTAL


class Sheddable(Protocol):
    """What admission needs to know about an open connection."""

    @property
    def busy(self) -> bool: ...  # a request is in progress: never shed

    @property
    def idle_since(self) -> float: ...  # loop time of connecting or of the last response finishing


S = TypeVar("S", bound=Sheddable)


@dataclass(frozen=True, slots=True)
class Admission(Generic[S]):
    """Whether to accept a new connection, and which open one to shed first."""

    accept: bool
    victim: S | None = None
    reason: str = ""


def client_key(peername: object) -> str:
    """Return the address a connection counts against: the IPv4 address or the IPv6 /64."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return UNKNOWN_CLIENT  # a Unix socket or a transport without a peer: one shared bucket
    try:
        ip = ipaddress.ip_address(peername[0].partition("%")[0])
    except ValueError:
        return UNKNOWN_CLIENT
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX_LEN), strict=False))
    return str(ip)


def format_peer(peername: object) -> str:
    """Return host:port for logs."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return UNKNOWN_CLIENT


def fd_limited_max_total(max_total: int, nofile_soft: int | None, fd_reserve: int) -> int:
    """Lower the global cap so accepted sockets cannot exhaust the process's file descriptors."""
    if nofile_soft is None or nofile_soft < 0:  # RLIM_INFINITY
        return max_total
    return max(1, min(max_total, nofile_soft - fd_reserve))


def oldest_idle(conns: Iterable[S]) -> S | None:
    """Return the connection without a request in progress that has been idle the longest."""
    return min((c for c in conns if not c.busy), key=lambda c: c.idle_since, default=None)


def plan_admission(client_conns: Collection[S], all_conns: Collection[S], limits: ConnectionLimits) -> Admission[S]:
    """Decide on a new connection: accept, accept after shedding one idle connection, or refuse."""
    if len(client_conns) >= limits.max_per_client:
        victim = oldest_idle(client_conns)
        return Admission(accept=victim is not None, victim=victim, reason=REASON_CLIENT_CAP)
    if len(all_conns) >= limits.max_total:
        victim = oldest_idle(all_conns)
        return Admission(accept=victim is not None, victim=victim, reason=REASON_TOTAL_CAP)
    return Admission(accept=True)


class ConnectionGuard:
    """Track the server's open connections by client and apply the caps (loop only)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._all: dict[GuardedRequestHandler, None] = {}  # dicts as ordered sets
        self._by_client: dict[str, dict[GuardedRequestHandler, None]] = {}
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[GuardedRequestHandler]:
        return iter(list(self._all))

    def async_admit(self, conn: GuardedRequestHandler) -> bool:
        """Register a new connection, shedding an idle one at a cap; False: close it."""
        client = self._by_client.get(conn.client, {})
        plan = plan_admission(client.keys(), self._all.keys(), self.limits)
        if plan.victim is not None:
            self.evicted += 1
            victim = plan.victim
            log.debug(
                "http_connection_evicted",
                peer=victim.peer,
                reason=plan.reason,
                idle_s=round(victim.loop_time() - victim.idle_since, 3),
                for_peer=conn.peer,
            )
            victim.async_shed()
        if not plan.accept:
            self.refused += 1
            log.debug("http_connection_refused", peer=conn.peer, reason=plan.reason, open=len(self._all))
            return False
        self._all[conn] = None
        self._by_client.setdefault(conn.client, {})[conn] = None
        return True

    def async_forget(self, conn: GuardedRequestHandler) -> None:
        """Drop a closed or shed connection (idempotent)."""
        if conn not in self._all:
            return
        del self._all[conn]
        client = self._by_client.get(conn.client)
        if client is not None:
            client.pop(conn, None)
            if not client:
                del self._by_client[conn.client]

    def async_timed_out(self, conn: GuardedRequestHandler, phase: str, timeout_s: float) -> None:
        self.timed_out += 1
        log.debug("http_connection_timed_out", peer=conn.peer, phase=phase, timeout_s=timeout_s)

    def async_close(self) -> None:
        """Cancel every deadline and forget every connection (after the server stopped)."""
        for conn in list(self._all):
            conn.async_cancel_deadline()
        self._all.clear()
        self._by_client.clear()

    def stats(self) -> dict[str, int]:
        return {
            "open": len(self._all),
            "clients": len(self._by_client),
            "evicted": self.evicted,
            "refused": self.refused,
            "timed_out": self.timed_out,
        }


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, with a deadline while no request is in progress."""

    def __init__(self, manager: GuardedServer, *, guard: ConnectionGuard, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._guard = guard
        self._guard_loop = loop
        self.client = UNKNOWN_CLIENT
        self.peer = UNKNOWN_CLIENT
        self.busy = False
        self.idle_since = loop.time()
        self._phase = PHASE_FIRST_HEAD
        self._deadline: asyncio.TimerHandle | None = None
        # The last request's body: aiohttp lingers reading what the handler left unread.
        self._last_body: StreamReader | None = None

    def loop_time(self) -> float:
        return self._guard_loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peername = transport.get_extra_info("peername")
        self.client = client_key(peername)
        self.peer = format_peer(peername)
        self.idle_since = self.loop_time()
        if not self._guard.async_admit(self):
            self.force_close()
            return
        self._async_arm(self._guard.limits.header_timeout_s, PHASE_FIRST_HEAD)

    def data_received(self, data: bytes) -> None:
        if data and not self.busy and self._phase == PHASE_IDLE:
            # The next request started after a keep-alive pause: its head has the header timeout.
            self._async_arm(self._guard.limits.header_timeout_s, PHASE_HEAD)
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.async_cancel_deadline()
        self._guard.async_forget(self)
        body, self._last_body = self._last_body, None
        super().connection_lost(exc)
        if body is not None and not self.busy and not body.is_eof():
            # aiohttp would go on lingering on the unread body of a closed connection (up to its
            # lingering_time) with no way for the server's shutdown to end it: end it now.
            body.feed_eof()

    def async_request_started(self) -> None:
        """Mark a request in progress: a complete head was parsed (called by the request factory)."""
        self.busy = True
        self._last_body = None
        self.async_cancel_deadline()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self.busy = False
            self._last_body = request.content
            self.idle_since = self.loop_time()
            if self.transport is not None:
                self._async_arm(self._guard.limits.keepalive_timeout_s, PHASE_IDLE)

    def async_shed(self) -> None:
        """Close this connection now (it has no request in progress)."""
        self.async_cancel_deadline()
        self._guard.async_forget(self)
        self.force_close()

    def async_cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _async_arm(self, timeout_s: float, phase: str) -> None:
        self.async_cancel_deadline()
        self._phase = phase
        self._deadline = self._guard_loop.call_later(timeout_s, self._async_on_deadline, timeout_s)

    def _async_on_deadline(self, timeout_s: float) -> None:
        self._deadline = None
        if self.busy or self.transport is None:
            return
        self._guard.async_timed_out(self, self._phase, timeout_s)
        self.async_shed()


class GuardedServer(web.Server):
    """aiohttp's low-level server (the protocol factory), making guarded handlers."""

    def __init__(
        self,
        handler: Any,
        *,
        guard: ConnectionGuard,
        request_factory: Any = None,
        handler_cancellation: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, request_factory=request_factory, handler_cancellation=handler_cancellation, loop=loop, **kwargs)
        self.guard = guard
        self._handler_kwargs = kwargs
        inner = self.request_factory

        def factory(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: web.RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            if isinstance(protocol, GuardedRequestHandler):
                protocol.async_request_started()
            return inner(message, payload, protocol, writer, task)

        self.request_factory = factory

    @classmethod
    def adopt(cls, plain: web.Server, guard: ConnectionGuard) -> GuardedServer:
        """Build a guarded server with the handler, factory and handler arguments of PLAIN."""
        return cls(
            plain.request_handler,
            guard=guard,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            **plain._kwargs,  # the handler arguments: the runner's plus the app's handler_args
        )

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, guard=self.guard, loop=asyncio.get_running_loop(), **self._handler_kwargs)


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose server guards its connections."""

    def __init__(self, app: web.Application, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> web.Server:
        return GuardedServer.adopt(await super()._make_server(), self._guard)
