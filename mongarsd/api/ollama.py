"""Ollama surface: /api/chat, /api/generate, /api/embed(dings), /api/tags, /api/ps, /api/show, /api/version."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from mongarsd.api.app import CTX
from mongarsd.api.auth import public
from mongarsd.api.generation import GenInfo, async_chat_events, async_forward
from mongarsd.api.io import get_bool, get_int, get_number, get_str, json_response, read_json, require_str
from mongarsd.api.messages import is_persona, normalize_messages, parse_seed, parse_stop, parse_tools
from mongarsd.api.openai import async_embed_texts, embedder_of, parse_embed_input
from mongarsd.api.streaming import DisconnectGuard, StreamWriter, async_collect, async_first
from mongarsd.const import PERSONA_MODEL_ID
from mongarsd.errors import ModelError, MongarsError, NotFoundError, UnavailableError, ValidationError
from mongarsd.inference.events import TokenEvent
from mongarsd.inference.gguf import ArrayInfo, read_gguf
from mongarsd.inference.grammar import check_schema
from mongarsd.inference.manager import parse_keep_alive
from mongarsd.inference.models import ModelEntry
from mongarsd.inference.sampling import SamplingSpec
from mongarsd.inference.tools import NO_TOOLS, GenEvent, ToolCall, ToolCallEvent, ToolChoice, ToolSet

OLLAMA_COMPAT_VERSION = "0.9.0"  # the Ollama API level these routes follow (clients check it)
OLLAMA_MAX_STOP = 16
MAX_MODEL_NAME_CHARS = 256
NS_PER_S = 1_000_000_000
FOREVER_ISO = "9999-12-31T23:59:59Z"
# options Ollama accepts that have no meaning here (runner settings come from the config)
IGNORED_OPTIONS = frozenset(
    {
        "num_keep",
        "typical_p",
        "tfs_z",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "penalize_newline",
        "numa",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "num_thread",
        "f16_kv",
        "logits_all",
        "embedding_only",
        "rope_frequency_base",
        "rope_frequency_scale",
        "num_gqa",
    }
)


# ----------------------------------------------------------------------------------------
# Pure request parsing


def parse_options(options: object, fmt: object) -> SamplingSpec:
    """Read Ollama's `options` and `format` into a SamplingSpec (pure)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValidationError("'options' must be an object", param="options")
    p = "options."
    num_predict = get_int(options, "num_predict", prefix=p)
    max_tokens: int | None = None
    fill = False
    if num_predict is not None:
        if num_predict in (-1, -2):
            fill = True
        elif num_predict >= 1:
            max_tokens = num_predict
        else:
            raise ValidationError(
                "'options.num_predict' must be -1 (until the context is full), -2 or at least 1, got " + str(num_predict),
                param="options.num_predict",
            )
    json_mode, schema = parse_format(fmt)
    return SamplingSpec(
        max_tokens=max_tokens,
        fill_context=fill,
        temperature=get_number(options, "temperature", lo=0.0, hi=2.0, prefix=p),
        top_p=get_number(options, "top_p", lo=0.0, hi=1.0, prefix=p),
        top_k=get_int(options, "top_k", lo=0, hi=1_000_000, prefix=p),
        min_p=get_number(options, "min_p", lo=0.0, hi=1.0, prefix=p),
        repeat_penalty=get_number(options, "repeat_penalty", lo=0.01, hi=10.0, prefix=p),
        repeat_last_n=get_int(options, "repeat_last_n", lo=-1, hi=4096, prefix=p),
        presence_penalty=get_number(options, "presence_penalty", lo=-2.0, hi=2.0, prefix=p),
        frequency_penalty=get_number(options, "frequency_penalty", lo=-2.0, hi=2.0, prefix=p),
        seed=parse_seed(options, prefix=p),
        stop=parse_stop(options.get("stop"), max_items=OLLAMA_MAX_STOP, param="options.stop"),
        num_ctx=get_int(options, "num_ctx", lo=1, prefix=p),
        json_mode=json_mode,
        json_schema=schema,
        schema_param="format",
    )


def parse_format(fmt: object) -> tuple[bool, Mapping[str, Any] | None]:
    """Ollama `format`: "json", a JSON Schema object, or empty (pure)."""
    if fmt is None or fmt == "":
        return False, None
    if fmt == "json":
        return True, None
    if isinstance(fmt, dict):
        return False, check_schema(fmt, param="format")
    raise ValidationError("'format' must be \"json\" or a JSON Schema object, got " + repr(fmt)[:60], param="format")


@dataclass(frozen=True, slots=True)
class OllamaRequest:
    model: str
    messages: list[dict[str, str]]  # empty: load/unload only
    prompt: str | None  # /api/generate raw mode
    spec: SamplingSpec
    stream: bool
    keep_alive_s: float | None
    tools: ToolSet = NO_TOOLS


def _common(body: Mapping[str, Any]) -> tuple[str, bool, float | None]:
    model = require_str(body, "model", max_len=MAX_MODEL_NAME_CHARS)
    stream = get_bool(body, "stream", default=True)
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    if body.get("think") not in (None, False):
        raise ValidationError("model '" + model + "' does not support thinking", param="think")
    return model, stream, keep_alive


def parse_chat(body: Mapping[str, Any]) -> OllamaRequest:
    """Validate an /api/chat body (pure); no messages means load (or unload) the model only."""
    model, stream, keep_alive = _common(body)
    raw = body.get("messages")
    messages = [] if raw is None or raw == [] else normalize_messages(raw)
    spec = parse_options(body.get("options"), body.get("format"))
    # Ollama has no tool_choice: the model chooses between text and a call
    tools = ToolSet(parse_tools(body.get("tools")), ToolChoice("auto"))
    return OllamaRequest(model, messages, None, spec, stream, keep_alive, tools)


def parse_generate(body: Mapping[str, Any]) -> OllamaRequest:
    """Validate an /api/generate body (pure); no prompt means load (or unload) the model only."""
    model, stream, keep_alive = _common(body)
    if body.get("tools"):
        raise ValidationError("'tools' are for /api/chat; /api/generate takes a prompt only", param="tools")
    prompt = get_str(body, "prompt", default="")
    system = get_str(body, "system", default="")
    raw = get_bool(body, "raw", default=False)
    if body.get("images"):
        raise ValidationError("'images': images are not supported by this server's models", param="images")
    if body.get("suffix"):
        raise ValidationError("'suffix' (fill-in-the-middle) is not supported by this server", param="suffix")
    if body.get("template"):
        raise ValidationError("'template' overrides are not supported; the model's own chat template is used", param="template")
    if body.get("context"):
        raise ValidationError("'context' (token ids of an earlier reply) is not supported; use /api/chat with messages", param="context")
    spec = parse_options(body.get("options"), body.get("format"))
    if not prompt:
        return OllamaRequest(model, [], None, spec, stream, keep_alive)
    if raw:
        return OllamaRequest(model, [], prompt, spec, stream, keep_alive)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return OllamaRequest(model, normalize_messages(messages), None, spec, stream, keep_alive)


# ----------------------------------------------------------------------------------------
# Response shapes (pure)


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def done_fields(final: TokenEvent, info: GenInfo, t_end: float) -> dict[str, Any]:
    """Ollama's final counters and durations (nanoseconds)."""
    t = final.timings
    return {
        "done_reason": "length" if final.finish_reason == "length" else "stop",
        "total_duration": int((t_end - info.t_start) * NS_PER_S),
        "load_duration": int(info.load_s * NS_PER_S),
        "prompt_eval_count": final.prompt_tokens,
        "prompt_eval_duration": int(t.prompt_ms * 1_000_000) if t else 0,
        "eval_count": final.completion_tokens,
        "eval_duration": int(t.predicted_ms * 1_000_000) if t else 0,
    }


def parameter_size(entry: ModelEntry) -> str:
    """Ollama's parameter_size, e.g. "135M" (pure)."""
    if entry.size_label:
        return entry.size_label
    n = entry.parameters or 0
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}".rstrip("0").rstrip(".") + unit
    return str(n)


def details_of(entry: ModelEntry) -> dict[str, Any]:
    family = entry.architecture or "unknown"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": parameter_size(entry),
        "quantization_level": (entry.quantization or "unknown").upper(),
    }


EMBED_DETAILS = {
    "parent_model": "",
    "format": "onnx",
    "family": "bert",
    "families": ["bert"],
    "parameter_size": "22.7M",
    "quantization_level": "",
}


def _expires_iso(ts: float) -> str:
    """An expiry as Ollama writes it; past year 9999 (a keep_alive of 1e16 s) it reads as forever."""
    if not math.isfinite(ts):
        return FOREVER_ISO
    try:
        return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        return FOREVER_ISO


# ----------------------------------------------------------------------------------------
# Generation handlers


async def handle_chat(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    return await _async_generate(request, body, parse_chat(body), chat=True)


async def handle_generate(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    return await _async_generate(request, body, parse_generate(body), chat=False)


async def _async_load_only(request: web.Request, req: OllamaRequest, *, chat: bool) -> web.Response:
    """Ollama's empty request: load the model (or unload it with keep_alive 0)."""
    ctx = request.app[CTX]
    if is_persona(req.model):
        if ctx.pipeline is None:
            raise NotFoundError("model '" + req.model + "' not found", param="model")
        model, reason = PERSONA_MODEL_ID, "load"
    else:
        if ctx.llm is None:
            raise UnavailableError("inference is not enabled on this daemon")
        manager = ctx.llm
        entry = await manager.async_resolve(req.model)
        model = entry.id
        if req.keep_alive_s == 0:
            await manager.async_unload(entry.id)
            reason = "unload"
        else:
            await manager.async_load(entry.id, keep_alive_s=req.keep_alive_s)
            reason = "load"
    out: dict[str, Any] = {"model": model, "created_at": now_iso(), "done": True, "done_reason": reason}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    return json_response(out)


async def _async_generate(request: web.Request, body: dict[str, Any], req: OllamaRequest, *, chat: bool) -> web.StreamResponse:
    if not req.messages and req.prompt is None:
        return await _async_load_only(request, req, chat=chat)
    forwarded = await async_forward(request, body, model=req.model, stream=req.stream)
    if forwarded is not None:
        return forwarded
    info = GenInfo(model=req.model)
    events = async_chat_events(
        request,
        model=req.model,
        messages=req.messages,
        spec=req.spec,
        keep_alive_s=req.keep_alive_s,
        info=info,
        stream=req.stream,
        raw_prompt=req.prompt,
        tools=req.tools,
    )
    guard = DisconnectGuard(request)
    try:
        async with guard:
            first = await async_first(events)
            if not req.stream:
                text, calls, final = await async_collect(first, events)
                out = _piece(info.model, text, chat=chat, done=True, calls=calls)
                out.update(done_fields(final, info, time.monotonic()))
                return json_response(out)
            return await _async_stream(request, info, first, events, chat=chat)
        return guard.response
    finally:
        await events.aclose()


def tool_call_object(call: ToolCall, index: int) -> dict[str, Any]:
    """Ollama's call shape: arguments as an object (Home Assistant iterates it)."""
    return {"id": call.id, "function": {"index": index, "name": call.name, "arguments": call.arguments}}


def _piece(model: str, text: str, *, chat: bool, done: bool, calls: Sequence[ToolCall] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "created_at": now_iso()}
    if chat:
        out["message"] = {"role": "assistant", "content": text}
        if calls:
            out["message"]["tool_calls"] = [tool_call_object(c, i) for i, c in enumerate(calls)]
    else:
        out["response"] = text
    out["done"] = done
    return out


async def _async_stream(
    request: web.Request, info: GenInfo, first: GenEvent, events: AsyncIterator[GenEvent], *, chat: bool
) -> web.StreamResponse:
    writer = StreamWriter(request, "ndjson")
    await writer.async_prepare()
    event = first
    n_calls = 0
    try:
        while True:
            if isinstance(event, ToolCallEvent):
                # each call arrives whole, in one line of its own
                line = _piece(info.model, "", chat=chat, done=False)
                line["message"]["tool_calls"] = [tool_call_object(event.call, n_calls)]
                n_calls += 1
                await writer.async_send(line)
            elif event.finish_reason is not None:
                if event.text:
                    await writer.async_send(_piece(info.model, event.text, chat=chat, done=False))
                last = _piece(info.model, "", chat=chat, done=True)
                last.update(done_fields(event, info, time.monotonic()))
                await writer.async_send(last)
                break
            elif event.text:
                await writer.async_send(_piece(info.model, event.text, chat=chat, done=False))
            event = await events.__anext__()
    except MongarsError as err:  # failed after the headers went out: say so in the stream
        await writer.async_send({"error": str(err)})
    return await writer.async_done()


# ----------------------------------------------------------------------------------------
# Embeddings


async def handle_embed(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    t0 = time.monotonic()
    body = await read_json(request)
    model = require_str(body, "model", max_len=MAX_MODEL_NAME_CHARS)
    texts = parse_embed_input(body.get("input"))
    truncate = get_bool(body, "truncate", default=True)
    parse_keep_alive(body.get("keep_alive"))
    embedder = embedder_of(ctx)
    if not truncate:
        counts = await embedder.async_count_tokens(texts)
        limit = embedder.max_seq_tokens
        for i, n in enumerate(counts):
            if n > limit:
                raise ValidationError(
                    "input[" + str(i) + "] has " + str(n) + " tokens; the model takes at most " + str(limit) + " (set truncate true)",
                    param="input",
                )
    was_loaded = embedder.loaded
    t_embed = time.monotonic()
    vectors, n_tokens = await async_embed_texts(ctx, model, texts)
    done = time.monotonic()
    return json_response(
        {
            "model": embedder.model_id,
            "embeddings": [[float(x) for x in row] for row in vectors],
            "total_duration": int((done - t0) * NS_PER_S),
            "load_duration": 0 if was_loaded else int((done - t_embed) * NS_PER_S),
            "prompt_eval_count": n_tokens,
        }
    )


async def handle_embeddings(request: web.Request) -> web.Response:
    """The legacy single-prompt route: {model, prompt} -> {embedding}."""
    ctx = request.app[CTX]
    body = await read_json(request)
    model = require_str(body, "model", max_len=MAX_MODEL_NAME_CHARS)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ValidationError("'prompt' must be a string", param="prompt")
    if not prompt:
        return json_response({"embedding": []})  # what Ollama answers for an empty prompt
    vectors, _ = await async_embed_texts(ctx, model, [prompt])
    return json_response({"embedding": [float(x) for x in vectors[0]]})


# ----------------------------------------------------------------------------------------
# Model information


async def _async_tag(entry: ModelEntry) -> dict[str, Any]:
    digest = entry.sha256 if entry.sha256_known else await asyncio.to_thread(lambda: entry.sha256)
    return {
        "name": entry.id,
        "model": entry.id,
        "modified_at": entry.modified_at.isoformat().replace("+00:00", "Z"),
        "size": entry.size,
        "digest": digest,
        "details": details_of(entry),
    }


async def handle_tags(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    models: list[dict[str, Any]] = []
    default_tag: dict[str, Any] | None = None
    if ctx.llm is not None:
        for entry in await ctx.llm.async_list_models():
            tag = await _async_tag(entry)
            models.append(tag)
            if entry.id == ctx.llm.default_model:
                default_tag = tag
    if ctx.pipeline is not None:
        # every id carries a tag: Open WebUI rewrites untagged ids to ":latest" (both are accepted)
        persona = dict(default_tag) if default_tag else {"size": 0, "digest": "", "details": {}}
        persona.update({"name": PERSONA_MODEL_ID + ":latest", "model": PERSONA_MODEL_ID + ":latest", "modified_at": now_iso()})
        models.append(persona)
    if ctx.embedder is not None:
        embedder = ctx.embedder
        try:
            size = (await asyncio.to_thread(embedder.model_path.stat)).st_size
        except OSError:
            size = 0
        models.append(
            {
                "name": embedder.model_id + ":latest",
                "model": embedder.model_id + ":latest",
                "modified_at": now_iso(),
                "size": size,
                "digest": await embedder.async_digest(),
                "details": EMBED_DETAILS,
            }
        )
    return json_response({"models": models})


async def handle_ps(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    out: list[dict[str, Any]] = []
    if ctx.llm is not None:
        for item in ctx.llm.loaded():
            entry = item.entry
            out.append(
                {
                    "name": entry.id,
                    "model": entry.id,
                    "size": int(item.size_mb * 2**20),
                    "digest": entry.sha256 if entry.sha256_known else "",
                    "details": details_of(entry),
                    "expires_at": _expires_iso(item.expires_at_wall),
                    "size_vram": 0,
                    "context_length": item.n_ctx,
                    # extension: what admission control sees now
                    "slots": {
                        "total": item.slots_total,
                        "busy": item.slots_busy,
                        "deferred": item.requests_deferred,
                        "active_requests": item.active,
                    },
                }
            )
    return json_response({"models": out})


async def handle_show(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await read_json(request)
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValidationError("'model' is required", param="model")
    verbose = get_bool(body, "verbose", default=False)
    if ctx.embedder is not None and name.strip().lower().split(":")[0] in (ctx.embedder.model_id, "all-minilm"):
        return json_response(
            {
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": EMBED_DETAILS,
                "model_info": {"general.architecture": "bert", "bert.embedding_length": ctx.embedder.dim},
                "capabilities": ["embedding"],
            }
        )
    if is_persona(name):
        if ctx.pipeline is None or ctx.llm is None:
            raise NotFoundError("model '" + name + "' not found", param="model")
        name = ctx.llm.default_model
        persona = True
    else:
        persona = False
    if ctx.llm is None:
        raise NotFoundError("model '" + name + "' not found", param="model")
    entry = await ctx.llm.async_resolve(name)
    try:
        info = await asyncio.to_thread(read_gguf, entry.path, read_tensors=False)
    except OSError as err:
        raise ModelError("cannot read model file " + str(entry.path) + ": " + str(err)) from err
    model_info: dict[str, Any] = {}
    for key, value in info.metadata.items():
        if key == "tokenizer.chat_template":
            continue
        if isinstance(value, ArrayInfo):
            model_info[key] = None  # a long array (e.g. the vocabulary) the header reader skipped
        elif isinstance(value, list):
            model_info[key] = value if verbose else None
        else:
            model_info[key] = value
    if entry.parameters:
        model_info["general.parameter_count"] = entry.parameters
    return json_response(
        {
            "license": str(info.metadata.get("general.license", "")),
            "modelfile": "# Modelfile generated by mongarsd\nFROM " + str(entry.path) + "\n",
            "parameters": "",
            "template": entry.chat_template or "",
            "details": details_of(entry),
            "model_info": model_info,
            "capabilities": ["completion", "tools"],
            "modified_at": entry.modified_at.isoformat().replace("+00:00", "Z"),
            **({"system": "mongars persona: the full cognition pipeline with your memory"} if persona else {}),
        }
    )


@public
async def handle_version(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    return json_response({"version": OLLAMA_COMPAT_VERSION, "mongarsd": ctx.version})


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/api/chat", handle_chat)
    app.router.add_post("/api/generate", handle_generate)
    app.router.add_post("/api/embed", handle_embed)
    app.router.add_post("/api/embeddings", handle_embeddings)
    app.router.add_get("/api/tags", handle_tags)
    app.router.add_get("/api/ps", handle_ps)
    app.router.add_post("/api/show", handle_show)
    app.router.add_get("/api/version", handle_version)
