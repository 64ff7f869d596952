"""The `iris_fetch` hand: the persona reads an allowlisted page through Iris (title and text)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from mongarsd.cognition.hands import LOCAL_ROLES, MAX_RESULT_CHARS, MAX_SCHEMA_MAX_LENGTH, Hand, HandContext
from mongarsd.cognition.iris.extract import extract
from mongarsd.cognition.iris.fetch import Fetcher

IRIS_FETCH: Final = "iris_fetch"
# Kept in the grammar's character set: a small model cannot wander out of a URL.
URL_PATTERN: Final = "^https?://[A-Za-z0-9._~:/?#@!$&'()*+,;=%-]+$"
MAX_URL_ARG_CHARS: Final = MAX_SCHEMA_MAX_LENGTH  # the hands registry refuses longer maxLength (grammar size)
HAND_TIMEOUT_MARGIN_S: Final = 2.0  # extraction after the fetch's own iris.timeout_s
MAX_TITLE_CHARS: Final = 300

_URL_RE: Final = re.compile(URL_PATTERN)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def fit_result(url: str, title: str, text: str, *, budget: int = MAX_RESULT_CHARS) -> dict[str, str]:
    """Return {"url", "title", "text"} with the text shortened so `{"result": ...}` fits BUDGET characters (pure)."""
    result = {"url": url, "title": _shorten(title, MAX_TITLE_CHARS), "text": ""}

    def size(value: dict[str, str]) -> int:
        return len(json.dumps({"result": value}, ensure_ascii=False, separators=(",", ":")))

    room = budget - size(result)
    if room <= 0:
        return result
    keep = min(len(text), room)
    while True:
        # Escapes (quotes, newlines) lengthen the JSON; each pass shortens by at least the overshoot.
        result["text"] = _shorten(text, keep) if keep < len(text) else text
        over = size(result) - budget
        if over <= 0 or keep == 0:
            return result
        keep = max(0, keep - over)


def iris_hand(fetcher: Fetcher) -> Hand:
    """Build the `iris_fetch` hand over FETCHER (local users only: it reaches the network on their behalf)."""

    async def _async_iris_fetch(args: Mapping[str, Any], ctx: HandContext) -> Any:
        url = str(args["url"]).strip()
        if not _URL_RE.fullmatch(url):
            raise ValueError("argument 'url' must be an http:// or https:// URL")
        page = await fetcher.async_fetch(url)
        doc = await asyncio.to_thread(extract, page.body, page.content_type, url=page.final_url, charset=page.charset)
        return fit_result(page.final_url, doc.title, doc.text)

    return Hand(
        name=IRIS_FETCH,
        description="Read a web page from the allowed sources and return its title and text.",
        parameters={
            "type": "object",
            "properties": {"url": {"type": "string", "minLength": 8, "maxLength": MAX_URL_ARG_CHARS, "pattern": URL_PATTERN}},
            "required": ["url"],
            "additionalProperties": False,
        },
        run=_async_iris_fetch,
        timeout_s=fetcher.config.timeout_s + HAND_TIMEOUT_MARGIN_S,
        roles=LOCAL_ROLES,
        aliases=("iris fetch", "fetch this page", "fetch the page", "read this page", "fetch this url", "fetch this link"),
    )
