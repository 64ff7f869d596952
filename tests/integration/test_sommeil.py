"""Sommeil on a real SQLite file with the real embedder and llama.cpp: a full cycle, preemption, the routes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web

from mongarsd.api import sommeil as sommeil_api
from mongarsd.api.app import AppContext, RequestState, create_app
from mongarsd.board import BoardInfo
from mongarsd.config import AuthConfig, Config, LoadedConfig, SommeilConfig
from mongarsd.inference.embed import Embedder
from mongarsd.inference.manager import InferenceManager
from mongarsd.inference.models import ModelRegistry
from mongarsd.inference.sampling import GenerationParams
from mongarsd.inference.settings import EngineSettings
from mongarsd.maintenance import sommeil as sommeil_mod
from mongarsd.maintenance.jobs import ConsolidateJob, DedupeJob, builtin_jobs
from mongarsd.maintenance.sommeil import Sommeil
from mongarsd.memory.db import Database
from mongarsd.memory.hippocampus import DAY_S, Hippocampus
from mongarsd.memory.tokens import TokenStore
from mongarsd.metrics import Metrics
from tests.conftest import DEFAULT_EMBED_DIR, MODELS_DIR, requires_models

pytestmark = [
    requires_models(),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning"),
]
OLD_S = 30 * DAY_S
PREEMPT_LIMIT_MS = 100.0
CFG = SommeilConfig(
    consolidate_after_days=7.0, dedupe_similarity=0.95, analyze_interval_days=1.0, vacuum_interval_days=7.0, max_job_s=120.0
)


@dataclass
class Models:
    embedder: Embedder
    llm: InferenceManager


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def models() -> AsyncIterator[Models]:
    emb = Embedder(model_dir=DEFAULT_EMBED_DIR)
    await emb.async_start()
    await emb.async_embed(["warm up the worker thread"])
    llm = InferenceManager(
        registry=ModelRegistry(MODELS_DIR),
        engine=EngineSettings(n_ctx=2048, n_batch=256, n_ubatch=256, slots=2, queue_depth=8),
        keep_alive_s=-1,
    )
    await llm.async_start()
    engine = await llm.async_engine(llm.default_model)
    async for _ in engine.async_generate(engine.tokenize("Warm up the engine with a first prefill."), GenerationParams(max_tokens=2)):
        pass  # the first decode of a process allocates its graph: slow, and not what a test here measures
    yield Models(emb, llm)
    await llm.async_stop()
    await emb.async_stop()


@dataclass
class Store:
    db: Database
    hippo: Hippocampus


@pytest_asyncio.fixture(loop_scope="module")
async def store(tmp_path: Path, models: Models) -> AsyncIterator[Store]:
    db = Database(path=tmp_path / "mongarsd.db")
    await db.async_start()
    hippo = Hippocampus(db=db, embedder=models.embedder)
    await hippo.async_start()
    yield Store(db, hippo)
    await hippo.async_stop()
    await db.async_stop()


async def old_session(store: Store, user: str, session: str, turns: list[tuple[str, str]], *, age_s: float = OLD_S) -> tuple[int, int]:
    """Store a conversation through Hippocampus, then age it; return its first and last message ids."""
    for said, answer in turns:
        await store.hippo.async_store_turn(user, session, said, answer, remember=False)
    await store.db.async_execute(
        "UPDATE messages SET created_at = created_at - ? WHERE user = ? AND session_id = ?", (age_s, user, session)
    )
    row = await store.db.async_fetchone(
        "SELECT min(id) AS a, max(id) AS b FROM messages WHERE user = ? AND session_id = ?", (user, session)
    )
    assert row is not None
    return int(row["a"]), int(row["b"])


async def summaries(store: Store, user: str) -> list[dict[str, Any]]:
    rows = await store.db.async_fetchall(
        "SELECT id, text, provenance, embedding IS NOT NULL AS embedded FROM memories WHERE user = ? AND kind = 'summary' AND source = 'sommeil' ORDER BY id",
        (user,),
    )
    return [
        {"id": int(r["id"]), "text": str(r["text"]), "provenance": json.loads(r["provenance"]), "embedded": bool(r["embedded"])}
        for r in rows
    ]


def cosine(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_integrity(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


async def test_full_cycle_consolidates_merges_purges_backfills_and_keeps_the_database_sound(store: Store, models: Models) -> None:
    db, hippo = store.db, store.hippo
    s1 = await old_session(store, "alice", "trip", [("I am planning a trip to Kyoto in April with my sister Maud.", "Sounds lovely.")])
    s2 = await old_session(store, "alice", "garden", [("My garden has three apple trees and I grow tomatoes.", "Nice garden!")])
    s3 = await old_session(store, "bob", "work", [("I work as a nurse at the night shift in Lille.", "That is demanding.")])
    await old_session(store, "alice", "fresh", [("I just adopted a dog called Pixel.", "Congratulations!")], age_s=0.0)

    older = await hippo.async_add_memory("alice", "My favourite colour is deep blue.", importance=0.3)
    await asyncio.sleep(0.01)
    newer = await hippo.async_add_memory("alice", "My favourite colour is deep blue!", importance=0.8)
    other = await hippo.async_add_memory("alice", "I am allergic to peanuts.")
    bobs = await hippo.async_add_memory("bob", "My favourite colour is deep blue.")
    doc_a = await hippo.async_add_memory("alice", "Chapter one: the pump is descaled monthly.", kind="document")
    doc_b = await hippo.async_add_memory("alice", "Chapter one: the pump is descaled monthly!", kind="document")
    vecs = await models.embedder.async_embed([older.text, newer.text])
    assert cosine(vecs[0], vecs[1]) >= CFG.dedupe_similarity  # the pair really is a near-duplicate for this model
    expired = await hippo.async_add_memory("alice", "The code for the gate is 4321 this week.", ttl_s=3600)
    await db.async_execute("UPDATE memories SET expires_at = ? WHERE id = ?", (time.time() - 1, expired.id))
    unembedded = await db.async_execute(
        "INSERT INTO memories(user, text, importance, kind, source, created_at) VALUES ('alice', 'I play the cello on Sundays.', 0.5, 'fact', 'user', ?)",
        (time.time(),),
    )
    # free pages for VACUUM to reclaim: a bulk written, then deleted
    await db.async_execute(
        "INSERT INTO memories(user, text, kind, created_at) "
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1500) SELECT 'junk', printf('%d %.3000c', i, 'x'), 'note', 0 FROM n"
    )
    await db.async_execute("DELETE FROM memories WHERE user = 'junk'")
    free_before = await db.async_fetchone("PRAGMA freelist_count")
    assert free_before is not None and int(free_before[0]) > 500

    state = RequestState()
    sommeil = Sommeil(config=CFG, state=state, db=db, jobs=builtin_jobs(CFG, hippocampus=hippo, llm=models.llm, db=db))
    await sommeil.async_start()
    try:
        out = await sommeil.async_run_cycle(forced=True)
        assert out["complete"] is True
        assert out["jobs"] == {"purge": "done", "backfill": "done", "consolidate": "done", "dedupe": "done", "db_upkeep": "done"}

        # consolidation: each old session once, with provenance; the fresh one not yet
        alice, bob = await summaries(store, "alice"), await summaries(store, "bob")
        assert sorted(m["provenance"]["session_id"] for m in alice) == ["garden", "trip"]
        by_session = {m["provenance"]["session_id"]: m for m in alice + bob}
        for session, ids in (("trip", s1), ("garden", s2), ("work", s3)):
            prov = by_session[session]["provenance"]
            assert prov["messages"] == list(ids) and prov["consolidated_at"] > time.time() - 600
            assert prov["model"] == "smollm2-135m-instruct:q4_1"
            assert by_session[session]["text"].strip() and by_session[session]["embedded"]
        assert [m["provenance"]["session_id"] for m in bob] == ["work"]

        # dedupe: the newer copy merged into the older, which takes the higher importance; the others untouched
        kept = await hippo.async_get_memory("alice", older.id)
        assert kept.importance == pytest.approx(0.8)
        remaining = {m.id for m in await hippo.async_list_memories("alice", limit=100)}
        assert newer.id not in remaining and newer.id not in hippo.index
        assert {other.id, doc_a.id, doc_b.id} <= remaining  # documents are never merged
        assert (await hippo.async_get_memory("bob", bobs.id)).importance == 0.5  # nor users' memories across users

        # purge and backfill
        assert expired.id not in remaining
        backfilled = await hippo.async_get_memory("alice", unembedded)
        assert backfilled.embedded and unembedded in hippo.index

        runs = {r["job"]: r for r in await sommeil.async_runs(10)}
        assert runs["consolidate"]["summary"]["result"]["sessions"] == 3
        assert runs["dedupe"]["summary"]["result"]["merged"] == 1
        assert runs["purge"]["summary"]["result"]["purged"] >= 1
        assert runs["backfill"]["summary"]["result"]["embedded"] >= 1
        upkeep = runs["db_upkeep"]["summary"]["result"]
        assert upkeep["analyzed"] is True and upkeep["vacuumed"] is True and upkeep["integrity"] == "ok"
        assert upkeep["pages_after"] < upkeep["pages"] and upkeep["checkpoint"]["busy"] is False
        stat = await db.async_fetchone("SELECT count(*) AS n FROM sqlite_stat1")
        assert stat is not None and int(stat["n"]) > 0
        free_after = await db.async_fetchone("PRAGMA freelist_count")
        assert free_after is not None and int(free_after[0]) == 0

        # a second cycle: nothing consolidated twice, ANALYZE and VACUUM not due again
        out = await sommeil.async_run_cycle(forced=True)
        runs = {r["job"]: r for r in await sommeil.async_runs(5)}
        assert runs["consolidate"]["summary"]["result"]["sessions"] == 0
        assert "analyzed" not in runs["db_upkeep"]["summary"]["result"]
        assert runs["db_upkeep"]["summary"]["result"]["vacuum"] == "not due"
        assert len(await summaries(store, "alice")) == 2
    finally:
        await sommeil.async_stop()
    assert await asyncio.to_thread(check_integrity, db.path) == [("ok",)]


async def test_a_continued_session_is_summarised_again_and_the_old_summary_replaced(store: Store, models: Models) -> None:
    await old_session(store, "carol", "pets", [("I have two cats named Miso and Tofu.", "Cute names!")])
    job = ConsolidateJob(store.hippo, models.llm, after_days=7.0)
    assert (await job.async_run())["sessions"] == 1
    first = await summaries(store, "carol")
    await old_session(store, "carol", "pets", [("Tofu is the older cat; she is nine.", "Good to know.")], age_s=OLD_S / 2)
    result = await job.async_run()
    assert result["sessions"] == 1 and result["superseded"] == 1
    second = await summaries(store, "carol")
    assert len(second) == 1 and second[0]["id"] != first[0]["id"]
    assert second[0]["provenance"]["messages"][1] > first[0]["provenance"]["messages"][1]
    assert first[0]["id"] not in store.hippo.index


async def test_without_a_model_consolidation_is_skipped_with_its_reason(store: Store) -> None:
    await old_session(store, "dan", "s", [("I live in a lighthouse.", "Wow.")])
    state = RequestState()
    sommeil = Sommeil(config=CFG, state=state, db=store.db, jobs=[ConsolidateJob(store.hippo, None, 7.0), DedupeJob(store.hippo, 0.95)])
    await sommeil.async_start()
    try:
        out = await sommeil.async_run_cycle(forced=True)
        assert out["jobs"] == {"consolidate": "skipped", "dedupe": "done"}
        runs = await sommeil.async_runs(5)
        assert runs[1]["summary"]["result"] == {"skipped": "no language model is configured"}
    finally:
        await sommeil.async_stop()


async def test_a_request_during_consolidation_cancels_it_at_once_and_it_is_redone_when_idle(
    store: Store, models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the shared test machine's CPU load must not decide idleness here
    monkeypatch.setattr(sommeil_mod, "_read_power", lambda: ((1.0, 2.0), False))
    long_turns = [
        (f"Day {i}: I walked my dog Pixel along the river and thought about my sister Maud in Kyoto.", "Nice walk.") for i in range(8)
    ]
    for n in range(3):
        await old_session(store, "erin", f"s{n}", long_turns)
    cfg = SommeilConfig(idle_after_s=0.3, check_interval_s=0.05, cycle_interval_s=3600.0, consolidate_after_days=7.0, max_job_s=120.0)
    state = RequestState()
    sommeil = Sommeil(config=cfg, state=state, db=store.db, jobs=[ConsolidateJob(store.hippo, models.llm, 7.0)])
    engine = await models.llm.async_engine(models.llm.default_model)
    await sommeil.async_start()
    try:
        await sommeil.async_start_cycle(forced=True)
        for _ in range(2000):  # until the model is generating a summary
            if engine.stats().slots_busy > 0:
                break
            await asyncio.sleep(0.005)
        assert engine.stats().slots_busy > 0 and sommeil.status()["current_job"] == "consolidate"
        t0 = time.perf_counter()
        state.work_started()  # a user's request arrives
        for _ in range(200):
            if sommeil.status()["current_job"] is None:
                break
            await asyncio.sleep(0.001)
        waited_ms = (time.perf_counter() - t0) * 1000
        assert sommeil.last_preempt_ms is not None and sommeil.last_preempt_ms < PREEMPT_LIMIT_MS, sommeil.last_preempt_ms
        assert waited_ms < 500.0
        for _ in range(200):  # the slot is free for the request within a decode step or so
            if engine.stats().slots_busy == 0:
                break
            await asyncio.sleep(0.005)
        assert engine.stats().slots_busy == 0
        for _ in range(500):  # the run's row is closed by a store write that follows the job's end
            runs = await sommeil.async_runs(5)
            if runs[0]["status"] != "running":
                break
            await asyncio.sleep(0.01)
        assert runs[0]["job"] == "consolidate" and runs[0]["status"] == "cancelled"
        assert runs[0]["summary"]["reason"] == "a request arrived" and runs[0]["summary"]["preempt_ms"] < PREEMPT_LIMIT_MS
        assert sommeil.status()["pending"] == ["consolidate"]
        done_before = len(await summaries(store, "erin"))
        assert done_before < 3
        state.work_ended()

        # the next idle period resumes the interrupted cycle (cycle_interval_s does not hold it back)
        async with asyncio.TaskGroup() as tg:
            loop = tg.create_task(sommeil.async_loop())
            for _ in range(2400):  # until the third summary is stored and the job's run is closed (slow when the CI machine is loaded)
                if len(await summaries(store, "erin")) == 3 and (await sommeil.async_runs(1))[0]["status"] != "running":
                    break
                await asyncio.sleep(0.05)
            loop.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        await sommeil.async_stop()
    assert len(await summaries(store, "erin")) == 3
    statuses = [r["status"] for r in await sommeil.async_runs(5)]
    assert statuses[0] == "done" and "cancelled" in statuses


# ------------------------------------------------------------------------------ routes


class Blocker:
    name = "blocker"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    def due(self, now: float) -> bool:
        return True

    async def async_run(self) -> dict[str, Any]:
        self.started.set()
        await self.release.wait()
        return {"released": True}


async def test_routes_roles_and_answers(store: Store) -> None:
    tokens = TokenStore(db=store.db)
    admin, _ = await tokens.async_create("root", "admin")
    user, _ = await tokens.async_create("alice", "user")
    state = RequestState()
    blocker = Blocker()
    sommeil = Sommeil(config=CFG, state=state, db=store.db, jobs=[blocker])
    cfg = Config(auth=AuthConfig(loopback_trusted=False, rate_limit_rps=1000.0, rate_limit_burst=1000))
    board = BoardInfo(profile="generic", model="test", arch="x86_64", cores_logical=2, cores_physical=2)
    ctx = AppContext(
        loaded=LoadedConfig(cfg, {}, "generic"), board=board, metrics=Metrics(), db=store.db, tokens=tokens, sommeil=sommeil, state=state
    )
    ctx.state.ready = True
    bare = AppContext(loaded=LoadedConfig(cfg, {}, "generic"), board=board, metrics=Metrics(), db=store.db, tokens=tokens)
    bare.state.ready = True
    await sommeil.async_start()
    runners = [web.AppRunner(create_app(c, [sommeil_api.setup_routes])) for c in (ctx, bare)]
    urls = []
    for runner in runners:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")  # type: ignore[union-attr]
    url, bare_url = urls

    async def call(session: aiohttp.ClientSession, method: str, path: str, token: str | None, base: str = url) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with session.request(method, base + path, headers=headers) as resp:
            return resp.status, await resp.json()

    try:
        async with aiohttp.ClientSession() as http:
            status, doc = await call(http, "GET", "/api/v1/sommeil", None)
            assert status == 401
            status, doc = await call(http, "GET", "/api/v1/sommeil", user)
            assert status == 200 and doc["state"] in ("idle", "busy") and doc["status"]["jobs"] == ["blocker"] and doc["runs"] == []
            status, doc = await call(http, "GET", "/api/v1/sommeil?limit=0", user)
            assert status == 400 and doc["error"]["param"] == "limit"
            status, doc = await call(http, "POST", "/api/v1/sommeil/run", user)
            assert status == 403 and doc["error"]["code"] == "forbidden"
            assert not blocker.started.is_set()

            t0 = time.perf_counter()
            status, doc = await call(http, "POST", "/api/v1/sommeil/run", admin)
            assert status == 202 and doc["started"] is True and isinstance(doc["cycle"], int)
            assert time.perf_counter() - t0 < 2.0  # answered at once, the cycle runs in the background
            await asyncio.wait_for(blocker.started.wait(), 5)
            status, doc = await call(http, "GET", "/api/v1/sommeil", user)  # a passive probe: it does not preempt
            assert doc["state"] == "running" and doc["status"]["current_job"] == "blocker" and doc["status"]["forced"] is True
            assert doc["runs"][0]["status"] == "running" and doc["runs"][0]["summary"]["cycle"] == doc["status"]["cycle"]
            status, doc = await call(http, "POST", "/api/v1/sommeil/run", admin)
            assert status == 409 and doc["error"]["code"] == "conflict" and "already running" in doc["error"]["message"]
            for _ in range(200):  # that POST was a request too: the job it found running was cancelled
                status, doc = await call(http, "GET", "/api/v1/sommeil", user)
                if doc["state"] != "running":
                    break
                await asyncio.sleep(0.01)
            assert doc["runs"][0]["status"] == "cancelled" and doc["status"]["pending"] == ["blocker"]

            status, doc = await call(http, "GET", "/api/v1/sommeil", user, bare_url)
            assert status == 503 and "not enabled" in doc["error"]["message"]
    finally:
        blocker.release.set()
        for runner in runners:
            await runner.cleanup()
        await sommeil.async_stop()
