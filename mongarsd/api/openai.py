"""OpenAI surface: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from mongarsd.api.app import CTX, AppContext
from mongarsd.api.generation import GenInfo, async_chat_events, async_forward
from mongarsd.api.io import get_bool, get_int, get_number, get_str, json_response, read_json, require_str
from mongarsd.api.messages import is_persona, normalize_messages, parse_seed, parse_stop, parse_tool_choice, parse_tools
from mongarsd.api.streaming import DisconnectGuard, StreamWriter, async_collect, async_first
from mongarsd.const import PERSONA_MODEL_ID
from mongarsd.errors import EmbedderUnavailableError, MongarsError, NotFoundError, OverloadedError, ValidationError
from mongarsd.inference.embed import Embedder
from mongarsd.inference.events import Timings, TokenEvent
from mongarsd.inference.grammar import check_schema
from mongarsd.inference.sampling import SamplingSpec
from mongarsd.inference.tools import FINISH_TOOL_CALLS, NO_TOOLS, GenEvent, ToolCall, ToolCallEvent, ToolSet

OPENAI_MAX_STOP = 4
SCHEMA_PARAM = "response_format.json_schema.schema"
MAX_MODEL_NAME_CHARS = 256
OWNER = "mongarsd"
EMBED_MODEL_ALIASES = ("all-minilm-l6-v2", "all-minilm", "sentence-transformers/all-minilm-l6-v2")


# ----------------------------------------------------------------------------------------
# Pure request parsing


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """A parsed chat or completion request."""

    model: str
    messages: list[dict[str, str]]
    prompt: str | None
    spec: SamplingSpec
    stream: bool
    include_usage: bool
    tools: ToolSet = NO_TOOLS


def _reject_if(body: Mapping[str, Any], key: str, ok: Callable[[Any], bool], why: str) -> None:
    if key in body and body[key] is not None and not ok(body[key]):
        raise ValidationError("'" + key + "' " + why, param=key)


def parse_sampling(body: Mapping[str, Any]) -> SamplingSpec:
    """Read OpenAI sampling fields (plus llama-server's top_k, min_p, repeat_penalty) (pure)."""
    legacy_max = get_int(body, "max_tokens", lo=1)  # checked even when the newer name wins: a bad value is an error
    max_tokens = get_int(body, "max_completion_tokens", lo=1)
    if max_tokens is None:
        max_tokens = legacy_max
    _reject_if(body, "n", lambda v: v == 1, "must be 1: this server returns one choice per request")
    _reject_if(body, "best_of", lambda v: v == 1, "must be 1: this server returns one choice per request")
    _reject_if(body, "logprobs", lambda v: v is False or v == 0, "is not supported by this server")
    _reject_if(body, "top_logprobs", lambda v: v == 0, "is not supported by this server")
    _reject_if(body, "logit_bias", lambda v: isinstance(v, dict) and not v, "is not supported by this server")
    _reject_if(body, "audio", lambda v: False, "output is not supported by this server")
    _reject_if(body, "modalities", lambda v: v == ["text"], 'must be ["text"]: only text output is supported')
    json_mode, schema = parse_response_format(body.get("response_format"))
    return SamplingSpec(
        max_tokens=max_tokens,
        temperature=get_number(body, "temperature", lo=0.0, hi=2.0),
        top_p=get_number(body, "top_p", lo=0.0, hi=1.0),
        top_k=get_int(body, "top_k", lo=0, hi=1_000_000),
        min_p=get_number(body, "min_p", lo=0.0, hi=1.0),
        repeat_penalty=get_number(body, "repeat_penalty", lo=0.01, hi=10.0),
        presence_penalty=get_number(body, "presence_penalty", lo=-2.0, hi=2.0),
        frequency_penalty=get_number(body, "frequency_penalty", lo=-2.0, hi=2.0),
        seed=parse_seed(body),
        stop=parse_stop(body.get("stop"), max_items=OPENAI_MAX_STOP),
        json_mode=json_mode,
        json_schema=schema,
        schema_param=SCHEMA_PARAM,
    )


def parse_response_format(value: object) -> tuple[bool, Mapping[str, Any] | None]:
    """Return (json_mode, json_schema) for an OpenAI response_format (pure)."""
    if value is None:
        return False, None
    if not isinstance(value, dict):
        raise ValidationError('\'response_format\' must be an object like {"type": "json_object"}', param="response_format")
    kind = value.get("type")
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise ValidationError("'response_format.json_schema' must be an object with a 'schema'", param="response_format.json_schema")
        return False, check_schema(spec.get("schema"), param=SCHEMA_PARAM)
    raise ValidationError(
        "'response_format.type' must be text, json_object or json_schema, got " + repr(str(kind)[:40]), param="response_format.type"
    )


def _parse_common(body: Mapping[str, Any]) -> tuple[str, bool, bool]:
    model = require_str(body, "model", max_len=MAX_MODEL_NAME_CHARS)
    stream = get_bool(body, "stream", default=False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise ValidationError("'stream_options' must be an object", param="stream_options")
        include_usage = get_bool(options, "include_usage", default=False)
    return model, stream, include_usage


def parse_toolset(body: Mapping[str, Any]) -> ToolSet:
    """Read tools, tool_choice and parallel_tool_calls (and the legacy functions/function_call) (pure)."""
    if body.get("tools") is not None:
        tools = parse_tools(body.get("tools"))
        choice = parse_tool_choice(body.get("tool_choice"), tools)
    else:
        legacy = body.get("functions")
        wrapped = [{"type": "function", "function": f} for f in legacy] if isinstance(legacy, list) else legacy
        tools = parse_tools(wrapped, param="functions")
        raw_choice = body.get("function_call")
        choice = parse_tool_choice({"function": raw_choice} if isinstance(raw_choice, dict) else raw_choice, tools, param="function_call")
    return ToolSet(tools, choice, parallel=get_bool(body, "parallel_tool_calls", default=True))


def parse_chat_request(body: Mapping[str, Any]) -> OpenAIRequest:
    """Validate a /v1/chat/completions body (pure)."""
    model, stream, include_usage = _parse_common(body)
    messages = normalize_messages(body.get("messages"))
    return OpenAIRequest(model, messages, None, parse_sampling(body), stream, include_usage, parse_toolset(body))


def parse_completion_request(body: Mapping[str, Any]) -> OpenAIRequest:
    """Validate a /v1/completions body: one prompt string (pure)."""
    model, stream, include_usage = _parse_common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ValidationError("'prompt' must be a string (one prompt per request)", param="prompt")
    if not prompt:
        raise ValidationError("'prompt' must not be empty", param="prompt")
    if "\x00" in prompt:
        raise ValidationError("'prompt' must not contain NUL characters", param="prompt")
    _reject_if(body, "echo", lambda v: v is False, "is not supported by this server")
    _reject_if(body, "suffix", lambda v: v == "", "(fill-in-the-middle) is not supported by this server")
    return OpenAIRequest(model, [], prompt, parse_sampling(body), stream, include_usage)


# ----------------------------------------------------------------------------------------
# Response shapes (pure)


def usage_of(final: TokenEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.prompt_tokens + final.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": final.cached_tokens},
    }


def timings_of(t: Timings | None) -> dict[str, Any] | None:
    """llama-server's `timings` block (an extension clients ignore)."""
    if t is None:
        return None
    return {
        "prompt_n": t.prompt_n,
        "prompt_ms": round(t.prompt_ms, 3),
        "prompt_per_second": round(t.prompt_per_second, 3),
        "predicted_n": t.predicted_n,
        "predicted_ms": round(t.predicted_ms, 3),
        "predicted_per_second": round(t.predicted_per_second, 3),
    }


def finish_reason_of(reason: str | None) -> str:
    if reason == FINISH_TOOL_CALLS:
        return FINISH_TOOL_CALLS
    return "length" if reason == "length" else "stop"


def tool_call_object(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}


# ----------------------------------------------------------------------------------------
# Handlers


async def handle_chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    req = parse_chat_request(body)
    return await _async_generate(request, body, req, chat=True)


async def handle_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    req = parse_completion_request(body)
    return await _async_generate(request, body, req, chat=False)


async def _async_generate(request: web.Request, body: dict[str, Any], req: OpenAIRequest, *, chat: bool) -> web.StreamResponse:
    forwarded = await async_forward(request, body, model=req.model, stream=req.stream)
    if forwarded is not None:
        return forwarded
    info = GenInfo(model=req.model)
    events = async_chat_events(
        request,
        model=req.model,
        messages=req.messages,
        spec=req.spec,
        keep_alive_s=None,
        info=info,
        stream=req.stream,
        raw_prompt=req.prompt,
        tools=req.tools,
    )
    prefix = "chatcmpl-" if chat else "cmpl-"
    rid = prefix + secrets.token_hex(12)
    created = int(time.time())
    guard = DisconnectGuard(request)
    try:
        async with guard:
            first = await async_first(events)
            if not req.stream:
                text, calls, final = await async_collect(first, events)
                return json_response(_full_response(rid, created, info.model, text, final, calls=calls, chat=chat))
            return await _async_stream(
                request, rid=rid, created=created, info=info, first=first, events=events, chat=chat, include_usage=req.include_usage
            )
        return guard.response
    finally:
        await events.aclose()


def _full_response(
    rid: str, created: int, model: str, text: str, final: TokenEvent, *, calls: list[ToolCall], chat: bool
) -> dict[str, Any]:
    reason = finish_reason_of(final.finish_reason)
    choice: dict[str, Any]
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            # as OpenAI: no text beside the calls is null content
            message = {"role": "assistant", "content": text if text.strip() else None, "tool_calls": [tool_call_object(c) for c in calls]}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_of(final),
        "system_fingerprint": "mongarsd",
        "timings": timings_of(final.timings),
    }


async def _async_stream(
    request: web.Request,
    *,
    rid: str,
    created: int,
    info: GenInfo,
    first: GenEvent,
    events: AsyncIterator[GenEvent],
    chat: bool,
    include_usage: bool,
) -> web.StreamResponse:
    writer = StreamWriter(request, "sse")
    await writer.async_prepare()
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None, *, role: bool = False, call: dict[str, Any] | None = None) -> dict[str, Any]:
        choice: dict[str, Any]
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if call is not None:
                delta["tool_calls"] = [call]
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        out: dict[str, Any] = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": info.model,
            "system_fingerprint": "mongarsd",
            "choices": [choice],
        }
        if include_usage:
            out["usage"] = None
        return out

    if chat:
        await writer.async_send(chunk("", None, role=True))
    event = first
    n_calls = 0
    try:
        while True:
            if isinstance(event, ToolCallEvent):
                # as OpenAI streams them: the first delta names the call, later ones carry the arguments
                call = event.call
                header = {"index": n_calls, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
                await writer.async_send(chunk(None, None, call=header))
                await writer.async_send(chunk(None, None, call={"index": n_calls, "function": {"arguments": call.arguments_json}}))
                n_calls += 1
            elif event.finish_reason is not None:
                if event.text:
                    await writer.async_send(chunk(event.text, None))
                last = chunk(None if chat else "", finish_reason_of(event.finish_reason))
                last["timings"] = timings_of(event.timings)
                await writer.async_send(last)
                if include_usage:
                    await writer.async_send(
                        {
                            "id": rid,
                            "object": obj,
                            "created": created,
                            "model": info.model,
                            "system_fingerprint": "mongarsd",
                            "choices": [],
                            "usage": usage_of(event),
                        }
                    )
                break
            elif event.text:
                await writer.async_send(chunk(event.text, None))
            event = await events.__anext__()
    except MongarsError as err:  # failed after the headers went out: say so in the stream
        status = err.status if isinstance(err, ValidationError | OverloadedError) else 500
        await writer.async_send(
            {
                "error": {
                    "message": str(err),
                    "type": "server_error" if status >= 500 else "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        )
    return await writer.async_done()


# ----------------------------------------------------------------------------------------
# Embeddings


def embed_model_matches(name: str, model_id: str) -> bool:
    """Say whether a client's model name means the embedding model (pure)."""
    n = name.strip().lower()
    if n.endswith(":latest"):
        n = n[: -len(":latest")]
    return n == model_id.lower() or n in EMBED_MODEL_ALIASES


def parse_embed_input(value: object, *, param: str = "input") -> list[str]:
    """Read embedding input: a string or a non-empty list of strings (pure)."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise ValidationError("'" + param + "' must be a string or a list of strings, got " + type(value).__name__, param=param)
    if not items:
        raise ValidationError("'" + param + "' must not be empty", param=param)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            what = "token ids are not supported; send text" if isinstance(item, int | list) else "must be a string"
            raise ValidationError("'" + param + "[" + str(i) + "]' " + what, param=param)
    return items


def embedder_of(ctx: AppContext) -> Embedder:
    if ctx.embedder is None:
        raise EmbedderUnavailableError("the embedding model is not enabled on this daemon", transient=False)
    return ctx.embedder


async def async_embed_texts(ctx: AppContext, model: str, texts: list[str]) -> tuple[Any, int]:
    """Embed texts with the embedder; return (vectors [n, dim], tokens counted), both off the loop."""
    embedder = embedder_of(ctx)
    if not embed_model_matches(model, embedder.model_id):
        if ctx.llm is not None and not is_persona(model):
            try:
                await ctx.llm.async_resolve(model)
            except (NotFoundError, MongarsError):
                pass
            else:
                raise ValidationError("model '" + model + "' does not support embeddings; use " + embedder.model_id, param="model")
        raise NotFoundError("model '" + model + "' not found (the embedding model is " + embedder.model_id + ")", param="model")
    vectors = await embedder.async_embed(texts)
    counts = await embedder.async_count_tokens(texts)
    return vectors, int(sum(counts))


async def handle_embeddings(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await read_json(request)
    model = require_str(body, "model", max_len=MAX_MODEL_NAME_CHARS)
    texts = parse_embed_input(body.get("input"))
    fmt = get_str(body, "encoding_format", default="float")
    if fmt not in ("float", "base64"):
        raise ValidationError("'encoding_format' must be float or base64", param="encoding_format")
    dims = get_int(body, "dimensions", lo=1)
    vectors, n_tokens = await async_embed_texts(ctx, model, texts)
    model_id = embedder_of(ctx).model_id
    if dims is not None and dims != vectors.shape[1]:
        raise ValidationError("'dimensions' must be " + str(vectors.shape[1]) + " for " + model_id, param="dimensions")
    data = []
    for i, row in enumerate(vectors):
        emb: Any = base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode() if fmt == "base64" else [float(x) for x in row]
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return json_response(
        {"object": "list", "data": data, "model": model_id, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
    )


# ----------------------------------------------------------------------------------------
# Models


async def async_model_objects(ctx: AppContext) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if ctx.llm is not None:
        for entry in await ctx.llm.async_list_models():
            out.append({"id": entry.id, "object": "model", "created": int(entry.modified_at.timestamp()), "owned_by": OWNER})
    if ctx.pipeline is not None:
        out.append({"id": PERSONA_MODEL_ID, "object": "model", "created": int(ctx.started_at), "owned_by": OWNER})
    if ctx.embedder is not None:
        out.append({"id": ctx.embedder.model_id, "object": "model", "created": int(ctx.started_at), "owned_by": OWNER})
    return out


async def handle_models(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    return json_response({"object": "list", "data": await async_model_objects(ctx)})


async def handle_model(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    wanted = request.match_info["model"]
    for obj in await async_model_objects(ctx):
        if obj["id"] == wanted:
            return json_response(obj)
    if ctx.llm is not None and not is_persona(wanted):
        try:
            entry = await ctx.llm.async_resolve(wanted)
        except NotFoundError:
            pass
        else:
            return json_response({"id": entry.id, "object": "model", "created": int(entry.modified_at.timestamp()), "owned_by": OWNER})
    raise NotFoundError("model '" + wanted + "' not found", param="model")


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", handle_chat_completions)
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_post("/v1/embeddings", handle_embeddings)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/v1/models/{model:.+}", handle_model)
