"""Discovery: TXT parsing and validation (hostile input), seeds, and two real instances on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import socket
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mongarsd.errors import ConfigError
from mongarsd.mesh import discovery as disc
from mongarsd.mesh.discovery import (
    Discovery,
    ServiceProps,
    TxtError,
    filter_peer_addresses,
    instance_name,
    node_id_from_instance,
    parse_seed,
    parse_txt,
    validate_txt,
)
from mongarsd.mesh.interfaces import NetInterface
from mongarsd.mesh.wire import NodeId

FP = "0123456789abcdef0123456789abcdef"
PROPS = ServiceProps(version="0.1.0", board="x86-i7", api_port=8642, gossip_port=8643, fingerprint=FP, cluster_key_id="deadbeef")


def txt_bytes(entries: list[bytes]) -> bytes:
    return b"".join(bytes([len(e)]) + e for e in entries)


def good_txt(**over: str) -> dict[str, str]:
    txt = PROPS.to_txt("node-a")
    txt.update(over)
    return txt


# -- TXT parsing ---------------------------------------------------------------------------


def test_parse_txt_roundtrip_first_key_wins_and_case_insensitive() -> None:
    raw = txt_bytes([b"ID=node-a", b"id=evil", b"ver=0.1.0", b"flag"])
    assert parse_txt(raw) == {"id": "node-a", "ver": "0.1.0", "flag": ""}


def test_parse_txt_empty_record() -> None:
    assert parse_txt(b"\x00") == {}
    assert parse_txt(b"") == {}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x05ab", "txt_truncated"),
        (txt_bytes([b"=novalue"]), "txt_bad_key"),
        (txt_bytes([b"k\x01y=v"]), "txt_bad_key"),
        (txt_bytes([b"k=\xff\xfe"]), "txt_bad_utf8"),
        (txt_bytes([b"k%d=v" % i for i in range(disc.MAX_TXT_ENTRIES + 1)]), "txt_too_many_entries"),
        (b"\x01a" * (disc.MAX_TXT_BYTES // 2 + 1), "txt_too_large"),
    ],
)
def test_parse_txt_rejects_malformed(raw: bytes, reason: str) -> None:
    with pytest.raises(TxtError) as info:
        parse_txt(raw)
    assert info.value.reason == reason


@given(st.binary(max_size=2000))
def test_parse_txt_never_raises_anything_but_txterror(raw: bytes) -> None:
    try:
        out = parse_txt(raw)
    except TxtError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


# -- TXT validation ------------------------------------------------------------------------


def test_validate_txt_accepts_own_announcement() -> None:
    node_id, props = validate_txt(good_txt(), instance_id="node-a")
    assert node_id == "node-a"
    assert props == PROPS


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"api": "0"}, "bad_port"),
        ({"api": "65536"}, "bad_port"),
        ({"gossip": "-1"}, "bad_port"),
        ({"gossip": "+80"}, "bad_port"),
        ({"gossip": " 80"}, "bad_port"),
        ({"api": "8642 "}, "bad_port"),
        ({"fp": FP.upper()}, "bad_value"),
        ({"fp": FP[:-1]}, "bad_value"),
        ({"ck": "deadbee"}, "bad_value"),
        ({"ck": "deadbeefdeadbeef"}, "bad_value"),
        ({"ck": "zzzzzzzz"}, "bad_value"),
        ({"ver": ""}, "bad_value"),
        ({"ver": "1" * 33}, "bad_value"),
        ({"ver": "1.0\n"}, "bad_value"),
        ({"board": "pi5; rm -rf"}, "bad_value"),
        ({"board": "é"}, "bad_value"),
        ({"id": "node-b"}, "id_mismatch"),
        ({"id": "Node-A"}, "bad_value"),
    ],
)
def test_validate_txt_rejects_hostile_values(over: dict[str, str], reason: str) -> None:
    with pytest.raises(TxtError) as info:
        validate_txt(good_txt(**over), instance_id="node-a")
    assert info.value.reason == reason


@pytest.mark.parametrize("key", disc.TXT_KEYS)
def test_validate_txt_requires_every_key(key: str) -> None:
    txt = good_txt()
    del txt[key]
    with pytest.raises(TxtError):
        validate_txt(txt, instance_id="node-a")


def test_own_props_are_checked_by_the_same_rules() -> None:
    bad = ServiceProps(version="0.1", board="pi", api_port=70000, gossip_port=1, fingerprint=FP, cluster_key_id="deadbeef")
    with pytest.raises(ConfigError):
        bad.to_txt("node-a")


def test_instance_names() -> None:
    assert node_id_from_instance(instance_name("abc123")) == "abc123"
    assert node_id_from_instance("abc123._http._tcp.local.") is None
    assert node_id_from_instance("a.b." + disc.SERVICE_TYPE) is None
    assert node_id_from_instance("x" * 64 + "." + disc.SERVICE_TYPE) is None
    assert node_id_from_instance("UPPER." + disc.SERVICE_TYPE) is None


def test_filter_peer_addresses() -> None:
    raw = ["10.0.0.1", "10.0.0.1", "0.0.0.0", "224.0.0.251", "127.0.0.1", "not-an-ip", "fe80::1%eth0", "255.255.255.255"]
    assert filter_peer_addresses(raw, allow_loopback=False) == ("10.0.0.1", "fe80::1%eth0")
    assert filter_peer_addresses(raw, allow_loopback=True) == ("10.0.0.1", "127.0.0.1", "fe80::1%eth0")
    many = [f"10.0.1.{i}" for i in range(100)]
    assert len(filter_peer_addresses(many, allow_loopback=False)) == disc.MAX_PEER_ADDRESSES


# -- seeds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5:9000", ("10.0.0.5", 9000)),
        ("10.0.0.5", ("10.0.0.5", 8643)),
        ("pi5.local:8643", ("pi5.local", 8643)),
        ("[fe80::1]:9000", ("fe80::1", 9000)),
        ("[fe80::1]", ("fe80::1", 8643)),
        ("fe80::1", ("fe80::1", 8643)),
        (" host:1 ", ("host", 1)),
    ],
)
def test_parse_seed(text: str, expected: tuple[str, int]) -> None:
    assert parse_seed(text) == expected


@pytest.mark.parametrize("text", ["", ":80", "host:0", "host:65536", "host:http", "[fe80::1", "[::1]x", "a b:80", "user@h:1", "h/x:1"])
def test_parse_seed_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_seed(text)


async def test_seeds_resolved_and_reported_without_mdns() -> None:
    seen: list[tuple[str, int]] = []
    d = Discovery(
        node_id="node-s",
        props=PROPS,
        interfaces=[],
        on_found=lambda *a: None,
        seeds=["127.0.0.1:9001", "localhost:9002"],
        on_seed=seen.append,
        mdns=False,
    )
    await d.async_start()
    try:
        await wait_for(lambda: len(seen) >= 2, 5.0)
    finally:
        await d.async_stop()
        await d.async_stop()  # idempotent
    assert ("127.0.0.1", 9001) in seen
    assert ("127.0.0.1", 9002) in seen


def test_bad_own_node_id_is_config_error() -> None:
    with pytest.raises(ConfigError):
        Discovery(node_id="Bad.Id", props=PROPS, interfaces=[], on_found=lambda *a: None, mdns=False)


def test_mdns_without_interfaces_is_config_error() -> None:
    with pytest.raises(ConfigError):
        Discovery(node_id="node-a", props=PROPS, interfaces=[], on_found=lambda *a: None)


# -- two real instances over multicast on loopback -----------------------------------------

LO = NetInterface(name="lo", index=socket.if_nametoindex("lo"), is_loopback=True, ipv4=(ipaddress.IPv4Interface("127.0.0.1/8"),))


class Recorder:
    def __init__(self) -> None:
        self.found: dict[str, tuple[tuple[str, ...], ServiceProps]] = {}
        self.lost: list[str] = []

    def on_found(self, node_id: NodeId, addrs: tuple[str, ...], props: ServiceProps) -> None:
        self.found[node_id] = (addrs, props)

    def on_lost(self, node_id: NodeId) -> None:
        self.lost.append(node_id)


async def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a condition set by callbacks (they are plain functions, not events)."""
    async with asyncio.timeout(timeout_s):
        while not cond():  # noqa: ASYNC110 - callbacks under test are sync; polling keeps them unchanged
            await asyncio.sleep(0.02)


@pytest.fixture
def unique() -> str:
    """Return an id prefix unique to this process, so concurrent runs on one host stay apart."""
    return f"t{os.getpid()}"


async def test_two_instances_discover_each_other_on_loopback(unique: str) -> None:
    a_id, b_id = f"{unique}-a", f"{unique}-b"
    ra, rb = Recorder(), Recorder()
    a = Discovery(node_id=a_id, props=PROPS, interfaces=[LO], on_found=ra.on_found, on_lost=ra.on_lost)
    other_ck = ServiceProps(
        version="0.2.0", board="pi5", api_port=18642, gossip_port=18643, fingerprint="f" * 32, cluster_key_id="01020304"
    )
    b = Discovery(node_id=b_id, props=other_ck, interfaces=[LO], on_found=rb.on_found, on_lost=rb.on_lost)
    await a.async_start()
    try:
        await b.async_start()
        try:
            await wait_for(lambda: b_id in ra.found and a_id in rb.found)
            assert a_id not in ra.found  # our own announcement is ignored
            addrs, props = ra.found[b_id]
            assert addrs == ("127.0.0.1",)
            assert props == other_ck
            assert props.cluster_key_id == "01020304"
            assert rb.found[a_id][1].cluster_key_id == "deadbeef"
            assert b_id in a.peers()
            assert a_id not in a.peers()
            # Key rotation: a new primary key id is re-announced and reported again.
            rotated = dataclasses.replace(other_ck, cluster_key_id="0a0b0c0d")
            await b.async_update_props(rotated)
            await wait_for(lambda: ra.found[b_id][1].cluster_key_id == "0a0b0c0d")
        finally:
            await b.async_stop()
        # b's goodbye packets make a report it lost.
        await wait_for(lambda: b_id in ra.lost)
        assert b_id not in a.peers()
    finally:
        await a.async_stop()


async def test_hostile_announcements_are_rejected_not_reported(unique: str) -> None:
    """A raw zeroconf responder announces bad TXT values; discovery counts and drops them."""
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    rec = Recorder()
    me = Discovery(node_id=f"{unique}-me", props=PROPS, interfaces=[LO], on_found=rec.on_found)
    evil = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    bad = {
        f"{unique}-port": good_txt(id=f"{unique}-port", gossip="99999"),
        f"{unique}-lie": good_txt(id="someone-else"),
        f"{unique}-ck": good_txt(id=f"{unique}-ck", ck="not-hex!"),
    }
    good_id = f"{unique}-good"
    try:
        await me.async_start()
        infos = [
            AsyncServiceInfo(
                disc.SERVICE_TYPE,
                instance_name(node_id),
                port=8643,
                properties=txt,
                server=f"evil-{node_id}.local.",
                parsed_addresses=["127.0.0.1"],
            )
            for node_id, txt in [*bad.items(), (good_id, good_txt(id=good_id))]
        ]
        announced = await asyncio.gather(*(evil.async_register_service(i) for i in infos))
        await asyncio.gather(*announced)
        await wait_for(lambda: good_id in rec.found)
        await wait_for(lambda: sum(v for k, v in me.stats.items() if k.startswith("rejected_")) >= len(bad))
        assert not set(bad) & set(rec.found)
        assert me.stats["rejected_bad_port"] >= 1
        assert me.stats["rejected_id_mismatch"] >= 1
        assert me.stats["rejected_bad_value"] >= 1
    finally:
        await me.async_stop()
        await evil.async_close()
