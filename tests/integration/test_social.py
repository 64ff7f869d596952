"""Social posting against a fake Mastodon instance on 127.0.0.1: once per key, a breaker, no clear token."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import structlog
from aiohttp import web

from mongarsd.api import social as social_api
from mongarsd.api.app import AppContext, create_app
from mongarsd.board import BoardInfo
from mongarsd.config import AuthConfig, Config, LoadedConfig, SocialConfig
from mongarsd.errors import UnavailableError, ValidationError
from mongarsd.memory.db import Database
from mongarsd.memory.tokens import TokenStore
from mongarsd.metrics import Metrics
from mongarsd.social import mastodon
from mongarsd.social.mastodon import SocialPostError
from mongarsd.social.service import BreakerOpenError, SocialService
from tests.conftest import REPO

TOKEN = "fake-Mastodon-TOKEN-9f8e7d6c5b4a3210zyxwvutsrq"
HANG_CAP_S = 30.0  # a hanging fake request never outlives the test
CLIENT_TIMEOUT_S = 0.5

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")


@dataclass
class FakeMastodon:
    """A Mastodon-compatible statuses endpoint that counts and can be told to fail."""

    token: str
    url: str = ""
    requests: int = 0
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_key: dict[tuple[str, str], str] = field(default_factory=dict)
    keys_seen: list[str | None] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    failures: deque[str] = field(default_factory=deque)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def fail_next(self, n: int, mode: str) -> None:
        """Fail the next N requests: '500', 'hang', 'drop', or create the status and then 'lost' (hang) or 'lost_drop'."""
        self.failures.extend([mode] * n)

    @property
    def created(self) -> int:
        return len(self.statuses)

    async def _hang(self) -> None:
        try:
            await asyncio.wait_for(self.release.wait(), HANG_CAP_S)
        except TimeoutError:
            pass

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.keys_seen.append(request.headers.get("Idempotency-Key"))
        mode = self.failures.popleft() if self.failures else None
        if mode == "500":
            return web.json_response({"error": "Internal server error"}, status=500)
        if mode == "hang":
            await self._hang()
            return web.json_response({"error": "too late"}, status=503)
        if mode == "drop":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=204)
        auth = request.headers.get("Authorization", "")
        if auth != "Bearer " + self.token:
            # a careless instance that echoes what it got: the client must not show it
            return web.json_response({"error": f"The access token is invalid ({auth})"}, status=401)
        body = await request.json()
        self.bodies.append(body)
        if not body.get("status"):
            return web.json_response({"error": "Validation failed: Text can't be blank"}, status=422)
        key = request.headers.get("Idempotency-Key")
        existing = self.by_key.get((auth, key)) if key else None
        if existing is not None:
            return web.json_response(self.statuses[existing])
        sid = str(100 + len(self.statuses))
        status = {
            "id": sid,
            "url": f"{self.url}/@bot/{sid}",
            "created_at": "2024-05-01T12:00:00.000Z",
            "content": body["status"],
            "visibility": body.get("visibility", "public"),
        }
        self.statuses[sid] = status
        if key:
            self.by_key[(auth, key)] = sid
        if mode == "lost":
            await self._hang()  # created, but the answer never arrives in time
        elif mode == "lost_drop":
            assert request.transport is not None
            request.transport.abort()  # created, then the connection drops before the answer
            return web.Response(status=204)
        return web.json_response(status)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeMastodon]:
    server = FakeMastodon(TOKEN)
    app = web.Application()
    app.router.add_post("/api/v1/statuses", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.release.set()
    await runner.cleanup()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    service: SocialService
    clock: FakeClock
    state_dir: Path


@pytest_asyncio.fixture
async def harness(tmp_path: Path, fake: FakeMastodon) -> AsyncIterator[Harness]:
    clock = FakeClock()
    svc = SocialService(
        config=SocialConfig(timeout_s=CLIENT_TIMEOUT_S, failure_threshold=2, reset_timeout_s=60.0),
        state_dir=tmp_path / "state",
        clock=clock,
        retry_backoff_s=0.0,
    )
    await svc.async_start()
    await svc.async_add_account("bot", fake.url, TOKEN)
    yield Harness(svc, clock, tmp_path / "state")
    await svc.async_stop()


def _files_with_token(state_dir: Path) -> list[str]:
    """Name the state files that hold the token in clear (blocking: call it in a thread)."""
    return [p.name for p in (state_dir / "social").iterdir() if TOKEN.encode() in p.read_bytes()]


def _modes(state_dir: Path) -> dict[str, int]:
    """Permission bits of the social dir and its files (blocking: call it in a thread)."""
    d = state_dir / "social"
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in (d, *d.iterdir())}


async def _no_clear_token(h: Harness) -> None:
    assert await asyncio.to_thread(_files_with_token, h.state_dir) == []


async def test_a_post_reaches_the_server_exactly_once(harness: Harness, fake: FakeMastodon) -> None:
    out = await harness.service.async_post("bot", "hello fediverse", idempotency_key="k-1", visibility="unlisted")
    assert out["replayed"] is False and out["id"] == "100" and out["url"] == fake.url + "/@bot/100"
    assert out["idempotency_key"] == "k-1" and out["created_at"] == "2024-05-01T12:00:00.000Z"
    assert (fake.requests, fake.created) == (1, 1)
    assert fake.bodies == [{"status": "hello fediverse", "visibility": "unlisted"}]
    # the same key again: answered from the journal, the server is not contacted
    again = await harness.service.async_post("bot", "hello fediverse", idempotency_key="k-1", visibility="unlisted")
    assert again == {**out, "replayed": True}
    assert (fake.requests, fake.created) == (1, 1)
    # the same key for a different post is a conflict, not a silent replay
    with pytest.raises(ValidationError) as err:
        await harness.service.async_post("bot", "something else", idempotency_key="k-1")
    assert err.value.status == 409 and err.value.param == "idempotency_key" and fake.requests == 1
    # without a key each post gets a fresh one
    other = await harness.service.async_post("bot", "second")
    assert other["id"] == "101" and other["idempotency_key"] not in ("k-1", "")
    assert harness.service.posts["posted"] == 2 and harness.service.posts["replayed"] == 1
    await _no_clear_token(harness)


async def test_a_retry_after_a_500_does_not_double_post(harness: Harness, fake: FakeMastodon) -> None:
    fake.fail_next(1, "500")
    out = await harness.service.async_post("bot", "through a hiccup", idempotency_key="k-500")
    assert out["replayed"] is False
    assert fake.requests == 2 and fake.created == 1
    assert fake.keys_seen == ["k-500", "k-500"]  # the retry carried the same key


@pytest.mark.parametrize("mode", ["lost", "lost_drop"])
async def test_a_lost_answer_then_a_retry_does_not_double_post(harness: Harness, fake: FakeMastodon, mode: str) -> None:
    # the server creates the status, then the answer is lost (the client times out / the connection drops)
    fake.fail_next(1, mode)
    out = await harness.service.async_post("bot", "answer lost", idempotency_key="k-lost")
    assert fake.requests == 2 and fake.created == 1
    assert out["id"] == "100"  # the retry got the status the first try created
    assert fake.keys_seen == ["k-lost", "k-lost"]


async def test_every_try_failing_reports_a_gateway_error(harness: Harness, fake: FakeMastodon) -> None:
    fake.fail_next(3, "hang")
    with pytest.raises(SocialPostError) as err:
        await harness.service.async_post("bot", "nobody home", idempotency_key="k-hang")
    assert err.value.status == 504 and err.value.retryable
    assert "after 3 tries" in str(err.value) and "no answer within 0.5 s" in str(err.value)
    assert fake.requests == 3 and fake.created == 0


async def test_the_breaker_opens_refuses_without_contact_then_half_opens_and_closes(harness: Harness, fake: FakeMastodon) -> None:
    svc = harness.service
    fake.fail_next(100, "500")
    for i in range(2):  # failure_threshold = 2 posts, each tried 3 times
        with pytest.raises(SocialPostError) as err:
            await svc.async_post("bot", f"doomed {i}")
        assert err.value.status == 502 and "HTTP 500" in str(err.value)
    assert fake.requests == 2 * mastodon.MAX_ATTEMPTS and fake.created == 0
    assert svc.breaker_state("bot") == "open"
    with pytest.raises(BreakerOpenError) as refused:
        await svc.async_post("bot", "refused")
    assert isinstance(refused.value, UnavailableError)
    assert "next try is allowed in 60 s" in str(refused.value) and refused.value.retry_after_s == 60.0
    assert fake.requests == 2 * mastodon.MAX_ATTEMPTS  # not contacted
    harness.clock.now += 30.0
    with pytest.raises(BreakerOpenError, match="allowed in 30 s"):
        await svc.async_post("bot", "still refused")
    samples = {(name, tuple(labels.values())): value for name, _, _, value, labels in svc.metrics()}
    assert samples[("mongarsd_social_breaker_state", ("bot",))] == 2.0
    assert samples[("mongarsd_social_posts_total", ("refused",))] == 2.0
    assert samples[("mongarsd_social_posts_total", ("failed",))] == 2.0
    # after the reset timeout one probe goes through; the instance is back: the breaker closes
    harness.clock.now += 30.0
    fake.failures.clear()
    assert svc.breaker_state("bot") == "half_open"
    out = await svc.async_post("bot", "back again", idempotency_key="k-probe")
    assert out["replayed"] is False and fake.created == 1
    assert svc.breaker_state("bot") == "closed"
    assert fake.requests == 2 * mastodon.MAX_ATTEMPTS + 1


async def test_a_failed_probe_opens_the_breaker_again(harness: Harness, fake: FakeMastodon) -> None:
    svc = harness.service
    fake.fail_next(100, "500")
    for _ in range(2):
        with pytest.raises(SocialPostError):
            await svc.async_post("bot", "doomed")
    harness.clock.now += 61.0
    with pytest.raises(SocialPostError):
        await svc.async_post("bot", "probe fails")
    assert svc.breaker_state("bot") == "open"
    with pytest.raises(BreakerOpenError, match="allowed in 60 s"):
        await svc.async_post("bot", "refused again")
    assert fake.requests == 3 * mastodon.MAX_ATTEMPTS


async def test_a_wrong_token_is_a_clear_401_not_retried(tmp_path: Path, harness: Harness, fake: FakeMastodon) -> None:
    svc = harness.service
    wrong = "wrong-token-abcdefghijklmnop"
    await svc.async_add_account("badtoken", fake.url, wrong)
    with pytest.raises(SocialPostError) as err:
        await svc.async_post("badtoken", "who am I")
    msg = str(err.value)
    assert err.value.upstream_status == 401 and not err.value.retryable and err.value.status == 502
    assert "HTTP 401" in msg and "The access token is invalid" in msg and "check the account's token" in msg
    assert wrong not in msg and "[token]" in msg  # the echoed token is scrubbed
    assert fake.requests == 1 and fake.created == 0
    assert svc.breaker_state("badtoken") == "closed"  # the instance answered: not an outage
    assert svc.posts["rejected"] == 1


async def test_logs_and_files_never_hold_the_token(harness: Harness, fake: FakeMastodon, caplog: pytest.LogCaptureFixture) -> None:
    svc = harness.service
    with structlog.testing.capture_logs() as logs:
        await svc.async_add_account("again", fake.url, TOKEN, replace=False)
        await svc.async_post("again", "logged post", idempotency_key="k-log")
        await svc.async_post("again", "logged post", idempotency_key="k-log")
        fake.fail_next(1, "500")
        fake.fail_next(1, "drop")
        await svc.async_post("again", "after failures")
        await svc.async_add_account("echo", fake.url, TOKEN + "-nope")
        with pytest.raises(SocialPostError) as err:
            await svc.async_post("echo", "rejected")
        fake.fail_next(100, "500")
        for _ in range(3):
            with pytest.raises((SocialPostError, BreakerOpenError)):
                await svc.async_post("again", "failing")
        await svc.async_remove_account("echo")
    events = [e["event"] for e in logs]
    assert {"social_account_added", "social_posted", "social_post_replayed", "social_post_try_failed", "social_post_failed"} <= set(events)
    assert {"social_breaker_opened", "social_post_refused", "social_account_removed"} <= set(events)
    text = repr(logs) + caplog.text + str(err.value)
    assert TOKEN not in text
    await _no_clear_token(harness)
    assert len(fake.statuses) == 2


async def test_state_files_are_private(harness: Harness) -> None:
    await harness.service.async_post("bot", "journal me")
    modes = await asyncio.to_thread(_modes, harness.state_dir)
    assert modes == {"social": 0o700, "vault.key": 0o600, "vault.json": 0o600, "posts.jsonl": 0o600, ".lock": 0o600}


async def test_disabled_service_refuses_clearly(tmp_path: Path) -> None:
    svc = SocialService(config=SocialConfig(enabled=False), state_dir=tmp_path)
    await svc.async_start()
    try:
        with pytest.raises(UnavailableError, match=r"social\.enabled = false"):
            await svc.async_post("bot", "x")
        with pytest.raises(UnavailableError):
            await svc.async_list_accounts()
    finally:
        await svc.async_stop()
    await svc.async_stop()  # idempotent
    assert not await asyncio.to_thread((tmp_path / "social").exists)


# --- the HTTP API ----------------------------------------------------------------------------


@dataclass
class Api:
    url: str
    user_token: str
    session: aiohttp.ClientSession


@pytest_asyncio.fixture
async def api(harness: Harness, tmp_path: Path) -> AsyncIterator[Api]:
    db = Database(path=tmp_path / "mongarsd.db")
    await db.async_start()
    tokens = TokenStore(db=db)
    user_token, _ = await tokens.async_create("alice", "user", "test")
    board = BoardInfo(profile="generic", model="test", arch="x86_64", cores_logical=2, cores_physical=2)
    cfg = Config(auth=AuthConfig(rate_limit_rps=1000.0, rate_limit_burst=1000))
    ctx = AppContext(loaded=LoadedConfig(cfg, {}, "generic"), board=board, metrics=Metrics(), db=db, tokens=tokens, social=harness.service)
    ctx.state.ready = True
    runner = web.AppRunner(create_app(ctx, [social_api.setup_routes]))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as session:
        yield Api(f"http://127.0.0.1:{port}", user_token, session)
    await runner.cleanup()
    await db.async_stop()


async def _call(api: Api, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with api.session.request(method, api.url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_api_accounts_and_post_round_trip(api: Api, fake: FakeMastodon) -> None:
    status, doc, _ = await _call(api, "POST", "/api/v1/social/accounts", {"name": "news", "instance": fake.url + "/", "token": TOKEN})
    assert status == 201 and doc["name"] == "news" and doc["instance"] == fake.url and "token" not in doc
    status, doc, _ = await _call(api, "POST", "/api/v1/social/accounts", {"name": "news", "instance": fake.url, "token": TOKEN})
    assert status == 409 and "already exists" in doc["error"]["message"]
    status, doc, _ = await _call(api, "GET", "/api/v1/social/accounts")
    assert status == 200 and [a["name"] for a in doc["accounts"]] == ["bot", "news"]
    assert TOKEN not in json.dumps(doc) and doc["accounts"][1]["breaker"] == "closed"

    post = {"account": "news", "status": "from the API", "visibility": "public"}
    status, doc, headers = await _call(api, "POST", "/api/v1/social/post", post, headers={"Idempotency-Key": "api-1"})
    assert status == 201 and doc["replayed"] is False and doc["idempotency_key"] == "api-1" and headers["Idempotency-Key"] == "api-1"
    status, doc, _ = await _call(api, "POST", "/api/v1/social/post", {**post, "idempotency_key": "api-1"})
    assert status == 200 and doc["replayed"] is True
    assert fake.created == 1 and fake.requests == 1
    status, doc, _ = await _call(api, "POST", "/api/v1/social/post", {**post, "idempotency_key": "x"}, headers={"Idempotency-Key": "y"})
    assert status == 400 and "differ" in doc["error"]["message"]
    status, doc, _ = await _call(api, "POST", "/api/v1/social/post", {**post, "status": "x" * 501})
    assert status == 400 and doc["error"]["param"] == "status" and "at most 500" in doc["error"]["message"]
    status, doc, _ = await _call(api, "POST", "/api/v1/social/post", {**post, "account": "nobody"})
    assert status == 404 and doc["error"]["param"] == "account"

    status, doc, _ = await _call(api, "DELETE", "/api/v1/social/accounts/news")
    assert status == 200 and doc["removed"] == "news"
    status, doc, _ = await _call(api, "DELETE", "/api/v1/social/accounts/news")
    assert status == 404


async def test_api_breaker_open_is_a_503_with_retry_after(api: Api, fake: FakeMastodon) -> None:
    fake.fail_next(100, "500")
    for _ in range(2):
        status, doc, _ = await _call(api, "POST", "/api/v1/social/post", {"account": "bot", "status": "down"})
        assert status == 502 and "HTTP 500" in doc["error"]["message"]
    status, doc, headers = await _call(api, "POST", "/api/v1/social/post", {"account": "bot", "status": "down"})
    assert status == 503 and headers["Retry-After"] == "60" and "paused" in doc["error"]["message"]
    assert fake.requests == 2 * mastodon.MAX_ATTEMPTS


async def test_api_is_admin_only(api: Api) -> None:
    auth = {"Authorization": "Bearer " + api.user_token}
    for method, path, body in (
        ("GET", "/api/v1/social/accounts", None),
        ("POST", "/api/v1/social/accounts", {"name": "x", "instance": "https://x.example", "token": "t"}),
        ("DELETE", "/api/v1/social/accounts/bot", None),
        ("POST", "/api/v1/social/post", {"account": "bot", "status": "hi"}),
    ):
        status, doc, _ = await _call(api, method, path, body, headers=auth)
        assert status == 403 and "admin" in doc["error"]["message"], (method, path)


async def test_api_bad_input_names_the_field(api: Api) -> None:
    cases = [
        ({"name": "Bad Name", "instance": "https://x.example", "token": "t"}, "name"),
        ({"name": "ok", "instance": "https://u:p@x.example", "token": "t"}, "instance"),
        ({"name": "ok", "instance": "https://x.example?q=1", "token": "t"}, "instance"),
        ({"name": "ok", "instance": "https://x.example", "token": "has space"}, "token"),
        ({"name": "ok", "instance": "https://x.example", "token": 5}, "token"),
    ]
    for body, param in cases:
        status, doc, _ = await _call(api, "POST", "/api/v1/social/accounts", body)
        assert status == 400 and doc["error"]["param"] == param, (body, doc)
    status, doc, _ = await _call(api, "POST", "/api/v1/social/post", {"account": "bot", "status": "x", "visibility": "everyone"})
    assert status == 400 and doc["error"]["param"] == "visibility"


# --- the command line ------------------------------------------------------------------------


def _run(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the CLI (blocking: call it in a thread)."""
    return subprocess.run(
        [sys.executable, "-m", "mongarsd", *args],
        input=stdin,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MONGARSD_")}, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


async def test_cli_round_trip(tmp_path: Path, fake: FakeMastodon) -> None:
    state = tmp_path / "cli-state"
    await asyncio.to_thread((tmp_path / "none.toml").write_text, "")
    env = {"MONGARSD_CONFIG": str(tmp_path / "none.toml"), "MONGARSD_SOCIAL__TIMEOUT_S": "5"}
    sd = ["--state-dir", str(state)]

    async def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(_run, ["social", *args, *sd], env, stdin)

    r = await run("add", "cli", "--instance", fake.url, stdin=TOKEN + "\n")
    assert r.returncode == 0, r.stderr
    assert "added account cli" in r.stdout and TOKEN not in r.stdout + r.stderr
    token_file = tmp_path / "tok"
    await asyncio.to_thread(token_file.write_text, TOKEN)
    r = await run("add", "cli", "--instance", fake.url, "--token-file", str(token_file))
    assert r.returncode == 1 and "already exists" in r.stderr
    r = await run("list", "--json")
    assert r.returncode == 0, r.stderr
    assert [a["name"] for a in json.loads(r.stdout)] == ["cli"] and TOKEN not in r.stdout
    r = await run("post", "cli", "from the shell", "--idempotency-key", "cli-1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["replayed"] is False and fake.created == 1
    r = await run("post", "cli", "from the shell", "--idempotency-key", "cli-1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("already posted: " + fake.url) and fake.requests == 1
    r = await run("post", "cli", "x" * 501)
    assert r.returncode == 1 and "at most 500" in r.stderr and fake.requests == 1
    r = await run("remove", "cli")
    assert r.returncode == 0 and "removed account cli" in r.stdout
    r = await run("list")
    assert r.returncode == 0 and r.stdout == ""
    assert await asyncio.to_thread(_files_with_token, state) == []
    modes = await asyncio.to_thread(_modes, state)
    assert modes["vault.key"] == 0o600 and modes["social"] == 0o700
