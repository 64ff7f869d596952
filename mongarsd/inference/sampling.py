"""Generation parameters, their validation, grammars, and streamed-text helpers (pure)."""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mongarsd.errors import ValidationError

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_GRAMMAR_CHARS = 256 * 1024
MAX_SCHEMA_CHARS = 64 * 1024
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalties_enabled(self) -> bool:
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)


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
    chosen = sum((params.grammar is not None, params.json_schema is not None, params.json_mode))
    if chosen > 1:
        raise ValidationError("use only one of grammar, json_schema and json mode", param="response_format")
    if params.grammar is not None and (not isinstance(params.grammar, str) or len(params.grammar) > MAX_GRAMMAR_CHARS):
        raise ValidationError(
            "grammar must be a GBNF string of at most " + str(MAX_GRAMMAR_CHARS) + " chars",
            param="grammar",
        )


def json_schema_grammar(schema: Mapping[str, Any]) -> str:
    """Convert a JSON Schema to GBNF with llama-cpp-python's converter (pure CPU)."""
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as err:
        raise ValidationError("json_schema is not JSON: " + str(err), param="response_format") from err
    if len(text) > MAX_SCHEMA_CHARS:
        raise ValidationError("json_schema is too large", param="response_format")
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # heavy import, only when used

    try:
        return str(json_schema_to_gbnf(text))
    # the converter is third-party code fed with client input: these are the ways it fails
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, NotImplementedError, RecursionError, AssertionError) as err:
        raise ValidationError("unsupported json_schema: " + str(err)[:200], param="response_format") from err


def grammar_for(params: GenerationParams) -> str | None:
    """Return the GBNF text the request asks for, if any."""
    if params.grammar is not None:
        return params.grammar
    if params.json_schema is not None:
        return json_schema_grammar(params.json_schema)
    if params.json_mode:
        return JSON_GBNF
    return None


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
