"""Mimicry: a per-user style profile (moving averages) turned into prompt style directives.

The original appended canned French sentences to answers; here the profile only steers
the model through short directives in the system prompt.
"""

from __future__ import annotations

import re
from typing import Any

from mongarsd.memory.hippocampus import STOPWORDS

EWMA_ALPHA = 0.2  # weight of the newest message in the moving averages
LANG_MIN_HITS = 2  # stopword hits a message needs before it votes for a language
LANG_CONFIDENT = 0.6
PROFILE_VERSION = 1

LANG_NAMES = {"en": "English", "fr": "French", "es": "Spanish", "de": "German"}

_WORD_RE = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)
_SENTENCE_RE = re.compile(r"[^.!?…]+[.!?…]*")
_EMOJI_RE = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf]")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


POSITIVE = _words(
    "good great excellent love like thanks thank awesome nice happy glad perfect wonderful helpful cool amazing "
    "bien super merci génial parfait excellent content contente heureux heureuse aime adore bravo "
    "bueno genial gracias perfecto excelente feliz encanta "
    "gut super danke toll perfekt prima freue"
)
NEGATIVE = _words(
    "bad wrong terrible hate awful useless broken angry sad annoying slow stupid worse worst problem fail failed "
    "mauvais nul faux horrible déteste inutile cassé fâché triste énervant lent pire problème "
    "malo mal terrible odio inútil roto triste lento peor problema "
    "schlecht falsch schrecklich hasse nutzlos kaputt traurig langsam schlimmer problem"
)
FORMAL_MARKERS = _words("please kindly regards sincerely would could may vous veuillez pourriez merci usted podría favor sie bitte könnten")
INFORMAL_MARKERS = _words(
    "hey hi yo lol haha ok okay gonna wanna yeah yep nope cool dude salut coucou ouais mdr hola vale jaja hallo na jo"
)

NUMERIC_FEATURES = ("length_words", "formality", "question_ratio", "exclamation_ratio", "sentiment")


def detect_language(text: str) -> str | None:
    """Guess en/fr/es/de from stopword hits; None when too little evidence."""
    words = [w.lower() for w in _WORD_RE.findall(text)]
    best, best_hits, total = None, 0, 0
    for lang, stops in STOPWORDS.items():
        hits = sum(1 for w in words if w in stops or w.split("'")[0] in stops)
        total += hits
        if hits > best_hits:
            best, best_hits = lang, hits
    if best_hits < LANG_MIN_HITS and not (best_hits == 1 and len(words) <= 3):
        return None
    return best


def sentiment(text: str) -> float:
    """Lexicon sentiment in [-1, 1]; 0 when no lexicon word occurs."""
    words = [w.lower() for w in _WORD_RE.findall(text)]
    pos = sum(1 for w in words if w in POSITIVE)
    neg = sum(1 for w in words if w in NEGATIVE)
    return 0.0 if pos + neg == 0 else (pos - neg) / (pos + neg)


def formality(text: str) -> float:
    """Estimate formality in [0, 1] from markers, capitalization, emoji and slang."""
    words = [w.lower() for w in _WORD_RE.findall(text)]
    score = 0.5
    score += 0.15 * min(sum(1 for w in words if w in FORMAL_MARKERS), 2)
    score -= 0.15 * min(sum(1 for w in words if w in INFORMAL_MARKERS), 2)
    if _EMOJI_RE.search(text):
        score -= 0.15
    stripped = text.strip()
    if stripped and stripped[0].islower():
        score -= 0.1
    if re.search(r"[.!?]$", stripped) and stripped[:1].isupper():
        score += 0.05
    if re.search(r"(!!|\?\?|\.\.\.)", text):
        score -= 0.05
    return max(0.0, min(1.0, score))


def message_features(text: str) -> dict[str, Any]:
    """Measure one user message (pure)."""
    sentences = [s for s in _SENTENCE_RE.findall(text) if s.strip()] or [text]
    n_sent = max(len(sentences), 1)
    return {
        "length_words": float(len(_WORD_RE.findall(text))),
        "formality": formality(text),
        "question_ratio": min(text.count("?") / n_sent, 1.0),
        "exclamation_ratio": min(text.count("!") / n_sent, 1.0),
        "sentiment": sentiment(text),
        "language": detect_language(text),
    }


def update_profile(profile: dict[str, Any], text: str, *, alpha: float = EWMA_ALPHA) -> dict[str, Any]:
    """Return the profile with `text` folded into its moving averages (pure; the first message is taken as is)."""
    feats = message_features(text)
    out = dict(profile)
    n = int(profile.get("messages", 0))
    for key in NUMERIC_FEATURES:
        new = float(feats[key])
        old = profile.get(key)
        out[key] = round(new if n == 0 or not isinstance(old, (int, float)) else (1 - alpha) * float(old) + alpha * new, 4)
    langs = {k: float(v) for k, v in dict(profile.get("languages", {})).items() if k in LANG_NAMES and isinstance(v, (int, float))}
    lang = feats["language"]
    if lang is not None:
        langs = {k: (1 - alpha) * v for k, v in langs.items()}
        langs[lang] = langs.get(lang, 0.0) + (alpha if langs else 1.0)
        out["languages"] = {k: round(v, 4) for k, v in langs.items()}
    out["messages"] = n + 1
    out["version"] = PROFILE_VERSION
    return out


def dominant_language(profile: dict[str, Any], current_text: str | None = None) -> str | None:
    """The language to answer in: the current message's when clear, else the profile's dominant one."""
    if current_text is not None:
        lang = detect_language(current_text)
        if lang is not None:
            return lang
    langs = profile.get("languages") or {}
    if not langs:
        return None
    total = sum(float(v) for v in langs.values()) or 1.0
    lang, weight = max(langs.items(), key=lambda kv: float(kv[1]))
    return str(lang) if float(weight) / total >= LANG_CONFIDENT else None


def style_directives(profile: dict[str, Any], current_text: str | None = None) -> list[str]:
    """Turn the style profile into short imperative directives for the system prompt (pure)."""
    out: list[str] = []
    lang = dominant_language(profile, current_text)
    if lang is not None and lang != "en":
        out.append(f"Answer in {LANG_NAMES[lang]}.")
    if int(profile.get("messages", 0)) == 0:
        return out
    length = float(profile.get("length_words", 0.0))
    if length and length < 8:
        out.append("The user writes short messages: keep answers brief (one to three sentences).")
    elif length > 40:
        out.append("The user writes long, detailed messages: detailed answers are welcome.")
    form = float(profile.get("formality", 0.5))
    if form >= 0.7:
        out.append("Use a formal, polite tone.")
    elif form <= 0.3:
        out.append("Use a casual, friendly tone.")
    senti = float(profile.get("sentiment", 0.0))
    if senti <= -0.3:
        out.append("The user seems frustrated: be patient, supportive and get to the point.")
    elif senti >= 0.5:
        out.append("The user is upbeat: a warm tone fits.")
    if float(profile.get("question_ratio", 0.0)) >= 0.6:
        out.append("The user asks direct questions: answer the question first, then add context if needed.")
    if float(profile.get("exclamation_ratio", 0.0)) >= 0.5:
        out.append("Match the user's energy without overdoing exclamation marks.")
    return out
