"""Small file-system helpers shared by every layer; this module imports nothing from the project."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically with mode 0600 (blocking; run in a thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of DATA to the file descriptor FD and fsync it (blocking; run in a thread)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)
