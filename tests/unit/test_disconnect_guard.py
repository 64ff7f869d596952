"""DisconnectGuard over a real loopback aiohttp server: polls while quiet, not while a stream writes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from mongarsd.api.streaming import DISCONNECT_POLL_S, DisconnectGuard, StreamWriter

WRITES = 40
WRITE_GAP_S = 0.02
QUIET_S = 0.5


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record when each guard polls its transport."""
    seen: list[float] = []
    real = DisconnectGuard._check

    def counting(self: DisconnectGuard) -> None:
        seen.append(time.monotonic())
        real(self)

    monkeypatch.setattr(DisconnectGuard, "_check", counting)
    return seen


@asynccontextmanager
async def _served(app: web.Application) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """Serve on a loopback port as the daemon does: handlers are not cancelled on disconnect."""
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            yield session, f"http://127.0.0.1:{port}/stream"
    finally:
        await runner.cleanup()


def _app(ended: list[str]) -> web.Application:
    async def stream(request: web.Request) -> web.StreamResponse:
        quiet = request.query.get("quiet") == "1"
        try:
            async with (guard := DisconnectGuard(request)):
                if quiet:  # as a request waiting in the queue or prefilling: nothing written yet
                    await asyncio.sleep(QUIET_S)
                writer = StreamWriter(request, "sse")
                await writer.async_prepare()
                for i in range(WRITES):
                    await writer.async_send({"i": i})
                    await asyncio.sleep(WRITE_GAP_S)
                ended.append("done")
                return await writer.async_done()
            ended.append("client gone")
            return guard.response
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    app = web.Application()
    app.router.add_get("/stream", stream)
    return app


async def test_a_stream_that_keeps_writing_is_not_polled(checks: list[float]) -> None:
    ended: list[str] = []
    async with _served(_app(ended)) as (session, url), session.get(url) as resp:
        body = await resp.read()
    assert resp.status == 200 and body.count(b"data: ") == WRITES + 1 and ended == ["done"]
    # one check on entry; every write pushed the next one past the following write
    assert len(checks) == 1, checks


async def test_a_quiet_request_is_polled_every_interval(checks: list[float]) -> None:
    ended: list[str] = []
    async with _served(_app(ended)) as (session, url), session.get(url, params={"quiet": "1"}) as resp:
        await resp.read()
    assert ended == ["done"]
    quiet_checks = [t for t in checks if t - checks[0] < QUIET_S]
    assert len(quiet_checks) >= QUIET_S / DISCONNECT_POLL_S * 0.6, checks


async def test_a_client_that_hangs_up_mid_stream_ends_the_handler_at_once(checks: list[float]) -> None:
    ended: list[str] = []
    async with _served(_app(ended)) as (session, url):
        resp = await session.get(url)
        await resp.content.readuntil(b"\n\n")
        t0 = time.monotonic()
        resp.close()
        for _ in range(100):  # bounded: 100 x 10 ms
            if ended:
                break
            await asyncio.sleep(0.01)
        took = time.monotonic() - t0
    assert ended == ["client gone"] and took < 0.5, (ended, took)
