"""Generation parameters, their validation, grammars, and streamed-text helpers (pure)."""

from __future__ import annotations

import codecs
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mongarsd.errors import ContextOverflowError, ValidationError

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_PENALTY_LAST_N = 4096
MAX_SEED = 2**32 - 1

# Generic JSON (llama.cpp grammars/json.gbnf, as shipped by llama-cpp-python's JSON_GBNF).
JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

ws ::= | " " | "\n" [ \t]{0,20}
"""


@dataclass(frozen=True, slots=True)
class ToolConstraint:
    """What a tool-calling grammar must enforce: one call's JSON Schema, when it starts, how many calls.

    lazy: free text until the model writes the call tag (tool_choice auto); otherwise the reply
    is calls from the first token (required, or a named function). See inference/tools.py.
    """

    schema: Mapping[str, Any] = field(hash=False)
    lazy: bool = True
    max_calls: int = 1
    # a JSON response format the reply must follow when it is not a call (never lazy then)
    text_schema: Mapping[str, Any] | None = field(default=None, hash=False)
    text_json: bool = False
    text_param: str = "response_format"


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Sampling and stopping settings for one request (llama-server vocabulary).

    temperature == 0 means greedy. seed None means a random seed. At most one of
    `grammar` (GBNF text), `json_schema` (a JSON Schema object) and `json_mode` is set.
    """

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None
    json_schema: Mapping[str, Any] | None = field(default=None, hash=False)
    json_mode: bool = False
    schema_param: str = "response_format"  # the request field the schema came from, for errors
    tools: ToolConstraint | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalties_enabled(self) -> bool:
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """Sampling settings as the client gave them (None: server default), in engine vocabulary.

    Every surface's parser produces one (pure); `build_params` turns it into GenerationParams
    once the prompt's length is known. It travels unchanged to the persona pipeline.
    """

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
    schema_param: str = "response_format"
    num_ctx: int | None = None
    tools: ToolConstraint | None = None  # set by the generation path from the request's tools


def context_limit(spec: SamplingSpec, n_ctx: int) -> int:
    """The context this request may use: num_ctx (Ollama) lowers it; above the model's it is clamped.

    Home Assistant's Ollama integration sends num_ctx 8192 by default: refusing it would break
    that client, so a larger value is read as "all of it", as Ollama does.
    """
    return min(n_ctx, spec.num_ctx) if spec.num_ctx else n_ctx


def reply_reserve(spec: SamplingSpec, max_tokens_default: int) -> int:
    """Tokens to keep free for the reply when a prompt is fitted into the context."""
    return spec.max_tokens if spec.max_tokens is not None else max_tokens_default


def check_fits(n_prompt: int, max_tokens: int | None, n_ctx: int) -> None:
    """The one context check, with one message: raise ContextOverflowError naming the token counts."""
    if n_ctx - n_prompt < 1:
        raise ContextOverflowError(
            "prompt has " + str(n_prompt) + " tokens but the context holds " + str(n_ctx) + " tokens; shorten the conversation",
        )
    if max_tokens is not None and n_prompt + max_tokens > n_ctx:
        raise ContextOverflowError(
            "prompt has "
            + str(n_prompt)
            + " tokens and max_tokens is "
            + str(max_tokens)
            + ": together over the context of "
            + str(n_ctx)
            + " tokens",
            param="max_tokens",
        )


def build_params(spec: SamplingSpec, *, n_prompt: int, n_ctx: int, max_tokens_default: int) -> GenerationParams:
    """Turn a SamplingSpec into GenerationParams once the prompt length is known (pure)."""
    limit = context_limit(spec, n_ctx)
    check_fits(n_prompt, spec.max_tokens, limit)
    room = limit - n_prompt
    if spec.max_tokens is not None:
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
        schema_param=spec.schema_param,
        tools=spec.tools,
    )


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(name + " must be a finite number", param=name)
    if not lo <= value <= hi:
        raise ValidationError(
            name + " must be between " + str(lo) + " and " + str(hi) + ", got " + str(value),
            param=name,
        )


def _check_int(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name + " must be an integer", param=name)
    if not lo <= value <= hi:
        raise ValidationError(
            name + " must be between " + str(lo) + " and " + str(hi) + ", got " + str(value),
            param=name,
        )


def validate_params(params: GenerationParams, *, n_ctx: int) -> None:
    """Raise ValidationError(param=...) for the first out-of-range field."""
    _check_int("max_tokens", params.max_tokens, 1, n_ctx)
    _check_range("temperature", params.temperature, 0.0, 2.0)
    _check_int("top_k", params.top_k, 0, 1_000_000)
    _check_range("top_p", params.top_p, 0.0, 1.0)
    _check_range("min_p", params.min_p, 0.0, 1.0)
    _check_range("repeat_penalty", params.repeat_penalty, 0.0, 10.0)
    if params.repeat_penalty == 0.0:
        raise ValidationError("repeat_penalty must be > 0", param="repeat_penalty")
    _check_int("repeat_last_n", params.repeat_last_n, -1, MAX_PENALTY_LAST_N)
    _check_range("presence_penalty", params.presence_penalty, -2.0, 2.0)
    _check_range("frequency_penalty", params.frequency_penalty, -2.0, 2.0)
    if params.seed is not None:
        _check_int("seed", params.seed, 0, MAX_SEED)
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise ValidationError("at most " + str(MAX_STOP_SEQUENCES) + " stop sequences", param="stop")
    for s in params.stop:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise ValidationError(
                "stop sequences must be non-empty strings of at most " + str(MAX_STOP_CHARS) + " characters",
                param="stop",
            )
    chosen = sum((params.grammar is not None, params.json_schema is not None, params.json_mode, params.tools is not None))
    if chosen > 1:
        raise ValidationError("use only one of grammar, a JSON response format and tools", param="response_format")
    if params.grammar is not None and not isinstance(params.grammar, str):
        raise ValidationError("grammar must be a GBNF string", param="grammar")


class StopMatcher:
    """Hold back text that could be the start of a stop sequence; report a full match.

    `feed(text)` returns (text safe to emit, stopped). Once stopped, the text after the stop
    sequence is dropped. `flush()` returns what is still held back at the end.
    """

    __slots__ = ("_held", "_max_len", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self._max_len = max((len(s) for s in self._stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buf = self._held + text
        first = -1
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            self._held = ""
            return buf[:first], True
        keep = partial_stop_len(buf, self._stops, self._max_len)
        if keep:
            self._held = buf[-keep:]
            return buf[:-keep], False
        self._held = ""
        return buf, False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


def partial_stop_len(text: str, stops: Sequence[str], max_len: int) -> int:
    """Return the length of the longest suffix of `text` that is a proper prefix of a stop."""
    upper = min(len(text), max_len - 1)
    for n in range(upper, 0, -1):
        tail = text[-n:]
        for s in stops:
            if len(s) > n and s.startswith(tail):
                return n
    return 0


class Utf8Stream:
    """Decode a byte stream piecewise, holding back incomplete multi-byte sequences."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return str(self._decoder.decode(data, False))

    def flush(self) -> str:
        return str(self._decoder.decode(b"", True))
