"""Client for a Mastodon-compatible API: `POST {instance}/api/v1/statuses` with a bearer token.

Every try of one post carries the same `Idempotency-Key` header, so an instance that already
created the status (the answer was lost: a timeout, a dropped connection) returns that status
again instead of posting twice (Mastodon keeps keys for an hour). Server errors (5xx), timeouts
and network errors are tried again a bounded number of times with capped exponential backoff;
4xx answers are final and reported with the instance's `{"error": ...}` text. No message or log
line ever holds the token: any text from the network is scrubbed of it before it is shown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
import structlog

from mongarsd import __version__
from mongarsd.errors import ValidationError

log = structlog.get_logger("mongarsd.social")

STATUSES_PATH: Final = "/api/v1/statuses"
VISIBILITIES: Final = ("public", "unlisted", "private", "direct")
MAX_ATTEMPTS: Final = 3  # tries of one post (the first plus two retries), all with the same key
RETRY_BACKOFF_S: Final = 0.5  # wait before the second try; doubles each time
RETRY_BACKOFF_MAX_S: Final = 4.0
MAX_RESPONSE_BYTES: Final = 1 << 20  # a status is a few KiB of JSON
MAX_ERROR_CHARS: Final = 300  # of the instance's error text shown to the caller
MAX_IDEMPOTENCY_KEY_CHARS: Final = 128
MAX_SPOILER_CHARS: Final = 1000
READ_CHUNK_BYTES: Final = 64 * 1024
# ISO 639-1 (two letters) or 639-3 (three), as Mastodon accepts.
LANGUAGE_RE: Final = re.compile(r"[a-z]{2,3}")
# It travels in an HTTP header: visible ASCII only.
IDEMPOTENCY_KEY_RE: Final = re.compile(r"[\x21-\x7e]{1," + str(MAX_IDEMPOTENCY_KEY_CHARS) + "}")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]+")

Sleep = Callable[[float], Awaitable[None]]


class SocialPostError(ValidationError):
    """The instance refused a post or could not be reached.

    A ValidationError with a gateway status (502, or 504 for a timeout) so every surface answers it
    in its error shape. `retryable` is True when a later try can succeed (5xx, timeout, network):
    the breaker counts those, not 4xx answers (the instance is up, it refused the request).
    """

    def __init__(self, message: str, *, status: int = 502, upstream_status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message, param="account", status=status)
        self.upstream_status = upstream_status
        self.retryable = retryable


@dataclasses.dataclass(frozen=True, slots=True)
class StatusDraft:
    """A validated status to post."""

    text: str
    visibility: str = "public"
    spoiler_text: str | None = None
    language: str | None = None

    def payload(self) -> dict[str, str]:
        body = {"status": self.text, "visibility": self.visibility}
        if self.spoiler_text:
            body["spoiler_text"] = self.spoiler_text
        if self.language:
            body["language"] = self.language
        return body

    def fingerprint(self) -> str:
        """Hash of what is posted: one idempotency key may not stand for two different posts (pure)."""
        canonical = json.dumps(self.payload(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class PostedStatus:
    """What the instance answered for a created status."""

    id: str
    url: str | None
    created_at: str | None


def validate_draft(
    text: object,
    *,
    visibility: object = None,
    spoiler_text: object = None,
    language: object = None,
    max_chars: int,
) -> StatusDraft:
    """Check a status against the account's length limit and Mastodon's fields (pure).

    Length is counted in characters, status and content warning together, as Mastodon does
    (it counts each link as 23; counting links whole is stricter, never looser).
    """
    if not isinstance(text, str):
        raise ValidationError("'status' must be a string", param="status")
    if not text.strip():
        raise ValidationError("'status' must not be empty", param="status")
    if "\x00" in text:
        raise ValidationError("'status' must not contain NUL characters", param="status")
    vis = "public" if visibility is None else visibility
    if vis not in VISIBILITIES:
        raise ValidationError(f"'visibility' must be one of {', '.join(VISIBILITIES)}", param="visibility")
    spoiler: str | None = None
    if spoiler_text is not None:
        if not isinstance(spoiler_text, str) or "\x00" in spoiler_text:
            raise ValidationError("'spoiler_text' must be a string without NUL characters", param="spoiler_text")
        if len(spoiler_text) > MAX_SPOILER_CHARS:
            raise ValidationError(
                f"'spoiler_text' is too long ({len(spoiler_text)} characters; at most {MAX_SPOILER_CHARS})", param="spoiler_text"
            )
        spoiler = spoiler_text or None
    lang: str | None = None
    if language is not None:
        if not isinstance(language, str) or not LANGUAGE_RE.fullmatch(language):
            raise ValidationError("'language' must be an ISO 639 code of 2 or 3 lower-case letters, e.g. 'en' or 'fr'", param="language")
        lang = language
    total = len(text) + len(spoiler or "")
    if total > max_chars:
        what = "status and content warning together are" if spoiler else "status is"
        raise ValidationError(f"the {what} {total} characters; this account allows at most {max_chars}", param="status")
    return StatusDraft(text=text, visibility=str(vis), spoiler_text=spoiler, language=lang)


def validate_idempotency_key(key: object, *, param: str = "idempotency_key") -> str:
    """Return a caller's idempotency key, or raise naming what is wrong with it (pure)."""
    if not isinstance(key, str) or not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise ValidationError(
            f"'{param}' must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII characters (no spaces), e.g. a UUID",
            param=param,
        )
    return key


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def scrub(text: str, token: str) -> str:
    """Remove the token (should an instance echo it) and control characters; shorten (pure)."""
    if token:
        text = text.replace(token, "[token]")
    text = _CONTROL_RE.sub(" ", text).strip()
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


def backoff_s(attempt: int, base_s: float) -> float:
    """Wait after failed try number `attempt` (1-based): base, 2*base, 4*base... capped (pure)."""
    return float(min(RETRY_BACKOFF_MAX_S, base_s * 2.0 ** (attempt - 1)))


class _Retry(Exception):
    """One try failed in a way another try may fix."""

    def __init__(self, reason: str, *, timeout: bool = False, upstream_status: int | None = None) -> None:
        super().__init__(reason)
        self.timeout = timeout
        self.upstream_status = upstream_status


def _error_text(body: bytes, token: str) -> str:
    """The instance's `{"error": ...}` message, else the start of its body, scrubbed (pure)."""
    text = body.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except ValueError:
        return scrub(text, token)
    if isinstance(doc, dict):
        err = doc.get("error")
        desc = doc.get("error_description")
        if isinstance(err, str) and isinstance(desc, str) and desc != err:
            return scrub(f"{err}: {desc}", token)
        if isinstance(err, str):
            return scrub(err, token)
    return scrub(text, token)


def _parse_status(body: bytes) -> PostedStatus:
    """Read id, url and created_at from a status; raise ValueError when it is not one (pure)."""
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("the answer is not a JSON object")
    sid = doc.get("id")
    if isinstance(sid, bool) or not isinstance(sid, str | int) or not str(sid):
        raise ValueError("the answer has no status id")
    url = doc.get("url") or doc.get("uri")
    created = doc.get("created_at")
    return PostedStatus(
        id=str(sid)[:200],
        url=url[: MAX_ERROR_CHARS * 4] if isinstance(url, str) else None,
        created_at=created[:64] if isinstance(created, str) else None,
    )


class MastodonClient:
    """Posts statuses over a shared aiohttp session (event loop only)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        timeout_s: float,
        max_attempts: int | None = None,
        retry_backoff_s: float | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._session = session
        self.timeout_s = timeout_s
        self.max_attempts = max(1, MAX_ATTEMPTS if max_attempts is None else max_attempts)
        self.retry_backoff_s = RETRY_BACKOFF_S if retry_backoff_s is None else retry_backoff_s
        self._sleep = sleep

    async def async_post_status(self, *, instance: str, token: str, draft: StatusDraft, idempotency_key: str) -> PostedStatus:
        """Post one status, trying again on 5xx/timeouts/network errors with the same key; raise SocialPostError."""
        last: _Retry | None = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                return await self._async_try(instance=instance, token=token, draft=draft, idempotency_key=idempotency_key)
            except _Retry as err:
                last = err
                log.warning(
                    "social_post_try_failed",
                    instance=instance,
                    attempt=attempt,
                    of=self.max_attempts,
                    error=str(err),
                    idempotency_key=idempotency_key,
                )
            if attempt < self.max_attempts:
                await self._sleep(backoff_s(attempt, self.retry_backoff_s))
        assert last is not None
        raise self._gave_up(instance, last)

    def _gave_up(self, instance: str, last: _Retry) -> SocialPostError:
        tries = f"{self.max_attempts} tr{'y' if self.max_attempts == 1 else 'ies'}"
        return SocialPostError(
            f"could not post to {instance} after {tries}: {last}; the same idempotency key is safe to retry with",
            status=504 if last.timeout else 502,
            upstream_status=last.upstream_status,
            retryable=True,
        )

    async def _async_try(self, *, instance: str, token: str, draft: StatusDraft, idempotency_key: str) -> PostedStatus:
        headers = {
            "Authorization": "Bearer " + token,
            "Idempotency-Key": idempotency_key,
            "Accept": "application/json",
            "User-Agent": "mongarsd/" + __version__,
        }
        try:
            # One bound for the whole try: connect, send, wait for and read the answer.
            async with asyncio.timeout(self.timeout_s):
                async with self._session.post(
                    instance + STATUSES_PATH, json=draft.payload(), headers=headers, allow_redirects=False
                ) as resp:
                    status = resp.status
                    location = resp.headers.get("Location", "")
                    retry_after = resp.headers.get("Retry-After") or resp.headers.get("X-RateLimit-Reset") or ""
                    body, whole = await self._async_read_capped(resp)
        except TimeoutError:
            raise _Retry(f"no answer within {self.timeout_s:g} s", timeout=True) from None
        except aiohttp.ClientError as err:  # refused, reset, dropped, bad answer framing: worth another try
            raise _Retry(scrub(f"{type(err).__name__}: {err}", token)) from None
        if 200 <= status < 300:
            if not whole:
                raise _Retry(f"the answer is larger than {MAX_RESPONSE_BYTES} bytes", upstream_status=status)
            try:
                return _parse_status(body)
            except ValueError as err:
                # The status may exist: another try with the same key returns it.
                raise _Retry(f"the instance answered HTTP {status} but not with a status ({err})", upstream_status=status) from None
        if status >= 500:
            raise _Retry(f"HTTP {status}: {_error_text(body, token)}", upstream_status=status)
        if 300 <= status < 400:
            raise SocialPostError(
                f"{instance} answered HTTP {status}, a redirect to {scrub(location, token)!r}: register the account "
                "with the instance's final base URL (the token is never sent on to another address)",
                upstream_status=status,
            )
        hint = ""
        if status in (401, 403):
            hint = "; check the account's token (replace it with `mongarsd social add NAME --instance URL --replace`)"
        elif status == 429:
            hint = "; the instance rate-limits this account"
            if retry_after:
                hint += f" (retry after {scrub(retry_after, token)})"
        raise SocialPostError(f"{instance} refused the post (HTTP {status}): {_error_text(body, token)}{hint}", upstream_status=status)

    @staticmethod
    async def _async_read_capped(resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        """Read at most MAX_RESPONSE_BYTES of the answer; say whether that was all of it."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(READ_CHUNK_BYTES):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                return b"".join(chunks)[:MAX_RESPONSE_BYTES], False
        return b"".join(chunks), True
