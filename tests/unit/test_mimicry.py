"""Mimicry and personality: features, moving averages, language, directives, feedback (pure)."""

from __future__ import annotations

import pytest

from mongarsd.cognition import mimicry, personality
from mongarsd.errors import ValidationError


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("Bonjour, je voudrais savoir comment est la météo dans ma ville", "fr"),
        ("Hello, I would like to know what the weather is in my town", "en"),
        ("Hola, quiero saber cómo está el tiempo en mi ciudad", "es"),
        ("Hallo, ich möchte wissen wie das Wetter in meiner Stadt ist", "de"),
        ("42", None),
    ],
)
def test_detect_language(text: str, lang: str | None) -> None:
    assert mimicry.detect_language(text) == lang


def test_features_questions_exclamations_sentiment() -> None:
    f = mimicry.message_features("This is great! Really great! Why?")
    assert f["exclamation_ratio"] == pytest.approx(2 / 3)
    assert f["question_ratio"] == pytest.approx(1 / 3)
    assert f["sentiment"] == 1.0
    assert mimicry.sentiment("this is terrible and useless") == -1.0
    assert mimicry.sentiment("the table is brown") == 0.0


def test_formality_orders_polite_above_slang() -> None:
    polite = mimicry.formality("Could you please send me the report? Kind regards.")
    slang = mimicry.formality("hey lol gonna need that thing 😂")
    assert polite > 0.6
    assert slang < 0.4


def test_ewma_first_value_then_moving_average() -> None:
    p = mimicry.update_profile({}, "one two three four")
    assert p["length_words"] == 4.0 and p["messages"] == 1
    p = mimicry.update_profile(p, "one two three four five six seven eight nine ten eleven twelve thirteen fourteen")
    assert p["length_words"] == pytest.approx(0.8 * 4 + 0.2 * 14)
    assert p["messages"] == 2


def test_language_profile_and_directives() -> None:
    p: dict[str, object] = {}
    for _ in range(3):
        p = mimicry.update_profile(p, "Bonjour, je suis content de vous parler de mon projet")
    assert mimicry.dominant_language(p) == "fr"
    d = mimicry.style_directives(p)
    assert "Answer in French." in d
    # the current message's clear language wins over the profile
    assert "Answer in French." not in mimicry.style_directives(p, "Please tell me what the weather is like in the town")


def test_directives_for_short_casual_frustrated_user() -> None:
    p: dict[str, object] = {}
    for _ in range(5):
        p = mimicry.update_profile(p, "hey this is broken lol")
    d = " ".join(mimicry.style_directives(p))
    assert "brief" in d and "casual" in d and "frustrated" in d
    assert mimicry.style_directives({}) == []  # nothing known: no style directive


def test_personality_observe_moves_toward_mimicry() -> None:
    base = personality.normalize({})
    after = personality.observe(base, {"formality": 1.0, "question_ratio": 1.0, "length_words": 80})
    assert after["interaction_style"]["formality"] > base["interaction_style"]["formality"]
    assert after["interaction_style"]["directness"] > base["interaction_style"]["directness"]
    assert after["observations"] == 1


def test_feedback_comment_changes_verbosity_and_directives() -> None:
    p = personality.normalize({})
    for _ in range(4):
        p = personality.apply_feedback(p, -1, "way too long, be more concise")
    assert p["interaction_style"]["verbosity"] < 0.3
    assert "Keep answers short." in personality.style_directives(p)
    assert p["feedback"] == 4


def test_edit_validation_and_apply() -> None:
    with pytest.raises(ValidationError) as err:
        personality.validate_edit({"traits": {"openness": 2}})
    assert err.value.param == "traits.openness"
    with pytest.raises(ValidationError):
        personality.validate_edit({"secret_admin": True})
    edit = personality.validate_edit({"interaction_style": {"humor": 0.9}, "note": "Call me Sam"})
    p = personality.apply_edit({}, edit)
    assert p["interaction_style"]["humor"] == 0.9 and p["confidence"] == 1.0
    assert any("Call me Sam" in d for d in personality.style_directives(p))


def test_normalize_drops_garbage() -> None:
    p = personality.normalize({"traits": {"openness": "x", "bogus": 0.3}, "interaction_style": [], "confidence": 7})
    assert p["traits"] == personality.DEFAULT_TRAITS
    assert p["confidence"] == 1.0
