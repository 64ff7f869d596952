"""Bouche's pacing plan: markdown stripped, pauses after marks, emphasis on (accented) capitals, valid SSML."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mongarsd.cognition import pacing
from mongarsd.cognition.pacing import Pause, Word, is_emphasized, plain_text, plan, strip_markdown, to_ssml


def emphasized(text: str) -> list[str]:
    return [t.core for t in plan(text) if isinstance(t, Word) and t.emphasis]


def breaks(ssml: str) -> list[int]:
    return [int(ms) for ms in re.findall(r'<break time="(\d+)ms"/>', ssml)]


@pytest.mark.parametrize(
    ("word", "stressed"),
    [
        ("Émile", True),  # the original's bug: an accented capital was not a capital
        ("Ça", True),
        ("Öl", True),
        ("Łódź", True),
        ("ÉCOLE", True),
        ("NASA", True),
        ("COVID-19", True),
        ("Paris", True),
        ("d'Émile", True),  # a French elision before the capital
        ("l'ÉTAT", True),
        ("O'Neil", True),
        ("émile", False),
        ("école", False),
        ("iPhone", False),
        ("I", False),  # one letter: never stressed
        ("À", False),
        ("don't", False),
        ("42", False),
        ("東京", False),  # no case: no emphasis
    ],
)
def test_emphasis_uses_unicode_case(word: str, stressed: bool) -> None:
    assert is_emphasized(word) is stressed


def test_decomposed_accents_count_as_capitals() -> None:
    assert is_emphasized("E\u0301mile")  # É written as E + combining acute


def test_first_word_of_each_sentence_is_not_emphasised() -> None:
    text = "Émile arrive. Étienne parle à Émile! Ça VA? Oui… Bernard aussi"
    assert emphasized(text) == ["Émile", "VA"]


def test_first_word_after_a_line_break_is_not_emphasised() -> None:
    assert emphasized("Liste\nPremier Point\n- Second Point") == ["Point", "Point"]


def test_pauses_are_sized_by_the_mark() -> None:
    ssml = to_ssml("One, two; three: four. Five! Six? Seven… eight... nine")
    assert breaks(ssml) == [
        pacing.COMMA_PAUSE_MS,
        pacing.CLAUSE_PAUSE_MS,
        pacing.CLAUSE_PAUSE_MS,
        pacing.SENTENCE_PAUSE_MS,
        pacing.SENTENCE_PAUSE_MS,
        pacing.SENTENCE_PAUSE_MS,
        pacing.ELLIPSIS_PAUSE_MS,
        pacing.ELLIPSIS_PAUSE_MS,
    ]
    assert pacing.COMMA_PAUSE_MS < pacing.CLAUSE_PAUSE_MS < pacing.SENTENCE_PAUSE_MS < pacing.ELLIPSIS_PAUSE_MS


def test_marks_inside_numbers_and_words_make_no_pause() -> None:
    assert breaks(to_ssml("Pi is 3.14 and 1,000 is a thousand")) == []


def test_closing_quotes_and_brackets_after_a_mark_still_pause() -> None:
    ssml = to_ssml('He said "stop." Then (quietly.) left')
    assert breaks(ssml) == [pacing.SENTENCE_PAUSE_MS, pacing.SENTENCE_PAUSE_MS]


def test_pauses_shrink_with_speed_and_never_vanish() -> None:
    assert breaks(to_ssml("a, b. c", speed=2.0)) == [pacing.COMMA_PAUSE_MS // 2, pacing.SENTENCE_PAUSE_MS // 2]
    assert min(breaks(to_ssml("a, b. c", speed=100.0))) == pacing.MIN_PAUSE_MS
    with pytest.raises(ValueError):
        to_ssml("a", speed=0)


def test_paragraphs_and_lines_pause() -> None:
    tokens = plan("Title\n\nFirst line\nsecond line")
    assert [t.ms for t in tokens if isinstance(t, Pause)] == [pacing.PARAGRAPH_PAUSE_MS, pacing.LINE_PAUSE_MS]
    # a line that already ends a sentence keeps one pause, the longer of the two
    tokens = plan("Done.\nNext")
    assert [t.ms for t in tokens if isinstance(t, Pause)] == [pacing.SENTENCE_PAUSE_MS]


def test_trailing_pause_is_dropped_and_leading_mark_ignored() -> None:
    ssml = to_ssml("… Hello there.")
    assert ssml == "<speak>Hello there.</speak>"


def test_markdown_is_stripped() -> None:
    md = (
        "# The *Plan*\n\n"
        "Read **this** and _that_ and ~~old~~ in `code`, see [the docs](https://example.com/x) "
        "and ![a chart](c.png) or <https://example.org>.\n\n"
        "> quoted line\n"
        "- first item\n"
        "2. second item\n"
        "***\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "```python\nprint(a_b * 2)\n```\n"
        "[ref]: https://example.com\n"
    )
    out = strip_markdown(md)
    for gone in ("#", "**", "`", "](", "~~", "> ", "- first", "2.", "***", "|---", "[ref]", "https://example.com/x"):
        assert gone not in out, (gone, out)
    for kept in ("The Plan", "Read this and that and old in code", "the docs", "a chart", "https://example.org"):
        assert kept in out, (kept, out)
    assert "print(a_b * 2)" in out  # code keeps its text, intraword underscores and all
    assert "quoted line" in out and "first item" in out and "second item" in out
    assert "a, b" in out and "1, 2" in out  # table cells read as a list


def test_markdown_emphasis_does_not_swallow_arithmetic() -> None:
    assert strip_markdown("2 * 3 * 4 is 24 and snake_case_name stays") == "2 * 3 * 4 is 24 and snake_case_name stays"


def test_ssml_is_well_formed_and_escapes_text() -> None:
    ssml = to_ssml('Tom & Jerry <script>alert("x")</script> AT&T\x01 said "HI"')
    root = ET.fromstring(ssml)  # raises on malformed XML
    assert root.tag == "speak"
    spoken = "".join(root.itertext())
    assert "Tom & Jerry <script>alert" in spoken and "AT&T" in spoken and "\x01" not in spoken
    assert [e.text for e in root.iter("emphasis")] == ["Jerry", "AT&T", "HI"]


def test_symbols_are_kept_for_the_synthesiser() -> None:
    assert to_ssml("```\nx = a < b\n```") == "<speak>x = a &lt; b</speak>"
    assert pacing.word_count(plan("x = a < b")) == 3


def test_plain_text_for_engines_without_ssml() -> None:
    assert plain_text("# Hi\n\nSome **bold**   text\nand more.") == "Hi\nSome bold text and more."


@given(st.text(max_size=400))
def test_any_text_gives_well_formed_ssml(text: str) -> None:
    ssml = to_ssml(text, speed=1.5)
    ET.fromstring(ssml)
    assert all(ms >= pacing.MIN_PAUSE_MS for ms in breaks(ssml))
