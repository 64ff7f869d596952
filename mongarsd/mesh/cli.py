"""`mongarsd keys …` (the cluster keyring file) and `mongarsd peers …` (the running daemon's API).

keys generate           create the keyring with a fresh primary key (prints the key, once)
keys install KEY        add a key (creates the keyring with KEY as primary when there is none)
keys use KEYID          make an installed key the primary (encrypting) key
keys remove KEYID       remove a secondary key
keys list               key ids, primary marked; never the keys
peers list              GET  /api/v1/peer/list
peers join URL          POST /api/v1/peer/register {url}
peers leave             POST /api/v1/peer/leave
A running daemon follows changes to the keyring file within a few seconds, without a restart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mongarsd.const import EXIT_FAILURE, EXIT_OK
from mongarsd.errors import MongarsError
from mongarsd.mesh.keyring import Keyring, KeyringError, decode_key, encode_key, generate_key, key_id

HTTP_TIMEOUT_S = 10.0
APPLY_HINT = "# a running daemon applies this within a few seconds; do the same step on every node before the next one"


def _keyring_path(args: argparse.Namespace) -> Path:
    from mongarsd.cli_common import load_from_args
    from mongarsd.mesh.service import keyring_path

    loaded, _ = load_from_args(args)
    return keyring_path(Path(loaded.config.server.state_dir))


def _find(ring: Keyring, kid_hex: str) -> bytes:
    kid_hex = kid_hex.strip().lower()
    installed = ring.keys()  # a list of keys, not a mapping
    for key in installed:
        if key_id(key).hex() == kid_hex:
            return key
    raise KeyringError(f"no installed key has id {kid_hex} (see `mongarsd keys list`)")


def cmd_keys_generate(args: argparse.Namespace) -> int:
    path = _keyring_path(args)
    if path.exists() and not args.force:
        raise KeyringError(f"{path} already exists; use `keys install` to add a key, or --force to replace the keyring")
    key = generate_key()
    Keyring(key).save(path)
    print(encode_key(key))
    print(
        f"# new cluster key {key_id(key).hex()} written to {path}; install it on the other nodes with `mongarsd keys install KEY`",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_keys_install(args: argparse.Namespace) -> int:
    path = _keyring_path(args)
    # "-": read the key from stdin, so that it never shows in the process list (first-boot scripts)
    text = sys.stdin.read(4096) if args.key == "-" else args.key
    key = decode_key(text.strip())
    if path.exists():
        ring = Keyring.load(path)
        ring.install(key)
    else:
        ring = Keyring(key)
    primary = " (primary)" if ring.primary_key == key else ""
    return _save_and_report(ring, path, f"installed key {key_id(key).hex()}{primary}")


def cmd_keys_use(args: argparse.Namespace) -> int:
    path = _keyring_path(args)
    ring = Keyring.load(path)
    ring.use(_find(ring, args.keyid))
    return _save_and_report(ring, path, f"primary key is now {ring.primary_key_id.hex()}")


def cmd_keys_remove(args: argparse.Namespace) -> int:
    path = _keyring_path(args)
    ring = Keyring.load(path)
    key = _find(ring, args.keyid)
    ring.remove(key)
    return _save_and_report(ring, path, f"removed key {key_id(key).hex()}")


def _save_and_report(ring: Keyring, path: Path, message: str) -> int:
    """Persist the edited keyring (the running daemon follows the file) and say what changed."""
    ring.save(path)
    print(message)
    print(APPLY_HINT, file=sys.stderr)
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    path = _keyring_path(args)
    if not path.exists():
        raise KeyringError(f"no keyring at {path}; create one with `mongarsd keys generate`")
    ring = Keyring.load(path)
    installed = ring.keys()
    ids = [{"id": key_id(k).hex(), "primary": k == ring.primary_key} for k in installed]
    if args.json:
        print(json.dumps(ids))
    else:
        for item in ids:
            print(f"{item['id']}{'  primary' if item['primary'] else ''}")
    return EXIT_OK


# --- peers: the running daemon's API on loopback ----------------------------------------------


def _api(args: argparse.Namespace, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Call the daemon's API (blocking) and return (status, decoded JSON)."""
    base = args.url
    if not base:
        from mongarsd.cli_common import load_from_args

        loaded, _ = load_from_args(args)
        base = f"http://127.0.0.1:{loaded.config.server.port}"
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    token = args.token or os.environ.get("MONGARSD_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read() or b"null")
        except ValueError:
            detail = None
        return err.code, detail
    except (urllib.error.URLError, OSError) as err:
        raise MongarsError(f"cannot reach the daemon at {base}: {getattr(err, 'reason', err)} (is `mongarsd run` running?)") from err


def _report(status: int, doc: Any) -> int:
    if status >= 400:
        msg = doc.get("error", {}).get("message") if isinstance(doc, dict) and isinstance(doc.get("error"), dict) else doc
        print(f"mongarsd: error {status}: {msg}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_peers_list(args: argparse.Namespace) -> int:
    status, doc = _api(args, "GET", "/api/v1/peer/list")
    if status >= 400 or args.json:
        if status < 400:
            print(json.dumps(doc, indent=2))
        return _report(status, doc)
    mesh = doc.get("mesh", {})
    print(
        f"# node {doc.get('node_id')}  mesh {'running' if mesh.get('running') else 'enabled, not running' if mesh.get('enabled') else 'disabled'}"
    )
    print(f"{'NODE':<18} {'STATE':<8} {'GOSSIP':<22} {'API':<28} {'QUEUE':>5} {'FREE':>4}  LOADED")
    for m in doc.get("members", []):
        mark = "*" if m.get("self") else " "
        print(
            f"{mark}{m.get('node_id') or '-':<17} {m.get('state', '-'):<8} {m.get('gossip', '-'):<22} {m.get('api') or '-':<28} "
            f"{m.get('queue_depth') if m.get('queue_depth') is not None else '-':>5} {m.get('slots_free') if m.get('slots_free') is not None else '-':>4}  "
            f"{','.join(m.get('models_loaded') or []) or '-'}"
        )
    for p in doc.get("static", []):
        print(f"# registered: {p.get('url')}")
    return EXIT_OK


def cmd_peers_join(args: argparse.Namespace) -> int:
    url = args.addr if "://" in args.addr else f"http://{args.addr}"
    status, doc = _api(args, "POST", "/api/v1/peer/register", {"url": url})
    if status < 400:
        print(f"{doc.get('status')}: {doc.get('url')} (joined now: {'yes' if doc.get('joined') else 'no, will retry'})")
    return _report(status, doc)


def cmd_peers_leave(args: argparse.Namespace) -> int:
    status, doc = _api(args, "POST", "/api/v1/peer/leave", {})
    if status < 400:
        print(f"{doc.get('status')} (node {doc.get('node_id')})")
    return _report(status, doc)


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    """Add the `keys` and `peers` subcommands to the top-level parser."""
    keys = sub.add_parser("keys", help="manage the mesh cluster keyring").add_subparsers(dest="action", metavar="ACTION")
    keys.required = True
    p = keys.add_parser("generate", help="create the keyring with a new key (printed once)")
    p.add_argument("--force", action="store_true", help="replace an existing keyring")
    add_config_args(p)
    p.set_defaults(func=cmd_keys_generate)
    p = keys.add_parser("install", help="install a key (base64) that peers use")
    p.add_argument("key", help="the key in base64, or - to read it from stdin")
    add_config_args(p)
    p.set_defaults(func=cmd_keys_install)
    p = keys.add_parser("use", help="make an installed key the primary one")
    p.add_argument("keyid")
    add_config_args(p)
    p.set_defaults(func=cmd_keys_use)
    p = keys.add_parser("remove", help="remove a secondary key")
    p.add_argument("keyid")
    add_config_args(p)
    p.set_defaults(func=cmd_keys_remove)
    p = keys.add_parser("list", help="list key ids (never the keys)")
    p.add_argument("--json", action="store_true")
    add_config_args(p)
    p.set_defaults(func=cmd_keys_list)

    peers = sub.add_parser("peers", help="the running daemon's mesh peers").add_subparsers(dest="action", metavar="ACTION")
    peers.required = True
    for name, func, helptext in (
        ("list", cmd_peers_list, "list mesh members and registered peers"),
        ("join", cmd_peers_join, "register a peer API URL (host:port or http://host:port) and join it"),
        ("leave", cmd_peers_leave, "leave the mesh gracefully"),
    ):
        p = peers.add_parser(name, help=helptext)
        if name == "join":
            p.add_argument("addr")
        if name == "list":
            p.add_argument("--json", action="store_true")
        p.add_argument("--url", help="daemon API base URL (default http://127.0.0.1:<server.port>)")
        p.add_argument("--token", help="API token (default $MONGARSD_TOKEN; loopback is trusted by default)")
        add_config_args(p)
        p.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    """Run only the keys/peers commands (`python -m mongarsd.mesh.cli`), e.g. before they are wired."""
    from mongarsd.cli_common import add_config_args

    parser = argparse.ArgumentParser(prog="mongarsd")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub, add_config_args)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except MongarsError as err:
        print(f"mongarsd: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    return code


if __name__ == "__main__":
    sys.exit(main())
