"""Cortex's pure decisions: entities, topics, questions, small talk, gaps, scoring and passage choice."""

from __future__ import annotations

import pytest

from mongarsd.cognition.cortex import (
    GAP_LOW_SIMILARITY,
    GAP_NO_RECALL,
    GAP_UNCOVERED,
    MAX_ENTITIES,
    MAX_ENTITY_CHARS,
    MAX_HTML_BYTES,
    MAX_PER_PAGE,
    MAX_QUERY_CHARS,
    MAX_STORED_CHARS,
    MAX_TERMS,
    MIN_CONFIDENCE,
    Passage,
    asks_something,
    confidence,
    detect_gap,
    find_entities,
    fold,
    is_quantity,
    is_small_talk,
    lexical_score,
    memory_text,
    mentioned,
    prepare_page_blocking,
    query_key,
    research_query,
    select_passages,
    semantic_score,
    topic_terms,
)
from mongarsd.cognition.iris.extract import fingerprint
from mongarsd.errors import ValidationError
from mongarsd.memory.hippocampus import Memory, RecallHit, RecallResult

THRESHOLD = 0.45


def recall_of(*items: tuple[str, float | None]) -> RecallResult:
    hits = [
        RecallHit(Memory(n, text, 0.5, "turn", "user", 0.0), 1.0 / (60 + n), sim, n if sim is not None else None, n)
        for n, (text, sim) in enumerate(items, start=1)
    ]
    return RecallResult(hits)


NOTHING = RecallResult([])


# ------------------------------------------------------------------------------ entities


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("What is the Zorbulon festival?", ["Zorbulon"]),
        ("Tell me about Zorbulon", ["Zorbulon"]),
        ("Who is Jean de La Fontaine?", ["Jean de La Fontaine"]),
        ("What's the Bank of America doing?", ["Bank of America"]),
        ("Was ist das Brandenburger Tor?", ["Brandenburger Tor"]),
        ("Qu'est-ce que le festival de Zorbulon à Quimtaro ?", ["Zorbulon", "Quimtaro"]),
        ("Explique-moi l'Université de Montréal", ["Université de Montréal"]),  # elided article, accented capitals
        ("Élodie et Ærø, où sont-elles ?", ["Élodie", "Ærø"]),
        ("I love Paris in May", ["Paris"]),  # "I" and a lone month are never names
        ("What happens on Monday 17 March in Quimtaro?", ["Quimtaro"]),
        ("Describe the Zorbulon's glass kites", ["Zorbulon"]),  # possessive dropped
        ("WHAT IS ZORBULON", ["ZORBULON"]),  # shouted common words are not names
        ("Paris, London and Berlin: which is older?", ["Paris", "London", "Berlin"]),  # punctuation splits spans
        ("hello there", []),
        ("", []),
    ],
)
def test_capitalised_spans(text: str, expected: list[str]) -> None:
    assert find_entities(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('What is "glass kite" flying?', ["glass kite"]),
        ("What is 'glass kite' flying? It isn't obvious", ["glass kite"]),  # apostrophes inside words are not quotes
        ("« Fête des lumières » c'est quoi ?", ["Fête des lumières"]),
        ("Explain “deep sleep” and ‘slow waves’", ["deep sleep", "slow waves"]),
        ("Le mot „Heimat“ veut dire quoi ?", ["Heimat"]),
        ('He said "this is a whole sentence that someone quoted at length" yesterday', []),  # a quotation, not a term
    ],
)
def test_quoted_terms(text: str, expected: list[str]) -> None:
    assert find_entities(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("My CPU runs at 3.5 GHz", ["CPU", "3.5 GHz"]),
        ("It is 42 km away and 12% uphill", ["42 km", "12 %"]),
        ("The battery holds 5000 mAh at 3,7 V", ["5000 mAh", "3,7 V"]),
        ("Battery: 5000 mAh", ["Battery", "5000 mAh"]),  # a rare word starting a sentence may be a name
        ("you drive at 90 km/h for 2 h", ["90 km/h", "2 h"]),
        ("I have 3 cats and 12 minutes", []),  # no unit: not a quantity ("minutes" is not "min")
    ],
)
def test_quantities(text: str, expected: list[str]) -> None:
    assert find_entities(text) == expected
    assert all(is_quantity(e) for e in expected if e not in ("CPU", "Battery"))


def test_entities_deduped_in_order_and_longer_names_win() -> None:
    assert find_entities("Zorbulon, zorbulon and ZORBULON again: Zorbulon!") == ["Zorbulon"]
    assert find_entities("What is the “Zorbulon festival”? Is Zorbulon fun?") == ["Zorbulon festival"]
    assert find_entities("Zorbulon first, then the 'Zorbulon festival'") == ["Zorbulon festival"]
    assert find_entities("Quimtaro and Zorbulon") == ["Quimtaro", "Zorbulon"]


def test_entities_bounded_in_count_length_and_scan() -> None:
    many = " and ".join(f"Name{chr(65 + i)}x" for i in range(20)) + "?"
    assert len(find_entities(many)) == MAX_ENTITIES
    long_quote = '"' + "x" * 79 + '"'
    assert all(len(e) <= MAX_ENTITY_CHARS for e in find_entities(long_quote + " " + long_quote.replace("x", "y")))
    assert find_entities("a " * 5000 + "Zorbulon") == []  # beyond the scanned prefix
    assert len(find_entities("Alpha Beta Gamma Delta Epsilon")) == 2  # spans stop at four words


# ------------------------------------------------------------------------------ topics, questions, small talk


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("What is the Zorbulon festival?", ["zorbulon", "festival"]),
        ("Qu'est-ce que le festival de Zorbulon à Quimtaro ?", ["festival", "zorbulon", "quimtaro"]),
        ("Explique-moi la photosynthèse, s'il te plaît", ["photosynthèse", "plaît"]),
        ("What happened in 1789 on day 14?", ["happened", "1789", "day"]),  # "14" is too short to be a topic
        ("tell me something about it please", []),
    ],
)
def test_topic_terms(text: str, expected: list[str]) -> None:
    assert topic_terms(text) == expected


def test_topic_terms_bounded_and_unique() -> None:
    terms = topic_terms(" ".join(f"word{i} word{i}" for i in range(40)))
    assert len(terms) == MAX_TERMS
    assert len(set(terms)) == len(terms)


@pytest.mark.parametrize(
    ("text", "asks"),
    [
        ("What is the Zorbulon festival?", True),
        ("zorbulon festival?", True),
        ("Tell me about Zorbulon", True),
        ("Can you describe the glass kites", True),
        ("I would like to know about Quimtaro", True),
        ("I wonder who founded Quimtaro", True),
        ("Je me demande qui a fondé Quimtaro", True),
        ("Explique-moi le Zorbulon", True),
        ("Qu'est-ce que le Zorbulon", True),
        ("Parle-moi de Quimtaro", True),
        ("C'est quoi le Zorbulon", True),
        ("Pourquoi le ciel est bleu", True),
        ("My sister lives in Lisbon.", False),
        ("I love Paris in May", False),
        ("J'habite à Lyon.", False),
    ],
)
def test_asks_something(text: str, asks: bool) -> None:
    assert asks_something(text) is asks


@pytest.mark.parametrize(
    ("text", "small"),
    [
        ("hi", True),
        ("Hello!", True),
        ("thanks", True),
        ("Thank you very much!", True),
        ("How are you?", True),
        ("What's up?", True),
        ("Bonjour, comment ça va ?", True),
        ("Merci beaucoup !", True),
        ("ok", True),
        ("Thanks! What is Zorbulon?", False),
        ("How are kites made?", False),
    ],
)
def test_small_talk(text: str, small: bool) -> None:
    assert is_small_talk(text) is small


# ------------------------------------------------------------------------------ gaps


def test_gap_for_an_unknown_entity_with_nothing_recalled() -> None:
    gap = detect_gap("What is the Zorbulon festival?", NOTHING, threshold=THRESHOLD)
    assert gap is not None
    assert gap.kind == GAP_UNCOVERED
    assert gap.query == "Zorbulon festival"
    assert gap.uncovered == ("Zorbulon",)
    assert "Zorbulon" in gap.reason
    assert gap.topics == ["Zorbulon", "festival"]


def test_gap_when_recalled_memories_do_not_mention_the_entity_even_if_similar() -> None:
    recall = recall_of(("I went to a kite festival last spring with my kids.", 0.9))
    gap = detect_gap("What is the Zorbulon festival?", recall, threshold=THRESHOLD)
    assert gap is not None and gap.kind == GAP_UNCOVERED
    assert gap.best_similarity == pytest.approx(0.9)


@pytest.mark.parametrize(
    "memory",
    [
        "My sister Marguerite lives in Lisbon.",
        "marguerite is my sister",  # case-insensitive
        "Zorbulon festival: held every 17 March with glass kites.",
    ],
)
def test_no_gap_when_the_users_memories_mention_every_entity(memory: str) -> None:
    entity = "Marguerite" if "arguerite" in memory else "Zorbulon"
    recall = recall_of((memory, 0.2))  # low similarity does not matter: the user's facts cover the name
    assert detect_gap(f"Who or what is {entity}?", recall, threshold=THRESHOLD) is None


def test_accents_do_not_hide_coverage() -> None:
    recall = recall_of(("I studied at the Universite de Montreal.", 0.3))
    assert detect_gap("Tell me about the Université de Montréal", recall, threshold=THRESHOLD) is None


def test_covered_callable_and_collection_vouch_for_entities() -> None:
    question = "What is the Zorbulon festival in Quimtaro?"
    gap = detect_gap(question, NOTHING, threshold=THRESHOLD, covered={"zorbulon"})
    assert gap is not None and gap.uncovered == ("Quimtaro",)
    assert detect_gap(question, NOTHING, threshold=THRESHOLD, covered={"Zorbulon", "QUIMTARO"}) is None
    assert detect_gap(question, NOTHING, threshold=THRESHOLD, covered=lambda e: e in ("Zorbulon", "Quimtaro")) is None
    assert detect_gap(question, NOTHING, threshold=THRESHOLD, covered=lambda e: False) is not None


@pytest.mark.parametrize(
    ("best", "gap_kind"),
    [(None, GAP_NO_RECALL), (0.1, GAP_LOW_SIMILARITY), (0.44, GAP_LOW_SIMILARITY), (0.45, None), (0.8, None)],
)
def test_without_names_the_best_similarity_decides(best: float | None, gap_kind: str | None) -> None:
    recall = NOTHING if best is None else recall_of(("We talked about how leaves turn sunlight into sugar.", best))
    gap = detect_gap("How does photosynthesis work?", recall, threshold=THRESHOLD)
    assert (gap.kind if gap else None) == gap_kind
    if gap is not None:
        assert gap.query == "photosynthesis work"


def test_degraded_recall_without_similarities_checks_the_topic_words() -> None:
    unrelated = recall_of(("I like tea.", None))
    related = recall_of(("Photosynthesis work: leaves turn light into sugar.", None))
    gap = detect_gap("How does photosynthesis work?", unrelated, threshold=THRESHOLD)
    assert gap is not None and gap.kind == GAP_NO_RECALL
    assert detect_gap("How does photosynthesis work?", related, threshold=THRESHOLD) is None


@pytest.mark.parametrize(
    "text",
    [
        "hi",
        "Thanks!",
        "How are you?",
        "Bonjour, comment ça va ?",
        "My sister Marguerite lives in Lisbon.",  # a statement asks nothing
        "I love Paris in May",
        "tell me something about it please",  # asks, but nothing to look for
        "",
    ],
)
def test_no_gap_for_small_talk_statements_and_empty_requests(text: str) -> None:
    assert detect_gap(text, NOTHING, threshold=THRESHOLD) is None


def test_quantities_alone_never_make_a_gap_but_shape_the_query() -> None:
    recall = recall_of(("I run 42 km every week.", 0.9))
    assert detect_gap("What is 42 km in miles?", recall, threshold=THRESHOLD) is None  # similar enough, no names
    gap = detect_gap("Is Quimtaro 42 km from the sea?", NOTHING, threshold=THRESHOLD)
    assert gap is not None and gap.uncovered == ("Quimtaro",)
    assert "42" not in gap.query  # a quantity next to a name narrows a search to nothing


def test_french_question_gap() -> None:
    gap = detect_gap("Qu'est-ce que le festival de Zorbulon à Quimtaro ?", NOTHING, threshold=THRESHOLD)
    assert gap is not None
    assert gap.query == "Zorbulon Quimtaro festival"
    assert gap.uncovered == ("Zorbulon", "Quimtaro")


def test_research_query_entities_first_bounded_and_normalised() -> None:
    assert research_query(["Zorbulon", "Quimtaro"], ["zorbulon", "festival", "quimtaro"]) == "Zorbulon Quimtaro festival"
    assert research_query([], ["photosynthesis"]) == "photosynthesis"
    long = research_query([], [f"term{i:03d}" + "x" * 30 for i in range(20)])
    assert len(long) <= MAX_QUERY_CHARS and len(long.split()) <= 12
    assert query_key("Zorbulon festival") == query_key("festival  ZORBULON") == "festival zorbulon"
    assert query_key("Montréal") == query_key("montreal")


def test_mentioned_needs_every_content_word() -> None:
    assert mentioned("Bank of America", ["The bank opened in America."])
    assert not mentioned("Bank of America", ["The bank opened."])
    assert mentioned("Élodie", ["elodie said hi"])
    assert not mentioned("Zorbulon", [])


# ------------------------------------------------------------------------------ scoring and choice


def test_lexical_score_weights_entities_over_terms() -> None:
    entities, terms = ["Zorbulon"], ["zorbulon", "festival", "kites"]
    assert lexical_score("The Zorbulon festival has kites.", entities, terms) == pytest.approx(1.0)
    assert lexical_score("The ZORBULON is old.", entities, terms) == pytest.approx(2 / 4)  # entity weight 2 of 4
    assert lexical_score("A festival of kites.", entities, terms) == pytest.approx(2 / 4)
    assert lexical_score("Nothing here.", entities, terms) == 0.0
    assert lexical_score("anything", [], []) == 0.0


def test_confidence_blend_is_bounded_and_monotonic() -> None:
    assert semantic_score(0.0) == 0.0 and semantic_score(1.0) == 1.0
    assert semantic_score(0.4) == pytest.approx(0.5)
    assert confidence(1.0, 1.0) == pytest.approx(1.0)
    assert confidence(0.0, -1.0) == 0.0
    assert confidence(0.5, 0.7) > confidence(0.5, 0.3) > confidence(0.5, 0.0)
    assert confidence(1.0, None) < 1.0  # word overlap alone never reaches full confidence
    for lex in (0.0, 0.3, 1.0):
        for cos in (None, -0.5, 0.2, 0.9):
            assert 0.0 <= confidence(lex, cos) <= 1.0


def test_memory_text_prefixes_the_title_once_and_is_bounded() -> None:
    assert memory_text("Zorbulon", "Held every 17 March.") == "Zorbulon: Held every 17 March."
    assert memory_text("Zorbulon", "Zorbulon is held every 17 March.") == "Zorbulon is held every 17 March."
    assert memory_text("", "Held.") == "Held."
    assert len(memory_text("T", "x" * 10_000)) == MAX_STORED_CHARS


def _passage(text: str, url: str, score: float) -> Passage:
    return Passage(text, text, url, "", 0.0, 0.5, score)


def test_select_passages_best_first_per_page_cap_dedupe_and_floor() -> None:
    a1, a2, a3 = (_passage(f"page a passage {i}", "http://a/", 0.9 - i * 0.01) for i in range(3))
    b1 = _passage("page b passage", "http://b/", 0.5)
    weak = _passage("weak passage", "http://c/", MIN_CONFIDENCE - 0.01)
    known = _passage("already remembered", "http://e/", 0.99)
    chosen = select_passages([weak, b1, a3, a2, a1, known], limit=5, known={fingerprint("already  remembered")})
    assert chosen == [a1, a2, b1]  # a3 is a third passage of page a; weak is under the floor; known is remembered
    assert sum(1 for p in chosen if p.url == "http://a/") == MAX_PER_PAGE
    assert select_passages([a1, a2, b1], limit=1, known=set()) == [a1]
    assert select_passages([weak], limit=3, known=set()) == []
    copy = _passage("page a passage 0", "http://d/", 0.8)  # the same text on another page is kept once
    assert select_passages([a1, copy], limit=3, known=set()) == [a1]


def test_prepare_page_keeps_passages_about_the_gap_only() -> None:
    gap = detect_gap("What is the Zorbulon festival?", NOTHING, threshold=THRESHOLD)
    assert gap is not None
    about = "The Zorbulon festival in Quimtaro is held every 17 March. People fly glass kites over the harbour all day."
    other = "Cooking pasta needs salted water and patience; stir it now and then so it does not stick to the pot."
    html = f"<html><head><title>Quimtaro news</title></head><body><article><p>{about}</p>" + f"<p>{other}</p>" * 3
    title, passages = prepare_page_blocking(
        (html + "</article></body></html>").encode(), "text/html", url="http://x/", charset="utf-8", fetched_at=12.5, gap=gap
    )
    assert passages, "the Zorbulon paragraph is a passage"
    assert all("Zorbulon" in p.text for p in passages)
    assert all(p.url == "http://x/" and p.fetched_at == 12.5 and p.lexical > 0 for p in passages)
    assert title == "Quimtaro news"
    with pytest.raises(ValidationError):
        prepare_page_blocking(b"\x00\x01", "image/png", url="http://x/", charset=None, fetched_at=0.0, gap=gap)


def test_prepare_page_reads_only_the_head_of_a_huge_html_page() -> None:
    gap = detect_gap("Who is Wobblefritz?", NOTHING, threshold=THRESHOLD)
    assert gap is not None
    filler = "<p>" + "Bread needs flour, water and time. " * 20 + "</p>"
    head = "<p>Wobblefritz founded the glass kite guild of Quimtaro in 1823 and taught every apprentice there.</p>"
    tail = "<p>Wobblefritz retired to the mountains and never flew a kite again after the great storm.</p>"
    middle = filler * (MAX_HTML_BYTES // len(filler) + 10)
    body = f"<html><body><article>{head}{middle}{tail}</article></body></html>".encode()
    assert len(body) > MAX_HTML_BYTES
    _, passages = prepare_page_blocking(body, "text/html", url="http://x/", charset="utf-8", fetched_at=0.0, gap=gap)
    assert any("founded" in p.text for p in passages)
    assert not any("retired" in p.text for p in passages), "text past the cap is not read"


def test_fold_strips_accents_and_case() -> None:
    assert fold("Montréal ÉCOLE") == "montreal ecole"
