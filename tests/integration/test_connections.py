"""Connection hygiene over real sockets on 127.0.0.1: head and idle deadlines, per-client and global caps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from mongarsd.api.connections import (
    REASON_CLIENT_CAP,
    REASON_TOTAL_CAP,
    ConnectionLimits,
    GuardedRequestHandler,
    client_key,
    fd_limited_max_total,
    plan_admission,
)
from mongarsd.daemon import HttpService

pytestmark = pytest.mark.timeout(30)

LOCAL = "127.0.0.1"
HANDLER_FIELD_SIZE = 16384  # a non-default handler argument, to prove the app's handler_args reach our handler
LONG_S = 30.0  # a deadline no test waits for
CLOSE_WAIT_S = 2.0  # how long a test waits for a connection the server should close
STILL_OPEN_S = 0.1  # how long a connection must stay open to count as not closed
FAST_REQUEST_S = 1.0  # a normal request must be answered within this while slow clients are shed
POLL_S = 0.01
POLL_ROUNDS = 300


class Backend:
    """A tiny app: /ok answers at once, /slow waits until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0
        self.app = web.Application(handler_args={"max_field_size": HANDLER_FIELD_SIZE})
        self.app.router.add_route("*", "/ok", self._ok)
        self.app.router.add_get("/slow", self._slow)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _slow(self, request: web.Request) -> web.Response:
        self.entered += 1
        await self.release.wait()
        return web.Response(text="slow")


@dataclass
class Served:
    service: HttpService
    backend: Backend
    port: int


@asynccontextmanager
async def serving(limits: ConnectionLimits) -> AsyncIterator[Served]:
    backend = Backend()
    service = HttpService(app=backend.app, host=LOCAL, port=0, drain_timeout_s=1.0, limits=limits)
    await service.async_start()
    try:
        yield Served(service, backend, service.bound[0][1])
    finally:
        backend.release.set()
        await service.async_stop()
    await until(lambda: not other_tasks(), "no connection task outlives the server")
    assert len(service.connections) == 0


def other_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


@asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(LOCAL, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass  # the server already reset it


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    """Return whether the server closes the connection within TIMEOUT_S (reading and dropping any data)."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    async with asyncio.timeout(CLOSE_WAIT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
        return int(lines[0].split()[1]), await reader.readexactly(length)


def request(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {LOCAL}\r\n{extra}\r\n".encode()


async def get(port: int, path: str) -> tuple[int, bytes]:
    """One complete request on a new connection."""
    async with connection(port) as (reader, writer):
        writer.write(request(path))
        return await read_response(reader)


async def until(predicate: object, what: str) -> None:
    """Wait, a bounded number of short rounds, until PREDICATE() is true."""
    assert callable(predicate)
    for _ in range(POLL_ROUNDS):
        if predicate():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"never happened: {what}")


# --- what aiohttp does alone, and the hooks we rely on ---------------------------------------------


async def test_aiohttp_alone_gives_the_head_no_deadline_of_its_own() -> None:
    # Why this module exists: aiohttp 3.14.5 bounds a silent or trickling connection only by
    # keepalive_timeout from connecting (older 3.x releases not at all), never by a head deadline.
    app = web.Application()
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=LONG_S)
    await runner.setup()
    site = web.TCPSite(runner, LOCAL, 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with connection(port) as (reader, writer):
            writer.write(b"GET /ok HTTP/1.1\r\n")
            assert not await closed_within(reader, 0.5), "aiohttp now has a head deadline: revisit mongarsd.api.connections"
    finally:
        await runner.cleanup()


async def test_guarded_handler_keeps_the_app_and_runner_handler_arguments() -> None:
    limits = ConnectionLimits(header_timeout_s=LONG_S, keepalive_timeout_s=12.5)
    async with serving(limits) as s, connection(s.port):
        await until(lambda: len(s.service.connections) == 1, "the connection is registered")
        (handler,) = list(s.service.connections)
        assert isinstance(handler, GuardedRequestHandler)
        assert handler.max_field_size == HANDLER_FIELD_SIZE  # the app's handler_args (via web.Server's _kwargs)
        assert handler.keepalive_timeout == 12.5  # the runner's keepalive_timeout, set explicitly
        assert handler.client == LOCAL
    assert len(s.service.connections) == 0


# --- deadlines --------------------------------------------------------------------------------------


async def test_silent_connection_is_closed_after_the_header_timeout() -> None:
    async with serving(ConnectionLimits(header_timeout_s=0.3, keepalive_timeout_s=LONG_S)) as s:
        async with connection(s.port) as (reader, _):
            start = time.monotonic()
            assert not await closed_within(reader, STILL_OPEN_S)
            assert await closed_within(reader, CLOSE_WAIT_S)
            assert 0.25 <= time.monotonic() - start < CLOSE_WAIT_S
        await until(lambda: len(s.service.connections) == 0, "the closed connection is forgotten")
        assert s.service.connections.timed_out == 1


async def test_slowloris_head_is_closed_although_bytes_keep_coming() -> None:
    async with serving(ConnectionLimits(header_timeout_s=0.5, keepalive_timeout_s=LONG_S)) as s:
        async with connection(s.port) as (reader, writer):
            start = time.monotonic()
            closed = asyncio.create_task(closed_within(reader, CLOSE_WAIT_S * 2))
            writer.write(request("/ok").removesuffix(b"\r\n"))  # everything but the blank line ending the head
            sent = 0
            for _ in range(100):  # one header byte every 50 ms, for at most 5 s
                if closed.done():
                    break
                try:
                    writer.write(b"a")
                    await writer.drain()
                except ConnectionError:
                    break
                sent += 1
                await asyncio.sleep(0.05)
            assert await closed
            elapsed = time.monotonic() - start
        assert sent >= 5  # it really trickled
        assert 0.45 <= elapsed < CLOSE_WAIT_S
        assert s.service.connections.timed_out == 1


async def test_idle_keepalive_connection_is_reused_then_closed_after_the_keepalive_timeout() -> None:
    async with serving(ConnectionLimits(header_timeout_s=0.2, keepalive_timeout_s=1.0)) as s, connection(s.port) as (reader, writer):
        writer.write(request("/ok"))
        assert await read_response(reader) == (200, b"ok")
        await asyncio.sleep(0.4)  # idle longer than the header timeout: the keep-alive deadline applies
        writer.write(request("/ok"))
        assert await read_response(reader) == (200, b"ok")
        idle_from = time.monotonic()
        assert await closed_within(reader, CLOSE_WAIT_S * 2)
        assert 0.7 <= time.monotonic() - idle_from < CLOSE_WAIT_S * 2  # well past the 0.2 s header timeout


async def test_partial_head_after_a_keepalive_pause_gets_the_header_timeout() -> None:
    async with serving(ConnectionLimits(header_timeout_s=0.3, keepalive_timeout_s=LONG_S)) as s, connection(s.port) as (reader, writer):
        writer.write(request("/ok"))
        assert await read_response(reader) == (200, b"ok")
        writer.write(b"GET /ok HTTP/1.1\r\n")
        started = time.monotonic()
        assert await closed_within(reader, CLOSE_WAIT_S)
        assert 0.25 <= time.monotonic() - started < CLOSE_WAIT_S


async def test_unread_body_that_never_finishes_does_not_hold_the_connection() -> None:
    # /ok answers without reading the body; aiohttp would linger on the missing bytes for 10 s.
    async with serving(ConnectionLimits(header_timeout_s=0.3, keepalive_timeout_s=0.5)) as s, connection(s.port) as (reader, writer):
        writer.write(request("/ok", "POST", "Content-Length: 1000\r\n") + b"0123456789")
        assert await read_response(reader) == (200, b"ok")
        assert await closed_within(reader, CLOSE_WAIT_S)


# --- caps -------------------------------------------------------------------------------------------


async def test_per_client_cap_sheds_the_oldest_idle_and_normal_requests_still_succeed() -> None:
    cap, opened = 4, 10
    async with serving(ConnectionLimits(header_timeout_s=LONG_S, keepalive_timeout_s=LONG_S, max_per_client=cap, max_total=100)) as s:
        conns = []
        guard = s.service.connections
        try:
            for _ in range(opened):
                conns.append(await asyncio.open_connection(LOCAL, s.port))
                await until(
                    lambda: (len(guard), guard.evicted) == (min(len(conns), cap), max(0, len(conns) - cap)), "registered, oldest shed"
                )
            assert len(s.service.connections) == cap
            for reader, _ in conns[: opened - cap]:
                assert await closed_within(reader, CLOSE_WAIT_S)
            for reader, _ in conns[opened - cap :]:
                assert not await closed_within(reader, STILL_OPEN_S)
            started = time.monotonic()
            assert await get(s.port, "/ok") == (200, b"ok")
            assert time.monotonic() - started < FAST_REQUEST_S
            assert await closed_within(conns[opened - cap][0], CLOSE_WAIT_S)  # made room for the request
            assert s.service.connections.evicted == opened - cap + 1
            assert s.service.connections.refused == 0
        finally:
            for _, writer in conns:
                writer.close()


async def test_the_connection_idle_longest_is_shed_not_the_one_connected_first() -> None:
    limits = ConnectionLimits(header_timeout_s=LONG_S, keepalive_timeout_s=LONG_S, max_per_client=3)
    async with (
        serving(limits) as s,
        connection(s.port) as (kept_r, kept_w),
        connection(s.port) as (silent_r, _),
        connection(s.port),
    ):
        await until(lambda: len(s.service.connections) == 3, "three connections")
        kept_w.write(request("/ok"))  # the first connection is used again: it becomes the most recently idle
        assert await read_response(kept_r) == (200, b"ok")
        async with connection(s.port):
            assert await closed_within(silent_r, CLOSE_WAIT_S)
            assert not await closed_within(kept_r, STILL_OPEN_S)
            kept_w.write(request("/ok"))
            assert await read_response(kept_r) == (200, b"ok")


async def test_busy_connections_are_never_shed_and_the_new_one_is_refused() -> None:
    limits = ConnectionLimits(header_timeout_s=LONG_S, keepalive_timeout_s=LONG_S, max_per_client=2)
    async with serving(limits) as s, connection(s.port) as (a_r, a_w), connection(s.port) as (b_r, _):
        a_w.write(request("/slow"))
        await until(lambda: s.backend.entered == 1, "A's request is in progress")
        async with connection(s.port) as (c_r, c_w):
            assert await closed_within(b_r, CLOSE_WAIT_S)  # idle B made room, busy A did not
            c_w.write(request("/slow"))
            await until(lambda: s.backend.entered == 2, "C's request is in progress")
            async with connection(s.port) as (d_r, _):
                assert await closed_within(d_r, CLOSE_WAIT_S)  # A and C are busy: D is refused
            assert s.service.connections.refused == 1
            assert s.service.connections.evicted == 1
            s.backend.release.set()
            assert await read_response(a_r) == (200, b"slow")
            assert await read_response(c_r) == (200, b"slow")


async def test_global_cap_sheds_the_oldest_idle_of_any_client() -> None:
    limits = ConnectionLimits(header_timeout_s=LONG_S, keepalive_timeout_s=LONG_S, max_per_client=64, max_total=3)
    async with serving(limits) as s, connection(s.port) as (first_r, _), connection(s.port), connection(s.port):
        await until(lambda: len(s.service.connections) == 3, "three connections")
        with capture_logs() as logs:
            async with connection(s.port) as (fourth_r, _):
                assert await closed_within(first_r, CLOSE_WAIT_S)
                assert not await closed_within(fourth_r, STILL_OPEN_S)
    evicted = [e for e in logs if e["event"] == "http_connection_evicted"]
    assert len(evicted) == 1
    assert evicted[0]["reason"] == REASON_TOTAL_CAP
    assert evicted[0]["peer"].startswith(f"{LOCAL}:")


async def test_many_slow_clients_do_not_stall_normal_requests() -> None:
    slow_clients, cap = 40, 8
    async with serving(ConnectionLimits(header_timeout_s=1.0, keepalive_timeout_s=LONG_S, max_per_client=cap)) as s:

        async def slowloris() -> None:
            async with connection(s.port) as (reader, writer):
                writer.write(b"GET /ok HTTP/1.1\r\n")
                for _ in range(40):  # a header byte every 50 ms until the server closes it, at most 2 s
                    if reader.at_eof():
                        return
                    try:
                        writer.write(b"a")
                        await writer.drain()
                    except ConnectionError:
                        return
                    await asyncio.sleep(0.05)

        async with asyncio.TaskGroup() as tg:
            for _ in range(slow_clients):
                tg.create_task(slowloris())
            await until(lambda: s.service.connections.evicted >= slow_clients - cap, "slow clients are shed")
            for _ in range(10):
                started = time.monotonic()
                assert await get(s.port, "/ok") == (200, b"ok")
                assert time.monotonic() - started < FAST_REQUEST_S
        assert s.service.connections.refused == 0


# --- decisions --------------------------------------------------------------------------------------


@dataclass
class Conn:
    busy: bool
    idle_since: float


def test_plan_admission_sheds_the_idle_longest_and_refuses_when_all_are_busy() -> None:
    limits = ConnectionLimits(max_per_client=3, max_total=5)
    old, new, busy = Conn(False, 1.0), Conn(False, 2.0), Conn(True, 0.0)
    assert plan_admission([busy, new], [busy, new], limits).accept
    plan = plan_admission([busy, new, old], [busy, new, old], limits)
    assert (plan.accept, plan.victim, plan.reason) == (True, old, REASON_CLIENT_CAP)
    plan = plan_admission([busy, busy, busy], [busy, busy, busy], limits)
    assert (plan.accept, plan.victim, plan.reason) == (False, None, REASON_CLIENT_CAP)
    others = [Conn(True, 0.0), Conn(False, 0.5), Conn(True, 0.0)]
    plan = plan_admission([new], [new, *others, busy], limits)
    assert (plan.accept, plan.victim, plan.reason) == (True, others[1], REASON_TOTAL_CAP)
    plan = plan_admission([busy], [busy, *[Conn(True, 0.0)] * 4], limits)
    assert (plan.accept, plan.victim, plan.reason) == (False, None, REASON_TOTAL_CAP)


def test_client_key_groups_ipv6_by_64_and_unwraps_mapped_ipv4() -> None:
    assert client_key(("127.0.0.1", 5000)) == "127.0.0.1"
    assert client_key(("::ffff:10.0.0.7", 5000, 0, 0)) == "10.0.0.7"
    assert client_key(("2001:db8:1:2:aaaa::1", 5000, 0, 0)) == "2001:db8:1:2::/64"
    assert client_key(("2001:db8:1:2:bbbb::9", 5001, 0, 0)) == "2001:db8:1:2::/64"
    assert client_key(("fe80::1%eth0", 5000, 0, 2)) == "fe80::/64"
    assert client_key("/run/mongarsd.sock") == client_key(None) == "unknown"


def test_global_cap_fits_the_open_files_limit() -> None:
    assert fd_limited_max_total(1024, 1024, 128) == 896
    assert fd_limited_max_total(1024, 65536, 128) == 1024
    assert fd_limited_max_total(1024, -1, 128) == 1024  # RLIM_INFINITY
    assert fd_limited_max_total(1024, 64, 128) == 1
