"""Cortex, the Curiosity Engine: a knowledge gap in a turn becomes background research through Iris.

A turn has a gap when it asks something and the caller's memory cannot answer it: the best
recall similarity is low, or it names something (a capitalised name, a quoted term) that none
of the recalled memories, the caller's other memories or the shared documents mention. The gap
schedules research: Iris searches (SearxNG) and reads the allowlisted sites, the best passages
are scored against the question and stored as memories of kind `research` for that user only,
with their provenance. The turn waits at most its budget; research that takes longer finishes
in the background and the next turn on the topic recalls it.

Defects of the original fixed here: the similar-history check read every user's history (here
only the caller's recall and the caller's own rows), entity detection needed a spaCy model
download (here a few regular expressions), research text was pasted into the prompt on every
turn and forgotten (here it is remembered with its source and confidence), and every turn with
an entity searched the web again (here research is bounded per user, deduplicated by query
and limited in concurrency, pages and time).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
import unicodedata
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import aiosqlite
import numpy as np
import numpy.typing as npt
import structlog

from mongarsd.cognition.iris.extract import HTML_TYPES, chunk_text, extract, fingerprint
from mongarsd.config import CuriosityConfig
from mongarsd.errors import EmbedderUnavailableError, MongarsError, StoreError, ValidationError
from mongarsd.memory.hippocampus import ALL_STOPWORDS, DOCUMENT_KIND, SHARED_OWNER, RecallResult
from mongarsd.supervisor import TaskSupervisor

if TYPE_CHECKING:
    from mongarsd.cognition.iris.fetch import FetchedPage, Fetcher
    from mongarsd.memory.hippocampus import Hippocampus

log = structlog.get_logger("mongarsd.cognition.cortex")

# ------------------------------------------------------------------------------ constants

MAX_SCAN_CHARS: Final = 2000  # of a message, read for entities and topics
MAX_ENTITIES: Final = 8
MAX_ENTITY_CHARS: Final = 80
MAX_SPAN_WORDS: Final = 4  # a capitalised span: "Université de Montréal", "Bank of New York"
MAX_QUOTED_WORDS: Final = 6  # longer quotations are sentences, not names
MAX_TERMS: Final = 12
MIN_TERM_CHARS: Final = 3
MAX_QUERY_WORDS: Final = 12
MAX_QUERY_CHARS: Final = 200
MAX_REASON_CHARS: Final = 500
TOKEN_CACHE_ENTRIES: Final = 64

RESEARCH_TIMEOUT_S: Final = 60.0  # one research, all pages and scoring; what it found by then is kept
REUSE_WINDOW_S: Final = 600.0  # the same question again within this reuses the research
FAILED_RETRY_S: Final = 60.0  # a failed research is tried again after this
MAX_PENDING: Final = 32  # research open at once, all users together (waiting on the semaphore or running)
SEARCH_RESULTS: Final = 5
MAX_PAGES: Final = 30  # pages read by one research: search hits plus crawled pages
MAX_PAGE_TEXT_CHARS: Final = 200_000  # of one page's text, chunked and scored
# HTML read from one page: parsing holds the GIL in C for stretches that grow with the page
# (about 20 ms per 100 KB on a desktop core), which the event loop feels; a research passage is
# almost always in the first part of a page. PDFs are parsed in Python and are not cut.
MAX_HTML_BYTES: Final = 256 * 1024
MAX_PAGE_CHUNKS: Final = 250
EMBED_PER_PAGE: Final = 6  # chunks of one page embedded (the best lexical ones)
MAX_EMBED_CHUNKS: Final = 48  # chunks embedded by one research
EMBED_BATCH: Final = 16
MAX_PER_PAGE: Final = 2  # research memories taken from one page
MAX_STORED_CHARS: Final = 2000  # of one research memory's text
EXTRACT_CHARS: Final = 300  # the provenance's `extract`
MAX_DEDUPE_ROWS: Final = 2000  # the user's latest research memories checked for duplicates
LIST_LIMIT_MAX: Final = 200
STOP_WAIT_S: Final = 0.5  # cancelled research must be gone within this (the service's stop timeout is larger)
STOP_MARK_S: Final = 0.4  # then its rows are marked failed within this

# Confidence of a passage, 0..1: LEXICAL_WEIGHT * lexical + (1 - LEXICAL_WEIGHT) * semantic, where
# lexical is the weighted share of the gap's entities (weight ENTITY_WEIGHT) and topic terms
# (weight 1) the passage contains, and semantic is the cosine between the question's and the
# passage's embeddings mapped linearly from [COS_FLOOR, COS_CEIL] onto [0, 1] (MiniLM puts
# unrelated text near 0.1 and a passage answering the question above 0.6). Without an embedder
# the confidence is lexical * NO_EMBED_FACTOR: word overlap alone is weaker evidence.
LEXICAL_WEIGHT: Final = 0.5
ENTITY_WEIGHT: Final = 2.0
COS_FLOOR: Final = 0.1
COS_CEIL: Final = 0.7
NO_EMBED_FACTOR: Final = 0.8
MIN_CONFIDENCE: Final = 0.3  # passages below this are not remembered
STRONG_CONFIDENCE: Final = 0.6  # enough strong passages from search hits: the sites are not crawled

STATUS_OPEN: Final = "open"
STATUS_RUNNING: Final = "running"
STATUS_DONE: Final = "done"
STATUS_NOTHING: Final = "nothing_found"
STATUS_FAILED: Final = "failed"
STATUSES: Final = (STATUS_OPEN, STATUS_RUNNING, STATUS_DONE, STATUS_NOTHING, STATUS_FAILED)
OUTCOMES: Final = (STATUS_DONE, STATUS_NOTHING, STATUS_FAILED, "cancelled")

GAP_UNCOVERED: Final = "uncovered_entity"
GAP_LOW_SIMILARITY: Final = "low_similarity"
GAP_NO_RECALL: Final = "no_recall"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words that ask: a message starting with one (or holding a phrase below) asks something even without "?".
QUESTION_STARTERS: Final = _words(
    "what who whom whose which where when why how explain describe define tell list compare summarize summarise "
    "is are was were do does did can could should would will shall may "
    "qu que quoi qui quel quelle quels quelles où ou quand comment pourquoi combien explique expliquez expliquer "
    "décris décrivez définis définissez dis dites parle parlez raconte racontez est-ce c'est"
)
_ASKING_RE: Final = re.compile(
    r"\b(?:tell me|explain|describe|i (?:want|would like|'d like) to know|i wonder|do you know|what about|je me demande|"
    r"dis-moi|dites-moi|parle-moi|parlez-moi|explique|expliquez|qu['’]est-ce|c['’]est quoi|je (?:veux|voudrais) savoir)\b",
    re.IGNORECASE,
)
# Words of greetings and thanks: a message of only these (and stop words) is small talk, never a gap.
SMALL_TALK_WORDS: Final = _words(
    "hi hello hey hiya yo howdy thanks thank thx ty you ok okay k bye goodbye cya good morning afternoon evening night "
    "great nice cool fine well sure please welcome cheers lol haha what's up sup how are doing going "
    "bonjour bonsoir salut coucou merci beaucoup bien ça va vas allez toi vous au revoir bonne nuit journée soirée "
    "super parfait génial d'accord rien oui non yes no comment very much so"
)
# Frequent sentence starters that are capitalised only because they start a sentence.
_COMMON_STARTERS: Final = _words(
    "tell explain describe define list compare summarize summarise please hello hi hey thanks thank yes no ok okay so well also "
    "today yesterday tomorrow now then maybe perhaps actually also still just really here there let give show find search look "
    "explique expliquez dis dites parle parlez raconte racontez décris décrivez merci bonjour salut oui non alors donc aujourd'hui "
    "hier demain maintenant peut-être voici voilà est-ce c'est qu'est-ce quel quelle quels quelles où quand comment pourquoi combien"
)
COMMON_CAPITALS: Final = ALL_STOPWORDS | QUESTION_STARTERS | _COMMON_STARTERS
# Never part of a name, wherever they stand.
STRONG_STOP_CAPITALS: Final = _words("i i'm i've i'd i'll ok okay")
CALENDAR_WORDS: Final = _words(
    "monday tuesday wednesday thursday friday saturday sunday january february march april may june july august september "
    "october november december lundi mardi mercredi jeudi vendredi samedi dimanche janvier février mars avril mai juin "
    "juillet août septembre octobre novembre décembre"
)
# Lower-case words that may join two capitalised words inside one name.
NAME_CONNECTORS: Final = _words("of the de du des la le d' van von der den del della da di dos y")
# Content-free words of a request, in English and French, on top of the memory's stop words.
EXTRA_STOPWORDS: Final = _words(
    "tell explain describe define know knew please something anything thing things stuff about like want need give show "
    "find search look let get got make much many more some any very really also just ever every someone anyone one "
    "explique expliquez expliquer dis dites parle parlez raconte racontez savoir sais veux voudrais peux pouvez chose "
    "choses quelque quelqu'un est-ce c'est qu'est-ce quoi quel quelle quels quelles comment pourquoi combien aussi "
    "where when why how which whom whose what who does did doing done can could should would will shall may might must "
    "tout tous toute toutes faire fait avoir"
)
TERM_STOPWORDS: Final = ALL_STOPWORDS | EXTRA_STOPWORDS | QUESTION_STARTERS

UNITS: Final = _words(
    "km/h m/s mph km² m² km2 m2 m³ m3 km m cm mm µm nm mi ft yd kg g mg µg t lb lbs oz l L ml mL cl dl gal "
    "ms µs ns s min h hr hrs Hz kHz MHz GHz THz B KB kB MB GB TB PB KiB MiB GiB TiB kb Mb Gb kbps Mbps Gbps "
    "V mV kV A mA mAh Ah W mW kW MW GW Wh kWh MWh J kJ cal kcal °C °F ° % ‰ € $ £ ¥ Pa hPa kPa MPa bar psi rpm dB px ppm ppb "
    "ha USD EUR CAD GBP"
)
_UNIT_ALT = "|".join(re.escape(u) for u in sorted(UNITS, key=len, reverse=True))
_QUANTITY_RE: Final = re.compile(r"(?<![\w.,])(\d+(?:[.,]\d+)?)\s?(" + _UNIT_ALT + r")(?![\w/²³])")
_QUOTED_RES: Final = (
    re.compile(r'"([^"\n]{2,80})"'),
    re.compile(r"“([^”\n]{2,80})”"),
    re.compile(r"„([^“”\n]{2,80})[“”]"),
    re.compile(r"«\s*([^»\n]{2,80}?)\s*»"),
    re.compile(r"‘([^’\n]{2,80})’"),
    re.compile(r"(?<!\w)'([^'\n]{2,80})'(?!\w)"),
)
_TOKEN_RE: Final = re.compile(r"\w+(?:[-'’]\w+)*")
_WORD_RE: Final = re.compile(r"\w+")
_ELISION_RE: Final = re.compile(r"^(?:[lLdDjJmMnNsStTcC]|[qQ]u|[jJ]usqu|[lL]orsqu|[pP]uisqu)['’](?=\w)")
_POSSESSIVE_RE: Final = re.compile(r"['’]s$")
_SENTENCE_BREAK_RE: Final = re.compile(r"[.!?…:;\n]")
_SPACE_ONLY_RE: Final = re.compile(r"\s*")
_BASE_SPLIT_RE: Final = re.compile(r"['’-]")
# Combining marks left by NFKD decomposition (the accents of Latin, Greek and Cyrillic letters).
_COMBINING_RE: Final = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")


# ------------------------------------------------------------------------------ pure helpers


def fold(text: str) -> str:
    """Lower-case and strip accents, so "Montréal" and "montreal" compare equal (pure)."""
    if text.isascii():
        return text.casefold()
    return _COMBINING_RE.sub("", unicodedata.normalize("NFKD", text)).casefold()


def _folded_words(text: str) -> list[str]:
    return _WORD_RE.findall(fold(text))


def _key_words(phrase: str) -> frozenset[str]:
    """The folded words that must appear for a phrase to be mentioned: its content words, else all of them."""
    words = _folded_words(phrase)
    content = [w for w in words if w not in ALL_STOPWORDS and (len(w) > 1 or w.isdigit())]
    return frozenset(content or words)


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    start: int
    end: int
    initial: bool  # first word of a sentence
    joined: bool  # only spaces separate it from the previous token


@functools.lru_cache(maxsize=TOKEN_CACHE_ENTRIES)
def _tokens(text: str) -> tuple[_Token, ...]:
    """Words of a message with their offsets; cached, since each decision of one turn reads the same text."""
    out: list[_Token] = []
    prev_end = 0
    for m in _TOKEN_RE.finditer(text):
        word, start = m.group(), m.start()
        gap = text[prev_end:start]
        initial = not out or bool(_SENTENCE_BREAK_RE.search(gap))
        joined = bool(out) and _SPACE_ONLY_RE.fullmatch(gap) is not None
        elided = _ELISION_RE.match(word)
        if elided:  # "l'Université" is "Université", and no longer the sentence's first word
            word, start, initial = word[elided.end() :], start + elided.end(), False
        word = _POSSESSIVE_RE.sub("", word)
        out.append(_Token(word, start, start + len(word), initial, joined))
        prev_end = m.end()
    return tuple(out)


def _is_capitalised(word: str) -> bool:
    return word[:1].isupper()


def _base(word: str) -> str:
    """The word before an apostrophe or hyphen, lower case: "What's" -> "what", "Dis-moi" -> "dis"."""
    return _BASE_SPLIT_RE.split(word.lower(), maxsplit=1)[0]


def _is_common(word: str) -> bool:
    low = word.lower()
    return low in COMMON_CAPITALS or _base(word) in COMMON_CAPITALS


def _capitalised_spans(tokens: Sequence[_Token]) -> list[tuple[int, str]]:
    """Runs of 1..MAX_SPAN_WORDS capitalised words (connectors allowed inside), with their offsets."""
    spans: list[tuple[int, str]] = []
    current: list[_Token] = []

    def close() -> None:
        while current and (current[-1].text.lower() in NAME_CONNECTORS or _is_common(current[-1].text)):
            current.pop()  # a name never ends with "of" or "The"
        if current:
            spans.append((current[0].start, " ".join(t.text for t in current)))
        current.clear()

    for n, tok in enumerate(tokens):
        word = tok.text
        nxt = tokens[n + 1] if n + 1 < len(tokens) else None
        next_is_cap = nxt is not None and nxt.joined and _is_capitalised(nxt.text)
        next_is_name = next_is_cap and nxt is not None and not _is_common(nxt.text)
        if current and not tok.joined:
            close()
        if len(current) >= MAX_SPAN_WORDS:
            close()
        if not _is_capitalised(word):
            if current and word.lower() in NAME_CONNECTORS and next_is_cap:
                current.append(tok)  # "Bank of America", "Université de Montréal"
            else:
                close()
            continue
        if word.lower() in STRONG_STOP_CAPITALS or _base(word) in STRONG_STOP_CAPITALS:
            close()
            continue
        if _is_common(word):
            # "What", "Tell", "The" at a sentence start are capitalised by grammar; mid-sentence a
            # common word is kept only as the head of a name ("La Paz", "The Hague"), never shouted.
            shouted = word.isupper() and len(word) > 1
            if tok.initial or shouted or not next_is_name:
                close()
                continue
        current.append(tok)
    close()
    return [(pos, span) for pos, span in spans if not all(w.lower() in CALENDAR_WORDS for w in span.split())]


def find_entities(text: str) -> list[str]:
    """Find what a message names: capitalised spans, quoted terms and quantities with units (pure).

    No model: capitalised runs of 1-4 words (sentence-initial common words and "I" dropped,
    day and month names alone dropped), terms in any kind of quotes, and numbers with a unit
    ("42 km", "3.5 GHz", "12 %"). At most MAX_ENTITIES, each at most MAX_ENTITY_CHARS, deduped
    case-insensitively in order of appearance; a name inside a longer one found too is dropped.
    """
    text = text[:MAX_SCAN_CHARS]
    found: list[tuple[int, str]] = []
    for pattern in _QUOTED_RES:
        for m in pattern.finditer(text):
            term = " ".join(m.group(1).split()).strip(" .,;:!?")
            if term and len(term.split()) <= MAX_QUOTED_WORDS and _WORD_RE.search(term):
                found.append((m.start(), term))
    for m in _QUANTITY_RE.finditer(text):
        found.append((m.start(), m.group(1) + " " + m.group(2)))
    found += _capitalised_spans(_tokens(text))
    found.sort(key=lambda item: item[0])
    out: list[str] = []
    seen: list[frozenset[str]] = []
    for _, raw in found:
        entity = raw[:MAX_ENTITY_CHARS].strip()
        words = frozenset(_folded_words(entity))
        if not words or any(words <= s for s in seen):
            continue
        # a longer name found later replaces the names it contains ("Zorbulon" then "Zorbulon festival")
        keep = [i for i, s in enumerate(seen) if not s < words]
        out, seen = [out[i] for i in keep], [seen[i] for i in keep]
        out.append(entity)
        seen.append(words)
    return out[:MAX_ENTITIES]


def is_quantity(entity: str) -> bool:
    """Tell whether an entity is a number with a unit (pure)."""
    return _QUANTITY_RE.fullmatch(entity) is not None


def topic_terms(text: str) -> list[str]:
    """Return a message's content words, lower case, without English and French stop words (pure)."""
    out: list[str] = []
    for tok in _tokens(text[:MAX_SCAN_CHARS]):
        word = tok.text.lower()
        if len(word) < MIN_TERM_CHARS or word in TERM_STOPWORDS or _base(word) in TERM_STOPWORDS or word in out:
            continue
        if word.isdigit() and len(word) < 4:
            continue  # "17" says little; "1789" is a topic
        out.append(word)
        if len(out) >= MAX_TERMS:
            break
    return out


def asks_something(text: str) -> bool:
    """Tell whether a message asks: a question mark, or an interrogative or imperative start or phrase (pure)."""
    if any(mark in text for mark in "?？¿"):
        return True
    tokens = _tokens(text[:MAX_SCAN_CHARS])
    if tokens:
        first = tokens[0].text.lower()
        if first in QUESTION_STARTERS or _base(first) in QUESTION_STARTERS:
            return True
    return _ASKING_RE.search(text[:MAX_SCAN_CHARS]) is not None


def is_small_talk(text: str) -> bool:
    """Tell whether a message is only greetings, thanks and stop words (pure)."""
    words = [t.text.lower() for t in _tokens(text[:MAX_SCAN_CHARS])]
    return all(w in SMALL_TALK_WORDS or w in ALL_STOPWORDS or _base(w) in SMALL_TALK_WORDS for w in words)


def query_key(query: str) -> str:
    """Normalise a research query for deduplication: folded words, sorted, unique (pure)."""
    return " ".join(sorted(set(_folded_words(query))))


def research_query(entities: Sequence[str], terms: Sequence[str]) -> str:
    """Build the query to research: entities first, then the topic terms they do not already hold (pure)."""
    words: list[str] = []
    held: set[str] = set()
    for entity in entities:
        if is_quantity(entity) and len(entities) > 1:
            continue  # "42 km" next to a name narrows a search to nothing
        words += entity.split()
        held |= set(_folded_words(entity))
    for term in terms:
        if fold(term) not in held:
            words.append(term)
            held.add(fold(term))
    query = " ".join(words[:MAX_QUERY_WORDS])
    return query[:MAX_QUERY_CHARS].rsplit(" ", 1)[0] if len(query) > MAX_QUERY_CHARS else query


@dataclass(frozen=True, slots=True)
class Gap:
    """What a turn asks that memory cannot answer, and what to research."""

    query: str
    kind: str  # uncovered_entity | low_similarity | no_recall
    reason: str
    entities: tuple[str, ...]
    terms: tuple[str, ...]
    uncovered: tuple[str, ...] = ()
    best_similarity: float | None = None

    @property
    def topics(self) -> list[str]:
        return [*self.entities, *(t for t in self.terms if fold(t) not in {w for e in self.entities for w in _folded_words(e)})]


Coverage = Callable[[str], bool] | Collection[str] | None


def _covered_by(covered: Coverage) -> Callable[[str], bool]:
    if covered is None:
        return lambda _entity: False
    if callable(covered):
        return covered
    folded = {fold(c) for c in covered}
    return lambda entity: fold(entity) in folded


def mentioned(phrase: str, texts: Iterable[str]) -> bool:
    """Tell whether every content word of the phrase appears in one of the texts, accent- and case-insensitively (pure)."""
    return _mentioned_in(phrase, [set(_folded_words(t)) for t in texts])


def _mentioned_in(phrase: str, word_sets: Sequence[set[str]]) -> bool:
    need = _key_words(phrase)
    return bool(need) and any(need <= words for words in word_sets)


def detect_gap(text: str, recall: RecallResult, *, threshold: float, covered: Coverage = None) -> Gap | None:
    """Decide whether a turn has a knowledge gap worth researching (pure).

    A gap needs a message that asks something (not small talk) and has something to look for.
    Then: a named entity (capitalised span or quoted term) that no recalled memory mentions and
    `covered` does not vouch for is a gap; when every named entity is mentioned or covered (the
    user's own facts or documents), there is none. Without named entities the best recall
    similarity decides: below `threshold`, or no recall at all, is a gap. Quantities ("42 km")
    steer the query but are computed, not looked up, so they never make a gap on their own.
    """
    if not asks_something(text) or is_small_talk(text):
        return None
    entities = find_entities(text)
    terms = topic_terms(text)
    if not entities and not terms:
        return None
    texts = [set(_folded_words(hit.memory.text)) for hit in recall.hits]  # folded once, checked per entity
    is_covered = _covered_by(covered)
    named = [e for e in entities if not is_quantity(e)]
    uncovered = tuple(e for e in named if not _mentioned_in(e, texts) and not is_covered(e))
    best = recall.best_similarity
    query = research_query(entities, terms)
    if not query:
        return None
    if uncovered:
        kind, reason = GAP_UNCOVERED, "no memory mentions " + ", ".join(uncovered[:3])
    elif named:
        return None  # every name the turn uses is in the user's memories or documents
    elif best is not None:
        if best >= threshold:
            return None
        kind, reason = GAP_LOW_SIMILARITY, f"best recall similarity {best:.2f} is below {threshold:.2f}"
    elif texts and all(_mentioned_in(t, texts) for t in terms):
        return None  # recall ran without the embedder, but the memories found hold every topic word
    else:
        kind, reason = GAP_NO_RECALL, "no memory recalled for this question" if not texts else "the recalled memories miss the topic"
    return Gap(query, kind, reason, tuple(entities), tuple(terms), uncovered, best)


def lexical_score(text: str, entities: Sequence[str], terms: Sequence[str]) -> float:
    """Weighted share of the gap's entities (ENTITY_WEIGHT each) and terms (1 each) a passage mentions, 0..1 (pure)."""
    words = set(_folded_words(text))
    in_entities: set[str] = set()
    total = got = 0.0
    for entity in entities:
        total += ENTITY_WEIGHT
        need = _key_words(entity)
        in_entities |= set(_folded_words(entity))
        if need and need <= words:
            got += ENTITY_WEIGHT
    for term in terms:
        if fold(term) in in_entities:
            continue  # "zorbulon" next to the entity "Zorbulon" counts once
        total += 1.0
        if fold(term) in words:
            got += 1.0
    return got / total if total else 0.0


def semantic_score(cosine: float) -> float:
    """Map a cosine similarity onto 0..1 between COS_FLOOR and COS_CEIL (pure)."""
    return min(1.0, max(0.0, (cosine - COS_FLOOR) / (COS_CEIL - COS_FLOOR)))


def confidence(lexical: float, cosine: float | None) -> float:
    """Blend lexical and semantic evidence into a confidence in 0..1 (pure; see LEXICAL_WEIGHT)."""
    if cosine is None:
        return round(lexical * NO_EMBED_FACTOR, 4)
    return round(LEXICAL_WEIGHT * lexical + (1.0 - LEXICAL_WEIGHT) * semantic_score(cosine), 4)


def memory_text(title: str, chunk: str) -> str:
    """The text a research memory stores: the passage, prefixed with its page title when that adds something (pure)."""
    title = " ".join(title.split())
    text = chunk if not title or chunk.startswith(title) else f"{title}: {chunk}"
    return text[:MAX_STORED_CHARS]


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _short(text: str, limit: int = MAX_REASON_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _join_reason(first: str, second: str) -> str:
    return _short(f"{first}; {second}" if first and second else first or second)


@dataclass(slots=True)
class Passage:
    text: str  # as it would be stored
    chunk: str
    url: str
    title: str
    fetched_at: float
    lexical: float
    score: float = 0.0


def prepare_page_blocking(
    body: bytes, content_type: str, *, url: str, charset: str | None, fetched_at: float, gap: Gap
) -> tuple[str, list[Passage]]:
    """Extract, chunk and lexically score one fetched page (blocking: run in a thread).

    Passages that mention none of the gap's named entities (when it has some) or no word of it
    at all are dropped here. Raises ValidationError when the page has no usable text.
    """
    if content_type in HTML_TYPES and len(body) > MAX_HTML_BYTES:
        body = body[:MAX_HTML_BYTES]  # the parser closes what the cut leaves open
    doc = extract(body, content_type, url=url, charset=charset)
    chunks = chunk_text(doc.text[:MAX_PAGE_TEXT_CHARS])[:MAX_PAGE_CHUNKS]
    named = [e for e in gap.entities if not is_quantity(e)]
    out: list[Passage] = []
    for chunk in chunks:
        text = memory_text(doc.title, chunk)
        lexical = lexical_score(text, gap.entities, gap.terms)
        if lexical <= 0.0 or (named and not any(mentioned(e, [text]) for e in named)):
            continue
        out.append(Passage(text, chunk, url, doc.title, fetched_at, lexical))
    out.sort(key=lambda p: -p.lexical)
    return doc.title, out


def fingerprints_blocking(texts: Sequence[str]) -> set[str]:
    """Fingerprint stored texts (blocking: hashing thousands of rows; run in a thread)."""
    return {fingerprint(t) for t in texts}


def select_passages(passages: Sequence[Passage], *, limit: int, known: Collection[str]) -> list[Passage]:
    """Pick the best passages above MIN_CONFIDENCE: at most MAX_PER_PAGE per page, none already known (pure)."""
    chosen: list[Passage] = []
    per_page: dict[str, int] = {}
    seen = set(known)
    for p in sorted(passages, key=lambda p: -p.score):
        if len(chosen) >= limit or p.score < MIN_CONFIDENCE:
            break
        fp = fingerprint(p.text)
        if fp in seen or per_page.get(p.url, 0) >= MAX_PER_PAGE:
            continue
        seen.add(fp)
        per_page[p.url] = per_page.get(p.url, 0) + 1
        chosen.append(p)
    return chosen


# ------------------------------------------------------------------------------ the service


@dataclass(slots=True, eq=False)
class ResearchHandle:
    """A research the turn may wait for; `reused` when it answers an earlier, identical question."""

    id: int
    user: str
    query: str
    reused: bool = False
    status: str = STATUS_OPEN
    memories: int = 0
    _event: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def research_id(self) -> int:
        return self.id

    @property
    def finished(self) -> bool:
        return self._event.is_set()

    def _finish(self, status: str, memories: int = 0) -> None:
        self.status, self.memories = status, memories
        self._event.set()


@dataclass(slots=True)
class _Outcome:
    status: str
    reason: str = ""
    sources: list[str] = field(default_factory=list)
    memories: int = 0


class _Embedding:
    """The question's embedding and the chunk budget of one research; lexical only once the embedder fails."""

    def __init__(self, hippocampus: Hippocampus, query: str) -> None:
        self._hippo = hippocampus
        self._query = query
        self._qvec: npt.NDArray[np.float32] | None = None
        self.available = True
        self.budget = MAX_EMBED_CHUNKS

    async def async_score(self, passages: list[Passage]) -> None:
        """Set each passage's confidence; the best ones by lexical score are embedded while the budget lasts."""
        take = min(len(passages), EMBED_PER_PAGE, self.budget) if self.available else 0
        cosines: list[float | None] = [None] * len(passages)
        if take:
            try:
                if self._qvec is None:
                    self._qvec = (await self._hippo.async_embed([self._query]))[0]
                for start in range(0, take, EMBED_BATCH):
                    batch = passages[start : min(take, start + EMBED_BATCH)]
                    vecs = await self._hippo.async_embed([p.text for p in batch])
                    for n, value in enumerate(vecs @ self._qvec):
                        cosines[start + n] = float(value)
                self.budget -= take
            except (EmbedderUnavailableError, ValidationError) as err:
                # lexical scoring still works; an embedder that failed once is not asked again here
                log.warning("research_embed_unavailable", error=str(err))
                self.available = False
        for p, cos in zip(passages, cosines, strict=True):
            p.score = confidence(p.lexical, cos)


class Cortex:
    """Detect knowledge gaps in turns and research them in the background, per user."""

    name = "cortex"
    start_timeout_s = 10.0
    stop_timeout_s = 1.0

    def __init__(self, *, hippocampus: Hippocampus, fetcher: Fetcher | None, config: CuriosityConfig, crawl_max_pages: int = 20) -> None:
        self.hippocampus = hippocampus
        self.fetcher = fetcher
        self.config = config
        self.crawl_max_pages = crawl_max_pages
        self._sem: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisor = TaskSupervisor()  # owns the research tasks (named, logged if they crash)
        self._active: dict[tuple[str, str], ResearchHandle] = {}
        self._store_lock = asyncio.Lock()
        self._started = False
        self.gaps_total = 0
        self.outcomes_total: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.reused_total = 0
        self.limited_total = 0
        self.memories_total = 0
        self.running = 0

    @property
    def enabled(self) -> bool:
        """Research can run: curiosity is on and Iris has somewhere to look (a SearxNG or an allowlisted site)."""
        fetcher = self.fetcher
        if not self.config.enabled or fetcher is None:
            return False
        return bool(fetcher.config.searxng_url.strip()) or bool(fetcher.seeds())

    # ---------------------------------------------------------------- lifecycle

    async def async_start(self) -> None:
        if self._started:
            return
        self._sem = asyncio.Semaphore(self.config.max_concurrent)
        # research left open by a crash or a stop cut short never resumes: say so in its row
        try:
            await self.hippocampus.db.async_execute(
                "UPDATE research SET status = ?, reason = CASE WHEN reason = '' THEN ? ELSE reason || '; ' || ? END, finished_at = ? "
                "WHERE status IN (?, ?)",
                (STATUS_FAILED, "interrupted", "interrupted", time.time(), STATUS_OPEN, STATUS_RUNNING),
            )
        except StoreError as err:
            log.warning("research_stale_rows_not_marked", error=str(err))
        self._started = True
        log.info("cortex_started", enabled=self.enabled, max_concurrent=self.config.max_concurrent)

    async def async_stop(self) -> None:
        self._started = False
        tasks = list(self._tasks)
        interrupted = [h.id for h in self._active.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
            if pending:
                log.error("research_tasks_still_running", tasks=sorted(t.get_name() for t in pending))
        if interrupted:
            await self._async_mark_interrupted(interrupted)

    async def _async_mark_interrupted(self, ids: Sequence[int]) -> None:
        marks = ",".join("?" * len(ids))
        try:
            await asyncio.wait_for(
                self.hippocampus.db.async_execute(
                    "UPDATE research SET status = ?, reason = CASE WHEN reason = '' THEN ? ELSE reason || '; ' || ? END, "
                    f"finished_at = ? WHERE id IN ({marks}) AND status IN (?, ?)",
                    (
                        STATUS_FAILED,
                        "interrupted: the daemon stopped",
                        "interrupted: the daemon stopped",
                        time.time(),
                        *ids,
                        STATUS_OPEN,
                        STATUS_RUNNING,
                    ),
                ),
                STOP_MARK_S,
            )
        except (StoreError, TimeoutError) as err:  # the next start marks them instead
            log.warning("research_interrupted_rows_not_marked", error=str(err) or type(err).__name__)

    # ---------------------------------------------------------------- the turn's side

    async def async_consider(self, user: str, text: str, recall: RecallResult) -> ResearchHandle | None:
        """Detect a gap in the turn and schedule research for it; return at once (None: nothing scheduled)."""
        if not self.enabled or not self._started or self._sem is None:
            return None
        try:
            return await self._async_consider(user, text, recall)
        except MongarsError as err:  # curiosity is optional: the turn goes on without it
            log.warning("research_not_scheduled", user=user, error=str(err))
            return None

    async def _async_consider(self, user: str, text: str, recall: RecallResult) -> ResearchHandle | None:
        # pure but CPU-bound on a long message with long memories: off the loop
        gap = await asyncio.to_thread(detect_gap, text, recall, threshold=self.config.gap_similarity)
        if gap is not None and gap.uncovered:
            covered = await self._async_covered(user, gap.uncovered)
            if covered:
                gap = await asyncio.to_thread(detect_gap, text, recall, threshold=self.config.gap_similarity, covered=covered)
        if gap is None:
            return None
        self.gaps_total += 1
        key = query_key(gap.query)
        handle = self._active.get((user, key)) or await self._async_recent(user, key)
        if handle is not None:
            self.reused_total += 1
            log.debug("research_reused", user=user, research=handle.id, status=handle.status)
            return handle
        open_here = sum(1 for u, _ in self._active if u == user)
        if open_here >= self.config.max_open_per_user or len(self._active) >= MAX_PENDING:
            self.limited_total += 1
            log.info("research_limited", user=user, open=open_here, pending=len(self._active))
            return None
        rid = await self._async_insert(user, gap)
        handle = ResearchHandle(rid, user, gap.query)
        self._active[(user, key)] = handle
        task = self._supervisor.spawn_once(f"research-{rid}", self._async_run(handle, gap, key), owner=self)  # logs a crash
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("research_scheduled", user=user, research=rid, query=gap.query, gap=gap.kind)
        return handle

    async def async_wait(self, handle: ResearchHandle, timeout_s: float) -> bool:
        """Wait up to timeout_s for the research to finish; True when it did."""
        if handle.finished or timeout_s <= 0:
            return handle.finished
        try:
            await asyncio.wait_for(handle._event.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def async_list(self, user: str, *, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        """Return the caller's research, newest first (only theirs)."""
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise ValidationError(f"limit must be between 1 and {LIST_LIMIT_MAX}, got {limit}", param="limit")
        if status is not None and status not in STATUSES:
            raise ValidationError("status must be one of " + ", ".join(STATUSES), param="status")
        sql = "SELECT id, query, topics, status, reason, sources, memories, created_at, finished_at FROM research WHERE user = ? "
        params: tuple[Any, ...] = (user,)
        if status is not None:
            sql += "AND status = ? "
            params += (status,)
        rows = await self.hippocampus.db.async_fetchall(sql + "ORDER BY id DESC LIMIT ?", (*params, limit))
        return [
            {
                "id": int(r["id"]),
                "query": str(r["query"]),
                "topics": _json_list(r["topics"]),
                "status": str(r["status"]),
                "reason": str(r["reason"]),
                "sources": _json_list(r["sources"]),
                "memories": int(r["memories"]),
                "created_at": _iso(float(r["created_at"])),
                "finished_at": _iso(None if r["finished_at"] is None else float(r["finished_at"])),
            }
            for r in rows
        ]

    async def async_counts(self, user: str) -> dict[str, int]:
        """Count the caller's research that is open (open or running) and finished."""
        rows = await self.hippocampus.db.async_fetchall(
            "SELECT status, count(*) AS n FROM research WHERE user = ? GROUP BY status", (user,)
        )
        by = {str(r["status"]): int(r["n"]) for r in rows}
        open_n = by.get(STATUS_OPEN, 0) + by.get(STATUS_RUNNING, 0)
        return {"open": open_n, "finished": sum(by.values()) - open_n}

    # ---------------------------------------------------------------- store access

    async def _async_covered(self, user: str, entities: Sequence[str]) -> set[str]:
        """Entities that the user's memories or the shared documents mention, beyond the recalled few."""
        covered: set[str] = set()
        for entity in entities:
            words = sorted(_key_words(entity))
            if not words:
                continue
            match = " ".join('"' + w.replace('"', '""') + '"' for w in words)  # quoted words, implicitly AND-ed
            try:
                row = await self.hippocampus.db.async_fetchone(
                    "SELECT 1 FROM memories_fts JOIN memories m ON m.id = memories_fts.rowid WHERE memories_fts MATCH ? "
                    "AND (m.user = ? OR (m.user = ? AND m.kind = ?)) AND (m.expires_at IS NULL OR m.expires_at > ?) LIMIT 1",
                    (match, user, SHARED_OWNER, DOCUMENT_KIND, time.time()),
                )
            except StoreError as err:  # cannot tell: the entity counts as uncovered
                log.warning("research_coverage_check_failed", error=str(err))
                continue
            if row is not None:
                covered.add(entity)
        return covered

    async def _async_recent(self, user: str, key: str) -> ResearchHandle | None:
        """A finished research of the same query recent enough to answer again."""
        now = time.time()
        rows = await self.hippocampus.db.async_fetchall(
            "SELECT id, query, status, memories, finished_at FROM research WHERE user = ? AND created_at > ? AND status IN (?, ?, ?) "
            "ORDER BY id DESC LIMIT 50",
            (user, now - REUSE_WINDOW_S, STATUS_DONE, STATUS_NOTHING, STATUS_FAILED),
        )
        for r in rows:
            if query_key(str(r["query"])) != key:
                continue
            if r["status"] == STATUS_FAILED and (r["finished_at"] is None or float(r["finished_at"]) < now - FAILED_RETRY_S):
                return None  # failed a while ago: try again
            handle = ResearchHandle(int(r["id"]), user, str(r["query"]), reused=True)
            handle._finish(str(r["status"]), int(r["memories"]))
            return handle
        return None

    async def _async_insert(self, user: str, gap: Gap) -> int:
        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute(
                "INSERT INTO research(user, query, topics, status, reason, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (user, gap.query, json.dumps(gap.topics, ensure_ascii=False), STATUS_OPEN, _short(gap.reason), time.time()),
            )
            return int(cur.lastrowid or 0)

        rid: int = await self.hippocampus.db.async_write(op)
        return rid

    async def _async_update(
        self, rid: int, user: str, *, status: str, extra: str = "", sources: Sequence[str] = (), memories: int = 0
    ) -> None:
        finished = None if status in (STATUS_OPEN, STATUS_RUNNING) else time.time()
        await self.hippocampus.db.async_execute(
            "UPDATE research SET status = ?, reason = CASE WHEN ? = '' THEN reason WHEN reason = '' THEN ? ELSE reason || '; ' || ? END, "
            "sources = ?, memories = ?, finished_at = ? WHERE id = ? AND user = ?",
            (status, extra, extra, extra, json.dumps(list(sources), ensure_ascii=False), memories, finished, rid, user),
        )

    # ---------------------------------------------------------------- the research

    async def _async_run(self, handle: ResearchHandle, gap: Gap, key: str) -> None:
        """Run one research under the concurrency bound, record its outcome, wake its waiters."""
        outcome = _Outcome(STATUS_FAILED, "cancelled")
        try:
            assert self._sem is not None
            async with self._sem:
                await self._async_update(handle.id, handle.user, status=STATUS_RUNNING)
                self.running += 1
                try:
                    outcome = await self._async_investigate(handle, gap)
                finally:
                    self.running -= 1
            await self._async_update(
                handle.id, handle.user, status=outcome.status, extra=outcome.reason, sources=outcome.sources, memories=outcome.memories
            )
            self.outcomes_total[outcome.status] += 1
            log.info(
                "research_finished",
                user=handle.user,
                research=handle.id,
                status=outcome.status,
                memories=outcome.memories,
                reason=outcome.reason,
            )
        except asyncio.CancelledError:
            self.outcomes_total["cancelled"] += 1
            raise
        except Exception as err:  # a bug or a store failure: the row says failed, the turn never sees it
            outcome = _Outcome(STATUS_FAILED, f"{type(err).__name__}: {err}")
            self.outcomes_total[STATUS_FAILED] += 1
            log.error("research_failed", user=handle.user, research=handle.id, error=repr(err), exc_info=True)
            try:
                await self._async_update(handle.id, handle.user, status=STATUS_FAILED, extra=_short(outcome.reason))
            except MongarsError as store_err:
                log.warning("research_row_not_updated", research=handle.id, error=str(store_err))
        finally:
            self._active.pop((handle.user, key), None)
            handle._finish(outcome.status, outcome.memories)

    async def _async_investigate(self, handle: ResearchHandle, gap: Gap) -> _Outcome:
        """Read candidate pages, score their passages and remember the best for the user."""
        fetcher = self.fetcher
        if fetcher is None:
            return _Outcome(STATUS_FAILED, "no fetcher")
        passages: list[Passage] = []
        errors: list[str] = []
        pages = 0
        timed_out = False
        embedding = _Embedding(self.hippocampus, gap.query)
        try:
            async with asyncio.timeout(RESEARCH_TIMEOUT_S):
                pages = await self._async_gather(fetcher, gap, embedding, passages, errors)
        except TimeoutError:
            timed_out = True
            errors.append(f"timed out after {RESEARCH_TIMEOUT_S:g} s")
        pages = max(pages, len({p.url for p in passages}))
        async with self._store_lock:  # two research of one user finding the same passage store it once
            chosen, stored = await self._async_remember(handle, gap, passages, errors)
        sources = list(dict.fromkeys(p.url for p in stored))
        if stored:
            return _Outcome(STATUS_DONE, "", sources, len(stored))
        if chosen:
            return _Outcome(STATUS_FAILED, _short("; ".join(errors[:3])))
        relevant = [p for p in passages if p.score >= MIN_CONFIDENCE]
        if relevant:
            return _Outcome(STATUS_DONE, "already remembered", list(dict.fromkeys(p.url for p in relevant)), 0)
        if pages == 0 and errors:
            return _Outcome(STATUS_FAILED, _short("nothing could be read: " + "; ".join(errors[:3])))
        if pages == 0:
            return _Outcome(STATUS_NOTHING, "no search result and no allowlisted site to read")
        why = f"{pages} page(s) read, none about {gap.query!r}"
        return _Outcome(STATUS_NOTHING, _short(why + ("; " + errors[-1] if timed_out else "")))

    async def _async_remember(
        self, handle: ResearchHandle, gap: Gap, passages: Sequence[Passage], errors: list[str]
    ) -> tuple[list[Passage], list[Passage]]:
        """Store the best new passages as the user's research memories; return (chosen, stored)."""
        known = await self._async_known_fingerprints(handle.user)
        chosen = select_passages(passages, limit=self.config.results_per_research, known=known)
        stored: list[Passage] = []
        for p in chosen:
            provenance = {
                "source": p.url,
                "title": p.title,
                "fetched_at": p.fetched_at,
                "extract": p.chunk[:EXTRACT_CHARS],
                "confidence": round(p.score, 3),
                "research_id": handle.id,
                "query": gap.query,
            }
            try:
                await self.hippocampus.async_add_memory(
                    handle.user,
                    p.text,
                    kind="research",
                    source="research",
                    importance=min(1.0, max(0.0, round(p.score, 3))),
                    provenance=json.dumps(provenance, ensure_ascii=False),
                )
            except MongarsError as err:
                errors.append(f"storing a passage failed: {err}")
                continue
            stored.append(p)
            self.memories_total += 1
        return chosen, stored

    async def _async_gather(self, fetcher: Fetcher, gap: Gap, embedding: _Embedding, passages: list[Passage], errors: list[str]) -> int:
        """Read search hits, then (unless they sufficed) the allowlisted sites; return how many pages were read."""
        seen: set[str] = set()
        pages = 0
        try:
            hits = await fetcher.async_search(gap.query, limit=SEARCH_RESULTS)
        except MongarsError as err:  # no search: the allowlisted sites may still know
            errors.append(f"search: {err}")
            hits = []
        for hit in hits:
            if pages >= MAX_PAGES:
                break
            if hit.url in seen or not fetcher.allowed(hit.url):
                continue
            seen.add(hit.url)
            try:
                page = await fetcher.async_fetch(hit.url)
            except MongarsError as err:  # one page's failure is skipped
                errors.append(f"{hit.url}: {err}")
                continue
            seen.add(page.final_url)
            if await self._async_take(page, gap, embedding, passages, errors):
                pages += 1
        if self._enough(passages):
            return pages
        seeds = fetcher.seeds()
        if not seeds:
            return pages
        crawl = fetcher.async_crawl(seeds, max_pages=min(self.crawl_max_pages, MAX_PAGES))
        crawled = 0
        try:
            async for page in crawl:
                crawled += 1
                if page.url in seen or page.final_url in seen:
                    continue
                seen.update((page.url, page.final_url))
                if await self._async_take(page, gap, embedding, passages, errors):
                    pages += 1
                if pages >= MAX_PAGES or self._enough(passages):
                    break
        except MongarsError as err:  # the crawl stopped: keep what it read
            errors.append(f"crawl: {err}")
        finally:
            aclose = getattr(crawl, "aclose", None)
            if aclose is not None:
                await aclose()
        if not crawled:
            errors.append(f"no allowlisted site answered with a page ({len(seeds)} site(s) tried)")
        return pages

    def _enough(self, passages: Sequence[Passage]) -> bool:
        return sum(1 for p in passages if p.score >= STRONG_CONFIDENCE) >= self.config.results_per_research

    async def _async_take(self, page: FetchedPage, gap: Gap, embedding: _Embedding, passages: list[Passage], errors: list[str]) -> bool:
        """Turn one page into scored passages; False when it has no usable text."""
        url = page.final_url or page.url
        try:
            _, found = await asyncio.to_thread(
                prepare_page_blocking, page.body, page.content_type, url=url, charset=page.charset, fetched_at=page.fetched_at, gap=gap
            )
        except ValidationError as err:
            errors.append(f"{url}: {err}")
            return False
        await embedding.async_score(found)
        passages.extend(found)
        return True

    async def _async_known_fingerprints(self, user: str) -> set[str]:
        rows = await self.hippocampus.db.async_fetchall(
            "SELECT text FROM memories WHERE user = ? AND kind = 'research' ORDER BY id DESC LIMIT ?", (user, MAX_DEDUPE_ROWS)
        )
        if not rows:
            return set()
        return await asyncio.to_thread(fingerprints_blocking, [str(r["text"]) for r in rows])

    # ---------------------------------------------------------------- metrics

    def metrics(self) -> Iterable[tuple[str, str, str, float, dict[str, str]]]:
        """Pull-time samples for Metrics.add_source."""
        yield ("mongarsd_curiosity_gaps_total", "counter", "Knowledge gaps detected in turns.", float(self.gaps_total), {})
        for outcome, n in self.outcomes_total.items():
            yield ("mongarsd_curiosity_research_total", "counter", "Research finished, by outcome.", float(n), {"outcome": outcome})
        yield ("mongarsd_curiosity_research_running", "gauge", "Research running now.", float(self.running), {})
        yield ("mongarsd_curiosity_research_open", "gauge", "Research open now (queued or running).", float(len(self._active)), {})
        yield (
            "mongarsd_curiosity_reused_total",
            "counter",
            "Gaps answered by an earlier research of the same query.",
            float(self.reused_total),
            {},
        )
        yield ("mongarsd_curiosity_limited_total", "counter", "Gaps not researched: too much research open.", float(self.limited_total), {})
        yield ("mongarsd_curiosity_memories_total", "counter", "Research memories stored.", float(self.memories_total), {})


def _json_list(value: object) -> list[Any]:
    try:
        parsed = json.loads(str(value))
    except ValueError:
        return []
    return parsed if isinstance(parsed, list) else []
