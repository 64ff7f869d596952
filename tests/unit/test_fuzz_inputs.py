"""Fuzz every request decoder and validator: a hostile value gets a ValidationError naming a field, nothing else.

`make test` runs a bounded number of examples; `make fuzz` (HYPOTHESIS_PROFILE=fuzz) runs many more.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mongarsd.api import ollama, openai
from mongarsd.api.io import MAX_JSON_DEPTH, get_number, parse_json_text, sanitize_json
from mongarsd.api.messages import normalize_messages
from mongarsd.cognition import personality
from mongarsd.cognition.pipeline import sanitize_message, validate_session_id
from mongarsd.errors import MongarsError, ValidationError
from mongarsd.inference.manager import parse_keep_alive
from mongarsd.inference.sampling import build_params
from mongarsd.sanitize import MAX_JSON_INT_DIGITS, clean_text, clean_value

# ----------------------------------------------------------------------------------------
# The JSON decoder itself


def test_huge_integers_name_their_field() -> None:
    with pytest.raises(ValidationError) as info:
        parse_json_text('{"options": {"seed": ' + "9" * 5000 + "}}")
    assert info.value.param == "options.seed"
    with pytest.raises(ValidationError) as info:
        parse_json_text('{"a": [1, 2, -' + "9" * (MAX_JSON_INT_DIGITS + 1) + "]}")
    assert info.value.param == "a[2]"
    assert parse_json_text('{"a": ' + "9" * MAX_JSON_INT_DIGITS + "}")["a"] == int("9" * MAX_JSON_INT_DIGITS)


@pytest.mark.parametrize("literal", ["1e400", "-1e999", "NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(literal: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_json_text('{"temperature": ' + literal + "}")
    assert info.value.param in ("temperature", "body")


def test_lone_surrogates_become_replacement_characters_keys_included() -> None:
    data = parse_json_text('{"a\\ud800": ["x\\udfffy", {"k": "\\ud83d\\ude00 ok"}]}')
    assert data == {"a\ufffd": ["x\ufffdy", {"k": "\U0001f600 ok"}]}
    json.dumps(data, ensure_ascii=False).encode("utf-8")  # encodable


def test_key_order_survives_cleaning() -> None:
    data = parse_json_text('{"z": 1, "\\ud800": 2, "a": 3}')
    assert list(data) == ["z", "\ufffd", "a"]


def test_depth_limit() -> None:
    deep: Any = "x"
    for _ in range(MAX_JSON_DEPTH + 2):
        deep = [deep]
    with pytest.raises(ValidationError, match="nested too deeply"):
        sanitize_json(deep)


def test_get_number_never_overflows() -> None:
    for value in (10**39, -(10**39), 1e300):
        with pytest.raises(ValidationError) as info:
            get_number({"n": value}, "n", lo=0, hi=10, integer=True)
        assert info.value.param == "n"
    assert get_number({"n": None}, "n", default=3.0) == 3.0


def test_stored_values_are_cleaned() -> None:
    value, changed = clean_value({"note": "a\ud800", "list": ["ok", "\udc00"], 3: 4})
    assert changed
    assert value == {"note": "a\ufffd", "list": ["ok", "\ufffd"], 3: 4}
    assert clean_value({"fine": ["yes"]}) == ({"fine": ["yes"]}, False)
    assert clean_text("plain") == "plain"


_json_text = st.one_of(
    st.text(max_size=200),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=20,
    ).map(json.dumps),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
)


@given(_json_text)
def test_fuzz_json_decoder(text: str) -> None:
    try:
        data = parse_json_text(text)
    except ValidationError as err:
        assert err.param
        return
    json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8")  # whatever is accepted is encodable and finite


# ----------------------------------------------------------------------------------------
# Per-route parsers: hostile bodies give ValidationError (or another MongarsError), never a crash

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**39), max_value=10**39),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["json", "user", "system", "assistant", "tool", "text", "json_schema", "json_object", "5m", "-1", "1e3"]),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(["type", "role", "content", "text", "schema", "maxLength", "minItems", "items", "json_schema", "properties"]),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)
_KEYS = [
    "model", "messages", "prompt", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "response_format", "format", "options", "keep_alive", "stream_options", "n", "tools", "system", "raw",
    "input", "traits", "interaction_style", "note", "repeat_penalty", "presence_penalty", "logprobs", "think",
]  # fmt: skip
_body = st.dictionaries(st.sampled_from(_KEYS), _value, max_size=8)
_good_messages = st.just([{"role": "user", "content": "hi"}])


def _route_parsers() -> list[tuple[str, Callable[[dict[str, Any]], object]]]:
    return [
        ("openai.chat", openai.parse_chat_request),
        ("openai.completion", openai.parse_completion_request),
        ("openai.embed_input", lambda b: openai.parse_embed_input(b.get("input"))),
        ("ollama.chat", ollama.parse_chat),
        ("ollama.generate", ollama.parse_generate),
        ("ollama.options", lambda b: ollama.parse_options(b.get("options"), b.get("format"))),
        ("messages", lambda b: normalize_messages(b.get("messages"))),
        ("keep_alive", lambda b: parse_keep_alive(b.get("keep_alive"))),
        ("profile", personality.validate_edit),
        ("native.message", lambda b: sanitize_message(b.get("prompt"))),
        ("native.session", lambda b: validate_session_id(b.get("model"))),
    ]


@pytest.mark.parametrize(("name", "parse"), _route_parsers(), ids=[n for n, _ in _route_parsers()])
@given(body=_body, messages=_good_messages, model=st.sampled_from(["smollm2-135m-instruct:q4_1", "mongars", ""]))
def test_fuzz_route_parsers(name: str, parse: Callable[[dict[str, Any]], object], body: dict[str, Any], messages: Any, model: str) -> None:
    for candidate in (body, {"model": model, "messages": messages, **body}):
        try:
            parsed = parse(candidate)
        except MongarsError as err:
            assert str(err)
            continue
        spec = getattr(parsed, "spec", None)
        if spec is not None:  # a parsed request also turns into engine parameters without surprises
            try:
                params = build_params(spec, n_prompt=10, n_ctx=2048, max_tokens_default=64)
            except MongarsError:
                continue
            assert 1 <= params.max_tokens <= 2048
            assert math.isfinite(params.temperature)
