"""Greedy sampling read straight from llama.cpp's logits picks what llama.cpp's own chain picks.

The real default model, decoded step by step: at every step the in-place argmax (`GREEDY`, and a
grammar-checked sampler taking the argmax first) and llama.cpp's greedy sampler chain are asked
for the next token of the same logits, and must agree.

A lazy tool-call grammar (tool_choice auto) is driven into the token that once aborted the daemon
in a client replay: `<tool_call` written, then `>`` as the most likely next token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from mongarsd.errors import InferenceError
from mongarsd.inference.context import GREEDY, ConstrainedSampler, LlamaContext
from mongarsd.inference.grammar import schema_to_gbnf
from mongarsd.inference.sampling import JSON_GBNF, GenerationParams
from mongarsd.inference.settings import EngineSettings
from mongarsd.inference.tools import CALL_CLOSE, CALL_OPEN, ToolSet, ToolSpec, constraint_for, split_reply, wrap_call_grammar
from tests.conftest import DEFAULT_LLM, requires_models

pytestmark = requires_models(DEFAULT_LLM)

STEPS = 48


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaContext]:
    ctx = LlamaContext(
        model_path=DEFAULT_LLM,
        model_id="t",
        settings=EngineSettings(n_ctx=512, slots=1, threads=2, threads_batch=2, n_batch=256, n_ubatch=256),
    )
    ctx.load()
    yield ctx
    ctx.free()


def decode(llama: LlamaContext, tokens: list[int], pos: int) -> int:
    """Decode `tokens` at `pos` with logits for the last one; return the next position."""
    llama.decode_sequence(tokens, pos)
    return pos + len(tokens)


def greedy_chain(llama: LlamaContext) -> Any:
    lib = llama.lib
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    return chain


def start(llama: LlamaContext, text: str) -> int:
    llama.lib.llama_memory_clear(llama.mem, True)
    return decode(llama, llama.tokenize(text), 0)


def test_plain_greedy_needs_no_chain_and_anything_with_state_keeps_one(llama: LlamaContext) -> None:
    assert llama.make_sampler(GenerationParams(temperature=0), None) is GREEDY
    llama.free_sampler(GREEDY)  # nothing to free; must not touch llama.cpp
    penalised = llama.make_sampler(GenerationParams(temperature=0, repeat_penalty=1.3), None)
    sampled = llama.make_sampler(GenerationParams(temperature=0.7, seed=1), None)
    constrained = llama.make_sampler(GenerationParams(temperature=0), JSON_GBNF)
    penalised_constrained = llama.make_sampler(GenerationParams(temperature=0, repeat_penalty=1.3), JSON_GBNF)
    try:
        assert penalised is not GREEDY and sampled is not GREEDY
        assert isinstance(constrained, ConstrainedSampler) and constrained._argmax
        assert isinstance(penalised_constrained, ConstrainedSampler) and not penalised_constrained._argmax
    finally:
        for s in (penalised, sampled, constrained, penalised_constrained):
            llama.free_sampler(s)


def test_greedy_in_place_picks_llama_cpps_greedy_token_every_step(llama: LlamaContext) -> None:
    chain = greedy_chain(llama)
    try:
        pos = start(llama, "<|im_start|>user\nWrite a story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n")
        ours: list[int] = []
        for _ in range(STEPS):
            tok = llama.sample(GREEDY, -1)
            assert tok == int(llama.lib.llama_sampler_sample(chain, llama.ctx, -1))
            ours.append(tok)
            if llama.is_eog(tok):
                break
            pos = decode(llama, [tok], pos)
        assert len(ours) >= 8 and llama.detokenize(ours).strip()
        assert llama.is_eog(llama.tokenize("<|im_end|>", add_special=False, parse_special=True)[0])
        assert not llama.is_eog(ours[0])
    finally:
        llama.lib.llama_sampler_free(chain)


def test_grammar_checked_argmax_matches_the_full_chain_including_refusals(llama: LlamaContext) -> None:
    lib = llama.lib
    fast = llama.make_sampler(GenerationParams(temperature=0), JSON_GBNF)
    grammar = lib.llama_sampler_init_grammar(llama.vocab, JSON_GBNF.encode(), b"root")
    full = ConstrainedSampler(llama, greedy_chain(llama), grammar, argmax=False)
    try:
        pos = start(llama, "<|im_start|>user\nDescribe a cat named Tom.<|im_end|>\n<|im_start|>assistant\n")
        tokens: list[int] = []
        refused = 0
        for _ in range(STEPS):
            unconstrained = int(llama.logits(-1).argmax())
            tok = fast.sample(-1)
            assert tok == full.sample(-1)
            refused += tok != unconstrained
            tokens.append(tok)
            if llama.is_eog(tok):
                break
            pos = decode(llama, [tok], pos)
        assert refused >= 1  # the model wanted prose at least once: the grammar-wide path ran
        assert llama.detokenize([t for t in tokens if not llama.is_eog(t)]).lstrip().startswith(("{", "["))
    finally:
        llama.free_sampler(fast)
        full.free()


def test_logits_of_an_output_that_does_not_exist_is_an_error(llama: LlamaContext) -> None:
    start(llama, "Hello")
    row = llama.logits(-1)
    assert row.shape == (llama.n_vocab,) and row.dtype.name == "float32"
    with pytest.raises(InferenceError, match="no logits for output 5"):
        llama.logits(5)  # one output in the last batch


LIGHTS = ToolSet(tools=(ToolSpec("HassTurnOn", parameters={"type": "object", "properties": {"name": {"type": "string"}}}),))


def lazy_calls(llama: LlamaContext, params: GenerationParams) -> ConstrainedSampler:
    constraint = constraint_for(LIGHTS)
    assert constraint is not None and constraint.lazy
    grammar = wrap_call_grammar(schema_to_gbnf(constraint.schema, param="tools"), constraint.max_calls)
    sampler = llama.make_sampler(replace(params, tools=constraint), grammar)
    assert isinstance(sampler, ConstrainedSampler)
    return sampler


def force(llama: LlamaContext, *tokens: int) -> None:
    """Make `tokens` the most likely next tokens of the last decode, in that order (llama.cpp's own logits)."""
    row = llama.logits(-1)
    top = float(row.max())
    for rank, token in enumerate(tokens):
        row[token] = top + 50.0 - 10.0 * rank


def one_token(llama: LlamaContext, text: str) -> int:
    tokens = llama.tokenize(text, add_special=False)
    assert len(tokens) == 1, (text, tokens)
    return tokens[0]


@pytest.mark.parametrize(
    "params",
    [GenerationParams(temperature=0), GenerationParams(temperature=0, repeat_penalty=1.1), GenerationParams(temperature=0.7, seed=7)],
    ids=["argmax", "chain", "sampled"],
)
def test_a_token_opening_a_call_with_text_the_grammar_refuses_is_never_accepted(llama: LlamaContext, params: GenerationParams) -> None:
    *opening, bad = llama.tokenize(CALL_OPEN + "`", add_special=False)
    assert llama.piece(bad) == b">`"  # the token of the aborted replay: the tag's end and a backtick
    sampler = lazy_calls(llama, params)
    try:
        pos = start(llama, "<|im_start|>user\nTurn on the kitchen light.<|im_end|>\n<|im_start|>assistant\n")
        tokens: list[int] = []
        for tok in opening:  # `<tool_call`, one forced token at a time: free text for the grammar so far
            force(llama, tok)
            assert sampler.sample(-1) == tok
            tokens.append(tok)
            pos = decode(llama, [tok], pos)
        force(llama, bad, one_token(llama, ">"))  # `>`` first, the tag's plain end second
        chosen = sampler.sample(-1)  # before the fix: llama.cpp threw, and the process aborted
        assert chosen != bad and llama.piece(chosen) == b">"  # the chain's next choice
        tokens.append(chosen)
        for _ in range(STEPS):  # the call goes on under the grammar
            if llama.is_eog(tokens[-1]) or CALL_CLOSE in llama.detokenize(tokens):
                break
            pos = decode(llama, [tokens[-1]], pos)
            tokens.append(sampler.sample(-1))
        text = llama.detokenize([t for t in tokens if not llama.is_eog(t)])
        assert text.startswith(CALL_OPEN) and text[len(CALL_OPEN)] in "\n{"
        assert CALL_CLOSE in text or not params.greedy  # a sampled call may still be writing its arguments
        if CALL_CLOSE in text:
            _, calls, dropped = split_reply(text, LIGHTS)
            assert [c.name for c in calls] == ["HassTurnOn"] and dropped == 0
    finally:
        llama.free_sampler(sampler)


def test_the_text_a_call_may_start_with_is_checked_against_the_grammar_itself(llama: LlamaContext) -> None:
    sampler = lazy_calls(llama, GenerationParams(temperature=0))
    try:
        for text in [CALL_OPEN, CALL_OPEN + "\n", CALL_OPEN + "\n{", CALL_OPEN + '{"name": "HassTurnOn"', CALL_OPEN + '\n{ "na']:
            assert sampler._call_may_start(text.encode()), text
        for text in [CALL_OPEN + "`", CALL_OPEN + ">", CALL_OPEN + '\n{"name": "Other"', CALL_OPEN + "\n\n\n", CALL_OPEN + "\0"]:
            assert not sampler._call_may_start(text.encode()), text
        assert not sampler._call_may_start(CALL_OPEN.encode() + "é".encode()[:1])  # the first byte of a character JSON refuses here
    finally:
        llama.free_sampler(sampler)


def test_when_every_likely_token_is_refused_the_trigger_is_spelled_byte_by_byte(llama: LlamaContext) -> None:
    sampler = lazy_calls(llama, GenerationParams(temperature=0))
    try:
        sampler._tail = b"say <tool_c"
        tok = sampler._spell_trigger()
        assert llama.piece(tok) == b"a" and sampler._trigger is not None
        sampler._tail = b"<tool_call"
        tok = sampler._spell_trigger()
        assert llama.piece(tok) == b">" and sampler._trigger is None  # the grammar now constrains every token
    finally:
        llama.free_sampler(sampler)
