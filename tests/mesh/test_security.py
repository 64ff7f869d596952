"""Envelope crypto, replay window, keyring rotation and node identities."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from mongarsd.mesh import const
from mongarsd.mesh.identity import NodeIdentity, Verifier, node_id_from_public_key, sign_leave, sign_record
from mongarsd.mesh.keyring import Keyring, KeyringError, decode_key, encode_key, generate_key, key_id
from mongarsd.mesh.security import Cipher, DropError, DropLog, ReplayWindow
from mongarsd.mesh.state import encode_state
from mongarsd.mesh.wire import NodeRecord

from .cluster import start_cluster, wait_until

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def cipher(key: bytes, label: str = "c", clock: Clock | None = None) -> Cipher:
    return Cipher(keyring=Keyring(key), cluster_label=label, clock=clock or Clock())


def reason(c: Cipher, packet: bytes) -> str:
    with pytest.raises(DropError) as info:
        c.open(packet)
    return info.value.reason


def test_seal_open_round_trip_and_envelope_layout() -> None:
    key = generate_key()
    a, b = cipher(key), cipher(key)
    packet = a.seal(b"hello")
    assert packet[0] == const.PROTOCOL_VERSION
    assert packet[1:5] == key_id(key)
    assert len(packet) == len(b"hello") + const.ENVELOPE_OVERHEAD_BYTES
    assert b.open(packet) == b"hello"


def test_wrong_key_tamper_label_version_and_size_are_dropped() -> None:
    key = generate_key()
    packet = cipher(key).seal(b"payload")
    assert reason(cipher(generate_key()), packet) == "unknown_key"
    tampered = bytearray(packet)
    tampered[-3] ^= 1
    assert reason(cipher(key), bytes(tampered)) == "decrypt_failed"
    nonce_tampered = bytearray(packet)
    nonce_tampered[10] ^= 1
    assert reason(cipher(key), bytes(nonce_tampered)) == "decrypt_failed"
    assert reason(cipher(key, label="other"), packet) == "decrypt_failed"
    assert reason(cipher(key), bytes([2]) + packet[1:]) == "bad_version"
    assert reason(cipher(key), packet[:20]) == "malformed"
    assert reason(cipher(key), b"\x01" * (const.MAX_UDP_PACKET_BYTES + 1)) == "too_large"


def test_replay_and_stale_packets_are_dropped() -> None:
    key = generate_key()
    clock = Clock()
    a = Cipher(keyring=Keyring(key), cluster_label="c", clock=clock, sender_clock=clock)
    b = cipher(key, clock=clock)
    packet = a.seal(b"x")
    assert b.open(packet) == b"x"
    assert reason(b, packet) == "replay"
    old = a.seal(b"y")  # held back...
    clock.t += const.REPLAY_WINDOW_S + 1
    assert b.open(a.seal(b"w")) == b"w"  # ...while its sender moves on
    assert reason(b, old) == "stale"
    # Since issue 9 a sender whose wall clock is off is tolerated (tests/mesh/test_clock_skew.py).
    future = cipher(key, clock=Clock(clock.t + const.MAX_CLOCK_SKEW_S + 5)).seal(b"z")
    assert b.open(future) == b"z"


def test_replay_window_memory_is_bounded_without_reopening_replays() -> None:
    clock = Clock()
    w = ReplayWindow(max_entries=8, clock=clock)
    nonces = []
    for i in range(20):
        clock.t += 0.001
        n = int(clock.t * 1000).to_bytes(8, "big") + i.to_bytes(16, "big")
        nonces.append(n)
        assert w.check(n) is None
    assert len(w) <= 8
    assert all(w.check(n) in ("replay", "stale") for n in nonces)


def test_drop_log_counts_everything_but_logs_rate_limited_and_bounded() -> None:
    clock = Clock(0.0)
    dl = DropLog(interval_s=10.0, max_keys=4, clock=clock)
    for i in range(100):
        dl.record("replay", f"10.0.0.{i % 10}:1")
    assert dl.counts == {"replay": 100}
    assert len(dl._last) == 4


def test_keyring_rotation_rules_and_persistence(tmp_path: Path) -> None:
    k1, k2 = generate_key(), generate_key()
    ring = Keyring(k1)
    with pytest.raises(KeyringError):
        ring.use(k2)  # not installed
    ring.install(k2)
    assert ring.lookup(key_id(k2)) == k2 and ring.primary_key == k1
    ring.use(k2)
    assert ring.primary_key == k2
    with pytest.raises(KeyringError):
        ring.remove(k2)  # primary
    ring.remove(k1)
    assert ring.lookup(key_id(k1)) is None
    path = tmp_path / "sub" / "keyring.json"
    ring.install(k1)
    ring.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Keyring.load(path)
    assert loaded.primary_key == k2 and loaded.keys() == [k2, k1]
    assert decode_key(encode_key(k1)) == k1
    with pytest.raises(KeyringError):
        decode_key("c2hvcnQ=")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(KeyringError):
        Keyring.load(tmp_path / "bad.json")
    created = Keyring.load_or_create(tmp_path / "new.json")
    assert Keyring.load(tmp_path / "new.json").primary_key == created.primary_key


def test_identity_persists_and_regenerates_when_machine_id_changes(tmp_path: Path) -> None:
    mid = tmp_path / "machine-id"
    mid.write_text("aaaa\n")
    path = tmp_path / "identity.json"
    a = NodeIdentity.load_or_create(path, machine_id_path=mid)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert NodeIdentity.load_or_create(path, machine_id_path=mid).node_id == a.node_id
    mid.write_text("bbbb\n")  # the SD card was cloned onto another machine
    b = NodeIdentity.load_or_create(path, machine_id_path=mid)
    assert b.node_id != a.node_id
    assert NodeIdentity.load_or_create(path, machine_id_path=mid).node_id == b.node_id
    assert a.node_id == node_id_from_public_key(a.public_key) and len(a.node_id) == 16
    assert len(a.fingerprint) == 32


def test_records_are_bound_to_their_signer_and_cluster() -> None:
    me, other = NodeIdentity.generate(), NodeIdentity.generate()
    r = sign_record(me, label="c", incarnation=1, addr=("10.0.0.1", 1), state=encode_state({}))
    v = Verifier(label="c")
    assert v.check_record(r) is None
    # another node cannot speak for `me`: its key does not hash to me's id
    forged = sign_record(other, label="c", incarnation=2, addr=("10.0.0.9", 1), state=encode_state({}))
    assert v.check_record(NodeRecord(me.node_id, 2, forged.addr, other.public_key, forged.state, forged.signature)) == "bad_identity"
    # tampered state
    assert (
        v.check_record(NodeRecord(r.node_id, r.incarnation, r.addr, r.public_key, encode_state({"queue_depth": 1}), r.signature))
        == "bad_signature"
    )
    assert Verifier(label="other").check_record(r) == "bad_signature"
    sig = sign_leave(me, label="c", incarnation=1)
    assert v.check_leave(me.node_id, 1, sig) is None
    assert v.check_leave(me.node_id, 2, sig) == "bad_signature"
    v.revoke(me.node_id)
    assert v.check_record(r) == "revoked"


# --- cluster-level -------------------------------------------------------------------------


async def test_replayed_packet_is_dropped_by_a_live_node() -> None:
    cluster = await start_cluster(3, seed=21)
    try:
        await wait_until(cluster.converged, timeout_s=5.0)
        captured: list[tuple] = []  # type: ignore[type-arg]
        cluster.net.tap = lambda s, d, data: captured.append((s, d, data))
        await wait_until(lambda: len(captured) > 5, timeout_s=2.0)
        cluster.net.tap = None
        src, dst, data = captured[-1]
        target = next(n for n in cluster.nodes if n.addr == dst)
        await asyncio.sleep(0.05)  # the original has been delivered
        before = target.metrics()["drops"].get("replay", 0)
        cluster.net.inject(src, dst, data)
        assert target.metrics()["drops"].get("replay", 0) == before + 1
    finally:
        await cluster.stop()


async def test_node_with_other_cluster_key_never_becomes_a_member() -> None:
    cluster = await start_cluster(3, seed=22)
    try:
        await wait_until(cluster.converged, timeout_s=5.0)
        intruder = cluster.add(key=generate_key())
        wrong_label = cluster.add(label="elsewhere")
        await intruder.async_start()
        await wrong_label.async_start()
        assert await intruder.async_join([cluster.nodes[0].addr]) == 0
        assert await wrong_label.async_join([cluster.nodes[1].addr]) == 0
        await asyncio.sleep(0.5)
        for n in cluster.nodes[:3]:
            ids = {m.node_id for m in n.members()}
            assert intruder.node_id not in ids and wrong_label.node_id not in ids
        assert {m.node_id for m in intruder.members()} == {intruder.node_id}
        drops = cluster.nodes[0].metrics()["drops"]
        assert drops.get("unknown_key", 0) >= 1
        assert cluster.nodes[1].metrics()["drops"].get("decrypt_failed", 0) >= 1
    finally:
        await cluster.stop()


async def test_key_rotation_loses_no_messages() -> None:
    cluster = await start_cluster(4, seed=23)
    try:
        await wait_until(cluster.converged, timeout_s=5.0)
        new = generate_key()
        old = cluster.key
        step = cluster.timing.probe_interval_s
        for n in cluster.nodes:  # install everywhere, one node at a time
            n.keyring.install(new)
            await asyncio.sleep(step)
        for n in cluster.nodes:  # mid-rotation some nodes encrypt with `new`, others with `old`
            n.keyring.use(new)
            await asyncio.sleep(step)
        for n in cluster.nodes:
            n.keyring.remove(old)
            await asyncio.sleep(step)
        cluster.nodes[2].set_local_state({"queue_depth": 3})
        await wait_until(
            lambda: all((m := n.member(cluster.nodes[2].node_id)) is not None and m.meta.get("queue_depth") == 3 for n in cluster.nodes),
            timeout_s=2.0,
        )
        for n in cluster.nodes:
            drops = n.metrics()["drops"]
            assert drops.get("unknown_key", 0) == 0 and drops.get("decrypt_failed", 0) == 0, drops
            assert n.metrics()["members"]["alive"] == 4
            assert n.keyring.keys() == [new]
    finally:
        await cluster.stop()


async def test_revoked_node_is_declared_dead_and_cannot_come_back() -> None:
    cluster = await start_cluster(3, seed=24)
    try:
        await wait_until(cluster.converged, timeout_s=5.0)
        bad = cluster.nodes[2]
        for n in cluster.nodes[:2]:
            n.revoke(bad.node_id)
        bad.set_local_state({"queue_depth": 1})  # new incarnation, must be refused
        await asyncio.sleep(0.5)
        for n in cluster.nodes[:2]:
            m = n.member(bad.node_id)
            assert m is not None and m.state == "dead"
            assert n.metrics()["drops"].get("revoked", 0) >= 1
    finally:
        await cluster.stop()
