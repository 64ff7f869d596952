"""`mongarsd social …`: the social accounts vault and posting, on the state dir directly.

social add NAME --instance URL [--token-file F] [--max-chars N] [--replace]
                                 the token is read from F, or from stdin (never from the command
                                 line, where `ps` would show it)
social list [--json]             accounts, never their tokens
social remove NAME
social post NAME TEXT [--idempotency-key K] [--visibility V] [--spoiler-text S] [--language L] [--json]
                                 TEXT "-" reads the status from stdin; a retry with the same key
                                 never posts twice
Whoever can read the state dir administers the accounts (the files are 0600 in a 0700 directory).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from mongarsd.const import EXIT_OK
from mongarsd.errors import ValidationError
from mongarsd.social.mastodon import VISIBILITIES
from mongarsd.social.vault import MAX_TOKEN_CHARS, Vault

MAX_TOKEN_FILE_BYTES: Final = MAX_TOKEN_CHARS * 4
MAX_STDIN_STATUS_BYTES: Final = 1 << 20


def _loaded(args: argparse.Namespace) -> Any:
    from mongarsd.cli_common import load_from_args

    loaded, _ = load_from_args(args)
    return loaded


def _vault(args: argparse.Namespace) -> Vault:
    return Vault(Path(_loaded(args).config.server.state_dir))


def _read_token(args: argparse.Namespace) -> str:
    """The token from --token-file or stdin (a prompt without echo on a terminal)."""
    if args.token_file is not None:
        try:
            with open(args.token_file, "rb") as fh:
                raw = fh.read(MAX_TOKEN_FILE_BYTES + 1)
        except OSError as err:
            raise ValidationError(f"cannot read the token file {args.token_file}: {err.strerror or err}", param="token-file") from None
        if len(raw) > MAX_TOKEN_FILE_BYTES:
            raise ValidationError(f"the token file {args.token_file} is too large to hold a token", param="token-file")
        return raw.decode("utf-8", "replace")
    if sys.stdin.isatty():
        return getpass.getpass("access token (not echoed): ")
    return sys.stdin.read(MAX_TOKEN_FILE_BYTES + 1)


def cmd_add(args: argparse.Namespace) -> int:
    token = _read_token(args)
    info, replaced = _vault(args).add(args.name, args.instance, token, max_chars=args.max_chars, replace=args.replace)
    print(f"{'replaced' if replaced else 'added'} account {info.name} ({info.instance}, at most {info.max_chars} characters a post)")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    infos = _vault(args).list()
    if args.json:
        print(json.dumps([i.public() for i in infos], indent=2))
        return EXIT_OK
    if not infos:
        print("# no social accounts (add one with `mongarsd social add NAME --instance URL`)", file=sys.stderr)
        return EXIT_OK
    width = max(4, *(len(i.name) for i in infos))
    print(f"{'NAME':<{width}}  {'MAX':>6}  {'ADDED':<16}  INSTANCE")
    for i in infos:
        added = time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created_at))
        print(f"{i.name:<{width}}  {i.max_chars:>6}  {added:<16}  {i.instance}")
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    info = _vault(args).remove(args.name)
    print(f"removed account {info.name} ({info.instance})")
    return EXIT_OK


def cmd_post(args: argparse.Namespace) -> int:
    from mongarsd.social.service import SocialService

    text = args.text
    if text == "-":
        text = sys.stdin.read(MAX_STDIN_STATUS_BYTES + 1)
        if len(text) > MAX_STDIN_STATUS_BYTES:
            raise ValidationError("the status read from stdin is too long", param="status")
        text = text.rstrip("\n")
    loaded = _loaded(args)
    service = SocialService(config=loaded.config.social, state_dir=Path(loaded.config.server.state_dir))

    async def main() -> dict[str, Any]:
        await service.async_start()
        try:
            return await service.async_post(
                args.name,
                text,
                idempotency_key=args.idempotency_key,
                visibility=args.visibility,
                spoiler_text=args.spoiler_text,
                language=args.language,
            )
        finally:
            await service.async_stop()

    result = asyncio.run(main())
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    what = "already posted" if result["replayed"] else "posted"
    print(f"{what}: {result['url'] or result['id']}")
    print(f"# status {result['id']}; idempotency key {result['idempotency_key']} (reuse it to retry safely)", file=sys.stderr)
    return EXIT_OK


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    """Add the `social` subcommands to the top-level parser."""
    social = sub.add_parser("social", help="social accounts (encrypted vault) and posting").add_subparsers(dest="action", metavar="ACTION")
    social.required = True
    p = social.add_parser("add", help="store an account; its token is read from stdin or --token-file")
    p.add_argument("name", help="account name: a-z, 0-9, '_', '.', '-' (at most 64)")
    p.add_argument("--instance", required=True, help="the instance's base URL, e.g. https://mastodon.example")
    p.add_argument("--token-file", type=Path, help="read the access token from this file (default: stdin)")
    p.add_argument("--max-chars", type=int, help="longest status the instance accepts (default 500)")
    p.add_argument("--replace", action="store_true", help="replace an account of the same name")
    add_config_args(p)
    p.set_defaults(func=cmd_add)
    p = social.add_parser("list", help="list accounts (never their tokens)")
    p.add_argument("--json", action="store_true")
    add_config_args(p)
    p.set_defaults(func=cmd_list)
    p = social.add_parser("remove", help="forget an account and its token")
    p.add_argument("name")
    add_config_args(p)
    p.set_defaults(func=cmd_remove)
    p = social.add_parser("post", help="post a status (at most once per idempotency key)")
    p.add_argument("name", help="account name")
    p.add_argument("text", help="the status; '-' reads it from stdin")
    p.add_argument("--idempotency-key", help="retry-safe key (default: a new one, printed)")
    p.add_argument("--visibility", choices=VISIBILITIES, help="default public")
    p.add_argument("--spoiler-text", help="content warning shown before the status")
    p.add_argument("--language", help="ISO 639 code, e.g. en")
    p.add_argument("--json", action="store_true")
    add_config_args(p)
    p.set_defaults(func=cmd_post)
