"""Real HashiCorp Serf agents on loopback as the side-by-side gossip reference for P10.

Each agent binds its own loopback address (127.0.2.k:7946, RPC on 127.0.2.k:7373) with the
LAN profile (memberlist DefaultLANConfig: probe 1 s / timeout 500 ms, suspicion mult 4,
gossip 200 ms to 3 nodes, push-pull 30 s) and a shared encryption key, like our nodes.
Observations come from the agents' own log lines, read as they are written and stamped with
this process's monotonic clock on arrival:

    [INFO] serf: EventMemberUpdate: s7           -> the observer saw s7's new tags
    [INFO] serf: EventMemberFailed: s7 127.0.2.8 -> the observer marked s7 failed
    [INFO] memberlist: Suspect s7 has failed, no acks received  -> the prober suspects s7

Bytes: every agent sends go-metrics counters to a statsd listener of ours
(`memberlist.udp.sent/received`, `memberlist.tcp.sent/received`).

`ensure_serf()` installs the Debian package `serf` on demand when running as root.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.common import Skip

SERF_HOST_BASE: Final = "127.0.2."
SERF_BIND_PORT: Final = 7946
SERF_RPC_PORT: Final = 7373
APT_TIMEOUT_S: Final = 300.0
CLI_TIMEOUT_S: Final = 15.0
AGENT_READY_TIMEOUT_S: Final = 20.0
STOP_TIMEOUT_S: Final = 5.0

_EVENT_RE: Final = re.compile(r"serf: EventMember(Join|Update|Failed|Leave|Reap): (\S+)")
_SUSPECT_RE: Final = re.compile(r"memberlist: Suspect (\S+) has failed")
_STATSD_RE: Final = re.compile(r"memberlist\.(udp|tcp)\.(sent|received):([0-9.eE+-]+)\|c")


def parse_agent_line(line: str) -> tuple[str, str] | None:
    """Return (kind, subject) for a Serf/memberlist log line we measure, else None (pure).

    kind is one of join, update, failed, leave, reap, suspect.
    """
    m = _EVENT_RE.search(line)
    if m:
        return m.group(1).lower(), m.group(2)
    m = _SUSPECT_RE.search(line)
    if m:
        return "suspect", m.group(1)
    return None


def parse_statsd(payload: str) -> dict[str, float]:
    """Sum the memberlist byte counters in a statsd datagram: {"udp.sent": bytes, ...} (pure)."""
    out: dict[str, float] = defaultdict(float)
    for m in _STATSD_RE.finditer(payload):
        out[f"{m.group(1)}.{m.group(2)}"] += float(m.group(3))
    return dict(out)


def serf_version() -> str:
    """Return `serf version`'s first line and the Debian package version (blocking)."""
    text = subprocess.run(["serf", "version"], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False).stdout
    first = text.splitlines()[0].strip() if text else "?"
    pkg = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "serf"], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    return f"{first} (Debian serf {pkg.stdout.strip()})" if pkg.returncode == 0 else first


def ensure_serf() -> str:
    """Return the serf binary path, installing Debian's `serf` when root (blocking); else raise Skip."""
    path = shutil.which("serf")
    if path:
        return path
    if os.geteuid() != 0:
        raise Skip("serf is not installed and we are not root to `apt-get install -y serf`")
    if shutil.which("apt-get") is None:
        raise Skip("serf is not installed and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", "install", "-y", "serf"], capture_output=True, text=True, timeout=APT_TIMEOUT_S, env=env, check=False)
    path = shutil.which("serf")
    if proc.returncode != 0 or not path:
        raise Skip(f"`apt-get install -y serf` failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return path


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the bench process dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: async_stop still kills every agent on a normal exit


class _Statsd(asyncio.DatagramProtocol):
    def __init__(self, owner: SerfCluster) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        for key, val in parse_statsd(data.decode(errors="replace")).items():
            self.owner.bytes_total[key] += val


@dataclass
class Observation:
    kind: str
    obs: str
    subj: str
    t: float


@dataclass
class SerfCluster:
    """N real Serf agents on 127.0.2.1..N, their observations and byte counters."""

    n: int
    workdir: Path
    profile: str = "lan"
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    observations: list[Observation] = field(default_factory=list)
    bytes_total: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    _readers: list[asyncio.Task[None]] = field(default_factory=list)
    _statsd: asyncio.DatagramTransport | None = None
    _logs: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def name(i: int) -> str:
        return f"s{i}"

    @staticmethod
    def host(i: int) -> str:
        return f"{SERF_HOST_BASE}{i + 1}"

    def rpc(self, i: int) -> str:
        return f"{self.host(i)}:{SERF_RPC_PORT}"

    async def async_start(self) -> None:
        """Start the statsd listener and N agents; wait until every RPC port answers."""
        loop = asyncio.get_running_loop()
        self._statsd, _ = await loop.create_datagram_endpoint(lambda: _Statsd(self), local_addr=("127.0.0.1", 0))
        statsd_port = self._statsd.get_extra_info("sockname")[1]
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "serf-telemetry.json"
        cfg.write_text(json.dumps({"statsd_addr": f"127.0.0.1:{statsd_port}"}))
        key = base64.b64encode(os.urandom(32)).decode()
        for i in range(self.n):
            name = self.name(i)
            proc = await asyncio.create_subprocess_exec(
                "serf",
                "agent",
                f"-node={name}",
                f"-bind={self.host(i)}:{SERF_BIND_PORT}",
                f"-rpc-addr={self.rpc(i)}",
                f"-encrypt={key}",
                f"-profile={self.profile}",
                f"-config-file={cfg}",
                "-log-level=info",
                "-tag",
                "bench_v=0",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
            self.procs[name] = proc
            self._logs[name] = (self.workdir / f"{name}.log").open("w")
            self._readers.append(asyncio.create_task(self._async_read(name, proc), name=f"serf-log-{name}"))
        deadline = time.monotonic() + AGENT_READY_TIMEOUT_S
        for i in range(self.n):
            while True:
                rc, _ = await self.async_cli("members", f"-rpc-addr={self.rpc(i)}", check=False)
                if rc == 0:
                    break
                if time.monotonic() > deadline:
                    raise Skip(f"serf agent {self.name(i)} RPC not up within {AGENT_READY_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.1)

    async def _async_read(self, name: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        log = self._logs[name]
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                return
            t = time.monotonic()
            line = raw.decode(errors="replace")
            log.write(f"{t:.6f} {line}")
            parsed = parse_agent_line(line)
            if parsed is not None:
                self.observations.append(Observation(kind=parsed[0], obs=name, subj=parsed[1], t=t))

    async def async_cli(self, *args: str, check: bool = True) -> tuple[int, str]:
        """Run `serf <args>`; return (rc, stdout)."""
        proc = await asyncio.create_subprocess_exec(
            "serf", *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            async with asyncio.timeout(CLI_TIMEOUT_S):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise Skip(f"`serf {' '.join(args)}` timed out") from None
        text = out.decode(errors="replace")
        if check and proc.returncode != 0:
            raise Skip(f"`serf {' '.join(args)}` failed ({proc.returncode}): {text.strip()[-300:]}")
        return int(proc.returncode or 0), text

    async def async_join_all(self) -> None:
        """Ask agent 0 to join every other agent (one RPC)."""
        addrs = [f"{self.host(i)}:{SERF_BIND_PORT}" for i in range(1, self.n)]
        if addrs:
            await self.async_cli("join", f"-rpc-addr={self.rpc(0)}", *addrs)

    async def async_alive_counts(self) -> list[int]:
        """Return how many alive members each live agent sees."""
        out: list[int] = []
        for i in range(self.n):
            if self.procs[self.name(i)].returncode is not None:
                continue
            rc, text = await self.async_cli("members", f"-rpc-addr={self.rpc(i)}", "-status=alive", "-format=json", check=False)
            try:
                out.append(len(json.loads(text)["members"]) if rc == 0 else 0)
            except (ValueError, KeyError):
                out.append(0)
        return out

    async def async_set_tag(self, i: int, value: int) -> float:
        """Set bench_v on agent i; return the monotonic time just before the RPC client started."""
        t0 = time.monotonic()
        await self.async_cli("tags", f"-rpc-addr={self.rpc(i)}", "-set", f"bench_v={value}")
        return t0

    def kill(self, i: int) -> float:
        """SIGKILL agent i, as a crash; return the monotonic time of the kill."""
        proc = self.procs[self.name(i)]
        t = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        return t

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.returncode is None]

    async def async_stop(self) -> None:
        """Kill every agent (bounded) and close the listener; idempotent."""
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                pass  # reported by the caller through pids() if it matters
        for t in self._readers:
            t.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers.clear()
        for fh in self._logs.values():
            fh.close()
        self._logs.clear()
        if self._statsd is not None:
            self._statsd.close()
            self._statsd = None
