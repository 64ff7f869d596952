"""Sommeil's built-in idle jobs: consolidation, dedupe, TTL purge, embedding backfill, SQLite upkeep.

Each is an `IdleJob` (maintenance/sommeil.py): cancellable at any await, bounded per run, and
returning a summary of what it did. Heavy reads and the statements SQLite cannot run inside a
transaction (wal_checkpoint, VACUUM) use a short-lived connection of their own in a worker
thread, which a cancellation interrupts (sqlite3_interrupt) so a request never waits for them;
every row change goes through the Database's one writer or Hippocampus's methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiosqlite
import numpy as np
import numpy.typing as npt
import structlog

from mongarsd.config import SommeilConfig
from mongarsd.errors import NotFoundError
from mongarsd.inference.llm import LlamaEngine
from mongarsd.inference.manager import InferenceManager
from mongarsd.inference.sampling import GenerationParams, SamplingSpec, build_params
from mongarsd.maintenance.sommeil import IdleJob, async_last_done
from mongarsd.memory.db import BUSY_TIMEOUT_MS, Database
from mongarsd.memory.hippocampus import DAY_S, MAX_MEMORY_CHARS, Hippocampus, Message
from mongarsd.memory.vectors import from_blob

log = structlog.get_logger("mongarsd.maintenance.jobs")

SIDE_INTERRUPT_WAIT_S: Final = 2.0  # an interrupted statement unwinds within this (SQLite checks often)

CONSOLIDATE_SESSIONS_PER_RUN: Final = 32
CONSOLIDATE_MESSAGES: Final = 40  # the latest messages of a session given to the model
CONSOLIDATE_MESSAGE_CHARS: Final = 600  # each clipped to this
CONSOLIDATE_RECHECK_S: Final = 300.0  # with no new message, stale sessions are looked for again after this
SUMMARY_MAX_TOKENS: Final = 96
# The summary's prompt is prefilled this many tokens per engine step (through the prefix cache): a
# request arriving meanwhile waits for one such step, not for an n_batch-token one.
PREFILL_CHUNK_TOKENS: Final = 8
# Every summary runs under this one cache key: the engine gives it back the slot it used last (the
# instruction's prefix is cached there), so idle work keeps to its own slot instead of evicting the
# prefix caches of users' chats (with a single slot it cannot).
CACHE_KEY: Final = "mongarsd-sommeil"
SUMMARY_IMPORTANCE: Final = 0.6
SUMMARY_FALLBACK_CHARS: Final = 300
SUMMARY_KIND: Final = "summary"
SUMMARY_SOURCE: Final = "sommeil"
SUMMARY_SYSTEM: Final = "You write short, factual notes for a personal assistant's long-term memory."
SUMMARY_INSTRUCTION: Final = (
    "Summarise what the user said about themselves (facts, preferences, plans, people and places in their life) "
    "in the conversation below, in at most three short sentences written in the third person. "
    "If they said nothing about themselves, say in one sentence what they talked about.\n\nConversation:\n"
)

DEDUPE_KINDS: Final = ("fact", "note", "summary", "research")  # never documents (their chunks are whole) nor turns
DEDUPE_MAX_USERS: Final = 32  # per run, round-robin over the users
DEDUPE_MAX_ROWS: Final = 2048  # each user's newest memories compared per run
DEDUPE_MAX_MERGES: Final = 256  # per run
DEDUPE_BLOCK_ROWS: Final = 64  # rows compared per worker-thread step: a cancellation waits for one step at most
DEDUPE_REPORTED_PAIRS: Final = 20

# Small batches: a cancelled backfill cannot stop the embedder's thread mid-batch, so a request
# arriving meanwhile shares the CPU with at most this many texts being embedded.
BACKFILL_BATCH_ROWS: Final = 8
BACKFILL_MAX_BATCHES: Final = 256

ANALYZE_LIMIT_ROWS: Final = 1000  # PRAGMA analysis_limit: an approximate ANALYZE, bounded on big tables
VACUUM_MIN_FREE_FRACTION: Final = 0.10  # VACUUM rewrites the whole file: only when this much of it is free pages

_SPACE_RE = re.compile(r"\s+")


# ------------------------------------------------------------------------------ side connections


def _side_work(
    path: Path, statements: Sequence[tuple[str, Sequence[Any]]], readonly: bool, holder: list[sqlite3.Connection]
) -> list[list[Any]]:
    """Run statements on a connection of their own, outside any transaction (blocking: run in a thread)."""
    target = path.resolve().as_uri() + ("?mode=ro" if readonly else "")
    conn = sqlite3.connect(target, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    holder.append(conn)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return [conn.execute(sql, tuple(params)).fetchall() for sql, params in statements]
    finally:
        holder.clear()
        conn.close()


async def async_side(path: Path, statements: Sequence[tuple[str, Sequence[Any]]], *, readonly: bool) -> list[list[Any]]:
    """Run statements on a short-lived connection in a worker thread; a cancellation interrupts them.

    For the heavy reads of idle jobs (so the daemon's one reader stays free for requests) and for
    wal_checkpoint and VACUUM, which cannot run inside the writer's transactions. Rows are tuples.
    """
    holder: list[sqlite3.Connection] = []
    fut = asyncio.get_running_loop().run_in_executor(None, _side_work, path, statements, readonly, holder)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        for conn in list(holder):
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed meanwhile: nothing left to interrupt
                conn.interrupt()
        await asyncio.wait({fut}, timeout=SIDE_INTERRUPT_WAIT_S)
        if fut.done() and not fut.cancelled():
            fut.exception()  # retrieved: "interrupted" is the expected end here
        raise


# ------------------------------------------------------------------------------ pure helpers


def transcript_lines(messages: Sequence[Message]) -> list[str]:
    """A session's user and assistant turns as clipped "User: ..." lines, oldest first (pure)."""
    return [
        ("User: " if m.role == "user" else "Assistant: ") + _clip(m.content, CONSOLIDATE_MESSAGE_CHARS)
        for m in messages
        if m.role in ("user", "assistant") and m.content.strip()
    ]


def summary_prompt(lines: Sequence[str]) -> list[dict[str, str]]:
    """The chat messages asking the model for the summary of a transcript (pure)."""
    return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": SUMMARY_INSTRUCTION + "\n".join(lines)}]


def _clip(text: str, chars: int) -> str:
    text = _SPACE_RE.sub(" ", text).strip()
    return text if len(text) <= chars else text[: chars - 1].rstrip() + "…"


def clean_summary(text: str, messages: Sequence[Message]) -> str:
    """The memory text of a generated summary; the user's first words when the model said nothing (pure)."""
    out = _SPACE_RE.sub(" ", text).strip()
    if out.lower().startswith("summary:"):
        out = out[len("summary:") :].strip()
    out = out.strip('"').strip()
    if not out:
        first = next((m.content for m in messages if m.role == "user" and m.content.strip()), "")
        out = "The user said: " + _clip(first, SUMMARY_FALLBACK_CHARS) if first.strip() else ""
    return out[:MAX_MEMORY_CHARS]


def summary_provenance(session_id: str, first_id: int, last_id: int, consolidated_at: float, model: str) -> str:
    """The provenance JSON of a session's summary: which messages it covers, when and by which model (pure)."""
    return json.dumps(
        {"session_id": session_id, "messages": [first_id, last_id], "consolidated_at": consolidated_at, "model": model}, ensure_ascii=False
    )


def unit_rows(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """L2-normalise each row; zero rows stay zero (pure)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: npt.NDArray[np.float32] = (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return out


def similar_pairs(mat: npt.NDArray[np.float32], threshold: float, start: int, stop: int) -> list[tuple[int, int, float]]:
    """Row pairs (i, j), start <= i < stop, i < j, with cosine >= threshold (blocking numpy: run in a thread).

    einsum rather than a BLAS product: one thread, so it never fights llama.cpp's threads for the cores.
    """
    block = mat[start:stop]
    sims = np.einsum("ij,kj->ik", block, mat)
    rows, cols = np.nonzero(sims >= threshold)
    return [(start + int(r), int(c), float(sims[r, c])) for r, c in zip(rows, cols, strict=True) if int(c) > start + int(r)]


@dataclass(frozen=True, slots=True)
class MemoryMeta:
    id: int
    created_at: float
    importance: float


@dataclass(frozen=True, slots=True)
class Merge:
    keep: int
    drop: int
    similarity: float
    importance: float  # the kept memory's importance after the merge


def plan_merges(pairs: Sequence[tuple[int, int, float]], meta: Mapping[int, MemoryMeta], limit: int) -> list[Merge]:
    """Choose merges from similar (id, id, cosine) pairs, closest first (pure).

    The older memory is kept (it carries the original provenance) and takes the higher importance
    of the two; a memory merged away is never kept nor merged again.
    """
    dropped: set[int] = set()
    boosted: dict[int, float] = {}
    merges: list[Merge] = []
    for a, b, sim in sorted(pairs, key=lambda p: (-p[2], p[0], p[1])):
        if len(merges) >= limit:
            break
        if a in dropped or b in dropped or a == b:
            continue
        ma, mb = meta[a], meta[b]
        keep, drop = (ma, mb) if (ma.created_at, ma.id) <= (mb.created_at, mb.id) else (mb, ma)
        importance = max(boosted.get(keep.id, keep.importance), boosted.get(drop.id, drop.importance))
        boosted[keep.id] = importance
        dropped.add(drop.id)
        merges.append(Merge(keep.id, drop.id, sim, importance))
    return merges


def interval_due(now: float, last: float | None, interval_days: float) -> bool:
    """Tell whether a periodic task is due: never ran, or its interval passed (0: every time) (pure)."""
    return last is None or now - last >= interval_days * DAY_S


def vacuum_worthwhile(free_pages: int, pages: int, min_fraction: float = VACUUM_MIN_FREE_FRACTION) -> bool:
    """VACUUM only when enough of the file is free pages: it rewrites all of it (SD cards wear) (pure)."""
    return pages > 0 and free_pages / pages > min_fraction


# ------------------------------------------------------------------------------ jobs


@contextlib.asynccontextmanager
async def _async_engine(llm: InferenceManager | LlamaEngine) -> AsyncIterator[tuple[LlamaEngine, str]]:
    """Hold the default model for the job: a manager lease, or a bare engine (tools and tests)."""
    if isinstance(llm, LlamaEngine):
        yield llm, llm.model_id
        return
    async with llm.async_use(llm.default_model) as lease:
        yield lease.engine, lease.entry.id


async def _async_generate_text(engine: LlamaEngine, tokens: list[int], params: GenerationParams) -> str:
    """Generate and return the text; a cancellation closes the stream (the slot is free after one step)."""
    pieces: list[str] = []
    events = engine.async_generate(tokens, params, cache_key=CACHE_KEY)
    try:
        async for event in events:
            pieces.append(event.text)
    finally:
        await events.aclose()
    return "".join(pieces)


class ConsolidateJob:
    """Summarise sessions untouched for `after_days` into one long-term memory each, with provenance."""

    name = "consolidate"

    def __init__(
        self,
        hippocampus: Hippocampus,
        llm: InferenceManager | LlamaEngine | None,
        after_days: float,
        *,
        per_run: int = CONSOLIDATE_SESSIONS_PER_RUN,
    ) -> None:
        self._hippocampus = hippocampus
        self._llm = llm
        self.after_days = after_days
        self.per_run = per_run
        self._idle_mark: tuple[int, float] | None = None  # (newest message id, when) of the last run that left nothing

    def due(self, now: float) -> bool:
        return True  # whether any session waits is a query, made by the run itself

    async def _async_candidates(self, cutoff: float) -> list[tuple[str, str, int, int]]:
        """(user, session, first message id, last message id) of the stale sessions not summarised as they are now."""
        path = self._hippocampus.db.path
        done, stale = await async_side(
            path,
            [
                (
                    "SELECT user, json_extract(provenance, '$.session_id'), json_extract(provenance, '$.messages[1]') "
                    "FROM memories WHERE kind = ? AND source = ?",
                    (SUMMARY_KIND, SUMMARY_SOURCE),
                ),
                (
                    "SELECT user, session_id, min(id), max(id), max(created_at) AS last_at FROM messages GROUP BY user, session_id "
                    "HAVING max(created_at) < ? AND sum(role = 'user') > 0 ORDER BY last_at",
                    (cutoff,),
                ),
            ],
            readonly=True,
        )
        summarised = {(str(u), str(s), int(m)) for u, s, m in done if s is not None and m is not None}
        return [(str(u), str(s), int(a), int(b)) for u, s, a, b, _ in stale if (str(u), str(s), int(b)) not in summarised]

    async def async_run(self) -> dict[str, Any]:
        if self._llm is None:
            return {"skipped": "no language model is configured"}
        now = time.time()
        row = await self._hippocampus.db.async_fetchone("SELECT max(id) AS n FROM messages")
        newest = int(row["n"]) if row is not None and row["n"] is not None else 0
        mark = self._idle_mark
        if mark is not None and mark[0] == newest and now - mark[1] < CONSOLIDATE_RECHECK_S:
            return {"sessions": 0, "remaining": 0, "unchanged": True}  # nothing said since the last look
        self._idle_mark = None
        candidates = await self._async_candidates(now - self.after_days * DAY_S)
        if not candidates:
            self._idle_mark = (newest, now)
            return {"sessions": 0, "remaining": 0}
        memories: list[int] = []
        superseded = 0
        async with _async_engine(self._llm) as (engine, model_id):
            for user, session_id, first_id, last_id in candidates[: self.per_run]:
                messages = await self._hippocampus.async_history(user, session_id=session_id, limit=CONSOLIDATE_MESSAGES)
                text = clean_summary(await self._async_summarise(engine, messages), messages)
                if not text:
                    continue
                provenance = summary_provenance(session_id, first_id, last_id, time.time(), model_id)
                memory = await self._hippocampus.async_add_memory(
                    user, text, importance=SUMMARY_IMPORTANCE, kind=SUMMARY_KIND, source=SUMMARY_SOURCE, provenance=provenance
                )
                memories.append(memory.id)
                superseded += await self._async_drop_older(user, session_id, memory.id)
        if len(candidates) <= self.per_run:
            self._idle_mark = (newest, now)  # all done (a cancelled run never gets here)
        log.info("sessions_consolidated", sessions=len(memories), model=model_id)
        return {
            "sessions": len(memories),
            "memories": memories,
            "superseded": superseded,
            "remaining": max(0, len(candidates) - self.per_run),
            "model": model_id,
        }

    async def _async_summarise(self, engine: LlamaEngine, messages: Sequence[Message]) -> str:
        """Generate a session's summary with the local model: greedy, at most SUMMARY_MAX_TOKENS."""
        room = int(engine.n_ctx_per_slot) - SUMMARY_MAX_TOKENS
        lines = transcript_lines(messages)
        while True:
            tokens = await asyncio.to_thread(engine.tokenize_chat, summary_prompt(lines))
            if len(tokens) <= room or not lines:
                break
            lines = lines[max(1, len(lines) // 4) :]  # drop the oldest quarter until it fits
        n_ctx = int(engine.n_ctx_per_slot)
        for end in range(PREFILL_CHUNK_TOKENS, len(tokens) - 1, PREFILL_CHUNK_TOKENS):
            one = build_params(SamplingSpec(max_tokens=1, temperature=0.0), n_prompt=end, n_ctx=n_ctx, max_tokens_default=1)
            await _async_generate_text(engine, tokens[:end], one)
        params = build_params(
            SamplingSpec(max_tokens=SUMMARY_MAX_TOKENS, temperature=0.0),
            n_prompt=len(tokens),
            n_ctx=n_ctx,
            max_tokens_default=SUMMARY_MAX_TOKENS,
        )
        return await _async_generate_text(engine, tokens, params)

    async def _async_drop_older(self, user: str, session_id: str, keep_id: int) -> int:
        """Delete the session's earlier summaries (the session went on after them); return how many."""
        rows = await self._hippocampus.db.async_fetchall(
            "SELECT id FROM memories WHERE user = ? AND kind = ? AND source = ? AND id != ? AND json_extract(provenance, '$.session_id') = ?",
            (user, SUMMARY_KIND, SUMMARY_SOURCE, keep_id, session_id),
        )
        gone = 0
        for row in rows:
            try:
                await self._hippocampus.async_delete_memory(user, int(row["id"]))
                gone += 1
            except NotFoundError:
                continue  # the user deleted it meanwhile
        return gone


class DedupeJob:
    """Merge each user's near-duplicate memories (cosine >= similarity): keep the older, with the higher importance."""

    name = "dedupe"

    def __init__(self, hippocampus: Hippocampus, similarity: float) -> None:
        self._hippocampus = hippocampus
        self.similarity = similarity
        self._after_user = ""  # round-robin: the next run starts after the last user it reached
        self._clean: tuple[int, int] | None = None  # (count, newest id) of the comparable memories after a pass that merged nothing

    def due(self, now: float) -> bool:
        return True

    async def async_run(self) -> dict[str, Any]:
        hippo = self._hippocampus
        marks = ",".join("?" * len(DEDUPE_KINDS))
        comparable = f"FROM memories WHERE kind IN ({marks}) AND embedding IS NOT NULL"
        (signature_rows, users_rows) = await async_side(
            hippo.db.path,
            [
                (f"SELECT count(*), coalesce(max(id), 0) {comparable}", DEDUPE_KINDS),
                (f"SELECT DISTINCT user {comparable} ORDER BY user", DEDUPE_KINDS),
            ],
            readonly=True,
        )
        signature = (int(signature_rows[0][0]), int(signature_rows[0][1]))
        if signature == self._clean:
            return {"users": 0, "compared": 0, "merged": 0, "unchanged": True}  # no memory added or embedded since
        users = [str(r[0]) for r in users_rows]
        order = [u for u in users if u > self._after_user] + [u for u in users if u <= self._after_user]
        compared = 0
        merged: list[Merge] = []
        reached = 0
        for user in order[:DEDUPE_MAX_USERS]:
            if len(merged) >= DEDUPE_MAX_MERGES:
                break
            n, merges = await self._async_user(user, DEDUPE_MAX_MERGES - len(merged))
            compared += n
            merged += merges
            reached += 1
            self._after_user = user
        self._clean = signature if reached == len(users) and not merged else None
        return {
            "users": reached,
            "compared": compared,
            "merged": len(merged),
            "pairs": [[m.keep, m.drop, round(m.similarity, 4)] for m in merged[:DEDUPE_REPORTED_PAIRS]],
        }

    async def _async_user(self, user: str, limit: int) -> tuple[int, list[Merge]]:
        """Compare one user's newest memories (per embedding model) and merge the near-duplicates."""
        hippo = self._hippocampus
        marks = ",".join("?" * len(DEDUPE_KINDS))
        (rows,) = await async_side(
            hippo.db.path,
            [
                (
                    f"SELECT id, embedding, embed_model, importance, created_at FROM memories WHERE user = ? AND kind IN ({marks}) "
                    "AND embedding IS NOT NULL AND (expires_at IS NULL OR expires_at > ?) ORDER BY id DESC LIMIT ?",
                    (user, *DEDUPE_KINDS, time.time(), DEDUPE_MAX_ROWS),
                )
            ],
            readonly=True,
        )
        groups: dict[str, tuple[list[int], list[npt.NDArray[np.float32]]]] = {}
        meta: dict[int, MemoryMeta] = {}
        for mid, blob, model, importance, created_at in rows:
            vec = from_blob(blob, hippo.dim)
            if vec is None:
                continue
            ids, vecs = groups.setdefault(str(model or ""), ([], []))
            ids.append(int(mid))
            vecs.append(vec)
            meta[int(mid)] = MemoryMeta(int(mid), float(created_at), float(importance))
        merges: list[Merge] = []
        for ids, vecs in groups.values():
            if len(ids) < 2:
                continue
            mat = unit_rows(np.stack(vecs))
            pairs: list[tuple[int, int, float]] = []
            for start in range(0, len(ids), DEDUPE_BLOCK_ROWS):
                found = await asyncio.to_thread(similar_pairs, mat, self.similarity, start, min(start + DEDUPE_BLOCK_ROWS, len(ids)))
                pairs += [(ids[i], ids[j], s) for i, j, s in found]
            merges += plan_merges(pairs, meta, limit - len(merges))
        applied = [m for m in merges if await self._async_apply(user, m)]
        if applied:
            log.info("memories_merged", user=user, merged=len(applied))
        return len(rows), applied

    async def _async_apply(self, user: str, merge: Merge) -> bool:
        """Raise the kept memory's importance, then delete the other (index included); False if either is gone."""

        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute(
                "UPDATE memories SET importance = max(importance, ?) WHERE id = ? AND user = ?", (merge.importance, merge.keep, user)
            )
            return int(cur.rowcount)

        kept: int = await self._hippocampus.db.async_write(op)
        if not kept:
            return False  # the keeper was deleted meanwhile: keep the other
        try:
            await self._hippocampus.async_delete_memory(user, merge.drop)
        except NotFoundError:
            return False
        return True


class PurgeJob:
    """Delete expired memories and messages (Hippocampus's TTL purge)."""

    name = "purge"

    def __init__(self, hippocampus: Hippocampus) -> None:
        self._hippocampus = hippocampus

    def due(self, now: float) -> bool:
        return True

    async def async_run(self) -> dict[str, Any]:
        return {"purged": await self._hippocampus.async_purge()}


class BackfillJob:
    """Embed the memories stored without a vector (embedder down, or another model's space)."""

    name = "backfill"

    def __init__(self, hippocampus: Hippocampus, *, max_batches: int = BACKFILL_MAX_BATCHES) -> None:
        self._hippocampus = hippocampus
        self.max_batches = max_batches

    def due(self, now: float) -> bool:
        return True

    async def async_run(self) -> dict[str, Any]:
        total = batches = 0
        more = False
        for _ in range(self.max_batches):
            n = await self._hippocampus.async_backfill_embeddings(batch=BACKFILL_BATCH_ROWS)
            if not n:
                break
            total += n
            batches += 1
        else:
            more = True
        return {"embedded": total, "batches": batches, "more": more}


class DatabaseUpkeepJob:
    """Checkpoint the WAL every cycle; ANALYZE and VACUUM (then integrity_check) only when due and useful."""

    name = "db_upkeep"

    def __init__(self, db: Database, analyze_interval_days: float, vacuum_interval_days: float) -> None:
        self._db = db
        self.analyze_interval_days = analyze_interval_days
        self.vacuum_interval_days = vacuum_interval_days

    def due(self, now: float) -> bool:
        return True  # the checkpoint runs every cycle; ANALYZE and VACUUM decide inside

    async def async_run(self) -> dict[str, Any]:
        path = self._db.path
        out: dict[str, Any] = {"checkpoint": await self._async_checkpoint(path)}
        now = time.time()
        if interval_due(now, await async_last_done(self._db, self.name, "analyzed"), self.analyze_interval_days):
            await self._db.async_write(_analyze)
            out["analyzed"] = True
        pages, free = await self._async_pages()
        out["pages"], out["free_pages"] = pages, free
        if not interval_due(now, await async_last_done(self._db, self.name, "vacuumed"), self.vacuum_interval_days):
            out["vacuum"] = "not due"
        elif not vacuum_worthwhile(free, pages):
            out["vacuum"] = f"not needed: {free} of {pages} pages free"
        else:
            t0 = time.monotonic()
            _, _, check = await async_side(
                path, [("VACUUM", ()), ("PRAGMA wal_checkpoint(TRUNCATE)", ()), ("PRAGMA integrity_check", ())], readonly=False
            )
            problems = [str(r[0]) for r in check]
            out["vacuumed"] = True
            out["vacuum_ms"] = round((time.monotonic() - t0) * 1000, 1)
            out["integrity"] = "ok" if problems == ["ok"] else problems[:5]
            out["pages_after"], _ = await self._async_pages()
            if problems != ["ok"]:
                log.error("database_integrity_problems", problems=problems[:5])
        return out

    async def _async_checkpoint(self, path: Path) -> dict[str, Any]:
        ((row,),) = await async_side(path, [("PRAGMA wal_checkpoint(TRUNCATE)", ())], readonly=False)
        busy, frames, done = (int(v) for v in row)
        return {"busy": bool(busy), "wal_frames": frames, "checkpointed": done}

    async def _async_pages(self) -> tuple[int, int]:
        pages = await self._db.async_fetchone("PRAGMA page_count")
        free = await self._db.async_fetchone("PRAGMA freelist_count")
        return (int(pages[0]) if pages is not None else 0), (int(free[0]) if free is not None else 0)


async def _analyze(conn: aiosqlite.Connection) -> None:
    """ANALYZE through the one writer, bounded per index by analysis_limit."""
    await conn.execute(f"PRAGMA analysis_limit={ANALYZE_LIMIT_ROWS}")
    await conn.execute("ANALYZE")


def builtin_jobs(
    config: SommeilConfig, *, hippocampus: Hippocampus, llm: InferenceManager | LlamaEngine | None, db: Database
) -> list[IdleJob]:
    """The built-in jobs in cycle order: purge, backfill, consolidate, dedupe, then SQLite upkeep (last: after the deletes)."""
    return [
        PurgeJob(hippocampus),
        BackfillJob(hippocampus),
        ConsolidateJob(hippocampus, llm, config.consolidate_after_days),
        DedupeJob(hippocampus, config.dedupe_similarity),
        DatabaseUpkeepJob(db, config.analyze_interval_days, config.vacuum_interval_days),
    ]
