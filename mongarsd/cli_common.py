"""Command-line helpers shared by the top-level CLI and the domain sub-CLIs (models, keys, peers).

The sub-CLIs import these from here, never from `mongarsd.cli`, so the entry point stays on top.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def add_config_args(p: argparse.ArgumentParser, *, server: bool = False) -> None:
    p.add_argument("--config", type=Path, help="config file (default /etc/mongarsd/mongarsd.toml when present)")
    p.add_argument("--state-dir", type=Path, help="state directory (database, keys, lock)")
    p.add_argument("--models-dir", type=Path, help="directory holding model files")
    p.add_argument("--profile", help="board profile to use instead of the detected one")
    if server:
        p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
        p.add_argument("--port", type=int, help="HTTP port (default 8642)")
        p.add_argument("--log-format", choices=("auto", "json", "console"), help="log format")
        p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="log level")


def load_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """Detect the board and load the layered config the way `run` would."""
    from mongarsd.board import detect_board
    from mongarsd.config import load_config

    board = detect_board()
    profile = getattr(args, "profile", None) or os.environ.get("MONGARSD_PROFILE") or board.profile
    cli: dict[str, dict[str, Any]] = {
        "server": {
            "host": getattr(args, "host", None),
            "port": getattr(args, "port", None),
            "state_dir": getattr(args, "state_dir", None),
            "models_dir": getattr(args, "models_dir", None),
        },
        "log": {"format": getattr(args, "log_format", None), "level": getattr(args, "log_level", None)},
    }
    loaded = load_config(profile=profile, config_path=getattr(args, "config", None), cli=cli)
    return loaded, board
