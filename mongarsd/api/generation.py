"""The one generation path: a parsed request from any surface becomes one stream of token events.

Every surface (OpenAI, Ollama) supplies only its pure request parser and response formatter;
this module validates once, dispatches to the persona pipeline (`mongars`, with the caller's
memory) or to a raw model through the inference manager, tokenizes once off the loop, sizes the
reply with the one context check (inference.sampling.build_params) and streams TokenEvents.
Forwarding to a better mesh node happens before it (api/forwarding.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from mongarsd.api.app import CTX, AppContext
from mongarsd.api.forwarding import async_maybe_forward
from mongarsd.api.messages import check_prompt_chars, is_persona
from mongarsd.const import PERSONA_MODEL_ID
from mongarsd.errors import NotFoundError, UnavailableError
from mongarsd.inference.events import TokenEvent
from mongarsd.inference.manager import InferenceManager
from mongarsd.inference.sampling import SamplingSpec, build_params
from mongarsd.inference.tools import (
    FINISH_REPEATED,
    NO_TOOLS,
    GenEvent,
    ToolSet,
    answered_calls,
    async_split_calls,
    prepare_messages,
    template_supports_tools,
    with_tools,
    without_tools,
)

log = structlog.get_logger("mongarsd.api.generation")


@dataclass(slots=True)
class GenInfo:
    """Facts about a generation that the response formatting needs (filled as it runs)."""

    model: str
    t_start: float = field(default_factory=time.monotonic)
    load_s: float = 0.0
    prompt_tokens: int = 0


def _manager(ctx: AppContext) -> InferenceManager:
    if ctx.llm is None:
        raise UnavailableError("inference is not enabled on this daemon")
    return ctx.llm


async def async_forward(request: web.Request, body: Mapping[str, Any], *, model: str, stream: bool) -> web.StreamResponse | None:
    """Serve the request on a better mesh node and return its response, or None to serve it here."""
    mesh = request.app[CTX].mesh
    if mesh is None:
        return None
    return await async_maybe_forward(request, mesh, body, model=model, stream=stream)


async def async_chat_events(
    request: web.Request,
    *,
    model: str,
    messages: list[dict[str, Any]],
    spec: SamplingSpec,
    keep_alive_s: float | None,
    info: GenInfo,
    stream: bool,
    raw_prompt: str | None = None,
    tools: ToolSet = NO_TOOLS,
) -> AsyncGenerator[GenEvent, None]:
    """Yield the events of one chat (or, with raw_prompt, plain completion) request.

    Text comes as TokenEvents, calls to the client's tools as whole ToolCallEvents, and the
    last TokenEvent has finish_reason set ("tool_calls" when calls were made). Errors that
    refuse the request (unknown model, overload, context overflow, bad tools) are raised at the
    first iteration, before anything has been sent to the client.
    """
    ctx = request.app[CTX]
    if is_persona(model):
        async for event in _async_persona_events(request, ctx, messages=messages, spec=spec, info=info, stream=stream, tools=tools):
            yield event
        return
    spec = with_tools(spec, tools)
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
        answered = answered_calls(messages) if raw_prompt is None else frozenset()
        for attempt_tools in (tools, NO_TOOLS):
            # a model that only repeats a call already answered gets asked once more, for text
            attempt_spec = spec if attempt_tools is tools else without_tools(spec)
            if raw_prompt is None:
                template = engine.chat_template
                native = template is not None and not template.is_fallback and template_supports_tools(template.source)
                chat, template_tools = prepare_messages(messages, attempt_tools, native=native)
                # rendering the chat template (jinja) and tokenizing run off the loop, however short
                tokens = await asyncio.to_thread(engine.tokenize_chat, chat, tools=template_tools)
            else:
                tokens = await engine.async_tokenize(raw_prompt, True, False)
            info.prompt_tokens = len(tokens)
            params = build_params(
                attempt_spec, n_prompt=len(tokens), n_ctx=engine.n_ctx_per_slot, max_tokens_default=manager.max_tokens_default
            )
            agen = async_split_calls(engine.async_generate(tokens, params), attempt_tools, prompt_tokens=len(tokens), answered=answered)
            try:
                async for event in agen:
                    if isinstance(event, TokenEvent) and event.finish_reason == FINISH_REPEATED:
                        break
                    if isinstance(event, TokenEvent) and event.timings is not None and ctx.evolution is not None:
                        # production decode speed: a regression below the adopted tuning rolls it back
                        ctx.evolution.observe_production(
                            event.timings.predicted_per_second, tokens=event.timings.predicted_n, model=lease.entry.id
                        )
                    yield event
                else:
                    return
            finally:
                await agen.aclose()  # frees the slot at once when the client went away


async def _async_persona_events(
    request: web.Request,
    ctx: AppContext,
    *,
    messages: list[dict[str, Any]],
    spec: SamplingSpec,
    info: GenInfo,
    stream: bool,
    tools: ToolSet,
) -> AsyncGenerator[GenEvent, None]:
    pipeline = ctx.pipeline
    if pipeline is None:
        raise NotFoundError("unknown model " + PERSONA_MODEL_ID + ": memory pipeline not enabled", param="model")
    from mongarsd.api.auth import principal_of

    principal = principal_of(request)
    info.model = PERSONA_MODEL_ID
    # the pipeline builds the real prompt and sizes the reply once it knows its length
    events = pipeline.async_chat_messages(principal.user, messages, stream, spec, role=principal.role, tools=tools)
    try:
        async for event in events:
            if isinstance(event, TokenEvent) and event.finish_reason is not None:
                info.prompt_tokens = event.prompt_tokens
            yield event
    finally:
        await events.aclose()
