"""Pure API pieces: surfaces, envelopes, rate-limit buckets, role checks, loopback."""

from __future__ import annotations

import pytest

from mongarsd.api.auth import Principal, check_role, is_loopback
from mongarsd.api.errors import error_body, surface_of
from mongarsd.api.middlewares import TokenBuckets
from mongarsd.errors import AuthError


@pytest.mark.parametrize(
    ("path", "surface"),
    [
        ("/v1/chat/completions", "openai"),
        ("/v1", "openai"),
        ("/api/chat", "ollama"),
        ("/api/tags", "ollama"),
        ("/api/v1/status", "native"),
        ("/health", "native"),
        ("/v10/x", "native"),
    ],
)
def test_surface_of(path: str, surface: str) -> None:
    assert surface_of(path) == surface


def test_the_three_envelopes() -> None:
    assert error_body("openai", 400, "bad", param="temperature") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "temperature", "code": None}
    }
    assert error_body("ollama", 404, "model 'x' not found") == {"error": "model 'x' not found"}
    assert error_body("native", 403, "no") == {"error": {"code": "forbidden", "message": "no"}}
    assert error_body("openai", 429, "slow down")["error"]["type"] == "rate_limit_error"


def test_token_bucket_allows_burst_then_waits_then_refills() -> None:
    b = TokenBuckets(rate_per_s=2, burst=3)
    assert [b.take("k", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("k", now=0.0) == pytest.approx(0.5)
    assert b.take("k", now=1.0) == 0.0  # 2 tokens refilled in a second
    assert b.take("other", now=1.0) == 0.0  # keys are independent


def test_token_bucket_memory_is_bounded() -> None:
    b = TokenBuckets(rate_per_s=1, burst=1, max_keys=10)
    for i in range(100):
        b.take(f"k{i}", now=0.0)
    assert len(b._buckets) == 10


def test_roles() -> None:
    user = Principal("alice", "user", "t1", False)
    admin = Principal("root", "admin", "t2", False)
    peer = Principal("node", "peer", "t3", False)
    check_role(user, "user")
    check_role(admin, "admin")
    check_role(peer, "peer")
    with pytest.raises(AuthError) as err:
        check_role(user, "admin")
    assert err.value.status == 403 and "needs the admin role" in str(err.value)
    with pytest.raises(AuthError):
        check_role(user, "peer")


@pytest.mark.parametrize(
    ("addr", "loop"),
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("10.0.0.1", False), ("", False), (None, False), ("garbage", False)],
)
def test_is_loopback(addr: str | None, loop: bool) -> None:
    assert is_loopback(addr) is loop
