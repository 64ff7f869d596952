"""The conversation pipeline and native routes end to end: real llama.cpp, real ONNX embedder,
real SQLite, a real aiohttp server on 127.0.0.1 and a real HTTP client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from mongarsd.api import native
from mongarsd.api.app import AppContext, create_app
from mongarsd.board import BoardInfo
from mongarsd.cognition.pipeline import ChatChunk, ChatResult, ConversationPipeline
from mongarsd.config import AuthConfig, Config, LoadedConfig
from mongarsd.inference.embed import Embedder
from mongarsd.inference.llm import LlamaEngine
from mongarsd.inference.sampling import SamplingSpec
from mongarsd.inference.settings import EngineSettings
from mongarsd.memory.db import Database
from mongarsd.memory.hippocampus import Hippocampus
from mongarsd.memory.tokens import TokenStore
from mongarsd.metrics import Metrics
from tests.conftest import DEFAULT_EMBED_DIR, DEFAULT_LLM, requires_models

MODEL = DEFAULT_LLM
EMBED_DIR = DEFAULT_EMBED_DIR
pytestmark = [
    requires_models(),
    pytest.mark.asyncio(loop_scope="module"),
    # The foundation's middlewares key requests with plain strings (the lead's code); not ours to fix here.
    pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning"),
]
GEN = {"max_tokens": 24, "temperature": 0.0, "seed": 1}
SPEC = SamplingSpec(max_tokens=24, temperature=0.0, seed=1)


@dataclass
class Stack:
    url: str
    alice: str
    bob: str
    pipeline: ConversationPipeline
    hippocampus: Hippocampus
    db: Database


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("conv")
    db = Database(path=tmp / "mongarsd.db")
    await db.async_start()
    emb = Embedder(model_dir=EMBED_DIR)
    await emb.async_start()
    await emb.async_embed(["warm up the worker thread"])
    hippo = Hippocampus(db=db, embedder=emb)
    await hippo.async_start()
    engine = LlamaEngine(model_path=MODEL, settings=EngineSettings(n_ctx=2048, n_batch=256, n_ubatch=256, slots=2, queue_depth=8))
    await engine.async_start()
    pipeline = ConversationPipeline(hippocampus=hippo, llm=engine, recall_k=5, history_turns=4, max_message_chars=32000)
    tokens = TokenStore(db=db)
    alice, _ = await tokens.async_create("alice", "user")
    bob, _ = await tokens.async_create("bob", "user")
    board = BoardInfo(profile="generic", model="test", arch="x86_64", cores_logical=2, cores_physical=2)
    ctx = AppContext(
        loaded=LoadedConfig(Config(auth=AuthConfig(rate_limit_rps=1000.0, rate_limit_burst=1000)), {}, "generic"), board=board, metrics=Metrics(), db=db, tokens=tokens,
        embedder=emb, hippocampus=hippo, pipeline=pipeline,
    )  # fmt: skip
    ctx.state.ready = True
    app = create_app(ctx, [native.setup_routes])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield Stack(f"http://127.0.0.1:{port}", alice, bob, pipeline, hippo, db)
    await runner.cleanup()
    await engine.async_stop()
    await hippo.async_stop()
    await emb.async_stop()
    await db.async_stop()


async def call(stack: Stack, method: str, path: str, token: str | None, body: Any = None, *, raw: bytes | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s:
        kw: dict[str, Any] = {"headers": headers}
        if raw is not None:
            kw["data"] = raw
            headers["Content-Type"] = "application/json"
        elif body is not None:
            kw["json"] = body
        async with s.request(method, stack.url + path, **kw) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except json.JSONDecodeError:
                return resp.status, text


async def test_fact_told_in_one_session_is_recalled_in_another_only_for_its_owner(stack: Stack) -> None:
    st, told = await call(stack, "POST", "/api/v1/conversation/chat", stack.alice,
                          {"message": "My daughter's name is Ophélie and she plays the violin.", "session_id": "first", **GEN})  # fmt: skip
    assert st == 200, told
    assert told["session_id"] == "first" and isinstance(told["message_id"], int) and told["response"]
    assert told["usage"]["completion_tokens"] > 0 and told["processing_time_ms"] > 0
    fact_ids = {m["id"] for m in (await call(stack, "GET", "/api/v1/memory", stack.alice))[1]["memories"]}
    assert fact_ids

    st, asked = await call(
        stack,
        "POST",
        "/api/v1/conversation/chat",
        stack.alice,
        {"message": "What instrument does my daughter play?", "session_id": "second", **GEN},
    )
    assert st == 200, asked
    used = {m["id"] for m in asked["memories_used"]}
    assert used & fact_ids, asked["memories_used"]
    assert any("Ophélie" in m["text"] for m in asked["memories_used"])

    st, bobs = await call(
        stack, "POST", "/api/v1/conversation/chat", stack.bob, {"message": "What instrument does Ophélie play, the violin?", **GEN}
    )
    assert st == 200, bobs
    assert not ({m["id"] for m in bobs["memories_used"]} & fact_ids)
    assert all("Ophélie" not in m["text"] or "instrument" in m["text"] for m in bobs["memories_used"])  # only bob's own words
    st, search = await call(stack, "GET", "/api/v1/memory/search?q=daughter%20violin&k=10", stack.bob)
    assert st == 200 and not ({h["id"] for h in search["results"]} & fact_ids)


async def test_history_is_ordered_and_own_only(stack: Stack) -> None:
    for i in range(3):
        st, _ = await call(
            stack, "POST", "/api/v1/conversation/chat", stack.alice, {"message": f"Count with me: number {i}.", "session_id": "hist", **GEN}
        )
        assert st == 200
    st, hist = await call(stack, "GET", "/api/v1/conversation/history?session_id=hist&limit=200", stack.alice)
    assert st == 200
    msgs = hist["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert [m["content"] for m in msgs if m["role"] == "user"] == [f"Count with me: number {i}." for i in range(3)]
    assert [m["id"] for m in msgs] == sorted(m["id"] for m in msgs)
    st, other = await call(stack, "GET", "/api/v1/conversation/history?session_id=hist", stack.bob)
    assert st == 200 and other["messages"] == []


async def test_streaming_ndjson_ends_with_durable_result(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.alice}"}
    async with aiohttp.ClientSession() as s, s.post(stack.url + "/api/v1/conversation/chat", headers=headers,
                                                    json={"message": "Say hello in three words.", "session_id": "stream", "stream": True, **GEN}) as resp:  # fmt: skip
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) async for line in resp.content if line.strip()]
    assert lines[-1]["done"] is True and all(not ln["done"] for ln in lines[:-1])
    streamed = "".join(ln["delta"] for ln in lines[:-1])
    assert lines[-1]["response"].startswith(streamed.strip()[:10])
    st, hist = await call(stack, "GET", "/api/v1/conversation/history?session_id=stream", stack.alice)
    assert st == 200
    assert hist["messages"][-1]["id"] == lines[-1]["message_id"]


async def test_pipeline_stream_api_and_persona_messages(stack: Stack) -> None:
    items = [x async for x in await stack.pipeline.async_chat("carol", "Tell me a colour.", "p1", stream=True, spec=SPEC)]
    assert isinstance(items[-1], ChatResult) and all(isinstance(x, ChatChunk) for x in items[:-1])
    assert set(items[-1].timings_ms) >= {"history", "recall", "profile", "prompt", "first_token", "generate", "persist", "total"}
    events = [
        ev
        async for ev in stack.pipeline.async_chat_messages(
            "carol", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, I am Carol."}], False, None
        )
    ]
    assert events[-1].finish_reason is not None and events[-1].completion_tokens > 0
    hist = await stack.hippocampus.async_history("carol", session_id="default")
    assert [m.content for m in hist if m.role == "user"] == ["Hi, I am Carol."]


async def test_research_context_is_never_stored_as_the_users_words(stack: Stack) -> None:
    result = await stack.pipeline.async_chat(
        "dave", "Who painted the Mona Lisa?", "r1", context=["RESEARCH: Leonardo da Vinci painted it."], spec=SPEC
    )
    hist = await stack.hippocampus.async_history("dave")
    assert hist[0].content == "Who painted the Mona Lisa?"
    mems = await stack.hippocampus.async_list_memories("dave")
    assert all("RESEARCH" not in m.text for m in mems)
    assert result.message_id == hist[1].id


async def test_memory_routes_crud_and_isolation(stack: Stack) -> None:
    st, mem = await call(stack, "POST", "/api/v1/memory", stack.alice, {"text": "Alice's gate code is 7731.", "importance": 0.9})
    assert st == 201 and mem["embedded"] is True
    st, found = await call(stack, "GET", "/api/v1/memory/search?q=gate%20code&k=3", stack.alice)
    assert st == 200 and found["status"] == "ok" and found["results"][0]["id"] == mem["id"]
    assert (await call(stack, "GET", f"/api/v1/memory/{mem['id']}", stack.bob))[0] == 404
    st, body = await call(stack, "DELETE", f"/api/v1/memory/{mem['id']}", stack.bob)
    assert st == 404 and body["error"]["code"] == "not_found"
    assert (await call(stack, "GET", f"/api/v1/memory/{mem['id']}", stack.alice))[0] == 200
    assert (await call(stack, "DELETE", f"/api/v1/memory/{mem['id']}", stack.alice)) == (200, {"deleted": mem["id"]})
    assert (await call(stack, "DELETE", f"/api/v1/memory/{mem['id']}", stack.alice))[0] == 404


async def test_profile_and_feedback(stack: Stack) -> None:
    st, prof = await call(stack, "GET", "/api/v1/profile", stack.alice)
    assert st == 200 and prof["style"]["messages"] >= 1
    st, prof = await call(stack, "PUT", "/api/v1/profile", stack.alice, {"interaction_style": {"verbosity": 0.1}, "note": "Call me Al"})
    assert st == 200 and prof["personality"]["interaction_style"]["verbosity"] == 0.1
    assert "Keep answers short." in prof["directives"]
    st, hist = await call(stack, "GET", "/api/v1/conversation/history?limit=1", stack.alice)
    mid = hist["messages"][-1]["id"]
    assert (
        await call(stack, "POST", "/api/v1/feedback", stack.alice, {"message_id": mid, "rating": "up", "comment": "more detail please"})
    )[0] == 201
    st, body = await call(stack, "POST", "/api/v1/feedback", stack.bob, {"message_id": mid, "rating": 1})
    assert st == 404 and body["error"]["param"] == "message_id"
    st, prof = await call(stack, "GET", "/api/v1/profile", stack.alice)
    assert prof["personality"]["feedback"] == 1 and prof["personality"]["interaction_style"]["verbosity"] > 0.1
    st, body = await call(stack, "PUT", "/api/v1/profile", stack.alice, {"traits": {"openness": 7}})
    assert st == 400 and body["error"]["param"] == "traits.openness"


HOSTILE: list[tuple[str, str, Any, bytes | None, int, str | None]] = [
    ("POST", "/api/v1/conversation/chat", {"message": 123}, None, 400, "message"),
    ("POST", "/api/v1/conversation/chat", {"message": "   "}, None, 400, "message"),
    ("POST", "/api/v1/conversation/chat", {}, None, 400, "message"),
    ("POST", "/api/v1/conversation/chat", {"message": "x" * 40000}, None, 413, "message"),
    ("POST", "/api/v1/conversation/chat", None, b'{"message": "caf\xff"}', 400, "body"),
    ("POST", "/api/v1/conversation/chat", None, b"[1, 2]", 400, "body"),
    ("POST", "/api/v1/conversation/chat", None, b'{"message": "hi",', 400, "body"),
    ("POST", "/api/v1/conversation/chat", {"message": "hi", "session_id": "../../etc"}, None, 400, "session_id"),
    ("POST", "/api/v1/conversation/chat", {"message": "hi", "session_id": 5}, None, 400, "session_id"),
    ("POST", "/api/v1/conversation/chat", {"message": "hi", "max_tokens": "10"}, None, 400, "max_tokens"),
    ("POST", "/api/v1/conversation/chat", {"message": "hi", "max_tokens": 0}, None, 400, "max_tokens"),
    ("POST", "/api/v1/conversation/chat", {"message": "hi", "stream": "yes"}, None, 400, "stream"),
    ("GET", "/api/v1/conversation/history?limit=0", None, None, 400, "limit"),
    ("GET", "/api/v1/conversation/history?limit=201", None, None, 400, "limit"),
    ("GET", "/api/v1/conversation/history?limit=ten", None, None, 400, "limit"),
    ("GET", "/api/v1/conversation/history?session_id=a%27%20OR%201=1", None, None, 400, "session_id"),
    ("GET", "/api/v1/memory/search", None, None, 400, "q"),
    ("GET", "/api/v1/memory/search?q=x&k=999", None, None, 400, "k"),
    ("DELETE", "/api/v1/memory/1%20OR%201=1", None, None, 400, "id"),
    ("POST", "/api/v1/memory", {"text": ""}, None, 400, "text"),
    ("POST", "/api/v1/memory", {"text": "x", "importance": 3}, None, 400, "importance"),
    ("POST", "/api/v1/memory", {"text": "x", "kind": "root"}, None, 400, "kind"),
    ("POST", "/api/v1/feedback", {"rating": 5}, None, 400, "rating"),
    ("POST", "/api/v1/feedback", {"rating": 1, "message_id": "abc"}, None, 400, "message_id"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[f"{c[0]} {c[1][:40]} {c[5]}" for c in HOSTILE])
async def test_hostile_inputs_get_clear_4xx(stack: Stack, case: tuple[str, str, Any, bytes | None, int, str | None]) -> None:
    method, path, body, raw, status, param = case
    st, resp = await call(stack, method, path, stack.alice, body, raw=raw)
    assert st == status, resp
    assert isinstance(resp, dict) and resp["error"]["message"]
    assert resp["error"].get("param") == param, resp


@pytest.mark.parametrize("q", ['" OR 1=1 --', "NEAR(a b)", "x*", "text:secret", "'; DROP TABLE memories; --", "((("])
async def test_fts_syntax_in_search_is_just_text(stack: Stack, q: str) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(stack.url + "/api/v1/memory/search", params={"q": q}, headers={"Authorization": f"Bearer {stack.alice}"}) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    row = await stack.db.async_fetchone("PRAGMA integrity_check")
    assert row is not None and row[0] == "ok"


async def test_message_too_long_for_the_context_is_413(stack: Stack) -> None:
    words = " ".join(f"w{i}x{i * 7}" for i in range(1500))  # far over 2048 tokens, under the character cap
    st, body = await call(stack, "POST", "/api/v1/conversation/chat", stack.alice, {"message": words, "max_tokens": 16})
    assert st == 413 and body["error"]["param"] == "message", body
    assert "tokens" in body["error"]["message"]
