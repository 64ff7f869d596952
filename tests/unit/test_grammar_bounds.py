"""Schema -> grammar bounds: the issue's grammar bombs are refused or bounded before llama.cpp sees them."""

from __future__ import annotations

import json
import resource
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mongarsd.errors import ValidationError
from mongarsd.inference import grammar as g
from mongarsd.inference.sampling import JSON_GBNF, GenerationParams

P = "response_format.json_schema.schema"


def test_counted_minimum_over_the_limit_is_refused_naming_the_keyword() -> None:
    with pytest.raises(ValidationError) as info:
        g.check_schema({"type": "string", "minLength": 1_000_000_000}, param=P)
    assert info.value.param == P + ".minLength"
    assert "at most 1000" in str(info.value)


def test_counted_maximum_over_the_limit_becomes_unbounded() -> None:
    out = g.check_schema({"type": "array", "items": {"type": "integer"}, "maxItems": 1_000_000}, param=P)
    assert out == {"type": "array", "items": {"type": "integer"}}
    kept = g.check_schema({"type": "string", "maxLength": 40}, param=P)
    assert kept["maxLength"] == 40


@pytest.mark.parametrize("value", [-1, 1.5, "3", True, None, [1]])
def test_counted_keywords_must_be_non_negative_integers(value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        g.check_schema({"type": "string", "maxLength": value}, param="format")
    assert info.value.param == "format.maxLength"


def test_remote_refs_are_refused_never_fetched() -> None:
    with pytest.raises(ValidationError) as info:
        g.check_schema({"$ref": "https://example.invalid/schema.json"}, param="format")
    assert info.value.param == "format.$ref"
    assert g.check_schema({"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a"}, param="format")["$ref"] == "#/$defs/a"


def test_size_depth_and_node_limits() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(g.MAX_SCHEMA_DEPTH):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ValidationError, match="nested too deeply"):
        g.check_schema(deep, param="format")
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(g.MAX_SCHEMA_NODES)}}
    with pytest.raises(ValidationError):
        g.check_schema(wide, param="format")
    with pytest.raises(ValidationError, match="too large"):
        g.check_schema({"enum": ["x" * 1000] * 80}, param="format")


def test_pattern_expansion_estimate() -> None:
    assert g.pattern_expansion("abc") == 3
    assert g.pattern_expansion("[0-9]{4}-[0-9]{2}") == 7
    assert g.pattern_expansion("(ab|cde){3}") == 9
    assert g.pattern_expansion("((a{100}){100}){100}") == 1_000_000
    assert g.pattern_expansion("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$") <= 40
    with pytest.raises(ValidationError, match="expands too far"):
        g.check_schema({"type": "string", "pattern": "((a{100}){100}){100}"}, param="format")
    with pytest.raises(ValidationError, match="too long"):
        g.check_schema({"type": "string", "pattern": "a" * (g.MAX_PATTERN_CHARS + 1)}, param="format")


def test_grammar_checks_nesting_size_and_repeats() -> None:
    g.check_grammar(JSON_GBNF, param="grammar")
    nested = "root ::= " + "(" * (g.MAX_GRAMMAR_NESTING + 1) + '"a"' + ")?" * (g.MAX_GRAMMAR_NESTING + 1)
    with pytest.raises(ValidationError, match="nested"):
        g.check_grammar(nested, param="grammar")
    # parentheses inside literals, classes and comments do not count
    g.check_grammar('root ::= "((((((" [(((] # (((((\n', param="grammar")
    with pytest.raises(ValidationError, match="repetition"):
        g.check_grammar('root ::= "a"{0,5000}', param="grammar")
    with pytest.raises(ValidationError, match="characters"):
        g.check_grammar("root ::= " + '"a" ' * g.MAX_GRAMMAR_CHARS, param="grammar")


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": 100000},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 1000000},
        {"type": "string", "maxLength": g.MAX_REPETITION},
        {"type": "array", "items": {"type": "string", "maxLength": g.MAX_REPETITION}, "maxItems": g.MAX_REPETITION},
        {"type": "object", "properties": {"a": {"type": "string", "minLength": g.MAX_REPETITION, "maxLength": g.MAX_REPETITION}}},
    ],
)
def test_bombs_convert_small_and_fast(schema: dict[str, Any]) -> None:
    t0 = time.monotonic()
    text = g.schema_to_gbnf(schema)
    assert time.monotonic() - t0 < 2.0
    assert len(text) <= g.MAX_GRAMMAR_CHARS
    g.check_grammar(text, param="x")


def test_min_length_bomb_is_refused_before_any_allocation() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValidationError):
        g.schema_to_gbnf({"type": "string", "minLength": 1_000_000_000})
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


async def test_compiler_caches_and_runs_off_the_loop() -> None:
    compiler = g.GrammarCompiler()
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    first = await compiler.async_compile(schema)
    assert "root" in first
    assert await compiler.async_compile(dict(reversed(list(schema.items())))) is first  # same schema, any key order
    assert await compiler.async_grammar_for(GenerationParams()) is None
    assert await compiler.async_grammar_for(GenerationParams(json_mode=True)) == JSON_GBNF
    with pytest.raises(ValidationError) as info:
        await compiler.async_grammar_for(GenerationParams(json_schema={"type": "string", "minLength": 10**6}, schema_param="format"))
    assert info.value.param == "format.minLength"


async def test_compiler_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(schema: Any, *, param: str) -> str:
        time.sleep(0.3)
        return "root ::= x"

    monkeypatch.setattr(g, "schema_to_gbnf", slow)
    with pytest.raises(ValidationError) as info:
        await g.GrammarCompiler(timeout_s=0.05).async_compile({"type": "string"})
    assert info.value.status == 422


# ----------------------------------------------------------------------------------------
# Fuzz: any schema either is refused with a ValidationError or converts fast into a bounded grammar

_leaf = st.one_of(
    st.fixed_dictionaries({"type": st.just("string")}, optional={"minLength": st.integers(0, 2000), "maxLength": st.integers(0, 10**9)}),
    st.fixed_dictionaries({"type": st.sampled_from(["integer", "number", "boolean", "null"])}),
    st.fixed_dictionaries(
        {"type": st.just("integer")}, optional={"minimum": st.integers(-(10**12), 10**12), "maximum": st.integers(-(10**12), 10**12)}
    ),
    st.fixed_dictionaries({"enum": st.lists(st.text(max_size=8), min_size=1, max_size=5)}),
    st.fixed_dictionaries({"type": st.just("string"), "pattern": st.from_regex(r"[a-z\[\]()|{}0-9,*+?]{0,30}", fullmatch=True)}),
)
_schema = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("array"), "items": inner}, optional={"minItems": st.integers(0, 1500), "maxItems": st.integers(0, 10**7)}
        ),
        st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.dictionaries(st.text("abcxyz", min_size=1, max_size=4), inner, max_size=4)}
        ),
        st.fixed_dictionaries({"anyOf": st.lists(inner, min_size=1, max_size=3)}),
    ),
    max_leaves=12,
)


@given(_schema)
def test_fuzz_schema_to_grammar_is_bounded(schema: dict[str, Any]) -> None:
    t0 = time.monotonic()
    try:
        text = g.schema_to_gbnf(schema)
    except ValidationError as err:
        assert err.status in (400, 422)
        assert err.param
        return
    assert time.monotonic() - t0 < 5.0, json.dumps(schema)[:200]
    g.check_grammar(text, param="x")  # whatever came out is within every bound
