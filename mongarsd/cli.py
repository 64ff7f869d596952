"""Command line: `mongarsd run|init|config|token|model|keys|peers|chat|version`; returns exit codes."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from mongarsd import __version__
from mongarsd.cli_common import add_config_args, load_from_args
from mongarsd.const import EVOLUTION_TRIAL_COMMAND, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from mongarsd.errors import ConfigError, MongarsError

Handler = Callable[[argparse.Namespace], int]


def cmd_run(args: argparse.Namespace) -> int:
    # A segfault in llama.cpp or onnxruntime would otherwise leave no trace: dump every Python
    # thread's stack to stderr (the journal) on SIGSEGV, SIGFPE, SIGABRT, SIGBUS and SIGILL.
    faulthandler.enable(file=sys.stderr, all_threads=True)
    # BLAS thread pools would fight llama.cpp's threads for the board's few cores.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from mongarsd.daemon import Daemon
    from mongarsd.heap import tune_malloc
    from mongarsd.log import configure_logging

    tune_malloc()
    loaded, board = load_from_args(args)
    configure_logging(loaded.config.log.format, loaded.config.log.level)
    _activate_llama_build(loaded.config.inference.cpu_variant)
    daemon = Daemon(loaded=loaded, board=board, reload_config=lambda: load_from_args(args)[0])
    return asyncio.run(daemon.async_run())


def _activate_llama_build(requested: str) -> None:
    """Point llama-cpp-python at the llama.cpp build this CPU and profile call for; log it."""
    import structlog

    from mongarsd.inference import libvariant

    choice = libvariant.choose(requested)
    libvariant.activate(choice)
    structlog.get_logger("mongarsd").info("llama_library", variant=choice.variant, path=str(choice.path or ""), reason=choice.reason)


def _llama_build_row(requested: str) -> dict[str, str]:
    from mongarsd.inference import libvariant

    try:
        choice = libvariant.choose(requested)
    except ConfigError as err:
        return {"variant": "", "path": "", "reason": "", "error": str(err)}
    return {"variant": choice.variant, "path": str(choice.path or ""), "reason": choice.reason}


def cmd_config_show(args: argparse.Namespace) -> int:
    loaded, board = load_from_args(args)
    llama = _llama_build_row(loaded.config.inference.cpu_variant)
    rows = [(key, str(value) if isinstance(value, Path) else value, source) for key, value, source in loaded.rows()]
    if args.json:
        print(
            json.dumps(
                {
                    "profile": loaded.profile,
                    "board": board.model,
                    "llama_library": llama,
                    "values": {k: {"value": v, "source": s} for k, v, s in rows},
                },
                indent=2,
                default=str,
            )
        )
        return EXIT_OK
    print(f"# board: {board.model} -> profile {loaded.profile}")
    if "error" in llama:
        print(f"# llama.cpp library: cannot load: {llama['error']}")
    else:
        print(f"# llama.cpp library: {llama['variant']} ({llama['path'] or 'llama-cpp-python build'}): {llama['reason']}")
    width = max(len(k) for k, _, _ in rows)
    for key, value, source in rows:
        shown = json.dumps(list(value)) if isinstance(value, tuple) else json.dumps(value) if isinstance(value, (bool, str)) else value
        print(f"{key:<{width}} = {shown}    # {source}")
    return EXIT_OK


def with_store(fn: Callable[[Any, argparse.Namespace], Coroutine[Any, Any, int]]) -> Handler:
    """Run `fn(db, args)` against the state dir's database (the daemon may be running)."""

    def run(args: argparse.Namespace) -> int:
        from mongarsd.daemon import DB_FILE
        from mongarsd.memory.db import Database

        loaded, _ = load_from_args(args)

        async def main() -> int:
            db = Database(path=loaded.config.server.state_dir / DB_FILE)
            await db.async_start()
            try:
                return await fn(db, args)
            finally:
                await db.async_stop()

        return asyncio.run(main())

    return run


async def _token_create(db: Any, args: argparse.Namespace) -> int:
    from mongarsd.memory.tokens import TokenStore

    secret, info = await TokenStore(db=db).async_create(args.user, args.role, args.label or "")
    print(secret)
    print(f"# token {info.id} for user {info.user} ({info.role}); shown once, store it safely", file=sys.stderr)
    return EXIT_OK


async def _token_list(db: Any, args: argparse.Namespace) -> int:
    from mongarsd.memory.tokens import TokenStore

    infos = await TokenStore(db=db).async_list(args.user)
    if args.json:
        print(json.dumps([i.public() for i in infos], indent=2))
        return EXIT_OK
    print(f"{'ID':<12}  {'USER':<20}  {'ROLE':<5}  {'STATE':<7}  LABEL")
    for i in infos:
        print(f"{i.id:<12}  {i.user:<20}  {i.role:<5}  {'revoked' if i.revoked_at else 'live':<7}  {i.label}")
    return EXIT_OK


async def _token_revoke(db: Any, args: argparse.Namespace) -> int:
    from mongarsd.memory.tokens import TokenStore

    info = await TokenStore(db=db).async_revoke(args.id)
    print(f"revoked token {info.id} of user {info.user}")
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    print(f"mongarsd {__version__}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mongarsd", description="Private AI daemon for small boards.")
    parser.add_argument("--version", action="version", version=f"mongarsd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="run the daemon in the foreground")
    add_config_args(p, server=True)
    p.set_defaults(func=cmd_run)

    cfg = sub.add_parser("config", help="inspect the configuration").add_subparsers(dest="action", metavar="ACTION")
    cfg.required = True
    p = cfg.add_parser("show", help="print effective values and where each came from")
    add_config_args(p, server=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_show)

    tok = sub.add_parser("token", help="manage API tokens").add_subparsers(dest="action", metavar="ACTION")
    tok.required = True
    p = tok.add_parser("create", help="create a token (printed once)")
    p.add_argument("--user", required=True)
    p.add_argument("--role", choices=("admin", "user", "peer"), default="user")
    p.add_argument("--label", default="")
    add_config_args(p)
    p.set_defaults(func=with_store(_token_create))
    p = tok.add_parser("list", help="list tokens (never their secrets)")
    p.add_argument("--user")
    p.add_argument("--json", action="store_true")
    add_config_args(p)
    p.set_defaults(func=with_store(_token_list))
    p = tok.add_parser("revoke", help="revoke a token by id")
    p.add_argument("id")
    add_config_args(p)
    p.set_defaults(func=with_store(_token_revoke))

    for register in _domain_registrars():
        register(sub, add_config_args)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
    return parser


def _domain_registrars() -> list[Callable[..., None]]:
    """Subcommands owned by domain packages (init, chat, ingest, models, keys, peers, social)."""
    from mongarsd import chat_client, firstboot
    from mongarsd.cognition.iris import cli as iris_cli
    from mongarsd.inference import cli as model_cli
    from mongarsd.mesh import cli as mesh_cli
    from mongarsd.social import cli as social_cli

    registrars: list[Callable[..., None]] = [
        firstboot.register,
        chat_client.register,
        iris_cli.register,
        model_cli.register,
        mesh_cli.register,
        social_cli.register,
    ]
    return registrars


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == [EVOLUTION_TRIAL_COMMAND]:
        # The Evolution Engine's sandboxed trial, in a build that has no `python -m` (PyInstaller).
        from mongarsd.maintenance import trial

        return trial.main(args_list[1:])
    if "structlog" not in sys.modules:
        # structlog formats exceptions with rich whenever rich is importable (a test dependency
        # brings it); mongarsd logs plain tracebacks, so rich and pygments (3.4 MB resident) stay
        # out of its processes. Before build_parser: the subcommands' modules import structlog.
        sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    parser = build_parser()
    args = parser.parse_args(args_list)
    from mongarsd.log import configure_logging

    # Commands print their results on stdout; logs go to stderr, quietly, unless `run` says otherwise.
    configure_logging("console", "warning", stream=sys.stderr)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as err:
        print(f"mongarsd: configuration error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except MongarsError as err:
        print(f"mongarsd: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
