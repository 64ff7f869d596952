"""Pure request parsing of the OpenAI and Ollama surfaces, and the inference manager's decisions."""

from __future__ import annotations

import math

import pytest

from mongarsd.api.messages import check_prompt_chars, normalize_messages, parse_stop
from mongarsd.api.ollama import parameter_size, parse_chat, parse_format, parse_generate, parse_options
from mongarsd.api.openai import (
    embed_model_matches,
    parse_chat_request,
    parse_completion_request,
    parse_embed_input,
    parse_response_format,
)
from mongarsd.errors import ContextOverflowError, ValidationError
from mongarsd.inference.gguf import GGUFInfo
from mongarsd.inference.manager import Resident, effective_budget_mb, estimate_model_mb, kv_bytes_per_cell, parse_keep_alive, plan_evictions
from mongarsd.inference.sampling import SamplingSpec, build_params

MSG = [{"role": "user", "content": "hi"}]


WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}


def _param_of(fn: object, *args: object) -> str | None:
    with pytest.raises(ValidationError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.param


# ---------------------------------------------------------------- messages


def test_messages_accept_roles_parts_and_null_assistant_content() -> None:
    out = normalize_messages(
        [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "tool", "content": "42", "tool_call_id": "x"},
        ]
    )
    assert out == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42", "tool_call_id": "x"},
    ]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("hello", "messages"),
        ([], "messages"),
        (["hi"], "messages[0]"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": "a\x00b"}], "messages[0].content"),
        ([{"role": "user", "content": "x", "images": ["aGk="]}], "messages[0].images"),
    ],
)
def test_messages_rejections_name_the_field(messages: object, param: str) -> None:
    assert _param_of(normalize_messages, messages) == param


def test_prompt_char_limit_is_413() -> None:
    with pytest.raises(ValidationError) as info:
        check_prompt_chars([{"content": "x" * 11}], 10)
    assert info.value.status == 413 and "11 characters" in str(info.value)


# ---------------------------------------------------------------- OpenAI


def test_openai_chat_request_maps_sampling() -> None:
    req = parse_chat_request(
        {
            "model": "m",
            "messages": MSG,
            "max_completion_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 3,
            "stop": "END",
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "n": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
            "response_format": {"type": "json_object"},
        }
    )
    assert req.stream and req.include_usage
    s = req.spec
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop) == (7, 0.0, 0.5, 3, ("END",))
    assert (s.presence_penalty, s.frequency_penalty, s.json_mode) == (0.5, -0.5, True)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 50}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"n": 3}, "n"),
        ({"top_p": 2}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"seed": 2**40}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}, "tool_choice"),
        ({"stream": "yes"}, "stream"),
        ({"model": ""}, "model"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ],
)
def test_openai_absurd_params_are_named(extra: dict[str, object], param: str) -> None:
    body = {"model": "m", "messages": MSG, **extra}
    assert _param_of(parse_chat_request, body) == param


def test_openai_error_message_says_the_range() -> None:
    with pytest.raises(ValidationError, match=r"'temperature' must be between 0 and 2, got 50"):
        parse_chat_request({"model": "m", "messages": MSG, "temperature": 50})
    with pytest.raises(ValidationError, match=r"'max_tokens' must be at least 1, got -1"):
        parse_chat_request({"model": "m", "messages": MSG, "max_tokens": -1})


def test_openai_negative_seed_means_random() -> None:
    assert parse_chat_request({"model": "m", "messages": MSG, "seed": -1}).spec.seed is None


def test_response_format_json_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) == (False, schema)
    assert parse_response_format({"type": "text"}) == (False, None)


def test_completion_prompt_forms() -> None:
    assert parse_completion_request({"model": "m", "prompt": ["once"]}).prompt == "once"
    assert _param_of(parse_completion_request, {"model": "m", "prompt": ["a", "b"]}) == "prompt"
    assert _param_of(parse_completion_request, {"model": "m", "prompt": ""}) == "prompt"
    assert _param_of(parse_completion_request, {"model": "m", "prompt": "x", "echo": True}) == "echo"


def test_embed_input_and_model_names() -> None:
    assert parse_embed_input("a") == ["a"]
    assert parse_embed_input(["a", "b"]) == ["a", "b"]
    for bad in ([], [1, 2], 5, None, ["a", None]):
        assert _param_of(parse_embed_input, bad) == "input"
    for name in ("all-minilm-l6-v2", "all-minilm", "all-minilm:latest", "ALL-MiniLM-L6-v2"):
        assert embed_model_matches(name, "all-minilm-l6-v2")
    assert not embed_model_matches("smollm2-135m-instruct:q4_1", "all-minilm-l6-v2")


# ---------------------------------------------------------------- Ollama


def test_ollama_options_map_to_engine_vocabulary() -> None:
    spec = parse_options(
        {
            "temperature": 0.2,
            "top_k": 5,
            "min_p": 0.1,
            "repeat_penalty": 1.1,
            "seed": 9,
            "num_predict": 12,
            "num_ctx": 1024,
            "stop": ["\n"],
            "num_thread": 4,
        },
        "json",
    )
    assert (spec.temperature, spec.top_k, spec.min_p, spec.repeat_penalty, spec.seed) == (0.2, 5, 0.1, 1.1, 9)
    assert (spec.max_tokens, spec.num_ctx, spec.stop, spec.json_mode) == (12, 1024, ("\n",), True)
    assert parse_options({"num_predict": -1}, None).fill_context


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"temperature": 50}, "options.temperature"),
        ({"num_predict": 0}, "options.num_predict"),
        ({"num_ctx": 0}, "options.num_ctx"),
        ({"top_k": -3}, "options.top_k"),
        ({"stop": "x" * 300}, "options.stop"),
        ("fast", "options"),
    ],
)
def test_ollama_bad_options_are_named(options: object, param: str) -> None:
    assert _param_of(parse_options, options, None) == param


def test_ollama_format_forms() -> None:
    assert parse_format("json") == (True, None)
    assert parse_format({"type": "object"}) == (False, {"type": "object"})
    assert parse_format("") == (False, None)
    assert _param_of(parse_format, "yaml") == "format"


def test_ollama_chat_and_generate_bodies() -> None:
    assert parse_chat({"model": "m"}).messages == []  # load only
    req = parse_chat({"model": "m", "messages": MSG, "stream": False, "keep_alive": "5m"})
    assert (req.stream, req.keep_alive_s, req.messages) == (False, 300.0, MSG)
    gen = parse_generate({"model": "m", "prompt": "hi", "system": "terse"})
    assert gen.messages == [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]
    raw = parse_generate({"model": "m", "prompt": "hi", "raw": True})
    assert raw.prompt == "hi" and raw.messages == []
    assert parse_generate({"model": "m", "keep_alive": 0}).keep_alive_s == 0.0
    assert _param_of(parse_generate, {"model": "m", "prompt": "x", "images": ["aGk="]}) == "images"
    assert _param_of(parse_chat, {"model": "m", "messages": MSG, "tools": [{"type": "function"}]}) == "tools[0].function"
    assert _param_of(parse_generate, {"model": "m", "prompt": "x", "tools": [WEATHER_TOOL]}) == "tools"
    assert parse_chat({"model": "m", "messages": MSG, "tools": [WEATHER_TOOL]}).tools.tools[0].name == "weather"
    assert _param_of(parse_chat, {"model": "m", "messages": "hi"}) == "messages"


def test_parameter_size_label() -> None:
    from datetime import UTC, datetime
    from pathlib import Path

    from mongarsd.inference.models import ModelEntry

    entry = ModelEntry("x:q4_0", Path("x.gguf"), 1, datetime.now(UTC), "llama", None, 1_234_567_890, None, "Q4_0", 2048, None)
    assert parameter_size(entry) == "1.23B"


# ---------------------------------------------------------------- keep_alive, params, memory


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        (0, 0.0),
        ("0", 0.0),
        (30, 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        (-1, math.inf),
        ("-1", math.inf),
        ("-5m", math.inf),
    ],
)
def test_parse_keep_alive(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["5 parsecs", "m5", "5mm", True, [1], float("nan")])
def test_parse_keep_alive_rejects(value: object) -> None:
    assert _param_of(parse_keep_alive, value) == "keep_alive"


def test_build_params_caps_default_and_names_overflow() -> None:
    p = build_params(SamplingSpec(), n_prompt=2000, n_ctx=2048, max_tokens_default=256)
    assert p.max_tokens == 48  # the room left, not the default
    assert build_params(SamplingSpec(fill_context=True), n_prompt=48, n_ctx=2048, max_tokens_default=8).max_tokens == 2000
    with pytest.raises(ContextOverflowError, match=r"prompt has 2100 tokens but the context holds 2048"):
        build_params(SamplingSpec(), n_prompt=2100, n_ctx=2048, max_tokens_default=256)
    with pytest.raises(ContextOverflowError, match=r"prompt has 2000 tokens and max_tokens is 100"):
        build_params(SamplingSpec(max_tokens=100), n_prompt=2000, n_ctx=2048, max_tokens_default=256)
    clamped = build_params(SamplingSpec(num_ctx=8192), n_prompt=10, n_ctx=2048, max_tokens_default=4096)
    assert clamped.max_tokens == 2038  # num_ctx above the model's context is clamped, like Ollama
    small = build_params(SamplingSpec(num_ctx=100), n_prompt=90, n_ctx=2048, max_tokens_default=256)
    assert small.max_tokens == 10


def test_build_params_passes_sampling_through() -> None:
    p = build_params(
        SamplingSpec(temperature=0.0, seed=1, stop=("x",), json_schema={"type": "object"}), n_prompt=5, n_ctx=64, max_tokens_default=8
    )
    assert (p.temperature, p.seed, p.stop, p.json_schema, p.json_mode) == (0.0, 1, ("x",), {"type": "object"}, False)


def test_parse_stop() -> None:
    assert parse_stop("a", max_items=4) == ("a",)
    assert _param_of(lambda: parse_stop(5, max_items=4)) == "stop"


def test_plan_evictions_lru_idle_only() -> None:
    resident = [Resident("a", 400, False, 1.0), Resident("b", 400, True, 0.5), Resident("c", 100, False, 2.0)]
    assert plan_evictions(1000, 100, resident) == []
    assert plan_evictions(1000, 300, resident) == ["a"]  # least recently used idle model first
    assert plan_evictions(1000, 600, resident) == ["a", "c"]
    assert plan_evictions(1000, 700, resident) is None  # "b" is busy: cannot make room
    assert plan_evictions(1000, 1200, []) is None  # larger than the whole budget


def test_memory_estimates() -> None:
    meta = {
        "general.architecture": "llama",
        "llama.block_count": 30,
        "llama.embedding_length": 576,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        "llama.context_length": 8192,
    }
    info = GGUFInfo(version=3, tensor_count=0, metadata=meta)
    # SmolLM2-135M: 30 layers x 3 kv heads x 64 dims x (K + V) x 2 bytes = 23040 bytes per cell
    assert kv_bytes_per_cell(info, "f16", False) == 23040
    assert kv_bytes_per_cell(info, "q8_0", True) == pytest.approx(23040 * 34 / 64)
    assert kv_bytes_per_cell(info, "q8_0", False) == pytest.approx(30 * 3 * 64 * (34 / 32 + 2))  # V stays f16
    mb = estimate_model_mb(100 * 2**20, info, n_ctx=2048, kv_cache_type="f16", flash_attn=False)
    assert 100 + 45 < mb < 100 + 45 + 64
    # four slots sharing a pool of 4096 cells cost what two streams of 2048 do, not four
    pooled = estimate_model_mb(100 * 2**20, info, n_ctx=2048, kv_cache_type="f16", flash_attn=True, slots=4, kv_pool=4096)
    two = estimate_model_mb(100 * 2**20, info, n_ctx=2048, kv_cache_type="f16", flash_attn=True, slots=2)
    four = estimate_model_mb(100 * 2**20, info, n_ctx=2048, kv_cache_type="f16", flash_attn=True, slots=4)
    assert pooled == two and four - pooled == pytest.approx(23040 * 4096 / 2**20)
    # a shared pool's prompt cache is host memory the model may use; per-slot streams have none
    cached = estimate_model_mb(
        100 * 2**20, info, n_ctx=2048, kv_cache_type="f16", flash_attn=True, slots=4, kv_pool=4096, prompt_cache_mb=64
    )
    assert cached == pooled + 64
    assert estimate_model_mb(100 * 2**20, info, n_ctx=2048, kv_cache_type="f16", flash_attn=True, slots=4, prompt_cache_mb=64) == four
    assert effective_budget_mb(0, 4000) == pytest.approx(2400)
    assert effective_budget_mb(512, 4000) == 512
