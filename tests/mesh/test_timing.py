"""Timing presets (what an unconfigured daemon runs), the scheduler's prior, and the P10 simulation's clock."""

from __future__ import annotations

import asyncio
import math

import pytest

from bench.mesh_sim import VirtualTimeLoop, simulate
from mongarsd.config import MeshConfig
from mongarsd.errors import ConfigError
from mongarsd.mesh.gossip import DEFAULT_PRESET, LAN, LOCAL, MEMBERLIST_LAN, PRESETS, select_timing
from mongarsd.mesh.keyring import Keyring, key_id
from mongarsd.mesh.scheduler import NodeLoad, rank
from mongarsd.mesh.suspicion import suspicion_bounds

pytestmark = pytest.mark.timeout(60)


def test_default_config_selects_the_lan_preset() -> None:
    assert MeshConfig().timing == DEFAULT_PRESET == "lan"
    assert select_timing(MeshConfig().timing) is LAN
    assert select_timing(None) is LAN and select_timing("") is LAN and select_timing(" LAN ") is LAN
    assert select_timing("memberlist") is MEMBERLIST_LAN and select_timing("local") is LOCAL
    with pytest.raises(ConfigError, match=r"mesh\.timing"):
        select_timing("wan")
    assert set(PRESETS) == {"lan", "local", "memberlist"}


def test_lan_preset_meets_six_seconds_at_thirty_nodes_on_paper() -> None:
    # first failed probe ~1 interval + the suspicion floor (two confirmations) + a gossip round
    floor, _ = suspicion_bounds(
        suspicion_mult=LAN.suspicion_mult,
        max_timeout_mult=LAN.suspicion_max_timeout_mult,
        n_members=30,
        probe_interval_s=LAN.probe_interval_s,
    )
    assert LAN.probe_interval_s + floor + LAN.gossip_interval_s < 6.0 - 1.0  # a second of margin
    old_floor, _ = suspicion_bounds(
        suspicion_mult=MEMBERLIST_LAN.suspicion_mult,
        max_timeout_mult=MEMBERLIST_LAN.suspicion_max_timeout_mult,
        n_members=30,
        probe_interval_s=MEMBERLIST_LAN.probe_interval_s,
    )
    assert old_floor > 5.8  # why the previous preset could not meet 6 s


def test_lan_preset_keeps_the_false_positive_guards() -> None:
    # Lifeguard's guards, not just faster probes: k = mult - 2 = 2 confirmations before the floor,
    # 3 indirect probers with nacks, awareness stretching up to 8x, >= 2 s to refute even at N = 3.
    assert LAN.suspicion_mult >= 4 and LAN.indirect_checks >= 3 and LAN.awareness_max_multiplier >= 8
    assert LAN.suspicion_max_timeout_mult >= 6
    floor3, _ = suspicion_bounds(
        suspicion_mult=LAN.suspicion_mult,
        max_timeout_mult=LAN.suspicion_max_timeout_mult,
        n_members=3,
        probe_interval_s=LAN.probe_interval_s,
    )
    assert floor3 >= 2.0
    assert LAN.probe_timeout_s >= 0.25 >= 10 * 0.020  # >= 10x the daemon's event-loop lag budget (P12 p99 20 ms)


def _load(node_id: str, *, local: bool = False, tps: float = 0.0, busy: int = 0, queue: int = 0) -> NodeLoad:
    m = frozenset({"m"})
    return NodeLoad(
        node_id=node_id,
        local=local,
        models_available=m,
        models_loaded=m,
        slots_total=4,
        slots_free=4 - busy,
        queue_depth=queue,
        tokens_per_s=tps,
    )


def test_unmeasured_peer_is_assumed_as_fast_as_this_node() -> None:
    me = _load("me", local=True, tps=150.0, busy=4, queue=8)  # saturated, and fast
    fresh = _load("fresh")  # never generated: no rate yet

    def first(local: NodeLoad, peer: NodeLoad) -> str:
        return rank(local, [peer], model="m", hops=0, hop_limit=2, expected_tokens=48)[0].node.node_id

    assert first(me, fresh) == "fresh"  # a 10 tok/s prior would keep everything here, queued, then refused
    idle_me = _load("me", local=True, tps=150.0)
    assert first(idle_me, fresh) == "me"
    slow = _load("slow", tps=5.0)  # measured: its own rate counts
    assert first(me, slow) == "me"


def test_keyring_primary_key_id_follows_the_primary() -> None:
    a, b = bytes(range(32)), bytes(range(1, 33))
    ring = Keyring(a)
    assert ring.primary_key_id == key_id(a)
    ring.install(b)
    ring.use(b)
    assert ring.primary_key_id == key_id(b)


def test_virtual_time_loop_skips_idle_waits() -> None:
    async def sleeper() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(3600.0)
        return t0, loop.time()

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        t0, t1 = runner.run(sleeper())
    assert t1 - t0 == pytest.approx(3600.0, abs=0.01)


def test_small_simulation_detects_a_crash_and_converges() -> None:
    res = simulate(6, "local", seed=3)
    assert res.get("error") is None and not res.get("join_failures")
    assert res["convergence_s"] is not None and res["convergence_s"] < 1.0
    assert res["detect_s"] is not None and math.isfinite(res["detect_s"])
    assert res["detect_s"] < 4 * LOCAL.suspicion_mult * LOCAL.probe_interval_s * LOCAL.suspicion_max_timeout_mult
    assert res["bytes_per_node_kbps"] > 0


def test_pending_forwards_count_only_until_the_peer_state_shows_them() -> None:
    from mongarsd.mesh.scheduler import STATE_LAG_S, unseen_forwards

    starts = [100.0, 104.0, 104.9, 106.0]
    # state received at 105: the forwards of 100 and 104 are in its busy slots/queue already
    assert unseen_forwards(starts, state_at=105.0) == 2
    assert unseen_forwards(starts, state_at=105.0, lag_s=1.5) == 3
    assert unseen_forwards(starts, state_at=200.0) == 0
    assert unseen_forwards([], state_at=0.0) == 0
    assert unseen_forwards([105.0 - STATE_LAG_S / 2], state_at=105.0) == 1  # crossed on the wire
