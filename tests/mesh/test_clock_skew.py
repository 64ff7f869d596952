"""Issue 9, "No clock yet": replay protection that does not depend on wall clocks agreeing."""

from __future__ import annotations

import asyncio
import ctypes
import random
import secrets
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

from mongarsd.mesh import const
from mongarsd.mesh import security as sec
from mongarsd.mesh.gossip import LOCAL
from mongarsd.mesh.keyring import Keyring, generate_key
from mongarsd.mesh.security import Cipher, ClockSkewLog, DropError, ReplayWindow, SenderWindow
from mongarsd.mesh.transport import InMemoryNetwork
from mongarsd.mesh.wire import Addr

from .cluster import Cluster, wait_until

pytestmark = pytest.mark.timeout(30)

DAY_S = 86400.0
NOW = 1_700_000_000.0


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(key: bytes, *, wall: float = NOW, **kw: object) -> tuple[Cipher, Clock]:
    clock = Clock(wall)
    return Cipher(keyring=Keyring(key), cluster_label="c", clock=clock, **kw), clock  # type: ignore[arg-type]


def reason(c: Cipher, packet: bytes, peer: str = "10.0.0.9:7946") -> str:
    with pytest.raises(DropError) as info:
        c.open(packet, peer=peer)
    return info.value.reason


def legacy_seal(key: bytes, plaintext: bytes, *, wall: float, label: str = "c") -> bytes:
    """Seal like a version-1 sender before issue 9: wall-clock ms + 16 random bytes."""
    rest = secrets.token_bytes(16)
    while rest[8:10] == const.NONCE_STAMP_MARKER:
        rest = secrets.token_bytes(16)
    nonce = int(wall * 1000).to_bytes(8, "big") + rest
    aad = bytes([const.PROTOCOL_VERSION]) + label.encode()
    ct = crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)
    return bytes([const.PROTOCOL_VERSION]) + Keyring(key).primary_key_id + nonce + ct


def skew_events(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "mesh_peer_clock_skew"]


# --- unit: the stamped nonce and SenderWindow ---------------------------------------------


@pytest.mark.parametrize("skew_s", [-3 * DAY_S, -(const.MAX_CLOCK_SKEW_S + 1), 400 * DAY_S])
def test_fresh_packets_from_a_skewed_sender_are_accepted_and_logged_rate_limited(skew_s: float) -> None:
    key = generate_key()
    mono = Clock(0.0)
    receiver, _ = make(key, skew_log=ClockSkewLog(clock=mono))
    sender, _ = make(key, wall=NOW + skew_s)
    with structlog.testing.capture_logs() as logs:
        for i in range(5):
            assert receiver.open(sender.seal(b"%d" % i), peer="10.0.0.2:7946") == b"%d" % i
        mono.t += const.CLOCK_SKEW_LOG_INTERVAL_S + 1
        receiver.open(sender.seal(b"later"), peer="10.0.0.2:7946")
    events = skew_events(logs)
    assert len(events) == 2  # once per interval per sender, not per packet
    assert events[0]["peer"] == "10.0.0.2:7946" and events[0]["tolerated"] is True
    assert events[0]["skew_s"] == pytest.approx(skew_s, abs=0.01)
    assert events[0]["log_level"] == "warning"


def test_small_skew_is_not_logged() -> None:
    key = generate_key()
    receiver, _ = make(key)
    sender, _ = make(key, wall=NOW - const.MAX_CLOCK_SKEW_S + 1)
    with structlog.testing.capture_logs() as logs:
        receiver.open(sender.seal(b"x"), peer="10.0.0.2:7946")
    assert skew_events(logs) == []


def test_replay_is_refused_from_the_same_or_another_address() -> None:
    key = generate_key()
    receiver, _ = make(key)
    sender, _ = make(key, wall=NOW - 3 * DAY_S)
    packet = sender.seal(b"x")
    assert receiver.open(packet, peer="10.0.0.2:7946") == b"x"
    assert reason(receiver, packet, "10.0.0.2:7946") == "replay"
    assert reason(receiver, packet, "10.6.6.6:1") == "replay"
    assert reason(receiver, packet, "[fe80::1]:7946") == "replay"


def test_replays_are_refused_after_cache_eviction_and_after_the_window() -> None:
    key = generate_key()
    window = SenderWindow(window_s=10.0, max_entries=8)
    receiver, rwall = make(key, senders=window)
    clocks = [Clock(0.0) for _ in range(3)]
    senders = [make(key, wall=NOW + skew, sender_clock=c)[0] for skew, c in zip((-5 * DAY_S, 0.0, 7 * DAY_S), clocks, strict=True)]
    sent: list[bytes] = []
    for i in range(60):  # interleaved senders; the cache holds 8 stamps: most entries get evicted
        clocks[i % 3].t += 0.05
        packet = senders[i % 3].seal(b"p")
        sent.append(packet)
        assert receiver.open(packet) == b"p"
    assert len(window) <= 8 and window.senders == 3
    rwall.t -= 2 * DAY_S  # our own clock steps (NTP): irrelevant to freshness
    for packet in sent:
        assert reason(receiver, packet) in ("replay", "stale")
    # Once the sender has moved on by more than the window, even a never-delivered packet is stale.
    held = senders[0].seal(b"held")
    clocks[0].t += 11.0
    assert receiver.open(senders[0].seal(b"new")) == b"new"
    assert reason(receiver, held) == "stale"


def test_sender_window_invariant_under_random_traffic() -> None:
    rng = random.Random(9)
    w = SenderWindow(window_s=0.001, max_entries=16, max_senders=4)  # 1000 us window
    accepted: list[tuple[int, int]] = []
    highs = dict.fromkeys(range(3), 0)
    for _ in range(3000):
        sess = rng.randrange(3)
        if accepted and rng.random() < 0.3:  # a replay of anything accepted before
            s, p = rng.choice(accepted)
            assert w.check(s, p) in ("replay", "stale")
            continue
        highs[sess] += rng.randrange(1, 60)
        p = highs[sess] - rng.randrange(0, 200)  # reordered a little
        if w.check(sess, p) is None:
            assert (sess, p) not in accepted
            accepted.append((sess, p))
    assert len(w) <= 16 and len(accepted) > 1000


def test_a_forgotten_session_is_refused_again_once_its_sender_speaks() -> None:
    w = SenderWindow(window_s=0.001, max_senders=1)
    assert w.check(b"a", 10) is None
    assert w.check(b"b", 10) is None  # "a" is forgotten (LRU)
    assert w.check(b"a", 10) == "replay"  # its seen entry still counts
    assert w.check(b"a", 5_000) is None  # trusted on first use...
    assert w.check(b"a", 3_000) == "stale"  # ...but the genuine newer stamp closes the window
    assert w.check(b"a", 9_000) is None


def test_nonce_layout_old_receivers_and_old_senders() -> None:
    key = generate_key()
    receiver, _ = make(key)
    sender, _ = make(key, wall=NOW + 1.5)
    packet = sender.seal(b"x")
    nonce = packet[1 + const.KEY_ID_BYTES : 1 + const.KEY_ID_BYTES + const.NONCE_BYTES]
    assert int.from_bytes(nonce[:8], "big") == int((NOW + 1.5) * 1000)  # what version-1 receivers read
    assert nonce[16:18] == const.NONCE_STAMP_MARKER
    assert ReplayWindow(clock=Clock(NOW)).check(nonce) is None  # an old receiver accepts it
    # An old sender's packets keep the old rule: clocks must agree, nonce never seen.
    old = legacy_seal(key, b"legacy", wall=NOW + 10)
    assert receiver.open(old) == b"legacy"
    assert reason(receiver, old) == "replay"
    assert reason(receiver, legacy_seal(key, b"skewed", wall=NOW - 3 * DAY_S)) == "stale"


def test_nonces_never_repeat_even_when_every_clock_stands_still() -> None:
    key = generate_key()
    frozen = Clock(5.0)
    sender = Cipher(keyring=Keyring(key), cluster_label="c", clock=Clock(NOW), sender_clock=frozen)
    receiver, _ = make(key)
    nonces = set()
    for _ in range(500):
        packet = sender.seal(b"x")
        nonces.add(packet[5:29])
        assert receiver.open(packet) == b"x"
    assert len(nonces) == 500


# --- unit: this host's clock --------------------------------------------------------------


def test_clock_synchronized_answers_without_raising(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert sec.clock_synchronized() in (True, False, None)

    def no_libc(*_a: object, **_k: object) -> object:
        raise OSError("no libc here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert sec.clock_synchronized(marker_path=str(tmp_path / "absent")) is None
    (tmp_path / "synchronized").touch()
    assert sec.clock_synchronized(marker_path=str(tmp_path / "synchronized")) is True


def test_clock_sync_state_is_logged() -> None:
    with structlog.testing.capture_logs() as logs:
        assert sec.log_clock_sync_state(lambda: False) is False
        assert sec.log_clock_sync_state(lambda: True) is True
        assert sec.log_clock_sync_state(lambda: None) is None
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("mesh_clock_unsynchronized", "warning"),
        ("mesh_clock_sync_unknown", "debug"),
    ]


# --- in-process cluster -------------------------------------------------------------------


async def test_cluster_converges_with_a_node_whose_clock_is_days_off() -> None:
    rng = random.Random(90)
    cluster = Cluster(net=InMemoryNetwork(seed=90, loss=0.0, delay_s=(0.0005, 0.003)), key=rng.randbytes(32), timing=LOCAL, rng=rng)
    for _ in range(5):
        cluster.add()
    skewed = cluster.nodes[2]
    skewed._cipher = Cipher(keyring=skewed.keyring, cluster_label=cluster.label, clock=lambda: time.time() - 4 * DAY_S)
    ahead = cluster.nodes[4]
    ahead._cipher = Cipher(keyring=ahead.keyring, cluster_label=cluster.label, clock=lambda: time.time() + 9 * DAY_S)
    try:
        with structlog.testing.capture_logs() as logs:
            for node in cluster.nodes:
                await node.async_start()
            assert await skewed.async_join([cluster.nodes[0].addr]) == 1  # the skewed one joins...
            for node in cluster.nodes[1:]:
                if node is not skewed:
                    await node.async_join([skewed.addr])  # ...and is a seed for the others
            await wait_until(cluster.converged, timeout_s=5.0)
            cluster.nodes[0].set_local_state({"queue_depth": 7})
            await wait_until(
                lambda: all(
                    (m := n.member(cluster.nodes[0].node_id)) is not None and m.meta.get("queue_depth") == 7 for n in cluster.nodes
                ),
                timeout_s=2.0,
            )
        for node in cluster.nodes:
            assert node.metrics()["drops"] == {}, node.metrics()["drops"]
        events = skew_events(logs)
        skewed_peer = f"{skewed.addr[0]}:{skewed.addr[1]}"
        assert any(e["peer"] == skewed_peer and float(e["skew_s"]) < -3 * DAY_S for e in events)
        assert any(float(e["skew_s"]) > 8 * DAY_S for e in events)

        # A packet the skewed node sent, captured and resent later from another address: refused.
        captured: list[tuple[Addr, Addr, bytes]] = []
        cluster.net.tap = lambda s, d, data: captured.append((s, d, data))
        await wait_until(lambda: any(s == skewed.addr for s, _, _ in captured), timeout_s=2.0)
        cluster.net.tap = None
        _, dst, data = next(c for c in captured if c[0] == skewed.addr)
        target = next(n for n in cluster.nodes if n.addr == dst)
        await asyncio.sleep(0.05)  # the original has been delivered
        before = target.metrics()["drops"].get("replay", 0)
        cluster.net.inject(("10.6.6.6", 4444), dst, data)
        assert target.metrics()["drops"].get("replay", 0) == before + 1
    finally:
        await cluster.stop()
