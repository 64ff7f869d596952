"""Bouche's pacing plan as markup: answer text -> SSML that espeak-ng (`-m`) speaks (pure).

The original planned pauses and tempo as metadata and would have slept between segments; here
the plan is markup the synthesiser renders: a `<break>` after each punctuation mark, sized by
the mark, and `<emphasis>` on capitalised words. Capitals are recognised with Unicode case
(`str.isupper`), so accented capitals (É, À, Ç, Ö) count: the original tested an ASCII range and
missed them. Markdown is stripped first: a listener hears the words, not the asterisks.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from xml.sax.saxutils import escape

# Pause after each mark at speed 1.0, in milliseconds. espeak-ng replaces its own clause pause
# by an explicit break, so these are the whole pause; they stay near its defaults so that a
# paced text keeps a natural words-per-minute rate.
COMMA_PAUSE_MS = 180  # , ، 、 ，
CLAUSE_PAUSE_MS = 300  # ; : ； ：
SENTENCE_PAUSE_MS = 450  # . ! ? 。 ！ ？
ELLIPSIS_PAUSE_MS = 650  # … or ...
LINE_PAUSE_MS = 300  # a line that ends without a mark (a heading, a list item)
PARAGRAPH_PAUSE_MS = 700  # a blank line
MIN_PAUSE_MS = 20  # pauses shrink with speed, never below this
MIN_EMPHASIS_LETTERS = 2  # "I", "A" and other one-letter words are never emphasised

_COMMA_MARKS = frozenset(",،、，")
_CLAUSE_MARKS = frozenset(";:；：")
_SENTENCE_MARKS = frozenset(".!?。！？‼⁇")
_ELLIPSIS = "…"

_FENCE_RE = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})")
_HEADING_RE = re.compile(r"^[ \t]{0,3}#{1,6}(?:[ \t]+|$)(.*?)(?:[ \t]+#+)?[ \t]*$")
_RULE_RE = re.compile(r"^[ \t]{0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_QUOTE_RE = re.compile(r"^[ \t]*(?:>[ \t]?)+")
_LIST_RE = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+")
_TABLE_RULE_RE = re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(?:\|[ \t]*:?-{3,}:?[ \t]*)*\|?[ \t]*$")
_LINK_DEF_RE = re.compile(r"^[ \t]{0,3}\[[^\]]+\]:[ \t]+\S+.*$")
_IMAGE_RE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK_RE = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_REF_LINK_RE = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_AUTOLINK_RE = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
_STAR_RE = re.compile(r"(\*{1,3})(?=\S)(.+?)(?<=\S)\1")
_UNDERSCORE_RE = re.compile(r"(?<!\w)(_{1,3})(?=\S)(.+?)(?<=\S)\1(?!\w)")
_STRIKE_RE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_CODE_SPAN_RE = re.compile(r"(`+)(.+?)\1")
_BLANK_RUN_RE = re.compile(r"\n[ \t]*\n\s*")
# Characters XML 1.0 cannot carry (C0 controls but tab and newlines, the non-characters).
_XML_INVALID_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
# A French or Irish elision before the word proper: l'École, d'Émile, qu'Ève, O'Neil.
_ELISION_RE = re.compile(r"^\w{1,3}['’](?=\w)")
_WORD_RE = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)


@dataclass(frozen=True, slots=True)
class Word:
    """A word as spoken: leading marks, the word itself, trailing marks, and whether it is stressed."""

    lead: str
    core: str
    trail: str
    emphasis: bool


@dataclass(frozen=True, slots=True)
class Pause:
    """Silence after a mark or a line, in milliseconds at speed 1.0."""

    ms: int


Token = Word | Pause


def _inline(line: str) -> str:
    """Strip inline markdown from one line (links keep their text, images their alt text)."""
    line = _CODE_SPAN_RE.sub(lambda m: m.group(2).strip(), line)
    line = _IMAGE_RE.sub(r"\1", line)
    line = _LINK_RE.sub(r"\1", line)
    line = _REF_LINK_RE.sub(r"\1", line)
    line = _AUTOLINK_RE.sub(r"\1", line)
    for _ in range(3):  # nested ***bold italic*** and **_mixed_** need a pass per level
        stripped = _STRIKE_RE.sub(r"\1", _UNDERSCORE_RE.sub(r"\2", _STAR_RE.sub(r"\2", line)))
        if stripped == line:
            break
        line = stripped
    return line


def strip_markdown(text: str) -> str:
    """Turn markdown into the plain text a listener should hear; paragraphs stay separated by a blank line.

    Code blocks keep their content (without the fences) since an answer's commands are part of
    it; headings, list markers, quotes, rules, emphasis marks and link targets go.
    """
    out: list[str] = []
    fence: str | None = None
    for raw in unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        m = _FENCE_RE.match(raw)
        if m is not None:
            mark = m.group(1)
            if fence is None:
                fence = mark[0] * 3
            elif mark.startswith(fence):
                fence = None
            out.append("")  # a code block stands apart from the text around it
            continue
        if fence is not None:
            out.append(raw.strip())
            continue
        if _RULE_RE.match(raw) or _TABLE_RULE_RE.match(raw) or _LINK_DEF_RE.match(raw):
            out.append("")
            continue
        heading = _HEADING_RE.match(raw)
        line = heading.group(1) if heading else raw
        line = _LIST_RE.sub("", _QUOTE_RE.sub("", line))
        if line.lstrip().startswith("|"):
            line = ", ".join(cell.strip() for cell in line.strip().strip("|").split("|") if cell.strip())
        out.append(_inline(line).strip())
    joined = "\n".join(out).strip()
    return _BLANK_RUN_RE.sub("\n\n", joined)


def _mark_pause(trail: str) -> int:
    """The pause a word's trailing marks call for (the strongest mark wins), 0 for none."""
    if _ELLIPSIS in trail or "..." in trail:
        return ELLIPSIS_PAUSE_MS
    if any(c in _SENTENCE_MARKS for c in trail):
        return SENTENCE_PAUSE_MS
    if any(c in _CLAUSE_MARKS for c in trail):
        return CLAUSE_PAUSE_MS
    if any(c in _COMMA_MARKS for c in trail):
        return COMMA_PAUSE_MS
    return 0


def _is_capital(c: str) -> bool:
    # Unicode case, not an ASCII range: É, À, Ç, Ö, Ø, Ł are capitals too; titlecase digraphs (ǅ) count.
    return c.isupper() or unicodedata.category(c) == "Lt"


def is_emphasized(word: str) -> bool:
    """Say whether a word is stressed: ALL CAPS or starting with a capital, with at least two letters."""
    word = unicodedata.normalize("NFC", word)
    word = _ELISION_RE.sub("", word)
    letters = [c for c in word if c.isalpha()]
    if len(letters) < MIN_EMPHASIS_LETTERS:
        return False
    return _is_capital(letters[0]) or all(_is_capital(c) for c in letters)


def plan(text: str) -> list[Token]:
    """Plan the words and pauses of a text: markdown stripped, a pause after marks, lines and paragraphs.

    The first word of each sentence (after . ! ? …, a line break or a paragraph) is never
    emphasised, whatever its case: it is capitalised by grammar, not for stress.
    """
    tokens: list[Token] = []
    paragraphs = strip_markdown(text).split("\n\n")
    for p_index, paragraph in enumerate(paragraphs):
        if p_index and tokens:
            _end_with(tokens, PARAGRAPH_PAUSE_MS)
        lines = [ln for ln in paragraph.split("\n") if ln.strip()]
        for l_index, line in enumerate(lines):
            if l_index and tokens:
                _end_with(tokens, LINE_PAUSE_MS)
            first = True
            for raw in line.split():
                m = _WORD_RE.match(raw)
                lead, core, trail = (m.group(1), m.group(2), m.group(3)) if m else ("", raw, "")
                if not core:
                    pause = _mark_pause(raw)
                    if pause:  # a mark standing alone ("…", " ; "): its pause belongs to the word before
                        _end_with(tokens, pause)
                        first = first or pause >= SENTENCE_PAUSE_MS
                    else:  # a symbol the synthesiser reads out ("=", "&", "<")
                        tokens.append(Word(raw, "", "", emphasis=False))
                    continue
                tokens.append(Word(lead, core, trail, emphasis=not first and is_emphasized(core)))
                pause = _mark_pause(trail)
                if pause:
                    tokens.append(Pause(pause))
                first = pause >= SENTENCE_PAUSE_MS
    return tokens


def _end_with(tokens: list[Token], ms: int) -> None:
    """Make the text so far end with a pause of at least `ms` (a mark's pause and a line's merge)."""
    if tokens and isinstance(tokens[-1], Pause):
        tokens[-1] = Pause(max(tokens[-1].ms, ms))
    else:
        tokens.append(Pause(ms))


def word_count(tokens: list[Token]) -> int:
    """Count the spoken words of a plan (symbols read out do not count)."""
    return sum(1 for t in tokens if isinstance(t, Word) and t.core)


def _xml(text: str) -> str:
    return escape(_XML_INVALID_RE.sub("", text), {'"': "&quot;"})


def pause_ms(ms: int, speed: float) -> int:
    """Scale a pause to the speaking speed (faster speech, shorter pauses), never below MIN_PAUSE_MS."""
    return max(MIN_PAUSE_MS, round(ms / speed))


def to_ssml(text: str, *, speed: float = 1.0) -> str:
    """Render a text's pacing plan as one line of SSML for `espeak-ng -m` (trailing pauses dropped)."""
    if speed <= 0:
        raise ValueError("speed must be positive")
    tokens = plan(text)
    while tokens and isinstance(tokens[-1], Pause):
        tokens.pop()
    parts: list[str] = []
    for token in tokens:
        if isinstance(token, Pause):
            if not parts:  # a text that opens with a lone mark: nothing to pause after
                continue
            parts[-1] += f'<break time="{pause_ms(token.ms, speed)}ms"/>'
            continue
        core = _xml(token.core)
        if token.emphasis:
            core = "<emphasis>" + core + "</emphasis>"
        parts.append(_xml(token.lead) + core + _xml(token.trail))
    return "<speak>" + " ".join(parts) + "</speak>"


def plain_text(text: str) -> str:
    """The words of a text without markdown, one paragraph per line (for engines without SSML)."""
    paragraphs = strip_markdown(text).split("\n\n")
    return "\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
