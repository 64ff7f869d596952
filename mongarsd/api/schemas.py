"""The request and response models of every HTTP route, as JSON Schema 2020-12 (OpenAPI 3.1) dicts.

One table, ROUTE_MODELS, keyed by (METHOD, canonical path) exactly as the aiohttp router knows
each route (a regex parameter such as `{model:.+}` is `{model}`, the resource's `canonical`).
The OpenAPI document (api/openapi.py) is generated from it and from the real route table, and the
request validation middleware (api/validation.py) checks request bodies against the same models.

Request models are permissive where the handlers are: extra keys are allowed (clients send
them), null reads as absent wherever the handler reads it so, and the validation middleware only
checks the top-level shape (object, declared JSON types, required keys). The handlers still do
the detailed checks (ranges, nested shapes) and name the field when they refuse. A property in a
route's `lenient` set is documented with the type clients should send but not type-checked,
because its handler accepts more than that type today (e.g. `n: true` reads as 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from mongarsd.api.messages import MAX_MESSAGES
from mongarsd.cognition.personality import DEFAULT_STYLE, DEFAULT_TRAITS, MAX_NOTE_CHARS
from mongarsd.const import PERSONA_MODEL_ID
from mongarsd.inference.sampling import MAX_SEED, MAX_STOP_CHARS
from mongarsd.memory.hippocampus import MAX_MEMORY_CHARS, USER_MEMORY_KINDS
from mongarsd.memory.tokens import ROLES

JSON = dict[str, Any]
Tag = Literal["openai", "ollama", "native", "ops", "admin", "peers"]
Stream = Literal["sse", "ndjson"]

# Mirrors of the handlers' limits (tests/unit/test_openapi_models.py pins them to the handlers').
MAX_MODEL_NAME_CHARS: Final = 256  # api/openai.py and api/ollama.py
OPENAI_MAX_STOP: Final = 4  # api/openai.py
OLLAMA_MAX_STOP: Final = 16  # api/ollama.py
MAX_HISTORY_LIMIT: Final = 200  # api/native.py
MAX_SEARCH_K: Final = 50  # api/native.py
MAX_QUERY_CHARS: Final = 2000  # api/native.py
SESSION_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,99}$"  # cognition/pipeline.py SESSION_ID_RE

JSON_MEDIA: Final = "application/json"
SSE_MEDIA: Final = "text/event-stream"
NDJSON_MEDIA: Final = "application/x-ndjson"
TEXT_MEDIA: Final = "text/plain"
HTML_MEDIA: Final = "text/html"


# ------------------------------------------------------------------------------------------
# Building blocks (pure)


def t(*types: str, **keywords: Any) -> JSON:
    """A schema of one or more JSON types plus keywords."""
    return {"type": types[0] if len(types) == 1 else list(types), **keywords}


def obj(properties: Mapping[str, JSON], *required: str, **keywords: Any) -> JSON:
    """An object schema; extra properties stay allowed unless keywords say otherwise."""
    out: JSON = {"type": "object", "properties": dict(properties)}
    if required:
        out["required"] = list(required)
    out.update(keywords)
    return out


def arr(items: JSON, **keywords: Any) -> JSON:
    return {"type": "array", "items": items, **keywords}


def opt(schema: JSON) -> JSON:
    """Accept null as well (the handler reads null as absent)."""
    out = dict(schema)
    kind = out.get("type")
    if isinstance(kind, str):
        out["type"] = [kind, "null"]
    elif isinstance(kind, list) and "null" not in kind:
        out["type"] = [*kind, "null"]
    return out


def _num(lo: float | None = None, hi: float | None = None, *, integer: bool = False, description: str = "") -> JSON:
    out = t("integer" if integer else "number", "null")
    if lo is not None:
        out["minimum"] = lo
    if hi is not None:
        out["maximum"] = hi
    if description:
        out["description"] = description
    return out


@dataclass(frozen=True, slots=True)
class Param:
    """A query or path parameter."""

    name: str
    schema: JSON
    description: str
    required: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """One documented response: a description and its body per media type (None: any text)."""

    description: str
    content: Mapping[str, JSON | None] = field(default_factory=dict)
    headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteModel:
    """What one route accepts and answers.

    `errors` lists the error statuses the handler itself can answer; the OpenAPI builder adds
    the ones auth and rate limits can answer (401, 403, 429) from the handler's role, and gives
    every error the error envelope of the route's surface (api/errors.py).
    """

    summary: str
    tag: Tag
    responses: Mapping[int, Reply]
    request: JSON | None = None
    query: tuple[Param, ...] = ()
    path: tuple[Param, ...] = ()
    stream: Stream | None = None
    errors: tuple[int, ...] = ()
    lenient: frozenset[str] = frozenset()
    description: str = ""


def json_reply(description: str, schema: JSON) -> Reply:
    return Reply(description, {JSON_MEDIA: schema})


# ------------------------------------------------------------------------------------------
# Error envelopes (api/errors.py): one per surface

ERROR_SCHEMAS: Final[Mapping[str, JSON]] = {
    "openai": obj(
        {
            "error": obj(
                {
                    "message": t("string"),
                    "type": t("string", description="invalid_request_error, authentication_error, permission_error, ..."),
                    "param": t("string", "null", description="the offending field, when one is to blame"),
                    "code": t("string", "null", description="e.g. model_not_found, context_length_exceeded, rate_limit_exceeded"),
                },
                "message",
                "type",
                "param",
                "code",
            )
        },
        "error",
        title="OpenAIError",
    ),
    "ollama": obj({"error": t("string")}, "error", title="OllamaError"),
    "native": obj(
        {
            "error": obj(
                {
                    "code": t("string", description="bad_request, unauthorized, forbidden, not_found, ..."),
                    "message": t("string"),
                    "param": t("string", description="the offending field, when one is to blame"),
                },
                "code",
                "message",
            )
        },
        "error",
        title="NativeError",
    ),
}

ERROR_DESCRIPTIONS: Final[Mapping[int, str]] = {
    400: "Invalid request: the message names the field (`param`)",
    401: "Missing, malformed, invalid or revoked bearer token",
    403: "The token's role may not call this route",
    404: "Not found (the message says what: a model, a memory, a token, a peer)",
    408: "The request body did not arrive in time",
    409: "Conflict with the current state",
    413: "Request body, field or prompt too large",
    415: "A media type the route cannot read (a fetched page or file that is not text, HTML, Markdown or PDF)",
    422: "Valid JSON the server cannot act on (model cannot load, schema too complex)",
    429: "Rate limited or the model's queue is full; see Retry-After",
    502: "An upstream server (a social instance, a fetched site) refused the request or failed; the message says which and why",
    503: "A part of the daemon is unavailable, loading or busy; Retry-After when retrying helps",
    504: "An upstream server (a social instance, a fetched site) did not answer in time",
}
RETRY_STATUSES: Final = frozenset({429, 503})

# Error statuses by kind of route
BODY_ERRORS: Final = (400, 408, 413, 503)
GEN_ERRORS: Final = (400, 404, 408, 413, 422, 429, 503)
STORE_ERRORS: Final = (503,)


# ------------------------------------------------------------------------------------------
# Shared request pieces

MODEL = t("string", minLength=1, maxLength=MAX_MODEL_NAME_CHARS, description="a model id (see /v1/models or /api/tags)")
TEXT_PART = obj({"type": {"const": "text"}, "text": t("string")}, "type", "text")
CONTENT = {
    "anyOf": [t("string"), arr({"anyOf": [t("string"), TEXT_PART]})],
    "description": "text, or a list of text parts (joined with newlines)",
}
OPENAI_TOOL_CALL = obj(
    {
        "id": t("string"),
        "type": {"const": "function"},
        "function": obj({"name": t("string"), "arguments": t("string", description="the arguments as a JSON text")}, "name", "arguments"),
    },
    "id",
    "type",
    "function",
)
HISTORY_CALL = obj(
    {
        "id": t("string", maxLength=128, description="default call_<index>"),
        "type": {"const": "function"},
        "function": obj(
            {
                "name": t("string", minLength=1, maxLength=128),
                "arguments": {"type": ["string", "object", "null"], "description": "an object, or a JSON text of one"},
            },
            "name",
        ),
    },
    "function",
    title="ToolCall",
    description="a call the assistant made earlier in the conversation",
)
FUNCTION = obj(
    {
        "name": t("string", pattern=r"^[A-Za-z0-9_.-]{1,64}$"),
        "description": t("string", "null", maxLength=4096),
        "parameters": t("object", "null", description="a JSON Schema of the arguments (default: an object without properties)"),
        "strict": t("boolean", "null"),
    },
    "name",
    title="Function",
)
TOOL = obj(
    {"type": {"const": "function", "description": "default function"}, "function": FUNCTION},
    "function",
    title="Tool",
)
OPENAI_MESSAGE = {
    "title": "ChatMessage",
    "anyOf": [
        obj({"role": {"enum": ["system", "developer", "user"]}, "content": CONTENT, "name": t("string")}, "role", "content"),
        obj(
            {
                "role": {"const": "assistant"},
                "content": {"anyOf": [CONTENT, t("null")], "description": "null when the turn only called tools"},
                "tool_calls": arr(HISTORY_CALL, maxItems=64),
                "name": t("string"),
            },
            "role",
        ),
        obj(
            {
                "role": {"enum": ["tool", "function"], "description": "function: the legacy name of tool"},
                "content": {"anyOf": [CONTENT, t("null")]},
                "tool_call_id": t("string", maxLength=128, description="the id of the call this message answers"),
                "name": t("string", maxLength=128, description="the tool's name (default: the name of the call answered)"),
            },
            "role",
        ),
    ],
}
OLLAMA_TOOL_CALL = obj(
    {
        "id": t("string"),
        "function": obj(
            {"index": t("integer"), "name": t("string"), "arguments": t("object", description="the arguments as an object")},
            "name",
            "arguments",
        ),
    },
    "function",
)
OLLAMA_MESSAGE = obj(
    {
        "role": {"enum": ["system", "user", "assistant", "tool"]},
        "content": {"anyOf": [CONTENT, t("null")], "description": "null or absent for assistant turns that only called tools"},
        "images": t("array", "null", maxItems=0, description="not supported: must be absent or empty"),
        "tool_calls": arr(HISTORY_CALL, maxItems=64, description="assistant turns that called tools"),
        "tool_name": t("string", maxLength=128, description="tool messages: the tool that produced this result"),
        "tool_call_id": t("string", maxLength=128),
    },
    "role",
    title="OllamaMessage",
)


def stop_schema(max_items: int, max_chars: int = MAX_STOP_CHARS) -> JSON:
    """Stop sequences: one string or a list of non-empty strings."""
    one = t("string", minLength=1, maxLength=max_chars)
    return {"anyOf": [one, arr(one, maxItems=max_items), t("null")], "type": ["string", "array", "null"], "description": "stop sequences"}


STOP = stop_schema(OPENAI_MAX_STOP)
SEED = _num(integer=True, hi=MAX_SEED, description="a seed for reproducible sampling; negative means random")
SAMPLING: Final[Mapping[str, JSON]] = {
    "temperature": _num(0.0, 2.0),
    "top_p": _num(0.0, 1.0),
    "top_k": _num(0, 1_000_000, integer=True),
    "min_p": _num(0.0, 1.0),
    "repeat_penalty": _num(0.01, 10.0),
    "presence_penalty": _num(-2.0, 2.0),
    "frequency_penalty": _num(-2.0, 2.0),
    "seed": SEED,
    "stop": STOP,
}
RESPONSE_FORMAT = opt(
    obj(
        {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": obj({"name": t("string"), "schema": t("object"), "strict": t("boolean")}, "schema"),
        },
        "type",
        description="json_object: any JSON object; json_schema: a reply that matches json_schema.schema (grammar-constrained)",
    )
)
STREAM_OPTIONS = opt(obj({"include_usage": t("boolean", "null")}, description="with stream: include_usage adds a last chunk with usage"))
UNSUPPORTED_OPENAI: Final[Mapping[str, JSON]] = {
    "n": {"const": 1, "description": "must be 1 (one choice per request)"},
    "best_of": {"const": 1, "description": "must be 1"},
    "logprobs": {"const": False, "description": "not supported: absent or false"},
    "top_logprobs": {"const": 0, "description": "not supported: absent or 0"},
    "logit_bias": t("object", "null", maxProperties=0, description="not supported: absent or empty"),
    "audio": t("null", description="audio output is not supported"),
    "modalities": t("array", "null", items={"const": "text"}, description='only ["text"]'),
}
OPENAI_COMMON: Final[Mapping[str, JSON]] = {
    "model": MODEL,
    "stream": t("boolean", "null", description="stream server-sent events (default false)"),
    "stream_options": STREAM_OPTIONS,
}
MAX_TOKENS: Final[Mapping[str, JSON]] = {
    "max_completion_tokens": _num(1, integer=True, description="reply length cap in tokens (wins over max_tokens)"),
    "max_tokens": _num(1, integer=True, description="reply length cap in tokens (default inference.max_tokens_default)"),
}
# n: true reads as 1; logprobs: 0 as false; tool_choice is read only beside tools, the legacy
# functions and function_call only without them
OPENAI_LENIENT: Final = frozenset({"n", "best_of", "logprobs", "top_logprobs"})
OPENAI_CHAT_LENIENT: Final = OPENAI_LENIENT | {"tool_choice", "functions", "function_call"}

OPENAI_CHAT_REQUEST = obj(
    {  # in the order the handler reads them, so the validator's first complaint is the handler's
        **OPENAI_COMMON,
        "messages": arr(OPENAI_MESSAGE, minItems=1, maxItems=MAX_MESSAGES),
        **MAX_TOKENS,
        **UNSUPPORTED_OPENAI,
        "response_format": RESPONSE_FORMAT,
        **SAMPLING,
        "tools": opt(arr(TOOL, description="functions the model may call; calls are returned to the client, never run")),
        "tool_choice": {
            "anyOf": [
                {"enum": ["auto", "none", "required"]},
                obj({"type": {"const": "function"}, "function": obj({"name": t("string")}, "name")}, "type", "function"),
                t("null"),
            ],
            "type": ["string", "object", "null"],
            "description": "used when tools are given (default auto)",
        },
        "functions": opt(arr(FUNCTION, description="legacy function calling (used when tools is absent)")),
        "function_call": {
            "anyOf": [{"enum": ["auto", "none"]}, obj({"name": t("string")}, "name"), t("null")],
            "type": ["string", "object", "null"],
            "description": "legacy tool_choice",
        },
        "parallel_tool_calls": t("boolean", "null", description="default true"),
    },
    "model",
    "messages",
    title="ChatCompletionRequest",
)
OPENAI_COMPLETION_REQUEST = obj(
    {
        **OPENAI_COMMON,
        "prompt": {
            "anyOf": [t("string", minLength=1), arr(t("string", minLength=1), minItems=1, maxItems=1)],
            "type": ["string", "array"],
            "description": "one prompt (a list of exactly one string is accepted)",
        },
        "echo": {"const": False, "description": "not supported: absent or false"},
        "suffix": t("string", "null", maxLength=0, description="fill-in-the-middle is not supported"),
        **MAX_TOKENS,
        **UNSUPPORTED_OPENAI,
        "response_format": RESPONSE_FORMAT,
        **SAMPLING,
    },
    "model",
    "prompt",
    title="CompletionRequest",
)
EMBED_INPUT = {
    "anyOf": [t("string"), arr(t("string"), minItems=1)],
    "type": ["string", "array"],
    "description": "a text or a non-empty list of texts (token ids are not supported)",
}
OPENAI_EMBED_REQUEST = obj(
    {
        "model": MODEL,
        "input": EMBED_INPUT,
        "encoding_format": t("string", "null", enum=["float", "base64", None]),
        "dimensions": _num(1, integer=True, description="must equal the model's dimension when given"),
    },
    "model",
    "input",
    title="EmbeddingRequest",
)

KEEP_ALIVE = {
    "type": ["number", "string", "null"],
    "description": 'how long the model stays loaded: seconds, or a duration like "5m"; 0 unloads, negative keeps it forever',
}
OLLAMA_OPTIONS = opt(
    obj(
        {
            "num_predict": _num(-2, integer=True, description="reply length cap; -1 or -2: until the context is full"),
            **{k: v for k, v in SAMPLING.items() if k != "stop"},
            "repeat_last_n": _num(-1, 4096, integer=True),
            "num_ctx": _num(1, integer=True),
            "stop": stop_schema(OLLAMA_MAX_STOP),
        },
        description="sampling options; runner options (num_thread, num_gpu, ...) are accepted and ignored",
    )
)
OLLAMA_FORMAT = {
    "anyOf": [{"enum": ["", "json"]}, t("object", description="a JSON Schema the reply must match"), t("null")],
    "type": ["string", "object", "null"],
}
OLLAMA_COMMON: Final[Mapping[str, JSON]] = {
    "model": MODEL,
    "stream": t("boolean", "null", description="stream NDJSON (default true)"),
    "keep_alive": KEEP_ALIVE,
    "think": {"type": ["boolean", "null"], "enum": [False, None], "description": "thinking is not supported: absent or false"},
}
OLLAMA_CHAT_REQUEST = obj(
    {
        **OLLAMA_COMMON,
        "messages": opt(arr(OLLAMA_MESSAGE, maxItems=MAX_MESSAGES, description="absent or empty: load (or unload) the model only")),
        "options": OLLAMA_OPTIONS,
        "format": OLLAMA_FORMAT,
        "tools": opt(arr(TOOL, description="functions the model may call; calls are returned to the client, never run")),
    },
    "model",
    title="OllamaChatRequest",
)
OLLAMA_GENERATE_REQUEST = obj(
    {
        **OLLAMA_COMMON,
        "prompt": t("string", "null", description="absent or empty: load (or unload) the model only"),
        "system": t("string", "null"),
        "raw": t("boolean", "null", description="send the prompt as is, without the chat template"),
        "images": t("array", "null", maxItems=0, description="not supported"),
        "suffix": t("string", "null", maxLength=0, description="not supported"),
        "template": t("string", "null", maxLength=0, description="not supported: the model's own template is used"),
        "context": t("array", "null", maxItems=0, description="not supported: use /api/chat with messages"),
        "options": OLLAMA_OPTIONS,
        "format": OLLAMA_FORMAT,
    },
    "model",
    title="OllamaGenerateRequest",
)
# refused only when truthy (or, for think, not false): false, 0 and "" read as absent
OLLAMA_CHAT_LENIENT: Final = frozenset({"think"})
OLLAMA_GENERATE_LENIENT: Final = OLLAMA_CHAT_LENIENT | {"images", "suffix", "template", "context"}
OLLAMA_EMBED_REQUEST = obj(
    {"model": MODEL, "input": EMBED_INPUT, "truncate": t("boolean", "null"), "keep_alive": KEEP_ALIVE}, "model", "input"
)
OLLAMA_EMBEDDINGS_REQUEST = obj({"model": MODEL, "prompt": t("string", description="empty: an empty embedding")}, "model", "prompt")
OLLAMA_SHOW_REQUEST = {
    **obj({"model": MODEL, "name": {**MODEL, "description": "older clients' name for model"}, "verbose": t("boolean", "null")}),
    "anyOf": [{"required": ["model"]}, {"required": ["name"]}],
}

NATIVE_CHAT_REQUEST = obj(
    {
        "message": t("string", minLength=1, description="the user's message"),
        "session_id": opt(t("string", pattern=SESSION_ID_PATTERN, description="absent: a new session")),
        "model": opt(MODEL),
        "stream": t("boolean", "null", description="stream NDJSON (default false)"),
        "stop": stop_schema(8, 64),
        "max_tokens": _num(1, 32768, integer=True),
        "temperature": _num(0.0, 2.0),
        "top_p": _num(0.0, 1.0),
        "min_p": _num(0.0, 1.0),
        "repeat_penalty": _num(0.01, 5.0),
        "top_k": _num(0, 1000, integer=True),
        "seed": _num(0, MAX_SEED, integer=True),
        "speak": t("boolean", "null", description="also return the answer spoken, as WAV audio (default false)"),
    },
    "message",
    title="ConversationChatRequest",
)
MEMORY_REQUEST = obj(
    {
        "text": t("string", minLength=1, maxLength=MAX_MEMORY_CHARS),
        "importance": _num(0.0, 1.0, description="default 0.5"),
        "kind": t("string", "null", enum=[*USER_MEMORY_KINDS, None], description="default fact"),
        "ttl_s": _num(1.0, 10 * 365 * 86400.0, description="forget after this many seconds"),
        "provenance": t("string", "null", maxLength=500),
    },
    "text",
    title="MemoryCreate",
)
UNIT_SCORES = {"type": "number", "minimum": 0.0, "maximum": 1.0}
PROFILE_EDIT = obj(
    {
        "traits": opt(obj(dict.fromkeys(DEFAULT_TRAITS, UNIT_SCORES), additionalProperties=False)),
        "interaction_style": opt(obj(dict.fromkeys(DEFAULT_STYLE, UNIT_SCORES), additionalProperties=False)),
        "note": t("string", "null", maxLength=MAX_NOTE_CHARS, description="how the user wants answers, in their words"),
    },
    additionalProperties=False,
    title="ProfileEdit",
)
FEEDBACK_REQUEST = obj(
    {
        "rating": {"anyOf": [{"enum": [-1, 0, 1]}, {"enum": ["up", "down"]}], "type": ["integer", "string"]},
        "message_id": _num(1, 2**62, integer=True, description="the assistant message rated"),
        "comment": t("string", "null", maxLength=2000),
    },
    "rating",
    title="Feedback",
)
TOKEN_REQUEST = obj(
    {
        "user": t("string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"),
        "role": t("string", "null", enum=[*ROLES, None], description="default user"),
        "label": t("string", "null", maxLength=200),
    },
    "user",
    title="TokenCreate",
)
PEER_URL_REQUEST = obj({"url": t("string", minLength=1, description="http(s)://host:port of the peer's API")}, "url")
PEER_MESSAGE_REQUEST = obj({"message": {"description": "any non-empty JSON value (the whole body is at most 4 KiB)"}}, "message")


# ------------------------------------------------------------------------------------------
# Response shapes

INT = t("integer")
NUM = t("number")
STR = t("string")
BOOL = t("boolean")
USAGE = obj(
    {
        "prompt_tokens": INT,
        "completion_tokens": INT,
        "total_tokens": INT,
        "prompt_tokens_details": obj({"cached_tokens": INT}),
    },
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
)
TIMINGS = opt(
    obj(
        {k: NUM for k in ("prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second")},
        description="llama-server's timings (an extension)",
    )
)
FINISH = {"enum": ["stop", "length", "tool_calls"]}
CHAT_COMPLETION = obj(
    {
        "id": STR,
        "object": {"const": "chat.completion"},
        "created": INT,
        "model": STR,
        "choices": arr(
            obj(
                {
                    "index": INT,
                    "message": obj(
                        {"role": {"const": "assistant"}, "content": t("string", "null"), "tool_calls": arr(OPENAI_TOOL_CALL)},
                        "role",
                        "content",
                    ),
                    "logprobs": t("null"),
                    "finish_reason": FINISH,
                },
                "index",
                "message",
                "finish_reason",
            ),
            minItems=1,
        ),
        "usage": USAGE,
        "system_fingerprint": STR,
        "timings": TIMINGS,
    },
    "id",
    "object",
    "created",
    "model",
    "choices",
    "usage",
    title="ChatCompletion",
)
CHAT_CHUNK = obj(
    {
        "id": STR,
        "object": {"const": "chat.completion.chunk"},
        "created": INT,
        "model": STR,
        "choices": arr(
            obj(
                {
                    "index": INT,
                    "delta": obj(
                        {
                            "role": {"const": "assistant"},
                            "content": t("string", "null"),
                            "tool_calls": arr(
                                obj({"index": INT, "id": STR, "type": {"const": "function"}, "function": t("object")}, "index"),
                                description="a call's first delta has id, type and name; the next one its arguments",
                            ),
                        }
                    ),
                    "finish_reason": opt(FINISH),
                }
            )
        ),
        "usage": opt(USAGE),
    },
    title="ChatCompletionChunk",
    description="one `data:` event; the stream ends with `data: [DONE]`; a failure after the first event is an `error` event",
)
TEXT_COMPLETION = obj(
    {
        "id": STR,
        "object": {"const": "text_completion"},
        "created": INT,
        "model": STR,
        "choices": arr(obj({"index": INT, "text": STR, "logprobs": t("null"), "finish_reason": FINISH}, "index", "text", "finish_reason")),
        "usage": USAGE,
        "system_fingerprint": STR,
        "timings": TIMINGS,
    },
    "id",
    "object",
    "created",
    "model",
    "choices",
    "usage",
    title="TextCompletion",
)
EMBEDDING_LIST = obj(
    {
        "object": {"const": "list"},
        "data": arr(
            obj(
                {
                    "object": {"const": "embedding"},
                    "index": INT,
                    "embedding": {"anyOf": [arr(NUM), STR], "description": "floats, or base64 little-endian float32"},
                },
                "object",
                "index",
                "embedding",
            )
        ),
        "model": STR,
        "usage": obj({"prompt_tokens": INT, "total_tokens": INT}, "prompt_tokens", "total_tokens"),
    },
    "object",
    "data",
    "model",
    "usage",
    title="EmbeddingList",
)
MODEL_OBJECT = obj(
    {"id": STR, "object": {"const": "model"}, "created": INT, "owned_by": STR}, "id", "object", "created", "owned_by", title="Model"
)
MODEL_LIST = obj({"object": {"const": "list"}, "data": arr(MODEL_OBJECT)}, "object", "data", title="ModelList")

OLLAMA_DETAILS = obj(
    {
        "parent_model": STR,
        "format": STR,
        "family": STR,
        "families": arr(STR),
        "parameter_size": STR,
        "quantization_level": STR,
    }
)
DONE_FIELDS: Final[Mapping[str, JSON]] = {
    "done_reason": t("string", description="stop, length; load or unload for a load-only request"),
    "total_duration": t("integer", description="nanoseconds"),
    "load_duration": INT,
    "prompt_eval_count": INT,
    "prompt_eval_duration": INT,
    "eval_count": INT,
    "eval_duration": INT,
}
OLLAMA_CHAT_PIECE = obj(
    {
        "model": STR,
        "created_at": t("string", description="RFC 3339 time"),
        "message": obj(
            {"role": {"const": "assistant"}, "content": STR, "tool_calls": arr(OLLAMA_TOOL_CALL)},
            "role",
            "content",
        ),
        "done": BOOL,
        **DONE_FIELDS,
    },
    "model",
    "created_at",
    "message",
    "done",
    title="OllamaChatResponse",
)
OLLAMA_GENERATE_PIECE = obj(
    {"model": STR, "created_at": STR, "response": STR, "done": BOOL, **DONE_FIELDS},
    "model",
    "created_at",
    "response",
    "done",
    title="OllamaGenerateResponse",
)
OLLAMA_TAG = obj(
    {"name": STR, "model": STR, "modified_at": STR, "size": INT, "digest": STR, "details": OLLAMA_DETAILS},
    "name",
    "model",
    "modified_at",
    "size",
    "digest",
    "details",
)
OLLAMA_RUNNING = obj(
    {
        "name": STR,
        "model": STR,
        "size": INT,
        "digest": STR,
        "details": OLLAMA_DETAILS,
        "expires_at": STR,
        "size_vram": INT,
        "context_length": INT,
        "slots": obj({"total": INT, "busy": INT, "deferred": INT, "active_requests": INT}, description="extension: admission control"),
    },
    "name",
    "model",
    "size",
    "digest",
    "details",
    "expires_at",
)
OLLAMA_SHOW = obj(
    {
        "license": STR,
        "modelfile": STR,
        "parameters": STR,
        "template": STR,
        "details": OLLAMA_DETAILS,
        "model_info": t("object"),
        "capabilities": arr(STR),
        "modified_at": STR,
        "system": STR,
    },
    "modelfile",
    "parameters",
    "template",
    "details",
    "model_info",
    "capabilities",
)

MEMORY_PROPS: Final[Mapping[str, JSON]] = {
    "id": INT,
    "text": STR,
    "importance": NUM,
    "kind": STR,
    "source": STR,
    "created_at": t("number", description="Unix time"),
    "expires_at": t("number", "null"),
    "provenance": t("string", "null"),
    "session_id": t("string", "null"),
    "message_id": t("integer", "null"),
    "embedded": BOOL,
    "document_id": t("integer", "null", description="the ingested document this memory is a part of"),
}
MEMORY = obj(MEMORY_PROPS, *MEMORY_PROPS, title="Memory")
RECALL_HIT = obj(
    {
        **MEMORY_PROPS,
        "score": NUM,
        "similarity": t("number", "null"),
        "vector_rank": t("integer", "null"),
        "text_rank": t("integer", "null"),
    },
    *MEMORY_PROPS,
    "score",
)
HISTORY_MESSAGE = obj(
    {
        "id": INT,
        "session_id": STR,
        "role": STR,
        "content": STR,
        "created_at": NUM,
        "model": t("string", "null"),
        "tokens": t("integer", "null"),
        "tool_calls": arr(t("object"), description="assistant turns that called tools: [{id, name, arguments}]"),
        "tool_call_id": t("string", description="tool turns: the call this result answers"),
        "tool_name": STR,
    },
    "id",
    "session_id",
    "role",
    "content",
    "created_at",
)
CHAT_RESULT_PROPS: Final[Mapping[str, JSON]] = {
    "response": STR,
    "session_id": STR,
    "message_id": INT,
    "user_message_id": INT,
    "processing_time_ms": NUM,
    "memories_used": arr(t("object")),
    "model": STR,
    "finish_reason": STR,
    "usage": t("object", additionalProperties=INT),
    "degraded": arr(STR, description="optional stages that were skipped (recall, profile update, ...)"),
    "timings_ms": t("object", additionalProperties=NUM),
}
CHAT_RESULT_EXTRAS: Final[Mapping[str, JSON]] = {
    "tool_calls": arr(t("object"), description="calls to the client's tools (none on this route)"),
    "hands_used": arr(t("object"), description="the persona's own tools (Mains Virtuelles) run for this answer"),
    "sources": arr(
        obj({"source": STR, "title": STR, "kind": {"enum": ["document", "research"]}, "fetched_at": NUM}, "source", "title", "kind"),
        description="ingested documents and research the answer drew on (also named at the end of the answer)",
    ),
    "energy": t("object", "null", description="this turn's joules, joules per token and their source (rapl, ina3221, pmic, cpu-model)"),
    "research": t(
        "object",
        "null",
        description="research the Curiosity Engine started for a knowledge gap in this turn: {id, query, status}",
    ),
    "audio": obj(
        {
            "format": {"const": "wav"},
            "sample_rate": INT,
            "language": STR,
            "data": t("string", "null", description="base64 WAV; null when speech failed"),
            "error": STR,
        },
        "format",
        "data",
        description="the answer spoken (only when the request said speak: true)",
    ),
}
CHAT_RESULT = obj({**CHAT_RESULT_PROPS, **CHAT_RESULT_EXTRAS}, *CHAT_RESULT_PROPS, title="ConversationReply")
NATIVE_CHAT_LINE = {
    "title": "ConversationStreamLine",
    "anyOf": [
        obj({"delta": STR, "done": {"const": False}}, "delta", "done"),
        obj({**CHAT_RESULT_PROPS, **CHAT_RESULT_EXTRAS, "done": {"const": True}}, *CHAT_RESULT_PROPS, "done"),
        obj({"error": obj({"code": STR, "message": STR}, "code", "message"), "done": {"const": True}}, "error", "done"),
    ],
}
SCORES = t("object", additionalProperties=NUM)
PROFILE = obj(
    {
        "user": STR,
        "style": t("object", description="moving averages of the user's own messages"),
        "language": t("string", "null"),
        "personality": obj(
            {
                "traits": SCORES,
                "interaction_style": SCORES,
                "confidence": NUM,
                "observations": INT,
                "feedback": INT,
                "note": STR,
                "version": INT,
            },
            "traits",
            "interaction_style",
            "note",
        ),
        "directives": arr(STR),
        "updated_at": t("number", "null"),
    },
    "user",
    "style",
    "language",
    "personality",
    "directives",
    "updated_at",
    title="Profile",
)
TOKEN_PROPS: Final[Mapping[str, JSON]] = {
    "id": STR,
    "user": STR,
    "role": {"enum": list(ROLES)},
    "label": STR,
    "created_at": NUM,
    "last_used_at": t("number", "null"),
    "revoked": BOOL,
}
TOKEN_INFO = obj(TOKEN_PROPS, *TOKEN_PROPS, title="TokenInfo")
LOAD = obj(
    {
        "scheduler_id": t("string", "null"),
        "queue_depth": INT,
        "active_workers": INT,
        "concurrency": INT,
        "load_factor": NUM,
        "slots_total": INT,
        "slots_free": INT,
        "tokens_per_s": NUM,
        "models_loaded": arr(STR),
    },
    "queue_depth",
    "slots_total",
    "slots_free",
    title="NodeLoad",
)
STATUS = obj(
    {
        "name": {"const": "mongarsd"},
        "version": STR,
        "ready": BOOL,
        "uptime_s": NUM,
        "board": t("object"),
        "profile": STR,
        "services": t("object", additionalProperties=STR),
        "you": obj({"user": STR, "role": STR}, "user", "role"),
        "process": obj(
            {
                "rss_mb": NUM,
                "threads": INT,
                "service_manager": t("string", "null", description="systemd when the daemon runs as a systemd service"),
                "watchdog_s": t("number", "null", description="the service manager's watchdog period"),
            }
        ),
        "event_loop_lag": t("object"),
        "inflight_requests": INT,
        "unclean_exits": INT,
        "energy": t(
            "object",
            "null",
            description="energy source (rapl, ina3221, pmic or cpu-model), joules so far, last joules per token, temperature, throttling",
        ),
    },
    "name",
    "version",
    "ready",
    "uptime_s",
    "services",
    "you",
    title="Status",
)
READY = obj({"ready": BOOL, "services": t("object", additionalProperties=STR)}, "ready", "services", title="Readiness")


# ------------------------------------------------------------------------------------------
# The table

GEN_STREAM_NOTE = (
    "With stream true the reply is a stream; errors before the first byte are plain HTTP errors, "
    "a failure after it is the stream's last event, an `error` object in the surface's shape."
)


def _stream_reply(description: str, json_schema: JSON, media: str, item: JSON) -> Reply:
    """A 200 that is JSON, or a stream of items (SSE events or NDJSON lines) when the request asks for one."""
    return Reply(description, {JSON_MEDIA: json_schema, media: {"type": "string", "x-stream-item": item}})


MODEL_PARAM = Param("model", t("string", minLength=1), "a model id (may contain '/' and ':')", required=True)
MEMORY_ID_PARAM = Param("memory_id", t("integer", minimum=0, maximum=10**18 - 1), "a memory id", required=True)
TOKEN_ID_PARAM = Param("token_id", t("string", minLength=1), "a token id (not the secret)", required=True)
LIMIT = Param("limit", t("integer", minimum=1, maximum=MAX_HISTORY_LIMIT, default=50), "how many, newest first")


# Bouche's voice (api/speech.py)
OPENAI_SPEECH_REQUEST = obj(
    {
        "model": t(
            "string",
            minLength=1,
            maxLength=256,
            description="tts-1, tts-1-hd, gpt-4o-mini-tts, espeak-ng or any name; echoed in X-Speech-Model",
        ),
        "input": t("string", minLength=1, maxLength=4096, description="text to speak (voice.max_input_chars); markdown is stripped"),
        "voice": {
            "type": ["string", "object"],
            "description": "alloy, ash, ballad, coral, echo, fable, nova, onyx, sage, shimmer, verse; an espeak-ng voice "
            "('en-us', 'fr-fr+m3'); or {\"id\": name}",
        },
        "response_format": t("string", "null", enum=["wav", "pcm", None], description="default wav; mp3/opus/aac/flac refused (400)"),
        "speed": _num(0.25, 4.0, description="1.0 is about 175 words per minute"),
        "instructions": t("string", "null", description="accepted and ignored"),
        "stream_format": t("string", "null", enum=["audio", None]),
        "language": t(
            "string",
            "null",
            maxLength=35,
            description="en, fr, fr-FR; default: the text's language, else the caller's usual one, else English",
        ),
    },
    "model",
    "input",
    "voice",
    title="SpeechRequest",
)

# Iris ingestion (api/ingest.py) and the Curiosity Engine (api/curiosity.py)
INGEST_RESULT = obj(
    {
        "document_id": INT,
        "source": STR,
        "title": STR,
        "chunks": INT,
        "bytes": INT,
        "duplicate": BOOL,
        "error": t("string", description="set for a file of a folder that could not be ingested"),
    },
    "document_id",
    "source",
    "title",
    "chunks",
    "bytes",
    "duplicate",
    title="IngestResult",
)
INGEST_REQUEST = obj(
    {
        "url": t("string", maxLength=2048, description="a page Iris may fetch (iris.urls allowlist)"),
        "path": t("string", maxLength=4096, description="a file or folder on the daemon's host (admins only)"),
        "text": t("string", minLength=1, description="the document itself"),
        "data": t("string", minLength=1, description="a file's bytes in base64 (txt, md, html or pdf: say which in content_type)"),
        "title": t("string", maxLength=300),
        "source": t("string", maxLength=2048, description="where the text comes from (named in answers)"),
        "content_type": t(
            "string",
            enum=["text/plain", "text/markdown", "text/html", "application/pdf"],
            description="of text (default text/plain) or data (required; pdf only with data)",
        ),
        "shared": t("boolean", "null", description="admins: a document every user's recall sees"),
        "user": t("string", description="admins: store it for this user"),
    },
    title="IngestRequest",
    description="exactly one of url, path, text or data",
)
DOCUMENT = obj(
    {
        "id": INT,
        "owner": STR,
        "source": STR,
        "title": STR,
        "fingerprint": STR,
        "content_type": STR,
        "bytes": INT,
        "chunks": INT,
        "fetched_at": NUM,
        "shared": BOOL,
    },
    "id",
    "owner",
    "source",
    "title",
    "chunks",
    title="Document",
)
INGEST_SCOPE = (
    Param("shared", t("string", enum=["true", "false", "1", "0", "yes", "no"]), "admins: the shared documents"),
    Param("user", t("string"), "admins: this user's documents"),
)
RESEARCH = obj(
    {
        "id": INT,
        "query": STR,
        "topics": arr(STR),
        "status": {"enum": ["open", "running", "done", "nothing_found", "failed"]},
        "reason": STR,
        "sources": arr(t("object")),
        "memories": INT,
        "created_at": STR,
        "finished_at": t("string", "null"),
    },
    "id",
    "query",
    "status",
    title="Research",
)

SOCIAL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"  # social/vault.py NAME_RE
SOCIAL_ACCOUNT_PROPS: Final[Mapping[str, JSON]] = {
    "name": t("string", pattern=SOCIAL_NAME_PATTERN),
    "instance": t("string", description="the instance's base URL (normalised)"),
    "created_at": NUM,
    "max_chars": INT,
}
SOCIAL_ACCOUNT = obj(SOCIAL_ACCOUNT_PROPS, *SOCIAL_ACCOUNT_PROPS, title="SocialAccount")
SOCIAL_ACCOUNT_REQUEST = obj(
    {
        "name": t("string", pattern=SOCIAL_NAME_PATTERN),
        "instance": t("string", minLength=1, maxLength=2048, description="https://host[:port][/path]; no user info, query or fragment"),
        "token": t("string", minLength=1, maxLength=1024, description="the account's access token; stored sealed, never returned"),
        "max_chars": t("integer", "null", minimum=1, maximum=100000, description="longest status the instance accepts (default 500)"),
        "replace": t("boolean", "null", description="replace an account of the same name (default false: 409)"),
    },
    "name",
    "instance",
    "token",
    title="SocialAccountCreate",
)
SOCIAL_POST_REQUEST = obj(
    {
        "account": t("string", pattern=SOCIAL_NAME_PATTERN),
        "status": t("string", minLength=1, description="the text; at most the account's max_chars (with spoiler_text)"),
        "visibility": t("string", "null", enum=["public", "unlisted", "private", "direct", None], description="default public"),
        "spoiler_text": t("string", "null", maxLength=1000),
        "language": t("string", "null", pattern=r"^[a-z]{2,3}$"),
        "idempotency_key": t("string", "null", minLength=1, maxLength=128, description="or the Idempotency-Key header; default: a new key"),
    },
    "account",
    "status",
    title="SocialPost",
)
SOCIAL_POST_RESULT = obj(
    {"account": STR, "id": STR, "url": t("string", "null"), "created_at": t("string", "null"), "idempotency_key": STR, "replayed": BOOL},
    "account",
    "id",
    "url",
    "created_at",
    "idempotency_key",
    "replayed",
    title="SocialPostResult",
)
SOCIAL_NAME_PARAM = Param("name", t("string", pattern=SOCIAL_NAME_PATTERN), "a social account name", required=True)


ROUTE_MODELS: Final[Mapping[tuple[str, str], RouteModel]] = {
    # ops
    ("GET", "/"): RouteModel("Say the daemon is running", "ops", {200: Reply("A line of text", {TEXT_MEDIA: None})}),
    ("GET", "/health"): RouteModel("Liveness", "ops", {200: json_reply("Alive", obj({"status": {"const": "ok"}}, "status"))}),
    ("GET", "/ready"): RouteModel(
        "Readiness: 503 until every service has started",
        "ops",
        {200: json_reply("Ready", READY), 503: Reply("Not ready yet", {JSON_MEDIA: READY}, headers=("Retry-After",))},
    ),
    ("GET", "/metrics"): RouteModel(
        "Prometheus metrics", "ops", {200: Reply("Prometheus text exposition format 0.0.4", {TEXT_MEDIA: None})}
    ),
    ("GET", "/api/v1/status"): RouteModel(
        "Daemon status: version, board, services, process, who you are", "ops", {200: json_reply("Status", STATUS)}
    ),
    ("GET", "/openapi.json"): RouteModel("This OpenAPI document", "ops", {200: json_reply("OpenAPI 3.1", t("object"))}),
    ("GET", "/docs"): RouteModel("Human-readable API documentation (works offline)", "ops", {200: Reply("HTML", {HTML_MEDIA: None})}),
    # OpenAI
    ("POST", "/v1/chat/completions"): RouteModel(
        "Chat completion (OpenAI)",
        "openai",
        {200: _stream_reply("The completion, or server-sent events when stream is true", CHAT_COMPLETION, SSE_MEDIA, CHAT_CHUNK)},
        request=OPENAI_CHAT_REQUEST,
        stream="sse",
        errors=GEN_ERRORS,
        lenient=OPENAI_CHAT_LENIENT,
        description=f"Model `{PERSONA_MODEL_ID}` runs the full pipeline with the caller's memory; raw model ids bypass it. "
        + GEN_STREAM_NOTE,
    ),
    ("POST", "/v1/completions"): RouteModel(
        "Text completion of one prompt (OpenAI legacy)",
        "openai",
        {200: _stream_reply("The completion, or server-sent events when stream is true", TEXT_COMPLETION, SSE_MEDIA, TEXT_COMPLETION)},
        request=OPENAI_COMPLETION_REQUEST,
        stream="sse",
        errors=GEN_ERRORS,
        lenient=OPENAI_LENIENT | {"echo"},
        description=GEN_STREAM_NOTE,
    ),
    ("POST", "/v1/embeddings"): RouteModel(
        "Embeddings (OpenAI)",
        "openai",
        {200: json_reply("One embedding per input", EMBEDDING_LIST)},
        request=OPENAI_EMBED_REQUEST,
        errors=(400, 404, 408, 413, 503),
    ),
    ("GET", "/v1/models"): RouteModel(
        "List models (OpenAI)", "openai", {200: json_reply("Raw models, the persona and the embedder", MODEL_LIST)}, errors=STORE_ERRORS
    ),
    ("GET", "/v1/models/{model}"): RouteModel(
        "Describe one model (OpenAI)", "openai", {200: json_reply("The model", MODEL_OBJECT)}, path=(MODEL_PARAM,), errors=(404, 503)
    ),
    # Ollama
    ("POST", "/api/chat"): RouteModel(
        "Chat (Ollama)",
        "ollama",
        {
            200: _stream_reply(
                "The reply, or NDJSON lines when stream is true (the default)", OLLAMA_CHAT_PIECE, NDJSON_MEDIA, OLLAMA_CHAT_PIECE
            )
        },
        request=OLLAMA_CHAT_REQUEST,
        stream="ndjson",
        errors=GEN_ERRORS,
        lenient=OLLAMA_CHAT_LENIENT,
        description="No messages: load the model (keep_alive 0: unload it). " + GEN_STREAM_NOTE,
    ),
    ("POST", "/api/generate"): RouteModel(
        "Generate from a prompt (Ollama)",
        "ollama",
        {
            200: _stream_reply(
                "The reply, or NDJSON lines when stream is true (the default)", OLLAMA_GENERATE_PIECE, NDJSON_MEDIA, OLLAMA_GENERATE_PIECE
            )
        },
        request=OLLAMA_GENERATE_REQUEST,
        stream="ndjson",
        errors=GEN_ERRORS,
        lenient=OLLAMA_GENERATE_LENIENT,
        description="No prompt: load the model (keep_alive 0: unload it). " + GEN_STREAM_NOTE,
    ),
    ("POST", "/api/embed"): RouteModel(
        "Embeddings (Ollama)",
        "ollama",
        {
            200: json_reply(
                "One embedding per input",
                obj(
                    {"model": STR, "embeddings": arr(arr(NUM)), "total_duration": INT, "load_duration": INT, "prompt_eval_count": INT},
                    "model",
                    "embeddings",
                ),
            )
        },
        request=OLLAMA_EMBED_REQUEST,
        errors=(400, 404, 408, 413, 503),
    ),
    ("POST", "/api/embeddings"): RouteModel(
        "One embedding (Ollama legacy)",
        "ollama",
        {200: json_reply("The embedding (empty for an empty prompt)", obj({"embedding": arr(NUM)}, "embedding"))},
        request=OLLAMA_EMBEDDINGS_REQUEST,
        errors=(400, 404, 408, 413, 503),
    ),
    ("GET", "/api/tags"): RouteModel(
        "List models (Ollama)", "ollama", {200: json_reply("Models", obj({"models": arr(OLLAMA_TAG)}, "models"))}, errors=STORE_ERRORS
    ),
    ("GET", "/api/ps"): RouteModel(
        "List loaded models (Ollama)", "ollama", {200: json_reply("Loaded models", obj({"models": arr(OLLAMA_RUNNING)}, "models"))}
    ),
    ("POST", "/api/show"): RouteModel(
        "Describe a model (Ollama)",
        "ollama",
        {200: json_reply("Model details and GGUF metadata", OLLAMA_SHOW)},
        request=OLLAMA_SHOW_REQUEST,
        errors=(400, 404, 408, 413, 422, 503),
        lenient=frozenset({"model", "name"}),  # the handler takes the first non-empty one of the two
    ),
    ("GET", "/api/version"): RouteModel(
        "Ollama API level",
        "ollama",
        {200: json_reply("Versions", obj({"version": STR, "mongarsd": STR}, "version", "mongarsd"))},
    ),
    # native
    ("POST", "/api/v1/conversation/chat"): RouteModel(
        "One chat turn through the cognition pipeline, with memory",
        "native",
        {200: _stream_reply("The reply, or NDJSON lines when stream is true", CHAT_RESULT, NDJSON_MEDIA, NATIVE_CHAT_LINE)},
        request=NATIVE_CHAT_REQUEST,
        stream="ndjson",
        errors=GEN_ERRORS,
        description="The turn is stored before the reply is sent. " + GEN_STREAM_NOTE,
    ),
    ("GET", "/api/v1/conversation/history"): RouteModel(
        "Your conversation history, newest last",
        "native",
        {200: json_reply("Messages", obj({"session_id": t("string", "null"), "messages": arr(HISTORY_MESSAGE)}, "session_id", "messages"))},
        query=(LIMIT, Param("session_id", t("string", pattern=SESSION_ID_PATTERN), "only this session")),
        errors=(400, 503),
    ),
    ("GET", "/api/v1/memory"): RouteModel(
        "List your memories, newest first",
        "native",
        {200: json_reply("Memories", obj({"memories": arr(MEMORY)}, "memories"))},
        query=(LIMIT, Param("before", t("integer", minimum=0, maximum=2**62), "only ids below this one (paging); 0: from the newest")),
        errors=(400, 503),
    ),
    ("POST", "/api/v1/memory"): RouteModel(
        "Store a memory", "native", {201: json_reply("The stored memory", MEMORY)}, request=MEMORY_REQUEST, errors=BODY_ERRORS
    ),
    ("GET", "/api/v1/memory/search"): RouteModel(
        "Recall memories (vector and full-text search fused)",
        "native",
        {
            200: json_reply(
                "Best matches first; degraded when only full-text search ran",
                obj({"results": arr(RECALL_HIT), "status": STR, "degraded": BOOL, "reason": t("string", "null")}, "results", "status"),
            )
        },
        query=(
            Param("q", t("string", minLength=1, maxLength=MAX_QUERY_CHARS), "what to recall", required=True),
            Param("k", t("integer", minimum=1, maximum=MAX_SEARCH_K, default=5), "how many"),
        ),
        errors=(400, 413, 503),
    ),
    ("GET", "/api/v1/memory/{memory_id}"): RouteModel(
        "One of your memories", "native", {200: json_reply("The memory", MEMORY)}, path=(MEMORY_ID_PARAM,), errors=(400, 404, 503)
    ),
    ("DELETE", "/api/v1/memory/{memory_id}"): RouteModel(
        "Forget one of your memories",
        "native",
        {200: json_reply("Deleted", obj({"deleted": INT}, "deleted"))},
        path=(MEMORY_ID_PARAM,),
        errors=(400, 404, 503),
    ),
    ("GET", "/api/v1/profile"): RouteModel(
        "Your profile: style and personality", "native", {200: json_reply("Profile", PROFILE)}, errors=(503,)
    ),
    ("PUT", "/api/v1/profile"): RouteModel(
        "Edit your personality profile", "native", {200: json_reply("The profile", PROFILE)}, request=PROFILE_EDIT, errors=BODY_ERRORS
    ),
    ("POST", "/api/v1/feedback"): RouteModel(
        "Rate an answer",
        "native",
        {201: json_reply("Recorded", obj({"id": INT, "rating": {"enum": [-1, 0, 1]}}, "id", "rating"))},
        request=FEEDBACK_REQUEST,
        errors=(*BODY_ERRORS, 404),  # 404: message_id names no message of yours
    ),
    # admin
    ("POST", "/api/v1/tokens"): RouteModel(
        "Create a token (the secret is shown once)",
        "admin",
        {201: json_reply("The token and its record", obj({"token": STR, **TOKEN_PROPS}, "token", *TOKEN_PROPS))},
        request=TOKEN_REQUEST,
        errors=BODY_ERRORS,
    ),
    ("GET", "/api/v1/tokens"): RouteModel(
        "List tokens (admins: all; others: their own)",
        "admin",
        {200: json_reply("Tokens", obj({"tokens": arr(TOKEN_INFO)}, "tokens"))},
        errors=STORE_ERRORS,
    ),
    ("DELETE", "/api/v1/tokens/{token_id}"): RouteModel(
        "Revoke a token (admins: any; others: their own)",
        "admin",
        {200: json_reply("Revoked", obj({"revoked": STR, "user": STR}, "revoked", "user"))},
        path=(TOKEN_ID_PARAM,),
        errors=(404, 503),
    ),
    # peers
    ("GET", "/api/v1/peer/list"): RouteModel(
        "This node, the mesh members and registered peers (admins also get the inbox)",
        "peers",
        {
            200: json_reply(
                "Peers",
                obj(
                    {
                        "node_id": t("string", "null"),
                        "mesh": obj({"enabled": BOOL, "running": BOOL}, "enabled", "running"),
                        "members": arr(obj({"node_id": t("string", "null"), "self": BOOL, "state": STR}, "node_id", "self", "state")),
                        "static": arr(obj({"url": STR, "added_at": NUM}, "url", "added_at")),
                        "inbox": arr(t("object")),
                    },
                    "node_id",
                    "mesh",
                    "members",
                    "static",
                ),
            )
        },
        errors=STORE_ERRORS,
    ),
    ("POST", "/api/v1/peer/register"): RouteModel(
        "Register a peer API URL (idempotent)",
        "peers",
        {
            200: json_reply(
                "Registered (or already)",
                obj({"status": {"enum": ["registered", "already registered"]}, "url": STR, "count": INT, "joined": BOOL}, "status", "url"),
            )
        },
        request=PEER_URL_REQUEST,
        errors=(*BODY_ERRORS, 409),
    ),
    ("POST", "/api/v1/peer/unregister"): RouteModel(
        "Forget a registered peer",
        "peers",
        {200: json_reply("Unregistered", obj({"status": {"const": "unregistered"}, "url": STR, "count": INT}, "status", "url"))},
        request=PEER_URL_REQUEST,
        errors=(*BODY_ERRORS, 404),
    ),
    ("GET", "/api/v1/peer/load"): RouteModel("This node's load", "peers", {200: json_reply("Load", LOAD)}, errors=STORE_ERRORS),
    ("POST", "/api/v1/peer/message"): RouteModel(
        "Deliver a small JSON message from a node-signed peer (or an admin)",
        "peers",
        {200: json_reply("Received", obj({"status": {"const": "received"}, "from": STR}, "status", "from"))},
        request=PEER_MESSAGE_REQUEST,
        errors=BODY_ERRORS,
    ),
    ("POST", "/api/v1/peer/leave"): RouteModel(
        "Leave the mesh gracefully",
        "peers",
        {200: json_reply("Left", obj({"status": {"enum": ["left", "not in a mesh"]}, "node_id": t("string", "null")}, "status"))},
        errors=STORE_ERRORS,
    ),
    ("GET", "/api/v1/peer/hello"): RouteModel(
        "What this node publishes over mDNS",
        "peers",
        {
            200: json_reply(
                "Node facts",
                obj(
                    {
                        "node_id": t("string", "null"),
                        "fingerprint": t("string", "null"),
                        "version": STR,
                        "mesh": BOOL,
                        "gossip_port": t("integer", "null"),
                        "ck": t("string", "null", description="cluster key id (never the key)"),
                    },
                    "node_id",
                    "version",
                    "mesh",
                ),
            )
        },
        errors=STORE_ERRORS,
    ),
    # speech (OpenAI surface)
    ("POST", "/v1/audio/speech"): RouteModel(
        "Text to speech (OpenAI)",
        "openai",
        {
            200: Reply(
                "WAV with true sizes, or raw s16le mono PCM streamed as produced; rate in X-Sample-Rate (22050 Hz with espeak-ng)",
                {
                    "audio/wav": {"type": "string", "contentMediaType": "audio/wav"},
                    "audio/pcm": {"type": "string", "contentMediaType": "audio/pcm"},
                },
            )
        },
        request=OPENAI_SPEECH_REQUEST,
        errors=(400, 408, 413, 429, 503),
    ),
    # Iris and curiosity (native)
    ("POST", "/api/v1/ingest"): RouteModel(
        "Ingest a document (a page, a file or folder, or text) into memory",
        "native",
        {
            201: json_reply(
                "What was stored",
                obj(
                    {"owner": STR, "shared": BOOL, "results": arr(INGEST_RESULT), "ingested": INT, "duplicates": INT, "errors": INT},
                    "owner",
                    "results",
                ),
            )
        },
        request=INGEST_REQUEST,
        errors=(*BODY_ERRORS, 403, 415, 422, 502, 504),
        description="Your own documents, recalled only for you; admins may store shared ones (shared: true) that every "
        "user's recall sees. Answers drawing on a document name its source.",
    ),
    ("GET", "/api/v1/ingest"): RouteModel(
        "List your ingested documents",
        "native",
        {200: json_reply("Documents", obj({"owner": STR, "shared": BOOL, "documents": arr(DOCUMENT)}, "owner", "documents"))},
        query=INGEST_SCOPE,
        errors=(400, 403, 503),
    ),
    ("DELETE", "/api/v1/ingest/{document_id}"): RouteModel(
        "Forget an ingested document and its memories",
        "native",
        {200: json_reply("Deleted", obj({"deleted": INT, "owner": STR}, "deleted", "owner"))},
        path=(Param("document_id", t("integer", minimum=1), "the document", required=True),),
        query=INGEST_SCOPE,
        errors=(400, 403, 404, 503),
    ),
    ("GET", "/api/v1/curiosity"): RouteModel(
        "Your research: knowledge gaps the Curiosity Engine looked up, open and finished",
        "native",
        {
            200: json_reply(
                "Research, newest first", obj({"research": arr(RESEARCH), "open": INT, "finished": INT}, "research", "open", "finished")
            )
        },
        query=(
            Param("limit", t("integer", minimum=1, maximum=200, default=50), "how many, newest first"),
            Param("status", t("string", enum=["open", "running", "done", "nothing_found", "failed"]), "only this status"),
        ),
        errors=(400, 503),
    ),
    # Sommeil, the Evolution Engine and the SelfTrainingEngine (admin actions; reports for every role)
    ("GET", "/api/v1/sommeil"): RouteModel(
        "Idle-time work: state, the current job, the last runs and what they did",
        "admin",
        {200: json_reply("Sommeil", obj({"state": STR, "status": t("object"), "runs": arr(t("object"))}, "state", "status", "runs"))},
        query=(Param("limit", t("integer", minimum=1, maximum=200, default=20), "how many runs, newest first"),),
        errors=(400, 503),
    ),
    ("POST", "/api/v1/sommeil/run"): RouteModel(
        "Start a Sommeil cycle now (still paused the moment a request arrives)",
        "admin",
        {202: json_reply("Started", obj({"started": BOOL, "cycle": INT}, "started", "cycle"))},
        errors=(409, 503),
        description="409: a cycle is already running, or Sommeil is disabled by configuration.",
    ),
    ("GET", "/api/v1/evolution"): RouteModel(
        "Auto-tuning: the active settings, every version with its measurements, the trials and why",
        "admin",
        {
            200: json_reply(
                "Evolution history",
                obj(
                    {"enabled": BOOL, "active": t("object", "null"), "versions": arr(t("object")), "trials": arr(t("object"))},
                    "active",
                    "versions",
                    "trials",
                ),
            )
        },
        query=(Param("trials", t("integer", minimum=1, maximum=200, default=20), "how many trials, newest first"),),
        errors=(400, 503),
    ),
    ("POST", "/api/v1/evolution/rollback"): RouteModel(
        "Go back to the previous tuned settings",
        "admin",
        {200: json_reply("Rolled back", obj({"rolled_back": BOOL, "active": t("object")}, "rolled_back", "active"))},
        errors=(400, 409, 503),
        description='An optional JSON body {"reason": "..."} (at most 200 characters) is kept with the version.',
    ),
    ("GET", "/api/v1/self-training"): RouteModel(
        "The recall re-ranker learnt from feedback: the active version and every trained one with its held-out scores",
        "admin",
        {
            200: json_reply(
                "Re-ranker versions",
                obj({"enabled": BOOL, "active": t("object", "null"), "versions": arr(t("object"))}, "active", "versions"),
            )
        },
        errors=(503,),
    ),
    ("POST", "/api/v1/self-training/rollback"): RouteModel(
        "Go back to the previous re-ranker (or the plain fused order)",
        "admin",
        {
            200: json_reply(
                "Rolled back", obj({"rolled_back": INT, "active": t("object", "null"), "versions": arr(t("object"))}, "rolled_back")
            )
        },
        errors=(409, 503),
    ),
    # social (admin)
    ("GET", "/api/v1/social/accounts"): RouteModel(
        "List social accounts (never their tokens) with their breaker state",
        "admin",
        {
            200: json_reply(
                "Accounts",
                obj(
                    {
                        "accounts": arr(
                            obj(
                                {**SOCIAL_ACCOUNT_PROPS, "breaker": t("string", enum=["closed", "open", "half_open"])},
                                *SOCIAL_ACCOUNT_PROPS,
                                "breaker",
                            )
                        )
                    },
                    "accounts",
                ),
            )
        },
        errors=STORE_ERRORS,
    ),
    ("POST", "/api/v1/social/accounts"): RouteModel(
        "Store a social account; its token is sealed in the vault",
        "admin",
        {
            201: json_reply("Added", obj({**SOCIAL_ACCOUNT_PROPS, "replaced": BOOL}, *SOCIAL_ACCOUNT_PROPS, "replaced")),
            200: json_reply("Replaced (replace: true)", obj({**SOCIAL_ACCOUNT_PROPS, "replaced": BOOL}, *SOCIAL_ACCOUNT_PROPS, "replaced")),
        },
        request=SOCIAL_ACCOUNT_REQUEST,
        errors=(*BODY_ERRORS, 409),
    ),
    ("DELETE", "/api/v1/social/accounts/{name}"): RouteModel(
        "Forget a social account and its token",
        "admin",
        {200: json_reply("Removed", obj({"removed": STR, "instance": STR}, "removed", "instance"))},
        path=(SOCIAL_NAME_PARAM,),
        errors=(400, 404, 503),
    ),
    ("POST", "/api/v1/social/post"): RouteModel(
        "Post a status to a Mastodon-compatible instance, at most once per idempotency key",
        "admin",
        {
            201: json_reply("Posted", SOCIAL_POST_RESULT),
            200: json_reply("Already posted with this key (replayed: true); the instance was not contacted", SOCIAL_POST_RESULT),
        },
        request=SOCIAL_POST_REQUEST,
        errors=(*BODY_ERRORS, 404, 409, 502, 504),
        description="Send the key in the Idempotency-Key header or in idempotency_key. 502/504: the instance refused or could not be reached "
        "(retry with the same key is safe); 503 with Retry-After: the account's circuit breaker is open.",
    ),
}


def route_key(method: str, canonical: str) -> tuple[str, str]:
    """The table's key for a route: its method and the resource's canonical path (pure)."""
    return method.upper(), canonical


def model_for(method: str, canonical: str) -> RouteModel | None:
    return ROUTE_MODELS.get(route_key(method, canonical))
