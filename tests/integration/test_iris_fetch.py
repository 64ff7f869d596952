"""Iris against fake sites on 127.0.0.1: robots.txt, redirects, slow, huge and mistyped pages, rates, SearxNG, crawl, the hand."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from mongarsd.cognition.hands import MAX_RESULT_CHARS, HandContext, Hands
from mongarsd.cognition.iris.fetch import DEFAULT_USER_AGENT, Fetcher, FetchError
from mongarsd.cognition.iris.hand import IRIS_FETCH, iris_hand
from mongarsd.cognition.iris.robots import ROBOTS_MAX_BYTES
from mongarsd.config import IrisConfig
from mongarsd.errors import UnavailableError, ValidationError

LOCAL = "127.0.0.1"
MAX_BYTES = 64 * 1024
HUGE_CHUNK = b"x" * 65536
HUGE_CHUNKS = 1024  # 64 MiB, a thousand times max_bytes
SLOW_PAGE_S = 10.0  # far past the fetch timeout; ended early at teardown

ROBOTS = """# the fake site's rules
User-agent: *
Disallow: /

User-agent: mongarsd
Disallow: /secret
Allow: /secret/public
"""

PAGE = (
    "<html><head><title>Growing tomatoes</title></head><body><article><h1>Growing tomatoes</h1>"
    + "<p>Tomatoes need sun, regular watering and a stake to climb. Plant them after the last frost.</p>" * 5
    + "</article></body></html>"
)


def html(body: str, title: str = "t") -> web.Response:
    return web.Response(text=f"<html><head><title>{title}</title></head><body>{body}</body></html>", content_type="text/html")


@dataclass
class Site:
    """A fake web site that records every request it gets."""

    robots: str | bytes = ROBOTS
    robots_status: int = 200
    seen: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)
    huge_sent: int = 0
    huge_done: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    other: str = ""  # base URL of a server that is not allowlisted

    @property
    def url(self) -> str:
        return f"http://{LOCAL}:{self.port}"

    def count(self, path: str) -> int:
        return sum(1 for p in self.seen if p == path)

    @web.middleware
    async def record(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        self.seen.append(request.path_qs)
        self.times.append(time.monotonic())
        self.agents.append(request.headers.get("User-Agent", ""))
        resp: web.StreamResponse = await handler(request)
        return resp

    async def robots_txt(self, request: web.Request) -> web.Response:
        body = self.robots.encode() if isinstance(self.robots, str) else self.robots
        return web.Response(body=body, status=self.robots_status, content_type="text/plain")

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html", charset="utf-8")

    async def redirect(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        raise web.HTTPFound(f"/r/{n - 1}" if n > 1 else "/page")

    async def away(self, request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently(self.other + "/landing")

    async def to_secret(self, request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/secret/inside")

    async def slow(self, request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(self.release.wait(), SLOW_PAGE_S)
        except TimeoutError:
            pass
        return web.Response(text="late", content_type="text/plain")

    async def huge(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        try:
            await resp.prepare(request)
            for _ in range(HUGE_CHUNKS):
                await resp.write(HUGE_CHUNK)
                self.huge_sent += len(HUGE_CHUNK)
        except ConnectionError:
            pass  # the client hung up: what this test wants
        finally:
            self.huge_done.set()
        return resp

    async def huge_declared(self, request: web.Request) -> web.Response:
        return web.Response(body=b"y" * (MAX_BYTES * 4), content_type="text/plain")

    async def wrong_type(self, request: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, content_type="image/png")

    async def missing(self, request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    async def crawl(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "")
        links = {
            "": ["a", "/crawl/b", "/secret/x", f"{self.other}/ext", "mailto:x@y", "#top", "a#frag", "/missing", "/wrong-type"],
            "a": ["c", "/crawl/"],
            "b": ["d", "/crawl/a"],
            "c": [],
            "d": ["/secret/public/ok"],
        }.get(name)
        if links is None:
            raise web.HTTPNotFound()
        return html("".join(f'<a href="{href}">link</a>' for href in links), title=f"crawl {name}")

    async def public(self, request: web.Request) -> web.Response:
        return html("public", title="public")

    async def secret(self, request: web.Request) -> web.Response:
        return html("the secret", title="secret")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.record])
        app.router.add_get("/robots.txt", self.robots_txt)
        app.router.add_get("/page", self.page)
        app.router.add_get("/page2", self.page)
        app.router.add_get("/r/{n}", self.redirect)
        app.router.add_get("/away", self.away)
        app.router.add_get("/to-secret", self.to_secret)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/huge", self.huge)
        app.router.add_get("/huge-declared", self.huge_declared)
        app.router.add_get("/wrong-type", self.wrong_type)
        app.router.add_get("/missing", self.missing)
        app.router.add_get("/crawl/", self.crawl)
        app.router.add_get("/crawl/{name}", self.crawl)
        app.router.add_get("/secret/public/ok", self.public)
        app.router.add_get("/secret/{tail:.*}", self.secret)
        return app


@dataclass
class Searx:
    """A fake SearxNG: /search?q=...&format=json, and a robots.txt that disallows everything."""

    results: list[Any] = field(default_factory=list)
    content_type: str = "application/json"
    seen: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{LOCAL}:{self.port}"

    async def search(self, request: web.Request) -> web.Response:
        self.queries.append(request.query.get("q", ""))
        if request.query.get("format") != "json":
            raise web.HTTPForbidden()
        return web.Response(text=json.dumps({"query": request.query["q"], "results": self.results}), content_type=self.content_type)

    async def anything(self, request: web.Request) -> web.Response:
        self.seen.append(request.path_qs)
        if request.path == "/robots.txt":
            return web.Response(text="User-agent: *\nDisallow: /\n", content_type="text/plain")
        return html("not for fetching")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/search", self.search)
        app.router.add_get("/{tail:.*}", self.anything)
        return app


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, LOCAL, 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def servers() -> AsyncIterator[tuple[Site, Searx]]:
    site, searx = Site(), Searx()
    async with serving(searx.app()) as searx_port, serving(site.app()) as site_port:
        site.port, searx.port = site_port, searx_port
        site.other = searx.url
        try:
            yield site, searx
        finally:
            site.release.set()  # let a slow handler finish before its server goes


def config_for(site: Site, searx: Searx | None = None, **overrides: Any) -> IrisConfig:
    base = IrisConfig(
        urls=(f"{LOCAL}:{site.port}",),
        searxng_url=searx.url if searx else "",
        timeout_s=2.0,
        max_bytes=MAX_BYTES,
        max_redirects=2,
        host_rate_rps=1000.0,
        host_burst=100,
    )
    return dataclasses.replace(base, **overrides)


@asynccontextmanager
async def started(config: IrisConfig, clock: Callable[[], float] = time.monotonic) -> AsyncIterator[Fetcher]:
    fetcher = Fetcher(config=config, clock=clock)
    await fetcher.async_start()
    try:
        yield fetcher
    finally:
        await fetcher.async_stop()


async def refused(fetcher: Fetcher, url: str) -> FetchError:
    with pytest.raises(FetchError) as info:
        await fetcher.async_fetch(url)
    assert info.value.url  # every refusal names the URL
    return info.value


# ---------------------------------------------------------------------------- fetch


async def test_fetches_a_page_with_our_user_agent(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    async with started(config_for(site)) as fetcher:
        page = await fetcher.async_fetch(site.url + "/page")
    assert page.status == 200
    assert page.content_type == "text/html"
    assert page.charset == "utf-8"
    assert page.body == PAGE.encode()
    assert page.url == page.final_url == site.url + "/page"
    assert abs(page.fetched_at - time.time()) < 60
    assert site.seen == ["/robots.txt", "/page"]  # robots.txt first, always
    assert all(agent == DEFAULT_USER_AGENT for agent in site.agents)
    assert DEFAULT_USER_AGENT.startswith("mongarsd/")
    samples = {(name, labels.get("outcome")): value for name, _, _, value, labels in fetcher.metrics()}
    assert samples[("mongarsd_iris_fetches_total", "ok")] == 1
    assert samples[("mongarsd_iris_bytes_total", None)] == len(PAGE.encode())


async def test_a_path_disallowed_by_robots_is_never_requested(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    async with started(config_for(site)) as fetcher:
        err = await refused(fetcher, site.url + "/secret/plans")
        assert err.reason == "robots"
        assert "robots.txt" in str(err) and "/secret/plans" in str(err)
        assert (await fetcher.async_fetch(site.url + "/secret/public/ok")).status == 200  # the longer Allow wins
        err = await refused(fetcher, site.url + "/to-secret")  # a redirect into it is checked too
        assert err.reason == "robots"
        blocked = {name: value for name, _, _, value, _ in fetcher.metrics() if name == "mongarsd_iris_robots_blocked_total"}
    assert not any(p.startswith("/secret/") and p != "/secret/public/ok" for p in site.seen)
    assert "/to-secret" in site.seen
    assert site.count("/robots.txt") == 1  # cached
    assert blocked == {"mongarsd_iris_robots_blocked_total": 2}


async def test_a_url_off_the_allowlist_is_never_requested(servers: tuple[Site, Searx]) -> None:
    site, searx = servers
    async with started(config_for(site)) as fetcher:
        err = await refused(fetcher, searx.url + "/page")
        assert err.reason == "not_allowed"
        assert err.status == 403
        err = await refused(fetcher, site.url + "/away")  # a redirect off the allowlist
        assert err.reason == "not_allowed"
        assert "/landing" in str(err)
        err = await refused(fetcher, "ftp://127.0.0.1/x")
        assert err.reason == "bad_url"
    assert searx.seen == []
    assert "/away" in site.seen


async def test_redirects_are_followed_up_to_the_limit(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    async with started(config_for(site, max_redirects=2)) as fetcher:
        page = await fetcher.async_fetch(site.url + "/r/2")
        assert page.final_url == site.url + "/page"
        assert page.url == site.url + "/r/2"
        site.seen.clear()
        err = await refused(fetcher, site.url + "/r/5")
        assert err.reason == "redirects"
        assert "more than 2" in str(err)
    assert site.seen == ["/r/5", "/r/4", "/r/3"]  # three requests, two redirects followed, no more


async def test_a_slow_page_times_out(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    async with started(config_for(site, timeout_s=0.3)) as fetcher:
        await fetcher.async_fetch(site.url + "/page")  # robots.txt is cached now
        started_at = time.monotonic()
        err = await refused(fetcher, site.url + "/slow")
        elapsed = time.monotonic() - started_at
    assert err.reason == "timeout"
    assert err.status == 504
    assert "0.3 s" in str(err)
    assert elapsed < 2.0


async def test_a_huge_page_is_refused_without_reading_it_all(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    async with started(config_for(site)) as fetcher:
        err = await refused(fetcher, site.url + "/huge")
        assert err.reason == "too_large"
        assert str(MAX_BYTES) in str(err)
        await asyncio.wait_for(site.huge_done.wait(), 10)
        err = await refused(fetcher, site.url + "/huge-declared")  # Content-Length says it first
        assert err.reason == "too_large"
        assert str(MAX_BYTES * 4) in str(err)
        samples = {(name, labels.get("outcome")): value for name, _, _, value, labels in fetcher.metrics()}
    assert site.huge_sent < len(HUGE_CHUNK) * HUGE_CHUNKS // 2  # the client hung up long before the end
    assert samples[("mongarsd_iris_fetches_total", "too_large")] == 2
    assert samples[("mongarsd_iris_bytes_total", None)] == 0


async def test_wrong_content_type_and_http_errors_are_refused(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    async with started(config_for(site)) as fetcher:
        err = await refused(fetcher, site.url + "/wrong-type")
        assert err.reason == "content_type"
        assert "image/png" in str(err)
        page = await fetcher.async_fetch(site.url + "/wrong-type", accept={"image/png"})
        assert page.content_type == "image/png"
        err = await refused(fetcher, site.url + "/missing")
        assert (err.reason, err.http_status) == ("http_status", 404)
        assert "404" in str(err)
        with pytest.raises(ValidationError, match="accept"):
            await fetcher.async_fetch(site.url + "/page", accept=())


async def test_an_unreachable_host_is_a_network_error_and_disallows_its_robots(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    async with serving(web.Application()) as port:
        pass  # a port nothing listens on any more
    async with started(config_for(site, urls=(f"{LOCAL}:{port}",))) as fetcher:
        err = await refused(fetcher, f"http://{LOCAL}:{port}/page")
    assert err.reason == "robots"  # robots.txt unreachable: RFC 9309 says assume a complete disallow


async def test_robots_statuses_and_cache_ttl(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    offset = [0.0]
    site.robots_status = 503
    async with started(config_for(site, robots_ttl_s=60.0), clock=lambda: time.monotonic() + offset[0]) as fetcher:
        err = await refused(fetcher, site.url + "/page")
        assert err.reason == "robots"
        assert site.seen == ["/robots.txt"]  # 5xx: nothing else may be fetched
        site.robots_status = 404
        await refused(fetcher, site.url + "/page")  # still cached for the TTL
        assert site.seen == ["/robots.txt"]
        offset[0] += 61.0
        assert (await fetcher.async_fetch(site.url + "/secret/anything")).status == 200  # 404: everything allowed
        assert site.seen == ["/robots.txt", "/robots.txt", "/secret/anything"]


async def test_robots_txt_is_read_up_to_its_size_cap(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    filler = ("# " + "z" * 97 + "\n") * (ROBOTS_MAX_BYTES // 100 + 10)
    site.robots = "User-agent: mongarsd\nDisallow: /early\n" + filler + "Disallow: /late\n"
    async with started(config_for(site)) as fetcher:
        assert (await refused(fetcher, site.url + "/early")).reason == "robots"
        with pytest.raises(FetchError) as info:
            await fetcher.async_fetch(site.url + "/late")
    assert info.value.reason == "http_status"  # /late was not ruled out: past the cap, so requested (and 404)


async def test_the_token_bucket_spaces_requests_to_one_host(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    rate = 10.0
    async with started(config_for(site, host_rate_rps=rate, host_burst=1)) as fetcher:
        begun = time.monotonic()
        pages = await asyncio.gather(*(fetcher.async_fetch(site.url + p) for p in ("/page", "/page2", "/page", "/page2")))
    assert len(pages) == 4
    assert len(site.times) == 5  # robots.txt and four pages
    # Each request waits for its own slot: the i-th cannot reach the server before i / rate.
    late = [round(t - begun - i / rate, 3) for i, t in enumerate(sorted(site.times))]
    assert min(late) >= -0.01, late


async def test_not_started_or_disabled_is_unavailable(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    fetcher = Fetcher(config=config_for(site))
    with pytest.raises(UnavailableError, match="not started"):
        await fetcher.async_fetch(site.url + "/page")
    async with started(config_for(site, enabled=False)) as off:
        with pytest.raises(UnavailableError, match="disabled"):
            await off.async_fetch(site.url + "/page")
    assert site.seen == []


# ---------------------------------------------------------------------------- search


async def test_search_keeps_only_allowed_results(servers: tuple[Site, Searx]) -> None:
    site, searx = servers
    searx.results = [
        {"url": site.url + "/page", "title": "  The   page ", "content": "about tomatoes"},
        {"url": "https://example.org/elsewhere", "title": "internet", "content": "not allowlisted"},
        {"url": site.url + "/page#again", "title": "duplicate", "content": "same page"},
        {"url": "ftp://127.0.0.1/x", "title": "ftp"},
        "not a dict",
        {"title": "no url"},
        {"url": site.url + "/page2", "title": 42, "content": None},
        {"url": site.url + "/crawl/", "title": "third"},
    ]
    async with started(config_for(site, searx)) as fetcher:
        hits = await fetcher.async_search("tomato stakes", limit=2)
        assert [h.url for h in hits] == [site.url + "/page", site.url + "/page2"]
        assert hits[0].title == "The page"
        assert hits[0].snippet == "about tomatoes"
        assert (hits[1].title, hits[1].snippet) == ("", "")
        assert len(await fetcher.async_search("tomato stakes")) == 3
        assert not fetcher.allowed(searx.url + "/search?q=x&format=json")
    assert searx.queries == ["tomato stakes", "tomato stakes"]
    assert searx.seen == []  # SearxNG's robots.txt is not consulted for its own API, nothing else is fetched there
    assert site.seen == []  # search fetches no result


async def test_search_errors_and_bounds(servers: tuple[Site, Searx]) -> None:
    site, searx = servers
    async with started(config_for(site)) as no_search:
        assert await no_search.async_search("anything") == []
    async with started(config_for(site, searx)) as fetcher:
        for query, limit in (("", 5), ("   ", 5), ("x" * 501, 5), ("ok", 0), ("ok", 21)):
            with pytest.raises(ValidationError):
                await fetcher.async_search(query, limit=limit)
        searx.content_type = "text/html"
        with pytest.raises(FetchError) as info:
            await fetcher.async_search("tomatoes")
        assert info.value.reason == "content_type"
        assert "format=json" in str(info.value)
        searx.content_type = "application/json"
        searx.results = {"not": "a list"}  # type: ignore[assignment]
        with pytest.raises(FetchError, match="results list"):
            await fetcher.async_search("tomatoes")
    assert searx.queries == ["tomatoes", "tomatoes"]


# ---------------------------------------------------------------------------- crawl


async def test_crawl_is_breadth_first_and_bounded(servers: tuple[Site, Searx]) -> None:
    site, searx = servers
    async with started(config_for(site)) as fetcher:
        pages = [p async for p in fetcher.async_crawl([site.url + "/crawl/"], max_pages=3)]
    assert [p.final_url for p in pages] == [site.url + "/crawl/", site.url + "/crawl/a", site.url + "/crawl/b"]
    assert site.seen == ["/robots.txt", "/crawl/", "/crawl/a", "/crawl/b"]
    assert searx.seen == []


async def test_crawl_visits_each_page_once_skips_failures_and_disallowed_paths(servers: tuple[Site, Searx]) -> None:
    site, searx = servers
    async with started(config_for(site)) as fetcher:
        pages = [p async for p in fetcher.async_crawl([site.url + "/crawl/", site.url + "/crawl/", "not a url"], max_pages=50)]
    got = [p.final_url.removeprefix(site.url) for p in pages]
    assert got == ["/crawl/", "/crawl/a", "/crawl/b", "/crawl/c", "/crawl/d", "/secret/public/ok"]
    counts = Counter(site.seen)
    assert counts["/missing"] == 1 and counts["/wrong-type"] == 1  # failed, skipped, the crawl went on
    assert all(n == 1 for n in counts.values()), counts
    assert "/secret/x" not in counts  # disallowed by robots.txt: never requested
    assert searx.seen == []  # another origin: never followed


async def test_crawl_does_not_return_a_page_twice_through_a_redirect(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    async with started(config_for(site)) as fetcher:
        pages = [p async for p in fetcher.async_crawl([site.url + "/page", site.url + "/r/1", site.url + "/page#x"], max_pages=10)]
    assert [p.final_url for p in pages] == [site.url + "/page"]
    assert site.seen == ["/robots.txt", "/page", "/r/1"]


async def test_crawl_refuses_a_bad_page_budget(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    async with started(config_for(site)) as fetcher:
        for bad in (0, -1, 10_000):
            with pytest.raises(ValidationError, match="max_pages"):
                [p async for p in fetcher.async_crawl([site.url + "/crawl/"], max_pages=bad)]
    assert site.seen == []


# ---------------------------------------------------------------------------- the hand


async def test_the_iris_fetch_hand(servers: tuple[Site, Searx]) -> None:
    site, _ = servers
    async with started(config_for(site, max_bytes=1 << 20)) as fetcher:
        hand = iris_hand(fetcher)
        assert hand.timeout_s == pytest.approx(fetcher.config.timeout_s + 2.0)
        hands = Hands([hand])
        user = HandContext(user="alice", role="user")
        result = await hands.async_run(IRIS_FETCH, {"url": site.url + "/page"}, user)
        assert result.ok, result.content
        assert result.data["url"] == site.url + "/page"
        assert result.data["title"] == "Growing tomatoes"
        assert "Tomatoes need sun" in result.data["text"]
        assert len(result.content) <= MAX_RESULT_CHARS

        denied = await hands.async_run(IRIS_FETCH, {"url": site.url + "/page"}, HandContext(user="peer-node", role="peer"))
        assert not denied.ok and "not permitted" in denied.content

        blocked = await hands.async_run(IRIS_FETCH, {"url": site.url + "/secret/plans"}, user)
        assert not blocked.ok and "robots.txt" in blocked.content

        bad = await hands.async_run(IRIS_FETCH, {"url": "file:///etc/passwd"}, user)
        assert not bad.ok and "http" in bad.content

        spec = hands.specs("user")[0]["function"]
        assert spec["name"] == IRIS_FETCH
        assert spec["parameters"]["required"] == ["url"]
    assert site.count("/page") == 1
    assert not any(p.startswith("/secret/plans") for p in site.seen)
