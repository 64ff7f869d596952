"""SocialService: the vault, the Mastodon client, one circuit breaker per account and a post journal.

A post is made at most once per (account, idempotency key): the journal (social/posts.jsonl, one
JSON object a line, appended with fsync) records every key whose post the instance confirmed,
and a second post with that key answers the recorded status without contacting the instance.
The journal is shared with `mongarsd social post` through the file; this service reads what
other processes appended before each look-up. While an account's breaker is open its posts are
refused at once (UnavailableError naming when the next try is allowed); after the reset timeout
one probe post is let through (mesh/breaker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import structlog

from mongarsd.errors import UnavailableError, ValidationError
from mongarsd.fsutil import atomic_write_private, write_all
from mongarsd.mesh.breaker import BreakerState, CircuitBreaker, Clock
from mongarsd.social.mastodon import (
    MastodonClient,
    SocialPostError,
    new_idempotency_key,
    validate_draft,
    validate_idempotency_key,
)
from mongarsd.social.vault import AccountInfo, Vault, VaultError, file_lock, validate_name

if TYPE_CHECKING:
    from mongarsd.config import SocialConfig
    from mongarsd.metrics import Metrics, Sample

log = structlog.get_logger("mongarsd.social")

JOURNAL_FILE: Final = "posts.jsonl"
JOURNAL_MAX_ENTRIES: Final = 2000  # keys remembered; the file is compacted beyond twice this
JOURNAL_MAX_READ_BYTES: Final = 8 << 20  # a longer journal is read from its tail only
OUTCOMES: Final = ("posted", "replayed", "failed", "rejected", "refused")
BREAKER_GAUGE: Final = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}
CLOSE_TIMEOUT_S: Final = 2.0


class BreakerOpenError(UnavailableError):
    """Posting to an account is paused by its circuit breaker; `retry_after_s` says for how long."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True, slots=True)
class JournalRecord:
    """A post the instance confirmed, under its idempotency key (never a token)."""

    account: str
    key: str
    fingerprint: str
    id: str
    url: str | None
    created_at: str | None
    posted_at: float

    def result(self, *, replayed: bool) -> dict[str, Any]:
        return {
            "account": self.account,
            "id": self.id,
            "url": self.url,
            "created_at": self.created_at,
            "idempotency_key": self.key,
            "replayed": replayed,
        }

    @classmethod
    def from_json(cls, doc: Any) -> JournalRecord:
        """Build a record from a journal line's object; raise ValueError when it is not one (pure)."""
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        strs = {k: doc.get(k) for k in ("account", "key", "fingerprint", "id")}
        if not all(isinstance(v, str) and v for v in strs.values()):
            raise ValueError("missing fields")
        url, created, posted = doc.get("url"), doc.get("created_at"), doc.get("posted_at")
        if not (url is None or isinstance(url, str)) or not (created is None or isinstance(created, str)):
            raise ValueError("bad url or created_at")
        if isinstance(posted, bool) or not isinstance(posted, int | float):
            raise ValueError("bad posted_at")
        return cls(str(strs["account"]), str(strs["key"]), str(strs["fingerprint"]), str(strs["id"]), url, created, float(posted))


def _line(rec: JournalRecord) -> bytes:
    """One journal line: the record as compact JSON (pure)."""
    return json.dumps(dataclasses.asdict(rec), ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


class PostJournal:
    """Idempotency keys already posted -> their result, kept in memory and in an append-only file.

    Every method but `get` blocks (file I/O, flock): run it in a thread. A lock guards the
    in-memory map, since two threads may refresh and append at once.
    """

    def __init__(self, path: Path, lock_path: Path, *, max_entries: int = JOURNAL_MAX_ENTRIES) -> None:
        self.path = path
        self._lock_path = lock_path
        self._max = max_entries
        self._records: OrderedDict[tuple[str, str], JournalRecord] = OrderedDict()
        self._inode: int | None = None
        self._offset = 0  # bytes of the file read so far
        self._lines = 0  # records in the file (for compaction)
        self._mid_line = False  # the next read starts inside a line (a tail read of a long file)
        self._mutex = threading.Lock()
        self.skipped = 0  # malformed lines ignored

    def get(self, account: str, key: str) -> JournalRecord | None:
        with self._mutex:
            return self._records.get((account, key))

    def __len__(self) -> int:
        return len(self._records)

    def _remember(self, rec: JournalRecord) -> None:
        k = (rec.account, rec.key)
        self._records.pop(k, None)
        self._records[k] = rec
        while len(self._records) > self._max:
            self._records.popitem(last=False)

    def refresh(self) -> None:
        """Read what was appended since the last read (by any process); reread a replaced file."""
        with self._mutex:
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed below; fstat needs the open file
        except FileNotFoundError:
            self._records.clear()
            self._inode, self._offset, self._lines = None, 0, 0
            return
        with fh:
            st = os.fstat(fh.fileno())
            if st.st_ino != self._inode or st.st_size < self._offset:
                self._records.clear()
                self._inode, self._offset, self._lines = st.st_ino, 0, 0
                if st.st_size > JOURNAL_MAX_READ_BYTES:
                    self._offset = st.st_size - JOURNAL_MAX_READ_BYTES
                    self._mid_line = True
            if st.st_size == self._offset:
                return
            fh.seek(self._offset)
            data = fh.read(st.st_size - self._offset)
        start = 0
        if self._mid_line:
            start = data.find(b"\n") + 1  # skip the partial line a tail read begins in
            if start == 0:
                return
        end = data.rfind(b"\n") + 1  # only complete lines; a line being written is read next time
        if end <= start:
            return
        self._mid_line = False
        for line in data[start:end].splitlines():
            if not line.strip():
                continue
            try:
                rec = JournalRecord.from_json(json.loads(line))
            except ValueError:
                self.skipped += 1
                continue
            self._remember(rec)
            self._lines += 1
        self._offset += end

    def append(self, rec: JournalRecord) -> None:
        """Add a record durably (fsync before returning); compact the file when it grew long."""
        line = _line(rec)
        with self._mutex, file_lock(self._lock_path):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, line)
            finally:
                os.close(fd)
            self._remember(rec)
            self._refresh_locked()  # counts our line and any other process's
            if self._lines > 2 * self._max:
                self._compact_locked()

    def _compact_locked(self) -> None:
        atomic_write_private(self.path, b"".join(_line(r) for r in self._records.values()))
        self._inode, self._offset, self._lines = None, 0, 0
        self._refresh_locked()
        log.info("social_journal_compacted", path=str(self.path), records=len(self._records))


class SocialService:
    """Social accounts and posting, with one breaker per account and idempotent posts."""

    name = "social"
    start_timeout_s = 5.0
    stop_timeout_s = 1.0

    def __init__(
        self,
        *,
        config: SocialConfig,
        state_dir: Path,
        metrics: Metrics | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_attempts: int | None = None,
        retry_backoff_s: float | None = None,
    ) -> None:
        self._cfg = config
        self.enabled = bool(config.enabled)
        self.vault = Vault(Path(state_dir), wall_clock=wall_clock)
        self.journal = PostJournal(self.vault.dir / JOURNAL_FILE, self.vault.lock_path)
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_attempts = max_attempts
        self._retry_backoff_s = retry_backoff_s
        self._session: aiohttp.ClientSession | None = None
        self._client: MastodonClient | None = None
        self._breakers: dict[str, CircuitBreaker] = {}
        self._opened_at: dict[str, float] = {}  # account -> clock() when its breaker last opened
        self._key_locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self.posts: Counter[str] = Counter()

    # --- service shape ----------------------------------------------------------------------

    async def async_start(self) -> None:
        if self._session is not None:
            return
        if self.enabled:
            # The token goes only where an account points: no proxies from the environment, no redirects.
            self._session = aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=None))
            self._client = MastodonClient(
                self._session,
                timeout_s=float(self._cfg.timeout_s),
                max_attempts=self._max_attempts,
                retry_backoff_s=self._retry_backoff_s,
            )
        if self._metrics is not None:
            self._metrics.add_source(self.metrics)
        log.info("social_service_started", enabled=self.enabled)

    async def async_stop(self) -> None:
        session, self._session, self._client = self._session, None, None
        if self._metrics is not None:
            self._metrics.remove_source(self.metrics)
        if session is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await session.close()

    # --- accounts ---------------------------------------------------------------------------

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise UnavailableError("social posting is disabled on this daemon (social.enabled = false)")

    async def async_add_account(
        self, name: str, instance: str, token: str, *, max_chars: int | None = None, replace: bool = False
    ) -> tuple[AccountInfo, bool]:
        """Store an account with its token sealed; return it and whether it replaced one."""
        self._require_enabled()
        info, replaced = await asyncio.to_thread(self.vault.add, name, instance, token, max_chars=max_chars, replace=replace)
        if replaced:
            self._forget_breaker(info.name)  # a new token or instance starts with a closed breaker
        return info, replaced

    async def async_list_accounts(self) -> list[dict[str, Any]]:
        """Every account with its breaker state; never a token."""
        self._require_enabled()
        infos = await asyncio.to_thread(self.vault.list)
        return [{**i.public(), "breaker": self.breaker_state(i.name)} for i in infos]

    async def async_remove_account(self, name: str) -> AccountInfo:
        self._require_enabled()
        info = await asyncio.to_thread(self.vault.remove, name)
        self._forget_breaker(info.name)
        return info

    # --- breakers ---------------------------------------------------------------------------

    def breaker(self, account: str) -> CircuitBreaker:
        b = self._breakers.get(account)
        if b is None:
            b = CircuitBreaker(
                failure_threshold=int(self._cfg.failure_threshold), reset_timeout_s=float(self._cfg.reset_timeout_s), clock=self._clock
            )
            self._breakers[account] = b
        return b

    def breaker_state(self, account: str) -> str:
        b = self._breakers.get(account)
        return str(b.state) if b is not None else str(BreakerState.CLOSED)

    def _forget_breaker(self, account: str) -> None:
        self._breakers.pop(account, None)
        self._opened_at.pop(account, None)

    def _refusal(self, account: str, b: CircuitBreaker) -> BreakerOpenError:
        if b.state is BreakerState.HALF_OPEN:
            return BreakerOpenError(
                f"posting to account {account!r} is paused: a trial post is checking whether the instance is back; try again in a moment",
                retry_after_s=1.0,
            )
        opened = self._opened_at.get(account, self._clock())
        wait = max(0.0, opened + b.reset_timeout_s - self._clock())
        at = time.strftime("%H:%M:%S", time.localtime(self._wall_clock() + wait))
        return BreakerOpenError(
            f"posting to account {account!r} is paused after {b.failure_threshold} failed posts in a row; "
            f"the next try is allowed in {math.ceil(wait)} s (at {at})",
            retry_after_s=wait,
        )

    # --- posting ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _async_key_lock(self, account: str, key: str) -> AsyncIterator[None]:
        """Serialise posts with the same account and key (one reaches the instance, the rest replay)."""
        k = (account, key)
        lock, users = self._key_locks.get(k, (asyncio.Lock(), 0))
        self._key_locks[k] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._key_locks[k]
            if users <= 1:
                del self._key_locks[k]
            else:
                self._key_locks[k] = (lock, users - 1)

    async def async_post(
        self,
        account: str,
        text: str,
        *,
        idempotency_key: str | None = None,
        visibility: str | None = None,
        spoiler_text: str | None = None,
        language: str | None = None,
    ) -> dict[str, Any]:
        """Post a status once per idempotency key: {account, id, url, created_at, idempotency_key, replayed}."""
        self._require_enabled()
        client = self._client
        if client is None:
            raise UnavailableError("the social service is not running")
        name = validate_name(account, param="account")
        key = new_idempotency_key() if idempotency_key is None else validate_idempotency_key(idempotency_key)
        creds = await asyncio.to_thread(self.vault.credentials, name)
        draft = validate_draft(text, visibility=visibility, spoiler_text=spoiler_text, language=language, max_chars=creds.account.max_chars)
        fingerprint = draft.fingerprint()
        async with self._async_key_lock(name, key):
            await asyncio.to_thread(self.journal.refresh)
            done = self.journal.get(name, key)
            if done is not None:
                if done.fingerprint != fingerprint:
                    raise ValidationError(
                        f"idempotency key {key!r} was already used for a different post on account {name!r}; use a new key",
                        param="idempotency_key",
                        status=409,
                    )
                self.posts["replayed"] += 1
                log.info("social_post_replayed", account=name, idempotency_key=key, status_id=done.id)
                return done.result(replayed=True)
            b = self.breaker(name)
            if not b.allow():
                self.posts["refused"] += 1
                err = self._refusal(name, b)
                log.warning("social_post_refused", account=name, breaker=str(b.state), retry_after_s=round(err.retry_after_s, 1))
                raise err
            try:
                posted = await client.async_post_status(
                    instance=creds.account.instance, token=creds.token, draft=draft, idempotency_key=key
                )
            except SocialPostError as err:
                self._record_failure(name, b, err)
                raise
            except BaseException:
                b.release()  # cancelled mid-post: no outcome, free the probe
                raise
            b.record_success()
            rec = JournalRecord(name, key, fingerprint, posted.id, posted.url, posted.created_at, round(float(self._wall_clock()), 3))
            try:
                await asyncio.to_thread(self.journal.append, rec)
            except (OSError, VaultError) as err:
                # The status exists; only its replay is at risk (the instance still honours the key for a while).
                log.error("social_journal_write_failed", account=name, idempotency_key=key, error=str(err))
            self.posts["posted"] += 1
            log.info("social_posted", account=name, instance=creds.account.instance, status_id=posted.id, idempotency_key=key)
            return rec.result(replayed=False)

    def _record_failure(self, account: str, b: CircuitBreaker, err: SocialPostError) -> None:
        if err.retryable:
            before = b.opens_total
            b.record_failure()
            if b.opens_total != before:
                self._opened_at[account] = self._clock()
                log.warning("social_breaker_opened", account=account, failures=b.failure_threshold, reset_timeout_s=b.reset_timeout_s)
            self.posts["failed"] += 1
        else:
            b.record_success()  # the instance answered: it is up, it refused this request
            self.posts["rejected"] += 1
        log.warning("social_post_failed", account=account, error=str(err), upstream_status=err.upstream_status, retryable=err.retryable)

    # --- metrics ----------------------------------------------------------------------------

    def metrics(self) -> Iterable[Sample]:
        """Pull-time samples for Metrics.add_source."""
        for outcome in OUTCOMES:
            yield ("mongarsd_social_posts_total", "counter", "Social posts by outcome.", float(self.posts[outcome]), {"outcome": outcome})
        for account, b in list(self._breakers.items()):
            labels = {"account": account}
            yield (
                "mongarsd_social_breaker_state",
                "gauge",
                "Circuit breaker of a social account: 0 closed, 1 half-open, 2 open.",
                BREAKER_GAUGE[b.state],
                labels,
            )
            yield (
                "mongarsd_social_breaker_opens_total",
                "counter",
                "Times a social account's breaker opened.",
                float(b.opens_total),
                labels,
            )
