"""Network-namespace lab for real multi-host mesh tests on one machine (root + iproute2).

Layout: one namespace holding a bridge `br0` (kept inside its own namespace so the host's
network is never touched) and N node namespaces, each joined to the bridge by a veth pair
(`eth0` in the node, `pK` on the bridge). Node addresses live in a private test subnet that
exists only inside these namespaces. Every name starts with a per-lab prefix
`mgt<pid>x<k>` so that teardown deletes exactly what the lab made and a later run can remove
what a crashed run left behind (its pid is dead).

    with NetnsLab(3) as lab:
        p = lab.popen(0, sys.executable, "-m", "tests.netns.discovery_runner", ...)
        lab.cut(2)          # node 2's link down on the bridge
        lab.partition([[0, 1], [2]])
        lab.heal_all()

All helpers are blocking (subprocess); call them from tests or threads, not from a loop.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

REPO: Final = Path(__file__).resolve().parents[2]
PREFIX_BASE: Final = "mgt"
DEFAULT_SUBNET: Final = "10.203.0.0/24"
NODE_IF: Final = "eth0"
BRIDGE_IF: Final = "br0"
CMD_TIMEOUT_S: Final = 20.0
PROC_STOP_TIMEOUT_S: Final = 10.0
_PREFIX_RE: Final = re.compile(rf"^{PREFIX_BASE}(\d+)x(\d+)")

_counter = itertools.count()


class NetnsError(RuntimeError):
    """A namespace command failed."""


def unavailable_reason() -> str | None:
    """Return why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


def _run(*cmd: str, check: bool = True, timeout: float = CMD_TIMEOUT_S, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, input=input_text)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    """Return the names of all named network namespaces."""
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(ns: str) -> None:
    """Kill the processes inside a namespace this harness made (by pid), then delete it."""
    pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run("ip", "netns", "del", ns, check=False)


def cleanup_stale(base: str = PREFIX_BASE) -> list[str]:
    """Delete namespaces left by crashed runs (prefix owner pid no longer alive); return them."""
    removed: list[str] = []
    for ns in list_namespaces():
        m = _PREFIX_RE.match(ns)
        if not m or not ns.startswith(base):
            continue
        owner = int(m.group(1))
        if owner == os.getpid() or _pid_alive(owner):
            continue  # a live run (maybe this one) tears its own labs down
        _delete_namespace(ns)
        removed.append(ns)
    return removed


@dataclass(frozen=True)
class NsNode:
    index: int
    ns: str
    ip: str
    bridge_port: str


class LineReader:
    """Read JSON-lines style output of a child without threads, with deadlines."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        os.set_blocking(stream.fileno(), False)
        self._sel.register(stream, selectors.EVENT_READ)
        self.eof = False
        self.lines: list[str] = []

    def readline(self, timeout_s: float) -> str | None:
        """Return the next line, or None at timeout/EOF."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            if self.eof:
                break
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                return None
            chunk = os.read(self._stream.fileno(), 65536)
            if not chunk:
                self.eof = True
                break
            self._buf += chunk
        if b"\n" not in self._buf:
            if self._buf and self.eof:
                tail, self._buf = self._buf, b""
                return tail.decode(errors="replace")
            return None
        raw, self._buf = self._buf.split(b"\n", 1)
        line = raw.decode(errors="replace")
        self.lines.append(line)
        return line

    def close(self) -> None:
        self._sel.close()


class NetnsLab:
    """N node namespaces on one bridge namespace; always torn down completely."""

    def __init__(self, n: int, *, subnet: str = DEFAULT_SUBNET) -> None:
        reason = unavailable_reason()
        if reason:
            raise NetnsError(reason)
        self.prefix = f"{PREFIX_BASE}{os.getpid()}x{next(_counter)}"
        self.bridge_ns = f"{self.prefix}br"
        self._hosts = ipaddress.ip_network(subnet).hosts()
        self._prefixlen = ipaddress.ip_network(subnet).prefixlen
        self._n = n
        self.nodes: list[NsNode] = []
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._group_bridges: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> NetnsLab:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.teardown()

    def setup(self) -> None:
        """Create the bridge namespace and the node namespaces."""
        self._add_ns(self.bridge_ns)
        b = self.bridge_ns
        _run("ip", "-n", b, "link", "set", "lo", "up")
        # No multicast snooping: mDNS (224.0.0.251) must be flooded to every port.
        _run("ip", "-n", b, "link", "add", BRIDGE_IF, "type", "bridge", "mcast_snooping", "0", "stp_state", "0", "forward_delay", "0")
        _run("ip", "-n", b, "link", "set", BRIDGE_IF, "up")
        for _ in range(self._n):
            self.add_node()

    def add_node(self) -> NsNode:
        """Create one more node namespace joined to the bridge; return it."""
        i = len(self.nodes)
        ns = f"{self.prefix}n{i}"
        port = f"p{i}"
        ip = str(next(self._hosts))
        self._add_ns(ns)
        b = self.bridge_ns
        # Create the pair inside the bridge namespace and move the peer straight into the
        # node namespace: nothing ever appears in the host's namespace.
        _run("ip", "-n", b, "link", "add", port, "type", "veth", "peer", "name", NODE_IF, "netns", ns)
        _run("ip", "-n", b, "link", "set", port, "master", BRIDGE_IF, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/{self._prefixlen}", "dev", NODE_IF)
        _run("ip", "-n", ns, "link", "set", NODE_IF, "up")
        _run("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", NODE_IF)
        node = NsNode(i, ns, ip, port)
        self.nodes.append(node)
        return node

    def _add_ns(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self._created.append(ns)

    def teardown(self) -> None:
        """Stop every process started here, then delete every namespace created (idempotent)."""
        for proc in self._procs:
            self.stop_process(proc)
        self._procs.clear()
        for ns in reversed(self._created):
            _delete_namespace(ns)
        self._created.clear()
        leftover = [ns for ns in list_namespaces() if ns.startswith(self.prefix)]
        if leftover:
            raise NetnsError(f"namespaces survived teardown: {leftover}")

    # -- processes -------------------------------------------------------------------------

    def _argv(self, node: int | NsNode, cmd: Sequence[str]) -> list[str]:
        ns = node.ns if isinstance(node, NsNode) else self.nodes[node].ns
        return ["ip", "netns", "exec", ns, *cmd]

    def run(self, node: int | NsNode, *cmd: str, check: bool = True, timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run a command inside a node namespace and wait for it."""
        return _run(*self._argv(node, cmd), check=check, timeout=timeout)

    def popen(self, node: int | NsNode, *cmd: str, **kw: Any) -> subprocess.Popen[bytes]:
        """Start a command inside a node namespace (cwd = repo, stdout piped); stopped at teardown."""
        kw.setdefault("cwd", REPO)
        kw.setdefault("stdout", subprocess.PIPE)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **kw.pop("env", {})}
        proc: subprocess.Popen[bytes] = subprocess.Popen(self._argv(node, cmd), env=env, **kw)
        self._procs.append(proc)
        return proc

    @staticmethod
    def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = PROC_STOP_TIMEOUT_S) -> int:
        """Signal a process we started and wait; SIGKILL if it does not exit in time."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()
        return int(proc.returncode)

    # -- faults ----------------------------------------------------------------------------

    def cut(self, node: int) -> None:
        """Disconnect a node from everyone (its bridge port down)."""
        _run("ip", "-n", self.bridge_ns, "link", "set", self.nodes[node].bridge_port, "down")

    def heal(self, node: int) -> None:
        """Reconnect a node cut with `cut`."""
        _run("ip", "-n", self.bridge_ns, "link", "set", self.nodes[node].bridge_port, "up")

    def _ensure_group_bridge(self, g: int) -> str:
        name = f"brg{g}"
        if name not in self._group_bridges:
            b = self.bridge_ns
            _run("ip", "-n", b, "link", "add", name, "type", "bridge", "mcast_snooping", "0", "stp_state", "0", "forward_delay", "0")
            _run("ip", "-n", b, "link", "set", name, "up")
            self._group_bridges.add(name)
        return name

    def _attach(self, node: NsNode, bridge: str | None) -> None:
        b = self.bridge_ns
        if bridge is None:
            _run("ip", "-n", b, "link", "set", node.bridge_port, "nomaster")
        else:
            _run("ip", "-n", b, "link", "set", node.bridge_port, "master", bridge)

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Split the nodes into groups that reach only each other; unlisted nodes are isolated.

        Each group gets its own bridge (in the bridge namespace) and its members' ports move
        there; unlisted ports are detached from every bridge.
        """
        placed: dict[int, str] = {}
        for g, members in enumerate(groups):
            bridge = self._ensure_group_bridge(g)
            for i in members:
                placed[i] = bridge
        for node in self.nodes:
            self._attach(node, placed.get(node.index))

    def heal_all(self) -> None:
        """Undo partitions and cuts: every port back on the main bridge and up."""
        for node in self.nodes:
            self._attach(node, BRIDGE_IF)
            self.heal(node.index)

    def netem_available(self) -> bool:
        """Return whether the kernel has sch_netem (probed on node 0; some VM kernels lack it)."""
        probe = self.run(0, "tc", "qdisc", "add", "dev", NODE_IF, "root", "netem", "delay", "0ms", check=False)
        if probe.returncode == 0:
            self.run(0, "tc", "qdisc", "del", "dev", NODE_IF, "root", check=False)
            return True
        return False

    def impair(self, node: int, *, loss_pct: float = 0.0, delay_ms: float = 0.0, jitter_ms: float = 0.0) -> None:
        """Add netem loss/delay on a node's egress (replaces any previous impairment).

        Needs sch_netem in the kernel (see `netem_available`); `cut`/`partition` do not.
        """
        args = ["tc", "qdisc", "replace", "dev", NODE_IF, "root", "netem"]
        if delay_ms:
            args += ["delay", f"{delay_ms}ms"] + ([f"{jitter_ms}ms"] if jitter_ms else [])
        if loss_pct:
            args += ["loss", f"{loss_pct}%"]
        self.run(node, *args)

    def clear_impair(self, node: int) -> None:
        """Remove netem from a node."""
        self.run(node, "tc", "qdisc", "del", "dev", NODE_IF, "root", check=False)
