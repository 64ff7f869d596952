"""Hippocampus on real SQLite files with the real ONNX embedder: isolation, order, recall, TTL, outages."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from mongarsd.errors import EmbedderUnavailableError, NotFoundError
from mongarsd.inference.embed import Embedder
from mongarsd.memory.db import Database
from mongarsd.memory.hippocampus import STATUS_EMBEDDER_UNAVAILABLE, Hippocampus, fts_query, rrf_fuse, worth_remembering
from tests.conftest import DEFAULT_EMBED_DIR, DEFAULT_EMBEDDER, requires_models

EMBED_DIR = DEFAULT_EMBED_DIR
pytestmark = requires_models(DEFAULT_EMBEDDER)

HOSTILE_QUERIES = [
    '" OR 1=1 --',
    "'; DROP TABLE memories; --",
    "NEAR(cat dog, 2)",
    "text:secret",
    "*",
    '"unbalanced',
    "a AND OR NOT b",
    "^start (paren",
    "{col1 col2}: x",
    "\u202e\u0000",
    "emoji 🐈 日本語",
    "-",
]


def test_fts_query_quotes_every_token_and_drops_syntax() -> None:
    assert fts_query('cat" OR NEAR(dog*, 2) col:x') == '"cat" OR "near" OR "dog" OR "2" OR "col"'  # 'or' is a stopword, 'x' too short
    assert fts_query("the and of ?!") is None  # only stopwords and punctuation: no text search at all
    assert fts_query("a " * 10 + " ".join(f"w{i}" for i in range(100))).count(" OR ") == 31


def test_rrf_fuse_rewards_agreement() -> None:
    fused = rrf_fuse([[1, 2, 3], [3, 4]])
    assert fused[0][0] == 3  # ranked by both beats first place in one
    assert {i for i, _ in fused} == {1, 2, 3, 4}


@pytest.mark.parametrize(
    ("text", "keep"),
    [("My daughter plays the violin.", True), ("What is my favourite fruit?", False), ("ok", False), ("I moved to Lyon. Any tips?", True)],
)
def test_worth_remembering(text: str, keep: bool) -> None:
    assert worth_remembering(text) is keep


@pytest_asyncio.fixture
async def embedder() -> AsyncIterator[Embedder]:
    emb = Embedder(model_dir=EMBED_DIR)
    await emb.async_start()
    yield emb
    await emb.async_stop()


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    store = Database(path=tmp_path / "mongarsd.db")
    await store.async_start()
    yield store
    await store.async_stop()


@pytest_asyncio.fixture
async def hippo(db: Database, embedder: Embedder) -> AsyncIterator[Hippocampus]:
    h = Hippocampus(db=db, embedder=embedder)
    await h.async_start()
    yield h
    await h.async_stop()


async def test_fact_recalled_in_another_session_never_for_another_user(hippo: Hippocampus) -> None:
    fact = await hippo.async_store_turn("alice", "s1", "My sister Marguerite lives in Lisbon and flies planes for a living.", "Nice!")
    await hippo.async_store_turn("alice", "s1", "I am learning to play the cello on weekends.", "Great.")
    bob_ids = set()
    for text in ("I work as a baker in Montreal.", "My dog Rex likes long walks in the park."):
        turn = await hippo.async_store_turn("bob", "s1", text, "ok")
        bob_ids.add(turn.memory_id)
    assert fact.memory_id is not None

    alice = await hippo.async_recall("alice", "Where does my sister live?", 3)
    assert alice.status == "ok"
    assert alice.hits[0].memory.id == fact.memory_id
    assert alice.hits[0].similarity is not None and alice.hits[0].similarity > 0.3

    bob = await hippo.async_recall("bob", "Where does Marguerite live? Lisbon sister planes", 10)
    assert bob.hits, "bob has memories of his own"
    assert {h.memory.id for h in bob.hits} <= bob_ids
    assert all("Marguerite" not in h.memory.text for h in bob.hits)
    assert (await hippo.async_recall("carol", "Marguerite Lisbon", 5)).hits == []


async def test_history_in_order_per_session_and_user(hippo: Hippocampus) -> None:
    for i in range(5):
        await hippo.async_store_turn("alice", "s1" if i % 2 == 0 else "s2", f"question number {i} about things", f"answer {i}")
    await hippo.async_store_turn("bob", "s1", "bob question here please", "bob answer")
    hist = await hippo.async_history("alice", limit=50)
    assert [m.content for m in hist] == [x for i in range(5) for x in (f"question number {i} about things", f"answer {i}")]
    assert [m.role for m in hist] == ["user", "assistant"] * 5
    assert [m.id for m in hist] == sorted(m.id for m in hist)
    s1 = await hippo.async_history("alice", session_id="s1", limit=50)
    assert [m.content for m in s1 if m.role == "assistant"] == ["answer 0", "answer 2", "answer 4"]
    latest = await hippo.async_history("alice", limit=3)
    assert [m.content for m in latest] == ["answer 3", "question number 4 about things", "answer 4"]
    assert all(m.content.startswith("bob") for m in await hippo.async_history("bob", limit=50))
    assert await hippo.async_history("carol", limit=50) == []


async def test_turn_is_committed_when_store_returns(hippo: Hippocampus, db: Database) -> None:
    turn = await hippo.async_store_turn("alice", "s9", "Remember that my locker code is 4521.", "Noted.")

    def read_back() -> tuple[list[Any], Any]:
        conn = sqlite3.connect(db.path)  # an independent connection sees the committed rows at once
        try:
            rows = conn.execute("SELECT role, content FROM messages WHERE user = 'alice' AND session_id = 's9' ORDER BY id").fetchall()
            mem = conn.execute("SELECT text, length(embedding) FROM memories WHERE id = ?", (turn.memory_id,)).fetchone()
        finally:
            conn.close()
        return rows, mem

    rows, mem = await asyncio.to_thread(read_back)
    assert rows == [("user", "Remember that my locker code is 4521."), ("assistant", "Noted.")]
    assert mem == ("Remember that my locker code is 4521.", 384 * 4)


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
async def test_hostile_fts_queries_are_plain_words(hippo: Hippocampus, db: Database, query: str) -> None:
    await hippo.async_add_memory("alice", "Never run DROP TABLE memories in production; NEAR and OR are words here.")
    result = await hippo.async_recall("alice", query, 5)
    assert result.status == "ok"
    assert all(h.memory.text.startswith("Never run") for h in result.hits)
    row = await db.async_fetchone("SELECT count(*) AS n FROM memories")
    assert row is not None and row["n"] == 1


async def test_fts_finds_exact_words_of_hostile_text(hippo: Hippocampus) -> None:
    m = await hippo.async_add_memory("alice", 'The password hint is "NEAR(blue, 3)" OR something')
    res = await hippo.async_recall("alice", 'NEAR(blue, 3)" OR', 5)
    assert res.hits and res.hits[0].memory.id == m.id and res.hits[0].text_rank == 1


async def test_delete_own_only(hippo: Hippocampus) -> None:
    mine = await hippo.async_add_memory("alice", "Alice's favourite colour is teal.")
    with pytest.raises(NotFoundError):
        await hippo.async_delete_memory("bob", mine.id)
    with pytest.raises(NotFoundError):
        await hippo.async_get_memory("bob", mine.id)
    assert (await hippo.async_get_memory("alice", mine.id)).text == mine.text
    await hippo.async_delete_memory("alice", mine.id)
    assert (await hippo.async_recall("alice", "favourite colour teal", 5)).hits == []
    assert mine.id not in hippo.index
    with pytest.raises(NotFoundError):
        await hippo.async_delete_memory("alice", mine.id)


async def test_ttl_expiry_hidden_then_purged(db: Database, embedder: Embedder) -> None:
    hippo = Hippocampus(db=db, embedder=embedder, default_ttl_days=1)
    await hippo.async_start()
    try:
        short = await hippo.async_add_memory("alice", "The parking spot today is B12.", ttl_s=0.05)
        forever = await hippo.async_add_memory("alice", "The parking garage is on Elm street.", ttl_s=0)  # 0: never expires
        turn = await hippo.async_store_turn("alice", "s1", "Meeting moved to Thursday at noon.", "ok")  # default TTL: 1 day
        assert short.expires_at is not None and forever.expires_at is None
        await asyncio.sleep(0.1)
        hits = (await hippo.async_recall("alice", "parking spot", 5)).hits
        assert short.id not in {h.memory.id for h in hits}  # expired: hidden before any purge
        assert forever.id in {h.memory.id for h in hits}
        assert await hippo.async_purge() == 1
        assert short.id not in hippo.index
        assert await db.async_fetchone("SELECT 1 FROM memories WHERE id = ?", (short.id,)) is None
        # two days later the turn and its memory are gone too, the permanent memory stays
        assert await hippo.async_purge(now=time.time() + 2 * 86400) == 3
        assert turn.memory_id not in hippo.index
        assert await hippo.async_history("alice", limit=10) == []
        assert [m.id for m in await hippo.async_list_memories("alice")] == [forever.id]
    finally:
        await hippo.async_stop()


async def test_embedder_outage_is_labelled_then_backfilled(db: Database, embedder: Embedder, tmp_path: Path) -> None:
    broken = Embedder(model_dir=tmp_path / "no-model")
    await broken.async_start()
    hippo = Hippocampus(db=db, embedder=broken)
    await hippo.async_start()
    try:
        mem = await hippo.async_add_memory("alice", "The wifi password is on the fridge.")
        assert not mem.embedded
        with pytest.raises(EmbedderUnavailableError):
            await hippo.async_add_memory("alice", "must be embedded", require_embedding=True)
        res = await hippo.async_recall("alice", "where is the wifi password", 5)
        assert res.status == STATUS_EMBEDDER_UNAVAILABLE and res.degraded and res.reason
        assert [h.memory.id for h in res.hits] == [mem.id]  # full-text only, and said so
        assert res.hits[0].similarity is None and res.hits[0].vector_rank is None
        assert len(hippo.index) == 0  # no made-up vector entered the index
        hippo.set_embedder(embedder)
        assert await hippo.async_backfill_embeddings() == 1
        res = await hippo.async_recall("alice", "network credentials location", 5)
        assert res.status == "ok" and res.hits[0].memory.id == mem.id and res.hits[0].vector_rank == 1
    finally:
        await hippo.async_stop()
        await broken.async_stop()


async def test_vectors_reload_after_restart(db: Database, embedder: Embedder) -> None:
    first = Hippocampus(db=db, embedder=embedder)
    await first.async_start()
    m = await first.async_add_memory("alice", "My passport expires in March 2031.")
    await first.async_stop()
    second = Hippocampus(db=db, embedder=embedder)
    await second.async_start()
    try:
        assert len(second.index) == 1
        res = await second.async_recall("alice", "when does my travel document run out", 3)
        assert res.hits[0].memory.id == m.id and res.hits[0].vector_rank == 1
        stored = await db.async_fetchone("SELECT embedding FROM memories WHERE id = ?", (m.id,))
        assert stored is not None
        vec = np.frombuffer(stored["embedding"], dtype="<f4")
        assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-3
    finally:
        await second.async_stop()


async def test_recall_through_the_4bit_copy_of_a_large_partition(db: Database, embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real MiniLM vectors in the 4-bit copy (thresholds scaled down): recall finds the fact, stop ends the build thread."""
    import threading

    from mongarsd.memory import vectors

    monkeypatch.setattr(vectors, "COARSE_MIN_ROWS", 24)
    monkeypatch.setattr(vectors, "CANDIDATES_PER_K", 1)
    monkeypatch.setattr(vectors, "CANDIDATES_MIN", 4)
    first = Hippocampus(db=db, embedder=embedder)
    await first.async_start()
    topics = ["cooking pasta", "the weather in Oslo", "train timetables", "my bicycle", "jazz records", "tax forms"]
    for i in range(30):
        await first.async_add_memory("alice", f"Note {i}: something about {topics[i % len(topics)]} and item {i * 7}.")
    fact = await first.async_add_memory("alice", "My passport expires in March 2031.")
    await first.async_stop()
    second = Hippocampus(db=db, embedder=embedder)
    await second.async_start()  # loads 31 rows: the copy is built in the background
    try:
        for _ in range(200):
            if second.index.coarse_rows("alice"):
                break
            await asyncio.sleep(0.05)
            second.index.maintain()
        assert second.index.coarse_rows("alice") == 31
        used: list[int] = []
        real_scores = vectors.CoarseCopy.scores

        def counted(self: vectors.CoarseCopy, query: np.ndarray) -> np.ndarray:
            used.append(1)
            return real_scores(self, query)

        monkeypatch.setattr(vectors.CoarseCopy, "scores", counted)
        res = await second.async_recall("alice", "when does my travel document run out", 2)
        assert used, "the search went through the 4-bit copy"
        assert res.hits[0].memory.id == fact.id and res.hits[0].vector_rank == 1
    finally:
        await second.async_stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("mongarsd-vectors") and t.is_alive()]
