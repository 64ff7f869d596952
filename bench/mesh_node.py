"""Gossip bench runner: several GossipNodes in one process, driven over stdin, reporting on stdout.

    python -m bench.mesh_node --hosts 127.0.1.1,127.0.1.2 --port 17946 --key-hex KEY [--timing lan]

Commands arrive as JSON lines on stdin; every answer and every observation is one JSON line
on stdout carrying `t`, this machine's CLOCK_MONOTONIC in seconds (time.monotonic() is the
same clock in every process on one machine, so the orchestrator compares them directly):

    {"cmd": "join", "seeds": [["127.0.1.1", 17946]]}       -> {"ev": "joined", "ok": [..]}
    {"cmd": "set", "node": 0, "v": 3}                       -> {"ev": "set", "node": id, "v": 3, "t": ..}
    {"cmd": "watch", "subject": id}                          -> suspect/dead observations of subject
    {"cmd": "kill", "node": 0}                               -> {"ev": "killed", "node": id, "t": ..}
    {"cmd": "views"}                                         -> {"ev": "views", "alive": {id: n}}
    {"cmd": "metrics"}                                       -> {"ev": "metrics", "nodes": {id: {..}}}
    {"cmd": "stop"}                                          -> {"ev": "stopped"}, then exit

Observations: {"ev": "update", "obs": id, "subj": id, "v": n, "t": ..} when a node first sees
`bench_v = n` in another node's state (from the node's UPDATE/JOIN events, not polled), and
{"ev": "suspect"|"dead", "obs": id, "subj": id, "t": ..} for a watched subject (polled every
WATCH_POLL_S). Logging goes to stderr at warning level so stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from typing import Any, Final

import structlog

from mongarsd.mesh.gossip import PRESETS, GossipNode, MemberEvent
from mongarsd.mesh.identity import NodeIdentity
from mongarsd.mesh.keyring import Keyring
from mongarsd.mesh.transport import UdpTcpTransport

WATCH_POLL_S: Final = 0.01
JOIN_RETRIES: Final = 3
JOIN_RETRY_S: Final = 0.5
CLUSTER_LABEL: Final = "bench"
STATE_KEY: Final = "bench_v"


def emit(obj: dict[str, Any]) -> None:
    """Write one JSON line to stdout, stamped with the monotonic clock unless it already is."""
    obj.setdefault("t", time.monotonic())
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Runner:
    """Own the nodes of this process and answer the orchestrator's commands."""

    def __init__(self, nodes: list[GossipNode]) -> None:
        self.nodes = nodes
        self.by_id = {n.node_id: n for n in nodes}
        self.seen: dict[tuple[str, str], int] = {}  # (observer, subject) -> highest bench_v seen
        self.watch_marks: dict[tuple[str, str], set[str]] = {}
        self.tasks: list[asyncio.Task[None]] = []

    async def async_watch_events(self, node: GossipNode) -> None:
        q = node.subscribe(maxsize=65536)
        while True:
            ev: MemberEvent = await q.get()
            t = time.monotonic()
            v = ev.member.meta.get(STATE_KEY)
            if ev.member.node_id == node.node_id or not isinstance(v, int):
                continue
            key = (node.node_id, ev.member.node_id)
            if v > self.seen.get(key, -1):
                self.seen[key] = v
                emit({"ev": "update", "obs": node.node_id, "subj": ev.member.node_id, "v": v, "t": t})

    async def async_watch_subject(self, subject: str) -> None:
        pending = {n.node_id: {"suspect", "dead"} for n in self.nodes if n.node_id != subject and n._running}
        while any(pending.values()):
            t = time.monotonic()
            for node in self.nodes:
                left = pending.get(node.node_id)
                if not left:
                    continue
                if not node._running:
                    pending[node.node_id] = set()
                    continue
                m = node.member(subject)
                state = m.state if m is not None else "unknown"
                if state in ("suspect", "dead", "left") and "suspect" in left:
                    left.discard("suspect")
                    emit({"ev": "suspect", "obs": node.node_id, "subj": subject, "state": state, "t": t})
                if state in ("dead", "left") and "dead" in left:
                    left.discard("dead")
                    emit({"ev": "dead", "obs": node.node_id, "subj": subject, "state": state, "t": t})
            await asyncio.sleep(WATCH_POLL_S)

    async def async_command(self, cmd: dict[str, Any]) -> bool:
        """Run one command; return False when the runner should exit."""
        op = cmd.get("cmd")
        if op == "join":
            # One node after another: a seed serves a bounded number of concurrent streams.
            # A node whose join found no seed retries, as a daemon does with its seeds.
            seeds = [(str(h), int(p)) for h, p in cmd["seeds"]]
            ok: list[int] = []
            retries = 0
            for n in self.nodes:
                got = await n.async_join(seeds)
                while got == 0 and retries < JOIN_RETRIES * len(self.nodes):
                    retries += 1
                    await asyncio.sleep(JOIN_RETRY_S)
                    got = await n.async_join(seeds)
                ok.append(got)
            emit({"ev": "joined", "ok": ok, "retries": retries})
        elif op == "set":
            node = self.nodes[int(cmd["node"])]
            t = time.monotonic()
            node.set_local_state({STATE_KEY: int(cmd["v"])})
            emit({"ev": "set", "node": node.node_id, "v": int(cmd["v"]), "t": t})
        elif op == "watch":
            self.tasks.append(asyncio.create_task(self.async_watch_subject(str(cmd["subject"])), name="bench-watch"))
            emit({"ev": "watching", "subj": cmd["subject"]})
        elif op == "kill":
            node = self.nodes[int(cmd["node"])]
            t = time.monotonic()
            await node.async_kill()
            emit({"ev": "killed", "node": node.node_id, "t": t})
        elif op == "views":
            emit({"ev": "views", "alive": {n.node_id: sum(1 for m in n.members() if m.state == "alive") for n in self.nodes if n._running}})
        elif op == "metrics":
            out = {}
            for n in self.nodes:
                m = n.metrics()
                out[n.node_id] = {
                    k: m[k]
                    for k in (
                        "bytes_sent",
                        "bytes_received",
                        "packets_sent",
                        "packets_received",
                        "probe_failures",
                        "refutations",
                        "awareness",
                    )
                }
                out[n.node_id]["drops"] = sum(m["drops"].values())
            emit({"ev": "metrics", "nodes": out})
        elif op == "stop":
            return False
        else:
            emit({"ev": "error", "error": f"unknown command {op!r}"})
        return True


async def async_main(args: argparse.Namespace) -> int:
    key = bytes.fromhex(args.key_hex)
    timing = PRESETS[args.timing]
    nodes = [
        GossipNode(
            identity=NodeIdentity.generate(),
            keyring=Keyring(key),
            transport=UdpTcpTransport(bind_host=host, port=args.port),
            cluster_label=CLUSTER_LABEL,
            timing=timing,
            state={STATE_KEY: 0},
            rng=random.Random(),
        )
        for host in args.hosts.split(",")
    ]
    runner = Runner(nodes)
    for node in nodes:
        await node.async_start()
        runner.tasks.append(asyncio.create_task(runner.async_watch_events(node), name=f"bench-events-{node.node_id}"))
    emit({"ev": "ready", "nodes": [{"id": n.node_id, "addr": list(n.addr)} for n in nodes]})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            try:
                cmd = json.loads(line)
            except ValueError:
                emit({"ev": "error", "error": "bad json"})
                continue
            if not await runner.async_command(cmd):
                break
    finally:
        for t in runner.tasks:
            t.cancel()
        await asyncio.gather(*runner.tasks, return_exceptions=True)
        for n in nodes:
            await n.async_kill()
        emit({"ev": "stopped"})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mesh_node")
    parser.add_argument("--hosts", required=True, help="comma-separated loopback/namespace IPs, one node each")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key-hex", required=True)
    parser.add_argument("--timing", default="lan", choices=sorted(PRESETS))
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(stream=sys.stderr, level=level)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    return asyncio.run(async_main(args))


if __name__ == "__main__":
    sys.exit(main())
