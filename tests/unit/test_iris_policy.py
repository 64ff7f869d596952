"""Iris's pure decisions: URL normalisation, the allowlist policy, token buckets, links, the hand's result budget."""

from __future__ import annotations

import json

import pytest
from yarl import URL

from mongarsd.cognition.hands import MAX_RESULT_CHARS
from mongarsd.cognition.iris.fetch import (
    MAX_QUEUED_PER_HOST,
    MAX_URL_CHARS,
    Fetcher,
    FetchError,
    HostLimiter,
    Policy,
    TokenBucket,
    content_type_of,
    extract_links,
    parse_allow_entry,
    parse_url,
    resolve_location,
)
from mongarsd.cognition.iris.hand import fit_result
from mongarsd.config import IrisConfig
from mongarsd.errors import ConfigError, ValidationError


def policy(*entries: str, internet: bool = False) -> Policy:
    return Policy([parse_allow_entry(e) for e in entries], allow_internet=internet)


def ok(p: Policy, url: str) -> bool:
    return p.allows(parse_url(url))


# ---------------------------------------------------------------------------- URLs


def test_parse_url_normalises() -> None:
    assert str(parse_url("HTTP://Docs.LAN:80/a/./b/../c#frag")) == "http://docs.lan/a/c"
    assert str(parse_url("https://h:443")) == "https://h/"
    assert str(parse_url("http://h:8080/x?q=1")) == "http://h:8080/x?q=1"
    assert str(parse_url("http://h/docs/%2e%2e/secret")) == "http://h/secret"
    assert str(parse_url("  http://h/%7Ejoe  ")) == "http://h/~joe"
    assert str(parse_url("http://Docs.Lan./x")) == "http://docs.lan/x"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://h/file", "not an http"),
        ("file:///etc/passwd", "not an http"),
        ("javascript:alert(1)", "not an http"),
        ("/relative/path", "not an http"),
        ("http:///nohost", "no host"),
        ("http://user:pw@h/", "user info"),
        ("http://user@h/", "user info"),
        ("http://h:99999/", "not a valid URL"),
        ("", "empty"),
        ("http://h/" + "a" * MAX_URL_CHARS, "too long"),
    ],
)
def test_bad_urls_are_refused_by_name(url: str, words: str) -> None:
    with pytest.raises(FetchError) as info:
        parse_url(url)
    assert info.value.reason == "bad_url"
    assert words in str(info.value)
    assert info.value.status == 400
    assert info.value.param == "url"


def test_a_non_string_url_is_refused() -> None:
    with pytest.raises(FetchError, match="must be a string"):
        parse_url(b"http://h/")


def test_fetch_error_is_a_validation_error_with_an_http_status() -> None:
    err = FetchError("x", reason="robots", url="http://h/")
    assert isinstance(err, ValidationError)
    assert (err.status, err.reason, err.url) == (403, "robots", "http://h/")
    assert FetchError("x", reason="timeout").status == 504
    with pytest.raises(KeyError):
        FetchError("x", reason="no such reason")


def test_resolve_location() -> None:
    base = parse_url("http://h/a/b")
    assert str(resolve_location(base, "c")) == "http://h/a/c"
    assert str(resolve_location(base, "/x#f")) == "http://h/x"
    assert str(resolve_location(base, "//other:81/y")) == "http://other:81/y"
    with pytest.raises(FetchError) as info:
        resolve_location(base, "mailto:a@b")
    assert info.value.reason == "bad_url"


# ---------------------------------------------------------------------------- policy


def test_url_prefix_entries() -> None:
    p = policy("http://docs.lan/guide/")
    assert ok(p, "http://docs.lan/guide/")
    assert ok(p, "http://docs.lan/guide/deep/page?x=1")
    assert ok(p, "HTTP://DOCS.lan:80/guide/x")
    assert not ok(p, "http://docs.lan/guide")  # the entry ends with a slash
    assert not ok(p, "http://docs.lan/guidebook")
    assert not ok(p, "http://docs.lan/other")
    assert not ok(p, "https://docs.lan/guide/x")  # another scheme
    assert not ok(p, "http://docs.lan:8080/guide/x")  # another port
    assert not ok(p, "http://evil.lan/guide/x")
    assert not ok(p, "http://docs.lan.evil.com/guide/x")
    assert not ok(p, "http://docs.lan/guide/../secret")  # dot segments resolved before the check
    assert not ok(p, "http://docs.lan/guide/%2E%2E/secret")


def test_url_prefix_without_slash_covers_the_page_and_below() -> None:
    p = policy("http://docs.lan/page")
    assert ok(p, "http://docs.lan/page")
    assert ok(p, "http://docs.lan/page/child")
    assert ok(p, "http://docs.lan/page?x=1")
    assert not ok(p, "http://docs.lan/pages")


def test_bare_host_entries() -> None:
    p = policy("docs.lan", "127.0.0.1:8080", "[::1]:9000")
    assert ok(p, "http://docs.lan/anything")
    assert ok(p, "https://docs.lan/anything")
    assert not ok(p, "http://docs.lan:8080/")  # a bare host without port: default ports only
    assert not ok(p, "http://sub.docs.lan/")
    assert ok(p, "http://127.0.0.1:8080/x")
    assert ok(p, "https://127.0.0.1:8080/x")
    assert not ok(p, "http://127.0.0.1/x")
    assert not ok(p, "http://127.0.0.1:8081/x")
    assert ok(p, "http://[::1]:9000/")


def test_internet_mode_allows_any_http_url_but_never_user_info() -> None:
    p = policy(internet=True)
    assert ok(p, "https://example.org/x")
    fetcher = Fetcher(config=IrisConfig(allow_internet=True))
    assert fetcher.allowed("https://example.org/x")
    assert not fetcher.allowed("https://user:pw@example.org/x")
    assert not fetcher.allowed("ftp://example.org/x")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8642/api/v1/status",
        "http://localhost/",
        "http://app.localhost./",
        "http://[::1]/",
        "http://10.0.0.5/",
        "http://192.168.1.10/",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/",
    ],
)
def test_internet_mode_still_keeps_to_public_hosts(url: str) -> None:
    assert not ok(policy(internet=True), url)
    assert ok(
        policy(
            "http://127.0.0.1:8642/",
            "localhost",
            "app.localhost",
            "[::1]",
            "10.0.0.5",
            "192.168.1.10",
            "169.254.169.254",
            "0.0.0.0",
            internet=True,
        ),
        url,
    )
    assert ok(policy(internet=True), "http://93.184.216.34/")


def test_offline_by_default() -> None:
    fetcher = Fetcher(config=IrisConfig())
    assert not fetcher.allowed("https://example.org/")
    assert not fetcher.allowed("http://127.0.0.1/")
    assert fetcher.seeds() == []


def test_searxng_is_for_searching_only() -> None:
    fetcher = Fetcher(config=IrisConfig(searxng_url="http://searx.lan:8888/", urls=("docs.lan",)))
    assert not fetcher.allowed("http://searx.lan:8888/search?q=x&format=json")
    assert not fetcher.allowed("http://searx.lan:8888/")
    assert fetcher.allowed("http://docs.lan/x")
    assert not fetcher.allowed("not a url")


def test_seeds_from_the_allowlist() -> None:
    fetcher = Fetcher(config=IrisConfig(urls=("docs.lan", "127.0.0.1:8080", "https://wiki.lan/Main_Page", "http://h:81/a?b=1")))
    assert fetcher.seeds() == ["http://docs.lan/", "http://127.0.0.1:8080/", "https://wiki.lan/Main_Page", "http://h:81/a?b=1"]
    assert all(fetcher.allowed(seed) for seed in fetcher.seeds())


@pytest.mark.parametrize("entry", ["ftp://docs.lan/", "docs.lan/path", "user@docs.lan", "http://", "docs.lan:99999", ""])
def test_bad_allowlist_entries_are_config_errors(entry: str) -> None:
    with pytest.raises(ConfigError, match=r"iris\.urls"):
        Fetcher(config=IrisConfig(urls=(entry,)))


@pytest.mark.parametrize("url", ["ftp://searx.lan/", "http://u:p@searx.lan/", "http://searx.lan/?q=1", "searx.lan"])
def test_bad_searxng_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"iris\.searxng_url"):
        Fetcher(config=IrisConfig(searxng_url=url))


# ---------------------------------------------------------------------------- token buckets


def test_token_bucket_burst_then_spacing() -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0, tokens=2.0, updated=0.0)
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == pytest.approx(0.5)  # queued behind the burst
    assert bucket.reserve(0.0) == pytest.approx(1.0)
    assert bucket.reserve(10.0) == 0.0  # refilled (to the burst, not beyond)
    assert bucket.reserve(10.0) == 0.0
    assert bucket.reserve(10.0) == pytest.approx(0.5)


def test_token_bucket_refuses_past_its_queue_and_survives_a_clock_going_back() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0, tokens=1.0, updated=5.0)
    waits = [bucket.reserve(5.0, max_queued=3) for _ in range(5)]
    assert waits == [0.0, 1.0, 2.0, 3.0, None]
    assert bucket.reserve(4.0, max_queued=3) is None  # an earlier time refills nothing
    assert bucket.reserve(6.0, max_queued=3) == pytest.approx(3.0)


def test_host_limiter_is_per_host_and_bounded() -> None:
    now = [0.0]
    limiter = HostLimiter(rate=1.0, burst=1, clock=lambda: now[0], max_hosts=3)
    assert limiter.reserve("a:80") == 0.0
    assert limiter.reserve("a:80") == pytest.approx(1.0)
    assert limiter.reserve("b:80") == 0.0  # another host has its own bucket
    for host in ("c:80", "d:80", "e:80"):
        limiter.reserve(host)
    assert len(limiter) == 3
    waits = [limiter.reserve("q:80") for _ in range(MAX_QUEUED_PER_HOST + 2)]
    assert waits[-1] is None
    assert waits[-2] is not None


def test_content_type_of() -> None:
    assert content_type_of("Text/HTML; Charset=UTF-8") == ("text/html", "utf-8")
    assert content_type_of('text/plain;charset="latin-1"') == ("text/plain", "latin-1")
    assert content_type_of("text/plain; charset=../../etc") == ("text/plain", None)
    assert content_type_of("") == ("", None)


# ---------------------------------------------------------------------------- links


def test_extract_links() -> None:
    html = b"""<html><body>
      <a href="a">A</a> <a href="/b#frag">B</a> <a href="a#again">A again</a>
      <a href="#top">top</a> <a href="mailto:x@y">mail</a> <a href="javascript:void(0)">js</a>
      <a href="http://other:81/x">other</a> <a rel="nofollow noopener" href="/nofollow">nf</a>
      <area href="/map"> <a>no href</a> <a href="http://u:p@h/">creds</a>
      <p href="/not-a-link">p</p>
    </body></html>"""
    links = [str(u) for u in extract_links(html, "utf-8", URL("http://h/dir/page"))]
    assert links == ["http://h/dir/a", "http://h/b", "http://other:81/x", "http://h/map"]


def test_extract_links_honours_base_limit_and_odd_charsets() -> None:
    html = b'<base href="http://h/base/">' + b"".join(b'<a href="p%d">x</a>' % i for i in range(50))
    links = extract_links(html, "no-such-charset", URL("http://h/"), limit=10)
    assert len(links) == 10
    assert str(links[0]) == "http://h/base/p0"


# ---------------------------------------------------------------------------- the hand's budget


def test_fit_result_shortens_the_text_to_the_budget() -> None:
    text = 'quote " and newline\n ' * 2000
    result = fit_result("http://h/x", "Title", text)
    size = len(json.dumps({"result": result}, ensure_ascii=False, separators=(",", ":")))
    assert size <= MAX_RESULT_CHARS
    assert size > MAX_RESULT_CHARS - 50  # used, not wasted
    assert result["text"].endswith("…")
    assert fit_result("http://h/x", "T", "short") == {"url": "http://h/x", "title": "T", "text": "short"}
