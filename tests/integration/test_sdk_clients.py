"""Tool calling and client quirks through the official SDKs (openai, ollama) and LangChain, against a real daemon.

The default model (SmolLM2-135M) rarely chooses a tool by itself, so where a client can force a
call (OpenAI's tool_choice "required" or a named function) the call is asserted; where it
cannot (Ollama has no tool_choice) a test accepts plain text or a well-formed call, and a
follow-up step sends a call as the client would so it always runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pydantic
import pytest
from langchain_core.messages import AIMessage
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from ollama._utils import convert_function_to_tool

from tests.conftest import DaemonProc, http, requires_models
from tests.integration.test_openai_api import start_llm_daemon

pytestmark = requires_models()

MODEL = "smollm2-135m-instruct:q4_1"
EMBED = "all-minilm-l6-v2"
PERSONA = "mongars"
MAX_TOKENS = 64  # room for a call with two short arguments and its tags
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Get the current weather for a city.", "parameters": WEATHER_SCHEMA},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the current time in a timezone.",
            "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WEATHER_Q: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_RESULT = '{"city": "Paris", "temperature": 21, "unit": "celsius", "conditions": "sunny"}'


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, str]]:
    # One llama.cpp thread: on two cores shared with other jobs, two threads that wait on each other
    # at every layer make a reply take minutes instead of seconds.
    env = {
        "MONGARSD_INFERENCE__MAX_TOKENS_DEFAULT": str(MAX_TOKENS),
        "MONGARSD_INFERENCE__THREADS": "1",
        "MONGARSD_INFERENCE__THREADS_BATCH": "1",
    }
    d, token = start_llm_daemon(tmp_path_factory.mktemp("sdk"), env=env)
    yield d, token
    d.stop()


@pytest.fixture
def oai(served: tuple[DaemonProc, str]) -> Iterator[openai.OpenAI]:
    d, token = served
    with openai.OpenAI(base_url=d.url + "/v1", api_key=token, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def oll(served: tuple[DaemonProc, str]) -> Iterator[ollama.Client]:
    d, token = served
    c = ollama.Client(host=d.url, headers={"Authorization": "Bearer " + token}, timeout=60)
    try:
        yield c
    finally:
        c.close()  # type: ignore[no-untyped-call]  # its keep-alive connection


def assert_valid_args(name: str, args: object, schema: dict[str, Any]) -> None:
    assert isinstance(args, dict), f"{name}: arguments {args!r} are not an object"
    errors = [e.message for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(args)]
    assert not errors, f"{name}({json.dumps(args)}): {errors}"


def assert_openai_calls(message: Any, allowed: set[str]) -> None:
    """Assert MESSAGE carries at least one call, each to an allowed tool with JSON-string arguments valid for its schema."""
    assert message.tool_calls, f"no call: {message.content!r}"
    for call in message.tool_calls:
        assert call.type == "function" and call.id
        assert call.function.name in allowed, call.function.name
        assert_valid_args(call.function.name, json.loads(call.function.arguments), SCHEMAS[call.function.name])


# ---- openai -----------------------------------------------------------------------------------


def test_openai_required_tool_choice(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model=MODEL, messages=WEATHER_Q, tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS, temperature=0
    )
    assert r.choices[0].finish_reason == "tool_calls"
    assert_openai_calls(r.choices[0].message, set(SCHEMAS))


def test_openai_persona_returns_client_tools_as_calls(oai: openai.OpenAI) -> None:
    assert PERSONA in [m.id for m in oai.models.list()]
    r = oai.chat.completions.create(
        model=PERSONA, messages=WEATHER_Q, tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS, temperature=0
    )
    # the client's tools are the client's to run: the daemon hands the call back, unexecuted
    assert r.model == PERSONA and r.choices[0].finish_reason == "tool_calls"
    assert_openai_calls(r.choices[0].message, set(SCHEMAS))
    assert not r.choices[0].message.content


def test_openai_named_tool_choice(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=WEATHER_Q,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    assert_openai_calls(r.choices[0].message, {"get_time"})


def test_openai_tool_choice_none_answers_in_text(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model=MODEL, messages=WEATHER_Q, tools=TOOLS, tool_choice="none", max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert not choice.message.tool_calls and choice.finish_reason in ("stop", "length")
    assert choice.message.content and "<tool_call>" not in choice.message.content


def test_openai_streamed_call_deltas(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=WEATHER_Q,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, Any]] = {}
    reasons, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            reasons += [choice.finish_reason] if choice.finish_reason else []
            for delta in choice.delta.tool_calls or []:
                fn = delta.function
                assert fn is not None, delta
                if delta.index not in calls:
                    # the first delta of a call opens it whole: index, id, type, name and empty arguments
                    assert delta.id and delta.type == "function" and fn.name in SCHEMAS and fn.arguments == "", delta
                    calls[delta.index] = {"id": delta.id, "name": fn.name, "arguments": ""}
                else:
                    assert delta.id is None and delta.type is None and fn.name is None, f"repeated in a later delta: {delta}"
                    assert isinstance(fn.arguments, str), delta
                    calls[delta.index]["arguments"] += fn.arguments
    assert calls and sorted(calls) == list(range(len(calls))), calls
    assert len({c["id"] for c in calls.values()}) == len(calls)
    for call in calls.values():
        assert_valid_args(call["name"], json.loads(call["arguments"]), SCHEMAS[call["name"]])
    assert reasons == ["tool_calls"]
    assert usage is not None and usage.completion_tokens > 0


def test_openai_round_trip(oai: openai.OpenAI) -> None:
    first = oai.chat.completions.create(
        model=MODEL, messages=WEATHER_Q, tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS, temperature=0
    )
    call_msg = first.choices[0].message
    assert_openai_calls(call_msg, set(SCHEMAS))
    assert call_msg.tool_calls is not None
    messages: list[Any] = [*WEATHER_Q, call_msg.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": c.id, "content": WEATHER_RESULT} for c in call_msg.tool_calls]
    # Left on "auto", the tiny model calls the same tool again; "none" asks for the answer, as an
    # agent does once its loop budget is spent.
    final = oai.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=32, temperature=0)
    choice = final.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert choice.message.content and choice.message.content.strip()
    # the call and its result reached the prompt: longer than the question alone under the same tool_choice
    alone = oai.chat.completions.create(model=MODEL, messages=WEATHER_Q, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert final.usage is not None and alone.usage is not None and final.usage.prompt_tokens > alone.usage.prompt_tokens + 20


class Sunny(pydantic.BaseModel):
    city: str
    sunny: bool


def test_openai_parse_with_a_pydantic_response_format(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Is it sunny in Paris? Answer in JSON."}],
        response_format=Sunny,
        max_tokens=32,
        temperature=0,
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Sunny) and parsed.city


class GetWeather(pydantic.BaseModel):
    """Get the current weather for a city."""

    city: str
    unit: str


def test_openai_strict_tool(oai: openai.OpenAI) -> None:
    tool = openai.pydantic_function_tool(GetWeather)
    assert tool["function"].get("strict") is True and tool["function"]["parameters"]["additionalProperties"] is False
    r = oai.chat.completions.parse(
        model=MODEL, messages=WEATHER_Q, tools=[tool], tool_choice="required", max_tokens=MAX_TOKENS, temperature=0
    )
    calls = r.choices[0].message.tool_calls or []
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for call in calls:
        assert call.function.name == "GetWeather"
        assert isinstance(call.function.parsed_arguments, GetWeather)
        assert set(json.loads(call.function.arguments)) == {"city", "unit"}  # strict: nothing else


# ---- ollama -----------------------------------------------------------------------------------


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather for a city.

    Args:
        city: The city name, e.g. Paris
        unit: celsius or fahrenheit
    """
    return WEATHER_RESULT


OLLAMA_WEATHER = convert_function_to_tool(get_weather).model_dump(exclude_none=True)


def assert_ollama_calls(calls: Any) -> None:
    """Assert each call names get_weather with arguments an object matching the function's parameters."""
    for call in calls or []:
        assert call.function.name == "get_weather", call
        args = dict(call.function.arguments)
        assert_valid_args("get_weather", args, OLLAMA_WEATHER["function"]["parameters"])
        assert set(args) <= {"city", "unit"}


def test_ollama_python_function_as_tool(oll: ollama.Client) -> None:
    # ollama-python turns the function into a schema: both parameters required, descriptions from Args
    assert OLLAMA_WEATHER["function"]["parameters"]["required"] == ["city", "unit"]
    r = oll.chat(model=MODEL, messages=WEATHER_Q, tools=[get_weather], options={"temperature": 0, "num_predict": MAX_TOKENS})
    assert r.done and r.done_reason in ("stop", "length") and r.message.role == "assistant"
    # no tool_choice on this surface: the model may answer in text
    assert r.message.tool_calls or (r.message.content or "").strip()
    assert_ollama_calls(r.message.tool_calls)


def test_ollama_stream_with_tools(oll: ollama.Client) -> None:
    lines = list(
        oll.chat(model=MODEL, messages=WEATHER_Q, tools=[get_weather], options={"temperature": 0, "num_predict": MAX_TOKENS}, stream=True)
    )
    assert all(not line.done for line in lines[:-1]) and lines[-1].done
    final = lines[-1]
    for value in (final.eval_count, final.prompt_eval_count, final.total_duration, final.eval_duration, final.prompt_eval_duration):
        assert isinstance(value, int) and value > 0, final
    assert final.done_reason in ("stop", "length")
    calls = [c for line in lines for c in line.message.tool_calls or []]
    # a call arrives whole on one line: arguments are already the complete object
    assert_ollama_calls(calls)
    assert calls or "".join(line.message.content or "" for line in lines).strip()


def test_ollama_tool_result_follow_up_with_tool_name(oll: ollama.Client) -> None:
    first = oll.chat(model=MODEL, messages=WEATHER_Q, tools=[get_weather], options={"temperature": 0, "num_predict": MAX_TOKENS})
    assert_ollama_calls(first.message.tool_calls)
    calls = [{"function": {"name": c.function.name, "arguments": dict(c.function.arguments)}} for c in first.message.tool_calls or []]
    # without a call from the model, send the one a user script would have run
    calls = calls or [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]
    messages: list[Any] = [*WEATHER_Q, {"role": "assistant", "tool_calls": calls}]
    messages += [{"role": "tool", "content": WEATHER_RESULT, "tool_name": c["function"]["name"]} for c in calls]
    # room for a whole call: the tiny model often calls again, and a call the cap cuts is dropped
    r = oll.chat(model=MODEL, messages=messages, tools=[get_weather], options={"temperature": 0, "num_predict": MAX_TOKENS})
    assert r.done and r.done_reason in ("stop", "length")
    assert_ollama_calls(r.message.tool_calls)
    assert r.message.tool_calls or (r.message.content or "").strip()
    # the result is in the prompt (a call repeating the answered one is asked again for text, without the tool list)
    assert r.prompt_eval_count and r.prompt_eval_count > len(WEATHER_RESULT) // 8


def _loaded(oll: ollama.Client) -> dict[str, str]:
    return {m.model or "": str(m.expires_at) for m in oll.ps().models}


def test_ollama_keep_alive_forms(oll: ollama.Client, served: tuple[DaemonProc, str]) -> None:
    d, token = served
    hi = [{"role": "user", "content": "Hi"}]
    for keep_alive in (-1, -1.0, "300s", "5m"):
        r = oll.chat(model=MODEL, messages=hi, options={"num_predict": 1}, keep_alive=keep_alive)
        assert r.done, keep_alive
        expires = _loaded(oll).get(MODEL)
        assert expires is not None, keep_alive
        assert expires.startswith("9999") == (keep_alive in (-1, -1.0)), (keep_alive, expires)
    # ollama-python sends -1 as -1.0: the integer form is what Open WebUI sends
    raw = http(
        "POST",
        d.url + "/api/chat",
        {"model": MODEL, "messages": hi, "stream": False, "keep_alive": -1, "options": {"num_predict": 1}},
        token=token,
    )
    assert raw.status == 200 and raw.json()["done"], raw.body[:300]
    for keep_alive in (0, "0s"):
        r = oll.chat(model=MODEL, messages=hi, options={"num_predict": 1}, keep_alive=keep_alive)
        assert r.done, keep_alive
        deadline = time.monotonic() + 5
        while MODEL in _loaded(oll) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert MODEL not in _loaded(oll), keep_alive
    oll.chat(model=MODEL, messages=hi, options={"num_predict": 1}, keep_alive=-1)  # loaded again for the tests after


def test_open_webui_latest_ids(oll: ollama.Client, oai: openai.OpenAI) -> None:
    # Open WebUI appends ":latest" to an id without a tag before every Ollama call
    for model in (MODEL.split(":", maxsplit=1)[0] + ":latest", PERSONA + ":latest"):
        r = oll.chat(model=model, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2})
        assert r.done and r.message.content is not None, model
    assert len(oll.embed(model=EMBED + ":latest", input=["a cat"]).embeddings[0]) == 384
    assert len(oai.embeddings.create(model=EMBED + ":latest", input=["a cat"]).data[0].embedding) == 384


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/tags", None),
        ("/api/embed", {"model": EMBED + ":latest", "input": ["a cat"], "truncate": True}),
        ("/v1/embeddings", {"model": EMBED, "input": ["a cat"]}),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": False, "options": {"num_predict": 2}}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ],
)
def test_empty_bearer_is_accepted_on_loopback(served: tuple[DaemonProc, str], path: str, body: dict[str, Any] | None) -> None:
    # Open WebUI's RAG clients always send the header, "Bearer " when no key is set; the openai
    # SDK and httpx refuse to send it, so this goes through the standard library as requests does.
    d, _ = served
    r = http("GET" if body is None else "POST", d.url + path, body, headers={"Authorization": "Bearer "})
    assert r.status == 200, r.body[:300]


# ---- LangChain --------------------------------------------------------------------------------


def test_langchain_chat_ollama_bind_tools(served: tuple[DaemonProc, str]) -> None:
    d, token = served
    transport = httpx.HTTPTransport()
    try:
        llm = ChatOllama(
            model=MODEL,
            base_url=d.url,
            temperature=0,
            num_predict=MAX_TOKENS,
            client_kwargs={"headers": {"Authorization": "Bearer " + token}},
            sync_client_kwargs={"transport": transport},
        )
        reply = llm.bind_tools([get_weather]).invoke("What is the weather in Paris?")
    finally:
        transport.close()
    assert isinstance(reply, AIMessage)
    # ChatOllama cannot force a call: text, or a well-formed call
    assert reply.tool_calls or (isinstance(reply.content, str) and reply.content.strip())
    for call in reply.tool_calls:
        assert call["name"] == "get_weather" and call["id"]
        assert_valid_args("get_weather", call["args"], OLLAMA_WEATHER["function"]["parameters"])
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] > 0


@pytest.mark.parametrize("tool_choice", ["required", "get_time"])
def test_langchain_chat_openai_bind_tools_forced(served: tuple[DaemonProc, str], tool_choice: str) -> None:
    d, token = served
    with httpx.Client(timeout=60) as client:
        llm = ChatOpenAI(
            model=MODEL,
            base_url=d.url + "/v1",
            api_key=pydantic.SecretStr(token),
            temperature=0,
            max_completion_tokens=MAX_TOKENS,  # the field's alias; sent as max_completion_tokens
            max_retries=0,
            http_client=client,
        )
        reply = llm.bind_tools(TOOLS, tool_choice=tool_choice).invoke("What is the weather in Paris?")
    assert isinstance(reply, AIMessage)
    assert reply.tool_calls and not reply.invalid_tool_calls, reply
    allowed = set(SCHEMAS) if tool_choice == "required" else {tool_choice}
    for call in reply.tool_calls:
        assert call["name"] in allowed and call["id"]
        assert_valid_args(call["name"], call["args"], SCHEMAS[call["name"]])
    assert reply.response_metadata.get("finish_reason") == "tool_calls"
