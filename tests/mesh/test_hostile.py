"""Hostile input against live nodes: garbage packets, oversized frames, one-way cuts, leaks."""

from __future__ import annotations

import asyncio
import random
import socket
import struct

import pytest

from mongarsd import supervisor
from mongarsd.mesh.gossip import LOCAL, GossipNode
from mongarsd.mesh.identity import NodeIdentity
from mongarsd.mesh.keyring import Keyring, generate_key
from mongarsd.mesh.membership import EventKind
from mongarsd.mesh.transport import UdpTcpTransport, free_port

from .cluster import start_cluster, wait_until

pytestmark = pytest.mark.timeout(30)


async def test_garbage_packets_are_counted_and_the_node_keeps_working() -> None:
    cluster = await start_cluster(3, seed=31)
    try:
        await wait_until(cluster.converged, timeout_s=5.0)
        victim = cluster.nodes[0]
        rng = random.Random(0)
        for size in (0, 1, 10, 44, 45, 200, 1400, 1401, 5000):
            cluster.net.inject(("10.9.9.9", 1), victim.addr, rng.randbytes(size))
        # a well-formed envelope with a valid key id but garbage ciphertext
        cluster.net.inject(("10.9.9.9", 1), victim.addr, b"\x01" + victim.keyring.primary_key_id + rng.randbytes(100))
        drops = victim.metrics()["drops"]
        assert sum(drops.values()) >= 8
        assert drops.get("decrypt_failed", 0) >= 1
        victim.set_local_state({"queue_depth": 5})
        await wait_until(
            lambda: all((m := n.member(victim.node_id)) is not None and m.meta.get("queue_depth") == 5 for n in cluster.nodes),
            timeout_s=2.0,
        )
    finally:
        await cluster.stop()


async def test_one_way_cut_is_bridged_by_indirect_probes() -> None:
    cluster = await start_cluster(6, seed=32)
    try:
        await wait_until(cluster.converged, timeout_s=5.0)
        a, t = cluster.nodes[0], cluster.nodes[1]
        queues = [n.subscribe() for n in cluster.nodes]
        cluster.net.partition([a.addr], [t.addr])  # only this pair cannot talk
        await asyncio.sleep(20 * LOCAL.probe_interval_s)
        fails = [ev for q in queues for ev in _drain(q) if ev.kind is EventKind.FAIL]
        assert fails == []
        assert cluster.state_of(a, t) in ("alive", "suspect")
    finally:
        await cluster.stop()


def _drain(q: asyncio.Queue) -> list:  # type: ignore[type-arg]
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


async def test_oversized_tcp_frame_is_refused_before_reading() -> None:
    node = GossipNode(
        identity=NodeIdentity.generate(),
        keyring=Keyring(generate_key()),
        transport=UdpTcpTransport(bind_host="127.0.0.1", port=free_port()),
        timing=LOCAL,
    )
    await node.async_start()
    try:
        reader, writer = await asyncio.open_connection(*node.addr)
        writer.write(struct.pack(">I", 2**31))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 2.0) == b""  # closed without a reply
        writer.close()
        await writer.wait_closed()
        assert node.metrics()["drops"].get("too_large", 0) == 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)  # one small datagram on loopback: never EAGAIN, and never blocks the loop
            s.sendto(b"\x01" * 100, node.addr)
        await wait_until(lambda: node.metrics()["drops"].get("unknown_key", 0) == 1, 2.0)
    finally:
        await node.async_stop()


async def test_stopped_cluster_leaves_no_tasks() -> None:
    cluster = await start_cluster(4, seed=33)
    await wait_until(cluster.converged, timeout_s=5.0)
    await cluster.nodes[0].async_stop()
    await cluster.stop()
    await asyncio.sleep(0)
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert leftover == []


async def test_a_crashed_probe_loop_is_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "TASK_RESTART_BACKOFF_MIN_S", 0.01)
    cluster = await start_cluster(3, seed=34)
    try:
        await wait_until(cluster.converged, timeout_s=5.0)
        victim = cluster.nodes[0]
        probe_round = victim._async_probe_round
        crashes = 0

        async def crash_twice(deadline: float) -> None:
            nonlocal crashes
            if crashes < 2:
                crashes += 1
                raise RuntimeError("probe bug")
            await probe_round(deadline)

        monkeypatch.setattr(victim, "_async_probe_round", crash_twice)
        probes = victim.metrics()["probes"]
        # a node whose probe loop died would stop probing while still looking healthy
        await wait_until(lambda: crashes == 2 and victim.metrics()["probes"] >= probes + 3, timeout_s=5.0)
        assert victim._tasks.restarts == {f"mesh-probe-{victim.node_id}": 2}
    finally:
        await cluster.stop()
