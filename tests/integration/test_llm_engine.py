"""The llama.cpp engine with the real default model: streaming, batching, cache, limits."""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import mmap
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import pytest_asyncio

from mongarsd.errors import ContextOverflowError, InferenceError, OverloadedError, ValidationError
from mongarsd.inference.events import TokenEvent
from mongarsd.inference.llm import LlamaEngine
from mongarsd.inference.sampling import GenerationParams
from mongarsd.inference.settings import EngineSettings
from tests.conftest import DEFAULT_LLM, requires_models

MODEL = DEFAULT_LLM
SLOTS = 4
QUEUE_DEPTH = 2

pytestmark = [
    requires_models(DEFAULT_LLM),
    pytest.mark.asyncio(loop_scope="module"),
]


def make_engine(**kw: object) -> LlamaEngine:
    args: dict[str, object] = {
        "n_ctx": 1024,
        "n_batch": 256,
        "n_ubatch": 256,
        "threads": 2,
        "slots": SLOTS,
        "queue_depth": QUEUE_DEPTH,
    }
    args.update(kw)
    return LlamaEngine(model_path=MODEL, settings=EngineSettings(**args))  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[LlamaEngine]:
    eng = make_engine()
    await eng.async_start()
    yield eng
    await eng.async_stop()
    assert eng._thread is None
    assert not eng.loaded


async def collect(eng: LlamaEngine, tokens: list[int], params: GenerationParams, **kw: str) -> tuple[str, TokenEvent]:
    parts: list[str] = []
    async for ev in eng.async_generate(tokens, params, **kw):
        parts.append(ev.text)
        if ev.final:
            return "".join(parts), ev
    raise AssertionError("stream ended without a final event")


def story(eng: LlamaEngine) -> list[int]:
    return eng.tokenize_chat([{"role": "user", "content": "Write a long story about a cat who travels the world."}])


async def test_chat_template_is_smollm2s(engine: LlamaEngine) -> None:
    text = engine.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    tokens = engine.tokenize_chat([{"role": "user", "content": "hi"}])
    im_start = engine.tokenize("<|im_start|>", add_special=False, parse_special=True)
    assert len(im_start) == 1  # parsed as the special token, not as text
    assert tokens.count(im_start[0]) == 3
    assert engine.detokenize(engine.tokenize("Hello world", add_special=False)) == "Hello world"


async def test_greedy_and_seeded_generation_are_deterministic(engine: LlamaEngine) -> None:
    tokens = story(engine)
    greedy = GenerationParams(max_tokens=24, temperature=0)
    a, ev_a = await collect(engine, tokens, greedy)
    b, _ = await collect(engine, tokens, greedy)
    assert a == b and a.strip()
    assert ev_a.finish_reason == "length" and ev_a.completion_tokens == 24
    seeded = GenerationParams(max_tokens=24, temperature=1.0, seed=1234)
    c, _ = await collect(engine, tokens, seeded)
    d, _ = await collect(engine, tokens, seeded)
    assert c == d


async def test_streaming_events_and_usage(engine: LlamaEngine) -> None:
    tokens = story(engine)
    events = [ev async for ev in engine.async_generate(tokens, GenerationParams(max_tokens=16, temperature=0))]
    assert len(events) >= 5
    assert all(not ev.final and ev.token >= 0 for ev in events[:-1])
    final = events[-1]
    assert final.final and final.token == -1
    assert final.prompt_tokens == len(tokens)
    assert final.completion_tokens == 16
    assert final.timings is not None and final.timings.predicted_ms > 0
    assert "".join(ev.text for ev in events).strip()


async def test_stop_sequence_ends_generation_without_the_stop_text(engine: LlamaEngine) -> None:
    tokens = story(engine)
    full, _ = await collect(engine, tokens, GenerationParams(max_tokens=40, temperature=0))
    words = full.split()
    assert len(words) > 6
    stop = " " + words[5]
    cut = full[: full.index(stop)]
    text, ev = await collect(engine, tokens, GenerationParams(max_tokens=40, temperature=0, stop=(stop,)))
    assert ev.finish_reason == "stop"
    assert text == cut
    assert stop not in text


async def test_eos_finishes_with_stop(engine: LlamaEngine) -> None:
    tokens = engine.tokenize_chat([{"role": "user", "content": "Say just the word yes."}])
    text, ev = await collect(engine, tokens, GenerationParams(max_tokens=60, temperature=0))
    assert ev.finish_reason == "stop"
    assert ev.completion_tokens < 60
    assert "<|im_end|>" not in text


async def test_four_concurrent_generations_complete(engine: LlamaEngine) -> None:
    tokens = story(engine)
    n_tokens = 48

    async def run(seed: int) -> TokenEvent:
        return (await collect(engine, tokens, GenerationParams(max_tokens=n_tokens, seed=seed, temperature=0.9)))[1]

    t0 = time.perf_counter()
    single = await run(99)
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = await asyncio.gather(*(run(i) for i in range(SLOTS)))
    t_four = time.perf_counter() - t0
    for ev in results:
        assert ev.completion_tokens > 0
        assert ev.finish_reason in ("length", "stop")
    produced = sum(ev.completion_tokens for ev in results)
    print(
        "\nsingle stream: "
        + str(round(single.completion_tokens / t_single, 1))
        + " t/s; "
        + str(SLOTS)
        + " streams: "
        + str(round(produced / t_four, 1))
        + " t/s aggregate"
    )
    stats = engine.stats()
    assert stats.n_busy_slots_total > stats.n_decode_total  # some decodes carried several slots


async def test_overload_cancellation_and_deferred_admission(engine: LlamaEngine) -> None:
    tokens = engine.tokenize("Once upon a time, in a small village by the sea,", add_special=True)
    params = GenerationParams(max_tokens=300, temperature=0.7, seed=1)
    streams = [engine.async_generate(tokens, params) for _ in range(SLOTS)]
    for s in streams:
        first = await anext(s)
        assert not first.final
    assert engine.stats().slots_busy == SLOTS
    # queue up to queue_depth more; they are deferred, not refused
    waiting = [engine.async_generate(tokens, params) for _ in range(QUEUE_DEPTH)]
    waiting_tasks = [asyncio.ensure_future(anext(w)) for w in waiting]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in waiting_tasks)
    assert engine.stats().requests_deferred == QUEUE_DEPTH
    with pytest.raises(OverloadedError) as info:
        await anext(engine.async_generate(tokens, params))
    assert info.value.retry_after_s >= 1.0
    # cancelling one running stream admits the first waiting request right away
    await streams[0].aclose()
    first_waiting = await asyncio.wait_for(waiting_tasks[0], timeout=10)
    assert not first_waiting.final
    waiting_tasks[1].cancel()  # a consumer task cancelled while its request waits
    await asyncio.gather(waiting_tasks[1], return_exceptions=True)
    for s in [*streams[1:], *waiting]:
        await s.aclose()
    # every slot is free again within a step
    deadline = time.monotonic() + 5
    while engine.stats().slots_busy and time.monotonic() < deadline:  # noqa: ASYNC110  (state lives in another thread)
        await asyncio.sleep(0.01)
    stats = engine.stats()
    assert stats.slots_busy == 0 and stats.requests_deferred == 0
    assert stats.requests_rejected >= 1


async def test_context_overflow_and_validation(engine: LlamaEngine) -> None:
    too_long = [engine.tokenize("x", add_special=False)[0]] * (engine.n_ctx_per_slot - 10)
    with pytest.raises(ContextOverflowError) as info:
        await anext(engine.async_generate(too_long, GenerationParams(max_tokens=64)))
    assert str(engine.n_ctx_per_slot - 10) in str(info.value) and "64" in str(info.value)
    with pytest.raises(ValidationError) as vinfo:
        await anext(engine.async_generate([1, 2], GenerationParams(temperature=3.0)))
    assert vinfo.value.param == "temperature"
    with pytest.raises(ValidationError) as vinfo:
        await anext(engine.async_generate([engine.n_vocab + 5], GenerationParams()))
    assert vinfo.value.param == "prompt"
    with pytest.raises(ValidationError) as vinfo:
        await anext(engine.async_generate([1], GenerationParams(grammar="root ::= ((")))
    assert vinfo.value.param == "grammar"
    with pytest.raises(ValidationError) as vinfo:  # a schema with no value at all: named as the client sent it
        await anext(engine.async_generate([1], GenerationParams(json_schema={"enum": []}, schema_param="format")))
    assert vinfo.value.param == "format" and str(vinfo.value).startswith("'format' compiles to a grammar")


async def test_json_schema_output_parses(engine: LlamaEngine) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "likes_cats": {"type": "boolean"},
        },
        "required": ["name", "age", "likes_cats"],
    }
    tokens = engine.tokenize_chat([{"role": "user", "content": "Describe a person named Ana, 31, who loves cats, as JSON."}])
    text, ev = await collect(engine, tokens, GenerationParams(max_tokens=80, temperature=0, json_schema=schema))
    assert ev.finish_reason == "stop", text
    data = json.loads(text)
    assert set(data) == {"name", "age", "likes_cats"}
    assert isinstance(data["name"], str) and len(data["name"]) <= 20
    assert isinstance(data["age"], int) and isinstance(data["likes_cats"], bool)
    # generic JSON mode: the tiny model may ramble past max_tokens, but only in JSON
    text, ev = await collect(engine, tokens, GenerationParams(max_tokens=40, temperature=0, json_mode=True))
    assert text.startswith("{"), text
    if ev.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


async def test_prefix_cache_reuses_the_conversation(engine: LlamaEngine) -> None:
    history = [
        {"role": "system", "content": "You are a careful assistant. " * 20},
        {"role": "user", "content": "Tell me about the sea. " * 10},
    ]
    first_prompt = engine.tokenize_chat(history)
    reply, ev1 = await collect(engine, first_prompt, GenerationParams(max_tokens=16, temperature=0), cache_key="conv-1")
    # an unrelated request in between must not steal the conversation's slot
    await collect(engine, story(engine), GenerationParams(max_tokens=4, temperature=0), cache_key="conv-2")
    follow = engine.tokenize_chat([*history, {"role": "assistant", "content": reply}, {"role": "user", "content": "And the sky?"}])
    _, ev2 = await collect(engine, follow, GenerationParams(max_tokens=8, temperature=0), cache_key="conv-1")
    assert ev1.cached_tokens == 0 or ev1.cached_tokens < len(first_prompt) // 2
    assert ev2.cached_tokens >= len(first_prompt) - 1
    assert ev2.timings is not None and ev2.timings.prompt_n == len(follow) - ev2.cached_tokens
    assert ev2.timings.prompt_n < len(follow) // 2
    assert engine.stats().cached_tokens_total >= ev2.cached_tokens


async def test_stop_while_streaming_fails_consumers_and_joins() -> None:
    eng = make_engine(slots=2, warmup=False)
    await eng.async_start()
    try:
        tokens = eng.tokenize("Once upon a time", add_special=True)
        stream = eng.async_generate(tokens, GenerationParams(max_tokens=500, temperature=0.8, seed=3))
        assert not (await anext(stream)).final
        stop_task = asyncio.ensure_future(eng.async_stop())
        with pytest.raises(InferenceError, match="stopped"):
            async for _ in stream:
                pass
        await stop_task
        assert eng._thread is None and not eng.loaded
        with pytest.raises(OverloadedError):
            await anext(eng.async_generate(tokens, GenerationParams()))
    finally:
        await eng.async_stop()


async def test_each_slot_owns_its_context_and_keeps_its_cache() -> None:
    # One KV stream per slot: a request may use its whole slot context while another slot's
    # cached conversation stays intact (a unified cache would have had to evict it).
    eng = make_engine(n_ctx=256, slots=2, warmup=False)
    await eng.async_start()
    try:
        assert eng.n_ctx_per_slot == 256 and eng.n_ctx == 512
        kept = eng.tokenize("The sea is blue and the sky is wide. " * 12, add_special=True)
        _, first = await collect(eng, kept, GenerationParams(max_tokens=8, temperature=0), cache_key="kept")
        assert first.cached_tokens == 0
        big = eng.tokenize("Mountains rise over green valleys. " * 60, add_special=True)[: eng.n_ctx_per_slot - 40]
        assert len(big) == eng.n_ctx_per_slot - 40
        _, full = await collect(eng, big, GenerationParams(max_tokens=40, temperature=0.8, seed=5), cache_key="big")
        assert full.prompt_tokens + full.completion_tokens <= eng.n_ctx_per_slot
        _, again = await collect(eng, kept, GenerationParams(max_tokens=4, temperature=0), cache_key="kept")
        assert again.cached_tokens >= len(kept) - 1
        with pytest.raises(ContextOverflowError):
            await collect(eng, big + big[:36], GenerationParams(max_tokens=8), cache_key="x")  # 260 + 8 > 256
    finally:
        await eng.async_stop()


async def test_a_shared_pool_reserves_cells_and_drops_idle_caches_only_when_short() -> None:
    # Three slots share 512 cells with flash attention (the generic profile's layout, smaller):
    # each request reserves prompt + max_tokens; idle conversations keep their cached prefixes
    # until a new request needs the room, then the least recently used one goes.
    eng = make_engine(n_ctx=256, slots=3, kv_pool=512, flash_attn=True, warmup=False)
    await eng.async_start()
    try:
        assert eng.n_ctx == 512 and eng.n_ctx_per_slot == 256
        texts = ("The sea is blue and the sky is wide. ", "Mountains rise over green valleys. ", "Old trains cross the desert at night. ")
        prompts = {k: eng.tokenize(t * 60, add_special=True)[:200] for k, t in zip("abc", texts, strict=True)}
        assert all(len(p) == 200 for p in prompts.values())
        greedy = GenerationParams(max_tokens=20, temperature=0)  # reserves 220 cells, leaves 201..219 cached
        for key in "ab":
            _, ev = await collect(eng, prompts[key], greedy, cache_key=key)
            assert ev.cached_tokens == 0
        assert eng.stats().kv_evictions_total == 0
        _, ev_c = await collect(eng, prompts["c"], greedy, cache_key="c")  # 512 - a - b < 220: a goes
        assert ev_c.cached_tokens == 0
        assert eng.stats().kv_evictions_total == 1
        _, ev_b = await collect(eng, prompts["b"], greedy, cache_key="b")  # b was kept
        assert ev_b.cached_tokens >= len(prompts["b"]) - 1
        assert eng.stats().kv_evictions_total == 1
        _, ev_a = await collect(eng, prompts["a"], greedy, cache_key="a")  # a was dropped; c is now the oldest
        assert ev_a.cached_tokens == 0
        assert eng.stats().kv_evictions_total == 2
        _, ev_b2 = await collect(eng, prompts["b"], greedy, cache_key="b")
        assert ev_b2.cached_tokens >= len(prompts["b"]) - 1
        assert eng.stats().kv_cache_tokens <= eng.n_ctx

        # Three requests reserving 200 + 56 = 256 cells each: two run, the third waits for
        # cells (not for a slot: one is idle) and starts once a running one ends.
        long = GenerationParams(max_tokens=56, temperature=0.7, seed=1)
        streams = [eng.async_generate(prompts[k], long, cache_key=k + "2") for k in "abc"]
        for st in streams[:2]:
            assert not (await anext(st)).final
        third = asyncio.ensure_future(anext(streams[2]))
        await asyncio.sleep(0.05)
        stats = eng.stats()
        assert not third.done()
        assert stats.slots_busy == 2 and stats.requests_deferred == 1
        await streams[0].aclose()
        assert not (await asyncio.wait_for(third, timeout=30)).final
        for st in streams[1:]:
            async for ev in st:
                if ev.final:
                    assert ev.finish_reason in ("length", "stop")
        stats = eng.stats()
        assert stats.kv_cache_tokens <= eng.n_ctx and stats.slots_busy == 0
    finally:
        await eng.async_stop()


@pytest_asyncio.fixture(loop_scope="module")
async def cached_pool() -> AsyncIterator[LlamaEngine]:
    """The generic profile's layout, smaller: three slots sharing 512 cells, a 16 MB prompt cache."""
    eng = make_engine(n_ctx=256, slots=3, kv_pool=512, flash_attn=True, warmup=False, prompt_cache_mb=16)
    await eng.async_start()
    try:
        yield eng
    finally:
        await eng.async_stop()


def two_conversations(eng: LlamaEngine) -> dict[str, list[int]]:
    """Two unrelated 180-token prompts, "a" and "b"."""
    texts = ("The sea is blue and the sky is wide. ", "Mountains rise over green valleys. ")
    return {k: eng.tokenize(t * 60, add_special=True)[:180] for k, t in zip("ab", texts, strict=True)}


async def test_a_shared_pool_moves_idle_conversations_to_the_prompt_cache_and_back(cached_pool: LlamaEngine) -> None:
    # The generic profile's layout with its prompt cache: when a request starts, idle slots'
    # cells leave the pool for host memory (each cell in the pool costs every decode step),
    # and a conversation that comes back is copied in again instead of decoded again.
    eng = cached_pool
    prompts = two_conversations(eng)
    greedy = GenerationParams(max_tokens=20, temperature=0)
    first_a, ev = await collect(eng, prompts["a"], greedy, cache_key="a")
    assert ev.cached_tokens == 0
    stats = eng.stats()
    assert stats.kv_cache_tokens == 180 + 19 and stats.prompt_cache_entries == 0

    _, ev = await collect(eng, prompts["b"], greedy, cache_key="b")
    assert ev.cached_tokens == 0
    stats = eng.stats()
    assert stats.kv_cache_tokens == 180 + 19  # only b is in the pool now
    assert stats.prompt_cache_entries == 1 and stats.prompt_cache_saves_total == 1
    assert stats.prompt_cache_bytes > 0

    again_a, ev = await collect(eng, prompts["a"], greedy, cache_key="a")
    assert ev.cached_tokens == 180 - 1  # copied back, not decoded: only the last token is
    assert again_a == first_a  # the same cells give the same greedy answer
    stats = eng.stats()
    assert stats.prompt_cache_restores_total == 1
    assert stats.kv_cache_tokens == 180 + 19 and stats.prompt_cache_entries == 2  # b went out in turn
    assert stats.kv_evictions_total == 0

    # A request starting while another streams moves only idle cells: the running one's
    # answer is the one it gives alone.
    alone_b, _ = await collect(eng, prompts["b"], GenerationParams(max_tokens=40, temperature=0), cache_key="b2")
    running = eng.async_generate(prompts["b"], GenerationParams(max_tokens=40, temperature=0), cache_key="b3")
    parts = [(await anext(running)).text]
    third = eng.tokenize("Old trains cross the desert at night. " * 30, add_special=True)[:120]
    joined, ev_c = await collect(eng, third, greedy, cache_key="c")
    assert ev_c.finish_reason in ("length", "stop") and joined
    async for e in running:
        parts.append(e.text)
    assert "".join(parts) == alone_b
    assert eng.stats().slots_busy == 0
    await eng.async_stop()
    assert eng.stats().prompt_cache_bytes == 0  # unloading gives the host memory back


async def test_a_conversation_copied_back_survives_the_save_of_the_one_it_replaces() -> None:
    # Two prompts sharing a long preamble (a system prompt) take turns in one slot; the cache
    # holds one of them (2 MB, about 90 tokens of the default model). B taking A's slot for the
    # preamble saves A first, though most of A is the preamble. Copying A back over B first saves
    # B, which must not push A out of the cache on the way (it did: the inference thread then
    # read a closed buffer).
    eng = make_engine(n_ctx=128, slots=2, kv_pool=256, flash_attn=True, warmup=False, prompt_cache_mb=2)
    await eng.async_start()
    try:
        preamble = eng.tokenize("You are a helpful assistant. " * 8, add_special=True)[:40]
        a = preamble + eng.tokenize(" The sea is blue and the sky is wide." * 4, add_special=False)[:16]
        b = preamble + eng.tokenize(" Mountains rise over green valleys." * 4, add_special=False)[:16]
        greedy = GenerationParams(max_tokens=3, temperature=0)
        first_a, _ = await collect(eng, a, greedy)
        _, ev_b = await collect(eng, b, greedy)
        assert ev_b.cached_tokens == 40  # the preamble, in A's slot; A itself went to the cache
        stats = eng.stats()
        assert stats.prompt_cache_entries == 1 and 2**20 < stats.prompt_cache_bytes <= 2**21
        again_a, ev_a = await collect(eng, a, greedy)
        assert ev_a.cached_tokens == len(a) - 1 and again_a == first_a
        stats = eng.stats()
        assert stats.prompt_cache_restores_total == 1
        assert stats.prompt_cache_entries == 1  # B did not fit beside A and was let go
        _, ev_b = await collect(eng, b, greedy)  # the engine still serves
        assert ev_b.final and eng.stats().slots_busy == 0
    finally:
        await eng.async_stop()


async def test_a_conversation_the_prompt_cache_cannot_map_stays_in_the_pool(
    cached_pool: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Host memory runs out (mmap fails) when a request starts: the idle conversation keeps
    # its cells in the pool instead of the inference thread failing, and comes back from there.
    eng = cached_pool
    prompts = two_conversations(eng)
    greedy = GenerationParams(max_tokens=20, temperature=0)
    first_a, _ = await collect(eng, prompts["a"], greedy, cache_key="a")

    def no_memory(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    with monkeypatch.context() as m:
        m.setattr(mmap, "mmap", no_memory)
        _, ev_b = await collect(eng, prompts["b"], greedy, cache_key="b")
    assert ev_b.finish_reason in ("length", "stop")
    stats = eng.stats()
    assert stats.prompt_cache_entries == 0 and stats.prompt_cache_saves_total == 0
    assert stats.kv_cache_tokens == 2 * (180 + 19)  # a stayed beside b
    again_a, ev_a = await collect(eng, prompts["a"], greedy, cache_key="a")
    assert ev_a.cached_tokens == 180 - 1 and again_a == first_a  # from its own slot
    # with memory back, b went to the cache, and so did a's previous turn, whose answer
    # (19 tokens) this repeated prompt drops from the slot
    stats = eng.stats()
    assert stats.prompt_cache_saves_total == 2 and stats.prompt_cache_entries == 2
    assert stats.kv_cache_tokens == 180 + 19


async def test_multibyte_characters_are_never_split(engine: LlamaEngine) -> None:
    # the grammar forces text whose emoji spans several byte-level tokens
    assert len(engine.tokenize("🐱", add_special=False)) > 1
    tokens = engine.tokenize("Say it:", add_special=True)
    params = GenerationParams(max_tokens=20, temperature=0, grammar='root ::= "🐱 café 🐶"')
    events = [ev async for ev in engine.async_generate(tokens, params)]
    assert events[-1].finish_reason == "stop"
    assert "".join(ev.text for ev in events) == "🐱 café 🐶"
    assert all("\ufffd" not in ev.text for ev in events)


@pytest.mark.parametrize("params", [GenerationParams(temperature=0), GenerationParams(temperature=0.7, seed=3)], ids=["greedy", "sampled"])
async def test_a_grammar_with_no_way_on_ends_its_request_with_an_error_not_the_engine(
    engine: LlamaEngine, params: GenerationParams
) -> None:
    # after "ok", the class matches no character and the rule is not done: nothing may come
    # next, not even the end; accepting any token there aborted the process inside llama.cpp
    dead_end = replace(params, max_tokens=20, grammar='root ::= "ok" [^\\x00-\\U0010FFFF]')
    tokens = engine.tokenize("Say ok.", add_special=True)
    events: list[TokenEvent] = []
    with pytest.raises(ValidationError) as info:
        async for ev in engine.async_generate(tokens, dead_end):
            events.append(ev)
    assert info.value.param == "grammar" and info.value.status == 422
    assert "allows no next token" in str(info.value)
    assert "".join(ev.text for ev in events) == "ok"  # the text generated before goes out first
    after = [ev async for ev in engine.async_generate(tokens, GenerationParams(max_tokens=4, temperature=0))]
    assert after[-1].finish_reason is not None and engine.stats().slots_busy == 0


async def test_stream_interval_hands_tokens_over_together_without_losing_any(engine: LlamaEngine) -> None:
    """A held stream gets its first token at once, later ones in groups, and the same text."""
    tokens = story(engine)
    params = GenerationParams(max_tokens=48, temperature=0)
    per_token: list[TokenEvent] = [ev async for ev in engine.async_generate(tokens, params)]
    held_engine = make_engine(slots=1, stream_interval_ms=200)
    await held_engine.async_start()
    try:
        arrivals: list[tuple[float, TokenEvent]] = []
        t0 = time.perf_counter()
        async for ev in held_engine.async_generate(tokens, params):
            arrivals.append((time.perf_counter() - t0, ev))
    finally:
        await held_engine.async_stop()
    held = [ev for _, ev in arrivals]
    assert "".join(ev.text for ev in held) == "".join(ev.text for ev in per_token)
    assert held[-1].final and held[-1].completion_tokens == per_token[-1].completion_tokens == 48
    # interval 0: one event per token; 200 ms: far fewer, the first holding a single token
    assert len(per_token) >= 40
    assert len(held) < len(per_token) / 2
    assert held[0].text == per_token[0].text
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(arrivals[:-1])]
    assert all(g >= 0.1 for g in gaps), gaps  # later hand-overs are spaced by the interval
