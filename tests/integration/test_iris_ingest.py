"""Iris ingestion on a real SQLite file with the real ONNX embedder: dedupe, replace, shared vs own recall,
delete, folders with bad files, the folder scan loop, URL ingest from a site on 127.0.0.1, and the
/api/v1/ingest routes' roles over real HTTP (plus `mongarsd ingest` against them)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from mongarsd.api import ingest as ingest_api
from mongarsd.api.app import AppContext, create_app
from mongarsd.board import BoardInfo
from mongarsd.cognition.iris import ingest as ingest_mod
from mongarsd.cognition.iris.cli import run_ingest
from mongarsd.cognition.iris.ingest import SHARED_OWNER, Ingestor, scan_folder
from mongarsd.config import AuthConfig, Config, IrisConfig, LoadedConfig
from mongarsd.errors import NotFoundError, StoreError, UnavailableError, ValidationError
from mongarsd.inference.embed import Embedder
from mongarsd.memory.db import Database
from mongarsd.memory.hippocampus import Hippocampus
from mongarsd.memory.tokens import TokenStore
from mongarsd.metrics import Metrics
from tests.conftest import DEFAULT_EMBED_DIR, DEFAULT_EMBEDDER, requires_models

needs_embedder = requires_models(DEFAULT_EMBEDDER)

LIGHTHOUSE = (
    "The Zephyrine lighthouse stands on a granite cliff north of the harbour.\n\n"
    "Its keeper, Maelle Kerbrat, climbs the 214 steps every evening to light the lamp, "
    "which can be seen forty kilometres out at sea."
)
ORCHARD = (
    "Alice's orchard grows Quillon apples, a rare russet variety.\n\n"
    "The trees are pruned in February and the harvest is pressed into cider in October."
)
BAKERY = "Bob's bakery in Montreal opens at six and sells rye bread, croissants and maple tarts every morning."


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    store = Database(path=tmp_path / "mongarsd.db")
    await store.async_start()
    yield store
    await store.async_stop()


@pytest_asyncio.fixture
async def embedder() -> AsyncIterator[Embedder]:
    emb = Embedder(model_dir=DEFAULT_EMBED_DIR)
    await emb.async_start()
    yield emb
    await emb.async_stop()


@pytest_asyncio.fixture
async def hippo(db: Database, embedder: Embedder) -> AsyncIterator[Hippocampus]:
    h = Hippocampus(db=db, embedder=embedder)
    await h.async_start()
    yield h
    await h.async_stop()


async def count(db: Database, sql: str, params: tuple[Any, ...] = ()) -> int:
    row = await db.async_fetchone(sql, params)
    assert row is not None
    return int(row[0])


def source_of(provenance: str | None) -> str:
    assert provenance is not None
    value = json.loads(provenance)
    assert isinstance(value, dict)
    return str(value["source"])


# ------------------------------------------------------------------------------ the service


@needs_embedder
async def test_dedupe_by_fingerprint_stores_nothing_twice(hippo: Hippocampus, db: Database) -> None:
    ing = Ingestor(hippocampus=hippo, fetcher=None)
    first = await ing.async_ingest_bytes(LIGHTHOUSE.encode(), "text/plain", source="notes/lighthouse.txt", owner="alice")
    assert not first.duplicate and first.document_id > 0 and first.chunks >= 1 and first.bytes == len(LIGHTHOUSE.encode())
    mems = await count(db, "SELECT count(*) FROM memories WHERE document_id = ?", (first.document_id,))
    assert mems == first.chunks
    assert await count(db, "SELECT count(*) FROM memories WHERE document_id = ? AND embedding IS NOT NULL", (first.document_id,)) == mems
    rewrapped = LIGHTHOUSE.replace("\n\n", "\n   \n").replace(" the ", "  the ")
    again = await ing.async_ingest_bytes(rewrapped.encode(), "text/plain", source="elsewhere/copy.txt", owner="alice")
    assert again.duplicate and again.document_id == first.document_id and again.source == "notes/lighthouse.txt"
    assert await count(db, "SELECT count(*) FROM memories") == mems
    assert await count(db, "SELECT count(*) FROM documents") == 1
    # dedupe is per owner: bob storing the same text gets his own copy
    bobs = await ing.async_ingest_bytes(LIGHTHOUSE.encode(), "text/plain", source="notes/lighthouse.txt", owner="bob")
    assert not bobs.duplicate and bobs.document_id != first.document_id
    assert ing.ingested_total == 2 and ing.duplicates_total == 1


@needs_embedder
async def test_same_source_with_new_text_replaces_the_old_document(hippo: Hippocampus, db: Database) -> None:
    ing = Ingestor(hippocampus=hippo, fetcher=None)
    old = await ing.async_ingest_bytes(ORCHARD.encode(), "text/markdown", source="orchard.md", owner="alice")
    old_ids = [int(r[0]) for r in await db.async_fetchall("SELECT id FROM memories WHERE document_id = ?", (old.document_id,))]
    assert old_ids and all(i in hippo.index for i in old_ids)
    new_text = ORCHARD.replace("Quillon", "Pommeraie") + "\n\nA new hedge of hazelnuts was planted in 2024."
    new = await ing.async_ingest_bytes(new_text.encode(), "text/markdown", source="orchard.md", owner="alice")
    assert not new.duplicate and new.document_id != old.document_id
    docs = await ing.async_list("alice")
    assert [d["id"] for d in docs] == [new.document_id]
    assert await count(db, "SELECT count(*) FROM memories WHERE document_id = ?", (old.document_id,)) == 0
    assert not any(i in hippo.index for i in old_ids)
    hits = (await hippo.async_recall("alice", "Quillon apples russet", 10)).hits
    assert all("Quillon" not in h.memory.text for h in hits)
    assert any("Pommeraie" in h.memory.text for h in hits)


@needs_embedder
async def test_shared_documents_are_recalled_by_everyone_own_ones_only_by_their_owner(hippo: Hippocampus) -> None:
    ing = Ingestor(hippocampus=hippo, fetcher=None)
    shared = await ing.async_ingest_bytes(LIGHTHOUSE.encode(), "text/plain", source="/srv/docs/lighthouse.txt", owner=SHARED_OWNER)
    mine = await ing.async_ingest_bytes(ORCHARD.encode(), "text/plain", source="/home/alice/orchard.txt", owner="alice")
    await hippo.async_add_memory("bob", BAKERY)
    alice_fact = await hippo.async_add_memory("alice", "Alice keeps the lighthouse key in a blue tin.")

    alice = await hippo.async_recall("alice", "Who keeps the Zephyrine lighthouse and how many steps?", 5)
    assert alice.status == "ok"
    top = alice.hits[0].memory
    assert top.kind == "document" and top.document_id == shared.document_id
    assert source_of(top.provenance) == "/srv/docs/lighthouse.txt"
    assert json.loads(top.provenance or "{}")["document_id"] == shared.document_id
    # one ranking: the user's own memory and the shared document compete in the same list
    assert alice_fact.id in {h.memory.id for h in alice.hits}

    bob = await hippo.async_recall("bob", "Quillon apples orchard cider pruning lighthouse keeper", 10)
    bob_docs = {h.memory.document_id for h in bob.hits if h.memory.kind == "document"}
    assert shared.document_id in bob_docs  # the shared document is everyone's
    assert mine.document_id not in bob_docs  # alice's own document is hers alone
    assert all("Quillon" not in h.memory.text and "blue tin" not in h.memory.text for h in bob.hits)
    assert any("bakery" in h.memory.text for h in bob.hits)

    # full-text alone (no vector) obeys the same visibility
    hippo.set_embedder(None)
    carol = await hippo.async_recall("carol", "Quillon Zephyrine", 10)
    assert carol.degraded
    assert {h.memory.document_id for h in carol.hits} == {shared.document_id}


@needs_embedder
async def test_delete_removes_memories_from_store_index_and_full_text(hippo: Hippocampus, db: Database) -> None:
    ing = Ingestor(hippocampus=hippo, fetcher=None)
    doc = await ing.async_ingest_bytes(ORCHARD.encode(), "text/plain", source="orchard.txt", owner="alice")
    ids = [int(r[0]) for r in await db.async_fetchall("SELECT id FROM memories WHERE document_id = ?", (doc.document_id,))]
    with pytest.raises(NotFoundError):
        await ing.async_delete("bob", doc.document_id)  # not bob's
    with pytest.raises(NotFoundError):
        await ing.async_delete(SHARED_OWNER, doc.document_id)
    assert all(i in hippo.index for i in ids)
    await ing.async_delete("alice", doc.document_id)
    assert not any(i in hippo.index for i in ids)
    assert await count(db, "SELECT count(*) FROM memories") == 0
    assert await count(db, "SELECT count(*) FROM memories_fts WHERE memories_fts MATCH 'Quillon'") == 0
    assert (await hippo.async_recall("alice", "Quillon apples", 5)).hits == []
    assert await ing.async_list("alice") == []
    with pytest.raises(NotFoundError):
        await ing.async_delete("alice", doc.document_id)


async def test_without_embedder_documents_are_stored_for_full_text_then_backfilled(db: Database) -> None:
    hippo = Hippocampus(db=db, embedder=None)
    await hippo.async_start()
    try:
        ing = Ingestor(hippocampus=hippo, fetcher=None)
        doc = await ing.async_ingest_bytes(LIGHTHOUSE.encode(), "text/plain", source="lh.txt", owner=SHARED_OWNER)
        assert doc.chunks >= 1 and len(hippo.index) == 0
        res = await hippo.async_recall("dave", "Zephyrine lighthouse keeper", 5)
        assert res.degraded and res.hits and res.hits[0].memory.document_id == doc.document_id
        assert await count(db, "SELECT count(*) FROM memories WHERE embedding IS NULL") == doc.chunks
    finally:
        await hippo.async_stop()


async def test_bad_documents_are_refused_with_the_reason(db: Database) -> None:
    hippo = Hippocampus(db=db, embedder=None)
    await hippo.async_start()
    try:
        ing = Ingestor(hippocampus=hippo, fetcher=None)
        with pytest.raises(ValidationError, match="unsupported document type"):
            await ing.async_ingest_bytes(b"\x89PNG", "image/png", source="x.png", owner="alice")
        with pytest.raises(ValidationError, match="source"):
            await ing.async_ingest_bytes(b"text", "text/plain", source=" ", owner="alice")
        with pytest.raises(UnavailableError):
            await ing.async_ingest_url("http://127.0.0.1:9/", owner="alice")  # no fetcher on this ingestor
        with pytest.raises(ValidationError, match="does not exist"):
            await ing.async_ingest_path(Path("/nonexistent-mongarsd-test/file.txt"), owner="alice")
        assert ing.failures_total == 2
        assert await count(db, "SELECT count(*) FROM documents") == 0
    finally:
        await hippo.async_stop()


# ------------------------------------------------------------------------------ folders


def write_files(root: Path, files: dict[str, str | bytes]) -> None:
    """Create files (and their folders) under root (blocking: tests call it through a thread)."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def make_folder(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "lighthouse.txt").write_text(LIGHTHOUSE, encoding="utf-8")
    (root / "orchard.md").write_text("# Orchard\n\n" + ORCHARD, encoding="utf-8")
    (root / "sub" / "page.html").write_text(
        f"<html><head><title>Bakery</title></head><body><article><p>{BAKERY}</p></article></body></html>", encoding="utf-8"
    )
    (root / "sub" / "deeper" / "latin.txt").write_bytes("Crème brûlée recipe: cream, sugar, vanilla.".encode("latin-1"))
    (root / "sub" / "deeper" / "notes.txt").write_text("Crème brûlée recipe: cream, sugar, vanilla.", encoding="utf-8")
    (root / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (root / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 jpeg")
    (root / ".hidden.txt").write_text("a hidden note that must not be read", encoding="utf-8")
    (root / ".git").mkdir()
    (root / ".git" / "config.txt").write_text("not a document", encoding="utf-8")
    outside = root.parent / "outside.txt"
    outside.write_text("a file outside the folder, reached through a link", encoding="utf-8")
    (root / "link.txt").symlink_to(outside)
    os.mkfifo(root / "pipe.txt")


async def test_folder_ingest_reports_bad_files_and_goes_on(db: Database, tmp_path: Path) -> None:
    root = tmp_path / "docs"
    await asyncio.to_thread(make_folder, root)
    hippo = Hippocampus(db=db, embedder=None)
    await hippo.async_start()
    try:
        ing = Ingestor(hippocampus=hippo, fetcher=None)
        results = await ing.async_ingest_path(root, owner="alice")
        by_name = {Path(r.source).name: r for r in results}
        ok = {n for n, r in by_name.items() if r.error is None}
        assert ok == {"lighthouse.txt", "orchard.md", "page.html", "notes.txt"}
        assert "not readable text" in (by_name["latin.txt"].error or "")  # no charset on disk, not UTF-8: said, not guessed
        assert "PDF" in (by_name["broken.pdf"].error or "")
        assert "unsupported file type '.jpg'" in (by_name["photo.jpg"].error or "")
        assert "symbolic link" in (by_name["link.txt"].error or "")
        assert "not a regular file" in (by_name["pipe.txt"].error or "")
        assert not any("hidden" in r.source or ".git" in r.source for r in results)
        assert by_name["orchard.md"].title == "Orchard" and by_name["page.html"].title == "Bakery"
        assert by_name["lighthouse.txt"].title == "lighthouse.txt"  # no title in the text: the file's name
        assert by_name["lighthouse.txt"].source == str(root / "lighthouse.txt")  # tmp_path is absolute already
        texts = " ".join(str(r[0]) for r in await db.async_fetchall("SELECT text FROM memories"))
        assert "Crème brûlée" in texts and "outside the folder" not in texts
        stored = await count(db, "SELECT count(*) FROM memories")

        again = await ing.async_ingest_path(root, owner="alice")
        assert all(r.duplicate for r in again if r.error is None) and len(again) == len(results)
        assert await count(db, "SELECT count(*) FROM memories") == stored
        # a single named file that cannot be read is an error of its own
        with pytest.raises(ValidationError, match="PDF"):
            await ing.async_ingest_path(root / "broken.pdf", owner="alice")
        with pytest.raises(ValidationError, match="unsupported file type"):
            await ing.async_ingest_path(root / "photo.jpg", owner="alice")
    finally:
        await hippo.async_stop()


async def test_folder_scan_is_bounded(tmp_path: Path) -> None:
    await asyncio.to_thread(write_files, tmp_path, {f"f{i}.txt": f"file {i}" for i in range(5)})
    files, skipped = await asyncio.to_thread(scan_folder, tmp_path, max_files=3)
    assert [p.name for p in files] == ["f0.txt", "f1.txt", "f2.txt"]
    assert any("more than 3 documents" in (r.error or "") for r in skipped)


async def test_scan_loop_ingests_shared_then_forgets_deleted_files_and_survives_errors(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "shared"
    await asyncio.to_thread(write_files, root, {"lighthouse.txt": LIGHTHOUSE, "orchard.txt": ORCHARD})
    hippo = Hippocampus(db=db, embedder=None)
    await hippo.async_start()
    try:
        ing = Ingestor(hippocampus=hippo, fetcher=None, folders=[root, tmp_path / "unmounted"], scan_interval_s=0.05)
        results = await ing.async_scan_once()
        assert {Path(r.source).name for r in results if r.error is None} == {"lighthouse.txt", "orchard.txt"}
        assert any(r.error == "folder does not exist" for r in results)
        assert {d["source"] for d in await ing.async_list(SHARED_OWNER)} == {str(root / "lighthouse.txt"), str(root / "orchard.txt")}
        assert all(d["shared"] for d in await ing.async_list(SHARED_OWNER))
        assert await ing.async_list("alice") == []
        await asyncio.to_thread((root / "orchard.txt").unlink)
        await ing.async_scan_once()
        assert [d["source"] for d in await ing.async_list(SHARED_OWNER)] == [str(root / "lighthouse.txt")]
        assert await count(db, "SELECT count(*) FROM memories WHERE text LIKE '%Quillon%'") == 0

        # the loop: a failing pass is logged and the next one runs
        calls: list[int] = []
        third = asyncio.Event()
        real = ing.async_scan_once

        async def flaky() -> list[Any]:
            calls.append(1)
            if len(calls) >= 3:
                third.set()
            if len(calls) == 1:
                raise StoreError("database is busy", transient=True)
            return await real()

        monkeypatch.setattr(ing, "async_scan_once", flaky)
        monkeypatch.setattr(ingest_mod, "SCAN_ERROR_BACKOFF_S", 0.01)
        task = asyncio.create_task(ing.async_scan_loop(), name="test-scan-loop")
        try:
            async with asyncio.timeout(10):
                await third.wait()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert ing.failures_total >= 1 and ing.scans_total >= 3
    finally:
        await hippo.async_stop()


# ------------------------------------------------------------------------------ a URL, from a site on 127.0.0.1


async def _site(routes: dict[str, tuple[str, bytes]]) -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.Response:
        found = routes.get(request.path)
        if found is None:
            return web.Response(status=404, text="not here")
        return web.Response(body=found[1], content_type=found[0], charset="utf-8" if found[0].startswith("text/") else None)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@needs_embedder
async def test_url_ingest_through_the_fetcher(hippo: Hippocampus) -> None:
    from mongarsd.cognition.iris.fetch import Fetcher

    page = f"<html><head><title>Harbour guide</title></head><body><nav>Home About</nav><article><p>{LIGHTHOUSE}</p></article></body></html>"
    runner, base = await _site({"/guide.html": ("text/html", page.encode()), "/secret/x.html": ("text/html", b"<p>no</p>")})
    fetcher = Fetcher(config=IrisConfig(urls=(base + "/guide.html",), host_rate_rps=100.0, host_burst=100))
    await fetcher.async_start()
    try:
        ing = Ingestor(hippocampus=hippo, fetcher=fetcher)
        result = await ing.async_ingest_url(base + "/guide.html", owner="alice")
        assert not result.duplicate and result.chunks >= 1 and result.source == base + "/guide.html"
        assert result.title == "Harbour guide"
        hits = (await hippo.async_recall("alice", "lighthouse keeper steps", 3)).hits
        assert hits and source_of(hits[0].memory.provenance) == base + "/guide.html"
        with pytest.raises(ValidationError) as err:
            await ing.async_ingest_url(base + "/secret/x.html", owner="alice")  # not on the allowlist
        assert err.value.status == 403
        with pytest.raises(ValidationError):
            await ing.async_ingest_url("ftp://127.0.0.1/file", owner="alice")
    finally:
        await fetcher.async_stop()
        await runner.cleanup()


# ------------------------------------------------------------------------------ the API and the CLI


@dataclass
class Api:
    url: str
    admin: str
    alice: str
    bob: str
    db: Database
    hippo: Hippocampus
    docs: Path


@pytest_asyncio.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    db = Database(path=tmp_path / "mongarsd.db")
    await db.async_start()
    hippo = Hippocampus(db=db, embedder=None)  # full-text recall is enough for roles; no model needed
    await hippo.async_start()
    ingestor = Ingestor(hippocampus=hippo, fetcher=None)
    tokens = TokenStore(db=db)
    admin, _ = await tokens.async_create("root", "admin")
    alice, _ = await tokens.async_create("alice", "user")
    bob, _ = await tokens.async_create("bob", "user")
    board = BoardInfo(profile="generic", model="test", arch="x86_64", cores_logical=2, cores_physical=2)
    ctx = AppContext(
        loaded=LoadedConfig(Config(auth=AuthConfig(rate_limit_rps=1000.0, rate_limit_burst=1000)), {}, "generic"),
        board=board, metrics=Metrics(), db=db, tokens=tokens, hippocampus=hippo, ingestor=ingestor,
    )  # fmt: skip
    ctx.state.ready = True
    app = create_app(ctx, [ingest_api.setup_routes])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    docs = tmp_path / "docs"
    await asyncio.to_thread(write_files, docs, {"lighthouse.txt": LIGHTHOUSE, "bad.pdf": b"%PDF-1.4 nope"})
    try:
        yield Api(f"http://127.0.0.1:{port}", admin, alice, bob, db, hippo, docs)
    finally:
        await runner.cleanup()
        await hippo.async_stop()
        await db.async_stop()


async def call(api: Api, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.request(method, api.url + path, headers=headers, json=body) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except json.JSONDecodeError:
            return resp.status, text


async def test_api_roles_shared_for_admins_own_for_users(api: Api) -> None:
    st, out = await call(api, "POST", "/api/v1/ingest", api.admin, {"path": str(api.docs), "shared": True})
    assert st == 201, out
    assert out["owner"] == SHARED_OWNER and out["shared"] is True and out["ingested"] == 1 and out["errors"] == 1
    shared_id = next(r["document_id"] for r in out["results"] if "error" not in r)
    assert any("PDF" in r.get("error", "") for r in out["results"])

    st, out = await call(api, "POST", "/api/v1/ingest", api.alice, {"text": ORCHARD, "title": "My orchard", "shared": True})
    assert st == 403 and "admin role" in out["error"]["message"]
    st, out = await call(api, "POST", "/api/v1/ingest", api.alice, {"path": str(api.docs / "lighthouse.txt")})
    assert st == 403 and "'path'" in out["error"]["message"]
    st, out = await call(api, "POST", "/api/v1/ingest", api.alice, {"text": ORCHARD, "user": "bob"})
    assert st == 403

    st, out = await call(api, "POST", "/api/v1/ingest", api.alice, {"text": ORCHARD, "title": "My orchard", "source": "orchard-notes"})
    assert st == 201 and out["owner"] == "alice" and out["results"][0]["title"] == "My orchard", out
    alice_id = out["results"][0]["document_id"]
    st, out = await call(api, "POST", "/api/v1/ingest", api.alice, {"text": ORCHARD + "\n"})
    assert st == 201 and out["duplicates"] == 1 and out["results"][0]["document_id"] == alice_id
    st, out = await call(api, "POST", "/api/v1/ingest", api.bob, {"text": BAKERY, "content_type": "text/markdown"})
    assert st == 201 and out["results"][0]["source"].startswith("text:")
    bob_id = out["results"][0]["document_id"]

    st, out = await call(api, "GET", "/api/v1/ingest", api.alice)
    assert st == 200 and [d["id"] for d in out["documents"]] == [alice_id] and out["owner"] == "alice"
    st, out = await call(api, "GET", "/api/v1/ingest", api.bob)
    assert [d["id"] for d in out["documents"]] == [bob_id]
    st, out = await call(api, "GET", "/api/v1/ingest?shared=true", api.bob)
    assert st == 403
    st, out = await call(api, "GET", "/api/v1/ingest?user=alice", api.bob)
    assert st == 403
    st, out = await call(api, "GET", "/api/v1/ingest?shared=true", api.admin)
    assert st == 200 and [d["id"] for d in out["documents"]] == [shared_id] and out["documents"][0]["shared"] is True
    st, out = await call(api, "GET", "/api/v1/ingest?user=alice", api.admin)
    assert [d["id"] for d in out["documents"]] == [alice_id]

    # recall: bob sees the shared lighthouse, never alice's orchard
    hits = (await api.hippo.async_recall("bob", "Zephyrine lighthouse Quillon orchard", 10)).hits
    assert {h.memory.document_id for h in hits} == {shared_id}

    st, out = await call(api, "DELETE", f"/api/v1/ingest/{alice_id}", api.bob)
    assert st == 404
    st, out = await call(api, "DELETE", f"/api/v1/ingest/{shared_id}", api.alice)
    assert st == 404  # a user never deletes shared documents: they are not hers
    st, out = await call(api, "DELETE", f"/api/v1/ingest/{shared_id}?shared=true", api.alice)
    assert st == 403
    st, out = await call(api, "DELETE", f"/api/v1/ingest/{alice_id}", api.alice)
    assert st == 200 and out["deleted"] == alice_id
    st, out = await call(api, "DELETE", f"/api/v1/ingest/{shared_id}?shared=true", api.admin)
    assert st == 200
    assert await count(api.db, "SELECT count(*) FROM memories WHERE document_id IN (?, ?)", (alice_id, shared_id)) == 0


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 400, "exactly one of"),
        ({"text": "a", "url": "http://127.0.0.1/"}, 400, "exactly one of"),
        ({"text": ""}, 400, "must not be empty"),
        ({"text": 5}, 400, "must be a string"),
        ({"text": "hello there", "content_type": "image/png"}, 400, "content_type"),
        ({"text": "hello there", "shared": "yes"}, 400, "true or false"),
        ({"path": "relative/file.txt"}, 400, "absolute"),
        ({"path": "/nonexistent-mongarsd-test/x.txt"}, 400, "does not exist"),
        ({"text": "hello there", "shared": True, "user": "alice"}, 400, "not both"),
        ({"text": "hello there", "user": "bad name!"}, 400, "user must be"),
        ({"url": "http://127.0.0.1:9/page"}, 503, "not enabled"),
    ],
)
async def test_api_bad_requests_are_named(api: Api, body: dict[str, Any], status: int, message: str) -> None:
    st, out = await call(api, "POST", "/api/v1/ingest", api.admin, body)
    assert st == status, out
    assert message in out["error"]["message"]


async def test_api_bad_ids_and_no_ingestor(api: Api) -> None:
    st, out = await call(api, "DELETE", "/api/v1/ingest/abc", api.alice)
    assert st == 400 and "positive integer" in out["error"]["message"]
    st, out = await call(api, "GET", "/api/v1/ingest?shared=maybe", api.admin)
    assert st == 400
    st, out = await call(api, "GET", "/api/v1/ingest", None)
    assert st == 200 and out["owner"] == "local"  # trusted loopback: the local admin's own documents


async def test_cli_ingests_through_the_running_daemon(api: Api) -> None:
    def args(target: str, **kw: Any) -> argparse.Namespace:
        base = {"target": target, "user": None, "shared": False, "json": False, "daemon": api.url, "token": None}
        return argparse.Namespace(**{**base, **kw})

    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(run_ingest, args(str(api.docs), shared=True), out, err)
    assert code == 0, err.getvalue()
    assert "1 stored, 0 already stored, 1 not ingested" in out.getvalue()
    assert "ingesting" in err.getvalue()
    assert len(await api.hippo.async_list_documents(SHARED_OWNER)) == 1

    out = io.StringIO()
    code = await asyncio.to_thread(run_ingest, args(str(api.docs / "lighthouse.txt"), user="alice", json=True), out, io.StringIO())
    assert code == 0 and json.loads(out.getvalue())["owner"] == "alice"

    # a small file travels in the request: a user may ingest their own, and its problems are named
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(run_ingest, args(str(api.docs / "lighthouse.txt"), token=api.alice, json=True), out, err)
    assert code == 0 and json.loads(out.getvalue())["owner"] == "alice", err.getvalue()
    err = io.StringIO()
    code = await asyncio.to_thread(run_ingest, args(str(api.docs / "bad.pdf"), token=api.alice), io.StringIO(), err)
    assert code == 1 and "error 400" in err.getvalue() and "PDF" in err.getvalue()
    err = io.StringIO()
    code = await asyncio.to_thread(run_ingest, args(str(api.docs), token=api.alice), io.StringIO(), err)
    assert code == 1 and "error 403" in err.getvalue()  # a user token may not have the daemon read a folder

    err = io.StringIO()
    code = await asyncio.to_thread(run_ingest, args(str(api.docs / "missing.txt")), io.StringIO(), err)
    assert code == 1 and "no such file" in err.getvalue()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, never listening: connection refused
        err = io.StringIO()
        code = await asyncio.to_thread(run_ingest, args(str(api.docs), daemon=f"http://127.0.0.1:{closed}"), io.StringIO(), err)
    assert code == 1 and "cannot reach the daemon" in err.getvalue() and "is it running" in err.getvalue()
