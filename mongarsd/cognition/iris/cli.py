"""`mongarsd ingest PATH|URL`: hand a file, folder or page to the running daemon's Iris ingester.

The command goes through the daemon's HTTP API, never the database file, so the daemon stays
the store's one writer. On loopback the daemon trusts the local admin; elsewhere give a token.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Final, TextIO

from mongarsd.cognition.iris.ingest import SUFFIX_TYPES
from mongarsd.const import DEFAULT_HTTP_PORT, EXIT_FAILURE, EXIT_OK

INGEST_TIMEOUT_S: Final = 3600.0  # a large folder is embedded chunk by chunk on a small board
INGEST_PATH: Final = "/api/v1/ingest"
INLINE_MAX_BYTES: Final = 640 * 1024  # sent inline up to this: its base64 fits the default 1 MiB request limit


def is_url(target: str) -> bool:
    """Tell whether the argument names a web page rather than a local path (pure)."""
    return target.lower().startswith(("http://", "https://"))


def daemon_url(host: str, port: int) -> str:
    """The URL this host reaches the daemon at: loopback when it listens on every address (pure)."""
    if host in ("", "0.0.0.0", "::", "*"):
        host = "127.0.0.1"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name: used as written
    return f"http://{host}:{port}"


def build_request(target: str, *, user: str | None, shared: bool) -> dict[str, Any]:
    """The POST /api/v1/ingest body for a command-line target (blocking: reads a small file).

    A small document file travels in the request itself, so the daemon (another system user,
    often without access to your home) never needs to read it; a folder or a large file is
    named by its absolute path for the daemon to read (admins only).
    """
    body: dict[str, Any] = {"url": target} if is_url(target) else _file_or_path(os.path.abspath(os.path.expanduser(target)))
    if shared:
        body["shared"] = True
    if user:
        body["user"] = user
    return body


def _file_or_path(path: str) -> dict[str, Any]:
    content_type = SUFFIX_TYPES.get(os.path.splitext(path)[1].lower())
    try:
        size = os.stat(path).st_size
    except OSError:
        size = -1
    if content_type is None or not os.path.isfile(path) or not 0 < size <= INLINE_MAX_BYTES:
        return {"path": path}
    with open(path, "rb") as fh:
        data = fh.read(INLINE_MAX_BYTES + 1)
    if len(data) > INLINE_MAX_BYTES:
        return {"path": path}
    return {"data": base64.b64encode(data).decode("ascii"), "content_type": content_type, "source": path, "title": os.path.basename(path)}


def post_ingest(base: str, token: str | None, body: dict[str, Any], timeout: float = INGEST_TIMEOUT_S) -> dict[str, Any]:
    """POST the ingest request to the daemon and return its JSON answer (blocking)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base.rstrip("/") + INGEST_PATH, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        answer: dict[str, Any] = json.loads(resp.read().decode("utf-8"))
        return answer


def _error_message(err: urllib.error.HTTPError) -> str:
    raw = err.read().decode("utf-8", "replace")
    try:
        detail = json.loads(raw)["error"]
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)
    except (ValueError, KeyError, TypeError):
        return raw.strip()[:500] or str(err.reason)


def describe(result: dict[str, Any]) -> str:
    """One line for one ingested (or refused) document (pure)."""
    if result.get("error"):
        return f"  not ingested  {result.get('source', '')}: {result['error']}"
    word = "already stored" if result.get("duplicate") else "stored"
    title = f" {result['title']!r}" if result.get("title") else ""
    return f"  {word:<14}#{result.get('document_id')}{title}: {result.get('chunks', 0)} chunks, {result.get('bytes', 0)} bytes, from {result.get('source', '')}"


def _base_url(args: argparse.Namespace) -> str:
    if args.daemon:
        return str(args.daemon)
    from mongarsd.cli_common import load_from_args

    loaded, _ = load_from_args(args)  # a broken config is a configuration error (exit 78), as for every command
    return daemon_url(loaded.config.server.host, loaded.config.server.port)


def run_ingest(args: argparse.Namespace, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """Send PATH or URL to the daemon, print what it stored; exit non-zero when nothing could be."""
    target: str = args.target
    if not is_url(target) and not os.path.lexists(os.path.expanduser(target)):
        print(f"mongarsd: error: no such file or folder: {target}", file=stderr)
        return EXIT_FAILURE
    base = _base_url(args)
    token = args.token or os.environ.get("MONGARSD_TOKEN")
    body = build_request(target, user=args.user, shared=args.shared)
    whose = "shared documents" if args.shared else (f"{args.user}'s documents" if args.user else "your documents")
    print(f"ingesting {body.get('url') or body.get('path') or body.get('source')} into {whose} via {base} ...", file=stderr, flush=True)
    try:
        answer = post_ingest(base, token, body)
    except urllib.error.HTTPError as err:
        with err:
            print(f"mongarsd: error {err.code}: {_error_message(err)}", file=stderr)
        return EXIT_FAILURE
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        print(f"mongarsd: cannot reach the daemon at {base} ({reason}); is it running? start it with `mongarsd run`", file=stderr)
        return EXIT_FAILURE
    except ValueError as err:
        print(f"mongarsd: error: the daemon's answer is not JSON ({err})", file=stderr)
        return EXIT_FAILURE
    found = answer.get("results")
    results: list[dict[str, Any]] = [r for r in found if isinstance(r, dict)] if isinstance(found, list) else []
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False), file=stdout)
    else:
        for result in results:
            print(describe(result), file=stdout)
        print(
            f"{answer.get('ingested', 0)} stored, {answer.get('duplicates', 0)} already stored, {answer.get('errors', 0)} not ingested",
            file=stdout,
        )
    nothing = bool(results) and all(r.get("error") for r in results)
    return EXIT_FAILURE if nothing else EXIT_OK


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    p = sub.add_parser("ingest", help="ingest a document file, a folder of them, or a web page into memory (via the running daemon)")
    p.add_argument("target", metavar="PATH|URL", help="a .txt .md .html .pdf file, a folder of them, or an http(s) URL")
    p.add_argument("--user", help="ingest into this user's documents (admin)")
    p.add_argument("--shared", action="store_true", help="share with every user's recall (admin)")
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    p.add_argument("--daemon", metavar="URL", help=f"daemon URL (default from the config, else http://127.0.0.1:{DEFAULT_HTTP_PORT})")
    p.add_argument("--token", help="bearer token (default $MONGARSD_TOKEN; loopback needs none)")
    add_config_args(p)
    p.set_defaults(func=run_ingest)
