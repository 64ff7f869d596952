"""monGARS native routes: conversation, history, memory, profile, feedback (own data only)."""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from mongarsd.api.app import CTX
from mongarsd.api.auth import principal_of
from mongarsd.api.io import dumps_bytes, get_bool, get_int, get_number, get_str, json_response, query_int, read_json
from mongarsd.api.speech import async_speech_attachment
from mongarsd.cognition.pipeline import ChatChunk, ChatResult, ChatToolCall, ConversationPipeline, sanitize_message, validate_session_id
from mongarsd.errors import MongarsError, UnavailableError, ValidationError
from mongarsd.inference.sampling import SamplingSpec
from mongarsd.memory.hippocampus import MAX_MEMORY_CHARS, USER_MEMORY_KINDS, Hippocampus

log = structlog.get_logger("mongarsd.api.native")

MAX_QUERY_CHARS = 2000
MAX_HISTORY_LIMIT = 200
MAX_SEARCH_K = 50
MAX_TTL_S = 10 * 365 * 86400.0
NDJSON = "application/x-ndjson"


def _pipeline(request: web.Request) -> ConversationPipeline:
    pipeline = request.app[CTX].pipeline
    if pipeline is None:
        raise UnavailableError("the conversation pipeline is not enabled on this daemon")
    assert isinstance(pipeline, ConversationPipeline)
    return pipeline


def _hippocampus(request: web.Request) -> Hippocampus:
    hippo = request.app[CTX].hippocampus
    if hippo is None:
        raise UnavailableError("memory is not enabled on this daemon")
    assert isinstance(hippo, Hippocampus)
    return hippo


def parse_spec(body: dict[str, Any]) -> SamplingSpec:
    """Read the native chat route's generation settings (pure)."""
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 8 or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop):
            raise ValidationError("'stop' must be a string or a list of at most 8 non-empty strings of at most 64 characters", param="stop")
    return SamplingSpec(
        max_tokens=get_int(body, "max_tokens", lo=1, hi=32768),
        temperature=get_number(body, "temperature", lo=0.0, hi=2.0),
        top_p=get_number(body, "top_p", lo=0.0, hi=1.0),
        min_p=get_number(body, "min_p", lo=0.0, hi=1.0),
        repeat_penalty=get_number(body, "repeat_penalty", lo=0.01, hi=5.0),
        top_k=get_int(body, "top_k", lo=0, hi=1000),
        seed=get_int(body, "seed", lo=0, hi=2**32 - 1),
        stop=tuple(stop or ()),
    )


async def handle_chat(request: web.Request) -> web.StreamResponse:
    pipeline = _pipeline(request)
    principal = principal_of(request)
    user = principal.user
    body = await read_json(request)
    message = sanitize_message(body.get("message"), max_chars=pipeline.max_message_chars)
    session_id = validate_session_id(body.get("session_id"))
    model = get_str(body, "model", max_len=200, allow_empty=False)
    stream = get_bool(body, "stream", default=False)
    speak = get_bool(body, "speak", default=False)
    spec = parse_spec(body)
    if not stream:
        result = await pipeline.async_chat(user, message, session_id, model=model, spec=spec, role=principal.role)
        out = result.public()
        if speak:
            out["audio"] = await async_speech_attachment(request.app[CTX], user, result.response)
        return json_response(out)
    events = await pipeline.async_chat(user, message, session_id, stream=True, model=model, spec=spec, role=principal.role)
    try:
        first = await events.__anext__()  # refusals become plain HTTP errors before any byte is sent
        resp = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        item: ChatChunk | ChatToolCall | ChatResult | None = first
        while item is not None:
            if isinstance(item, ChatChunk):
                line: dict[str, Any] = {"delta": item.text, "done": False}
            elif isinstance(item, ChatToolCall):  # no client tools on this route: never sent
                item = await anext(events, None)
                continue
            else:
                line = {**item.public(), "done": True}
                if speak:
                    line["audio"] = await async_speech_attachment(request.app[CTX], user, item.response)
            await resp.write(dumps_bytes(line) + b"\n")
            try:
                item = await anext(events, None)
            except MongarsError as err:
                # Headers are sent: the failure becomes the last line (the turn was not stored).
                log.warning("chat_stream_failed", user=user, error=str(err))
                error = {"code": type(err).__name__, "message": str(err)}
                await resp.write(dumps_bytes({"error": error, "done": True}) + b"\n")
                break
        await resp.write_eof()
        return resp
    finally:
        await events.aclose()  # a client that went away cancels the generation; nothing is stored


async def handle_history(request: web.Request) -> web.Response:
    hippo = _hippocampus(request)
    user = principal_of(request).user
    limit = query_int(request, "limit", default=50, lo=1, hi=MAX_HISTORY_LIMIT)
    raw_sid = request.query.get("session_id")
    session_id = validate_session_id(raw_sid) if raw_sid is not None else None
    messages = await hippo.async_history(user, session_id=session_id, limit=limit)
    return json_response({"session_id": session_id, "messages": [m.public() for m in messages]})


async def handle_list_memories(request: web.Request) -> web.Response:
    hippo = _hippocampus(request)
    user = principal_of(request).user
    limit = query_int(request, "limit", default=50, lo=1, hi=MAX_HISTORY_LIMIT)
    before = query_int(request, "before", default=0, lo=0, hi=2**62)
    memories = await hippo.async_list_memories(user, limit=limit, before_id=before or None)
    return json_response({"memories": [m.public() for m in memories]})


async def handle_add_memory(request: web.Request) -> web.Response:
    hippo = _hippocampus(request)
    user = principal_of(request).user
    body = await read_json(request)
    text = sanitize_message(body.get("text"), max_chars=MAX_MEMORY_CHARS, param="text")
    importance = get_number(body, "importance", default=0.5, lo=0.0, hi=1.0)
    kind = get_str(body, "kind", default="fact", max_len=32) or "fact"
    if kind not in USER_MEMORY_KINDS:
        raise ValidationError(
            "'kind' must be one of " + ", ".join(USER_MEMORY_KINDS) + " (documents and research come from ingest and curiosity)",
            param="kind",
        )
    ttl_s = get_number(body, "ttl_s", lo=1.0, hi=MAX_TTL_S)
    provenance = get_str(body, "provenance", max_len=500)
    memory = await hippo.async_add_memory(
        user, text, importance=importance if importance is not None else 0.5, kind=kind, source="api", provenance=provenance, ttl_s=ttl_s
    )
    return json_response(memory.public(), status=201)


async def handle_search_memories(request: web.Request) -> web.Response:
    hippo = _hippocampus(request)
    user = principal_of(request).user
    q = request.query.get("q")
    if q is None:
        raise ValidationError("query parameter 'q' is required", param="q")
    q = sanitize_message(q, max_chars=MAX_QUERY_CHARS, param="q")
    k = query_int(request, "k", default=5, lo=1, hi=MAX_SEARCH_K)
    result = await hippo.async_recall(user, q, k)
    return json_response(
        {
            "results": [h.public() for h in result.hits],
            "status": result.status,
            "degraded": result.degraded,
            "reason": result.reason,
        }
    )


def _memory_id(request: web.Request) -> int:
    raw = request.match_info["memory_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise ValidationError(f"memory id must be a positive integer, got {raw[:40]!r}", param="id")
    return int(raw)


async def handle_get_memory(request: web.Request) -> web.Response:
    hippo = _hippocampus(request)
    memory = await hippo.async_get_memory(principal_of(request).user, _memory_id(request))
    return json_response(memory.public())


async def handle_delete_memory(request: web.Request) -> web.Response:
    hippo = _hippocampus(request)
    memory_id = _memory_id(request)
    await hippo.async_delete_memory(principal_of(request).user, memory_id)
    return json_response({"deleted": memory_id})


async def handle_get_profile(request: web.Request) -> web.Response:
    pipeline = _pipeline(request)
    return json_response(await pipeline.async_profile(principal_of(request).user))


async def handle_put_profile(request: web.Request) -> web.Response:
    pipeline = _pipeline(request)
    body = await read_json(request)
    return json_response(await pipeline.async_edit_profile(principal_of(request).user, body))


async def handle_feedback(request: web.Request) -> web.Response:
    pipeline = _pipeline(request)
    body = await read_json(request)
    rating_raw = body.get("rating")
    if rating_raw in ("up", "down"):
        rating = 1 if rating_raw == "up" else -1
    else:
        num = get_number(body, "rating", lo=-1, hi=1, integer=True)
        if num is None:
            raise ValidationError("'rating' is required: -1, 0, 1, 'up' or 'down'", param="rating")
        rating = int(num)
    mid = get_number(body, "message_id", lo=1, hi=2**62, integer=True)
    comment = get_str(body, "comment", default="", max_len=2000) or ""
    fid = await pipeline.async_feedback(
        principal_of(request).user, rating=rating, message_id=None if mid is None else int(mid), comment=comment
    )
    return json_response({"id": fid, "rating": rating}, status=201)


def setup_routes(app: web.Application) -> None:
    """Register the native conversation, memory, profile and feedback routes."""
    r = app.router
    r.add_post("/api/v1/conversation/chat", handle_chat)
    r.add_get("/api/v1/conversation/history", handle_history)
    r.add_get("/api/v1/memory", handle_list_memories)
    r.add_post("/api/v1/memory", handle_add_memory)
    r.add_get("/api/v1/memory/search", handle_search_memories)
    r.add_get("/api/v1/memory/{memory_id}", handle_get_memory)
    r.add_delete("/api/v1/memory/{memory_id}", handle_delete_memory)
    r.add_get("/api/v1/profile", handle_get_profile)
    r.add_put("/api/v1/profile", handle_put_profile)
    r.add_post("/api/v1/feedback", handle_feedback)
