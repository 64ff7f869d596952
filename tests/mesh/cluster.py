"""Helpers to run seeded in-process clusters over the in-memory transport."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from nacl.signing import SigningKey

from mongarsd.mesh.gossip import LOCAL, GossipNode, Timing
from mongarsd.mesh.identity import NodeIdentity
from mongarsd.mesh.keyring import Keyring
from mongarsd.mesh.transport import InMemoryNetwork


def seeded_identity(rng: random.Random) -> NodeIdentity:
    return NodeIdentity(SigningKey(rng.randbytes(32)))


async def wait_until(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.01) -> float:
    """Wait until pred() is true; return the elapsed seconds or fail the test."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not pred():
        if loop.time() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s:.2f} s")
        await asyncio.sleep(interval_s)
    return loop.time() - start


@dataclass
class Cluster:
    net: InMemoryNetwork
    key: bytes
    timing: Timing
    rng: random.Random
    label: str = "test"
    nodes: list[GossipNode] = field(default_factory=list)

    def add(self, *, key: bytes | None = None, label: str | None = None, state: dict[str, object] | None = None) -> GossipNode:
        i = len(self.nodes)
        node = GossipNode(
            identity=seeded_identity(self.rng),
            keyring=Keyring(key if key is not None else self.key),
            transport=self.net.transport(f"10.0.0.{i + 1}"),
            cluster_label=label if label is not None else self.label,
            timing=self.timing,
            state=state or {"queue_depth": 0},
            rng=random.Random(self.rng.random()),
        )
        self.nodes.append(node)
        return node

    def alive_view(self, node: GossipNode) -> set[str]:
        return {m.node_id for m in node.members() if m.state == "alive"}

    def converged(self, nodes: list[GossipNode] | None = None) -> bool:
        nodes = nodes if nodes is not None else [n for n in self.nodes if n._running]
        want = {n.node_id for n in nodes}
        return all(self.alive_view(n) >= want for n in nodes)

    def state_of(self, observer: GossipNode, subject: GossipNode) -> str | None:
        m = observer.member(subject.node_id)
        return m.state if m is not None else None

    async def stop(self) -> None:
        for n in self.nodes:
            await n.async_kill()
        self.net.close()


async def start_cluster(
    n: int,
    *,
    seed: int = 1,
    loss: float = 0.0,
    delay_s: tuple[float, float] = (0.0005, 0.003),
    timing: Timing = LOCAL,
) -> Cluster:
    rng = random.Random(seed)
    cluster = Cluster(
        net=InMemoryNetwork(seed=seed, loss=loss, delay_s=delay_s),
        key=rng.randbytes(32),
        timing=timing,
        rng=rng,
    )
    for _ in range(n):
        cluster.add()
    for node in cluster.nodes:
        await node.async_start()
    seed_addr = cluster.nodes[0].addr
    for node in cluster.nodes[1:]:
        assert await node.async_join([seed_addr]) == 1
    return cluster
