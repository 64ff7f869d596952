"""Pure decisions of the llama.cpp engine: slot choice, KV planning, stops, UTF-8, params."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mongarsd.errors import ValidationError
from mongarsd.inference.chat_template import ChatTemplate
from mongarsd.inference.events import EngineStats
from mongarsd.inference.grammar import GrammarCompiler
from mongarsd.inference.kv_cache import KV_CACHE_TYPES, KVLayout, kv_cache_types, kv_layout
from mongarsd.inference.sampling import (
    JSON_GBNF,
    GenerationParams,
    StopMatcher,
    Utf8Stream,
    partial_stop_len,
    validate_params,
)
from mongarsd.inference.settings import EngineSettings
from mongarsd.inference.slots import (
    MAX_RETRY_AFTER_S,
    MIN_RETRY_AFTER_S,
    SlotCandidate,
    cells_to_free,
    choose_slot,
    common_prefix_len,
    retry_after_s,
)


def cand(index: int, *, key: str | None = None, cached: int = 0, prefix: int = 0, used: int = 0) -> SlotCandidate:
    return SlotCandidate(index, key, cached, prefix, used)


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [([], [], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2), ([1, 2, 3], [1, 9, 3], 1), ([5], [6], 0)],
)
def test_common_prefix_len(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix_len(a, b) == n


@given(st.lists(st.integers(0, 3), max_size=40), st.lists(st.integers(0, 3), max_size=40))
def test_common_prefix_len_matches_naive(a: list[int], b: list[int]) -> None:
    naive = 0
    while naive < min(len(a), len(b)) and a[naive] == b[naive]:
        naive += 1
    assert common_prefix_len(a, b) == naive


def test_choose_slot_prefers_same_conversation() -> None:
    idle = [cand(0, key="other", prefix=50, cached=60, used=5), cand(1, key="conv", prefix=3, cached=80, used=1)]
    assert choose_slot(idle, "conv", 100) == 1


def test_choose_slot_prefers_longest_prefix() -> None:
    idle = [cand(0, prefix=10, cached=20, used=2), cand(1, prefix=40, cached=40, used=1), cand(2)]
    assert choose_slot(idle, None, 100) == 1
    assert choose_slot(idle, "unknown-key", 100) == 1


def test_choose_slot_ignores_tiny_prefix_and_takes_empty_then_lru() -> None:
    # a 2-token match on a 1000-token prompt is below the similarity threshold
    idle = [cand(0, prefix=2, cached=500, used=3), cand(1), cand(2, cached=10, used=1)]
    assert choose_slot(idle, None, 1000) == 1
    idle = [cand(0, cached=500, used=3), cand(2, cached=10, used=1)]
    assert choose_slot(idle, None, 1000) == 2
    assert choose_slot([], None, 10) is None
    # a chat template's header (5 tokens of a 40-token prompt) is no reason to take a slot
    # holding another conversation while one is empty; 16 shared tokens are
    idle = [cand(0, key="conv-1", prefix=5, cached=200, used=2), cand(1)]
    assert choose_slot(idle, "conv-2", 40) == 1
    idle = [cand(0, key="conv-1", prefix=16, cached=200, used=2), cand(1)]
    assert choose_slot(idle, "conv-2", 40) == 0
    # a conversation's cache outlives an anonymous one even if used earlier
    idle = [cand(0, key="conv", cached=300, used=1), cand(1, cached=10, used=7)]
    assert choose_slot(idle, None, 1000) == 1


def test_retry_after_is_bounded() -> None:
    assert retry_after_s(0, 4, 0.0) == MIN_RETRY_AFTER_S
    assert retry_after_s(8, 4, 2.0) == 6.0
    assert retry_after_s(1000, 1, 50.0) == MAX_RETRY_AFTER_S


def test_stop_matcher_holds_back_partial_matches() -> None:
    m = StopMatcher(["</end>", "STOP"])
    assert m.feed("hello </") == ("hello ", False)
    assert m.feed("en") == ("", False)
    assert m.feed("d> tail") == ("", True)
    m = StopMatcher(["</end>"])
    assert m.feed("a </e") == ("a ", False)
    assert m.feed("x") == ("</ex", False)
    assert m.flush() == ""
    m = StopMatcher(["ST"])
    assert m.feed("xS") == ("x", False)
    assert m.flush() == "S"


def test_stop_matcher_without_stops_passes_through() -> None:
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False)


@settings(max_examples=200)
@given(st.text(alphabet="abc<>/", max_size=40), st.lists(st.integers(1, 5), max_size=20))
def test_stop_matcher_equals_one_shot_cut(text: str, cuts: list[int]) -> None:
    stops = ["</a>", "cc"]
    m = StopMatcher(stops)
    out, stopped, i = [], False, 0
    for c in [*cuts, len(text)]:
        piece = text[i : i + c]
        i += c
        emitted, stopped = m.feed(piece)
        out.append(emitted)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    idx = [text.find(s) for s in stops if s in text]
    expected = text[: min(idx)] if idx else text
    assert "".join(out) == expected


def test_partial_stop_len() -> None:
    assert partial_stop_len("abc<", ["<end>"], 5) == 1
    assert partial_stop_len("abc<en", ["<end>"], 5) == 3
    assert partial_stop_len("abc", ["<end>"], 5) == 0


def test_utf8_stream_buffers_split_characters() -> None:
    data = "héllo 🐱".encode()
    u = Utf8Stream()
    parts = [u.feed(data[i : i + 1]) for i in range(len(data))]
    assert "".join(parts) == "héllo 🐱"
    assert all("\ufffd" not in p for p in parts)
    u = Utf8Stream()
    assert u.feed("🐱".encode()[:2]) == ""
    assert u.flush() == "\ufffd"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (GenerationParams(temperature=2.5), "temperature"),
        (GenerationParams(temperature=float("nan")), "temperature"),
        (GenerationParams(top_p=1.5), "top_p"),
        (GenerationParams(top_k=-1), "top_k"),
        (GenerationParams(min_p=-0.1), "min_p"),
        (GenerationParams(max_tokens=0), "max_tokens"),
        (GenerationParams(max_tokens=5000), "max_tokens"),
        (GenerationParams(repeat_penalty=0.0), "repeat_penalty"),
        (GenerationParams(presence_penalty=3.0), "presence_penalty"),
        (GenerationParams(seed=-5), "seed"),
        (GenerationParams(stop=("",)), "stop"),
        (GenerationParams(stop=tuple("abcdefghijklmnopq")), "stop"),
        (GenerationParams(json_mode=True, grammar="root ::= x"), "response_format"),
    ],
)
def test_validate_params_names_the_field(params: GenerationParams, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_params(params, n_ctx=2048)
    assert info.value.param == param


async def test_validate_params_accepts_defaults_and_grammar_selection() -> None:
    validate_params(GenerationParams(), n_ctx=2048)
    grammars = GrammarCompiler()
    assert await grammars.async_grammar_for(GenerationParams()) is None
    assert await grammars.async_grammar_for(GenerationParams(json_mode=True)) == JSON_GBNF
    assert await grammars.async_grammar_for(GenerationParams(grammar='root ::= "x"')) == 'root ::= "x"'
    assert GenerationParams(temperature=0).greedy
    assert not GenerationParams().penalties_enabled
    assert GenerationParams(repeat_penalty=1.1).penalties_enabled


async def test_json_schema_grammar_and_bad_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    grammars = GrammarCompiler()
    text = await grammars.async_grammar_for(GenerationParams(json_schema=schema))
    assert text is not None and "root" in text
    with pytest.raises(ValidationError) as info:
        await grammars.async_grammar_for(GenerationParams(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nope"}}}))
    assert info.value.param == "response_format"


def test_chat_template_renders_and_falls_back() -> None:
    tpl = ChatTemplate("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{{ eos_token }}", eos_token="</s>")
    assert tpl.render([{"role": "user", "content": "hi"}]) == "[user]hi</s>"
    broken = ChatTemplate("{% for %}")
    assert broken.is_fallback
    assert broken.render([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    strict = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValidationError, match="roles must alternate"):
        strict.render([])
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValidationError):
        sandboxed.render([{"role": "user", "content": "x"}])


def test_engine_stats_metric_names() -> None:
    stats = EngineStats(
        slots_total=4,
        slots_busy=1,
        requests_processing=1,
        requests_deferred=2,
        requests_total=3,
        requests_rejected=0,
        prompt_tokens_total=100,
        prompt_seconds_total=0.5,
        tokens_predicted_total=50,
        tokens_predicted_seconds_total=1.0,
        cached_tokens_total=10,
        n_decode_total=10,
        n_busy_slots_total=20,
        kv_cache_tokens=512,
        kv_cache_cells=1024,
    )
    m = stats.metrics()
    assert m["llamacpp:kv_cache_usage_ratio"] == 0.5
    assert m["llamacpp:prompt_tokens_total"] == 100
    assert m["llamacpp:tokens_predicted_seconds_total"] == 1.0
    assert m["llamacpp:requests_deferred"] == 2
    assert m["llamacpp:n_busy_slots_per_decode"] == 2.0
    assert stats.slots_idle == 3


def test_cells_to_free_drops_only_what_the_request_needs() -> None:
    others = [
        cand(1, key="conv-old", cached=300, used=1),
        cand(2, cached=200, used=5),  # anonymous: goes first although used later
        cand(3, key="conv-new", cached=300, used=9),
        cand(4),  # empty: never worth dropping
    ]
    assert cells_to_free(100, 100, others) == []
    assert cells_to_free(250, 100, others) == [2]
    assert cells_to_free(301, 100, others) == [2, 1]
    assert cells_to_free(900, 100, others) == [2, 1, 3]
    assert cells_to_free(901, 100, others) is None  # waits for a running request
    assert cells_to_free(10, -5, []) is None


@given(
    st.lists(st.tuples(st.integers(0, 500), st.booleans(), st.integers(0, 50)), max_size=6),
    st.integers(1, 2000),
    st.integers(-500, 2000),
)
def test_cells_to_free_makes_room_or_says_it_cannot(idle: list[tuple[int, bool, int]], need: int, free: int) -> None:
    others = [cand(i, key="k" if keyed else None, cached=n, used=used) for i, (n, keyed, used) in enumerate(idle)]
    out = cells_to_free(need, free, others)
    if out is None:
        assert free + sum(c.n_cached for c in others) < need
    else:
        assert len(set(out)) == len(out)
        gained = sum(others[i].n_cached for i in out)
        assert free + gained >= need
        if out:  # minimal: without the last one dropped it would not fit
            assert free + gained - others[out[-1]].n_cached < need


def test_kv_layout_per_slot_streams_or_one_shared_pool() -> None:
    assert kv_layout(n_ctx=2048, slots=2, kv_pool=0, flash_attn=True) == KVLayout(False, 4096, 2048)
    assert kv_layout(n_ctx=2048, slots=4, kv_pool=4096, flash_attn=True) == KVLayout(True, 4096, 2048)
    assert kv_layout(n_ctx=8192, slots=4, kv_pool=4096, flash_attn=True) == KVLayout(True, 4096, 4096)
    # without flash attention the pool is split: the same memory, one stream per slot
    assert kv_layout(n_ctx=2048, slots=4, kv_pool=4096, flash_attn=False) == KVLayout(False, 4096, 1024)
    assert kv_layout(n_ctx=512, slots=4, kv_pool=4096, flash_attn=False) == KVLayout(False, 2048, 512)
    assert kv_layout(n_ctx=2048, slots=1, kv_pool=1024, flash_attn=True) == KVLayout(False, 1024, 1024)
    # the model's training context caps a request
    assert kv_layout(n_ctx=4096, slots=2, kv_pool=0, flash_attn=False, n_ctx_train=2048) == KVLayout(False, 4096, 2048)


def test_kv_cache_v_is_quantized_only_with_flash_attention() -> None:
    q8, f16, bf16 = KV_CACHE_TYPES["q8_0"], KV_CACHE_TYPES["f16"], KV_CACHE_TYPES["bf16"]
    assert kv_cache_types("q8_0", flash_attn=False) == (q8, f16)
    assert kv_cache_types("q8_0", flash_attn=True) == (q8, q8)
    assert kv_cache_types("bf16", flash_attn=False) == (bf16, bf16)


@pytest.mark.parametrize(
    ("bad", "param"),
    [
        ({"slots": 0}, "slots"),
        ({"kv_pool": -1}, "kv_pool"),
        ({"queue_depth": -1}, "queue_depth"),
        ({"kv_cache_type": "q3_k"}, "kv_cache_type"),
    ],
)
def test_engine_settings_refuse_what_the_engine_cannot_run(bad: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as exc:
        EngineSettings(**bad)
    assert exc.value.param == param
