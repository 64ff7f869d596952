"""Admission control and cancellation: concurrent streams, full queues, clients that go away."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import DaemonProc, requires_models
from tests.integration.test_openai_api import start_llm_daemon

pytestmark = requires_models()

MODEL = "smollm2-135m-instruct:q4_1"
SLOTS = 4
QUEUE = 4
LONG_TOKENS = 400  # 4 x (prompt + 400) cells fit the 2048-cell KV; a stream runs for many seconds


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, str]]:
    env = {"MONGARSD_INFERENCE__SLOTS": str(SLOTS), "MONGARSD_INFERENCE__QUEUE_DEPTH": str(QUEUE), "MONGARSD_INFERENCE__N_CTX": "2048"}
    d, token = start_llm_daemon(tmp_path_factory.mktemp("concurrency"), env=env)
    yield d, token
    d.stop()


def _body(max_tokens: int, i: int = 0) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Tell story number {i}."}], "max_tokens": max_tokens, "stream": True}


async def _stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, str | None, list[str]]:
    """Run one streaming chat; return (status, Retry-After, SSE data payloads)."""
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            await resp.read()
            return resp.status, resp.headers.get("Retry-After"), []
        data = [line[6:] for line in (await resp.text()).split("\n") if line.startswith("data: ")]
        return 200, None, data


async def _ps(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with session.get(url + "/api/ps") as resp:
        models = (await resp.json())["models"]
    return models[0]["slots"] if models else {"busy": 0, "deferred": 0, "active_requests": 0, "total": 0}


async def _predicted(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    m = re.search(r'^llamacpp:tokens_predicted_total\{model="[^"]+"\} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def _wait_for(pred: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(0.05)
    return False


def _session(token: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"Authorization": "Bearer " + token}, timeout=aiohttp.ClientTimeout(total=90))


async def test_many_concurrent_streams_all_served_or_told_to_retry(served: tuple[DaemonProc, str]) -> None:
    d, token = served
    n = SLOTS + QUEUE + 4
    async with _session(token) as session:
        results = await asyncio.wait_for(asyncio.gather(*(_stream(session, d.url, _body(16, i)) for i in range(n))), timeout=90)
        statuses = [s for s, _, _ in results]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= SLOTS + QUEUE
        for status, retry_after, data in results:
            if status == 429:
                assert retry_after is not None and int(retry_after) >= 1
                continue
            assert data[-1] == "[DONE]"
            chunks = [json.loads(x) for x in data[:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip()
        assert await _wait_for(lambda: _idle(session, d.url), 5)


async def _idle(session: aiohttp.ClientSession, url: str) -> bool:
    s = await _ps(session, url)
    return s["busy"] == 0 and s["deferred"] == 0 and s["active_requests"] == 0


async def test_full_queue_gets_429_with_retry_after(served: tuple[DaemonProc, str]) -> None:
    d, token = served
    async with _session(token) as session:
        # fill every slot and the whole queue with long streams (their clients read slowly)
        hold = [asyncio.create_task(_stream(session, d.url, _body(LONG_TOKENS, i))) for i in range(SLOTS + QUEUE)]
        try:

            async def full() -> bool:
                s = await _ps(session, d.url)
                return s["busy"] == SLOTS and s["active_requests"] == SLOTS + QUEUE

            assert await _wait_for(full, 30), await _ps(session, d.url)
            status, retry_after, _ = await _stream(session, d.url, _body(4))
            assert status == 429 and retry_after is not None and int(retry_after) >= 1
            async with session.post(d.url + "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}) as resp:
                assert resp.status == 429 and "busy" in (await resp.json())["error"]
        finally:
            for t in hold:
                t.cancel()
            await asyncio.gather(*hold, return_exceptions=True)
        # the clients that went away free their slots and queue places at once
        assert await _wait_for(lambda: _idle(session, d.url), 2), await _ps(session, d.url)
        status, _, data = await _stream(session, d.url, _body(4))
        assert status == 200 and data[-1] == "[DONE]"


async def test_disconnect_mid_stream_frees_the_slot_at_once(served: tuple[DaemonProc, str]) -> None:
    d, token = served
    async with _session(token) as session:
        responses: list[aiohttp.ClientResponse] = []
        try:
            for i in range(SLOTS):
                resp = await session.post(d.url + "/v1/chat/completions", json=_body(LONG_TOKENS, i))
                assert resp.status == 200
                await resp.content.readuntil(b"\n\n")  # generation is under way
                responses.append(resp)

            async def busy(n: int) -> bool:
                return (await _ps(session, d.url))["busy"] == n

            assert await _wait_for(lambda: busy(SLOTS), 5)
            # two clients hang up mid-stream: their slots free within a poll interval or two
            t0 = time.monotonic()
            for resp in responses[:2]:
                resp.close()
            assert await _wait_for(lambda: busy(SLOTS - 2), 1.0), await _ps(session, d.url)
            freed_s = time.monotonic() - t0
            # a new request is admitted straight into a freed slot
            status, _, data = await _stream(session, d.url, _body(4))
            assert status == 200 and data[-1] == "[DONE]"
            for resp in responses[2:]:
                resp.close()
            assert await _wait_for(lambda: _idle(session, d.url), 1.0), await _ps(session, d.url)
            # nothing keeps decoding for the clients that left
            before = await _predicted(session, d.url)
            await asyncio.sleep(0.5)
            assert await _predicted(session, d.url) == before
            assert freed_s < 1.0
        finally:
            for resp in responses:
                resp.close()
