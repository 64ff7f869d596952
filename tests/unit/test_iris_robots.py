"""robots.txt per RFC 9309: group choice, longest match, Allow on ties, wildcards, statuses, the cache."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mongarsd.cognition.iris.robots import (
    ALLOW_ALL,
    DISALLOW_ALL,
    MAX_ROBOTS_ORIGINS,
    RobotsCache,
    RobotsRules,
    decode_robots,
    normalise_path,
    parse_robots,
    pattern_matches,
    rules_for_status,
)


def allows(text: str, path: str, product: str = "mongarsd") -> bool:
    return parse_robots(text, product).allows(path)


# ---------------------------------------------------------------------------- groups


def test_our_group_wins_over_the_star_group() -> None:
    text = "User-agent: *\nDisallow: /\n\nUser-agent: mongarsd\nDisallow: /secret\n"
    assert allows(text, "/page")
    assert not allows(text, "/secret/x")
    assert not allows(text, "/page", product="otherbot")  # others get the * group


def test_product_token_matches_case_insensitively_and_ignores_versions() -> None:
    text = "User-agent: MongarsD/2.1 (compatible)\nDisallow: /x\nUser-agent: *\nDisallow: /\n"
    assert not allows(text, "/x")
    assert allows(text, "/y")


def test_a_similar_name_is_not_our_group() -> None:
    text = "User-agent: mongarsd-evil\nDisallow: /\nUser-agent: *\nDisallow: /star\n"
    assert allows(text, "/page")
    assert not allows(text, "/star")


def test_groups_for_the_same_agent_are_merged() -> None:
    text = "User-agent: mongarsd\nDisallow: /a\n\nUser-agent: other\nDisallow: /b\n\nUser-agent: mongarsd\nDisallow: /c\n"
    assert not allows(text, "/a")
    assert allows(text, "/b")
    assert not allows(text, "/c")


def test_consecutive_user_agent_lines_share_one_group() -> None:
    text = "User-agent: otherbot\nUser-agent: mongarsd\nDisallow: /shared\n"
    assert not allows(text, "/shared")
    assert not allows(text, "/shared", product="otherbot")


def test_without_a_matching_group_everything_is_allowed() -> None:
    assert allows("User-agent: otherbot\nDisallow: /\n", "/anything")
    assert allows("", "/anything")
    assert parse_robots("garbage without colons\n\x00\x01") == ALLOW_ALL


def test_our_group_without_rules_allows_everything_even_under_a_strict_star() -> None:
    assert allows("User-agent: *\nDisallow: /\nUser-agent: mongarsd\n", "/page")


def test_rules_before_any_user_agent_and_unknown_keys_are_ignored() -> None:
    text = "Disallow: /early\nSitemap: http://x/s.xml\nUser-agent: *\nCrawl-delay: 10\nDisallow: /late # a comment\n"
    assert allows(text, "/early")
    assert not allows(text, "/late")
    assert not allows(text, "/latest")  # /late is a prefix of /latest


def test_an_empty_disallow_allows_everything() -> None:
    assert allows("User-agent: *\nDisallow:\n", "/x")


def test_bom_comments_and_crlf_are_tolerated() -> None:
    text = "\ufeffUSER-AGENT: mongarsd\r\n# all of it\r\nDISALLOW: /private\r\n"
    assert not allows(text, "/private/x")
    assert allows(text, "/public")


# ---------------------------------------------------------------------------- matching


def test_longest_match_wins_whichever_order() -> None:
    for text in ("User-agent: *\nDisallow: /docs\nAllow: /docs/public\n", "User-agent: *\nAllow: /docs/public\nDisallow: /docs\n"):
        assert not allows(text, "/docs/private")
        assert allows(text, "/docs/public/page")
    longer_disallow = "User-agent: *\nAllow: /docs\nDisallow: /docs/private\n"
    assert not allows(longer_disallow, "/docs/private/x")
    assert allows(longer_disallow, "/docs/other")


def test_allow_wins_a_tie() -> None:
    assert allows("User-agent: *\nDisallow: /page\nAllow: /page\n", "/page")
    assert allows("User-agent: *\nAllow: /p*ge\nDisallow: /pa*e\n", "/page")  # same length: Allow


def test_star_and_dollar_patterns() -> None:
    text = "User-agent: *\nDisallow: /*.php$\nDisallow: /*/private/\nDisallow: /search*q=\n"
    assert not allows(text, "/a/b.php")
    assert allows(text, "/a/b.php?x=1")  # $ anchors the end of path and query
    assert allows(text, "/a/b.phpx")
    assert not allows(text, "/users/private/1")
    assert allows(text, "/private/1")  # needs a segment before /private/
    assert not allows(text, "/search?lang=en&q=x")
    assert allows(text, "/search?lang=en")


def test_query_strings_are_matched() -> None:
    text = "User-agent: *\nDisallow: /*?sessionid=\n"
    assert not allows(text, "/page?sessionid=1")
    assert allows(text, "/page?id=1")


def test_percent_encoding_is_normalised_on_both_sides() -> None:
    text = "User-agent: *\nDisallow: /%7Ejoe\nDisallow: /café\nDisallow: /a%2fb\n"
    assert not allows(text, "/~joe/index.html")
    assert not allows(text, "/caf%C3%A9/menu")
    assert not allows(text, "/caf%c3%a9")
    assert not allows(text, "/a%2Fb")
    assert allows(text, "/a/b")  # an encoded slash is not a slash


def test_normalise_path() -> None:
    assert normalise_path("/%7e%41%2f x") == "/~A%2F%20x"
    assert normalise_path("/ü") == "/%C3%BC"
    assert normalise_path("/100%") == "/100%"


def test_robots_txt_itself_is_always_allowed() -> None:
    assert allows("User-agent: *\nDisallow: /\n", "/robots.txt")
    assert DISALLOW_ALL.allows("/robots.txt")
    assert not DISALLOW_ALL.allows("/")
    assert ALLOW_ALL.allows("/anything?at=all")


def test_pathological_wildcards_stay_fast() -> None:
    pattern = "/" + "*a" * 200 + "$"
    path = "/" + "a" * 5000 + "b"
    started = time.perf_counter()
    assert not pattern_matches(pattern, path)
    assert time.perf_counter() - started < 1.0
    rules = parse_robots("User-agent: *\nDisallow: /" + "*a" * 200 + "$\n")
    assert not rules.allows("/" + "a" * 300)


@given(st.text(alphabet="/abc.?=", min_size=1, max_size=12), st.text(alphabet="/abc.?=", max_size=20))
def test_a_pattern_without_wildcards_is_a_prefix(pattern: str, path: str) -> None:
    assert pattern_matches(pattern, path) == path.startswith(pattern)
    assert pattern_matches(pattern + "$", path) == (path == pattern)


@given(st.text(alphabet="/ab*", min_size=1, max_size=10), st.text(alphabet="/ab", max_size=16))
def test_wildcards_agree_with_fnmatch(pattern: str, path: str) -> None:
    import fnmatch

    # fnmatch's * is ours with an implicit trailing * (robots patterns match prefixes)
    expected = fnmatch.fnmatchcase(path, pattern + "*")
    assert pattern_matches(pattern, path) == expected
    assert pattern_matches(pattern + "$", path) == fnmatch.fnmatchcase(path, pattern)


# ---------------------------------------------------------------------------- statuses, bodies


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, None),
        (204, None),
        (404, ALLOW_ALL),
        (401, ALLOW_ALL),
        (410, ALLOW_ALL),
        (429, DISALLOW_ALL),
        (500, DISALLOW_ALL),
        (503, DISALLOW_ALL),
    ],
)
def test_status_meanings(status: int, expected: RobotsRules | None) -> None:
    assert rules_for_status(status) == expected


def test_a_truncated_body_loses_its_partial_last_line() -> None:
    assert decode_robots(b"User-agent: *\nDisallow: /a\nDisallow: /b", truncated=True) == "User-agent: *\nDisallow: /a\n"
    assert decode_robots(b"User-agent: *\nDisallow: /b", truncated=False).endswith("/b")
    assert decode_robots(b"no newline at all", truncated=True) == ""
    assert "\ufffd" in decode_robots(b"User-agent: \xff\n", truncated=False)


# ---------------------------------------------------------------------------- cache


def test_cache_expires_after_its_ttl() -> None:
    now = [100.0]
    cache = RobotsCache(ttl_s=10.0, clock=lambda: now[0])
    cache.put("http://h:80", DISALLOW_ALL)
    assert cache.get("http://h:80") is DISALLOW_ALL
    now[0] += 9.9
    assert cache.get("http://h:80") is DISALLOW_ALL
    now[0] += 0.2
    assert cache.get("http://h:80") is None
    assert len(cache) == 0


def test_cache_is_bounded_least_recently_used_first() -> None:
    cache = RobotsCache(ttl_s=60.0, clock=lambda: 0.0)
    for i in range(MAX_ROBOTS_ORIGINS):
        cache.put(f"http://h{i}:80", ALLOW_ALL)
    assert cache.get("http://h0:80") is ALLOW_ALL  # touched: now the most recent
    cache.put("http://new:80", ALLOW_ALL)
    assert len(cache) == MAX_ROBOTS_ORIGINS
    assert cache.get("http://h0:80") is ALLOW_ALL
    assert cache.get("http://h1:80") is None  # the least recently used went
