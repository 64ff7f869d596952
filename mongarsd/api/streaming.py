"""Shared generation plumbing for the OpenAI and Ollama surfaces.

One code path from a parsed request to token events: message normalisation, sampling
options -> GenerationParams, raw model (engine) or persona (`mongars` pipeline) dispatch,
client-disconnect cancellation, and the SSE / NDJSON stream writers.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from aiohttp import web

from mongarsd.api.app import CTX, AppContext
from mongarsd.errors import ContextOverflowError, MongarsError, NotFoundError, OverloadedError, ValidationError
from mongarsd.inference.llm import TokenEvent
from mongarsd.inference.manager import PERSONA_MODEL_ID
from mongarsd.inference.sampling import MAX_SEED, MAX_STOP_CHARS, GenerationParams

log = structlog.get_logger("mongarsd.api.streaming")

DISCONNECT_POLL_S = 0.05  # how often a running generation checks that its client is still there
TOKENIZE_IN_THREAD_CHARS = 4096
CHAT_ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send "developer" for system text
MAX_MESSAGES = 1024


# ----------------------------------------------------------------------------------------
# Pure request pieces


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """Sampling settings as the client gave them (None: server default), in engine vocabulary."""

    max_tokens: int | None = None  # None: max_tokens_default, capped by the room left
    fill_context: bool = False  # Ollama num_predict -1/-2: generate until the context is full
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_mode: bool = False
    json_schema: Mapping[str, Any] | None = field(default=None, hash=False)
    num_ctx: int | None = None


def build_params(spec: SamplingSpec, *, n_prompt: int, n_ctx: int, max_tokens_default: int) -> GenerationParams:
    """Turn a SamplingSpec into GenerationParams once the prompt length is known (pure).

    Raises ContextOverflowError naming the token counts when the prompt leaves no room.
    num_ctx (Ollama) lowers the context for this request; above the model's it is clamped.
    """
    # num_ctx above the model's context is clamped, as Ollama does: Home Assistant's Ollama
    # integration sends num_ctx 8192 by default, and refusing it would break that client
    limit = min(n_ctx, spec.num_ctx) if spec.num_ctx else n_ctx
    room = limit - n_prompt
    if room < 1:
        raise ContextOverflowError(
            "prompt has " + str(n_prompt) + " tokens but the context holds " + str(limit) + " tokens; shorten the conversation",
        )
    if spec.max_tokens is not None:
        if n_prompt + spec.max_tokens > limit:
            raise ContextOverflowError(
                "prompt has "
                + str(n_prompt)
                + " tokens and max_tokens is "
                + str(spec.max_tokens)
                + ": together over the context of "
                + str(limit)
                + " tokens",
                param="max_tokens",
            )
        max_tokens = spec.max_tokens
    elif spec.fill_context:
        max_tokens = room
    else:
        max_tokens = min(max_tokens_default, room)
    base = GenerationParams()
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=base.temperature if spec.temperature is None else spec.temperature,
        top_k=base.top_k if spec.top_k is None else spec.top_k,
        top_p=base.top_p if spec.top_p is None else spec.top_p,
        min_p=base.min_p if spec.min_p is None else spec.min_p,
        repeat_penalty=base.repeat_penalty if spec.repeat_penalty is None else spec.repeat_penalty,
        repeat_last_n=base.repeat_last_n if spec.repeat_last_n is None else spec.repeat_last_n,
        presence_penalty=base.presence_penalty if spec.presence_penalty is None else spec.presence_penalty,
        frequency_penalty=base.frequency_penalty if spec.frequency_penalty is None else spec.frequency_penalty,
        seed=spec.seed,
        stop=spec.stop,
        json_schema=spec.json_schema,
        json_mode=spec.json_mode and spec.json_schema is None,
    )


def normalize_messages(raw: object, *, param: str = "messages", allow_images: bool = False) -> list[dict[str, str]]:
    """Validate chat messages and return them as [{role, content}] with text content (pure).

    Roles: system, user, assistant, tool ("developer" is read as system). Content: a string,
    null (assistant turns that only called tools), or a list of text parts.
    """
    if not isinstance(raw, list):
        raise ValidationError("'" + param + "' must be a list of messages, got " + _kind(raw), param=param)
    if not raw:
        raise ValidationError("'" + param + "' must contain at least one message", param=param)
    if len(raw) > MAX_MESSAGES:
        raise ValidationError("'" + param + "' has " + str(len(raw)) + " messages; at most " + str(MAX_MESSAGES), param=param)
    out: list[dict[str, str]] = []
    for i, msg in enumerate(raw):
        where = param + "[" + str(i) + "]"
        if not isinstance(msg, dict):
            raise ValidationError("'" + where + "' must be an object with role and content, got " + _kind(msg), param=where)
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
                "'" + where + ".content' must be a string or a list of text parts, got " + _kind(content), param=where + ".content"
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
            raise ValidationError("'" + at + "' must be a content part object, got " + _kind(part), param=at)
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


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)


def check_prompt_chars(messages: Sequence[Mapping[str, str]], limit: int, *, param: str = "messages") -> None:
    """Refuse prompts over inference.max_prompt_chars before tokenizing them (pure)."""
    total = sum(len(m.get("content", "")) for m in messages)
    if total > limit:
        raise ValidationError(
            "prompt is too long: " + str(total) + " characters; at most " + str(limit) + " (inference.max_prompt_chars)",
            param=param,
            status=413,
        )


def opt_number(
    data: Mapping[str, Any], key: str, *, lo: float | None = None, hi: float | None = None, integer: bool = False, prefix: str = ""
) -> float | None:
    """Read an optional number field, naming the field (with its prefix) in the error (pure)."""
    value = data.get(key)
    name = prefix + key
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError("'" + name + "' must be a number, got " + _kind(value), param=name)
    if not math.isfinite(value):
        raise ValidationError("'" + name + "' must be a finite number", param=name)
    if integer and not float(value).is_integer():
        raise ValidationError("'" + name + "' must be an integer, got " + repr(value), param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            rng = "between " + _fmt(lo) + " and " + _fmt(hi)
        elif lo is not None:
            rng = "at least " + _fmt(lo)
        else:
            rng = "at most " + _fmt(hi if hi is not None else 0)
        raise ValidationError("'" + name + "' must be " + rng + ", got " + _fmt(value), param=name)
    return int(value) if integer else float(value)


def opt_int(data: Mapping[str, Any], key: str, *, lo: int | None = None, hi: int | None = None, prefix: str = "") -> int | None:
    value = opt_number(data, key, lo=lo, hi=hi, integer=True, prefix=prefix)
    return None if value is None else int(value)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def parse_seed(data: Mapping[str, Any], key: str = "seed", *, prefix: str = "") -> int | None:
    """Read a seed: a non-negative 32-bit integer; negative means random (pure)."""
    value = opt_number(data, key, integer=True, prefix=prefix)
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
        raise ValidationError("'" + param + "' must be a string or a list of strings, got " + _kind(value), param=param)
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
        raise OverloadedError("inference is not enabled on this daemon", retry_after_s=30.0, status=503)
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
    manager = ctx.llm
    n_ctx = manager.n_ctx if manager is not None else 2048
    default = manager.max_tokens_default if manager is not None else 256
    # the pipeline builds the real prompt; give it params sized for an empty prompt
    params = build_params(replace(spec, num_ctx=None), n_prompt=0, n_ctx=n_ctx, max_tokens_default=default)
    result = pipeline.async_chat_messages(principal.user, messages, stream, params)
    if inspect.isawaitable(result):
        result = await result
    events: AsyncIterator[TokenEvent] = result
    try:
        async for event in events:
            if event.finish_reason is not None:
                info.prompt_tokens = event.prompt_tokens
            yield event
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


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
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        if self._kind == "sse":
            await self.response.write(b"data: " + data + b"\n\n")
        else:
            await self.response.write(data + b"\n")

    async def async_done(self) -> web.StreamResponse:
        if self._kind == "sse":
            await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response
