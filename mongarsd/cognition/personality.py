"""Personality: persisted per-user traits and interaction style, nudged by mimicry and feedback.

The original estimated traits from a fixed random projection of a LoRA hidden state; here
the values are plain, explainable moving targets: the observed style (mimicry) and what
the user said about answers (feedback), both readable and editable through the API.
"""

from __future__ import annotations

import re
from typing import Any

from mongarsd.errors import ValidationError

ADAPTATION_RATE = 0.1  # how far one observation moves a value toward its target
FEEDBACK_RATE = 0.15
PROFILE_VERSION = 1

DEFAULT_TRAITS: dict[str, float] = {
    "openness": 0.55,
    "conscientiousness": 0.55,
    "extraversion": 0.55,
    "agreeableness": 0.55,
    "neuroticism": 0.45,
}
DEFAULT_STYLE: dict[str, float] = {
    "formality": 0.5,
    "humor": 0.5,
    "enthusiasm": 0.5,
    "directness": 0.5,
    "verbosity": 0.5,
}
MAX_NOTE_CHARS = 500

_SHORTER = re.compile(r"\b(too long|shorter|concise|brief|less detail|trop long|plus court|bref|más corto|kürzer)\b", re.I)
_LONGER = re.compile(
    r"\b(too short|more detail|longer|elaborate|explain more|plus de détails|trop court|más detalle|ausführlicher)\b", re.I
)
_FORMAL = re.compile(r"\b(too casual|more formal|more professional|plus formel|más formal|förmlicher)\b", re.I)
_CASUAL = re.compile(r"\b(too formal|more casual|less formal|relax|moins formel|más informal|lockerer)\b", re.I)
_FUNNY = re.compile(r"\b(funny|joke|humou?r|drôle|gracioso|witzig)\b", re.I)


def _clamp(v: float) -> float:
    return max(0.0, min(1.0, v))


def _toward(cur: float, target: float, rate: float) -> float:
    return round(_clamp(cur + rate * (target - cur)), 4)


def normalize(profile: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and drop unknown keys or out-of-range values (pure)."""
    traits = dict(DEFAULT_TRAITS)
    style = dict(DEFAULT_STYLE)
    for src, dst in ((profile.get("traits"), traits), (profile.get("interaction_style"), style)):
        if isinstance(src, dict):
            for k, v in src.items():
                if k in dst and isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= float(v) <= 1.0:
                    dst[k] = float(v)
    note = profile.get("note")
    return {
        "traits": traits,
        "interaction_style": style,
        "confidence": _clamp(float(profile.get("confidence", 0.2))) if isinstance(profile.get("confidence"), (int, float)) else 0.2,
        "observations": int(profile.get("observations", 0)) if isinstance(profile.get("observations"), int) else 0,
        "feedback": int(profile.get("feedback", 0)) if isinstance(profile.get("feedback"), int) else 0,
        "note": note if isinstance(note, str) else "",
        "version": PROFILE_VERSION,
    }


def validate_edit(body: dict[str, Any]) -> dict[str, Any]:
    """Check a client's profile edit: only known keys, numbers in [0, 1]; raise ValidationError naming the field."""
    allowed = {"traits": DEFAULT_TRAITS, "interaction_style": DEFAULT_STYLE}
    for key in body:
        if key not in (*allowed, "note"):
            raise ValidationError(f"unknown profile field '{key}'; editable: traits, interaction_style, note", param=key)
    for section, known in allowed.items():
        value = body.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValidationError(f"'{section}' must be an object", param=section)
        for k, v in value.items():
            if k not in known:
                raise ValidationError(f"unknown {section} key '{k}'; known: {', '.join(known)}", param=f"{section}.{k}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ValidationError(f"'{section}.{k}' must be a number between 0 and 1", param=f"{section}.{k}")
    note = body.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE_CHARS):
        raise ValidationError(f"'note' must be a string of at most {MAX_NOTE_CHARS} characters", param="note")
    return body


def apply_edit(profile: dict[str, Any], edit: dict[str, Any]) -> dict[str, Any]:
    """Merge a validated edit into the profile (pure); explicit edits count as full confidence."""
    out = normalize(profile)
    for section in ("traits", "interaction_style"):
        for k, v in (edit.get(section) or {}).items():
            out[section][k] = float(v)
    if "note" in edit and edit["note"] is not None:
        out["note"] = edit["note"]
    out["confidence"] = 1.0
    return out


def observe(profile: dict[str, Any], mimicry: dict[str, Any], *, rate: float = ADAPTATION_RATE) -> dict[str, Any]:
    """Move the interaction style toward what the user's own messages show (pure)."""
    out = normalize(profile)
    style = out["interaction_style"]
    if "formality" in mimicry:
        style["formality"] = _toward(style["formality"], float(mimicry["formality"]), rate)
    if "exclamation_ratio" in mimicry or "sentiment" in mimicry:
        target = _clamp(0.5 + 0.5 * float(mimicry.get("exclamation_ratio", 0.0)) + 0.25 * float(mimicry.get("sentiment", 0.0)))
        style["enthusiasm"] = _toward(style["enthusiasm"], target, rate)
    if "question_ratio" in mimicry:
        style["directness"] = _toward(style["directness"], _clamp(0.4 + 0.6 * float(mimicry["question_ratio"])), rate)
    if "length_words" in mimicry:
        style["verbosity"] = _toward(style["verbosity"], _clamp(float(mimicry["length_words"]) / 40.0), rate / 2)
    out["observations"] += 1
    out["confidence"] = max(out["confidence"], round(min(0.2 + 0.05 * out["observations"], 0.8), 4))
    return out


def apply_feedback(profile: dict[str, Any], rating: int, comment: str = "", *, rate: float = FEEDBACK_RATE) -> dict[str, Any]:
    """Adjust the style from explicit feedback: the comment says what to change, the rating how sure we are (pure)."""
    out = normalize(profile)
    style = out["interaction_style"]
    if _SHORTER.search(comment):
        style["verbosity"] = _toward(style["verbosity"], 0.0, rate * 2)
    if _LONGER.search(comment):
        style["verbosity"] = _toward(style["verbosity"], 1.0, rate * 2)
    if _FORMAL.search(comment):
        style["formality"] = _toward(style["formality"], 1.0, rate * 2)
    if _CASUAL.search(comment):
        style["formality"] = _toward(style["formality"], 0.0, rate * 2)
    if _FUNNY.search(comment) and rating > 0:
        style["humor"] = _toward(style["humor"], 1.0, rate)
    if rating > 0:
        out["traits"]["agreeableness"] = _toward(out["traits"]["agreeableness"], 0.7, rate / 3)
        out["confidence"] = _clamp(out["confidence"] + 0.05)
    elif rating < 0:
        out["confidence"] = _clamp(out["confidence"] - 0.05)
    out["feedback"] += 1
    return out


def style_directives(profile: dict[str, Any]) -> list[str]:
    """Directives from the persisted style; only values clearly away from neutral speak (pure)."""
    p = normalize(profile)
    s = p["interaction_style"]
    out: list[str] = []
    if s["verbosity"] <= 0.3:
        out.append("Keep answers short.")
    elif s["verbosity"] >= 0.75:
        out.append("Give thorough, detailed answers.")
    if s["formality"] >= 0.75:
        out.append("Stay formal.")
    elif s["formality"] <= 0.25:
        out.append("Stay casual.")
    if s["humor"] >= 0.75:
        out.append("Light humor is welcome.")
    if s["directness"] >= 0.75:
        out.append("Be direct.")
    if s["enthusiasm"] >= 0.8:
        out.append("Be enthusiastic.")
    if p["note"]:
        out.append("User's note about how to answer: " + p["note"].replace("\n", " ")[:MAX_NOTE_CHARS])
    return out
