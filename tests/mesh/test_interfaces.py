"""Interface selection: explicit choice, virtual interfaces skipped, loopback only as a fallback."""

from __future__ import annotations

import ipaddress

import pytest

from mongarsd.errors import ConfigError
from mongarsd.mesh import interfaces as ifs
from mongarsd.mesh.interfaces import (
    NetInterface,
    advertised_addresses,
    is_virtual,
    list_interfaces,
    rank_peer_addresses,
    select_interfaces,
    zeroconf_interfaces,
)


def iface(name: str, v4: str | None = None, *, index: int = 0, up: bool = True, v6: str | None = None, lo: bool = False) -> NetInterface:
    return NetInterface(
        name=name,
        index=index,
        is_up=up,
        is_loopback=lo,
        ipv4=(ipaddress.IPv4Interface(v4),) if v4 else (),
        ipv6=(ipaddress.IPv6Interface(v6),) if v6 else (),
    )


LO = iface("lo", "127.0.0.1/8", index=1, lo=True)
ETH = iface("eth0", "192.168.1.10/24", index=2, v6="fe80::1/64")
WLAN = iface("wlan0", "192.168.2.10/24", index=3)
DOCKER = iface("docker0", "172.17.0.1/16", index=4)
BR = iface("br-1a2b3c", "172.18.0.1/16", index=5)
VETH = iface("veth12ab", "169.254.1.1/16", index=6)
WG = iface("wg0", "10.8.0.2/24", index=7)
TS = iface("tailscale0", "100.64.0.1/10", index=8)
DOWN = iface("eth1", "192.168.3.10/24", index=9, up=False)
NOADDR = iface("eth2", index=10)
HOST = [LO, ETH, WLAN, DOCKER, BR, VETH, WG, TS, DOWN, NOADDR]


@pytest.mark.parametrize(
    "name",
    [
        "docker0",
        "br-abc",
        "veth0",
        "virbr0",
        "vmnet8",
        "tun0",
        "tap1",
        "wg0",
        "lxcbr0",
        "cni0",
        "flannel.1",
        "kube-ipvs0",
        "podman0",
        "zt123",
        "tailscale0",
    ],
)
def test_virtual_names(name: str) -> None:
    assert is_virtual(name)


@pytest.mark.parametrize("name", ["eth0", "enp3s0", "wlan0", "wlp2s0", "end0", "usb0", "bond0", "eno1"])
def test_physical_names(name: str) -> None:
    assert not is_virtual(name)


def test_default_selection_skips_virtual_down_loopback_and_addressless() -> None:
    sel = select_interfaces(HOST)
    assert sel.names == ("eth0", "wlan0")
    reasons = dict(sel.skipped)
    assert reasons["docker0"] == ifs.SKIP_VIRTUAL
    assert reasons["br-1a2b3c"] == ifs.SKIP_VIRTUAL
    assert reasons["veth12ab"] == ifs.SKIP_VIRTUAL
    assert reasons["wg0"] == ifs.SKIP_VIRTUAL
    assert reasons["tailscale0"] == ifs.SKIP_VIRTUAL
    assert reasons["eth1"] == ifs.SKIP_DOWN
    assert reasons["eth2"] == ifs.SKIP_NO_ADDRESS
    assert reasons["lo"] == ifs.SKIP_LOOPBACK
    assert sel.missing == ()


def test_virtual_kept_when_skipping_disabled() -> None:
    sel = select_interfaces(HOST, skip_virtual=False)
    assert set(sel.names) == {"eth0", "wlan0", "docker0", "br-1a2b3c", "veth12ab", "wg0", "tailscale0"}
    assert "lo" not in sel.names


def test_configured_names_are_exact_and_may_be_virtual_or_loopback() -> None:
    sel = select_interfaces(HOST, configured=["wg0", "lo"])
    assert sel.names == ("lo", "wg0")
    assert dict(sel.skipped)["eth0"] == ifs.SKIP_NOT_CONFIGURED


def test_configured_patterns_and_missing_names() -> None:
    sel = select_interfaces(HOST, configured=["eth*", "usb0"])
    assert sel.names == ("eth0",)  # eth1 down, eth2 without address
    assert dict(sel.skipped)["eth1"] == ifs.SKIP_DOWN
    assert dict(sel.skipped)["eth2"] == ifs.SKIP_NO_ADDRESS
    assert sel.missing == ("usb0",)


def test_loopback_is_the_fallback_only_when_nothing_else_exists() -> None:
    assert select_interfaces([LO, DOCKER, DOWN]).names == ("lo",)
    assert select_interfaces([LO, ETH]).names == ("eth0",)
    assert select_interfaces([DOCKER, DOWN]).names == ()


def test_ip_mode_v6_needs_v6_addresses() -> None:
    sel = select_interfaces(HOST, ip_mode="v6")
    assert sel.names == ("eth0",)
    assert dict(sel.skipped)["wlan0"] == ifs.SKIP_NO_ADDRESS


def test_zeroconf_interfaces_and_advertised_addresses() -> None:
    assert zeroconf_interfaces([ETH, WLAN]) == ["192.168.1.10", "192.168.2.10"]
    assert zeroconf_interfaces([ETH, WLAN], "v6") == [2]
    assert zeroconf_interfaces([ETH], "all") == ["192.168.1.10", 2]
    assert advertised_addresses([ETH, WLAN, ETH]) == ["192.168.1.10", "192.168.2.10"]
    assert advertised_addresses([ETH], "all") == ["192.168.1.10", "fe80::1"]


def test_rank_peer_addresses_prefers_our_subnets() -> None:
    peer = ["10.9.9.9", "192.168.2.20", "bogus", "192.168.1.20", "10.9.9.9"]
    assert rank_peer_addresses(peer, [ETH, WLAN]) == ["192.168.2.20", "192.168.1.20", "10.9.9.9", "bogus"]


def test_list_interfaces_on_this_host_has_loopback() -> None:
    found = {i.name: i for i in list_interfaces()}
    assert "lo" in found
    assert found["lo"].is_loopback
    assert ipaddress.IPv4Interface("127.0.0.1/8") in found["lo"].ipv4


async def test_async_select_host_interfaces_errors_on_missing_names() -> None:
    with pytest.raises(ConfigError):
        await ifs.async_select_host_interfaces(["no-such-if0"])
    sel = await ifs.async_select_host_interfaces(["lo"])
    assert sel.names == ("lo",)
