"""Bouche: trimming, sentence-end cuts on truncated answers, balanced code fences."""

from __future__ import annotations

from mongarsd.cognition.bouche import open_fence, shape


def test_trims_and_drops_leaked_role_prefix() -> None:
    assert shape("  Assistant: Hello there.  \n\n\n\nBye.") == "Hello there.  \n\nBye."


def test_complete_answer_is_not_cut() -> None:
    assert shape("It is 4. Then more text without end", truncated=False) == "It is 4. Then more text without end"


def test_truncated_answer_stops_at_last_sentence_end() -> None:
    text = "Paris is the capital of France. It has many museums. The Louvre is the larg"
    assert shape(text, truncated=True) == "Paris is the capital of France. It has many museums."


def test_truncated_without_sentence_end_gets_ellipsis() -> None:
    assert shape("a long run of words without any end", truncated=True) == "a long run of words without any end…"


def test_truncated_does_not_throw_away_most_of_the_answer() -> None:
    text = "Yes. " + "word " * 60
    assert shape(text, truncated=True).endswith("…")


def test_unbalanced_fence_is_closed() -> None:
    out = shape("Here:\n```python\nprint(1)\n")
    assert out.endswith("```") and open_fence(out) is None


def test_truncated_inside_code_drops_partial_line_and_closes() -> None:
    out = shape("Code:\n```python\nx = 1\ny = som", truncated=True)
    assert out == "Code:\n```python\nx = 1\n```"


def test_sentence_end_inside_code_is_not_a_cut_point() -> None:
    text = "Intro sentence here.\n```\na = 1. b = 2. c"
    out = shape(text, truncated=True)
    assert open_fence(out) is None
    assert "a = 1" in out


def test_tilde_fences_and_balanced_blocks() -> None:
    assert open_fence("~~~\nx\n~~~\n```\ny") == "```"
    assert open_fence("```\nx\n```") is None
