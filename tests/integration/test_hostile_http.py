"""The hostile inputs that used to crash the daemon, 500 or poison a user, against a real daemon with its models."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import DaemonProc, Http, http, requires_models
from tests.integration.test_openai_api import MODEL, start_llm_daemon

pytestmark = requires_models()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, str]]:
    d, token = start_llm_daemon(tmp_path_factory.mktemp("hostile"))
    yield d, token
    d.stop()


def send(served: tuple[DaemonProc, str], method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> Http:
    d, token = served
    admin = path.startswith("/api/v1/tokens")  # loopback without a token is the local admin
    return http(method, d.url + path, raw if raw is not None else body, token=None if admin else token, timeout=60)


def assert_clear_4xx(resp: Http, *, param: str | None = None) -> None:
    assert 400 <= resp.status < 500, (resp.status, resp.body[:300])
    assert "Retry-After" not in resp.headers, resp.headers  # a permanent error: retrying cannot help
    text = resp.body.decode()
    assert "error" in json.loads(text)
    if param is not None:
        assert param in text, text[:300]


def assert_alive(served: tuple[DaemonProc, str]) -> None:
    d, _ = served
    assert d.proc.poll() is None, d.log()[-3000:]
    t0 = time.monotonic()
    assert d.get("/health").status == 200
    assert time.monotonic() - t0 < 1.0


GRAMMAR_BOMBS = [
    {"type": "string", "maxLength": 100000},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 1000000},
]


@pytest.mark.parametrize("schema", GRAMMAR_BOMBS)
def test_schema_bombs_generate_instead_of_segfaulting(served: tuple[DaemonProc, str], schema: dict[str, Any]) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Give me a value."}],
        "max_tokens": 12,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    resp = send(served, "POST", "/v1/chat/completions", body)
    assert resp.status == 200, resp.body[:300]
    ollama = send(
        served,
        "POST",
        "/api/chat",
        {"model": MODEL, "messages": body["messages"], "format": schema, "stream": False, "options": {"num_predict": 12}},
    )
    assert ollama.status == 200, ollama.body[:300]
    persona = send(served, "POST", "/v1/chat/completions", {**body, "model": "mongars"})
    assert persona.status == 200, persona.body[:300]
    assert_alive(served)


def test_min_length_bomb_is_a_fast_400_and_the_loop_stays_free(served: tuple[DaemonProc, str]) -> None:
    d, _ = served
    rss_before = psutil.Process(d.proc.pid).memory_info().rss
    t0 = time.monotonic()
    resp = send(
        served,
        "POST",
        "/api/chat",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "format": {"type": "string", "minLength": 1000000000}},
    )
    assert time.monotonic() - t0 < 2.0
    assert_clear_4xx(resp, param="format.minLength")
    assert psutil.Process(d.proc.pid).memory_info().rss - rss_before < 50 * 2**20
    assert_alive(served)


HUGE_INT = "9" * 5000
CASES: list[tuple[str, str, bytes, str | None]] = [
    (
        "POST",
        "/v1/chat/completions",
        f'{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{HUGE_INT}}}'.encode(),
        "max_tokens",
    ),
    (
        "POST",
        "/v1/chat/completions",
        f'{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":1{"0" * 320}}}'.encode(),
        "max_tokens",
    ),
    (
        "POST",
        "/api/chat",
        f'{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],"options":{{"seed":1{"0" * 320}}}}}'.encode(),
        "options.seed",
    ),
    (
        "POST",
        "/api/chat",
        f'{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],"options":{{"num_predict":1e400}}}}'.encode(),
        "options.num_predict",
    ),
    ("POST", "/api/generate", f'{{"model":"{MODEL}","prompt":"hi","keep_alive":1{"0" * 320}}}'.encode(), "keep_alive"),
    ("POST", "/api/v1/memory", f'{{"text":"a fact","importance":1{"0" * 320}}}'.encode(), "importance"),
    ("POST", "/api/v1/feedback", f'{{"rating":1{"0" * 320}}}'.encode(), "rating"),
    ("PUT", "/api/v1/profile", f'{{"traits":{{"curiosity":1{"0" * 320}}}}}'.encode(), "traits.curiosity"),
    ("POST", "/api/v1/tokens", b'{"user":"bob","role":null,"label":null}', None),
    ("POST", "/v1/chat/completions", b'{"model":"x","messages":[],"temperature":NaN}', "body"),
    ("POST", "/api/v1/tokens", f'{{"user":"bob","n":{HUGE_INT}}}'.encode(), "'n'"),
]


@pytest.mark.parametrize(("method", "path", "raw", "param"), CASES)
def test_bad_numbers_and_nulls_are_clear_4xx(served: tuple[DaemonProc, str], method: str, path: str, raw: bytes, param: str | None) -> None:
    resp = send(served, method, path, raw=raw)
    if path == "/api/v1/tokens" and param is None:
        assert resp.status == 201, resp.body[:300]  # null reads as absent: defaults apply
        assert resp.json()["role"] == "user"
        return
    assert_clear_4xx(resp, param=param)


SURROGATE = '"x\\ud800y"'


@pytest.mark.parametrize(
    ("method", "path", "raw"),
    [
        ("POST", "/v1/chat/completions", f'{{"model":"{MODEL}","max_tokens":4,"messages":[{{"role":"user","content":{SURROGATE}}}]}}'),
        ("POST", "/v1/completions", f'{{"model":"{MODEL}","max_tokens":4,"prompt":{SURROGATE}}}'),
        ("POST", "/v1/embeddings", f'{{"model":"all-minilm-l6-v2","input":[{SURROGATE}]}}'),
        ("POST", "/api/embed", f'{{"model":"all-minilm-l6-v2","input":{SURROGATE}}}'),
        ("POST", "/api/v1/feedback", f'{{"rating":1,"comment":{SURROGATE}}}'),
        ("POST", "/api/v1/memory", f'{{"text":{SURROGATE}}}'),
    ],
)
def test_lone_surrogates_are_replaced_not_500(served: tuple[DaemonProc, str], method: str, path: str, raw: str) -> None:
    resp = send(served, method, path, raw=raw.encode())
    assert resp.status in (200, 201), (resp.status, resp.body[:300])
    assert "Retry-After" not in resp.headers


def test_profile_note_with_a_surrogate_is_stored_clean_and_chat_keeps_working(served: tuple[DaemonProc, str]) -> None:
    resp = send(served, "PUT", "/api/v1/profile", raw=b'{"note":"likes \\ud800 tea"}')
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["personality"]["note"] == "likes \ufffd tea"
    again = send(served, "GET", "/api/v1/profile")
    assert again.status == 200
    assert again.json()["personality"]["note"] == "likes \ufffd tea"
    chat = send(
        served, "POST", "/v1/chat/completions", {"model": "mongars", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status == 200, chat.body[:300]


def test_a_profile_poisoned_by_an_older_version_is_repaired_on_read(served: tuple[DaemonProc, str], tmp_path: Path) -> None:
    import sqlite3

    d, _token = served
    who = send(served, "GET", "/api/v1/profile").json()["user"]
    with sqlite3.connect(d.state_dir / "mongarsd.db", timeout=10) as conn:
        conn.execute(
            "UPDATE profiles SET personality = ? WHERE user = ?", ('{"note": "bad \\udfff note", "confidence": ' + "9" * 5000 + "}", who)
        )
    resp = send(served, "GET", "/api/v1/profile")
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["personality"]["note"] == "bad \ufffd note"
    chat = send(
        served, "POST", "/v1/chat/completions", {"model": "mongars", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status == 200, chat.body[:300]
    assert "profile_row_repaired" in d.log()


def test_streamed_responses_carry_the_request_id(served: tuple[DaemonProc, str]) -> None:
    body = {"model": MODEL, "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    d, token = served
    resp = http("POST", d.url + "/v1/chat/completions", body, token=token, headers={"X-Request-Id": "stream-abc-123"})
    assert resp.status == 200
    assert resp.headers.get("X-Request-Id") == "stream-abc-123"
    ndjson = http("POST", d.url + "/api/chat", {**body, "options": {"num_predict": 4}}, token=token)
    assert ndjson.status == 200
    assert len(ndjson.headers.get("X-Request-Id", "")) >= 8


RAW_REQUESTS = [
    (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd", b" 400 "),
    (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n", b" 400 "),
    (b"GET /api/v1/memory/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", b" 400 "),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 70000 + b"\r\n\r\n", b" 400 "),
]


@pytest.mark.parametrize(("raw", "status"), RAW_REQUESTS, ids=["bad-gzip", "bad-chunks", "bad-path-bytes", "huge-header"])
def test_malformed_http_is_a_quiet_400(served: tuple[DaemonProc, str], raw: bytes, status: bytes) -> None:
    import socket

    d, _ = served
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        sock.sendall(raw)
        head = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status in head, head
    assert_alive(served)
    # a client's garbage is answered, not reported: no error tracebacks for an SD card's journal
    assert "Error handling request" not in d.log()
    assert '"unhandled_error"' not in d.log()
