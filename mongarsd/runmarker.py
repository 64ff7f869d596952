"""Count unclean exits: a marker file lives in the state dir while the daemon runs.

A clean stop removes the marker. Finding it at start means the previous run ended without one
(a native crash, SIGKILL, the OOM killer, power loss), so a persisted counter goes up by one.
Call `begin` only while holding the state dir's instance lock, or a live daemon's marker would
be counted as a crash.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import structlog

from mongarsd.fsutil import atomic_write_private

log = structlog.get_logger("mongarsd.runmarker")

RUNNING_FILE: Final = "running"
UNCLEAN_EXITS_FILE: Final = "unclean_exits"


def read_count(path: Path) -> int:
    """Return the counter stored at `path`, 0 when absent or unreadable (blocking but instantaneous)."""
    try:
        return max(0, int(path.read_text().strip() or 0))
    except (OSError, ValueError):  # absent, or not a number (edited by hand): start over
        return 0


class RunMarker:
    """The running marker and the unclean-exit counter of one state dir (blocking, instantaneous)."""

    def __init__(self, state_dir: Path) -> None:
        self.marker = state_dir / RUNNING_FILE
        self.counter = state_dir / UNCLEAN_EXITS_FILE
        self.unclean_exits = 0

    def begin(self) -> int:
        """Count a previous unclean exit if the marker is there, set the marker; return the count."""
        count = read_count(self.counter)
        try:
            if self.marker.exists():
                count += 1
                atomic_write_private(self.counter, f"{count}\n".encode())
                log.warning("previous_run_crashed", state_dir=str(self.marker.parent), unclean_exits=count)
            atomic_write_private(self.marker, f"{os.getpid()}\n".encode())
        except OSError as err:  # crash accounting must never keep the daemon from serving
            log.warning("run_marker_unwritable", path=str(self.marker), error=str(err))
        self.unclean_exits = count
        return count

    def end(self) -> None:
        """Remove the marker: this run stopped cleanly (idempotent)."""
        try:
            self.marker.unlink(missing_ok=True)
        except OSError as err:  # the next start will count a crash that was not one; say so now
            log.warning("run_marker_unremovable", path=str(self.marker), error=str(err))
