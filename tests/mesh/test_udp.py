"""Three real nodes over UDP+TCP on 127.0.0.1."""

from __future__ import annotations

import random

import pytest

from mongarsd.mesh.gossip import LOCAL, GossipNode
from mongarsd.mesh.identity import NodeIdentity
from mongarsd.mesh.keyring import Keyring, generate_key
from mongarsd.mesh.transport import UdpTcpTransport, free_port

from .cluster import wait_until

pytestmark = pytest.mark.timeout(30)


async def test_three_nodes_over_real_udp_converge_share_state_and_detect_failure() -> None:
    key = generate_key()
    nodes = [
        GossipNode(
            identity=NodeIdentity.generate(),
            keyring=Keyring(key),
            transport=UdpTcpTransport(bind_host="127.0.0.1", port=free_port()),
            cluster_label="udp-test",
            timing=LOCAL,
            rng=random.Random(i),
        )
        for i in range(3)
    ]
    try:
        for n in nodes:
            await n.async_start()
        assert await nodes[1].async_join([nodes[0].addr]) == 1
        assert await nodes[2].async_join([nodes[1].addr]) == 1
        ids = {n.node_id for n in nodes}
        await wait_until(lambda: all({m.node_id for m in n.members() if m.state == "alive"} == ids for n in nodes), 5.0)
        nodes[0].set_local_state({"queue_depth": 4})
        await wait_until(lambda: all((m := n.member(nodes[0].node_id)) is not None and m.meta.get("queue_depth") == 4 for n in nodes), 3.0)
        await nodes[2].async_kill()
        await wait_until(lambda: all((m := n.member(nodes[2].node_id)) is not None and m.state == "dead" for n in nodes[:2]), 6.0)
        for n in nodes[:2]:
            assert n.metrics()["packets_received"] > 0
            assert n.metrics()["drops"] == {}
    finally:
        for n in nodes:
            await n.async_stop()
