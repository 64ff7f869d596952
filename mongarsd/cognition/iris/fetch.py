"""Iris's fetcher: reads only allowlisted pages, politely (robots.txt, per-host rate, size, type and time limits).

With `iris.allow_internet` off (the default) nothing outside `iris.urls` is ever requested,
and the configured SearxNG instance is used for searching only. Every request, redirect hops
included, is checked against that policy and the origin's robots.txt before it is sent, and
waits for a token of its host's bucket. Bodies are read with a running cap, so a page never
costs more than `iris.max_bytes` of memory.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, Final

import aiohttp
import structlog
from yarl import URL

from mongarsd import __version__
from mongarsd.cognition.iris.extract import media_type
from mongarsd.cognition.iris.robots import (
    ALLOW_ALL,
    DISALLOW_ALL,
    PRODUCT_TOKEN,
    ROBOTS_MAX_BYTES,
    ROBOTS_PATH,
    RobotsCache,
    RobotsRules,
    decode_robots,
    parse_robots,
    rules_for_status,
)
from mongarsd.config import IrisConfig
from mongarsd.errors import ConfigError, UnavailableError, ValidationError
from mongarsd.sanitize import bounded_int, clean_text

log = structlog.get_logger("mongarsd.cognition.iris")

TEXT_TYPES: Final = frozenset({"text/html", "application/xhtml+xml", "text/plain", "text/markdown", "application/pdf"})
HTML_TYPES: Final = frozenset({"text/html", "application/xhtml+xml"})
JSON_TYPE: Final = "application/json"
DEFAULT_USER_AGENT: Final = f"{PRODUCT_TOKEN}/{__version__} (+private assistant; robots.txt honoured)"

REASONS: Final = ("not_allowed", "robots", "too_large", "content_type", "timeout", "redirects", "http_status", "network", "bad_url")
# FetchError is a ValidationError so the API's error middleware answers with this status (param "url").
_REASON_STATUS: Final = {
    "bad_url": 400,
    "not_allowed": 403,
    "robots": 403,
    "too_large": 422,
    "content_type": 422,
    "timeout": 504,
    "redirects": 502,
    "http_status": 502,
    "network": 502,
}
REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})

MAX_URL_CHARS: Final = 2048
MAX_SHOWN_URL_CHARS: Final = 200  # a URL quoted in an error message or a log line
MAX_CHARSET_CHARS: Final = 40
READ_CHUNK_BYTES: Final = 64 * 1024
MAX_CONNECTIONS: Final = 8
MAX_CONNECTIONS_PER_HOST: Final = 2
MAX_RATE_HOSTS: Final = 256  # hosts whose token buckets are kept (least recently used dropped first)
MAX_QUEUED_PER_HOST: Final = 8  # requests that may wait for one host's tokens; more are refused
MAX_SEARCH_QUERY_CHARS: Final = 500
MAX_SEARCH_LIMIT: Final = 20
MAX_SEARCH_SCANNED: Final = 100  # SearxNG results looked at, whatever it sends
MAX_TITLE_CHARS: Final = 300
MAX_SNIPPET_CHARS: Final = 1000
MAX_CRAWL_PAGES: Final = 1000
MAX_CRAWL_SEEDS: Final = 100
CRAWL_ATTEMPTS_PER_PAGE: Final = 3  # fetches a crawl may try per page it must return (failures included)
MAX_CRAWL_FRONTIER: Final = 2000  # URLs waiting in one crawl
MAX_LINKS_PER_PAGE: Final = 200
START_TIMEOUT_S: Final = 5.0
STOP_TIMEOUT_S: Final = 0.5

_WS_RE: Final = re.compile(r"\s+")
_CHARSET_RE: Final = re.compile(r"[A-Za-z0-9_.:-]+")


# ------------------------------------------------------------------------------ records


class FetchError(ValidationError):
    """A page could not be fetched; `reason` says why ("not_allowed", "robots", "too_large", ...)."""

    def __init__(self, message: str, *, reason: str, url: str = "", http_status: int | None = None) -> None:
        super().__init__(message, param="url", status=_REASON_STATUS[reason])
        self.reason = reason
        self.url = url
        self.http_status = http_status


class _AlreadyVisited(Exception):
    """A crawl's redirect points at a page the crawl has seen: it is not requested again (never escapes the crawl)."""

    def __init__(self, url: URL) -> None:
        super().__init__(str(url))
        self.url = url


@dataclass(frozen=True, slots=True)
class FetchedPage:
    url: str  # as asked
    final_url: str  # after redirects
    status: int
    content_type: str  # media type, lower case, no parameters ("text/html")
    charset: str | None
    body: bytes  # never more than config max_bytes
    fetched_at: float  # time.time()


@dataclass(frozen=True, slots=True)
class SearchHit:
    url: str
    title: str
    snippet: str


# ------------------------------------------------------------------------------ pure policy


def _shown(url: object) -> str:
    text = str(url)
    return text if len(text) <= MAX_SHOWN_URL_CHARS else text[: MAX_SHOWN_URL_CHARS - 1] + "…"


def parse_url(url: object) -> URL:
    """Return URL normalised (lower-case scheme and host, no default port, no fragment, dot segments resolved) (pure).

    Raises FetchError(reason="bad_url") for anything but an absolute http(s) URL with a host
    and without user info.
    """
    if not isinstance(url, str):
        raise FetchError(f"a URL must be a string, not {type(url).__name__}", reason="bad_url")
    text = url.strip()
    if not text:
        raise FetchError("the URL is empty", reason="bad_url")
    if len(text) > MAX_URL_CHARS:
        raise FetchError(f"the URL is too long ({len(text)} characters; at most {MAX_URL_CHARS})", reason="bad_url", url=_shown(text))
    try:
        parsed = URL(text)
        port = parsed.port  # yarl checks the port range lazily
    except (ValueError, TypeError, UnicodeError) as err:
        raise FetchError(f"{_shown(text)!r} is not a valid URL: {err}", reason="bad_url", url=_shown(text)) from err
    return _normalised(parsed, text, port)


def _normalised(parsed: URL, text: str, port: int | None) -> URL:
    if parsed.scheme not in ("http", "https"):
        raise FetchError(f"{_shown(text)!r} is not an http:// or https:// URL", reason="bad_url", url=_shown(text))
    if not parsed.raw_host:
        raise FetchError(f"{_shown(text)!r} has no host", reason="bad_url", url=_shown(text))
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise FetchError(f"{_shown(text)!r} carries user info (user:password@): refused", reason="bad_url", url=_shown(text))
    if port is None or port == 0:
        raise FetchError(f"{_shown(text)!r} has no usable port", reason="bad_url", url=_shown(text))
    out = parsed.with_fragment(None)
    if out.raw_host and out.raw_host.endswith(".") and out.raw_host.strip("."):
        out = out.with_host(out.raw_host.rstrip("."))  # "docs.lan." is "docs.lan"
    if out.explicit_port is not None and out.is_default_port():
        out = out.with_port(None)
    if out.raw_path in ("", "/"):
        out = out.with_path("/", keep_query=True)  # "http://h" and "http://h/" are one page: spell it once
    return out


def resolve_location(base: URL, location: str) -> URL:
    """Resolve a redirect's Location (or a link) against BASE and normalise it (pure; FetchError bad_url)."""
    if len(location) > MAX_URL_CHARS:
        raise FetchError(
            f"a redirect from {_shown(base)} points at a URL over {MAX_URL_CHARS} characters", reason="bad_url", url=_shown(base)
        )
    try:
        joined = base.join(URL(location.strip()))
    except (ValueError, TypeError, UnicodeError) as err:
        raise FetchError(
            f"{_shown(base)} points at an invalid URL {_shown(location)!r}: {err}", reason="bad_url", url=_shown(base)
        ) from err
    return parse_url(str(joined))


def origin_of(url: URL) -> str:
    """Return the origin key of a normalised URL: scheme://host:port (pure)."""
    return f"{url.scheme}://{url.raw_host}:{url.port}"


def host_key(url: URL) -> str:
    """Return the rate-limit key of a normalised URL: host:port (pure)."""
    return f"{url.raw_host}:{url.port}"


def _path_below(target: str, prefix: str) -> bool:
    """Tell whether TARGET (path?query) is PREFIX or lies below it (pure)."""
    if target == prefix or prefix.endswith("/"):
        return target.startswith(prefix)
    return target.startswith((prefix + "/", prefix + "?"))


def _local_host(host: str) -> bool:
    """Tell whether HOST names this machine or a non-public network by itself (no DNS) (pure)."""
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return not address.is_global


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """One `iris.urls` entry: a URL prefix (scheme, host, port, path) or a bare host (scheme None)."""

    scheme: str | None
    host: str
    port: int | None  # a bare host without port: only the scheme's default port
    path: str  # path?query prefix; "" for a bare host
    text: str

    def allows(self, url: URL) -> bool:
        if url.raw_host != self.host:
            return False
        if self.scheme is None:
            return url.explicit_port is None if self.port is None else url.port == self.port
        return url.scheme == self.scheme and url.port == self.port and _path_below(url.raw_path_qs, self.path)

    def seed(self) -> str:
        if self.scheme is not None:
            return f"{self.scheme}://{_authority(self.host, self.port, self.scheme)}{self.path}"
        return f"http://{_authority(self.host, self.port, 'http')}/"


def _authority(host: str, port: int | None, scheme: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return shown if port is None or port == default else f"{shown}:{port}"


def parse_allow_entry(text: str) -> AllowEntry:
    """Parse one `iris.urls` entry (pure); ConfigError names a bad one."""
    raw = str(text).strip()
    try:
        if "://" in raw:
            url = parse_url(raw)
            return AllowEntry(scheme=url.scheme, host=str(url.raw_host), port=url.port, path=url.raw_path_qs, text=raw)
        url = parse_url("http://" + raw)
        if url.raw_path_qs != "/" or raw.endswith("/"):
            raise FetchError("a bare host entry has no path (write a full URL for a page)", reason="bad_url")
        return AllowEntry(scheme=None, host=str(url.raw_host), port=url.explicit_port, path="", text=raw)
    except FetchError as err:
        raise ConfigError(f"iris.urls: entry {_shown(raw)!r} is neither an http(s) URL nor a host[:port]: {err}") from err


class Policy:
    """What may be fetched: the allowlist, or any http(s) URL when `allow_internet` is on (pure)."""

    def __init__(self, entries: Sequence[AllowEntry], *, allow_internet: bool) -> None:
        self.entries = tuple(entries)
        self.allow_internet = allow_internet

    @classmethod
    def from_config(cls, config: IrisConfig) -> Policy:
        return cls([parse_allow_entry(e) for e in config.urls], allow_internet=bool(config.allow_internet))

    def allows(self, url: URL) -> bool:
        """Tell whether a normalised URL (see parse_url) may be fetched.

        Open internet means public hosts: loopback, private, link-local (cloud metadata) and
        other non-global addresses written as IP literals, and `localhost` names, are reached
        only through the allowlist.
        """
        if any(entry.allows(url) for entry in self.entries):
            return True
        return self.allow_internet and not _local_host(str(url.raw_host))


@dataclass(slots=True)
class TokenBucket:
    """Tokens refill at `rate` per second up to `burst`; each request takes one (pure, clock passed in)."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def reserve(self, now: float, *, max_queued: int = MAX_QUEUED_PER_HOST) -> float | None:
        """Take a token; return the seconds to wait before using it, or None when MAX_QUEUED requests wait already."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = max(now, self.updated)
        if self.tokens - 1 < -max_queued:
            return None
        self.tokens -= 1  # may go negative: a reservation on a future token, so waiters keep their order
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class HostLimiter:
    """One token bucket per host, the least recently used dropped past `max_hosts` (loop-only)."""

    def __init__(
        self, *, rate: float, burst: int, clock: Callable[[], float], max_hosts: int = MAX_RATE_HOSTS, max_queued: int = MAX_QUEUED_PER_HOST
    ) -> None:
        self.rate = rate
        self.burst = float(max(1, burst))
        self.max_hosts = max_hosts
        self.max_queued = max_queued
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def reserve(self, host: str) -> float | None:
        """Return how long a request to HOST must wait for its token, or None when too many wait already."""
        now = self._clock()
        bucket = self._buckets.get(host)
        if bucket is None:
            bucket = self._buckets[host] = TokenBucket(self.rate, self.burst, self.burst, now)
            while len(self._buckets) > self.max_hosts:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(host)
        return bucket.reserve(now, max_queued=self.max_queued)


def content_type_of(header: str) -> tuple[str, str | None]:
    """Split a Content-Type header into (media type lower-cased, charset lower-cased or None when absent or odd) (pure)."""
    kind, charset = media_type(header)
    if charset is not None:
        charset = charset.lower() if len(charset) <= MAX_CHARSET_CHARS and _CHARSET_RE.fullmatch(charset) else None
    return kind, charset


def _clean(value: object, limit: int) -> str:
    text = _WS_RE.sub(" ", clean_text(value)).strip() if isinstance(value, str) else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------ links (crawl)


class _LinkParser(HTMLParser):
    def __init__(self, limit: int) -> None:
        super().__init__(convert_charrefs=True)
        self.limit = limit
        self.base: str | None = None
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ("a", "area", "base") or len(self.hrefs) >= self.limit:
            return
        values = {k.lower(): v for k, v in attrs if v is not None}
        href = values.get("href")
        if href is None:
            return
        if tag == "base":
            if self.base is None:
                self.base = href
        elif "nofollow" not in values.get("rel", "").lower().split():
            self.hrefs.append(href)


def extract_links(body: bytes, charset: str | None, base: URL, *, limit: int = MAX_LINKS_PER_PAGE) -> list[URL]:
    """Return up to LIMIT distinct http(s) links of an HTML page, resolved and without fragments.

    Blocking (CPU-bound on a large page): run it through asyncio.to_thread.
    """
    try:
        text = body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know: read it as UTF-8
        text = body.decode("utf-8", errors="replace")
    parser = _LinkParser(limit)
    parser.feed(text)
    parser.close()
    if parser.base is not None:
        try:
            base = resolve_location(base, parser.base)
        except FetchError:
            pass  # a broken <base href> is ignored, as browsers do
    links: list[URL] = []
    seen: set[str] = set()
    for href in parser.hrefs:
        if href.strip().startswith("#"):
            continue
        try:
            link = resolve_location(base, href)
        except FetchError:
            continue  # mailto:, javascript:, malformed: not a page to read
        if str(link) not in seen:
            seen.add(str(link))
            links.append(link)
    return links


# ------------------------------------------------------------------------------ the service


class Fetcher:
    """Fetch allowlisted pages and search the configured SearxNG, politely (loop-only)."""

    name = "iris-fetcher"
    start_timeout_s = START_TIMEOUT_S
    stop_timeout_s = STOP_TIMEOUT_S

    def __init__(self, *, config: IrisConfig, user_agent: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.user_agent = user_agent or DEFAULT_USER_AGENT
        self.policy = Policy.from_config(config)
        self._searxng = _searxng_endpoint(config.searxng_url) if config.searxng_url.strip() else None
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._robots = RobotsCache(ttl_s=config.robots_ttl_s, clock=clock)
        self._robots_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._limiter = HostLimiter(rate=config.host_rate_rps, burst=config.host_burst, clock=clock)
        self._session: aiohttp.ClientSession | None = None
        self.fetches: Counter[str] = Counter()
        self.searches: Counter[str] = Counter()
        self.robots_blocked_total = 0
        self.bytes_total = 0

    # -------------------------------------------------------------------------- lifecycle

    async def async_start(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=MAX_CONNECTIONS_PER_HOST),
            cookie_jar=aiohttp.DummyCookieJar(),  # no tracking between fetches
            headers={"User-Agent": self.user_agent},
            timeout=self._timeout,
        )
        log.info(
            "iris_fetcher_started",
            allowlist=len(self.policy.entries),
            internet=self.policy.allow_internet,
            search=self._searxng is not None,
        )

    async def async_stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _require_session(self) -> aiohttp.ClientSession:
        if not self.config.enabled:
            raise UnavailableError("Iris is disabled (iris.enabled = false)")
        if self._session is None:
            raise UnavailableError("the Iris fetcher is not started")
        return self._session

    # -------------------------------------------------------------------------- policy

    def allowed(self, url: str) -> bool:
        """Tell whether URL may be fetched under the configured policy (pure, no I/O)."""
        try:
            return self.policy.allows(parse_url(url))
        except FetchError:
            return False

    def seeds(self) -> list[str]:
        """Return the start URLs of the allowlist (a bare host becomes http://host/)."""
        return [entry.seed() for entry in self.policy.entries]

    async def _async_wait_turn(self, url: URL) -> None:
        host = host_key(url)
        wait = self._limiter.reserve(host)
        if wait is None:
            raise FetchError(
                f"too many requests are already waiting for {host} (iris.host_rate_rps = {self.config.host_rate_rps:g})",
                reason="timeout",
                url=_shown(url),
            )
        if wait > 0:
            log.debug("iris_rate_wait", host=host, wait_s=round(wait, 3))
            await asyncio.sleep(wait)

    # -------------------------------------------------------------------------- robots.txt

    def _robots_cached(self, url: URL) -> bool | None:
        """Tell from the cache alone whether robots.txt allows URL; None when its origin is not cached."""
        rules = self._robots.get(origin_of(url))
        return None if rules is None else rules.allows(url.raw_path_qs)

    async def _async_robots_allow(self, session: aiohttp.ClientSession, url: URL) -> bool:
        origin = origin_of(url)
        rules = self._robots.get(origin)
        if rules is None:
            lock = self._robots_locks.get(origin)
            if lock is None:
                lock = self._robots_locks[origin] = asyncio.Lock()
            async with lock:  # one robots.txt request per origin, however many fetches wait for it
                rules = self._robots.get(origin)
                if rules is None:
                    rules = await self._async_load_robots(session, url)
                    self._robots.put(origin, rules)
        return rules.allows(url.raw_path_qs)

    async def _async_load_robots(self, session: aiohttp.ClientSession, page: URL) -> RobotsRules:
        """Fetch and parse the robots.txt that governs PAGE; RFC 9309 §2.3.1 says what a failure means."""
        url = page.with_path(ROBOTS_PATH).with_query(None)
        home = origin_of(page)
        for _hop in range(self.config.max_redirects + 1):
            if origin_of(url) != home and not self.policy.allows(url):
                log.info("iris_robots_redirect_refused", url=_shown(url), origin=home)
                return DISALLOW_ALL  # we may not read it, so we cannot know: assume the worst
            await self._async_wait_turn(url)  # a full queue is our limit, not the site's: raised, never cached
            try:
                async with session.get(url, allow_redirects=False, timeout=self._timeout) as resp:
                    if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
                        resp.close()
                        url = resolve_location(url, resp.headers["Location"])
                        continue
                    ruled = rules_for_status(resp.status)
                    if ruled is not None:
                        resp.close()
                        log.info("iris_robots_status", origin=home, status=resp.status, allow_all=ruled is ALLOW_ALL)
                        return ruled
                    body, more = await _async_read_capped(resp, ROBOTS_MAX_BYTES)
                    if more:
                        resp.close()
            except FetchError as err:
                log.info("iris_robots_unreachable", origin=home, error=str(err))
                return DISALLOW_ALL
            except (TimeoutError, aiohttp.ClientError) as err:  # unreachable: RFC 9309 §2.3.1.4, disallow all
                log.info("iris_robots_unreachable", origin=home, error=repr(err))
                return DISALLOW_ALL
            text = decode_robots(body, truncated=more)
            rules = await asyncio.to_thread(parse_robots, text, PRODUCT_TOKEN)
            log.debug("iris_robots_loaded", origin=home, rules=len(rules.rules), bytes=len(body))
            return rules
        log.info("iris_robots_redirects", origin=home)
        return ALLOW_ALL  # RFC 9309 §2.3.1.2: past the redirect limit robots.txt MAY be taken as unavailable

    # -------------------------------------------------------------------------- fetch

    async def async_fetch(self, url: str, *, accept: Collection[str] = TEXT_TYPES) -> FetchedPage:
        """Fetch URL following allowed redirects; raise FetchError naming the URL and the problem."""
        return await self._async_fetch_counted(url, accept, visited=None)

    async def _async_fetch_counted(self, url: str, accept: Collection[str], visited: Collection[str] | None) -> FetchedPage:
        session = self._require_session()
        wanted = frozenset(str(a).strip().lower() for a in accept)
        if not wanted:
            raise ValidationError("accept must name at least one content type", param="accept")
        try:
            page = await self._async_fetch(session, url, wanted, visited)
        except FetchError as err:
            self.fetches[err.reason] += 1
            if err.reason == "robots":
                self.robots_blocked_total += 1
            log.info("iris_fetch_failed", url=_shown(url), reason=err.reason, error=str(err))
            raise
        self.fetches["ok"] += 1
        self.bytes_total += len(page.body)
        log.debug("iris_fetched", url=_shown(url), final_url=_shown(page.final_url), bytes=len(page.body), content_type=page.content_type)
        return page

    async def _async_fetch(
        self, session: aiohttp.ClientSession, asked: str, accept: frozenset[str], visited: Collection[str] | None
    ) -> FetchedPage:
        target = parse_url(asked)
        for hop in range(self.config.max_redirects + 1):
            shown = _shown(target)
            if hop and visited is not None and str(target) in visited:
                raise _AlreadyVisited(target)
            if not self.policy.allows(target):
                where = "the Iris allowlist (iris.urls)" if not self.policy.allow_internet else "the Iris policy"
                raise FetchError(f"{shown} is not in {where}", reason="not_allowed", url=shown)
            try:
                robots_ok = await self._async_robots_allow(session, target)
            except FetchError as err:  # the robots.txt request itself was refused (too many waiting)
                raise FetchError(f"robots.txt for {shown} could not be read: {err}", reason=err.reason, url=shown) from err
            if not robots_ok:
                log.info("iris_robots_blocked", url=shown, host=target.raw_host)
                raise FetchError(f"robots.txt of {origin_of(target)} disallows {shown}", reason="robots", url=shown)
            result = await self._async_request(session, target, accept, asked)
            if isinstance(result, FetchedPage):
                return result
            log.debug("iris_redirect", url=shown, location=_shown(result))
            target = result
        raise FetchError(
            f"{_shown(asked)} redirected more than {self.config.max_redirects} times (iris.max_redirects)",
            reason="redirects",
            url=_shown(asked),
        )

    async def _async_request(self, session: aiohttp.ClientSession, url: URL, accept: frozenset[str], asked: str) -> FetchedPage | URL:
        """GET one URL: its page, or where it redirects to."""
        shown = _shown(url)
        await self._async_wait_turn(url)
        limit = self.config.max_bytes
        try:
            async with session.get(url, allow_redirects=False, headers={"Accept": ", ".join(sorted(accept))}) as resp:
                if resp.status in REDIRECT_STATUSES:
                    resp.close()
                    location = resp.headers.get("Location")
                    if not location:
                        raise FetchError(f"{shown} answered HTTP {resp.status} without a Location", reason="http_status", url=shown)
                    return resolve_location(url, location)
                if not 200 <= resp.status < 300:
                    resp.close()
                    raise FetchError(f"{shown} answered HTTP {resp.status}", reason="http_status", url=shown, http_status=resp.status)
                kind, charset = content_type_of(resp.headers.get("Content-Type", ""))
                if kind not in accept:
                    resp.close()
                    raise FetchError(
                        f"{shown} has content type {kind or 'none'!r}, not one of {', '.join(sorted(accept))}",
                        reason="content_type",
                        url=shown,
                    )
                if resp.content_length is not None and resp.content_length > limit:
                    resp.close()
                    raise FetchError(
                        f"{shown} is {resp.content_length} bytes, over iris.max_bytes ({limit})", reason="too_large", url=shown
                    )
                body, more = await _async_read_capped(resp, limit)
                if more:
                    resp.close()
                    raise FetchError(f"{shown} is larger than iris.max_bytes ({limit} bytes)", reason="too_large", url=shown)
                return FetchedPage(
                    url=asked,
                    final_url=str(url),
                    status=resp.status,
                    content_type=kind,
                    charset=charset,
                    body=body,
                    fetched_at=time.time(),
                )
        except TimeoutError as err:  # aiohttp's timeouts are TimeoutErrors (and ClientErrors): first
            raise FetchError(
                f"{shown} did not answer within {self.config.timeout_s:g} s (iris.timeout_s)", reason="timeout", url=shown
            ) from err
        except aiohttp.ClientError as err:
            raise FetchError(f"{shown} could not be fetched: {type(err).__name__}: {err}", reason="network", url=shown) from err

    # -------------------------------------------------------------------------- search

    async def async_search(self, query: str, *, limit: int = 5) -> list[SearchHit]:
        """Search the configured SearxNG; keep only results the policy allows ([] when none is configured)."""
        if not isinstance(query, str) or not query.strip():
            raise ValidationError("query must be a non-empty string", param="query")
        if len(query) > MAX_SEARCH_QUERY_CHARS:
            raise ValidationError(f"query is too long ({len(query)} characters; at most {MAX_SEARCH_QUERY_CHARS})", param="query")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise ValidationError(f"limit must be an integer between 1 and {MAX_SEARCH_LIMIT}", param="limit")
        if self._searxng is None:
            return []
        session = self._require_session()
        url = self._searxng.with_query({"q": clean_text(query.strip()), "format": "json"})
        try:
            hits = await self._async_search(session, url, limit)
        except FetchError as err:
            self.searches[err.reason] += 1
            log.warning("iris_search_failed", url=_shown(self._searxng), reason=err.reason, error=str(err))
            raise
        self.searches["ok"] += 1
        log.debug("iris_searched", url=_shown(self._searxng), hits=len(hits))
        return hits

    async def _async_search(self, session: aiohttp.ClientSession, url: URL, limit: int) -> list[SearchHit]:
        # The configured instance is called as an API, not crawled: its robots.txt (SearxNG's own
        # disallows /search for every agent) does not apply; its rate limit does.
        shown = _shown(url.with_query(None))
        await self._async_wait_turn(url)
        try:
            async with session.get(url, allow_redirects=False, headers={"Accept": JSON_TYPE}) as resp:
                if resp.status != 200:
                    resp.close()
                    raise FetchError(
                        f"SearxNG at {shown} answered HTTP {resp.status}", reason="http_status", url=shown, http_status=resp.status
                    )
                kind, _ = content_type_of(resp.headers.get("Content-Type", ""))
                if kind != JSON_TYPE:
                    resp.close()
                    raise FetchError(
                        f"SearxNG at {shown} answered {kind or 'no content type'!r}, not JSON (is format=json enabled in its settings?)",
                        reason="content_type",
                        url=shown,
                    )
                body, more = await _async_read_capped(resp, self.config.max_bytes)
                if more:
                    resp.close()
                    raise FetchError(f"SearxNG at {shown} answered more than iris.max_bytes", reason="too_large", url=shown)
        except TimeoutError as err:
            raise FetchError(f"SearxNG at {shown} did not answer within {self.config.timeout_s:g} s", reason="timeout", url=shown) from err
        except aiohttp.ClientError as err:
            raise FetchError(f"SearxNG at {shown} could not be reached: {type(err).__name__}: {err}", reason="network", url=shown) from err
        try:
            data = await asyncio.to_thread(_parse_json, body)
        except ValueError as err:
            raise FetchError(f"SearxNG at {shown} answered invalid JSON: {err}", reason="network", url=shown) from err
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list):
            raise FetchError(f"SearxNG at {shown} answered JSON without a results list", reason="network", url=shown)
        return self._hits(results, limit)

    def _hits(self, results: list[Any], limit: int) -> list[SearchHit]:
        """Turn SearxNG results into hits the policy allows, deduplicated, at most LIMIT (pure)."""
        hits: list[SearchHit] = []
        seen: set[str] = set()
        for item in results[:MAX_SEARCH_SCANNED]:
            if not isinstance(item, dict):
                continue
            try:
                url = parse_url(item.get("url"))
            except FetchError:
                continue
            if str(url) in seen or not self.policy.allows(url):
                continue
            seen.add(str(url))
            hits.append(
                SearchHit(
                    url=str(url), title=_clean(item.get("title"), MAX_TITLE_CHARS), snippet=_clean(item.get("content"), MAX_SNIPPET_CHARS)
                )
            )
            if len(hits) >= limit:
                break
        return hits

    # -------------------------------------------------------------------------- crawl

    async def async_crawl(self, seeds: Sequence[str], *, max_pages: int) -> AsyncIterator[FetchedPage]:
        """Yield up to MAX_PAGES pages, breadth-first from SEEDS, following links within each seed's origin.

        Each URL is fetched at most once; robots.txt and the policy apply to every one; a page
        that fails is logged and skipped.
        """
        if isinstance(max_pages, bool) or not isinstance(max_pages, int) or not 1 <= max_pages <= MAX_CRAWL_PAGES:
            raise ValidationError(f"max_pages must be an integer between 1 and {MAX_CRAWL_PAGES}", param="max_pages")
        self._require_session()
        frontier: deque[tuple[URL, str]] = deque()
        seen: set[str] = set()
        for seed in ([seeds] if isinstance(seeds, str) else list(seeds))[:MAX_CRAWL_SEEDS]:
            try:
                url = parse_url(seed)
            except FetchError as err:
                log.info("iris_crawl_seed_skipped", url=_shown(seed), error=str(err))
                continue
            if str(url) not in seen:
                seen.add(str(url))
                frontier.append((url, origin_of(url)))
        pages = attempts = 0
        while frontier and pages < max_pages and attempts < max_pages * CRAWL_ATTEMPTS_PER_PAGE:
            url, origin = frontier.popleft()
            attempts += 1
            try:
                page = await self._async_fetch_counted(str(url), TEXT_TYPES, visited=seen)
            except FetchError as err:
                log.info("iris_crawl_page_skipped", url=_shown(url), reason=err.reason)
                continue
            except _AlreadyVisited as dup:
                log.debug("iris_crawl_duplicate", url=_shown(url), final_url=_shown(dup.url))
                continue
            final = parse_url(page.final_url)
            seen.add(str(final))
            if page.content_type in HTML_TYPES and origin_of(final) == origin:
                links = await asyncio.to_thread(extract_links, page.body, page.charset, final)
                for link in links:
                    key = str(link)
                    if key in seen or origin_of(link) != origin or not self.policy.allows(link):
                        continue
                    if self._robots_cached(link) is False:
                        self.robots_blocked_total += 1  # known disallowed: not even queued
                        seen.add(key)
                        continue
                    if len(frontier) >= MAX_CRAWL_FRONTIER:
                        break
                    seen.add(key)
                    frontier.append((link, origin))
            pages += 1
            yield page

    # -------------------------------------------------------------------------- metrics

    def metrics(self) -> Iterable[tuple[str, str, str, float, dict[str, str]]]:
        """Pull-time samples for Metrics.add_source."""
        for outcome in ("ok", *REASONS):
            yield (
                "mongarsd_iris_fetches_total",
                "counter",
                "Iris page fetches by outcome.",
                float(self.fetches[outcome]),
                {"outcome": outcome},
            )
        for outcome in ("ok", *REASONS):
            yield (
                "mongarsd_iris_searches_total",
                "counter",
                "Iris SearxNG searches by outcome.",
                float(self.searches[outcome]),
                {"outcome": outcome},
            )
        yield ("mongarsd_iris_robots_blocked_total", "counter", "Fetches refused by robots.txt.", float(self.robots_blocked_total), {})
        yield ("mongarsd_iris_bytes_total", "counter", "Body bytes fetched by Iris.", float(self.bytes_total), {})


def _searxng_endpoint(text: str) -> URL:
    """Return the JSON search endpoint of a configured SearxNG base URL (pure; ConfigError)."""
    try:
        base = parse_url(text)
    except FetchError as err:
        raise ConfigError(f"iris.searxng_url: {err}") from err
    if base.query_string:
        raise ConfigError(f"iris.searxng_url: {_shown(text)!r} must not carry a query")
    path = base.path.rstrip("/")
    return base.with_path(path if path.endswith("/search") else path + "/search")


def _parse_json(body: bytes) -> Any:
    """Decode a JSON body. Blocking (CPU-bound on a large answer): run it through asyncio.to_thread."""
    try:
        return json.loads(body, parse_int=bounded_int)
    except RecursionError as err:
        raise ValueError("nested too deeply") from err


async def _async_read_capped(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Return the first LIMIT bytes of a body and whether more followed (holds at most LIMIT + 1 bytes)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = await resp.content.read(min(READ_CHUNK_BYTES, limit + 1 - total))
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            return b"".join(chunks)[:limit], True
