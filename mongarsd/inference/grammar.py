"""Bounded JSON Schema -> GBNF: nothing reaches llama.cpp's grammar parser unless it is provably small.

llama-cpp-python's converter spells `maxLength: n` as n nested optional groups and
`minLength: n` as n copies of the item, and llama.cpp's parser recurses once per nested
group: a 45-byte schema can exhaust the parser's stack (segfault) or the converter's memory.
So schemas are checked and normalised here first (pure, cheap, on the loop at parse time),
converted off the loop with a time budget and a cache, and the GBNF is checked again before
the parser sees it. The bounds are tested against the real parser in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, cast

from mongarsd.errors import ValidationError
from mongarsd.inference.sampling import JSON_GBNF, GenerationParams

MAX_SCHEMA_CHARS = 64 * 1024  # serialized schema
MAX_SCHEMA_DEPTH = 64  # nested JSON containers (objects and lists) inside a schema
MAX_SCHEMA_NODES = 4096  # JSON values inside a schema
# Counted keywords: a minimum above this is refused (it could not fit a reply anyway); a maximum
# above it is treated as no maximum, since max_tokens bounds every reply already.
MAX_REPETITION = 1000
COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains")
MAX_PATTERN_CHARS = 512
MAX_PATTERN_EXPANSION = 4096  # characters a regex pattern may expand into (quantifiers multiplied out)
MAX_GRAMMAR_CHARS = 256 * 1024
# llama.cpp's parser recurses once per parenthesised group before any of its own checks run:
# 5,000 levels overflow a 2 MiB thread stack (segfault). A schema at MAX_REPETITION nests about
# 1,000 deep; the subprocess test parses grammars at this bound on a 2 MiB stack with room to spare.
MAX_GRAMMAR_NESTING = 1100
MAX_GRAMMAR_REPEAT = 2000  # llama.cpp's own MAX_REPETITION_THRESHOLD for {m,n}
GRAMMAR_BUILD_TIMEOUT_S = 5.0
GRAMMAR_CACHE_ENTRIES = 64

_QUANT_RE = re.compile(r"\{\s*(\d{1,9})\s*(?:,\s*(\d{0,9})\s*)?\}")


def _bad(param: str, message: str) -> ValidationError:
    return ValidationError("'" + param + "' " + message, param=param)


def check_schema(schema: object, *, param: str) -> dict[str, Any]:
    """Return a bounded copy of a JSON Schema or raise ValidationError naming the offending keyword (pure).

    Counted keywords must be non-negative integers; minimums above MAX_REPETITION are refused,
    maximums above it are dropped (unbounded: the reply length is bounded by max_tokens).
    `$ref` must point inside the schema: nothing is ever fetched.
    """
    if not isinstance(schema, Mapping):
        raise _bad(param, "must be a JSON Schema object")
    try:
        size = len(json.dumps(schema, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as err:
        raise _bad(param, "is not a JSON value: " + str(err)[:120]) from None
    if size > MAX_SCHEMA_CHARS:
        raise _bad(param, "is too large (" + str(size) + " characters; at most " + str(MAX_SCHEMA_CHARS) + ")")
    return cast(dict[str, Any], _copy(schema, param, 0, [0]))


def _copy(value: object, where: str, depth: int, nodes: list[int]) -> object:
    nodes[0] += 1
    if nodes[0] > MAX_SCHEMA_NODES:
        raise _bad(where, "makes the schema too complex (more than " + str(MAX_SCHEMA_NODES) + " values)")
    if depth > MAX_SCHEMA_DEPTH:
        raise _bad(where, "is nested too deeply (at most " + str(MAX_SCHEMA_DEPTH) + " levels)")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _bad(where, "has a non-string key")
            at = where + "." + key
            if key in COUNT_KEYWORDS:
                count = _count(item, at)
                if count > MAX_REPETITION:
                    if key.startswith("min"):
                        raise _bad(at, "is " + str(count) + "; at most " + str(MAX_REPETITION) + " is supported")
                    continue  # an out-of-reach maximum: unbounded, max_tokens bounds the reply
                out[key] = count
            elif key == "$ref" and isinstance(item, str):
                if not item.startswith("#"):
                    raise _bad(at, "must point inside the schema ('#/...'); remote schemas are never fetched")
                out[key] = item
            elif key == "pattern" and isinstance(item, str):
                check_pattern(item, param=at)
                out[key] = item
            else:
                out[key] = _copy(item, at, depth + 1, nodes)
        return out
    if isinstance(value, list):
        return [_copy(item, where + "[" + str(i) + "]", depth + 1, nodes) for i, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(where, "must be a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        raise _bad(where, "is too large a number")
    return value


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(where, "must be a non-negative integer")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise _bad(where, "must be a non-negative integer")
    count = int(value)
    if count < 0:
        raise _bad(where, "must be a non-negative integer")
    return count


def check_pattern(pattern: str, *, param: str) -> None:
    """Refuse regex patterns whose expansion would be large (quantifiers multiplied out) (pure)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise _bad(param, "is too long (" + str(len(pattern)) + " characters; at most " + str(MAX_PATTERN_CHARS) + ")")
    if pattern_expansion(pattern) > MAX_PATTERN_EXPANSION:
        raise _bad(param, "expands too far (quantifiers multiply to more than " + str(MAX_PATTERN_EXPANSION) + " characters)")


def pattern_expansion(pattern: str) -> int:
    """Estimate how many characters a regex can expand into once its quantifiers are unrolled (pure).

    Unbounded quantifiers (*, +, {m,}) count their item twice, as the converter spells them.
    Groups take the largest alternative. The estimate is an upper bound for the converter.
    """
    # Each frame: [sum of finished alternatives' max, current sequence total, last atom size]
    stack: list[list[int]] = [[0, 0, 0]]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        frame = stack[-1]
        if c == "\\":
            frame[1] += 1
            frame[2] = 1
            i += 2
            continue
        if c == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            frame[1] += 1
            frame[2] = 1
            i = j + 1
            continue
        if c == "(":
            stack.append([0, 0, 0])
            i += 1
            if pattern.startswith("?:", i):
                i += 2
            continue
        if c == ")" and len(stack) > 1:
            done = stack.pop()
            size = max(done[0], done[1])
            stack[-1][1] += size
            stack[-1][2] = size
            i += 1
            continue
        if c == "|":
            frame[0] = max(frame[0], frame[1])
            frame[1] = 0
            frame[2] = 0
            i += 1
            continue
        if c in "*+?":
            frame[1] += frame[2] if c != "?" else 0
            i += 1
            continue
        if c == "{":
            m = _QUANT_RE.match(pattern, i)
            if m is not None:
                lo = int(m.group(1))
                hi_text = m.group(2)
                times = lo + 1 if hi_text == "" else max(lo, int(hi_text) if hi_text else lo)
                if times > MAX_GRAMMAR_REPEAT:
                    return times * max(frame[2], 1)
                frame[1] += frame[2] * (max(times, 1) - 1)
                frame[2] *= max(times, 1)
                i = m.end()
                continue
        frame[1] += 1
        frame[2] = 1
        i += 1
        if frame[1] > MAX_PATTERN_EXPANSION * 16:
            break
    while len(stack) > 1:  # unbalanced: the converter will refuse it; count what was seen
        done = stack.pop()
        stack[-1][1] += max(done[0], done[1])
    return max(stack[0][0], stack[0][1])


def check_grammar(text: str, *, param: str) -> None:
    """Refuse GBNF that llama.cpp's parser could choke on: size, group nesting, repetition counts (pure)."""
    if len(text) > MAX_GRAMMAR_CHARS:
        raise _bad(param, "compiles to a grammar of " + str(len(text)) + " characters; at most " + str(MAX_GRAMMAR_CHARS))
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':  # literal: skip to the closing quote, honouring escapes
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c == "[":
            i += 1
            while i < n and text[i] != "]":
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        elif c == "{":
            m = _QUANT_RE.match(text, i)
            if m is not None and max(int(m.group(1)), int(m.group(2) or 0)) > MAX_GRAMMAR_REPEAT:
                raise _bad(param, "compiles to a repetition over " + str(MAX_GRAMMAR_REPEAT) + " times")
        i += 1
    if deepest > MAX_GRAMMAR_NESTING:
        raise _bad(param, "compiles to groups nested " + str(deepest) + " deep; at most " + str(MAX_GRAMMAR_NESTING))


MAX_RANGE_ENUM = 256  # integer ranges up to this many values become an enum the grammar enforces
_VALUE_KEYWORDS = frozenset(("enum", "const", "default", "examples"))


def grammar_ready(node: Any) -> Any:
    """Spell what the converter ignores in terms it enforces (pure).

    llama-cpp-python's converter drops minimum/maximum: a small integer range (a brightness
    0-100, a volume, a percentage) becomes the enum of its values, so the grammar keeps
    generated numbers inside it. Wider ranges and number bounds are repaired after generation
    (`clamp_to_schema`).
    """
    if isinstance(node, list):
        return [grammar_ready(v) for v in node]
    if not isinstance(node, Mapping):
        return node
    values = _int_range_values(node)
    if values is not None:
        out = {k: v for k, v in node.items() if k in ("description", "title")}
        out["enum"] = values
        return out
    return {k: (v if k in _VALUE_KEYWORDS else grammar_ready(v)) for k, v in node.items()}


def _int_range_values(node: Mapping[str, Any]) -> list[int] | None:
    if node.get("type") != "integer" or "enum" in node or "const" in node:
        return None
    lo, hi = _int_bounds(node)
    if lo is None or hi is None or hi < lo or hi - lo + 1 > MAX_RANGE_ENUM:
        return None
    step = node.get("multipleOf")
    if isinstance(step, int) and not isinstance(step, bool) and step > 0:
        return [i for i in range(lo, hi + 1) if i % step == 0] or None
    return list(range(lo, hi + 1))


def _bound(node: Mapping[str, Any], key: str) -> float | None:
    v = node.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _int_bounds(node: Mapping[str, Any]) -> tuple[int | None, int | None]:
    lo_f, hi_f = _bound(node, "minimum"), _bound(node, "maximum")
    xlo, xhi = _bound(node, "exclusiveMinimum"), _bound(node, "exclusiveMaximum")
    lo = math.ceil(lo_f) if lo_f is not None else None
    hi = math.floor(hi_f) if hi_f is not None else None
    if xlo is not None:
        lo = max(lo, math.floor(xlo) + 1) if lo is not None else math.floor(xlo) + 1
    if xhi is not None:
        hi = min(hi, math.ceil(xhi) - 1) if hi is not None else math.ceil(xhi) - 1
    return lo, hi


def clamp_to_schema(value: Any, schema: Any) -> Any:
    """Bring generated numbers inside bounds the grammar could not express (pure).

    Integers and numbers outside minimum/maximum (or the exclusive bounds) are moved to the
    nearest allowed value, in nested objects and arrays too; everything else is unchanged.
    """
    if not isinstance(schema, Mapping):
        return value
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        lo, hi = _int_bounds(schema) if isinstance(value, int) else _float_bounds(schema)
        if lo is not None and value < lo:
            return lo
        if hi is not None and value > hi:
            return hi
        return value
    if isinstance(value, dict):
        props = schema.get("properties")
        if isinstance(props, Mapping):
            return {k: clamp_to_schema(v, props.get(k)) for k, v in value.items()}
        return value
    if isinstance(value, list):
        return [clamp_to_schema(v, schema.get("items")) for v in value]
    return value


def _float_bounds(node: Mapping[str, Any]) -> tuple[float | None, float | None]:
    lo, hi = _bound(node, "minimum"), _bound(node, "maximum")
    # an exclusive bound has no nearest value: the closest representable one stands in
    xlo, xhi = _bound(node, "exclusiveMinimum"), _bound(node, "exclusiveMaximum")
    if xlo is not None:
        lo = max(lo, math.nextafter(xlo, math.inf)) if lo is not None else math.nextafter(xlo, math.inf)
    if xhi is not None:
        hi = min(hi, math.nextafter(xhi, -math.inf)) if hi is not None else math.nextafter(xhi, -math.inf)
    return lo, hi


def schema_to_gbnf(schema: Mapping[str, Any], *, param: str = "response_format") -> str:
    """Check, convert and re-check a JSON Schema (blocking: run it off the loop)."""
    bounded = grammar_ready(check_schema(schema, param=param))
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # heavy import: only off the loop, only when used

    try:
        text = str(json_schema_to_gbnf(json.dumps(bounded)))
    # the converter is third-party code fed with client input: these are the ways it fails
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, NotImplementedError, RecursionError, AssertionError) as err:
        raise ValidationError("unsupported JSON schema in '" + param + "': " + str(err)[:200], param=param) from None
    check_grammar(text, param=param)
    return strict_json_strings(text)


# The converter's string characters admit raw control characters, which JSON forbids (a "call"
# with a newline inside a string would not parse): its rules are narrowed as llama.cpp's own are.
_LOOSE_CHAR = '[^"\\\\]'
_STRICT_CHAR = '[^"\\\\\\x7F\\x00-\\x1F]'
_CHAR_RULE_RE = re.compile(r"^((?:[A-Za-z0-9-]*-)?char ::= )" + re.escape(_LOOSE_CHAR), re.MULTILINE)


def strict_json_strings(gbnf: str) -> str:
    """Keep control characters out of generated JSON strings (pure)."""
    return _CHAR_RULE_RE.sub(lambda m: m.group(1) + _STRICT_CHAR, gbnf)


class GrammarCompiler:
    """Compile JSON Schemas to GBNF off the event loop, within a time budget, caching the results."""

    def __init__(self, *, timeout_s: float = GRAMMAR_BUILD_TIMEOUT_S, entries: int = GRAMMAR_CACHE_ENTRIES) -> None:
        self._timeout_s = timeout_s
        self._entries = entries
        self._cache: OrderedDict[str, str] = OrderedDict()

    async def async_compile(self, schema: Mapping[str, Any], *, param: str = "response_format") -> str:
        """Return the GBNF for `schema`; raise ValidationError if it is refused or too slow to build."""
        try:
            key = json.dumps(schema, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as err:
            raise _bad(param, "is not a JSON value: " + str(err)[:120]) from None
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                text = await loop.run_in_executor(None, lambda: schema_to_gbnf(schema, param=param))
        except TimeoutError:
            raise ValidationError(
                "'" + param + "' is too complex: its grammar took over " + str(self._timeout_s) + " s to build",
                param=param,
                status=422,
            ) from None
        self._cache[key] = text
        while len(self._cache) > self._entries:
            self._cache.popitem(last=False)
        return text

    async def async_grammar_for(self, params: GenerationParams) -> str | None:
        """Return the checked GBNF text a request asks for (grammar, JSON Schema or JSON mode), if any."""
        if params.grammar is not None:
            check_grammar(params.grammar, param="grammar")
            return params.grammar
        if params.json_schema is not None:
            return await self.async_compile(params.json_schema, param=params.schema_param)
        if params.json_mode:
            return JSON_GBNF
        if params.tools is not None:
            from mongarsd.inference.tools import either_grammar, wrap_call_grammar

            tools = params.tools
            text = wrap_call_grammar(await self.async_compile(tools.schema, param="tools"), tools.max_calls)
            if tools.text_schema is not None:
                text = either_grammar(text, await self.async_compile(tools.text_schema, param=tools.text_param))
            elif tools.text_json:
                text = either_grammar(text, JSON_GBNF)
            check_grammar(text, param="tools")
            return text
        return None
