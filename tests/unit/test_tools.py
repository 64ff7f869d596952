"""Tool calling, pure parts: request parsing, prompts, grammar assembly, output parsing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mongarsd.api.messages import normalize_messages, parse_tool_choice, parse_tools
from mongarsd.errors import ValidationError
from mongarsd.inference.events import TokenEvent
from mongarsd.inference.grammar import check_grammar, schema_to_gbnf
from mongarsd.inference.sampling import SamplingSpec, build_params, validate_params
from mongarsd.inference.tools import (
    CALL_CLOSE,
    CALL_OPEN,
    FINISH_REPEATED,
    FINISH_TOOL_CALLS,
    NO_TOOLS,
    RESULTS_TAIL,
    ToolCallEvent,
    ToolChoice,
    ToolSet,
    ToolSpec,
    ToolStreamParser,
    answered_calls,
    async_split_calls,
    call_key,
    call_schema,
    constraint_for,
    either_grammar,
    prepare_messages,
    split_reply,
    template_supports_tools,
    with_tools,
    without_tools,
    wrap_call_grammar,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
LIGHT = {"type": "function", "function": {"name": "HassTurnOn", "parameters": {"type": "object", "properties": {}}}}


def toolset(*raw: dict[str, Any], choice: ToolChoice | None = None) -> ToolSet:
    return ToolSet(parse_tools(list(raw)), choice or ToolChoice("auto"))


def call(name: str, args: dict[str, Any]) -> str:
    return CALL_OPEN + "\n" + json.dumps({"name": name, "arguments": args}) + "\n" + CALL_CLOSE


# ------------------------------------------------------------------------------ parsing requests


def test_parse_tools_reads_both_surfaces_shape() -> None:
    tools = parse_tools([WEATHER, LIGHT])
    assert [t.name for t in tools] == ["get_weather", "HassTurnOn"]
    assert tools[0].parameters["required"] == ["city"]
    assert tools[1].parameters == {"type": "object", "properties": {}}
    assert parse_tools(None) == ()


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ("nope", "tools"),
        ([1], "tools[0]"),
        ([{"type": "retrieval"}], "tools[0].type"),
        ([{"type": "function"}], "tools[0].function"),
        ([{"type": "function", "function": {"name": "bad name!"}}], "tools[0].function.name"),
        ([WEATHER, WEATHER], "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string", "minLength": 10**9}}}], None),
    ],
)
def test_parse_tools_names_the_bad_field(raw: object, param: str | None) -> None:
    with pytest.raises(ValidationError) as err:
        parse_tools(raw)
    if param is not None:
        assert err.value.param == param
    else:
        assert str(err.value.param).startswith("tools[0].function.parameters")


def test_tool_choice_forms() -> None:
    tools = parse_tools([WEATHER])
    assert parse_tool_choice(None, tools) == ToolChoice("auto")
    assert parse_tool_choice("none", tools) == ToolChoice("none")
    assert parse_tool_choice("required", tools) == ToolChoice("required")
    named = parse_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools)
    assert named == ToolChoice("function", "get_weather")
    with pytest.raises(ValidationError, match="not among the tools"):
        parse_tool_choice({"type": "function", "function": {"name": "other"}}, tools)
    with pytest.raises(ValidationError, match="no tools"):
        parse_tool_choice("required", ())
    with pytest.raises(ValidationError):
        parse_tool_choice("sometimes", tools)


def test_history_calls_from_openai_and_ollama() -> None:
    msgs = normalize_messages(
        [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            # Ollama / Home Assistant: arguments as an object, no id, no content key, tool turn without name
            {"role": "assistant", "tool_calls": [{"function": {"index": 0, "name": "HassTurnOn", "arguments": {}}}]},
            {"role": "tool", "content": '{"success": true}'},
            {"role": "tool", "tool_name": "HassTurnOn", "content": "ok"},
        ]
    )
    assert msgs[1]["tool_calls"] == [{"id": "c1", "name": "get_weather", "arguments": {"city": "Paris"}}]
    assert msgs[1]["content"] == ""
    assert msgs[2]["tool_name"] == "get_weather"  # found through the call id
    assert msgs[3]["tool_calls"][0]["name"] == "HassTurnOn"
    assert "tool_name" not in msgs[4]
    assert msgs[5]["tool_name"] == "HassTurnOn"


@pytest.mark.parametrize(
    ("arguments", "match"),
    [("{not json", "must be a JSON object"), ("[1, 2]", "must be a JSON object"), (7, "must be a JSON object")],
)
def test_history_call_arguments_must_be_an_object(arguments: object, match: str) -> None:
    with pytest.raises(ValidationError, match=match) as err:
        normalize_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": arguments}}]}])
    assert err.value.param == "messages[0].tool_calls[0].function.arguments"


# ------------------------------------------------------------------------------ constraints and grammar


def test_constraint_modes() -> None:
    assert constraint_for(NO_TOOLS) is None
    assert constraint_for(toolset(WEATHER, choice=ToolChoice("none"))) is None
    auto = constraint_for(toolset(WEATHER, LIGHT))
    assert auto is not None
    assert auto.lazy
    assert len(auto.schema["oneOf"]) == 2
    forced = constraint_for(toolset(WEATHER, LIGHT, choice=ToolChoice("function", "HassTurnOn")))
    assert forced is not None
    assert not forced.lazy
    assert forced.schema["properties"]["name"] == {"const": "HassTurnOn"}
    single = constraint_for(ToolSet(parse_tools([WEATHER]), ToolChoice("required"), parallel=False))
    assert single is not None
    assert single.max_calls == 1


def test_tools_and_a_json_format_share_one_grammar() -> None:
    spec = with_tools(SamplingSpec(json_mode=True), toolset(WEATHER))
    assert spec.tools is not None
    assert not spec.tools.lazy
    assert spec.tools.text_json
    assert not spec.json_mode
    params = build_params(spec, n_prompt=10, n_ctx=512, max_tokens_default=32)
    validate_params(params, n_ctx=512)  # one constraint, not two


def test_call_grammar_renames_root_but_not_literals() -> None:
    schema = {"type": "object", "properties": {"mode": {"enum": ["root", "user"]}}, "required": ["mode"]}
    text = wrap_call_grammar(schema_to_gbnf(call_schema([ToolSpec("setmode", "", schema)])), 3)
    lines = text.splitlines()
    assert sum(1 for line in lines if line.startswith("root ::=")) == 1
    assert any(line.startswith("tool-call-json ::=") for line in lines)
    assert '"\\"root\\""' in text  # the enum value is untouched
    assert "{0,2}" in text
    check_grammar(text, param="tools")


def test_either_grammar_prefixes_the_format_rules() -> None:
    calls = wrap_call_grammar(schema_to_gbnf(call_schema(parse_tools([WEATHER]))), 1)
    fmt = schema_to_gbnf({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]})
    both = either_grammar(calls, fmt)
    defined = [line.split("::=")[0].strip() for line in both.splitlines() if "::=" in line]
    assert len(defined) == len(set(defined)), "rule names collide"
    assert "root ::= tc-root | fmt-root" in both
    assert "fmt-root ::=" in both


# ------------------------------------------------------------------------------ prompts


def test_generic_prompt_lists_tools_and_rewrites_tool_turns() -> None:
    ts = toolset(WEATHER)
    history = normalize_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
        ]
    )
    msgs, template_tools = prepare_messages(history, ts, native=False)
    assert template_tools is None
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.")
    assert '"name": "get_weather"' in msgs[0]["content"]
    assert CALL_OPEN in msgs[2]["content"]
    assert msgs[3]["content"].count("Result of the get_weather tool") == 2
    assert msgs[3]["content"].endswith(RESULTS_TAIL)
    assert set(msgs[3]) == {"role", "content"}


def test_native_prompt_passes_tools_to_the_template() -> None:
    ts = toolset(WEATHER)
    history = normalize_messages(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    )
    msgs, template_tools = prepare_messages(history, ts, native=True)
    assert template_tools == [WEATHER | {"function": WEATHER["function"]}]
    assert msgs[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {}}
    assert msgs[2]["tool_call_id"] == "c1"
    assert template_supports_tools("{% if tools %}<tool_call>{% endif %}")
    assert not template_supports_tools("{{ messages }}")
    assert not template_supports_tools(None)


def test_no_tools_offered_means_no_tool_text() -> None:
    msgs, _ = prepare_messages([{"role": "user", "content": "hi"}], toolset(WEATHER, choice=ToolChoice("none")), native=False)
    assert msgs == [{"role": "user", "content": "hi"}]


# ------------------------------------------------------------------------------ output


def test_stream_parser_holds_back_a_partial_tag() -> None:
    parser = ToolStreamParser(toolset(WEATHER))
    out = parser.feed("Let me check. <tool")
    assert [p.text for p in out] == ["Let me check. "]
    assert parser.feed("_ca") == []
    out = parser.feed('ll>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert len(out) == 1
    assert out[0].call is not None
    assert out[0].call.arguments == {"city": "Oslo"}
    assert out[0].call.id.startswith("call_")
    assert parser.finish() == []


def test_stream_parser_releases_text_that_only_looked_like_a_tag() -> None:
    parser = ToolStreamParser(toolset(WEATHER))
    pieces = parser.feed("a <tool") + parser.feed("box> b") + parser.finish()
    assert "".join(p.text for p in pieces) == "a <toolbox> b"
    assert parser.calls == []


def test_split_reply_counts_cut_and_unknown_calls() -> None:
    ts = toolset(WEATHER)
    content, calls, dropped = split_reply(call("get_weather", {"city": "Rome"}) + "\n" + call("launch_missiles", {}), ts)
    assert content == ""
    assert [c.name for c in calls] == ["get_weather"]
    assert dropped == 1
    content, calls, dropped = split_reply("Sure. " + CALL_OPEN + '\n{"name": "get_wea', ts)
    assert content == "Sure. "
    assert calls == []
    assert dropped == 1


def test_text_passes_untouched_without_tools() -> None:
    content, calls, _ = split_reply("literal " + CALL_OPEN + " text", NO_TOOLS)
    assert content == "literal " + CALL_OPEN + " text"
    assert calls == []


# ------------------------------------------------------------------------------ repeated calls


async def _events(*texts: str) -> AsyncIterator[TokenEvent]:
    for t in texts:
        yield TokenEvent(t, 1)
    yield TokenEvent("", -1, finish_reason="stop", prompt_tokens=7, completion_tokens=len(texts))


async def _collect(events: AsyncIterator[Any]) -> list[Any]:
    return [e async for e in events]


def test_answered_calls_are_those_after_the_last_user_message() -> None:
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]},
        {"role": "user", "content": "b"},
        {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "content": "cold"},
    ]
    keys = answered_calls(msgs)
    assert keys == {call_key("get_weather", {"city": "Oslo"})}


@pytest.mark.asyncio
async def test_a_call_already_answered_asks_for_text_instead() -> None:
    ts = toolset(WEATHER)
    answered = frozenset({call_key("get_weather", {"city": "Oslo"})})
    out = await _collect(async_split_calls(_events(call("get_weather", {"city": "Oslo"})), ts, prompt_tokens=7, answered=answered))
    assert [type(e).__name__ for e in out] == ["TokenEvent"]
    assert out[-1].finish_reason == FINISH_REPEATED
    assert out[-1].prompt_tokens == 7


@pytest.mark.asyncio
async def test_a_call_repeated_within_the_reply_ends_it() -> None:
    ts = toolset(WEATHER)
    text = (
        call("get_weather", {"city": "Rome"}) + "\n" + call("get_weather", {"city": "Rome"}) + "\n" + call("get_weather", {"city": "Oslo"})
    )
    out = await _collect(async_split_calls(_events(text), ts))
    calls = [e for e in out if isinstance(e, ToolCallEvent)]
    assert [c.call.arguments for c in calls] == [{"city": "Rome"}]
    assert out[-1].finish_reason == FINISH_TOOL_CALLS


def test_without_tools_keeps_the_json_format_and_stops_at_a_copied_call() -> None:
    spec = with_tools(SamplingSpec(json_mode=True), toolset(WEATHER))
    plain = without_tools(spec)
    assert plain.tools is None
    assert plain.json_mode
    assert CALL_OPEN in plain.stop


def test_a_keep_alive_past_year_9999_reads_as_forever() -> None:
    """A keep_alive of 1e16 s once made /api/ps answer 500 for everyone."""
    from mongarsd.api.ollama import FOREVER_ISO, _expires_iso

    assert _expires_iso(1e16) == FOREVER_ISO
    assert _expires_iso(float("inf")) == FOREVER_ISO
    assert _expires_iso(0.0) == "1970-01-01T00:00:00Z"
