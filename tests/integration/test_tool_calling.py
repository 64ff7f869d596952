"""Tool calls with the real llama.cpp and the default model: forced calls always match their schema,
a lazy grammar takes over when the model opens a call, and the persona runs its own hands."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_asyncio

from mongarsd.inference.llm import LlamaEngine
from mongarsd.inference.sampling import GenerationParams
from mongarsd.inference.tools import CALL_OPEN, ToolChoice, ToolSet, ToolSpec, constraint_for, prepare_messages, split_reply
from tests.conftest import DEFAULT_EMBEDDER, DEFAULT_LLM, DaemonProc, requires_models, start_daemon
from tests.integration.test_llm_engine import make_engine

pytestmark = [requires_models(DEFAULT_LLM)]

SCHEMAS: dict[str, dict[str, Any]] = {
    "set_thermostat": {
        "type": "object",
        "properties": {
            "room": {"enum": ["kitchen", "bedroom", "hall"]},
            "celsius": {"type": "integer", "minimum": 5, "maximum": 30},
            "eco": {"type": "boolean"},
        },
        "required": ["room", "celsius"],
    },
    "add_items": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
            "list": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 16}, "shared": {"type": "boolean"}},
                "required": ["name"],
            },
        },
        "required": ["items", "list"],
    },
    "no_arguments": {"type": "object", "properties": {}},
}
TOOLS = tuple(ToolSpec(name, "a test tool", schema) for name, schema in SCHEMAS.items())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[LlamaEngine]:
    eng = make_engine(slots=2)
    await eng.async_start()
    yield eng
    await eng.async_stop()


async def generate(eng: LlamaEngine, tokens: list[int], params: GenerationParams) -> str:
    parts: list[str] = []
    async for ev in eng.async_generate(tokens, params):
        parts.append(ev.text)
    return "".join(parts)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("seed", range(4))
async def test_forced_calls_always_match_their_schema(engine: LlamaEngine, seed: int) -> None:
    """Hot sampling (temperature 1.5) cannot produce a call that does not parse or match its schema."""
    ts = ToolSet(TOOLS, ToolChoice("required"), parallel=False)
    msgs, _ = prepare_messages([{"role": "user", "content": "Do something useful with the house and the shopping."}], ts, native=False)
    tokens = await engine.async_tokenize(engine.apply_chat_template(msgs), True, True)
    params = GenerationParams(max_tokens=160, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=seed, tools=constraint_for(ts))
    text = await generate(engine, tokens, params)
    content, calls, dropped = split_reply(text, ts)
    if dropped:  # only a call cut by max_tokens may be dropped: the text then ends inside it
        assert not text.rstrip().endswith("</tool_call>")
    assert calls, "a forced reply makes at least one call: " + text[:300]
    assert content == ""
    for c in calls:
        jsonschema.validate(c.arguments, SCHEMAS[c.name])


@pytest.mark.asyncio(loop_scope="module")
async def test_named_choice_calls_that_tool(engine: LlamaEngine) -> None:
    ts = ToolSet(TOOLS, ToolChoice("function", "set_thermostat"), parallel=False)
    msgs, _ = prepare_messages([{"role": "user", "content": "Make the bedroom warm."}], ts, native=False)
    tokens = await engine.async_tokenize(engine.apply_chat_template(msgs), True, True)
    text = await generate(engine, tokens, GenerationParams(max_tokens=120, temperature=0.0, tools=constraint_for(ts)))
    _, calls, _ = split_reply(text, ts)
    assert [c.name for c in calls] == ["set_thermostat"]
    jsonschema.validate(calls[0].arguments, SCHEMAS["set_thermostat"])


@pytest.mark.asyncio(loop_scope="module")
async def test_lazy_grammar_takes_over_once_the_model_opens_a_call(engine: LlamaEngine) -> None:
    """auto: free text first; once the model writes the call tag, the call follows the schema.

    The prompt makes the model copy a call whose argument the schema does not allow ("blue"):
    under the grammar the copied call can only carry an allowed value.
    """
    schema = {"type": "object", "properties": {"color": {"enum": ["green"]}}, "required": ["color"]}
    ts = ToolSet((ToolSpec("paint", "paint the wall", schema),), ToolChoice("auto"))
    example = CALL_OPEN + '\n{"name": "paint", "arguments": {"color": "blue"}}\n</tool_call>\n'
    prompt = "Here is the same line, five times:\n" + example * 5 + "And once more:\n"
    tokens = await engine.async_tokenize(prompt, True, False)
    free = await generate(engine, tokens, GenerationParams(max_tokens=40, temperature=0.0))
    assert '"blue"' in free, "without a grammar the model copies the example: " + free
    constrained = await generate(engine, tokens, GenerationParams(max_tokens=40, temperature=0.0, tools=constraint_for(ts)))
    _, calls, _ = split_reply(constrained, ts)
    assert calls, constrained
    assert calls[0].arguments == {"color": "green"}


# ------------------------------------------------------------------------------ the persona's hands


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    tmp: Path = tmp_path_factory.mktemp("hands")
    d = start_daemon(tmp, models=True, env={"MONGARSD_INFERENCE__MAX_TOKENS_DEFAULT": "64"})
    yield d
    d.stop()


@requires_models(DEFAULT_LLM, DEFAULT_EMBEDDER)
def test_persona_uses_the_calculator_when_told(served: DaemonProc) -> None:
    r = served.post(
        "/api/v1/conversation/chat",
        {"message": "Use the calculator: what is 17 * 23?", "session_id": "calc", "temperature": 0},
        timeout=300,
    )
    assert r.status == 200, r.body
    body = r.json()
    assert body["hands_used"][0]["name"] == "calculator"
    assert body["hands_used"][0]["ok"] is True
    assert body["hands_used"][0]["result"]["result"] == 391
    history = served.get("/api/v1/conversation/history?session_id=calc").json()["messages"]
    roles = [m["role"] for m in history]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert history[1]["tool_calls"][0]["name"] == "calculator"
    assert history[2]["tool_name"] == "calculator"
    assert json.loads(history[2]["content"])["result"]["result"] == 391
    assert history[3]["content"] == body["response"]


@requires_models(DEFAULT_LLM, DEFAULT_EMBEDDER)
def test_persona_returns_client_tools_as_calls(served: DaemonProc) -> None:
    """A client's own tools are never run by the daemon: the call goes back to the client, and the
    client's result continues the turn."""
    tool = {"type": "function", "function": {"name": "open_garage", "parameters": {"type": "object", "properties": {}}}}
    first = served.post(
        "/v1/chat/completions",
        {
            "model": "mongars",
            "messages": [{"role": "user", "content": "Open the garage please"}],
            "tools": [tool],
            "tool_choice": "required",
            "temperature": 0,
        },
        timeout=300,
    )
    assert first.status == 200, first.body
    choice = first.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["open_garage"]
    follow = served.post(
        "/v1/chat/completions",
        {
            "model": "mongars",
            "messages": [
                {"role": "user", "content": "Open the garage please"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": calls[0]["id"], "content": "the garage is open"},
            ],
            "tools": [tool],
            "temperature": 0,
        },
        timeout=300,
    )
    assert follow.status == 200, follow.body
    assert follow.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    history = served.get("/api/v1/conversation/history?session_id=default").json()["messages"]
    assert [m["role"] for m in history][-4:] == ["user", "assistant", "tool", "assistant"]
    assert history[-3]["tool_calls"][0]["name"] == "open_garage"
    assert history[-2]["content"] == "the garage is open"
