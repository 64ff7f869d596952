"""Prompt budgeting: oldest turns go first, then the weakest memories, then a clear 413."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mongarsd.cognition.prompt import PromptParts, fit, render
from mongarsd.errors import ValidationError


def count_words(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"].split()) + 2 for m in messages)


def _history(n_turns: int, words: int = 10) -> list[dict[str, str]]:
    out = []
    for i in range(n_turns):
        out.append({"role": "user", "content": f"u{i} " + "w " * words})
        out.append({"role": "assistant", "content": f"a{i} " + "w " * words})
    return out


def test_everything_fits_untouched() -> None:
    parts = PromptParts(system="sys", user_message="hello", memories=["m1", "m2"], history=_history(2))
    fitted = fit(parts, count_words, 10_000)
    assert fitted.dropped_history == 0 and fitted.dropped_memories == 0
    assert fitted.messages == render(parts, 2, 0)
    assert fitted.messages[0] == {"role": "system", "content": "sys"}
    assert fitted.messages[-1]["role"] == "user"
    assert fitted.messages[-1]["content"].endswith("The user's message:\nhello")
    assert "m1" in fitted.messages[-1]["content"]
    bare = PromptParts(system="sys", user_message="hello", history=_history(1))
    assert render(bare, 0, 0)[-1] == {"role": "user", "content": "hello"}  # nothing to carry: the words alone


def test_oldest_turns_are_dropped_first_and_whole() -> None:
    parts = PromptParts(system="sys", user_message="now", memories=["keep me"], history=_history(5))
    full = count_words(render(parts, 1, 0))
    fitted = fit(parts, count_words, full - 15)  # needs about one turn less
    assert fitted.dropped_history == 2  # one whole turn (user + assistant)
    assert fitted.messages[1]["content"].startswith("u1 ")  # the oldest kept is turn 1
    assert fitted.messages[-2]["content"].startswith("a4 ")  # the newest turn survives
    assert fitted.memories_kept == 1


def test_memories_dropped_weakest_first_after_history() -> None:
    mems = ["strong " * 20, "medium " * 20, "weak " * 20]
    parts = PromptParts(system="sys", user_message="q", memories=mems, history=_history(3))
    one = count_words(render(parts, 1, len(parts.history)))
    fitted = fit(parts, count_words, one + 5)
    assert fitted.history_kept == 0
    assert fitted.memories_kept == 1
    assert "strong" in fitted.messages[-1]["content"] and "weak" not in fitted.messages[-1]["content"]


def test_too_large_alone_is_413_with_clear_message() -> None:
    parts = PromptParts(system="sys", user_message="x " * 500, memories=["m"], history=_history(2))
    with pytest.raises(ValidationError) as err:
        fit(parts, count_words, 100)
    assert err.value.status == 413
    assert err.value.param == "message"
    assert "100" in str(err.value) and "max_tokens" in str(err.value)


def test_directives_and_context_come_with_the_users_message() -> None:
    parts = PromptParts(system="base", user_message="q", directives=["Answer in French."], context=["research text"])
    msgs = render(parts, 0, 0)
    assert msgs[0] == {"role": "system", "content": "base"}
    assert msgs[-1]["role"] == "user"
    assert "Answer in French." in msgs[-1]["content"] and "research text" in msgs[-1]["content"]
    assert msgs[-1]["content"].endswith("\nq")


def test_the_next_turn_keeps_the_previous_prompt_as_its_prefix() -> None:
    # The engine's prefix cache reuses the KV of the unchanged start of a prompt: what changes
    # each turn (style, recalled memories, context) must not come before the history.
    turn1 = PromptParts(system="sys", user_message="first", directives=["Be brief."], memories=["m1"], history=_history(2))
    before = render(turn1, 1, 0)
    history2 = [*turn1.history, {"role": "user", "content": "first"}, {"role": "assistant", "content": "answer"}]
    turn2 = PromptParts(system="sys", user_message="second", directives=["Be warm."], memories=["m7", "m8"], history=history2)
    after = render(turn2, 2, 0)
    kept = 1 + len(turn1.history)  # the system prompt and every earlier turn
    assert after[:kept] == before[:kept]
    assert after[kept : kept + 2] == history2[-2:]


@settings(max_examples=200, deadline=None)
@given(turns=st.integers(0, 12), mems=st.integers(0, 6), budget=st.integers(5, 400))
def test_binary_search_equals_linear_greedy(turns: int, mems: int, budget: int) -> None:
    parts = PromptParts(system="s", user_message="q q", memories=[f"m{i} x x" for i in range(mems)], history=_history(turns, 3))
    # reference: drop one turn at a time (oldest first), then one memory at a time
    expected = None
    for cut in range(turns + 1):
        if count_words(render(parts, mems, 2 * cut)) <= budget:
            expected = (2 * cut, mems)
            break
    if expected is None:
        for n in range(mems - 1, -1, -1):
            if count_words(render(parts, n, 2 * turns)) <= budget:
                expected = (2 * turns, n)
                break
    if expected is None:
        with pytest.raises(ValidationError):
            fit(parts, count_words, budget)
        return
    fitted = fit(parts, count_words, budget)
    assert (fitted.dropped_history, fitted.memories_kept) == expected
    assert fitted.tokens <= budget
