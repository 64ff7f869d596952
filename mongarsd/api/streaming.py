"""Shared generation plumbing for the OpenAI and Ollama surfaces.

One code path from a parsed request to token events: message normalisation, sampling
options -> GenerationParams, raw model (engine) or persona (`mongars` pipeline) dispatch,
client-disconnect cancellation, and the SSE / NDJSON stream writers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from mongarsd.api.app import CTX, AppContext
from mongarsd.api.io import dumps_bytes, get_number, kind_of
from mongarsd.const import PERSONA_MODEL_ID
from mongarsd.errors import MongarsError, NotFoundError, UnavailableError, ValidationError
from mongarsd.inference.llm import TokenEvent
from mongarsd.inference.sampling import MAX_SEED, MAX_STOP_CHARS, SamplingSpec, build_params

log = structlog.get_logger("mongarsd.api.streaming")

DISCONNECT_POLL_S = 0.05  # how often a running generation checks that its client is still there
TOKENIZE_IN_THREAD_CHARS = 4096
CHAT_ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send "developer" for system text
MAX_MESSAGES = 1024


# ----------------------------------------------------------------------------------------
# Pure request pieces


def normalize_messages(raw: object, *, param: str = "messages", allow_images: bool = False) -> list[dict[str, str]]:
    """Validate chat messages and return them as [{role, content}] with text content (pure).

    Roles: system, user, assistant, tool ("developer" is read as system). Content: a string,
    null (assistant turns that only called tools), or a list of text parts.
    """
    if not isinstance(raw, list):
        raise ValidationError("'" + param + "' must be a list of messages, got " + kind_of(raw), param=param)
    if not raw:
        raise ValidationError("'" + param + "' must contain at least one message", param=param)
    if len(raw) > MAX_MESSAGES:
        raise ValidationError("'" + param + "' has " + str(len(raw)) + " messages; at most " + str(MAX_MESSAGES), param=param)
    out: list[dict[str, str]] = []
    for i, msg in enumerate(raw):
        where = param + "[" + str(i) + "]"
        if not isinstance(msg, dict):
            raise ValidationError("'" + where + "' must be an object with role and content, got " + kind_of(msg), param=where)
        role = msg.get("role")
        if not isinstance(role, str):
            raise ValidationError("'" + where + ".role' is required (one of " + ", ".join(CHAT_ROLES) + ")", param=where + ".role")
        role = ROLE_ALIASES.get(role, role)
        if role not in CHAT_ROLES:
            raise ValidationError(
                "'" + where + ".role' must be one of " + ", ".join(CHAT_ROLES) + ", got " + repr(role[:40]), param=where + ".role"
            )
        content = msg.get("content")
        if content is None:
            if role not in ("assistant", "tool"):
                raise ValidationError("'" + where + ".content' is required", param=where + ".content")
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = _join_parts(content, where + ".content")
        else:
            raise ValidationError(
                "'" + where + ".content' must be a string or a list of text parts, got " + kind_of(content), param=where + ".content"
            )
        if "\x00" in text:
            raise ValidationError("'" + where + ".content' must not contain NUL characters", param=where + ".content")
        images = msg.get("images")
        if images and not allow_images:
            raise ValidationError("'" + where + ".images': images are not supported by this server's models", param=where + ".images")
        out.append({"role": role, "content": text})
    return out


def _join_parts(parts: list[Any], where: str) -> str:
    texts: list[str] = []
    for j, part in enumerate(parts):
        at = where + "[" + str(j) + "]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ValidationError("'" + at + "' must be a content part object, got " + kind_of(part), param=at)
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "text":
            raise ValidationError("'" + at + ".text' must be a string", param=at + ".text")
        else:
            raise ValidationError(
                "'" + at + ".type' " + repr(str(kind)[:40]) + " is not supported: only text content parts are", param=at + ".type"
            )
    return "\n".join(texts)


def check_prompt_chars(messages: Sequence[Mapping[str, str]], limit: int, *, param: str = "messages") -> None:
    """Refuse prompts over inference.max_prompt_chars before tokenizing them (pure)."""
    total = sum(len(m.get("content", "")) for m in messages)
    if total > limit:
        raise ValidationError(
            "prompt is too long: " + str(total) + " characters; at most " + str(limit) + " (inference.max_prompt_chars)",
            param=param,
            status=413,
        )


def parse_seed(data: Mapping[str, Any], key: str = "seed", *, prefix: str = "") -> int | None:
    """Read a seed: a non-negative 32-bit integer; negative means random (pure)."""
    value = get_number(data, key, integer=True, prefix=prefix)
    if value is None or value < 0:
        return None
    if value > MAX_SEED:
        raise ValidationError("'" + prefix + key + "' must be at most " + str(MAX_SEED) + " (or negative for random)", param=prefix + key)
    return int(value)


def parse_stop(value: object, *, max_items: int, param: str = "stop") -> tuple[str, ...]:
    """Read stop sequences: a string or a list of non-empty strings (pure)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValidationError("'" + param + "' must be a string or a list of strings, got " + kind_of(value), param=param)
    if len(items) > max_items:
        raise ValidationError("'" + param + "' has " + str(len(items)) + " sequences; at most " + str(max_items), param=param)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValidationError("'" + param + "' entries must be non-empty strings", param=param)
        if len(item) > MAX_STOP_CHARS:
            raise ValidationError("'" + param + "' entries must be at most " + str(MAX_STOP_CHARS) + " characters", param=param)
        out.append(item)
    return tuple(out)


def is_persona(model: str) -> bool:
    return model.strip().lower() in (PERSONA_MODEL_ID, PERSONA_MODEL_ID + ":latest")


# ----------------------------------------------------------------------------------------
# Generation: one code path for raw models and the persona


@dataclass(slots=True)
class GenInfo:
    """Facts about a generation that the response formatting needs (filled as it runs)."""

    model: str
    t_start: float = field(default_factory=time.monotonic)
    load_s: float = 0.0
    prompt_tokens: int = 0


def _manager(ctx: AppContext) -> Any:
    if ctx.llm is None:
        raise UnavailableError("inference is not enabled on this daemon")
    return ctx.llm


async def async_chat_events(
    request: web.Request,
    *,
    model: str,
    messages: list[dict[str, str]],
    spec: SamplingSpec,
    keep_alive_s: float | None,
    info: GenInfo,
    stream: bool,
    raw_prompt: str | None = None,
) -> AsyncGenerator[TokenEvent, None]:
    """Yield the token events of one chat (or, with raw_prompt, plain completion) request.

    Errors that refuse the request (unknown model, overload, context overflow) are raised at
    the first iteration, before anything has been sent to the client.
    """
    ctx = request.app[CTX]
    if is_persona(model):
        async for event in _async_persona_events(request, ctx, messages=messages, spec=spec, info=info, stream=stream):
            yield event
        return
    manager = _manager(ctx)
    check_prompt_chars(
        messages if raw_prompt is None else [{"content": raw_prompt}],
        manager.max_prompt_chars,
        param="messages" if raw_prompt is None else "prompt",
    )
    async with manager.async_use(model, keep_alive_s=keep_alive_s) as lease:
        info.model = lease.entry.id
        info.load_s = lease.load_s
        engine = lease.engine
        if raw_prompt is None:
            if sum(len(m["content"]) for m in messages) > TOKENIZE_IN_THREAD_CHARS:
                tokens = await asyncio.to_thread(engine.tokenize_chat, messages)
            else:
                tokens = engine.tokenize_chat(messages)
        else:
            tokens = await engine.async_tokenize(raw_prompt, True, False)
        info.prompt_tokens = len(tokens)
        params = build_params(spec, n_prompt=len(tokens), n_ctx=engine.n_ctx_per_slot, max_tokens_default=manager.max_tokens_default)
        agen = engine.async_generate(tokens, params)
        try:
            async for event in agen:
                yield event
        finally:
            await agen.aclose()  # frees the slot at once when the client went away


async def _async_persona_events(
    request: web.Request, ctx: AppContext, *, messages: list[dict[str, str]], spec: SamplingSpec, info: GenInfo, stream: bool
) -> AsyncGenerator[TokenEvent, None]:
    pipeline = ctx.pipeline
    if pipeline is None:
        raise NotFoundError("unknown model " + PERSONA_MODEL_ID + ": memory pipeline not enabled", param="model")
    from mongarsd.api.auth import principal_of

    principal = principal_of(request)
    info.model = PERSONA_MODEL_ID
    # the pipeline builds the real prompt and sizes the reply once it knows its length
    events = pipeline.async_chat_messages(principal.user, messages, stream, spec)
    try:
        async for event in events:
            if event.finish_reason is not None:
                info.prompt_tokens = event.prompt_tokens
            yield event
    finally:
        await events.aclose()


# ----------------------------------------------------------------------------------------
# Client disconnects


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": what the access metrics record


class DisconnectGuard:
    """Cancel the handler as soon as its client disconnects, and end the request quietly.

    aiohttp does not cancel handlers on disconnect (handler_cancellation is off), and a
    generation that waits in the queue or prefills writes nothing for a while, so the
    transport is polled to free the slot at once. Use as:

        async with (guard := DisconnectGuard(request)):
            ... return response
        return guard.response   # reached only when the client went away
    """

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.fired = False
        self.response = web.Response(status=CLIENT_CLOSED_STATUS)

    async def __aenter__(self) -> DisconnectGuard:
        self._task = asyncio.current_task()
        self._check()
        return self

    def _check(self) -> None:
        """Poll the transport from a timer callback (no task, no wake-up of the handler)."""
        self._timer = None
        if self.fired or self._task is None or self._task.done():
            return
        if client_gone(self._request):
            self.fired = True
            self._task.cancel()
            return
        self._timer = asyncio.get_running_loop().call_later(DISCONNECT_POLL_S, self._check)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if self.fired:
            task = self._task
            if task is not None and task.cancelling():
                task.uncancel()
            log.info("client_disconnected", path=self._request.path)
            return isinstance(exc, asyncio.CancelledError | ConnectionResetError) or exc is None
        if isinstance(exc, ConnectionResetError):
            log.info("client_disconnected", path=self._request.path)
            return True
        return False


async def async_first(events: AsyncIterator[TokenEvent]) -> TokenEvent:
    """Pull the first event (so refusals become proper HTTP errors before any byte is sent)."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        raise MongarsError("generation ended without a final event") from None


async def async_collect(first: TokenEvent, events: AsyncIterator[TokenEvent]) -> tuple[str, TokenEvent]:
    """Gather the whole text and the final event."""
    parts = [first.text]
    final = first
    if first.finish_reason is None:
        async for event in events:
            parts.append(event.text)
            final = event
            if event.finish_reason is not None:
                break
    return "".join(parts), final


# ----------------------------------------------------------------------------------------
# Stream writers


class StreamWriter:
    """Write SSE events or NDJSON lines to a prepared response."""

    def __init__(self, request: web.Request, kind: str) -> None:
        self._request = request
        self._kind = kind
        content_type = "text/event-stream" if kind == "sse" else "application/x-ndjson"
        self.response = web.StreamResponse(
            status=200, headers={"Content-Type": content_type, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        rid = request.get("request_id")
        if isinstance(rid, str):
            self.response.headers["X-Request-Id"] = rid

    async def async_prepare(self) -> None:
        await self.response.prepare(self._request)

    async def async_send(self, obj: Mapping[str, Any]) -> None:
        data = dumps_bytes(obj, compact=True)
        if self._kind == "sse":
            await self.response.write(b"data: " + data + b"\n\n")
        else:
            await self.response.write(data + b"\n")

    async def async_done(self) -> web.StreamResponse:
        if self._kind == "sse":
            await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response
