"""Real mDNS across network namespaces: three nodes on a bridge find each other; goodbye and cuts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.netns.harness import LineReader, NetnsLab, cleanup_stale, list_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

DISCOVER_WITHIN_S = 15.0


class Node:
    """A discovery runner process in a namespace and the events it printed."""

    def __init__(self, lab: NetnsLab, index: int, node_id: str, ck: str) -> None:
        self.node_id = node_id
        self.proc = lab.popen(
            index,
            sys.executable,
            "-m",
            "tests.netns.discovery_runner",
            "--node-id",
            node_id,
            "--ck",
            ck,
            "--fp",
            f"{index:032x}",
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout)
        self.events: list[dict[str, Any]] = []
        self.found: dict[str, dict[str, Any]] = {}
        self.lost: set[str] = set()

    def pump(self, timeout_s: float) -> None:
        line = self.reader.readline(timeout_s)
        if not line:
            return
        ev = json.loads(line)
        self.events.append(ev)
        if ev["event"] == "found":
            self.found[ev["node_id"]] = ev
        elif ev["event"] == "lost":
            self.lost.add(ev["node_id"])


def wait_until(nodes: list[Node], cond: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; events: { {n.node_id: n.events for n in nodes} }")
        for n in nodes:
            n.pump(0.05)


def test_three_namespaces_discover_each_other_and_report_cluster_key(netns_lab: Callable[[int], NetnsLab]) -> None:
    lab = netns_lab(3)
    prefix = lab.prefix
    cks = ["deadbeef", "deadbeef", "0badc0de"]  # node 2 belongs to another cluster key
    nodes = [Node(lab, i, f"n{i}", cks[i]) for i in range(3)]
    try:
        t0 = time.monotonic()
        wait_until(nodes, lambda: all(len(n.found) == 2 for n in nodes), DISCOVER_WITHIN_S)
        elapsed = time.monotonic() - t0
        for i, n in enumerate(nodes):
            assert set(n.found) == {f"n{j}" for j in range(3) if j != i}  # never itself
            for j in range(3):
                if j == i:
                    continue
                ev = n.found[f"n{j}"]
                assert ev["addresses"] == [lab.nodes[j].ip]  # namespace addresses only
                assert ev["ck"] == cks[j]
                assert ev["fp"] == f"{j:032x}"
                assert ev["gossip"] == 8643
        assert nodes[0].found["n2"]["ck"] != nodes[0].found["n1"]["ck"]
        print(f"discovered in {elapsed:.2f}s")

        # A clean stop sends mDNS goodbyes: the others report the node lost.
        assert lab.stop_process(nodes[1].proc) == 0
        wait_until(nodes, lambda: "n1" in nodes[0].lost and "n1" in nodes[2].lost, 10.0)
        assert "n0" not in nodes[2].lost
    finally:
        for n in nodes:
            n.reader.close()
        lab.teardown()
    assert not [ns for ns in list_namespaces() if ns.startswith(prefix)]


UDP_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(3)
print("ready", flush=True)
try:
    data, _ = s.recvfrom(64)
    print(data.decode(), flush=True)
except TimeoutError:
    print("none", flush=True)
"""
UDP_SEND = "import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'hi', (sys.argv[1], int(sys.argv[2])))"


def _udp_probe(lab: NetnsLab, src: int, dst: int, port: int = 40123) -> bool:
    """Return whether a UDP datagram from node src reaches node dst (3 tries)."""
    server = lab.popen(dst, sys.executable, "-c", UDP_SERVER, str(port))
    assert server.stdout is not None
    reader = LineReader(server.stdout)
    try:
        assert reader.readline(10) == "ready"
        for _ in range(3):
            lab.run(src, sys.executable, "-c", UDP_SEND, lab.nodes[dst].ip, str(port))
        return reader.readline(10) == "hi"
    finally:
        reader.close()
        lab.stop_process(server)


def test_harness_cut_partition_and_heal(netns_lab: Callable[[int], NetnsLab]) -> None:
    lab = netns_lab(3)
    assert _udp_probe(lab, 0, 1)
    lab.cut(1)
    assert not _udp_probe(lab, 0, 1)
    lab.heal(1)
    assert _udp_probe(lab, 0, 1)
    lab.partition([[0, 1], [2]])
    assert _udp_probe(lab, 0, 1)
    assert not _udp_probe(lab, 0, 2)
    lab.heal_all()
    assert _udp_probe(lab, 0, 2)


def test_harness_netem_loss(netns_lab: Callable[[int], NetnsLab]) -> None:
    lab = netns_lab(3)
    if not lab.netem_available():
        pytest.skip("kernel has no sch_netem (tc netem); cut/partition still work")
    lab.impair(2, loss_pct=100)
    assert not _udp_probe(lab, 2, 0)
    lab.clear_impair(2)
    assert _udp_probe(lab, 2, 0)


def test_stale_labs_from_dead_runs_are_removed(netns_ready: None) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"mgt{dead.pid}x0br"
    live = f"mgt{os.getpid()}x999br"  # this run's own prefix: must survive a stale cleanup
    subprocess.run(["ip", "netns", "add", stale], check=True)
    subprocess.run(["ip", "netns", "add", live], check=True)
    try:
        removed = cleanup_stale()
        assert stale in removed
        assert live not in removed
        assert stale not in list_namespaces()
        assert live in list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", live], check=False)
        subprocess.run(["ip", "netns", "del", stale], check=False)
