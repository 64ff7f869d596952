"""Hippocampus: per-user conversation history and semantic memory with hybrid recall.

Every SQL statement here carries `WHERE user = ?` and the vector index is partitioned by
user, so one user's data can never surface in another user's recall or history (the
original leaked across users through global history and had two drifting instances; here
there is one service and SQLite is the only source of truth). The one widening: recall also
reads the document memories of SHARED_OWNER, documents an admin ingested for everyone.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Protocol

import aiosqlite
import numpy as np
import numpy.typing as npt
import structlog

from mongarsd.errors import EmbedderUnavailableError, NotFoundError, StoreError, ValidationError
from mongarsd.memory.db import Database
from mongarsd.memory.vectors import Hit, VectorIndex, from_blob, to_blob

log = structlog.get_logger("mongarsd.memory.hippocampus")

EMBED_DIM = 384
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
RECALL_CANDIDATES_MULT = 4  # each ranker contributes k * this candidates to the fusion
MAX_RECALL_K = 100
MAX_FTS_TERMS = 32
MAX_MEMORY_CHARS = 8000
MIN_TURN_MEMORY_WORDS = 3
LOAD_BATCH_ROWS = 20000
BACKFILL_BATCH = 32
BACKFILL_ROUNDS_MAX = 64  # batches per purge round, so a huge backlog never hogs the embedder
SEARCH_IN_THREAD_ROWS = 20000  # bigger partitions are scanned off the event loop (numpy drops the GIL)
DAY_S = 86400.0

STATUS_OK = "ok"
STATUS_EMBEDDER_UNAVAILABLE = "embedder_unavailable"

ROLES = ("system", "user", "assistant", "tool")
MAX_STORED_CALLS_CHARS = 64_000
MEMORY_KINDS = ("fact", "turn", "note", "summary", "research", "document")
# Kinds a user may store through the API: research and documents come only from Iris, so
# nobody can pass their own words off as a fetched source.
USER_MEMORY_KINDS = ("fact", "turn", "note", "summary")

SHARED_OWNER: Final = "*"  # owner of shared documents; never a valid user name (tokens.USER_NAME_RE)
DOCUMENT_KIND: Final = "document"
DOCUMENT_MEMORY_SOURCE: Final = "iris"
DOCUMENT_EMBED_BATCH = 32  # chunks per embedder call: a chat turn's recall waits behind one batch at most
DOCUMENT_IMPORTANCE = 0.5
MAX_DOCUMENT_CHUNKS = 5000
MAX_DOCUMENT_LIST = 1000


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Small stopword lists: FTS queries skip them, mimicry uses them to guess the language.
STOPWORDS: dict[str, frozenset[str]] = {
    "en": _words(
        "the a an and or but of to in on at for with is are was were be been am i you he she it we they my your "
        "his her its our their this that these those what which who how do does did not no yes have has had will "
        "would can could should me him them there here from as by so if than then just about"
    ),
    "fr": _words(
        "le la les un une des et ou mais de du au aux en dans sur pour par avec est sont était être ai as a avons "
        "je tu il elle nous vous ils elles mon ma mes ton ta tes son sa ses notre votre leur ce cette ces qui que "
        "quoi comment ne pas oui non se sa y très plus moins donc car quand où si"
    ),
    "es": _words(
        "el la los las un una unos unas y o pero de del al en por para con es son era ser estoy está están yo tú "
        "él ella nosotros vosotros ellos mi mis tu tus su sus este esta estos estas que qué quién cómo no sí muy "
        "más menos porque cuando donde si también"
    ),
    "de": _words(
        "der die das ein eine einen einem einer und oder aber von zu im in auf für mit ist sind war sein bin ich "
        "du er sie es wir ihr mein meine dein deine sein seine unser euer dieser diese dieses was wer wie nicht "
        "nein ja sehr mehr weniger weil wenn wo ob auch den dem des"
    ),
}
ALL_STOPWORDS: frozenset[str] = frozenset().union(*STOPWORDS.values())
_WORD_RE = re.compile(r"\w+", re.UNICODE)
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?？。])\s+")


class Embedder(Protocol):
    @property
    def dim(self) -> int: ...

    @property
    def model_id(self) -> str: ...

    async def async_embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    session_id: str
    role: str
    content: str
    created_at: float
    model: str | None = None
    tokens: int | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant turns: [{id, name, arguments}]
    tool_call_id: str | None = None  # tool turns: the call this result answers
    tool_name: str | None = None

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("tool_calls", "tool_call_id", "tool_name"):
            if out[key] is None:
                del out[key]
        return out


@dataclass(frozen=True, slots=True)
class Memory:
    id: int
    text: str
    importance: float
    kind: str
    source: str
    created_at: float
    expires_at: float | None = None
    provenance: str | None = None
    session_id: str | None = None
    message_id: int | None = None
    embedded: bool = False
    document_id: int | None = None  # the ingested document this chunk belongs to

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Document:
    """An ingested document: its chunks are memories of kind "document" with its id."""

    id: int
    owner: str
    source: str
    title: str
    fingerprint: str
    content_type: str
    bytes: int
    chunks: int
    fetched_at: float

    @property
    def shared(self) -> bool:
        return self.owner == SHARED_OWNER

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "shared": self.shared}


@dataclass(frozen=True, slots=True)
class StoredDocument:
    document: Document
    duplicate: bool  # the same text was already stored for this owner: nothing was written
    replaced: tuple[int, ...] = ()  # ids of this owner's older documents of the same source, now deleted
    embedded: int = 0  # chunks stored with a vector (the rest wait for the backfill)


@dataclass(frozen=True, slots=True)
class RecallHit:
    memory: Memory
    score: float  # fused RRF score
    similarity: float | None  # cosine, when the vector ranker saw it
    vector_rank: int | None
    text_rank: int | None

    def public(self) -> dict[str, Any]:
        return {
            **self.memory.public(),
            "score": round(self.score, 6),
            "similarity": None if self.similarity is None else round(self.similarity, 6),
            "vector_rank": self.vector_rank,
            "text_rank": self.text_rank,
        }


@dataclass(frozen=True, slots=True)
class RecallResult:
    hits: list[RecallHit]
    status: str = STATUS_OK  # "ok", or "embedder_unavailable" when only full-text search ran
    reason: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        return self.status != STATUS_OK

    @property
    def best_similarity(self) -> float | None:
        sims = [h.similarity for h in self.hits if h.similarity is not None]
        return max(sims) if sims else None


@dataclass(frozen=True, slots=True)
class StoredTurn:
    session_id: str
    user_message_id: int
    assistant_message_id: int
    memory_id: int | None


# ------------------------------------------------------------------------------ pure helpers


def _calls_json(calls: object) -> str | None:
    """Serialize an assistant turn's tool calls for the messages table (None: no calls)."""
    if not calls or not isinstance(calls, Sequence):
        return None
    text = json.dumps([dict(c) for c in calls], ensure_ascii=False)
    if len(text) > MAX_STORED_CALLS_CHARS:
        raise ValidationError("the tool calls are too large to store (" + str(len(text)) + " characters)", param="tool_calls")
    return text


def _calls_from_json(text: object) -> list[dict[str, Any]] | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        log.warning("stored_tool_calls_unreadable")
        return None
    return [c for c in value if isinstance(c, dict)] if isinstance(value, list) else None


def fts_query(text: str, *, max_terms: int = MAX_FTS_TERMS) -> str | None:
    """Turn free user text into a safe FTS5 query: quoted word tokens OR-ed, or None if none.

    Every token is a `\\w+` run wrapped in double quotes, so FTS5 operators (AND, NEAR, *,
    ^, column filters, parentheses, quotes) in user text are only ever matched as words.
    """
    seen: list[str] = []
    for tok in _WORD_RE.findall(text.lower()):
        if tok in ALL_STOPWORDS or tok in seen or (len(tok) < 2 and not tok.isdigit()):
            continue
        seen.append(tok)
        if len(seen) >= max_terms:
            break
    if not seen:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in seen)


def rrf_fuse(rankings: Sequence[Sequence[int]], *, k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: score(id) = sum over rankers of 1 / (k + rank), rank from 1."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], -kv[0]))


def turn_importance(text: str) -> float:
    """Score how worth remembering a user message is (0..1): personal facts and preferences rank higher."""
    low = text.lower()
    score = 0.4
    if re.search(r"\b(my|i am|i'm|i live|i like|i love|i hate|remember|mon|ma|mes|je suis|j'aime|je m'appelle|souviens)\b", low):
        score += 0.3
    if re.search(r"\d", low):
        score += 0.1
    words = len(_WORD_RE.findall(low))
    if words >= 12:
        score += 0.1
    return min(score, 1.0)


def worth_remembering(text: str) -> bool:
    """Decide whether a user message becomes a memory: statements yes; pure questions and one-word replies no."""
    if len(_WORD_RE.findall(text)) < MIN_TURN_MEMORY_WORDS:
        return False
    sentences = [s.strip() for s in _SENTENCE_SPLIT_RE.split(text.strip()) if s.strip()]
    # A question alone tells nothing about the user; recalling it later only crowds out facts.
    return not all(s.endswith(("?", "？", "¿")) for s in sentences)


def _memory_from_row(row: Any) -> Memory:
    return Memory(
        id=int(row["id"]),
        text=str(row["text"]),
        importance=float(row["importance"]),
        kind=str(row["kind"]),
        source=str(row["source"]),
        created_at=float(row["created_at"]),
        expires_at=None if row["expires_at"] is None else float(row["expires_at"]),
        provenance=row["provenance"],
        session_id=row["session_id"],
        message_id=None if row["message_id"] is None else int(row["message_id"]),
        embedded=bool(row["embedded"]),
        document_id=None if row["document_id"] is None else int(row["document_id"]),
    )


_MEMORY_COLS = (
    "id, text, importance, kind, source, created_at, expires_at, provenance, session_id, message_id, "
    "(embedding IS NOT NULL) AS embedded, document_id"
)
_DOCUMENT_COLS = "id, owner, source, title, fingerprint, content_type, bytes, chunks, fetched_at"
# Whose memories a recall for user ? reads: their own, and the shared documents.
_VISIBLE = f"(m.user = ? OR (m.user = '{SHARED_OWNER}' AND m.kind = '{DOCUMENT_KIND}'))"


def _document_from_row(row: Any) -> Document:
    return Document(
        id=int(row["id"]),
        owner=str(row["owner"]),
        source=str(row["source"]),
        title=str(row["title"]),
        fingerprint=str(row["fingerprint"]),
        content_type=str(row["content_type"]),
        bytes=int(row["bytes"]),
        chunks=int(row["chunks"]),
        fetched_at=float(row["fetched_at"]),
    )


def document_provenance(source: str, title: str, fetched_at: float, document_id: int) -> str:
    """The provenance JSON every chunk of a document carries, so an answer can name its source (pure)."""
    return json.dumps({"source": source, "title": title, "fetched_at": fetched_at, "document_id": document_id}, ensure_ascii=False)


def merge_vector_hits(rankings: Sequence[Sequence[Hit]], limit: int) -> list[Hit]:
    """Merge per-partition cosine hit lists into one list, best score first, at most limit (pure)."""
    merged = [hit for ranking in rankings for hit in ranking]
    merged.sort(key=lambda h: (-h.score, h.id))
    return merged[:limit]


# ------------------------------------------------------------------------------ service


class Hippocampus:
    """Conversation history and semantic memory, one user at a time."""

    name = "hippocampus"
    start_timeout_s = 300.0  # loading vectors of a large store from an SD card
    stop_timeout_s = 1.0

    def __init__(
        self,
        *,
        db: Database,
        embedder: Embedder | None = None,
        purge_interval_s: float = 600.0,
        default_ttl_days: float = 0.0,
        dim: int = EMBED_DIM,
    ) -> None:
        self._db = db
        self._embedder = embedder
        self._reranker: Callable[[list[RecallHit]], list[RecallHit]] | None = None
        self.purge_interval_s = purge_interval_s
        self.default_ttl_days = default_ttl_days
        self.dim = embedder.dim if embedder is not None else dim
        self.index = VectorIndex(self.dim)
        self._started = False
        self.purged_total = 0
        self.recalls_total = 0
        self.recalls_degraded_total = 0

    # ---------------------------------------------------------------- lifecycle

    async def async_start(self) -> None:
        if self._started:
            return
        t0 = time.monotonic()
        model = self._embed_model_id()
        now = time.time()
        last = 0
        loaded = skipped = 0
        for row in await self._db.async_fetchall("SELECT user, count(*) AS n FROM memories WHERE embedding IS NOT NULL GROUP BY user"):
            self.index.reserve(str(row["user"]), int(row["n"]))  # exact size: no doubling slack after a restart
        while True:
            rows = await self._db.async_fetchall(
                "SELECT id, user, embedding, embed_model FROM memories WHERE id > ? AND embedding IS NOT NULL "
                "AND (expires_at IS NULL OR expires_at > ?) ORDER BY id LIMIT ?",
                (last, now, LOAD_BATCH_ROWS),
            )
            if not rows:
                break
            last = int(rows[-1]["id"])
            by_user: dict[str, tuple[list[int], list[npt.NDArray[np.float32]]]] = {}
            for row in rows:
                vec = from_blob(row["embedding"], self.dim)
                if vec is None or (model is not None and row["embed_model"] not in (None, model)):
                    skipped += 1  # another model's space: re-embedded by the backfill
                    continue
                ids, vecs = by_user.setdefault(row["user"], ([], []))
                ids.append(int(row["id"]))
                vecs.append(vec)
            for user, (ids, vecs) in by_user.items():
                self.index.add(user, ids, np.stack(vecs))
                loaded += len(ids)
        self._started = True
        self.index.maintain()  # large partitions get their 4-bit copy in the background
        log.info("hippocampus_started", vectors=loaded, skipped=skipped, ms=round((time.monotonic() - t0) * 1000, 1))

    async def async_stop(self) -> None:
        self._started = False
        index, self.index = self.index, VectorIndex(self.dim)
        await asyncio.to_thread(index.close)  # waits for a 4-bit copy being built

    @property
    def db(self) -> Database:
        return self._db

    def set_reranker(self, reranker: Callable[[list[RecallHit]], list[RecallHit]] | None) -> None:
        """Reorder every recall's hits with RERANKER (sync, no I/O), or not at all with None."""
        self._reranker = reranker

    def set_embedder(self, embedder: Embedder | None) -> None:
        """Attach the embedder once it exists (the daemon may build it after this service)."""
        self._embedder = embedder

    def _embed_model_id(self) -> str | None:
        return None if self._embedder is None else self._embedder.model_id or None

    async def async_embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed texts or raise EmbedderUnavailableError (never a made-up vector)."""
        if self._embedder is None:
            raise EmbedderUnavailableError("no embedding model is configured", transient=False)
        vecs = np.asarray(await self._embedder.async_embed(list(texts)), dtype=np.float32)
        if vecs.shape != (len(texts), self.dim) or not np.all(np.isfinite(vecs)):
            raise EmbedderUnavailableError(f"the embedder returned vectors of shape {vecs.shape}, expected ({len(texts)}, {self.dim})")
        return vecs

    def _expiry(self, ttl_s: float | None, now: float) -> float | None:
        if ttl_s is not None:
            return now + ttl_s if ttl_s > 0 else None
        return now + self.default_ttl_days * DAY_S if self.default_ttl_days > 0 else None

    # ---------------------------------------------------------------- conversation

    async def async_store_turn(
        self,
        user: str,
        session_id: str,
        user_text: str,
        assistant_text: str,
        *,
        model: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        remember: bool = True,
        exchange: Sequence[Mapping[str, Any]] = (),
        answer_calls: Sequence[Mapping[str, Any]] = (),
        store_user: bool = True,
    ) -> StoredTurn:
        """Persist a user turn, the answer and (if worth it) a memory; return once committed durably.

        `user_text` must be the user's own words: research or augmented context never goes here.
        `exchange`: the tool turns between the user's message and the answer, in order
        (assistant turns with `tool_calls`, tool turns with `content`, `tool_call_id`,
        `tool_name`). `answer_calls`: calls the answer makes to a client's tools. With
        store_user False (a client sending its tools' results back) the user's message, stored
        by the earlier request, is not stored again; user_message_id is then 0.
        """
        now = time.time()
        expires = self._expiry(None, now)
        memory_text = user_text.strip()[:MAX_MEMORY_CHARS] if remember and store_user and worth_remembering(user_text) else None
        vec: npt.NDArray[np.float32] | None = None
        if memory_text is not None:
            try:
                vec = (await self.async_embed([memory_text]))[0]
            except EmbedderUnavailableError as err:
                # Stored without a vector; full-text recall finds it and the backfill embeds it later.
                log.warning("turn_memory_not_embedded", user=user, error=str(err))
        model_id = self._embed_model_id()

        async def op(conn: aiosqlite.Connection) -> StoredTurn:
            await _touch_session(conn, user, session_id, now)
            uid = 0
            if store_user:
                cur = await conn.execute(
                    "INSERT INTO messages(user, session_id, role, content, created_at, expires_at, model, tokens) "
                    "VALUES (?, ?, 'user', ?, ?, ?, ?, ?)",
                    (user, session_id, user_text, now, expires, model, prompt_tokens),
                )
                uid = int(cur.lastrowid or 0)
            for item in exchange:
                await conn.execute(
                    "INSERT INTO messages(user, session_id, role, content, created_at, expires_at, model, tool_calls, tool_call_id, "
                    "tool_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        user,
                        session_id,
                        "tool" if item.get("role") == "tool" else "assistant",
                        str(item.get("content") or ""),
                        now,
                        expires,
                        model,
                        _calls_json(item.get("tool_calls")),
                        item.get("tool_call_id"),
                        item.get("tool_name"),
                    ),
                )
            cur = await conn.execute(
                "INSERT INTO messages(user, session_id, role, content, created_at, expires_at, model, tokens, tool_calls) "
                "VALUES (?, ?, 'assistant', ?, ?, ?, ?, ?, ?)",
                (user, session_id, assistant_text, now, expires, model, completion_tokens, _calls_json(answer_calls)),
            )
            aid = int(cur.lastrowid or 0)
            mid: int | None = None
            if memory_text is not None:
                cur = await conn.execute(
                    "INSERT INTO memories(user, text, embedding, embed_model, importance, kind, source, provenance, session_id, "
                    "message_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?, 'turn', 'user', ?, ?, ?, ?, ?)",
                    (
                        user,
                        memory_text,
                        None if vec is None else to_blob(vec),
                        None if vec is None else model_id,
                        turn_importance(memory_text),
                        "conversation",
                        session_id,
                        uid,
                        now,
                        expires,
                    ),
                )
                mid = int(cur.lastrowid or 0)
            return StoredTurn(session_id, uid, aid, mid)

        stored: StoredTurn = await self._db.async_write(op)
        if stored.memory_id is not None and vec is not None:
            self.index.add(user, [stored.memory_id], vec[None, :])
        return stored

    async def async_history(self, user: str, *, session_id: str | None = None, limit: int = 50) -> list[Message]:
        """Return the user's latest `limit` messages (optionally of one session), oldest first."""
        if limit <= 0:
            return []
        now = time.time()
        sql = (
            "SELECT id, session_id, role, content, created_at, model, tokens, tool_calls, tool_call_id, tool_name FROM messages WHERE user = ? "
            + ("AND session_id = ? " if session_id is not None else "")
            + "AND (expires_at IS NULL OR expires_at > ?) ORDER BY id DESC LIMIT ?"
        )
        params: tuple[Any, ...] = (user, session_id, now, limit) if session_id is not None else (user, now, limit)
        rows = await self._db.async_fetchall(sql, params)
        return [
            Message(
                id=int(r["id"]),
                session_id=str(r["session_id"]),
                role=str(r["role"]),
                content=str(r["content"]),
                created_at=float(r["created_at"]),
                model=r["model"],
                tokens=r["tokens"],
                tool_calls=_calls_from_json(r["tool_calls"]),
                tool_call_id=r["tool_call_id"],
                tool_name=r["tool_name"],
            )
            for r in reversed(rows)
        ]

    async def async_message_exists(self, user: str, message_id: int) -> bool:
        row = await self._db.async_fetchone("SELECT 1 FROM messages WHERE user = ? AND id = ?", (user, message_id))
        return row is not None

    # ---------------------------------------------------------------- memories

    async def async_add_memory(
        self,
        user: str,
        text: str,
        *,
        importance: float = 0.5,
        kind: str = "fact",
        source: str = "user",
        provenance: str | None = None,
        ttl_s: float | None = None,
        require_embedding: bool = False,
        document_id: int | None = None,
    ) -> Memory:
        """Store one memory with its embedding; without an embedder it is stored for full-text recall only."""
        text = text.strip()
        if not text:
            raise ValidationError("memory text must not be empty", param="text")
        if len(text) > MAX_MEMORY_CHARS:
            raise ValidationError(f"memory text is too long ({len(text)} characters; at most {MAX_MEMORY_CHARS})", param="text")
        if kind not in MEMORY_KINDS:
            raise ValidationError("kind must be one of " + ", ".join(MEMORY_KINDS), param="kind")
        if not 0.0 <= importance <= 1.0:
            raise ValidationError("importance must be between 0 and 1", param="importance")
        vec: npt.NDArray[np.float32] | None = None
        try:
            vec = (await self.async_embed([text]))[0]
        except EmbedderUnavailableError as err:
            if require_embedding:
                raise
            log.warning("memory_not_embedded", user=user, error=str(err))
        now = time.time()
        expires = self._expiry(ttl_s, now)
        model_id = self._embed_model_id()

        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute(
                "INSERT INTO memories(user, text, embedding, embed_model, importance, kind, source, provenance, created_at, expires_at, "
                "document_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    user,
                    text,
                    None if vec is None else to_blob(vec),
                    None if vec is None else model_id,
                    importance,
                    kind,
                    source,
                    provenance,
                    now,
                    expires,
                    document_id,
                ),
            )
            return int(cur.lastrowid or 0)

        mid: int = await self._db.async_write(op)
        if vec is not None:
            self.index.add(user, [mid], vec[None, :])
        return Memory(mid, text, importance, kind, source, now, expires, provenance, None, None, vec is not None, document_id)

    async def async_get_memory(self, user: str, memory_id: int) -> Memory:
        row = await self._db.async_fetchone(f"SELECT {_MEMORY_COLS} FROM memories WHERE user = ? AND id = ?", (user, memory_id))
        if row is None:
            raise NotFoundError(f"memory {memory_id} not found", param="id")
        return _memory_from_row(row)

    async def async_list_memories(self, user: str, *, limit: int = 50, before_id: int | None = None) -> list[Memory]:
        """Return the user's memories, newest first (keyset pagination with `before_id`)."""
        rows = await self._db.async_fetchall(
            f"SELECT {_MEMORY_COLS} FROM memories WHERE user = ? AND id < ? AND (expires_at IS NULL OR expires_at > ?) ORDER BY id DESC LIMIT ?",
            (user, before_id if before_id is not None else 2**62, time.time(), limit),
        )
        return [_memory_from_row(r) for r in rows]

    async def async_delete_memory(self, user: str, memory_id: int) -> None:
        """Delete one of the user's memories; NotFoundError if it is not theirs or does not exist."""

        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute("DELETE FROM memories WHERE user = ? AND id = ?", (user, memory_id))
            return int(cur.rowcount)

        deleted: int = await self._db.async_write(op)
        if not deleted:
            raise NotFoundError(f"memory {memory_id} not found", param="id")
        self.index.remove(memory_id)

    async def async_count_memories(self, user: str) -> int:
        row = await self._db.async_fetchone("SELECT count(*) AS n FROM memories WHERE user = ?", (user,))
        return int(row["n"]) if row is not None else 0

    # ---------------------------------------------------------------- recall

    async def async_recall(self, user: str, query: str, k: int = 5) -> RecallResult:
        """Hybrid recall over the user's own memories and the shared documents: cosine and BM25 ranks fused by RRF.

        Shared documents (owner SHARED_OWNER, kind "document") compete in the same ranking as
        the user's own memories; no other user's memory is ever read. If the embedder is
        unavailable only full-text search runs and the result says so (status
        "embedder_unavailable"); no vector is ever made up.
        """
        if k <= 0 or not query.strip():
            return RecallResult([])
        k = min(k, MAX_RECALL_K)
        n_cand = k * RECALL_CANDIDATES_MULT
        timings: dict[str, float] = {}
        status, reason = STATUS_OK, None
        vec_ranking: list[int] = []
        sims: dict[int, float] = {}
        t0 = time.perf_counter()
        try:
            qv = (await self.async_embed([query]))[0]
        except EmbedderUnavailableError as err:
            status, reason = STATUS_EMBEDDER_UNAVAILABLE, str(err)
            self.recalls_degraded_total += 1
        else:
            timings["embed"] = (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            partitions = [user] if user == SHARED_OWNER else [user, SHARED_OWNER]
            self.index.maintain()
            if sum(self.index.count(p) for p in partitions) >= SEARCH_IN_THREAD_ROWS:
                found = await asyncio.to_thread(self._search_partitions, partitions, qv, n_cand)
            else:
                found = self._search_partitions(partitions, qv, n_cand)
            for hit in found:
                vec_ranking.append(hit.id)
                sims[hit.id] = hit.score
            timings["vector"] = (time.perf_counter() - t1) * 1000
        t2 = time.perf_counter()
        text_ranking = await self._async_fts(user, query, n_cand)
        timings["fts"] = (time.perf_counter() - t2) * 1000
        self.recalls_total += 1
        fused = rrf_fuse([vec_ranking, text_ranking])
        if not fused:
            return RecallResult([], status, reason, timings)
        ids = [i for i, _ in fused]
        rows = await self._db.async_fetchall(
            f"SELECT {_MEMORY_COLS} FROM memories m WHERE {_VISIBLE} AND id IN ({','.join('?' * len(ids))}) "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (user, *ids, time.time()),
        )
        by_id = {int(r["id"]): _memory_from_row(r) for r in rows}
        vrank = {i: r for r, i in enumerate(vec_ranking, start=1)}
        trank = {i: r for r, i in enumerate(text_ranking, start=1)}
        hits = [RecallHit(by_id[i], score, sims.get(i), vrank.get(i), trank.get(i)) for i, score in fused if i in by_id][:k]
        if self._reranker is not None and len(hits) > 1:
            hits = self._reranker(hits)  # the SelfTrainingEngine's learnt order (only ever these hits)
        timings["total"] = (time.perf_counter() - t0) * 1000
        return RecallResult(hits, status, reason, timings)

    def _search_partitions(self, partitions: Sequence[str], query: npt.NDArray[np.float32], limit: int) -> list[Hit]:
        """Top `limit` cosine hits over several index partitions (loop or worker thread: numpy drops the GIL)."""
        return merge_vector_hits([self.index.search(p, query, limit) for p in partitions], limit)

    async def _async_fts(self, user: str, query: str, limit: int) -> list[int]:
        match = fts_query(query)
        if match is None:
            return []
        try:
            rows = await self._db.async_fetchall(
                "SELECT m.id AS id FROM memories_fts JOIN memories m ON m.id = memories_fts.rowid "
                f"WHERE memories_fts MATCH ? AND {_VISIBLE} ORDER BY bm25(memories_fts) LIMIT ?",
                (match, user, limit),
            )
        except StoreError as err:
            # fts_query only emits quoted words, so this is a bug or a damaged index, not user input.
            log.error("fts_query_failed", error=str(err))
            return []
        return [int(r["id"]) for r in rows]

    # ---------------------------------------------------------------- documents

    async def async_find_document(self, owner: str, *, fingerprint: str | None = None, source: str | None = None) -> Document | None:
        """Return the owner's document with this text fingerprint (or else the latest of this source), if any."""
        if fingerprint is not None:
            sql, params = f"SELECT {_DOCUMENT_COLS} FROM documents WHERE owner = ? AND fingerprint = ?", (owner, fingerprint)
        elif source is not None:
            sql, params = f"SELECT {_DOCUMENT_COLS} FROM documents WHERE owner = ? AND source = ? ORDER BY id DESC LIMIT 1", (owner, source)
        else:
            raise ValidationError("give a fingerprint or a source to find a document", param="document")
        row = await self._db.async_fetchone(sql, params)
        return None if row is None else _document_from_row(row)

    async def async_get_document(self, owner: str, document_id: int) -> Document:
        row = await self._db.async_fetchone(f"SELECT {_DOCUMENT_COLS} FROM documents WHERE owner = ? AND id = ?", (owner, document_id))
        if row is None:
            raise NotFoundError(f"document {document_id} not found", param="id")
        return _document_from_row(row)

    async def async_list_documents(self, owner: str, *, limit: int = MAX_DOCUMENT_LIST) -> list[Document]:
        """Return the owner's documents, newest first."""
        rows = await self._db.async_fetchall(
            f"SELECT {_DOCUMENT_COLS} FROM documents WHERE owner = ? ORDER BY id DESC LIMIT ?", (owner, max(0, limit))
        )
        return [_document_from_row(r) for r in rows]

    async def async_embed_many(self, texts: Sequence[str], *, batch: int = DOCUMENT_EMBED_BATCH) -> npt.NDArray[np.float32]:
        """Embed many texts in batches of `batch` (so recalls interleave), or raise EmbedderUnavailableError."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [await self.async_embed(texts[i : i + batch]) for i in range(0, len(texts), batch)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    async def async_store_document(
        self,
        owner: str,
        chunks: Sequence[str],
        *,
        source: str,
        title: str,
        fingerprint: str,
        content_type: str,
        size: int,
        fetched_at: float | None = None,
        importance: float = DOCUMENT_IMPORTANCE,
    ) -> StoredDocument:
        """Store a document and its chunks as memories in one write transaction, embedded in batches.

        Deduplicates by (owner, fingerprint): the same text stored again writes nothing and
        returns the existing document with duplicate True. Older documents of the same owner
        and source are replaced (deleted with their memories) in the same transaction. Without
        an embedder the chunks are stored for full-text recall and the backfill embeds them.
        Document memories never expire on their own.
        """
        texts = [c.strip() for c in chunks]
        if not texts or not all(texts):
            raise ValidationError("a document needs at least one chunk, and no chunk may be empty", param="chunks")
        if len(texts) > MAX_DOCUMENT_CHUNKS:
            raise ValidationError(f"a document may have at most {MAX_DOCUMENT_CHUNKS} chunks, got {len(texts)}", param="chunks")
        if too_long := [i for i, t in enumerate(texts) if len(t) > MAX_MEMORY_CHARS]:
            raise ValidationError(f"chunk {too_long[0]} is longer than {MAX_MEMORY_CHARS} characters", param="chunks")
        existing = await self.async_find_document(owner, fingerprint=fingerprint)
        if existing is not None:
            return StoredDocument(existing, duplicate=True)
        vecs: npt.NDArray[np.float32] | None = None
        try:
            vecs = await self.async_embed_many(texts)
        except EmbedderUnavailableError as err:
            log.warning("document_not_embedded", owner=owner, source=source, chunks=len(texts), error=str(err))
        when = time.time() if fetched_at is None else fetched_at
        now = time.time()
        model_id = self._embed_model_id()

        async def op(conn: aiosqlite.Connection) -> tuple[Document, bool, list[int], list[int], list[int]]:
            # Checked again inside the transaction: a concurrent ingest of the same text may have won.
            async with conn.execute(
                f"SELECT {_DOCUMENT_COLS} FROM documents WHERE owner = ? AND fingerprint = ?", (owner, fingerprint)
            ) as cur:
                row = await cur.fetchone()
            if row is not None:
                return _document_from_row(row), True, [], [], []
            async with conn.execute("SELECT id FROM documents WHERE owner = ? AND source = ?", (owner, source)) as cur:
                old_docs = [int(r[0]) for r in await cur.fetchall()]
            old_mems = await _delete_documents(conn, old_docs)
            cur = await conn.execute(
                "INSERT INTO documents(owner, source, title, fingerprint, content_type, bytes, chunks, fetched_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (owner, source, title, fingerprint, content_type, size, len(texts), when),
            )
            doc_id = int(cur.lastrowid or 0)
            provenance = document_provenance(source, title, when, doc_id)
            await conn.executemany(
                "INSERT INTO memories(user, text, embedding, embed_model, importance, kind, source, provenance, created_at, document_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        owner,
                        text,
                        None if vecs is None else to_blob(vecs[n]),
                        None if vecs is None else model_id,
                        importance,
                        DOCUMENT_KIND,
                        DOCUMENT_MEMORY_SOURCE,
                        provenance,
                        now,
                        doc_id,
                    )
                    for n, text in enumerate(texts)
                ],
            )
            # AUTOINCREMENT ids grow in insertion order, so id order is chunk order.
            async with conn.execute("SELECT id FROM memories WHERE document_id = ? ORDER BY id", (doc_id,)) as cur:
                new_mems = [int(r[0]) for r in await cur.fetchall()]
            doc = Document(doc_id, owner, source, title, fingerprint, content_type, size, len(texts), when)
            return doc, False, old_docs, old_mems, new_mems

        doc, duplicate, old_docs, old_mems, new_mems = await self._db.async_write(op)
        if duplicate:
            return StoredDocument(doc, duplicate=True)
        self.index.remove_many(old_mems)
        if vecs is not None and len(new_mems) == len(texts):
            self.index.add(owner, new_mems, vecs)
        log.info("document_stored", owner=owner, source=source, document_id=doc.id, chunks=len(texts), replaced=old_docs)
        return StoredDocument(doc, duplicate=False, replaced=tuple(old_docs), embedded=0 if vecs is None else len(texts))

    async def async_delete_document(self, owner: str, document_id: int) -> Document:
        """Delete one of the owner's documents and its memories (store and vector index); NotFoundError otherwise."""

        async def op(conn: aiosqlite.Connection) -> tuple[Document | None, list[int]]:
            async with conn.execute(f"SELECT {_DOCUMENT_COLS} FROM documents WHERE owner = ? AND id = ?", (owner, document_id)) as cur:
                row = await cur.fetchone()
            if row is None:
                return None, []
            return _document_from_row(row), await _delete_documents(conn, [document_id])

        doc: Document | None
        mems: list[int]
        doc, mems = await self._db.async_write(op)
        if doc is None:
            raise NotFoundError(f"document {document_id} not found", param="id")
        self.index.remove_many(mems)
        log.info("document_deleted", owner=owner, document_id=document_id, memories=len(mems))
        return doc

    # ---------------------------------------------------------------- maintenance

    async def async_purge(self, now: float | None = None) -> int:
        """Delete expired memories and messages; return how many rows went."""
        when = time.time() if now is None else now

        async def op(conn: aiosqlite.Connection) -> tuple[list[int], int]:
            async with conn.execute("SELECT id FROM memories WHERE expires_at IS NOT NULL AND expires_at <= ?", (when,)) as cur:
                ids = [int(r[0]) for r in await cur.fetchall()]
            await conn.execute("DELETE FROM memories WHERE expires_at IS NOT NULL AND expires_at <= ?", (when,))
            cur2 = await conn.execute("DELETE FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ?", (when,))
            return ids, int(cur2.rowcount)

        ids: list[int]
        messages: int
        ids, messages = await self._db.async_write(op)
        self.index.remove_many(ids)
        total = len(ids) + messages
        self.purged_total += total
        if total:
            log.info("hippocampus_purged", memories=len(ids), messages=messages)
        return total

    async def async_backfill_embeddings(self, batch: int = BACKFILL_BATCH) -> int:
        """Embed memories stored while the embedder was down (or by another model); return how many."""
        if self._embedder is None:
            return 0
        model = self._embed_model_id()
        rows = await self._db.async_fetchall(
            "SELECT id, user, text FROM memories WHERE embedding IS NULL OR (embed_model IS NOT NULL AND embed_model != ?) ORDER BY id LIMIT ?",
            (model or "", batch),
        )
        if not rows:
            return 0
        try:
            vecs = await self.async_embed([str(r["text"]) for r in rows])
        except EmbedderUnavailableError:
            return 0  # still down; the next round tries again
        items = [(int(r["id"]), str(r["user"]), vecs[n]) for n, r in enumerate(rows)]

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.executemany(
                "UPDATE memories SET embedding = ?, embed_model = ? WHERE id = ? AND user = ?",
                [(to_blob(v), model, i, u) for i, u, v in items],
            )

        await self._db.async_write(op)
        for i, u, v in items:
            self.index.add(u, [i], v[None, :])
        return len(items)

    async def async_purge_loop(self) -> None:
        """Purge expired rows and backfill embeddings every purge_interval_s (run supervised)."""
        while True:
            await asyncio.sleep(self.purge_interval_s)
            await self.async_purge()
            for _ in range(BACKFILL_ROUNDS_MAX):
                if not await self.async_backfill_embeddings():
                    break

    def metrics(self) -> Iterable[tuple[str, str, str, float, dict[str, str]]]:
        """Pull-time samples for Metrics.add_source."""
        yield ("mongarsd_memory_vectors", "gauge", "Memory vectors held in RAM.", float(len(self.index)), {})
        yield ("mongarsd_memory_index_bytes", "gauge", "Bytes held by the vector index.", float(self.index.nbytes()), {})
        yield ("mongarsd_memory_recalls_total", "counter", "Recall queries.", float(self.recalls_total), {})
        yield (
            "mongarsd_memory_recalls_degraded_total",
            "counter",
            "Recalls that ran without the embedder.",
            float(self.recalls_degraded_total),
            {},
        )
        yield ("mongarsd_memory_purged_total", "counter", "Expired rows purged.", float(self.purged_total), {})


async def _delete_documents(conn: aiosqlite.Connection, document_ids: Sequence[int]) -> list[int]:
    """Delete documents and their memories inside the caller's transaction; return the memory ids that went."""
    if not document_ids:
        return []
    marks = ",".join("?" * len(document_ids))
    async with conn.execute(f"SELECT id FROM memories WHERE document_id IN ({marks})", tuple(document_ids)) as cur:
        mems = [int(r[0]) for r in await cur.fetchall()]
    # Explicit, not left to ON DELETE CASCADE, so the full-text index's delete trigger surely runs.
    await conn.execute(f"DELETE FROM memories WHERE document_id IN ({marks})", tuple(document_ids))
    await conn.execute(f"DELETE FROM documents WHERE id IN ({marks})", tuple(document_ids))
    return mems


async def _touch_session(conn: aiosqlite.Connection, user: str, session_id: str, now: float) -> None:
    await conn.execute(
        "INSERT INTO sessions(user, id, created_at, updated_at) VALUES (?, ?, ?, ?) ON CONFLICT(user, id) DO UPDATE SET updated_at = excluded.updated_at",
        (user, session_id, now, now),
    )
