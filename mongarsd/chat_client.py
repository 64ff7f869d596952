"""`mongarsd chat`: a small interactive client that streams from a running daemon."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from mongarsd.const import DEFAULT_HTTP_PORT, EXIT_FAILURE, EXIT_OK, PERSONA_MODEL_ID

REQUEST_TIMEOUT_S = 300.0


def stream_chat(url: str, token: str | None, model: str, messages: list[dict[str, str]], max_tokens: int) -> Iterator[str]:
    """Yield answer pieces from /v1/chat/completions as they stream (blocking)."""
    body = json.dumps({"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece


def run_chat(
    args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, ask: Callable[[str], str] | None = None
) -> int:
    """Read lines, send each as a turn, print the streamed answer; /quit or EOF ends."""
    url = args.url or f"http://127.0.0.1:{DEFAULT_HTTP_PORT}"
    token = args.token or os.environ.get("MONGARSD_TOKEN")
    history: list[dict[str, str]] = []
    interactive = stdin.isatty()
    reader = ask or input
    if interactive:
        print(f"mongarsd chat with {args.model} at {url}; /quit to leave, /reset to forget this conversation", file=stdout)
    while True:
        try:
            line = reader("> ") if interactive else stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history.clear()
            continue
        # The persona keeps its own memory server-side; raw models need the history sent along.
        messages = [{"role": "user", "content": text}] if args.model == PERSONA_MODEL_ID else [*history, {"role": "user", "content": text}]
        answer: list[str] = []
        try:
            for piece in stream_chat(url, token, args.model, messages, args.max_tokens):
                answer.append(piece)
                stdout.write(piece)
                stdout.flush()
        except urllib.error.HTTPError as err:
            detail: Any = err.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]
                detail = detail.get("message", detail) if isinstance(detail, dict) else detail
            except (ValueError, KeyError, TypeError):
                pass
            print(f"\nerror {err.code}: {detail}", file=sys.stderr)
            continue
        except (urllib.error.URLError, OSError) as err:
            print(f"\ncannot reach mongarsd at {url}: {getattr(err, 'reason', err)}", file=sys.stderr)
            return EXIT_FAILURE
        stdout.write("\n")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]
    return EXIT_OK


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    p = sub.add_parser("chat", help="chat with a running daemon from the terminal")
    p.add_argument("--url", help=f"daemon URL (default http://127.0.0.1:{DEFAULT_HTTP_PORT})")
    p.add_argument("--token", help="bearer token (default $MONGARSD_TOKEN; loopback needs none)")
    p.add_argument("--model", default=PERSONA_MODEL_ID, help=f"model id, or '{PERSONA_MODEL_ID}' for the assistant with memory")
    p.add_argument("--max-tokens", type=int, default=512)
    p.set_defaults(func=run_chat)
