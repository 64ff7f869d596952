"""P10 (gossip convergence, failure detection, bytes per node) and P11 (3-node mesh throughput).

    .venv/bin/python -m bench.mesh [--sizes 3,10,30,50] [--only P10] [--no-serf] [--json out.json]

P10, ours: N GossipNodes with the LAN preset (the real default) on real UDP/TCP sockets, each
bound to its own loopback address 127.0.1.k (127.0.0.0/8 is all loopback on Linux), spread over
several `bench.mesh_node` processes (NODES_PER_PROC each) so that one GIL does not serialize
the cluster. Every process prints JSON lines stamped with CLOCK_MONOTONIC, shared by every
process on the machine, so times compare directly.

  * convergence: `set_local_state` on one node at t0; time until ceil(99.99 % of the N-1
    others) (i.e. all of them for N <= 10000) have seen the new version (their UPDATE event);
  * failure detection: `async_kill` of one node (sockets closed, no LEAVE, as a crash) at t0;
    time until every other node holds it dead (first suspect and all-suspect too);
  * bytes per node: Σ UDP bytes sent + received from `metrics()` over an idle steady-state
    window / N / seconds (KB = 1000 bytes).

Reference: real Serf agents (Debian `serf`, LAN profile, encrypted) on 127.0.2.k, same N,
same host, same run (bench/serf.py), plus the published figures (`reference_published`).
CPU load (our processes, the agents, the whole machine, load average) is recorded with each
figure: on a 2-core machine shared with other work, timings of 30-50 Python nodes are only
as good as the CPU headroom, and the details say so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from bench.common import REPO, Skip, describe_machine, make_entry, skipped_entry
from bench.serf import die_with_parent

OUR_HOST_BASE: Final = "127.0.1."
OUR_PORT: Final = 17946
NODES_PER_PROC: Final = 8
SIZES: Final = (3, 10, 30, 50)
HEADLINE_N: Final = 30
FRACTION: Final = 0.9999
CONVERGENCE_REPS: Final = 3
CONVERGENCE_TIMEOUT_S: Final = 15.0
FAILURE_TIMEOUT_S: Final = 45.0
FAILURE_REPS: Final = 2
BYTES_WINDOW_S: Final = 15.0
SETTLE_S: Final = 2.0
JOIN_TIMEOUT_S: Final = 60.0
READY_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 10.0
POLL_S: Final = 0.02
SATURATED_CPU_PCT: Final = 85.0
DEFAULT_TIMING: Final = "lan"  # what `mongarsd run` uses without configuration
PREVIOUS_TIMING: Final = "memberlist"  # the LAN preset before issue 11 (memberlist DefaultLANConfig)
SIM_SIZES: Final = (30, 100, 200)
SIM_TIMEOUT_S: Final = 300.0

PUBLISHED: Final = {
    "convergence_s": 1.8,
    "failure_detect_s": 5.5,
    "source": (
        "Serf docs: gossip convergence simulator (serf.io/docs/internals/simulator.html) — an update reaches "
        "99.99% of the cluster in ~1.8 s with the LAN defaults (gossip 200 ms, fanout 3); memberlist LAN "
        "defaults (probe 1 s, suspicion mult 4) detect a failure in ~5-6 s (figures as quoted in DESIGN §9)"
    ),
}


# --------------------------------------------------------------------------- pure parts


def plan_processes(n: int, per_proc: int = NODES_PER_PROC) -> list[list[int]]:
    """Split node indices 0..n-1 into balanced groups of at most per_proc (pure)."""
    if n <= 0:
        return []
    groups = math.ceil(n / per_proc)
    return [list(range(n))[g::groups] for g in range(groups)]


def needed_observers(n_others: int, fraction: float = FRACTION) -> int:
    """How many of n_others must have seen an update to count as `fraction` reached (pure)."""
    return min(n_others, math.ceil(fraction * n_others - 1e-9))


def reach_time(t0: float, times: Sequence[float], n_others: int, fraction: float = FRACTION) -> float | None:
    """Seconds from t0 until `fraction` of n_others observed something, or None if never (pure)."""
    need = needed_observers(n_others, fraction)
    after = sorted(t - t0 for t in times)
    if need == 0:
        return 0.0
    if len(after) < need:
        return None
    return max(0.0, after[need - 1])


def quantile(xs: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile (pure)."""
    if not xs:
        return None
    data = sorted(xs)
    return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))]


def first_per_observer(obs: Sequence[tuple[str, float]], exclude: str | None = None) -> dict[str, float]:
    """Return each observer's first time, ignoring `exclude` (pure)."""
    out: dict[str, float] = {}
    for who, t in obs:
        if who != exclude and (who not in out or t < out[who]):
            out[who] = t
    return out


def bytes_per_node_kbps(
    before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]], seconds: float
) -> dict[str, float]:
    """Per-node KB/s (1000 B) of sent+received and sent alone between two metric snapshots (pure)."""
    nodes = [k for k in after if k in before]
    if not nodes or seconds <= 0:
        return {"total_kbps": math.nan, "sent_kbps": math.nan}
    sent = sum(after[k]["bytes_sent"] - before[k]["bytes_sent"] for k in nodes)
    recv = sum(after[k]["bytes_received"] - before[k]["bytes_received"] for k in nodes)
    return {"total_kbps": (sent + recv) / len(nodes) / seconds / 1000.0, "sent_kbps": sent / len(nodes) / seconds / 1000.0}


def summarize_runs(values: Sequence[float | None]) -> dict[str, Any]:
    """Median/min/max of the finite samples, and how many runs did not finish (pure)."""
    ok = sorted(v for v in values if v is not None)
    if not ok:
        return {"median": None, "min": None, "max": None, "samples": list(values), "incomplete": len(values)}
    mid = ok[len(ok) // 2] if len(ok) % 2 else (ok[len(ok) // 2 - 1] + ok[len(ok) // 2]) / 2
    return {
        "median": round(mid, 3),
        "min": round(ok[0], 3),
        "max": round(ok[-1], 3),
        "samples": [None if v is None else round(v, 3) for v in values],
        "incomplete": len(values) - len(ok),
    }


def saturated(cpu_pct_of_machine: float | None, threshold: float = SATURATED_CPU_PCT) -> bool:
    """Whether the machine was busy enough that timings include CPU queueing (pure)."""
    return cpu_pct_of_machine is not None and cpu_pct_of_machine >= threshold


# --------------------------------------------------------------------------- CPU sampling


class CpuSampler:
    """CPU seconds of a set of pids and of the whole machine between start() and stop()."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self._t0 = 0.0
        self._proc0: dict[int, float] = {}
        self._sys0: Any = None

    @staticmethod
    def _cpu(pid: int) -> float | None:
        import psutil

        try:
            t = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # exited meanwhile: ignore it
            return None
        return float(t.user + t.system)

    def start(self) -> None:
        import psutil

        self._t0 = time.monotonic()
        self._proc0 = {p: c for p in self._pids() if (c := self._cpu(p)) is not None}
        self._sys0 = psutil.cpu_times()

    def stop(self) -> dict[str, Any]:
        import psutil

        dt = max(1e-6, time.monotonic() - self._t0)
        used = 0.0
        for p, c0 in self._proc0.items():
            c1 = self._cpu(p)
            if c1 is not None:
                used += c1 - c0
        s0, s1 = self._sys0, psutil.cpu_times()
        busy = (sum(s1) - s1.idle - getattr(s1, "iowait", 0.0)) - (sum(s0) - s0.idle - getattr(s0, "iowait", 0.0))
        total = sum(s1) - sum(s0)
        cores = len(os.sched_getaffinity(0))
        return {
            "window_s": round(dt, 2),
            "cluster_cpu_cores": round(used / dt, 3),
            "cluster_cpu_pct_of_machine": round(100.0 * used / dt / cores, 1),
            "machine_busy_pct": round(100.0 * busy / total, 1) if total > 0 else None,
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "cores": cores,
        }


# --------------------------------------------------------------------------- our cluster


@dataclass
class _Runner:
    proc: asyncio.subprocess.Process
    hosts: list[str]
    replies: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    ids: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None


class Cluster(Protocol):
    n: int

    def pids(self) -> list[int]: ...
    async def async_alive_counts(self) -> list[int]: ...
    async def async_set(self, index: int, v: int) -> tuple[float, str]: ...
    def updates_of(self, subject: str, v: int, since: float) -> list[tuple[str, float]]: ...
    async def async_kill(self, index: int) -> tuple[float, str]: ...
    def failures_of(self, subject: str, kind: str, since: float) -> list[tuple[str, float]]: ...
    async def async_bytes(self) -> dict[str, dict[str, float]]: ...
    async def async_stop(self) -> None: ...


class OurCluster:
    """N GossipNodes in ceil(N / NODES_PER_PROC) bench.mesh_node processes on 127.0.1.k."""

    def __init__(self, n: int, *, timing: str = "lan", per_proc: int = NODES_PER_PROC) -> None:
        self.n = n
        self.timing = timing
        self.groups = plan_processes(n, per_proc)
        self.runners: list[_Runner] = []
        self.index: dict[int, tuple[_Runner, int, str]] = {}  # node index -> (runner, local idx, id)
        self.events: list[dict[str, Any]] = []
        self.join_failures = 0

    def pids(self) -> list[int]:
        return [r.proc.pid for r in self.runners if r.proc.returncode is None]

    async def async_start(self) -> None:
        key = os.urandom(32).hex()
        for group in self.groups:
            hosts = [f"{OUR_HOST_BASE}{i + 1}" for i in group]
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.mesh_node",
                "--hosts",
                ",".join(hosts),
                "--port",
                str(OUR_PORT),
                "--key-hex",
                key,
                "--timing",
                self.timing,
                cwd=REPO,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                limit=2**22,
                preexec_fn=die_with_parent,
            )
            runner = _Runner(proc=proc, hosts=hosts)
            runner.reader = asyncio.create_task(self._async_read(runner), name=f"bench-runner-{proc.pid}")
            self.runners.append(runner)
        for runner, group in zip(self.runners, self.groups, strict=True):
            ready = await self._async_reply(runner, "ready", READY_TIMEOUT_S)
            runner.ids = [n["id"] for n in ready["nodes"]]
            for local, (i, nid) in enumerate(zip(group, runner.ids, strict=True)):
                self.index[i] = (runner, local, nid)
        seed = [[f"{OUR_HOST_BASE}1", OUR_PORT], [f"{OUR_HOST_BASE}2", OUR_PORT]] if self.n > 1 else []
        # Each process joins its nodes one after another (the seed accepts a bounded number of
        # concurrent streams); the processes join in parallel.
        for r in self.runners:
            self._send(r, {"cmd": "join", "seeds": seed})
        for r in self.runners:
            joined = await self._async_reply(r, "joined", JOIN_TIMEOUT_S)
            self.join_failures += sum(1 for ok in joined["ok"] if ok == 0)

    async def _async_read(self, runner: _Runner) -> None:
        assert runner.proc.stdout is not None
        while True:
            line = await runner.proc.stdout.readline()
            if not line:
                return
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("ev") in ("update", "suspect", "dead"):
                self.events.append(ev)
            else:
                runner.replies.put_nowait(ev)

    def _send(self, runner: _Runner, cmd: Mapping[str, Any]) -> None:
        assert runner.proc.stdin is not None
        runner.proc.stdin.write((json.dumps(cmd) + "\n").encode())

    async def _async_reply(self, runner: _Runner, ev: str, timeout_s: float = 20.0) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    msg = await runner.replies.get()
                    if msg.get("ev") == ev:
                        return msg
                    if msg.get("ev") == "error":
                        raise Skip(f"mesh_node error: {msg.get('error')}")
        except TimeoutError:
            raise Skip(
                f"mesh_node pid {runner.proc.pid} did not answer {ev!r} within {timeout_s:.0f} s (rc={runner.proc.returncode})"
            ) from None

    async def _async_all(self, cmd: Mapping[str, Any], ev: str) -> list[dict[str, Any]]:
        live = [r for r in self.runners if r.proc.returncode is None]
        for r in live:
            self._send(r, cmd)
        return [await self._async_reply(r, ev) for r in live]

    async def async_alive_counts(self) -> list[int]:
        out: list[int] = []
        for reply in await self._async_all({"cmd": "views"}, "views"):
            out.extend(int(v) for v in reply["alive"].values())
        return out

    async def async_set(self, index: int, v: int) -> tuple[float, str]:
        runner, local, nid = self.index[index]
        self._send(runner, {"cmd": "set", "node": local, "v": v})
        reply = await self._async_reply(runner, "set")
        return float(reply["t"]), nid

    def updates_of(self, subject: str, v: int, since: float) -> list[tuple[str, float]]:
        return [(e["obs"], float(e["t"])) for e in self.events if e["ev"] == "update" and e["subj"] == subject and e["v"] == v]

    async def async_kill(self, index: int) -> tuple[float, str]:
        runner, local, nid = self.index[index]
        for r in self.runners:
            self._send(r, {"cmd": "watch", "subject": nid})
        for r in self.runners:
            await self._async_reply(r, "watching")
        self._send(runner, {"cmd": "kill", "node": local})
        reply = await self._async_reply(runner, "killed")
        return float(reply["t"]), nid

    def failures_of(self, subject: str, kind: str, since: float) -> list[tuple[str, float]]:
        return [(e["obs"], float(e["t"])) for e in self.events if e["ev"] == kind and e["subj"] == subject and e["t"] >= since]

    async def async_bytes(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for reply in await self._async_all({"cmd": "metrics"}, "metrics"):
            out.update(reply["nodes"])
        return out

    async def async_stop(self) -> None:
        for r in self.runners:
            if r.proc.returncode is None and r.proc.stdin is not None:
                try:
                    self._send(r, {"cmd": "stop"})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # already gone
        for r in self.runners:
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await r.proc.wait()
            except TimeoutError:
                r.proc.kill()
                await r.proc.wait()
            if r.reader is not None:
                r.reader.cancel()
        await asyncio.gather(*(r.reader for r in self.runners if r.reader is not None), return_exceptions=True)


class SerfAdapter:
    """bench.serf.SerfCluster seen through the same measuring interface."""

    def __init__(self, n: int, workdir: Path) -> None:
        from bench.serf import SerfCluster

        self.n = n
        self.c = SerfCluster(n=n, workdir=workdir)
        self.t0_source = "serf tags RPC client spawn"

    def pids(self) -> list[int]:
        return self.c.pids()

    async def async_start(self) -> None:
        await self.c.async_start()
        await self.c.async_join_all()

    async def async_alive_counts(self) -> list[int]:
        return await self.c.async_alive_counts()

    async def async_set(self, index: int, v: int) -> tuple[float, str]:
        t_spawn = await self.c.async_set_tag(index, v)
        name = self.c.name(index)

        # The origin agent logs its own EventMemberUpdate when the new tags are applied locally:
        # that is the same instant as our set_local_state, without the RPC client's start-up.
        def own_times() -> list[float]:
            return [o.t for o in self.c.observations if o.kind == "update" and o.obs == name and o.subj == name and o.t >= t_spawn]

        await async_wait(lambda: bool(own_times()), 0.5)  # its log line may still be in the pipe
        own = own_times()
        if own:
            self.t0_source = "origin agent's own EventMemberUpdate log line"
            return min(own), name
        self.t0_source = "serf tags RPC client spawn (origin logged no self-update)"
        return t_spawn, name

    def updates_of(self, subject: str, v: int, since: float) -> list[tuple[str, float]]:
        return [(o.obs, o.t) for o in self.c.observations if o.kind == "update" and o.subj == subject and o.t >= since]

    async def async_kill(self, index: int) -> tuple[float, str]:
        return self.c.kill(index), self.c.name(index)

    def failures_of(self, subject: str, kind: str, since: float) -> list[tuple[str, float]]:
        want = {"suspect": ("suspect", "failed"), "dead": ("failed",)}[kind]
        return [(o.obs, o.t) for o in self.c.observations if o.kind in want and o.subj == subject and o.t >= since]

    async def async_bytes(self) -> dict[str, dict[str, float]]:
        await asyncio.sleep(0.3)  # go-metrics' statsd sink flushes every 100 ms
        b = self.c.bytes_total
        return {"all": {"bytes_sent": b["udp.sent"], "bytes_received": b["udp.received"], "tcp": b["tcp.sent"] + b["tcp.received"]}}

    async def async_stop(self) -> None:
        await self.c.async_stop()


# --------------------------------------------------------------------------- measuring


async def async_wait(pred: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


async def async_wait_membership(cluster: Cluster, timeout_s: float = JOIN_TIMEOUT_S) -> float:
    """Wait until every node sees all N alive; return seconds waited or raise Skip."""
    t0 = time.monotonic()
    while True:
        counts = await cluster.async_alive_counts()
        if len(counts) == cluster.n and min(counts) >= cluster.n:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise Skip(f"membership did not converge within {timeout_s:.0f} s (alive views {sorted(counts)[:5]}...)")
        await asyncio.sleep(0.5)


async def async_measure(
    cluster: Cluster,
    *,
    reps: int,
    log: Callable[[str], None],
    bytes_window_s: float = BYTES_WINDOW_S,
    failure_reps: int = FAILURE_REPS,
) -> dict[str, Any]:
    """Convergence reps, an idle bytes window, then one crash; all on an already-joined cluster."""
    n = cluster.n
    out: dict[str, Any] = {"n": n}
    out["membership_s"] = round(await async_wait_membership(cluster), 2)
    await asyncio.sleep(SETTLE_S)
    rng = random.Random(n)

    # Convergence: a fresh version from a different node each rep.
    conv: list[float | None] = []
    conv_p50: list[float | None] = []
    cpu = CpuSampler(cluster.pids)
    cpu.start()
    for rep in range(1, reps + 1):
        origin = rng.randrange(n)
        t0, subject = await cluster.async_set(origin, rep)
        need = needed_observers(n - 1)

        def reached(subject: str = subject, rep: int = rep, t0: float = t0, need: int = need) -> bool:
            return len(first_per_observer(cluster.updates_of(subject, rep, t0), subject)) >= need

        await async_wait(reached, CONVERGENCE_TIMEOUT_S)
        seen = first_per_observer(cluster.updates_of(subject, rep, t0), subject)
        conv.append(reach_time(t0, list(seen.values()), n - 1))
        conv_p50.append(reach_time(t0, list(seen.values()), n - 1, 0.5))
        log(f"    N={n} rep {rep}: {len(seen)}/{n - 1} saw it, 99.99% in {conv[-1]}")
        await asyncio.sleep(1.0)
    out["convergence_s"] = summarize_runs(conv)
    out["convergence_p50_s"] = summarize_runs(conv_p50)
    out["cpu_during_convergence"] = cpu.stop()

    # Bytes per node over an idle window.
    cpu = CpuSampler(cluster.pids)
    before = await cluster.async_bytes()
    cpu.start()
    t_b0 = time.monotonic()
    await asyncio.sleep(bytes_window_s)
    after = await cluster.async_bytes()
    window = time.monotonic() - t_b0
    out["cpu_idle_window"] = cpu.stop()
    if "all" in after:  # Serf: one aggregate counter for all agents
        sent = after["all"]["bytes_sent"] - before["all"]["bytes_sent"]
        recv = after["all"]["bytes_received"] - before["all"]["bytes_received"]
        out["bytes_per_node_kbps"] = round((sent + recv) / n / window / 1000.0, 3)
        out["bytes_sent_per_node_kbps"] = round(sent / n / window / 1000.0, 3)
        out["tcp_push_pull_per_node_kbps"] = round((after["all"]["tcp"] - before["all"]["tcp"]) / n / window / 1000.0, 3)
    else:
        rates = bytes_per_node_kbps(before, after, window)
        out["bytes_per_node_kbps"] = round(rates["total_kbps"], 3)
        out["bytes_sent_per_node_kbps"] = round(rates["sent_kbps"], 3)
        out["drops"] = sum(int(v.get("drops", 0)) for v in after.values())
        out["probe_failures"] = sum(int(v.get("probe_failures", 0)) for v in after.values())

    # Failure detection: crash nodes one after another (the highest indices), each time until
    # every remaining node holds it dead.
    cpu = CpuSampler(cluster.pids)
    cpu.start()
    runs: list[dict[str, Any]] = []
    for k in range(min(failure_reps, max(0, n - 2)) or 1):
        victim = n - 1 - k
        others = n - 1 - k
        t_kill, subject = await cluster.async_kill(victim)

        def all_dead(subject: str = subject, t_kill: float = t_kill, others: int = others) -> bool:
            return len(first_per_observer(cluster.failures_of(subject, "dead", t_kill), subject)) >= others

        await async_wait(all_dead, FAILURE_TIMEOUT_S)
        dead = first_per_observer(cluster.failures_of(subject, "dead", t_kill), subject)
        suspect = first_per_observer(cluster.failures_of(subject, "suspect", t_kill), subject)
        runs.append(
            {
                "detect_s": reach_time(t_kill, list(dead.values()), others),
                "first_dead_s": None if not dead else min(dead.values()) - t_kill,
                "first_suspect_s": None if not suspect else min(suspect.values()) - t_kill,
                "all_suspect_s": reach_time(t_kill, list(suspect.values()), others),
                "observers": f"{len(dead)}/{others}",
            }
        )
        log(f"    N={n} crash {k + 1}: all {others} others hold it dead after {runs[-1]['detect_s']}")
        await asyncio.sleep(1.0)
    out["cpu_during_failure"] = cpu.stop()
    for key in ("detect_s", "first_dead_s", "first_suspect_s", "all_suspect_s"):
        out[f"failure_{key}"] = summarize_runs([r[key] for r in runs])["median"]
    out["failure_detect_runs"] = summarize_runs([r["detect_s"] for r in runs])
    out["failure_observers"] = [r["observers"] for r in runs]
    cpus = [out["cpu_during_convergence"], out["cpu_idle_window"], out["cpu_during_failure"]]
    out["machine_saturated"] = any(saturated(c.get("machine_busy_pct")) for c in cpus)
    return out


async def async_run_one(kind: str, n: int, *, reps: int, workdir: Path, log: Callable[[str], None], timing: str = "lan") -> dict[str, Any]:
    """Start a cluster of `kind` ("ours" or "serf"), measure it, and stop it (always)."""
    cluster: OurCluster | SerfAdapter = OurCluster(n, timing=timing) if kind == "ours" else SerfAdapter(n, workdir / f"serf-{n}")
    t0 = time.monotonic()
    try:
        await cluster.async_start()
        log(f"  {kind} N={n}: started in {time.monotonic() - t0:.1f} s")
        res = await async_measure(cluster, reps=reps, log=log)
        if isinstance(cluster, OurCluster):
            res["timing"] = timing
            res["join_failures"] = cluster.join_failures
            res["processes"] = len(cluster.groups)
        else:
            res["t0_source"] = cluster.t0_source
        return res
    finally:
        await cluster.async_stop()


def _loopback_hosts_ok() -> str | None:
    """Return why 127.0.1.x/127.0.2.x cannot be bound here, or None (blocking)."""
    import socket

    for host in (f"{OUR_HOST_BASE}1", "127.0.2.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, 0))
            except OSError as err:
                return f"cannot bind {host}: {err}"
    return None


async def async_p10(
    sizes: Sequence[int], *, serf: bool, reps: int, log: Callable[[str], None], previous: bool = True, simulate: bool = True
) -> dict[str, Any]:
    """Measure ours and Serf for each N (and our previous timing at the headline N), simulate N = 100/200; build P10."""
    task = asyncio.current_task()
    if task is not None:  # SIGTERM unwinds like Ctrl-C: every cluster is stopped in its finally
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    if (why := _loopback_hosts_ok()) is not None:
        return skipped_entry("P10", why)
    serf_note: str | None = None
    serf_version = None
    if serf:
        from bench.serf import ensure_serf
        from bench.serf import serf_version as version

        try:
            await asyncio.to_thread(ensure_serf)
            serf_version = await asyncio.to_thread(version)
        except Skip as err:
            serf_note = str(err)
    else:
        serf_note = "disabled (--no-serf)"
    table: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mongarsd-bench-mesh-") as tmp:
        for n in sizes:
            row: dict[str, Any] = {"n": n}
            kinds = ["ours", "serf"] + (["previous"] if previous and n == HEADLINE_N else [])
            for kind in kinds:
                if kind == "serf" and serf_note is not None:
                    row["serf"] = {"skipped": serf_note}
                    continue
                timing = PREVIOUS_TIMING if kind == "previous" else DEFAULT_TIMING
                log(f"P10 {kind} N={n} ({'serf' if kind == 'serf' else timing}) ...")
                try:
                    row[kind] = await async_run_one(
                        "serf" if kind == "serf" else "ours", n, reps=reps, workdir=Path(tmp), log=log, timing=timing
                    )
                except Skip as err:
                    row[kind] = {"skipped": str(err)}
                    log(f"  {kind} N={n} skipped: {err}")
            table.append(row)
    sim = await async_simulation(log) if simulate else {"skipped": "disabled (--no-sim)"}
    return build_p10_entry(table, serf_version=serf_version, serf_note=serf_note, simulation=sim)


async def async_simulation(log: Callable[[str], None], sizes: Sequence[int] = SIM_SIZES) -> dict[str, Any]:
    """Run bench.mesh_sim in a child process (bounded by SIM_TIMEOUT_S); return its rows and fits."""
    log(f"P10 simulation N={','.join(str(n) for n in sizes)} (in-memory network, virtual clock) ...")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.mesh_sim", "--sizes", ",".join(str(n) for n in sizes), "--json",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent,
    )  # fmt: skip
    try:
        async with asyncio.timeout(SIM_TIMEOUT_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"skipped": f"simulation did not finish within {SIM_TIMEOUT_S:.0f} s"}
    finally:
        if proc.returncode is None:  # cancelled (Ctrl-C, SIGTERM): never leave it running
            proc.kill()
            await proc.wait()
    text = err.decode(errors="replace")
    log("\n".join(line for line in text.splitlines() if not line.startswith("  sim ")))
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"skipped": f"bench.mesh_sim failed ({proc.returncode}): {text.strip()[-300:]}"}
    res = dict(json.loads(lines[-1]))
    res["table_text"] = text[text.find("   N |") :].rstrip() if "   N |" in text else None
    return res


def _get(row: Mapping[str, Any], kind: str, *path: str) -> Any:
    cur: Any = row.get(kind) or {}
    for p in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(p)
    return cur


def timing_summary(name: str) -> dict[str, Any]:
    """The knobs of a timing preset that decide detection time and probe traffic (pure)."""
    from mongarsd.mesh.gossip import PRESETS

    t = PRESETS[name]
    return {
        "preset": name,
        "probe_interval_s": t.probe_interval_s,
        "probe_timeout_s": t.probe_timeout_s,
        "indirect_checks": t.indirect_checks,
        "suspicion_mult": t.suspicion_mult,
        "suspicion_max_timeout_mult": t.suspicion_max_timeout_mult,
        "gossip_interval_s": t.gossip_interval_s,
        "gossip_nodes": t.gossip_nodes,
    }


def timing_trade(head: Mapping[str, Any]) -> dict[str, Any] | None:
    """Detection, convergence and KB/s of the previous timing vs the default, same N, same run (pure)."""
    if _get(head, "previous", "convergence_s", "median") is None:
        return None

    def figures(kind: str) -> dict[str, Any]:
        return {
            **timing_summary(PREVIOUS_TIMING if kind == "previous" else DEFAULT_TIMING),
            "failure_detect_s": _get(head, kind, "failure_detect_s"),
            "convergence_s": _get(head, kind, "convergence_s", "median"),
            "bytes_per_node_kbps": _get(head, kind, "bytes_per_node_kbps"),
        }

    prev, now = figures("previous"), figures("ours")
    ratio = None
    if prev["bytes_per_node_kbps"] and now["bytes_per_node_kbps"]:
        ratio = round(now["bytes_per_node_kbps"] / prev["bytes_per_node_kbps"], 2)
    return {"n": head["n"], "previous": prev, "default": now, "bandwidth_ratio": ratio}


def build_p10_entry(
    table: Sequence[Mapping[str, Any]],
    *,
    serf_version: str | None,
    serf_note: str | None,
    simulation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Pick the headline N (30, else the largest measured) and build the P10 entry (pure)."""
    measured = [r for r in table if _get(r, "ours", "convergence_s", "median") is not None]
    if not measured:
        reasons = "; ".join(f"N={r['n']}: {_get(r, 'ours', 'skipped')}" for r in table)
        return skipped_entry("P10", f"no cluster size measured ({reasons})")
    head = next((r for r in measured if r["n"] == HEADLINE_N), max(measured, key=lambda r: r["n"]))
    value = _get(head, "ours", "convergence_s", "median")
    serf_conv = _get(head, "serf", "convergence_s", "median")
    if serf_conv is not None:
        reference, source = serf_conv, f"real Serf agents ({serf_version}), LAN profile, encrypted, same N={head['n']}, same host, same run"
    else:
        reference, source = PUBLISHED["convergence_s"], str(PUBLISHED["source"])
    compact = [
        {
            "n": r["n"],
            "ours_convergence_s": _get(r, "ours", "convergence_s", "median"),
            "serf_convergence_s": _get(r, "serf", "convergence_s", "median"),
            "ours_failure_detect_s": _get(r, "ours", "failure_detect_s"),
            "serf_failure_detect_s": _get(r, "serf", "failure_detect_s"),
            "ours_bytes_per_node_kbps": _get(r, "ours", "bytes_per_node_kbps"),
            "serf_bytes_per_node_kbps": _get(r, "serf", "bytes_per_node_kbps"),
            "ours_machine_saturated": _get(r, "ours", "machine_saturated"),
            **(
                {
                    "previous_convergence_s": _get(r, "previous", "convergence_s", "median"),
                    "previous_failure_detect_s": _get(r, "previous", "failure_detect_s"),
                    "previous_bytes_per_node_kbps": _get(r, "previous", "bytes_per_node_kbps"),
                }
                if "previous" in r
                else {}
            ),
        }
        for r in table
    ]
    saturated_any = any(_get(r, "ours", "machine_saturated") for r in table)
    from mongarsd.mesh.gossip import PRESETS
    from mongarsd.mesh.suspicion import suspicion_bounds

    def floor(name: str) -> dict[str, float]:
        t = PRESETS[name]
        return {
            str(r["n"]): round(
                suspicion_bounds(
                    suspicion_mult=t.suspicion_mult,
                    max_timeout_mult=t.suspicion_max_timeout_mult,
                    n_members=r["n"],
                    probe_interval_s=t.probe_interval_s,
                )[0],
                2,
            )
            for r in table
        }

    details = {
        "method": (
            f"ours: the default timing preset ({DEFAULT_TIMING!r}, what `mongarsd run` uses unconfigured; at the headline N "
            f"also the previous one, {PREVIOUS_TIMING!r}, = memberlist's DefaultLANConfig) on real UDP/TCP sockets; "
            "Serf: its LAN profile; one loopback address per node (127.0.1.k for ours, 127.0.2.k for Serf); "
            f"ours spread over bench.mesh_node processes of <= {NODES_PER_PROC} nodes; convergence = set_local_state / "
            "`serf tags -set` on one node until every other node has the new version (its UPDATE event / "
            "EventMemberUpdate log line), median of reps; failure = async_kill / SIGKILL of one node at a time "
            f"({FAILURE_REPS} crashes, median) until every "
            "other node holds it dead (EventMemberFailed for Serf); bytes = UDP bytes sent+received per node over an "
            f"idle {BYTES_WINDOW_S:.0f} s window (ours: GossipNode.metrics(); Serf: memberlist.udp.* counters via statsd; "
            "TCP push-pull excluded on both sides, Serf's shown apart); CLOCK_MONOTONIC shared by all processes"
        ),
        "headline_n": head["n"],
        "table": compact,
        "runs": list(table),
        "reference_published": {k: v for k, v in PUBLISHED.items() if k != "source"},
        "reference_published_source": PUBLISHED["source"],
        "serf": serf_version or serf_note,
        "timing": timing_summary(DEFAULT_TIMING),
        "timing_trade": timing_trade(head),
        "min_suspicion_s": {DEFAULT_TIMING: floor(DEFAULT_TIMING), PREVIOUS_TIMING: floor(PREVIOUS_TIMING)},
        "failure_note": (
            "detection = first failed probe (~1 probe interval) + the Lifeguard suspicion timeout, at least "
            "suspicion_mult x max(1, log10 N) x probe interval (min_suspicion_s; up to 6x that until two other "
            "members confirm) + the dead broadcast. memberlist's LAN rules (probe 1 s, what Serf runs) put the floor "
            "alone at 5.9 s for N = 30, so neither Serf nor the previous preset can meet 6 s there; the default preset "
            "probes every 0.5 s and gossips every 0.1 s (same multipliers), halving every term for twice the probe "
            "traffic (timing_trade)"
        ),
        "simulation": simulation,
        "cpu_note": (
            "2-core machine shared with other work: timings include CPU queueing where machine_saturated is true"
            if saturated_any
            else "machine not saturated during the measured windows (see cpu_* per run)"
        ),
    }
    return make_entry(
        "P10",
        value=value,
        reference=reference,
        unit="s",
        failure_detect_s=_get(head, "ours", "failure_detect_s"),
        bytes_per_node_kbps=_get(head, "ours", "bytes_per_node_kbps"),
        reference_source=source,
        serf_failure_detect_s=_get(head, "serf", "failure_detect_s"),
        serf_bytes_per_node_kbps=_get(head, "serf", "bytes_per_node_kbps"),
        previous_failure_detect_s=_get(head, "previous", "failure_detect_s"),
        details=details,
    )


# --------------------------------------------------------------------------- P11

P11_MODEL_FILE: Final = "SmolLM2-135M-Instruct-Q4_1.gguf"
P11_MODEL_ID: Final = "smollm2-135m-instruct:q4_1"
P11_API_PORT: Final = 8642
P11_GOSSIP_PORT: Final = 8643
# Saturating load: per node, one client per engine slot plus a few waiting behind them, so every
# slot stays busy with a queue behind it; the lone node gets its share, the mesh three shares.
# (Three nodes' worth of clients on one node mostly buys 429s, each answered inside the same CPU
# budget: on the dev machine, 1 slot, 12 clients, the lone node refused ~7 requests/s and
# completed 14 in 30 s, where the same node completed 22 as the mesh's entry.)
P11_WAITING_PER_NODE: Final = 3
P11_DURATION_S: Final = 60.0  # the failover run's counted window (the kill comes 10 s into it)
# The lone node and the mesh are measured in alternating windows, lone-mesh-mesh-lone (ABBA), per
# load kind, and each side's windows are pooled: a drift of the host's speed (on an AVX2 EPYC VM,
# single-thread llama-bench tg64 moved between 50 and 90 t/s within a minute) then weighs on both
# sides alike. Measured one after the other (lone node first, then the mesh, one 60 s window
# each), that VM read the two ratios at 3.2-3.7 (non-streamed) and 2.1-2.2 (streamed) in two runs.
P11_WINDOW_S: Final = 30.0  # per window; 2 windows per side and load kind: 60 s counted per side, as before
P11_PAIRS: Final = 2  # (lone, mesh) pairs per load kind; the second pair runs in the reverse order
P11_LONE_NODE: Final = 3  # the reference daemon: its own namespace, budget and cluster key, no peers
P11_WARMUP_S: Final = 8.0
# A legitimate wait, not a hang: a daemon admits up to slots + queue_depth (4 + 16 here) requests
# and never drops queued work, and the saturating load keeps every client's request in the system,
# so a request's latency is clients / throughput (Little's law). Under 0.5 CPU a node completes
# ~0.2 requests/s: ~35 s for 7 clients per node in the mesh, ~52 s once the failover run's kill
# leaves 21 clients on two nodes, and a request the dead node held is retried at the back of a
# survivor's queue, so it waits twice. A 60 s client limit turned those into "lost" requests the
# daemons still answered 200 after 64-70 s (mesh_forwarded elapsed_ms in the kept logs). 180 s is
# 3x the mean wait after the kill, and below common client defaults (the OpenAI SDKs wait 600 s).
P11_REQUEST_TIMEOUT_S: Final = 180.0
P11_BACKOFF_S: Final = 1.0
P11_MAX_TOKENS: Final = 48
P11_READY_TIMEOUT_S: Final = 180.0
P11_MESH_TIMEOUT_S: Final = 60.0
P11_CPUS_PER_NODE: Final = 0.5  # each daemon's budget (its own cgroup), the lone node's too
P11_LLAMA_THREADS: Final = 1
P11_KILL_AFTER_S: Final = 10.0  # failover run: SIGKILL a peer this long into the counted window
P11_KILLED_NODE: Final = 2
P11_PHASES: Final = ("single", "single_stream", "mesh", "mesh_stream", "failover")
FORWARD_EVENTS: Final = ("mesh_forwarded", "mesh_forward_failed", "mesh_forward_broken_mid_stream")
LOST_STATUSES_OK: Final = frozenset({"200", "429", "503"})  # 429/503 = refused with Retry-After, retried by the client


def throughput_summary(single: Mapping[str, Any], mesh: Mapping[str, Any]) -> dict[str, Any]:
    """Tokens decoded per second inside the counted windows, completed requests/s, and their ratios (pure)."""

    def per_s(r: Mapping[str, Any], key: str) -> float | None:
        el = float(r.get("elapsed_s") or 0.0)
        n = float(r.get(key) or 0.0)
        return n / el if el > 0 and n > 0 else None

    one, three = per_s(single, "completed"), per_s(mesh, "completed")
    one_t, three_t = per_s(single, "tokens"), per_s(mesh, "tokens")
    one_w, three_w = per_s(single, "window_tokens"), per_s(mesh, "window_tokens")
    return {
        "single_window_tokens_per_s": one_w,
        "mesh_window_tokens_per_s": three_w,
        "ratio": (three_w / one_w) if one_w and three_w else None,
        "single_rps": one,
        "mesh_rps": three,
        "requests_ratio": (three / one) if one and three else None,
        "single_tokens_per_s": one_t,
        "mesh_tokens_per_s": three_t,
        "tokens_ratio": (three_t / one_t) if one_t and three_t else None,
        "single_errors": int(single.get("errors") or 0),
        "mesh_errors": int(mesh.get("errors") or 0),
    }


def window_order(pairs: int) -> list[str]:
    """Sides of the interleaved windows: "single", "mesh", then reversed each other pair (ABBA...) (pure)."""
    order: list[str] = []
    for k in range(pairs):
        order.extend(("single", "mesh") if k % 2 == 0 else ("mesh", "single"))
    return order


def pool_windows(windows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One side's windows as one load run: counts, statuses and served-by summed, time added up (pure)."""
    statuses: dict[str, int] = {}
    served: dict[str, int] = {}
    for w in windows:
        for key, n in (w.get("statuses") or {}).items():
            statuses[key] = statuses.get(key, 0) + int(n)
        for key, n in (w.get("served_by_header") or {}).items():
            served[key] = served.get(key, 0) + int(n)
    return {
        "completed": sum(int(w.get("completed") or 0) for w in windows),
        "errors": sum(int(w.get("errors") or 0) for w in windows),
        "tokens": sum(int(w.get("tokens") or 0) for w in windows),
        "window_tokens": round(sum(float(w.get("window_tokens") or 0.0) for w in windows), 1),
        "elapsed_s": sum(float(w.get("elapsed_s") or 0.0) for w in windows),
        "statuses": statuses,
        "served_by_header": served,
        "scheduler": _sum_counts([w.get("scheduler") or {} for w in windows]),
        "per_window_completed": [int(w.get("completed") or 0) for w in windows],
        "windows": list(windows),
    }


def _sum_counts(maps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Add up count maps key by key, nested maps (per-peer counts) included (pure)."""
    out: dict[str, Any] = {}
    for m in maps:
        for key, val in m.items():
            if isinstance(val, Mapping):
                out[key] = _sum_counts([out.get(key, {}), val])
            elif isinstance(val, int | float) and not isinstance(val, bool):
                out[key] = out.get(key, 0) + val
    return out


def clients_for(nodes: int, slots: int) -> int:
    """Concurrent clients that saturate `nodes` daemons of `slots` engine slots each (pure)."""
    return max(1, nodes) * (max(1, slots) + P11_WAITING_PER_NODE)


def engine_slots(lines: Sequence[str]) -> int | None:
    """The engine's slot count from a daemon's JSON log (its llm_started line), None if absent (pure)."""
    for line in lines:
        if '"llm_started"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        slots = rec.get("slots") if isinstance(rec, dict) else None
        if isinstance(slots, int) and slots > 0:
            return slots
    return None


def lost_requests(run: Mapping[str, Any]) -> int:
    """Requests the client never got an answer for: transport errors and statuses other than 200/429/503 (pure)."""
    return sum(int(n) for status, n in (run.get("statuses") or {}).items() if status not in LOST_STATUSES_OK)


def count_log_events(lines: Sequence[str], events: Sequence[str] = FORWARD_EVENTS) -> dict[str, Any]:
    """Count forwarding events in a daemon's JSON log lines: per event, and mesh_forwarded per peer (pure)."""
    counts: dict[str, Any] = {e: 0 for e in events}
    by_peer: dict[str, int] = {}
    for line in lines:
        if '"event"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        ev = rec.get("event") if isinstance(rec, dict) else None
        if ev in counts:
            counts[ev] += 1
            if ev == "mesh_forwarded":
                peer = str(rec.get("peer"))
                by_peer[peer] = by_peer.get(peer, 0) + 1
    counts["forwarded_to"] = by_peer
    return counts


def diff_counts(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """after - before for count_log_events results, nested per-peer maps included (pure)."""
    out: dict[str, Any] = {}
    for key, val in after.items():
        prev = before.get(key)
        if isinstance(val, Mapping):
            prev_map = prev if isinstance(prev, Mapping) else {}
            out[key] = {k: int(v) - int(prev_map.get(k, 0)) for k, v in val.items() if int(v) - int(prev_map.get(k, 0))}
        else:
            out[key] = int(val) - int(prev or 0)
    return out


def scheduler_choices(per_daemon: Mapping[str, Mapping[str, Any]], entry: str = "daemon0") -> dict[str, Any]:
    """Summarize one phase's forwarding: first hops from the entry, second hops from the others (pure).

    The client only talks to the entry node, so every forward made by another node is a
    request forwarded twice.
    """
    first = per_daemon.get(entry, {})
    second = sum(int(c.get("mesh_forwarded", 0)) for d, c in per_daemon.items() if d != entry)
    return {
        "forwarded_by_entry": int(first.get("mesh_forwarded", 0)),
        "entry_forwarded_to": dict(first.get("forwarded_to", {})),
        "forwarded_twice": second,
        "forward_failures": sum(int(c.get("mesh_forward_failed", 0)) for c in per_daemon.values()),
        "broken_mid_stream": sum(int(c.get("mesh_forward_broken_mid_stream", 0)) for c in per_daemon.values()),
    }


def p11_missing() -> str | None:
    """Return why the 3-node throughput measurement cannot run yet, or None (file checks)."""
    for rel in ("mongarsd/mesh/service.py", "mongarsd/mesh/forward.py"):
        if not (REPO / rel).is_file():
            return f"{rel} (mesh service / request forwarding) is not there yet"
    if "MeshService" not in (REPO / "mongarsd" / "daemon.py").read_text(encoding="utf-8"):
        return "the daemon does not start MeshService yet (mongarsd/daemon.py _mesh_services)"
    if not (REPO / "models" / P11_MODEL_FILE).is_file():
        return f"models/{P11_MODEL_FILE} is missing"
    from tests.netns.harness import unavailable_reason

    return unavailable_reason()


def load_prompt_start(seed: int, client: int, request: int) -> int:
    """The first number of a load request's counting prompt: unique per (seed, client, request) (pure).

    Every start has 8 digits, so every prompt has the same length. A window's `seed` keeps its
    prompts apart from every other window's: the engine keeps idle conversations' KV cells and
    restores a prompt it has seen, so a window that repeated an earlier window's prompts on the
    same node skipped their prompt processing (a quarter of a 48-token request's cost), and the
    lone node's second run had read 24 -> 36 completions per 60 s.
    """
    if not (0 <= seed < 90 and 0 <= client < 100):
        raise ValueError(f"seed {seed} / client {client} out of range")
    return 10_000_000 + seed * 1_000_000 + client * 10_000 + (request % 100) * 100


def window_share(tokens: float, t_first: float, t_last: float, w_start: float, w_end: float) -> float:
    """The part of a request's `tokens` decoded inside [w_start, w_end), its decode spread evenly over [t_first, t_last] (pure)."""
    if tokens <= 0 or w_end <= w_start:
        return 0.0
    if t_last <= t_first:
        return float(tokens) if w_start <= t_last < w_end else 0.0
    overlap = min(t_last, w_end) - max(t_first, w_start)
    return float(tokens) * max(0.0, overlap) / (t_last - t_first)


async def async_load(
    base: str, *, concurrency: int, duration_s: float, warmup_s: float, max_tokens: int, stream: bool = False, seed: int = 0
) -> dict[str, Any]:
    """Saturate POST /v1/completions with `concurrency` clients; count completions after warm-up.

    Streamed: a request completes when its SSE stream ends with `data: [DONE]`; tokens are the
    content chunks. A stream cut short counts as `stream_cut` (a lost request).

    `window_tokens` are the tokens decoded inside the counted window, whether their request ended
    in it or after it: each answer's completion_tokens, spread over its decode (first to last
    content chunk when streamed; the server's timings.predicted_ms up to the answer otherwise).
    Whole answers are a coarse count for a lone node, whose four slots start and finish together:
    its completions come in bursts of four, and a 30 s window held 3 or 4 of them.
    """
    import aiohttp

    from bench.llm import count_prompt

    url = base.rstrip("/") + "/v1/completions"
    t_start = time.monotonic()
    t_measure = t_start + warmup_s
    t_end = t_measure + duration_s
    completed = errors = tokens = 0
    window_tokens = 0.0
    statuses: dict[str, int] = {}
    served_by: dict[str, int] = {}
    latencies: list[float] = []  # seconds, of the requests answered 200 inside the counted window

    async def client(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal completed, errors, tokens, window_tokens
        i = 0
        while time.monotonic() < t_end:
            i += 1
            # Equal work per request: a counting prompt at temperature 0 runs to max_tokens (no early
            # EOS), a new start each time (no prefix-cache hit). Free text stops at random lengths,
            # and requests/s then compares different amounts of decoding.
            body = {
                "model": P11_MODEL_ID,
                "prompt": count_prompt(load_prompt_start(seed, k, i)),
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "stream": stream,
            }
            if stream:
                body["stream_options"] = {"include_usage": True}
            chunks = 0
            usage_tokens: int | None = None
            t_chunk_first = t_chunk_last = 0.0
            done_marker = False
            t_sent = time.monotonic()
            try:
                async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=P11_REQUEST_TIMEOUT_S)) as resp:
                    node = resp.headers.get("X-Mongars-Served-By", "local")
                    retry_after = resp.headers.get("Retry-After", "")
                    if stream and resp.status == 200:
                        data = b""
                        async for raw_line in resp.content:
                            line = raw_line.strip()
                            if line == b"data: [DONE]":
                                done_marker = True
                            elif line.startswith(b"data: "):
                                try:
                                    event = json.loads(line[6:])
                                except ValueError:
                                    continue
                                usage = event.get("usage") if isinstance(event, dict) else None
                                if isinstance(usage, dict) and not event.get("choices"):
                                    usage_tokens = int(usage.get("completion_tokens") or 0)
                                    continue
                                chunks += 1
                                t_chunk_last = time.monotonic()
                                t_chunk_first = t_chunk_first or t_chunk_last
                    else:
                        data = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as err:
                statuses[type(err).__name__] = statuses.get(type(err).__name__, 0) + 1
                errors += 1
                continue
            t_recv = time.monotonic()
            if resp.status == 200 and (not stream or done_marker):
                if stream:
                    window_tokens += window_share(usage_tokens or chunks, t_chunk_first, t_chunk_last, t_measure, t_end)
                else:
                    n, predicted_s = _answer_tokens(data)
                    window_tokens += window_share(n, t_recv - predicted_s if predicted_s is not None else t_sent, t_recv, t_measure, t_end)
            if resp.status in (429, 503):  # overloaded: back off as a well-behaved client does
                try:
                    pause = float(retry_after)
                except ValueError:
                    pause = P11_BACKOFF_S
                await asyncio.sleep(min(max(pause, 0.05), P11_BACKOFF_S))
            if time.monotonic() < t_measure:
                continue  # warm-up: models load, queues fill
            if stream and resp.status == 200 and not done_marker:
                statuses["stream_cut"] = statuses.get("stream_cut", 0) + 1
                errors += 1
                continue
            statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
            if resp.status == 200 and time.monotonic() <= t_end:
                completed += 1
                latencies.append(time.monotonic() - t_sent)
                served_by[node] = served_by.get(node, 0) + 1
                if stream:
                    tokens += usage_tokens or chunks
                    continue
                try:
                    tokens += int(json.loads(data).get("usage", {}).get("completion_tokens", 0))
                except (ValueError, AttributeError, TypeError):
                    pass  # counted as a completion; tokens are a detail
            elif resp.status != 200:
                errors += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session, k) for k in range(concurrency)))
    return {
        "completed": completed,
        "errors": errors,
        "tokens": tokens,
        "window_tokens": round(window_tokens, 1),
        "elapsed_s": duration_s,
        "concurrency": concurrency,
        "stream": stream,
        "statuses": statuses,
        "served_by_header": served_by,
        "latency_s": latency_summary(latencies),
    }


def _answer_tokens(data: bytes) -> tuple[int, float | None]:
    """completion_tokens and timings.predicted_ms (in s) of a non-streamed answer; (0, None) if unreadable (pure)."""
    try:
        body = json.loads(data)
        n = int(body.get("usage", {}).get("completion_tokens", 0))
    except (ValueError, AttributeError, TypeError):
        return 0, None
    timings = body.get("timings")
    ms = timings.get("predicted_ms") if isinstance(timings, dict) else None
    return n, (float(ms) / 1000.0 if isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0 else None)


def latency_summary(latencies: Sequence[float]) -> dict[str, float | None]:
    """Median, p95 and max of request latencies in seconds, rounded; None where there are none (pure)."""

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 2)

    return {"p50": r(quantile(latencies, 0.5)), "p95": r(quantile(latencies, 0.95)), "max": r(max(latencies, default=None))}


async def async_wait_peers(base: str, want: int, timeout_s: float) -> int:
    """Poll GET /api/v1/peer/list until `want` members are alive; return how many are."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    alive = 0
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(base + "/api/v1/peer/list", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    body = await resp.json()
                alive = sum(1 for m in body.get("members", []) if m.get("state") == "alive")
                if alive >= want:
                    return alive
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass  # not up yet
            await asyncio.sleep(0.5)
    return alive


def _p11_in_ns(lab: Any, node: int, *args: str, timeout_s: float) -> dict[str, Any]:
    """Run `python -m bench.mesh --p11-client ...` inside a namespace; return its JSON (blocking)."""
    proc = lab.run(node, sys.executable, "-m", "bench.mesh", "--p11-client", *args, check=False, timeout=timeout_s)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise Skip(f"P11 client in namespace failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")


def run_p11(log: Callable[[str], None], *, keep_logs: bool = False, phases_wanted: Sequence[str] = P11_PHASES) -> dict[str, Any]:
    """3 daemons in 3 namespaces vs 1, each in its own CPU budget, the same load on ONE entry node (blocking).

    `keep_logs` keeps the daemons' logs and state dirs (bench.run --keep-logs); `phases_wanted`
    runs a subset (P11_PHASES names, from BENCH_P11_PHASES) to diagnose one phase quickly.
    """
    why = p11_missing()
    if why is not None:
        return skipped_entry("P11", why)
    from bench import cgroup
    from tests.netns.harness import NetnsLab, cleanup_stale

    ctl = cgroup.find_controller()
    if ctl is None:
        return skipped_entry("P11", "no cgroup cpu controller (v2 cpu.max or v1 cfs quota) to give each daemon its own CPU budget")
    cleanup_stale()
    cgroup.cleanup_stale()
    work = Path(tempfile.mkdtemp(prefix="mongarsd-bench-p11-"))
    base = f"http://127.0.0.1:{P11_API_PORT}"
    client_timeout = max(P11_DURATION_S, P11_WINDOW_S) + P11_WARMUP_S + P11_REQUEST_TIMEOUT_S + 60
    phases: dict[str, dict[str, Any]] = {}
    procs: dict[int, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            # Entered first, left last: the groups are removed after the lab stopped the daemons
            # (and a group still holding a process is emptied into its parent first).
            budgets = [stack.enter_context(cgroup.CpuBudget(f"p11-node{i}", cpus=P11_CPUS_PER_NODE, controller=ctl)) for i in range(4)]
            lab = stack.enter_context(NetnsLab(4))
            states = [work / f"state{i}" for i in range(4)]
            # One cluster key for the mesh's three (what `mongarsd keys generate/install` would
            # write); the lone node has a key of its own, so it never joins them.
            from mongarsd.mesh.keyring import Keyring, generate_key
            from mongarsd.mesh.service import keyring_path

            keyring = Keyring(generate_key())
            for i, st in enumerate(states):
                keyring_path(st).parent.mkdir(parents=True, exist_ok=True)
                (Keyring(generate_key()) if i == P11_LONE_NODE else keyring).save(keyring_path(st))
            empty = work / "empty.toml"
            empty.write_text("")
            for st in states:  # the daemons listen beyond loopback, which needs a token to exist
                tok = subprocess.run(
                    [sys.executable, "-m", "mongarsd", "token", "create", "--user", "admin", "--role", "admin", "--state-dir", str(st)],
                    capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
                    env={**os.environ, "MONGARSD_CONFIG": str(empty)},
                )  # fmt: skip
                if tok.returncode != 0:
                    return skipped_entry("P11", f"`mongarsd token create` failed: {(tok.stderr or tok.stdout).strip()[-300:]}")
            seeds = ",".join(f"{n.ip}:{P11_GOSSIP_PORT}" for n in lab.nodes[:3])

            def start(i: int) -> None:
                env = {
                    "MONGARSD_CONFIG": str(empty),
                    "MONGARSD_LOG__FORMAT": "json",
                    "MONGARSD_LOG__LEVEL": "info",  # mesh_forwarded lines are the scheduler's choices
                    "MONGARSD_MESH__ENABLED": "true",
                    "MONGARSD_EMBED__PRELOAD": "false",  # completions only: the embedder would just take memory
                    "MONGARSD_INFERENCE__THREADS": str(P11_LLAMA_THREADS),
                    "MONGARSD_INFERENCE__THREADS_BATCH": str(P11_LLAMA_THREADS),
                    # the load comes from one loopback client: measure throughput, not the rate limiter
                    "MONGARSD_AUTH__RATE_LIMIT_RPS": "100000",
                    "MONGARSD_AUTH__RATE_LIMIT_BURST": "100000",
                    "MONGARSD_MESH__GOSSIP_PORT": str(P11_GOSSIP_PORT),
                    "MONGARSD_MESH__ADVERTISE_HOST": lab.nodes[i].ip,
                    "MONGARSD_MESH__SEEDS": f"{lab.nodes[i].ip}:{P11_GOSSIP_PORT}" if i == P11_LONE_NODE else seeds,
                    # idle-time work would start on the side resting between windows, on the same cores
                    "MONGARSD_SOMMEIL__ENABLED": "false",
                    "MONGARSD_MESH__MDNS": "false",  # static seeds: no multicast chatter on the measured cores
                    "MONGARSD_MESH__SKIP_VIRTUAL_INTERFACES": "false",  # eth0 in a namespace is a veth
                }
                log_fh = stack.enter_context((work / f"daemon{i}.log").open("wb"))
                proc = lab.popen(
                    i,
                    sys.executable, "-m", "mongarsd", "run", "--host", "0.0.0.0", "--port", str(P11_API_PORT),
                    "--state-dir", str(states[i]), "--models-dir", str(REPO / "models"),
                    env=env, stdout=log_fh, stderr=subprocess.STDOUT,
                )  # fmt: skip
                # `ip netns exec` execs the daemon in place: this pid is the daemon from now on,
                # and every thread it starts (llama.cpp's) is born inside the budget.
                budgets[i].add(proc.pid)
                procs[i] = proc

            def daemons() -> list[int]:
                return sorted(procs)

            seeds_used: list[str] = []  # one prompt seed per load run: no run repeats another's prompts

            def counters() -> dict[str, dict[str, float]]:
                """Each live daemon's engine counters, read inside its namespace (skips a dead one)."""
                out: dict[str, dict[str, float]] = {}
                for i in daemons():
                    if procs[i].poll() is not None:
                        continue
                    with contextlib.suppress(Skip, ValueError, subprocess.TimeoutExpired):
                        out[f"daemon{i}"] = _p11_in_ns(lab, i, "--url", base, "--metrics", timeout_s=30)
                return out

            def events() -> dict[str, dict[str, Any]]:
                return {f"daemon{i}": count_log_events(_read_lines(work / f"daemon{i}.log")) for i in daemons()}

            def phase(
                name: str, *, stream: bool, nodes: int, during: Callable[[], None] | None = None, duration_s: float = P11_WINDOW_S
            ) -> dict[str, Any]:
                clients = clients_for(nodes, slots)
                entry = P11_LONE_NODE if nodes == 1 else 0
                log(f"  P11: {name} ({'streamed' if stream else 'non-streamed'}), {clients} clients ...")
                seed = len(seeds_used)
                seeds_used.append(name)
                args = ["--url", base, "--concurrency", str(clients), "--duration", str(duration_s), "--seed", str(seed)]
                ev0, cpu0, thr0 = events(), _cpu_seconds(procs), [b.stat() for b in budgets]
                counters0 = counters()
                t0 = time.monotonic()
                if during is None:
                    res = _p11_in_ns(lab, entry, *args, *(["--stream"] if stream else []), timeout_s=client_timeout)
                else:
                    import concurrent.futures

                    with concurrent.futures.ThreadPoolExecutor(1) as pool:
                        fut = pool.submit(_p11_in_ns, lab, entry, *args, *(["--stream"] if stream else []), timeout_s=client_timeout)
                        during()
                        res = fut.result()
                dt = time.monotonic() - t0
                cpu1, thr1 = _cpu_seconds(procs), [b.stat() for b in budgets]
                counters1 = counters()
                res["engine"] = {
                    d: {**engine_work(counters0[d], c), "cpu_s": round(cpu1[i] - cpu0[i], 2)}
                    for i in daemons()
                    if (d := f"daemon{i}") in counters0 and (c := counters1.get(d)) is not None and i in cpu0 and i in cpu1
                }
                per = {d: diff_counts(ev0.get(d, {}), c) for d, c in events().items()}
                res["scheduler"] = scheduler_choices(per, entry=f"daemon{entry}")
                res["forward_log_counts"] = per
                res["cpu_cores_used"] = {f"daemon{i}": round((cpu1[i] - cpu0[i]) / dt, 3) for i in cpu0 if i in cpu1}
                res["cgroup_throttled_periods"] = {
                    f"daemon{i}": thr1[i].get("nr_throttled", 0) - thr0[i].get("nr_throttled", 0) for i in range(4) if thr0[i]
                }
                res["lost"] = lost_requests(res)
                log(
                    f"    {res['completed']} completed in {duration_s:.0f} s, served by {res['served_by_header']}, "
                    f"statuses {res['statuses']}, scheduler {res['scheduler']}, cpu {res['cpu_cores_used']}, "
                    f"engines {res['engine']}"
                )
                return res

            for i in (P11_LONE_NODE, 0, 1, 2):
                start(i)
            if _p11_in_ns(lab, P11_LONE_NODE, "--url", base, "--wait-peers", "1", timeout_s=P11_READY_TIMEOUT_S + 10).get("alive", 0) < 1:
                return skipped_entry("P11", "the lone daemon did not come up")
            alive = int(_p11_in_ns(lab, 0, "--url", base, "--wait-peers", "3", timeout_s=P11_READY_TIMEOUT_S + 10).get("alive", 0))
            if alive < 3:
                return skipped_entry("P11", f"the mesh did not form: the entry node sees {alive} alive member(s)")
            slots = engine_slots(_read_lines(work / f"daemon{P11_LONE_NODE}.log")) or 1
            for stream, suffix in ((False, ""), (True, "_stream")):
                windows: dict[str, list[dict[str, Any]]] = {"single": [], "mesh": []}
                for k, side in enumerate(window_order(P11_PAIRS)):
                    if side + suffix not in phases_wanted:
                        continue
                    what = "one daemon" if side == "single" else "three daemons"
                    windows[side].append(phase(f"{what}, window {k + 1}", stream=stream, nodes=1 if side == "single" else 3))
                for side, runs in windows.items():
                    if runs:
                        phases[side + suffix] = pool_windows(runs)
            killed: dict[str, Any] = {}

            def kill_peer() -> None:
                time.sleep(P11_WARMUP_S + P11_KILL_AFTER_S)
                killed["t_into_window_s"] = P11_KILL_AFTER_S
                procs[P11_KILLED_NODE].kill()  # SIGKILL: no LEAVE, sockets reset, as a crash
                killed["rc"] = procs[P11_KILLED_NODE].wait(timeout=10)
                log(f"    SIGKILLed daemon{P11_KILLED_NODE} {P11_KILL_AFTER_S:.0f} s into the counted window")

            if "failover" in phases_wanted:
                phases["failover"] = phase(
                    "three daemons, one SIGKILLed mid-load", stream=False, nodes=3, during=kill_peer, duration_s=P11_DURATION_S
                )
                phases["failover"]["killed"] = {"node": f"daemon{P11_KILLED_NODE}", **killed}
            logs = {f"daemon{i}": _tail_errors(work / f"daemon{i}.log") for i in range(4)}
            method = budgets[0].method
    finally:
        if keep_logs:
            log(f"  P11: daemon logs and state dirs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return build_p11_entry(phases, budget_method=method, cgroup_version=ctl.version, daemon_warnings=logs, slots=slots)


def build_p11_entry(
    phases: Mapping[str, Mapping[str, Any]],
    *,
    budget_method: str,
    cgroup_version: int,
    daemon_warnings: Mapping[str, Any],
    slots: int = 1,
) -> dict[str, Any]:
    """The P11 entry: non-streamed ratio as the value, streamed ratio and failover losses beside it (pure)."""
    s = throughput_summary(phases.get("single", {}), phases.get("mesh", {}))
    st = throughput_summary(phases.get("single_stream", {}), phases.get("mesh_stream", {}))
    fail = phases.get("failover", {})
    return make_entry(
        "P11",
        value=s["mesh_window_tokens_per_s"],
        reference=s["single_window_tokens_per_s"],
        unit="tokens/s",
        ratio=s["ratio"],
        stream_ratio=st["ratio"],
        requests_ratio=s["requests_ratio"],
        stream_requests_ratio=st["requests_ratio"],
        failover_lost=lost_requests(fail) if fail else None,
        details={
            "method": (
                f"4 namespaces on a bridge, `mongarsd run` in each (mesh enabled, default LAN timing, static seeds, "
                f"{P11_LLAMA_THREADS} llama.cpp thread, Sommeil off so no idle-time work runs on the side resting "
                f"between windows): three share a cluster key and form the mesh, the fourth (the lone reference node) has a "
                f"key of its own and no peers. Each daemon in its own cgroup held to "
                f"{P11_CPUS_PER_NODE} CPU ({'v2 cpu.max' if cgroup_version == 2 else 'v1 CFS quota: the v2 hierarchy has no cpu controller here'}), "
                f"so 3 nodes have 3x one node's compute "
                f"(1.5 of the machine's CPUs; the load client runs outside the budgets). Saturating load: per node, one "
                f"client per engine slot ({slots}) + {P11_WAITING_PER_NODE} waiting, i.e. {clients_for(1, slots)} concurrent "
                f"clients for the lone node and {clients_for(3, slots)} for the mesh, /v1/completions (a counting prompt at temperature 0, so every request decodes max_tokens = {P11_MAX_TOKENS}) against one entry node "
                f"only. Non-streamed, then streamed: {2 * P11_PAIRS} windows each, lone and mesh alternating "
                f"({'-'.join(window_order(P11_PAIRS))}), each {P11_WARMUP_S:.0f} s warm-up then {P11_WINDOW_S:.0f} s counted, "
                f"and each side's windows pooled, so a drift of the host's speed weighs on both sides. Throughput: tokens decoded "
                f"inside the counted windows per second (each answer's tokens spread over its decode: first to last streamed chunk, "
                f"or the server's timings.predicted_ms up to the answer), whether the answer came in the window or after it; "
                f"completed requests/s beside it (requests_ratio). Every load run has prompts of its own (no run repeats another's: "
                f"the engine restores prompts it has seen); "
                f"429/503 answers are retried "
                f"after Retry-After (<= {P11_BACKOFF_S:.0f} s); a client waits up to {P11_REQUEST_TIMEOUT_S:.0f} s for an answer "
                f"(saturated queues: latency = clients / throughput). Failover: the non-streamed load on the mesh again "
                f"({P11_WARMUP_S:.0f} s warm-up, {P11_DURATION_S:.0f} s counted), daemon{P11_KILLED_NODE} "
                f"SIGKILLed {P11_KILL_AFTER_S:.0f} s into the counted window; lost = transport errors and statuses other "
                "than 200/429/503. Scheduler choices from the daemons' mesh_forwarded log lines: the client talks to the "
                "entry only, so a forward made by another node is a request forwarded twice"
            ),
            "cpu_budget": budget_method,
            "cgroup_version": cgroup_version,
            "engine_slots": slots,
            "clients": {"single": clients_for(1, slots), "mesh": clients_for(3, slots)},
            "summary": s,
            "summary_stream": st,
            "failover": {
                "completed": fail.get("completed"),
                "lost": lost_requests(fail) if fail else None,
                "statuses": fail.get("statuses"),
                "latency_s": fail.get("latency_s"),
                "request_timeout_s": P11_REQUEST_TIMEOUT_S,
                "scheduler": fail.get("scheduler"),
                "killed": fail.get("killed"),
            },
            "scheduler": {name: p.get("scheduler") for name, p in phases.items()},
            "phases": dict(phases),
            "cores": len(os.sched_getaffinity(0)),
            "daemon_warnings": dict(daemon_warnings),
        },
    )


def _read_lines(path: Path) -> list[str]:
    """Return a log file's lines, [] if unreadable (blocking)."""
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _cpu_seconds(procs: Mapping[int, Any]) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each running daemon (blocking)."""
    import psutil

    out: dict[int, float] = {}
    for i, proc in procs.items():
        try:
            t = psutil.Process(proc.pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # killed (failover) or gone
            continue
        out[i] = float(t.user + t.system)
    return out


def _tail_errors(path: Path, limit: int = 8) -> list[str]:
    """Return the last warning/error lines of a daemon's JSON log (blocking)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    bad = [ln[:400] for ln in lines if re.search(r'"level":\s*"(warning|error|critical)"', ln) or "Traceback" in ln]
    return bad[-limit:]


ENGINE_COUNTERS: Final = ("n_decode_total", "n_busy_slots_per_decode", "tokens_predicted_total", "prompt_tokens_total")


def parse_engine_counters(text: str) -> dict[str, float]:
    """The engine's llamacpp:* counters from a /metrics page, summed over label sets (pure)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("llamacpp:"):
            continue
        name, _, value = line.rpartition(" ")
        key = name.split("{", 1)[0].removeprefix("llamacpp:")
        if key not in ENGINE_COUNTERS:
            continue
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


def engine_work(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    """What an engine did between two counter snapshots: decode steps, mean busy slots per step, tokens (pure)."""

    def busy(c: Mapping[str, float]) -> float:
        return float(c.get("n_busy_slots_per_decode", 0.0)) * float(c.get("n_decode_total", 0.0))

    steps = float(after.get("n_decode_total", 0.0)) - float(before.get("n_decode_total", 0.0))
    return {
        "decode_steps": int(steps),
        "busy_slots_per_step": round((busy(after) - busy(before)) / steps, 3) if steps > 0 else None,
        "tokens_predicted": int(float(after.get("tokens_predicted_total", 0.0)) - float(before.get("tokens_predicted_total", 0.0))),
        "prompt_tokens": int(float(after.get("prompt_tokens_total", 0.0)) - float(before.get("prompt_tokens_total", 0.0))),
    }


async def async_engine_counters(base: str) -> dict[str, float]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.get(base.rstrip("/") + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp,
    ):
        return parse_engine_counters(await resp.text())


async def async_p11_client(args: argparse.Namespace) -> dict[str, Any]:
    if args.metrics:
        return await async_engine_counters(args.url)
    if args.wait_peers:
        return {"alive": await async_wait_peers(args.url, int(args.wait_peers), P11_READY_TIMEOUT_S)}
    return await async_load(
        args.url,
        concurrency=args.concurrency,
        duration_s=args.duration,
        warmup_s=P11_WARMUP_S,
        max_tokens=P11_MAX_TOKENS,
        stream=bool(args.stream),
        seed=int(args.seed),
    )


# --------------------------------------------------------------------------- entry points


def _only_from_bench_run(argv: Sequence[str]) -> set[str] | None:
    """The ids of `python -m bench.run --only ...` (bench.run calls run(results) without them) (pure)."""
    if not argv or not argv[0].endswith(("bench/run.py", "bench.run")):
        return None
    for i, arg in enumerate(argv):
        text = argv[i + 1] if arg == "--only" and i + 1 < len(argv) else arg.removeprefix("--only=") if arg.startswith("--only=") else None
        if text:
            return {p.strip().upper() for p in text.split(",") if p.strip()}
    return None


def run(
    results: dict[str, Any],
    *,
    sizes: Sequence[int] = SIZES,
    serf: bool = True,
    reps: int = CONVERGENCE_REPS,
    only: set[str] | None = None,
    simulate: bool = True,
) -> None:
    """Fill results["P10"] and results["P11"] (bench.run's team-module hook)."""
    only = only or _only_from_bench_run(sys.argv) or {"P10", "P11"}

    def log(msg: str) -> None:
        print(msg, flush=True)

    if "P10" in only:
        results["P10"] = asyncio.run(async_p10(sizes, serf=serf, reps=reps, log=log, simulate=simulate))
        results["P10"]["machine"] = describe_machine()
        if not results["P10"].get("skipped"):
            log(format_p10_table(results["P10"]))
    if "P11" in only:
        wanted = [p.strip() for p in os.environ.get("BENCH_P11_PHASES", "").split(",") if p.strip()] or P11_PHASES
        results["P11"] = run_p11(log, keep_logs="--keep-logs" in sys.argv, phases_wanted=wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mesh", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--reps", type=int, default=CONVERGENCE_REPS)
    parser.add_argument("--only", default="P10,P11")
    parser.add_argument("--no-serf", action="store_true")
    parser.add_argument("--no-sim", action="store_true", help="skip the N = 100/200 simulation")
    parser.add_argument("--json", type=Path, help="also write the entries here")
    parser.add_argument("--p11-client", action="store_true", help=argparse.SUPPRESS)  # run inside a namespace by run_p11
    parser.add_argument("--url", default=f"http://127.0.0.1:{P11_API_PORT}", help=argparse.SUPPRESS)
    parser.add_argument("--wait-peers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--metrics", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=clients_for(3, 1), help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=P11_DURATION_S, help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.p11_client:
        print(json.dumps(asyncio.run(async_p11_client(args))), flush=True)
        return 0
    results: dict[str, Any] = {}
    only = {p.strip().upper() for p in args.only.split(",") if p.strip()}
    run(results, sizes=[int(s) for s in args.sizes.split(",")], serf=not args.no_serf, reps=args.reps, only=only, simulate=not args.no_sim)
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    for pid, e in results.items():
        if e.get("skipped"):
            print(f"{pid}: skipped: {e['skipped']}")
    return 0


def format_p10_table(entry: Mapping[str, Any]) -> str:
    """Render the per-N table of a P10 entry (pure)."""

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    details = entry.get("details", {})
    rows = ["   N | conv ours  serf (s) | fail ours  serf (s) | KB/s/node ours  serf | saturated"]
    for r in details.get("table", []):
        rows.append(
            f"{r['n']:>4} | {f(r['ours_convergence_s']):>9} {f(r['serf_convergence_s']):>5}    | "
            f"{f(r['ours_failure_detect_s']):>9} {f(r['serf_failure_detect_s']):>5}    | "
            f"{f(r['ours_bytes_per_node_kbps']):>14} {f(r['serf_bytes_per_node_kbps']):>5} | {f(r['ours_machine_saturated'])}"
        )
    trade = details.get("timing_trade")
    if trade:
        rows.append(f"timing trade at N={trade['n']} (same run): preset | probe s | detect s | conv s | KB/s/node")
        for key in ("previous", "default"):
            t = trade[key]
            rows.append(
                f"  {t['preset']:>10} | {f(t['probe_interval_s']):>7} | {f(t['failure_detect_s']):>8} | "
                f"{f(t['convergence_s']):>6} | {f(t['bytes_per_node_kbps']):>9}"
            )
    sim = details.get("simulation") or {}
    if sim.get("rows"):
        rows.append("simulation (in-memory network, virtual clock; exp = back-of-envelope):")
        rows.append(sim.get("table_text") or "")
        for timing, fits in (sim.get("growth") or {}).items():
            parts = [f"{k} = {v['a']} + {v['b_per_decade']} x log10(N) (r2 {v['r2']})" for k, v in fits.items() if v]
            rows.append(f"  {timing}: " + "; ".join(parts))
    elif sim.get("skipped"):
        rows.append(f"simulation skipped: {sim['skipped']}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
