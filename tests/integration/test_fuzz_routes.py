"""Fuzz every route of a real daemon over HTTP: no 5xx, no crash, no unbounded memory growth.

A bounded run in `make test`; `make fuzz` (HYPOTHESIS_PROFILE=fuzz) sends many more requests.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import DaemonProc, requires_models, start_daemon

SEED = int(os.environ.get("FUZZ_SEED", "8642"))
REQUESTS = 4000 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 600
RSS_GROWTH_MAX_MB = 64

ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models/{x}"),
    ("POST", "/api/chat"),
    ("POST", "/api/generate"),
    ("POST", "/api/embed"),
    ("POST", "/api/embeddings"),
    ("POST", "/api/show"),
    ("POST", "/api/v1/conversation/chat"),
    ("GET", "/api/v1/conversation/history?limit={x}&session_id={x}"),
    ("GET", "/api/v1/memory?limit={x}"),
    ("POST", "/api/v1/memory"),
    ("GET", "/api/v1/memory/search?q={x}&k={x}"),
    ("GET", "/api/v1/memory/{x}"),
    ("DELETE", "/api/v1/memory/{x}"),
    ("GET", "/api/v1/profile"),
    ("PUT", "/api/v1/profile"),
    ("POST", "/api/v1/feedback"),
    ("POST", "/api/v1/tokens"),
    ("DELETE", "/api/v1/tokens/{x}"),
    ("POST", "/api/v1/peer/register"),
    ("POST", "/api/v1/peer/unregister"),
    ("POST", "/api/v1/peer/message"),
    ("GET", "/api/v1/peer/list"),
]
KEYS = [
    "model", "messages", "prompt", "input", "stream", "max_tokens", "temperature", "top_p", "seed", "stop", "format",
    "response_format", "options", "keep_alive", "text", "importance", "kind", "ttl_s", "rating", "comment", "message_id",
    "traits", "note", "user", "role", "label", "url", "message", "session_id", "name", "num_predict", "json_schema", "schema",
    "content", "type", "maxLength", "minItems", "items", "properties", "encoding_format", "dimensions",
]  # fmt: skip
ATOMS: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**39, 0.5, -0.0, 1e308, 1e-320, "", "x", "\u0000", "\ud800", "\U0001f600",
    "mongars", "smollm2-135m-instruct:q4_1", "all-minilm-l6-v2", "user", "assistant", "system", "tool", "json", "5m", "-1",
    "text", "json_schema", "string", "array", "a" * 3000, [], {},
]  # fmt: skip
RAW = [b"", b"{", b"[]", b"null", b'{"a":NaN}', b'{"a":' + b"9" * 5000 + b"}", b'{"a":1e999}', b"\xff\xfe", b'"\\ud800"', b"{" * 5000]


def _value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.55:
        return rng.choice(ATOMS)
    if roll < 0.75:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _body(rng: random.Random) -> bytes:
    if rng.random() < 0.08:
        return rng.choice(RAW)
    body = {rng.choice(KEYS): _value(rng) for _ in range(rng.randint(0, 6))}
    if rng.random() < 0.5:  # often a nearly valid request, so the deeper validators are reached
        body.setdefault("model", rng.choice(["mongars", "smollm2-135m-instruct:q4_1", "all-minilm-l6-v2"]))
        body.setdefault("messages", [{"role": "user", "content": rng.choice(["hi", "\ud800", ""])}])
        body["max_tokens"] = 2
        body["options"] = {"num_predict": 2}
        body["stream"] = False
    return json.dumps(body).encode()


def _fill(path: str, rng: random.Random) -> str:
    fill = rng.choice(["1", "0", "-1", "abc", "%ED%A0%80", "9" * 50, "%00", "..%2F..", "x" * 300, ""])
    return path.replace("{x}", fill)


pytestmark = requires_models()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = start_daemon(tmp_path_factory.mktemp("fuzz"), models=True)
    yield d
    d.stop()


def test_fuzz_every_route_over_http(served: DaemonProc, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    proc = psutil.Process(served.proc.pid)
    statuses: dict[int, int] = {}
    failures: list[str] = []
    rss_start = 0.0
    deadline = time.monotonic() + 600
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    try:
        for i in range(REQUESTS):
            if time.monotonic() > deadline:
                break
            method, path = rng.choice(ROUTES)
            target = _fill(path, rng)
            body = _body(rng) if method in ("POST", "PUT") else None
            try:
                conn.request(method, target, body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                text = resp.read().decode("utf-8", "replace")
            except (OSError, http.client.HTTPException) as err:
                failures.append(f"{method} {target[:80]}: {err!r}")
                break
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            if resp.status >= 500 and resp.status != 503:
                failures.append(f"{method} {target[:80]} -> {resp.status}: {text[:200]} body={body[:200] if body else b''!r}")
            if resp.status == 503 and resp.getheader("Retry-After") and "busy" not in text and "loading" not in text:
                failures.append(f"{method} {target[:80]} -> 503 with Retry-After: {text[:200]}")
            if i == 50:
                rss_start = proc.memory_info().rss / 2**20  # after warm-up: models and caches loaded
    finally:
        conn.close()
    assert served.proc.poll() is None, served.log()[-3000:]
    assert not failures, failures[:10]
    assert sum(statuses.values()) >= min(REQUESTS, 100)
    assert any(400 <= s < 500 for s in statuses), statuses
    assert any(200 <= s < 300 for s in statuses), statuses  # valid requests got through too
    growth = proc.memory_info().rss / 2**20 - rss_start
    assert growth < RSS_GROWTH_MAX_MB, f"RSS grew {growth:.0f} MB over {sum(statuses.values())} requests"
    assert served.get("/health").status == 200
