"""The OpenAI surface against a real daemon with the real default models, with the official client."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import DaemonProc, http, requires_models, run_cli, start_daemon

pytestmark = requires_models()
MODEL = "smollm2-135m-instruct:q4_1"
EMBED = "all-minilm-l6-v2"
HI = [{"role": "user", "content": "Say hello."}]


def start_llm_daemon(tmp: Path, *, env: dict[str, str] | None = None, args: list[str] | None = None) -> tuple[DaemonProc, str]:
    """Start a daemon with the default models and a user token (clients always send a key)."""
    (tmp / "none.toml").write_text("")
    created = run_cli(
        "token",
        "create",
        "--user",
        "tester",
        "--role",
        "user",
        "--state-dir",
        str(tmp / "state"),
        env={"MONGARSD_CONFIG": str(tmp / "none.toml")},
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    return start_daemon(tmp, models=True, env=env, args=args), token


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, str]]:
    d, token = start_llm_daemon(tmp_path_factory.mktemp("openai"))
    yield d, token
    d.stop()


@pytest.fixture
def client(served: tuple[DaemonProc, str]) -> Iterator[openai.OpenAI]:
    d, token = served
    with openai.OpenAI(base_url=d.url + "/v1", api_key=token, max_retries=0, timeout=60) as c:
        yield c


def post(served: tuple[DaemonProc, str], path: str, body: Any) -> Any:
    d, token = served
    return http("POST", d.url + path, body, token=token)


def test_chat_plain(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and 1 <= r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens > 5 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens is not None


def test_chat_prefix_cache_reported(client: openai.OpenAI) -> None:
    msgs = [{"role": "system", "content": "You are a terse assistant. " * 10}, *HI]
    client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)  # type: ignore[arg-type]
    again = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)  # type: ignore[arg-type]
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert (again.usage.prompt_tokens_details.cached_tokens or 0) >= again.usage.prompt_tokens - 1


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    roles, text, reasons, usage = [], [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            text.append(ch.delta.content or "")
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    assert roles == ["assistant"]
    assert "".join(text).strip()
    assert reasons in (["stop"], ["length"])
    assert usage is not None and 1 <= usage.completion_tokens <= 8


def test_sse_wire_format(served: tuple[DaemonProc, str]) -> None:
    r = post(served, "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 4, "stream": True})
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in r.body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage


def test_json_schema_output(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is water wet? Answer in JSON."}],
        max_tokens=16,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    assert r.choices[0].finish_reason == "stop"
    data = json.loads(r.choices[0].message.content or "")
    assert set(data) == {"ok"} and isinstance(data["ok"], bool)


def test_json_object_mode(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Reply with an empty JSON object."}],
        max_tokens=16,
        temperature=0,
        response_format={"type": "json_object"},
    )
    text = (r.choices[0].message.content or "").strip()
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_stop_sequence_is_not_returned(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count: 1, 2, 3, 4, 5, 6"}], max_tokens=16, temperature=0, stop=[","]
    )
    assert "," not in (r.choices[0].message.content or "")


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    outs = {
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=1.0, seed=1234).choices[0].message.content  # type: ignore[arg-type]
        for _ in range(2)
    }
    assert len(outs) == 1


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage is not None and r.usage.completion_tokens <= 6
    pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, stream=True)]
    assert "".join(pieces)


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model=EMBED, input=["a cat", "a dog"])
    assert r.model == EMBED and [d.index for d in r.data] == [0, 1]
    vec = r.data[0].embedding
    assert len(vec) == 384 and abs(sum(x * x for x in vec) - 1.0) < 1e-3
    assert r.usage.prompt_tokens > 0
    b64 = client.embeddings.with_raw_response.create(model=EMBED, input="a cat", encoding_format="base64")
    raw = json.loads(b64.text)["data"][0]["embedding"]
    decoded = struct.unpack("<384f", base64.b64decode(raw))
    assert max(abs(a - b) for a, b in zip(decoded, vec, strict=True)) < 1e-6


def test_embeddings_refuse_chat_model(served: tuple[DaemonProc, str]) -> None:
    r = post(served, "/v1/embeddings", {"model": MODEL, "input": "x"})
    assert r.status == 400 and "does not support embeddings" in r.json()["error"]["message"]


def _has_pipeline(served: tuple[DaemonProc, str]) -> bool:
    return "pipeline" in served[0].get("/ready").json()["services"]


def test_models(client: openai.OpenAI, served: tuple[DaemonProc, str]) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids and EMBED in ids
    assert ("mongars" in ids) == _has_pipeline(served)  # the persona is listed only when it can run
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=HI, max_tokens=4)  # type: ignore[arg-type]
    assert "gpt-9" in str(info.value)


def test_persona_model(client: openai.OpenAI, served: tuple[DaemonProc, str]) -> None:
    if not _has_pipeline(served):
        with pytest.raises(openai.NotFoundError, match="memory pipeline not enabled"):
            client.chat.completions.create(model="mongars", messages=HI, max_tokens=4)  # type: ignore[arg-type]
        return
    r = client.chat.completions.create(model="mongars", messages=HI, max_tokens=8)  # type: ignore[arg-type]
    assert r.model == "mongars" and r.choices[0].message.content
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="mongars", messages=HI, max_tokens=8, stream=True)
        if c.choices
    ]  # type: ignore[arg-type]
    assert "".join(pieces).strip()


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"model": MODEL, "messages": HI, "temperature": 50}, "temperature", "between 0 and 2"),
        ({"model": MODEL, "messages": HI, "max_tokens": -1}, "max_tokens", "at least 1"),
        ({"model": MODEL, "messages": HI, "n": 3}, "n", "must be 1"),
        ({"model": MODEL, "messages": "hello"}, "messages", "must be a list"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "must be one of"),
        ({"model": MODEL, "messages": HI, "stop": ["1", "2", "3", "4", "5"]}, "stop", "at most 4"),
        ({"model": MODEL, "messages": HI, "response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        ({"messages": HI}, "model", "required"),
    ],
)
def test_bad_params_are_400_naming_the_field(served: tuple[DaemonProc, str], body: dict[str, Any], param: str, needle: str) -> None:
    r = post(served, "/v1/chat/completions", body)
    assert r.status == 400, r.body
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and needle in err["message"]


def test_malformed_json(served: tuple[DaemonProc, str]) -> None:
    r = post(served, "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert r.status == 400 and r.json()["error"]["param"] == "body" and "not valid JSON" in r.json()["error"]["message"]


def test_context_overflow_names_token_counts(served: tuple[DaemonProc, str], client: openai.OpenAI) -> None:
    long = "lorem ipsum dolor " * 1500  # ~4500 tokens: over the 2048-token context
    r = post(served, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": long}], "max_tokens": 4})
    assert r.status == 400
    err = r.json()["error"]
    assert "prompt has" in err["message"] and "tokens" in err["message"] and "2048" in err["message"]
    # the daemon still serves afterwards
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices[0].message.content is not None  # type: ignore[arg-type]


def test_prompt_over_char_limit_is_413(served: tuple[DaemonProc, str]) -> None:
    r = post(served, "/v1/completions", {"model": MODEL, "prompt": "x" * 200_001, "max_tokens": 1})
    assert r.status == 413 and "max_prompt_chars" in r.json()["error"]["message"]


def test_completion_bad_prompt(served: tuple[DaemonProc, str]) -> None:
    r = post(served, "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]})
    assert r.status == 400 and r.json()["error"]["param"] == "prompt"


def test_memory_budget_refuses_a_load_with_a_clear_error(tmp_path: Path) -> None:
    d, token = start_llm_daemon(tmp_path, env={"MONGARSD_INFERENCE__MEMORY_BUDGET_MB": "50"})
    try:
        assert "default_model_preload_failed" in d.log()  # the daemon starts anyway
        r = http("POST", d.url + "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 2}, token=token)
        assert r.status == 422
        msg = r.json()["error"]["message"]
        assert "memory budget is 50 MB" in msg and "needs about" in msg and "inference.memory_budget_mb" in msg
        assert http("GET", d.url + "/health").status == 200
    finally:
        d.stop()
