"""`mongarsd chat` against a real local HTTP server speaking SSE."""

from __future__ import annotations

import argparse
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest

from mongarsd.chat_client import run_chat


class _Handler(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, object]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append(body)
        if body["messages"][-1]["content"] == "fail":
            payload = json.dumps({"error": {"message": "no such model", "type": "not_found_error"}}).encode()
            self.send_response(404)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in ("Hel", "lo!"):
            self.wfile.write(f"data: {json.dumps({'choices': [{'delta': {'content': piece}}]})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def server() -> Iterator[str]:
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, name="sse-server")
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    t.join()


def test_streams_answers_and_keeps_raw_model_history(server: str) -> None:
    _Handler.seen.clear()
    out = io.StringIO()
    args = argparse.Namespace(url=server, token=None, model="smollm2-135m-instruct:q4_1", max_tokens=16)
    assert run_chat(args, stdin=io.StringIO("hi\n\nagain\n/quit\nignored\n"), stdout=out) == 0
    assert out.getvalue() == "Hello!\nHello!\n"
    assert len(_Handler.seen) == 2
    assert [m["content"] for m in _Handler.seen[1]["messages"]] == ["hi", "Hello!", "again"]  # type: ignore[index]


def test_errors_are_reported_and_the_session_goes_on(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    _Handler.seen.clear()
    args = argparse.Namespace(url=server, token=None, model="mongars", max_tokens=16)
    assert run_chat(args, stdin=io.StringIO("fail\nok\n"), stdout=io.StringIO()) == 0
    assert "error 404: no such model" in capsys.readouterr().err
    assert [m["content"] for m in _Handler.seen[1]["messages"]] == ["ok"]  # type: ignore[index]  # persona: server keeps memory


def test_unreachable_daemon_is_a_clear_failure(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(url="http://127.0.0.1:9", token=None, model="mongars", max_tokens=16)
    assert run_chat(args, stdin=io.StringIO("hi\n"), stdout=io.StringIO()) == 1
    assert "cannot reach mongarsd" in capsys.readouterr().err
