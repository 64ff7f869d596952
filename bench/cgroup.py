"""CPU budgets for benchmarked processes: one cgroup each, cgroup v2 `cpu.max` or v1 CFS quota.

    with CpuBudget("p11-node0", cpus=0.5) as budget:     # picks v2 if its cpu controller is usable
        proc = subprocess.Popen(...)
        budget.add(proc.pid)                             # the process and the threads it starts later
        ...
        stats = budget.stat()                            # throttling counters, for the details
    # removed on exit, always (processes still inside are moved back to the parent first)

v2 is used where a cgroup2 hierarchy lists `cpu` in cgroup.controllers (enabled in the parent's
cgroup.subtree_control if needed); otherwise the v1 `cpu` hierarchy (cpu.cfs_quota_us /
cpu.cfs_period_us). Both need root. Directories are named `mongarsd-bench-<pid>-<name>` so a
crashed run's leftovers are recognisable (`cleanup_stale`).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
PERIOD_US: Final = 100_000
PREFIX: Final = "mongarsd-bench-"
_STALE_RE: Final = re.compile(rf"^{PREFIX}(\d+)-")


class CgroupError(RuntimeError):
    """No usable CPU controller, or a cgroup file could not be written."""


@dataclass(frozen=True, slots=True)
class Controller:
    """Where CPU budgets can be created: the cgroup version and the parent directory."""

    version: int  # 2 or 1
    parent: Path


def quota_files(cpus: float, *, version: int, period_us: int = PERIOD_US) -> dict[str, str]:
    """The files and values that hold a group to `cpus` CPUs (pure).

    v2: `cpu.max` = "<quota> <period>"; v1: cpu.cfs_period_us then cpu.cfs_quota_us (the
    period first: the kernel refuses a quota that does not fit the current period).
    """
    if not cpus > 0:
        raise ValueError(f"cpus must be > 0, got {cpus!r}")
    quota = max(1000, round(cpus * period_us))  # the kernel's floor is 1 ms
    if version == 2:
        return {"cpu.max": f"{quota} {period_us}"}
    if version == 1:
        return {"cpu.cfs_period_us": str(period_us), "cpu.cfs_quota_us": str(quota)}
    raise ValueError(f"unknown cgroup version {version!r}")


def parse_cpu_stat(text: str) -> dict[str, int]:
    """Parse a cpu.stat file ("key value" lines) into ints, skipping anything else (pure)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def find_controller(root: Path = CGROUP_ROOT) -> Controller | None:
    """Return the v2 hierarchy if its cpu controller is usable, else the v1 cpu one, else None.

    Looks at `root` itself (pure v2) and `root/unified` (hybrid) for v2, `root/cpu` (or
    `root/cpu,cpuacct`) for v1. Enables `+cpu` in a v2 root's subtree_control when allowed.
    """
    for v2 in (root, root / "unified"):
        controllers = v2 / "cgroup.controllers"
        if not controllers.is_file():
            continue
        if "cpu" not in controllers.read_text().split():
            continue
        subtree = v2 / "cgroup.subtree_control"
        try:
            if "cpu" not in subtree.read_text().split():
                subtree.write_text("+cpu")
        except OSError:
            continue  # cannot delegate the controller here: try v1
        return Controller(2, v2)
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        if (v1 / "cpu.cfs_quota_us").is_file():
            return Controller(1, v1)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CpuBudget:
    """One cgroup holding its processes to `cpus` CPUs; removed on exit (blocking file I/O)."""

    def __init__(self, name: str, *, cpus: float, controller: Controller | None = None, root: Path = CGROUP_ROOT) -> None:
        ctl = controller if controller is not None else find_controller(root)
        if ctl is None:
            raise CgroupError(f"no usable cpu controller under {root} (needs cgroup v2 `cpu` or v1 `cpu`, and root)")
        self.controller = ctl
        self.cpus = cpus
        self.path = ctl.parent / f"{PREFIX}{os.getpid()}-{name}"
        self._files = quota_files(cpus, version=ctl.version)

    @property
    def method(self) -> str:
        """Which mechanism holds the budget, in words (for the bench details)."""
        if self.controller.version == 2:
            return f"cgroup v2 cpu.max {self._files['cpu.max']} ({self.path})"
        return f"cgroup v1 cpu.cfs_quota_us={self._files['cpu.cfs_quota_us']} cpu.cfs_period_us={self._files['cpu.cfs_period_us']} ({self.path})"

    def __enter__(self) -> CpuBudget:
        try:
            self.path.mkdir()
            for fname, value in self._files.items():
                (self.path / fname).write_text(value)
        except OSError as err:
            self.remove()
            raise CgroupError(f"cannot set up {self.path}: {err}") from err
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads, and what it starts later) into the budget."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as err:
            raise CgroupError(f"cannot move pid {pid} into {self.path}: {err}") from err

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def stat(self) -> dict[str, int]:
        """The group's cpu.stat counters (throttled periods and time), {} if unreadable."""
        try:
            return parse_cpu_stat((self.path / "cpu.stat").read_text())
        except OSError:
            return {}

    def remove(self) -> None:
        """Move any process left back to the parent group and delete the group (idempotent)."""
        remove_group(self.path)


def remove_group(path: Path) -> None:
    """Empty (into the parent) and delete one cgroup directory; ignore one already gone."""
    if not path.is_dir():
        return
    with contextlib.suppress(OSError):
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # exited meanwhile
                (path.parent / "cgroup.procs").write_text(pid)
    with contextlib.suppress(OSError):
        path.rmdir()


def cleanup_stale(root: Path = CGROUP_ROOT) -> list[str]:
    """Remove budget groups left by bench runs whose process is gone; return their paths."""
    removed: list[str] = []
    for parent in (root, root / "unified", root / "cpu", root / "cpu,cpuacct"):
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            m = _STALE_RE.match(child.name)
            if m and child.is_dir() and not _pid_alive(int(m.group(1))):
                remove_group(child)
                removed.append(str(child))
    return removed
