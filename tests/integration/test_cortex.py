"""Cortex end to end: a real store, the real embedder and Iris's real fetcher against local sites.

A local site serves a page about an invented topic no model can know (and, under a path its
robots.txt disallows, another page on the same topic); a fake SearxNG returns both URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from mongarsd.api import curiosity as curiosity_api
from mongarsd.api.app import AppContext, create_app
from mongarsd.board import BoardInfo
from mongarsd.cognition.cortex import NO_EMBED_FACTOR, RESEARCH_TIMEOUT_S, Cortex, ResearchHandle
from mongarsd.cognition.iris.fetch import Fetcher
from mongarsd.config import AuthConfig, Config, CuriosityConfig, IrisConfig, LoadedConfig
from mongarsd.inference.embed import Embedder
from mongarsd.memory.db import Database
from mongarsd.memory.hippocampus import Hippocampus
from mongarsd.memory.tokens import TokenStore
from mongarsd.metrics import Metrics
from tests.conftest import DEFAULT_EMBED_DIR, DEFAULT_EMBEDDER, requires_models

requires_embedder = requires_models(DEFAULT_EMBEDDER)

BUDGET_S = 20.0  # generous for a shared CI machine; the research itself takes well under a second here
LAG_BOUND_S = 0.020  # P12: event-loop lag p99 while generating
LAG_TICK_S = 0.005

ZORBULON_PAGE = """<!doctype html><html><head><title>The Zorbulon festival of Quimtaro</title></head><body>
<nav><a href="/">Home</a> <a href="/other.html">Other</a></nav>
<article><h1>The Zorbulon festival of Quimtaro</h1>
<p>The Zorbulon festival in Quimtaro is held every 17 March. On that day the people of Quimtaro fly glass kites
over the harbour from dawn until the bells of the old tower ring at dusk.</p>
<p>The festival began in 1823, when a glassblower named Ilvane Pettacorn built the first glass kite to celebrate
the end of a long winter. Every family now makes one kite each year, and the brightest kite wins a copper bell.</p>
<p>Visitors to the Zorbulon festival should bring gloves: the glass kites are sharp and the March wind is cold.</p>
</article></body></html>"""

SECRET_PAGE = """<!doctype html><html><head><title>Zorbulon secrets</title></head><body><article>
<p>The Zorbulon festival of Quimtaro hides a secret: the glass kites are really made of sugar. This page is private.</p>
</article></body></html>"""

OTHER_PAGE = """<!doctype html><html><head><title>Bread</title></head><body><article>
<p>Bread needs flour, water, salt and time. Knead the dough for ten minutes, let it rise twice, then bake it hot.</p>
</article></body></html>"""

INDEX_PAGE = """<!doctype html><html><head><title>Quimtaro town news</title></head><body>
<p>Welcome to the town pages.</p>
<ul><li><a href="/zorbulon.html">Our festival</a></li><li><a href="/private/zorbulon-secret.html">Staff only</a></li>
<li><a href="/other.html">Baking</a></li></ul></body></html>"""

ROBOTS = "User-agent: *\nDisallow: /private/\n"


@dataclass
class Site:
    """The local site and the fake SearxNG, with what each was asked."""

    url: str = ""
    searx_url: str = ""
    paths: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # searches wait for it
    big_page: str = ""


def _html(text: str) -> web.Response:
    return web.Response(text=text, content_type="text/html", charset="utf-8")


@pytest_asyncio.fixture
async def site() -> AsyncIterator[Site]:
    s = Site()
    s.gate.set()

    async def page(request: web.Request) -> web.Response:
        s.paths.append(request.path)
        pages = {
            "/": INDEX_PAGE,
            "/zorbulon.html": ZORBULON_PAGE,
            "/private/zorbulon-secret.html": SECRET_PAGE,
            "/other.html": OTHER_PAGE,
            "/big.html": s.big_page,
        }
        if request.path == "/robots.txt":
            return web.Response(text=ROBOTS, content_type="text/plain")
        if request.path not in pages or not pages[request.path]:
            raise web.HTTPNotFound()
        return _html(pages[request.path])

    async def search(request: web.Request) -> web.Response:
        s.queries.append(request.query.get("q", ""))
        await s.gate.wait()
        q = request.query.get("q", "").lower()
        results = []
        if "zorbulon" in q:
            results = [
                {"url": s.url + "/zorbulon.html", "title": "The Zorbulon festival", "content": "glass kites"},
                {"url": s.url + "/private/zorbulon-secret.html", "title": "Zorbulon secrets", "content": "private"},
            ]
        elif "flimbazz" in q and s.big_page:
            results = [{"url": s.url + "/big.html", "title": "Flimbazz", "content": "a long page"}]
        return web.json_response({"query": q, "results": results})

    site_app = web.Application()
    site_app.router.add_get("/{tail:.*}", page)
    searx_app = web.Application()
    searx_app.router.add_get("/search", search)
    runners = []
    for app in (site_app, searx_app):
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        tcp = web.TCPSite(runner, "127.0.0.1", 0)
        await tcp.start()
        port = runner.addresses[0][1]
        runners.append((runner, f"http://127.0.0.1:{port}"))
    s.url, s.searx_url = runners[0][1], runners[1][1]
    yield s
    s.gate.set()  # nothing may still wait on it while the servers shut down
    for runner, _ in runners:
        await runner.cleanup()


@pytest_asyncio.fixture
async def hippo(tmp_path: Path) -> AsyncIterator[Hippocampus]:
    db = Database(path=tmp_path / "mongarsd.db")
    await db.async_start()
    embedder = Embedder(model_dir=DEFAULT_EMBED_DIR)
    await embedder.async_start()
    h = Hippocampus(db=db, embedder=embedder)
    await h.async_start()
    yield h
    await h.async_stop()
    await embedder.async_stop()
    await db.async_stop()


def iris_config(site: Site, **kw: Any) -> IrisConfig:
    base = IrisConfig(urls=(site.url + "/",), searxng_url=site.searx_url, host_rate_rps=200.0, host_burst=50, timeout_s=5.0)
    return replace(base, **kw)


@pytest_asyncio.fixture
async def make_cortex(hippo: Hippocampus) -> AsyncIterator[Callable[..., Any]]:
    """Build started Cortex services (with their fetchers); stop them all at teardown."""
    async with _cortex_factory(hippo) as make:
        yield make


@contextlib.asynccontextmanager
async def _cortex_factory(hippo: Hippocampus) -> AsyncIterator[Callable[..., Any]]:
    started: list[Any] = []

    async def make(iris: IrisConfig, **curiosity: Any) -> Cortex:
        fetcher = Fetcher(config=iris)
        await fetcher.async_start()
        started.append(fetcher)
        cortex = Cortex(
            hippocampus=hippo,
            fetcher=fetcher,
            config=CuriosityConfig(**{"research_budget_s": BUDGET_S, **curiosity}),
            crawl_max_pages=iris.crawl_max_pages,
        )
        await cortex.async_start()
        started.append(cortex)
        return cortex

    try:
        yield make
    finally:
        for svc in reversed(started):
            await svc.async_stop()


async def ask(hippo: Hippocampus, cortex: Cortex, user: str, text: str) -> ResearchHandle | None:
    """What the pipeline does right after recall."""
    recall = await hippo.async_recall(user, text, 5)
    return await cortex.async_consider(user, text, recall)


def samples(cortex: Cortex) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(name, tuple(labels.items())): value for name, _, _, value, labels in cortex.metrics()}


async def seed_alice(hippo: Hippocampus) -> None:
    for text in (
        "I am learning to play the cello on weekends.",
        "My dog Rex likes long walks in the park by the river.",
        "I work as a nurse in a children's hospital.",
    ):
        await hippo.async_store_turn("alice", "s1", text, "Nice.")


# ------------------------------------------------------------------------------ the main path


@requires_embedder
async def test_research_is_stored_for_the_asker_only_and_recalled_next_turn(
    site: Site, hippo: Hippocampus, make_cortex: Callable[..., Any]
) -> None:
    cortex: Cortex = await make_cortex(iris_config(site))
    await seed_alice(hippo)
    await hippo.async_store_turn("bob", "s1", "I bake bread every Sunday morning for my family.", "Yum.")
    messages_before = len(await hippo.async_history("alice", limit=100))

    t0 = time.monotonic()
    handle = await ask(hippo, cortex, "alice", "What is the Zorbulon festival?")
    assert handle is not None, "an invented topic is a gap"
    assert time.monotonic() - t0 < 2.0, "considering returns at once; the research runs in the background"
    assert await cortex.async_wait(handle, BUDGET_S), "the research finished within the budget"
    assert handle.status == "done" and handle.memories >= 1

    page_url = site.url + "/zorbulon.html"
    research = [m for m in await hippo.async_list_memories("alice", limit=100) if m.kind == "research"]
    assert research, "a research memory was stored for alice"
    for memory in research:
        prov = json.loads(memory.provenance or "{}")
        assert set(prov) == {"source", "title", "fetched_at", "extract", "confidence", "research_id", "query"}
        assert prov["research_id"] == handle.id and prov["query"] == handle.query
        assert 0.0 <= prov["confidence"] <= 1.0 and memory.importance == pytest.approx(prov["confidence"])
        assert abs(prov["fetched_at"] - time.time()) < 120
        assert memory.source == "research" and memory.embedded
        assert "Zorbulon" in memory.text and "Zorbulon" in prov["extract"]
        assert "secret" not in memory.text.lower() and "sugar" not in memory.text
    assert any(json.loads(m.provenance or "{}")["source"] == page_url for m in research)
    # never stored as the user's words: no message was added, and the question is nowhere in the research
    assert len(await hippo.async_history("alice", limit=100)) == messages_before
    assert all("What is the Zorbulon festival?" not in m.text for m in research)

    assert not any(p.startswith("/private/") for p in site.paths), "robots.txt disallows /private/: never requested"

    # bob sees none of it
    bob_recall = await hippo.async_recall("bob", "Tell me about the Zorbulon festival glass kites Quimtaro", 10)
    assert all(h.memory.kind != "research" and "Zorbulon" not in h.memory.text for h in bob_recall.hits)
    assert await cortex.async_list("bob") == []
    assert await cortex.async_counts("bob") == {"open": 0, "finished": 0}

    # the next turn on the topic recalls it first, and asks for no new research
    later = await hippo.async_recall("alice", "Tell me about Zorbulon", 5)
    assert later.hits and later.hits[0].memory.kind == "research"
    assert "Zorbulon" in later.hits[0].memory.text
    assert await cortex.async_consider("alice", "Tell me about Zorbulon", later) is None

    rows = await cortex.async_list("alice")
    assert len(rows) == 1
    row = rows[0]
    assert row["id"] == handle.id and row["status"] == "done" and row["memories"] == len(research)
    assert page_url in row["sources"]
    assert "Zorbulon" in row["topics"] and row["query"] == "Zorbulon festival"
    assert row["created_at"].endswith("Z") and row["finished_at"] >= row["created_at"]
    assert await cortex.async_counts("alice") == {"open": 0, "finished": 1}
    assert await cortex.async_list("alice", status="open") == []

    m = samples(cortex)
    assert m[("mongarsd_curiosity_gaps_total", ())] == 1
    assert m[("mongarsd_curiosity_research_total", (("outcome", "done"),))] == 1
    assert m[("mongarsd_curiosity_research_total", (("outcome", "failed"),))] == 0
    assert m[("mongarsd_curiosity_memories_total", ())] == len(research)
    assert m[("mongarsd_curiosity_research_running", ())] == 0


@requires_embedder
async def test_no_gap_schedules_nothing(site: Site, hippo: Hippocampus, make_cortex: Callable[..., Any]) -> None:
    cortex: Cortex = await make_cortex(iris_config(site))
    await hippo.async_store_turn("alice", "s1", "My sister Marguerite lives in Lisbon and flies planes.", "Nice!")
    await hippo.async_add_memory("alice", "Quimtaro is the town where my grandmother was born.", kind="fact")
    for text in ("Where does Marguerite live?", "Thanks!", "hello", "My cat is called Zorbulon.", "Who was born in Quimtaro?"):
        assert await ask(hippo, cortex, "alice", text) is None, text
    assert site.queries == [] and site.paths == []
    assert await cortex.async_list("alice") == []
    assert samples(cortex)[("mongarsd_curiosity_gaps_total", ())] == 0


@requires_embedder
async def test_a_disabled_engine_or_no_fetcher_never_researches(site: Site, hippo: Hippocampus, make_cortex: Callable[..., Any]) -> None:
    off: Cortex = await make_cortex(iris_config(site), enabled=False)
    assert await ask(hippo, off, "alice", "What is the Zorbulon festival?") is None
    nowhere: Cortex = await make_cortex(IrisConfig())  # no SearxNG and no allowlisted site: nowhere to look
    assert not nowhere.enabled
    assert await ask(hippo, nowhere, "alice", "What is the Zorbulon festival?") is None
    assert await nowhere.async_list("alice") == []
    bare = Cortex(hippocampus=hippo, fetcher=None, config=CuriosityConfig())
    await bare.async_start()
    try:
        assert await ask(hippo, bare, "alice", "What is the Zorbulon festival?") is None
    finally:
        await bare.async_stop()
    assert site.queries == []


# ------------------------------------------------------------------------------ limits, reuse, stop


@requires_embedder
async def test_per_user_limit_and_reuse_of_an_open_research(site: Site, hippo: Hippocampus, make_cortex: Callable[..., Any]) -> None:
    cortex: Cortex = await make_cortex(iris_config(site), max_open_per_user=2, max_concurrent=1)
    site.gate.clear()  # searches hang until the gate opens
    first = await ask(hippo, cortex, "alice", "What is the Zorbulon festival?")
    second = await ask(hippo, cortex, "alice", "Who is Ilvane Pettacorn?")
    assert first is not None and second is not None and first.id != second.id
    again = await ask(hippo, cortex, "alice", "what is the zorbulon festival?")  # same research query, still open
    assert again is first
    assert await ask(hippo, cortex, "alice", "Where is Quimtaro?") is None, "alice already has two research open"
    other = await ask(hippo, cortex, "bob", "Where is Quimtaro?")
    assert other is not None, "the limit is per user"
    assert await cortex.async_counts("alice") == {"open": 2, "finished": 0}
    assert not await cortex.async_wait(first, 0.05), "not finished while the search hangs"
    for _ in range(200):
        if site.queries:
            break
        await asyncio.sleep(0.01)
    m = samples(cortex)
    assert m[("mongarsd_curiosity_limited_total", ())] == 1
    assert m[("mongarsd_curiosity_reused_total", ())] == 1
    assert m[("mongarsd_curiosity_research_open", ())] == 3
    assert m[("mongarsd_curiosity_research_running", ())] == 1, "max_concurrent bounds the running research"

    site.gate.set()
    for handle in (first, second, other):
        assert await cortex.async_wait(handle, BUDGET_S)
    assert first.status == "done"
    assert await cortex.async_counts("alice") == {"open": 0, "finished": 2}


@requires_embedder
async def test_stop_during_a_running_research_leaves_no_task(site: Site, hippo: Hippocampus, make_cortex: Callable[..., Any]) -> None:
    cortex: Cortex = await make_cortex(iris_config(site))
    site.gate.clear()
    handle = await ask(hippo, cortex, "alice", "What is the Zorbulon festival?")
    assert handle is not None
    for _ in range(200):
        if site.queries:
            break
        await asyncio.sleep(0.01)
    assert site.queries, "the research is running (its search waits on the gate)"
    t0 = time.monotonic()
    await cortex.async_stop()
    assert time.monotonic() - t0 < cortex.stop_timeout_s
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("mongarsd:research-")]
    assert handle.finished and await cortex.async_wait(handle, 0)
    rows = await cortex.async_list("alice")
    assert rows[0]["status"] == "failed" and "interrupted" in rows[0]["reason"]
    assert samples(cortex)[("mongarsd_curiosity_research_total", (("outcome", "cancelled"),))] == 1
    assert await ask(hippo, cortex, "alice", "Who is Ilvane Pettacorn?") is None, "a stopped engine schedules nothing"
    await cortex.async_stop()  # idempotent


@requires_embedder
async def test_stale_open_rows_are_marked_failed_at_start(site: Site, hippo: Hippocampus, make_cortex: Callable[..., Any]) -> None:
    await hippo.db.async_execute(
        "INSERT INTO research(user, query, topics, status, reason, created_at) VALUES ('alice', 'x', '[]', 'running', 'gap', ?)",
        (time.time(),),
    )
    cortex: Cortex = await make_cortex(iris_config(site))
    rows = await cortex.async_list("alice")
    assert rows[0]["status"] == "failed" and rows[0]["reason"] == "gap; interrupted"


# ------------------------------------------------------------------------------ failures


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@requires_embedder
async def test_an_unreachable_site_fails_cleanly(hippo: Hippocampus, make_cortex: Callable[..., Any]) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}"
    cortex: Cortex = await make_cortex(IrisConfig(urls=(dead + "/",), searxng_url=dead, timeout_s=2.0, host_rate_rps=100.0, host_burst=10))
    handle = await ask(hippo, cortex, "alice", "What is the Zorbulon festival?")
    assert handle is not None
    assert await cortex.async_wait(handle, BUDGET_S)
    assert handle.status in ("failed", "nothing_found") and handle.memories == 0
    row = (await cortex.async_list("alice"))[0]
    assert row["status"] == handle.status and row["reason"] and row["finished_at"] is not None
    assert "search" in row["reason"]
    assert [m for m in await hippo.async_list_memories("alice") if m.kind == "research"] == []


@requires_embedder
async def test_nothing_relevant_is_nothing_found(site: Site, hippo: Hippocampus, make_cortex: Callable[..., Any]) -> None:
    cortex: Cortex = await make_cortex(iris_config(site))
    handle = await ask(hippo, cortex, "alice", "Who is Wobblefritz Gantenheimer?")
    assert handle is not None
    assert await cortex.async_wait(handle, BUDGET_S)
    assert handle.status == "nothing_found"
    row = (await cortex.async_list("alice"))[0]
    assert "page(s) read" in row["reason"] and row["sources"] == [] and row["memories"] == 0
    assert not any(p.startswith("/private/") for p in site.paths)
    # the same question within the reuse window answers with that research: nothing is searched again
    searched = len(site.queries)
    again = await ask(hippo, cortex, "alice", "Who is Wobblefritz Gantenheimer, really?")
    assert again is not None and again.id == handle.id and again.reused and again.finished and again.status == "nothing_found"
    assert len(site.queries) == searched
    assert samples(cortex)[("mongarsd_curiosity_reused_total", ())] == 1


# ------------------------------------------------------------------------------ the loop stays responsive


@requires_embedder
async def test_research_on_a_long_page_keeps_loop_lag_within_p12(site: Site, hippo: Hippocampus, make_cortex: Callable[..., Any]) -> None:
    # about 100 KB of HTML, a long article: extraction and scoring run in threads, so the loop's
    # lag stays within P12 while the research reads it (a tick every 5 ms measures it)
    paragraph = "<p>The Flimbazz guild of Quimtaro repairs glass kites after the festival, and its members meet on Tuesdays. {}</p>"
    site.big_page = (
        "<html><head><title>Flimbazz</title></head><body><article>"
        + "".join(paragraph.format(i) for i in range(900))
        + "</article></body></html>"
    )
    cortex: Cortex = await make_cortex(iris_config(site))
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            lags.append(time.perf_counter() - t - LAG_TICK_S)

    tick = asyncio.create_task(ticker())
    try:
        await asyncio.sleep(0.2)  # a baseline before the research
        handle = await ask(hippo, cortex, "alice", "What is the Flimbazz guild?")
        assert handle is not None
        assert await cortex.async_wait(handle, RESEARCH_TIMEOUT_S)
    finally:
        stop.set()
        await tick
    assert handle.status == "done", (await cortex.async_list("alice"))[0]
    lags.sort()
    p99 = lags[int(len(lags) * 0.99) - 1]
    assert len(lags) > 20
    assert p99 <= LAG_BOUND_S, f"loop lag p99 {p99 * 1000:.1f} ms during research (max {lags[-1] * 1000:.1f} ms)"


# ------------------------------------------------------------------------------ the route


async def _serve(ctx: AppContext) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(ctx, [curiosity_api.setup_routes]))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _get(url: str, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


@requires_embedder
async def test_route_lists_the_callers_research_only(site: Site, hippo: Hippocampus, make_cortex: Callable[..., Any]) -> None:
    cortex: Cortex = await make_cortex(iris_config(site))
    tokens = TokenStore(db=hippo.db)
    alice, _ = await tokens.async_create("alice", "user")
    bob, _ = await tokens.async_create("bob", "user")
    board = BoardInfo(profile="generic", model="test", arch="x86_64", cores_logical=2, cores_physical=2)
    loaded = LoadedConfig(Config(auth=AuthConfig(rate_limit_rps=1000.0, rate_limit_burst=1000, loopback_trusted=False)), {}, "generic")
    ctx = AppContext(loaded=loaded, board=board, metrics=Metrics(), db=hippo.db, tokens=tokens, hippocampus=hippo, cortex=cortex)
    ctx.state.ready = True
    off = AppContext(loaded=loaded, board=board, metrics=Metrics(), db=hippo.db, tokens=tokens, hippocampus=hippo)
    off.state.ready = True

    handle = await ask(hippo, cortex, "alice", "What is the Zorbulon festival?")
    assert handle is not None and await cortex.async_wait(handle, BUDGET_S)
    site.gate.clear()
    pending = await ask(hippo, cortex, "alice", "Who is Wobblefritz Gantenheimer?")
    assert pending is not None

    runner, url = await _serve(ctx)
    runner_off, url_off = await _serve(off)
    try:
        status, out = await _get(url + "/api/v1/curiosity", alice)
        assert status == 200, out
        assert out["open"] == 1 and out["finished"] == 1
        assert [r["id"] for r in out["research"]] == [pending.id, handle.id]
        done = out["research"][1]
        assert done["status"] == "done" and site.url + "/zorbulon.html" in done["sources"] and done["memories"] >= 1
        assert set(done) == {"id", "query", "topics", "status", "reason", "sources", "memories", "created_at", "finished_at"}
        status, out = await _get(url + "/api/v1/curiosity?status=done&limit=5", alice)
        assert status == 200 and [r["id"] for r in out["research"]] == [handle.id]
        status, out = await _get(url + "/api/v1/curiosity", bob)
        assert status == 200 and out == {"research": [], "open": 0, "finished": 0}
        status, out = await _get(url + "/api/v1/curiosity?status=bogus", alice)
        assert status == 400 and "status" in out["error"]["message"]
        status, out = await _get(url + "/api/v1/curiosity?limit=0", alice)
        assert status == 400 and "limit" in out["error"]["message"]
        status, out = await _get(url + "/api/v1/curiosity", None)
        assert status == 401
        status, out = await _get(url_off + "/api/v1/curiosity", alice)
        assert status == 503 and "curiosity" in out["error"]["message"]
    finally:
        site.gate.set()
        await runner.cleanup()
        await runner_off.cleanup()


# ------------------------------------------------------------------------------ without an embedder


async def test_research_without_an_embedder_scores_by_words_and_is_found_by_text(site: Site, tmp_path: Path) -> None:
    db = Database(path=tmp_path / "mongarsd.db")
    await db.async_start()
    hippo = Hippocampus(db=db, embedder=None)
    await hippo.async_start()
    try:
        async with _cortex_factory(hippo) as make:
            cortex: Cortex = await make(iris_config(site))
            handle = await ask(hippo, cortex, "alice", "What is the Zorbulon festival?")
            assert handle is not None and await cortex.async_wait(handle, BUDGET_S)
            assert handle.status == "done"
            research = [m for m in await hippo.async_list_memories("alice") if m.kind == "research"]
            assert research and all(not m.embedded and 0 < m.importance <= NO_EMBED_FACTOR for m in research)
            later = await hippo.async_recall("alice", "Zorbulon glass kites", 5)
            assert later.degraded and later.hits and later.hits[0].memory.kind == "research"
            assert (await hippo.async_recall("bob", "Zorbulon glass kites", 5)).hits == []
    finally:
        await hippo.async_stop()
        await db.async_stop()
