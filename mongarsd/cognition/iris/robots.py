"""robots.txt (RFC 9309): parse a file into rules, decide whether a path may be fetched, cache per origin.

Everything here is pure (the cache takes its clock as an argument); the fetcher does the I/O.
"""

from __future__ import annotations

import re
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

PRODUCT_TOKEN: Final = "mongarsd"  # the name our group is looked up by (RFC 9309 §2.2.1)
ROBOTS_PATH: Final = "/robots.txt"
ROBOTS_MAX_BYTES: Final = 500 * 1024  # RFC 9309 §2.5: parse at least the first 500 KiB, ignore the rest
MAX_ROBOTS_ORIGINS: Final = 256  # origins whose rules are cached (least recently used dropped first)
UNREACHABLE_TTL_S: Final = 300.0  # how long an unreachable robots.txt keeps a site closed
MAX_PATTERN_CHARS: Final = 2048  # a longer rule cannot match any URL we would request: dropped

_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Printable ASCII stays as written; anything else (controls, space, non-ASCII) is percent-encoded.
_PRINTABLE_ASCII: Final = "".join(chr(c) for c in range(0x21, 0x7F))
_PERCENT_RE: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_STARS_RE: Final = re.compile(r"\*+")


def _unescape_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def normalise_path(path: str) -> str:
    """Put a path (or rule pattern) in the form RFC 9309 §2.2.2 compares (pure).

    Non-ASCII characters are percent-encoded as UTF-8, escapes of unreserved characters are
    decoded and other escapes upper-cased, so `/%7Ea` and `/~a` compare equal but `/a%2Fb`
    and `/a/b` do not.
    """
    quoted = urllib.parse.quote(path, safe=_PRINTABLE_ASCII)
    return _PERCENT_RE.sub(_unescape_unreserved, quoted)


def pattern_matches(pattern: str, path: str) -> bool:
    """Tell whether a normalised rule PATTERN matches the start of PATH (pure).

    `*` matches any sequence of characters and a final `$` anchors the end (RFC 9309 §2.2.3).
    Runs in O(len(pattern) * len(path)) whatever the number of stars (no regex backtracking).
    """
    anchored = pattern.endswith("$")
    if anchored:
        pattern = pattern[:-1]
    parts = pattern.split("*")
    first, rest = parts[0], parts[1:]
    if not path.startswith(first):
        return False
    if not rest:
        return not anchored or len(path) == len(first)
    pos = len(first)
    *middle, last = rest
    for part in middle:
        found = path.find(part, pos)
        if found < 0:
            return False
        pos = found + len(part)
    if anchored:
        # the last piece must end the path, after everything matched so far
        return len(path) - len(last) >= pos and path.endswith(last)
    return path.find(last, pos) >= 0


@dataclass(frozen=True, slots=True)
class Rule:
    allow: bool
    pattern: str  # normalised; its length is the rule's priority (RFC 9309 §2.2.2: longest match)


@dataclass(frozen=True, slots=True)
class RobotsRules:
    """The rules that apply to us on one origin."""

    rules: tuple[Rule, ...] = ()
    disallow_all: bool = False  # robots.txt was unreachable (5xx, network): nothing may be fetched

    def allows(self, path: str) -> bool:
        """Tell whether PATH (path and query, as sent on the wire) may be fetched (pure)."""
        target = normalise_path(path or "/")
        if target == ROBOTS_PATH:
            return True  # RFC 9309 §2.2.2: /robots.txt itself is always allowed
        if self.disallow_all:
            return False
        best: Rule | None = None
        for rule in self.rules:
            if best is not None and len(rule.pattern) < len(best.pattern):
                continue
            if not pattern_matches(rule.pattern, target):
                continue
            # the longest match wins; on a tie, Allow wins (RFC 9309 §2.2.2 "SHOULD")
            if best is None or len(rule.pattern) > len(best.pattern) or (rule.allow and not best.allow):
                best = rule
        return True if best is None else best.allow


ALLOW_ALL: Final = RobotsRules()
DISALLOW_ALL: Final = RobotsRules(disallow_all=True)


def _agent_token(value: str) -> str:
    """Return the product token of a user-agent line's value ("Mongarsd/1.0 (x)" -> "mongarsd") (pure)."""
    token = value.strip().split(None, 1)[0] if value.strip() else ""
    return token.split("/", 1)[0].lower()


def _pattern(value: str) -> str | None:
    """Normalise a rule's value into a pattern; None for an empty rule, which matches nothing (pure)."""
    value = value.strip()
    if not value:
        return None  # "Disallow:" with no path: RFC 9309 §2.2.2, no rule
    if not value.startswith(("/", "*")):
        value = "/" + value  # a pattern that forgot its leading slash
    value = _STARS_RE.sub("*", normalise_path(value))
    if len(value) > MAX_PATTERN_CHARS:
        return None
    return value


def parse_robots(text: str, product: str = PRODUCT_TOKEN) -> RobotsRules:
    """Return the rules of the group for PRODUCT, else of the `*` group, else allow everything (pure).

    Groups naming the same agent are merged (RFC 9309 §2.2.1); rules before any user-agent
    line and unknown keys (sitemap, crawl-delay) are ignored.
    """
    product = product.lower()
    groups: list[tuple[set[str], list[Rule]]] = []
    agents: set[str] | None = None
    rules: list[Rule] = []
    in_rules = False
    for raw in text.lstrip("\ufeff").splitlines():
        line = raw.split("#", 1)[0].strip()
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "user-agent":
            if agents is None or in_rules:
                agents, rules = set(), []
                groups.append((agents, rules))
                in_rules = False
            agents.add(_agent_token(value))
        elif key in ("allow", "disallow"):
            if agents is None:
                continue
            in_rules = True
            pattern = _pattern(value)
            if pattern is not None:
                rules.append(Rule(allow=key == "allow", pattern=pattern))
    for wanted in (product, "*"):
        chosen = [rule for names, group in groups if wanted in names for rule in group]
        if chosen or any(wanted in names for names, _ in groups):
            return RobotsRules(tuple(chosen))
    return ALLOW_ALL


def rules_for_status(status: int) -> RobotsRules | None:
    """Return what a robots.txt answer with STATUS means when it has no file to parse; None for 2xx (pure).

    RFC 9309 §2.3.1: 4xx "unavailable" allows everything, 5xx "unreachable" disallows
    everything. 429 is read as unreachable: the server asks us to slow down, not to go ahead.
    """
    if 200 <= status < 300:
        return None
    if 400 <= status < 500 and status != 429:
        return ALLOW_ALL
    return DISALLOW_ALL


def decode_robots(body: bytes, *, truncated: bool) -> str:
    """Decode a robots.txt body as UTF-8 (RFC 9309 §2.3); a TRUNCATED one loses its partial last line (pure)."""
    text = body.decode("utf-8", errors="replace")
    if truncated:
        cut = max(text.rfind("\n"), text.rfind("\r"))
        text = text[: cut + 1] if cut >= 0 else ""
    return text


class RobotsCache:
    """Rules per origin for `ttl_s`, least recently used dropped past `max_origins` (loop-only)."""

    def __init__(self, *, ttl_s: float, clock: Callable[[], float], max_origins: int = MAX_ROBOTS_ORIGINS) -> None:
        self.ttl_s = ttl_s
        self.max_origins = max_origins
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, RobotsRules]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, origin: str) -> RobotsRules | None:
        """Return the fresh rules of ORIGIN, or None when absent or expired."""
        entry = self._entries.get(origin)
        if entry is None:
            return None
        expires_at, rules = entry
        if self._clock() >= expires_at:
            del self._entries[origin]
            return None
        self._entries.move_to_end(origin)
        return rules

    def put(self, origin: str, rules: RobotsRules) -> None:
        # An unreachable site (DISALLOW_ALL) is asked again sooner: a board that booted before
        # the LAN was up should not stay blind to its sources for the whole TTL.
        ttl = min(self.ttl_s, UNREACHABLE_TTL_S) if rules is DISALLOW_ALL else self.ttl_s
        self._entries[origin] = (self._clock() + ttl, rules)
        self._entries.move_to_end(origin)
        while len(self._entries) > self.max_origins:
            self._entries.popitem(last=False)
