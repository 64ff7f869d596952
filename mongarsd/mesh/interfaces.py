"""Network interface enumeration and the explicit choice of interfaces the mesh uses.

Selection is a pure function over a snapshot of the host's interfaces so that it is unit-tested
without I/O. Virtual interfaces (containers, bridges, tunnels) are skipped unless named in the
configuration: announcing a node on a docker bridge or a VPN tunnel makes peers try addresses
they cannot reach.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import psutil

from mongarsd.errors import ConfigError

IpMode = Literal["v4", "v6", "all"]

# Name prefixes of interfaces that are virtual by convention on Linux hosts and boards.
VIRTUAL_INTERFACE_PREFIXES: Final[tuple[str, ...]] = (
    "docker",  # Docker default bridge
    "br-",  # Docker user-defined bridges
    "veth",  # container end of veth pairs
    "virbr",  # libvirt
    "vmnet",  # VMware
    "vboxnet",  # VirtualBox host-only
    "tun",  # tunnels (OpenVPN, ...)
    "tap",
    "wg",  # WireGuard
    "lxcbr",  # LXC
    "lxdbr",  # LXD
    "cni",  # Kubernetes CNI
    "flannel",
    "kube",
    "cali",  # Calico
    "weave",
    "podman",
    "zt",  # ZeroTier
    "tailscale",
    "dummy",
)

# Reasons reported for interfaces that were not chosen.
SKIP_DOWN: Final = "down"
SKIP_LOOPBACK: Final = "loopback"
SKIP_VIRTUAL: Final = "virtual"
SKIP_NOT_CONFIGURED: Final = "not_configured"
SKIP_NO_ADDRESS: Final = "no_address"


@dataclass(frozen=True, slots=True)
class NetInterface:
    """One interface's state and addresses at the time of the snapshot."""

    name: str
    index: int = 0
    is_up: bool = True
    is_loopback: bool = False
    ipv4: tuple[ipaddress.IPv4Interface, ...] = ()
    ipv6: tuple[ipaddress.IPv6Interface, ...] = ()  # without scope id; `index` is the scope

    def addresses(self, ip_mode: IpMode = "v4") -> tuple[str, ...]:
        """Return this interface's addresses for the IP mode, as strings without prefix."""
        out: list[str] = []
        if ip_mode in ("v4", "all"):
            out.extend(str(a.ip) for a in self.ipv4)
        if ip_mode in ("v6", "all"):
            out.extend(str(a.ip) for a in self.ipv6)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class InterfaceSelection:
    """The interfaces chosen, and why the others were not."""

    chosen: tuple[NetInterface, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (name, reason)
    missing: tuple[str, ...] = field(default=())  # configured names/patterns that matched nothing

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.chosen)


def is_virtual(name: str, prefixes: Sequence[str] = VIRTUAL_INTERFACE_PREFIXES) -> bool:
    """Return whether an interface name looks virtual (container, bridge, tunnel)."""
    return name.startswith(tuple(prefixes))


def _loopback_name(name: str) -> bool:
    return name == "lo" or name.startswith("lo0")


def select_interfaces(
    available: Iterable[NetInterface],
    *,
    configured: Sequence[str] = (),
    skip_virtual: bool = True,
    ip_mode: IpMode = "v4",
    virtual_prefixes: Sequence[str] = VIRTUAL_INTERFACE_PREFIXES,
) -> InterfaceSelection:
    """Choose the interfaces the mesh announces and listens on (pure).

    With `configured` names (shell-style patterns allowed, e.g. "eth*"), exactly the matching
    interfaces that are up and have an address of the IP mode are chosen, virtual or loopback
    included. Without, every up non-loopback interface with an address is chosen, skipping
    virtual ones when `skip_virtual`; loopback is the fallback only when nothing else remains
    (single-host tests).
    """
    ifaces = sorted(available, key=lambda i: (i.index, i.name))
    chosen: list[NetInterface] = []
    skipped: list[tuple[str, str]] = []

    if configured:
        matched_patterns: set[str] = set()
        for iface in ifaces:
            hits = [p for p in configured if fnmatch.fnmatchcase(iface.name, p)]
            if not hits:
                skipped.append((iface.name, SKIP_NOT_CONFIGURED))
                continue
            matched_patterns.update(hits)
            if not iface.is_up:
                skipped.append((iface.name, SKIP_DOWN))
            elif not iface.addresses(ip_mode):
                skipped.append((iface.name, SKIP_NO_ADDRESS))
            else:
                chosen.append(iface)
        missing = tuple(p for p in configured if p not in matched_patterns)
        return InterfaceSelection(tuple(chosen), tuple(skipped), missing)

    loopbacks: list[NetInterface] = []
    for iface in ifaces:
        if not iface.is_up:
            skipped.append((iface.name, SKIP_DOWN))
        elif iface.is_loopback or _loopback_name(iface.name):
            loopbacks.append(iface)
        elif skip_virtual and is_virtual(iface.name, virtual_prefixes):
            skipped.append((iface.name, SKIP_VIRTUAL))
        elif not iface.addresses(ip_mode):
            skipped.append((iface.name, SKIP_NO_ADDRESS))
        else:
            chosen.append(iface)
    for iface in loopbacks:
        if not chosen and iface.addresses(ip_mode):
            chosen.append(iface)
        else:
            skipped.append((iface.name, SKIP_LOOPBACK if iface.addresses(ip_mode) else SKIP_NO_ADDRESS))
    return InterfaceSelection(tuple(chosen), tuple(skipped), ())


def zeroconf_interfaces(chosen: Iterable[NetInterface], ip_mode: IpMode = "v4") -> list[str | int]:
    """Return the `interfaces=` list for python-zeroconf: IPv4 addresses, IPv6 interface indexes (pure)."""
    out: list[str | int] = []
    for iface in chosen:
        if ip_mode in ("v4", "all"):
            out.extend(str(a.ip) for a in iface.ipv4)
        if ip_mode in ("v6", "all") and iface.ipv6 and iface.index > 0 and iface.index not in out:
            out.append(iface.index)
    return out


def advertised_addresses(chosen: Iterable[NetInterface], ip_mode: IpMode = "v4") -> list[str]:
    """Return the addresses to publish in A/AAAA records, deduplicated, in interface order (pure)."""
    seen: dict[str, None] = {}
    for iface in chosen:
        for addr in iface.addresses(ip_mode):
            seen.setdefault(addr, None)
    return list(seen)


def rank_peer_addresses(peer_addresses: Iterable[str], ours: Iterable[NetInterface]) -> list[str]:
    """Order a peer's addresses: those on one of our subnets first, stable otherwise (pure)."""
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [a.network for i in ours for a in i.ipv4]
    nets.extend(a.network for i in ours for a in i.ipv6)
    addrs = list(dict.fromkeys(peer_addresses))

    def on_our_subnet(text: str) -> bool:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip.version == n.version and ip in n for n in nets)

    return sorted(addrs, key=lambda a: 0 if on_our_subnet(a) else 1)


def list_interfaces() -> list[NetInterface]:
    """Snapshot the host's interfaces with psutil (blocking: netlink/ioctl; cheap, but call from a thread)."""
    addrs = psutil.net_if_addrs()
    stats = psutil.net_if_stats()
    out: list[NetInterface] = []
    for name, entries in addrs.items():
        v4: list[ipaddress.IPv4Interface] = []
        v6: list[ipaddress.IPv6Interface] = []
        for entry in entries:
            if entry.family == socket.AF_INET and entry.netmask:
                try:
                    v4.append(ipaddress.IPv4Interface(f"{entry.address}/{entry.netmask}"))
                except ValueError:
                    continue
            elif entry.family == socket.AF_INET6 and entry.netmask:
                try:
                    prefix = ipaddress.IPv6Network(f"::/{entry.netmask}", strict=False).prefixlen
                    v6.append(ipaddress.IPv6Interface(f"{entry.address.split('%', 1)[0]}/{prefix}"))
                except ValueError:
                    continue
        st = stats.get(name)
        try:
            index = socket.if_nametoindex(name)
        except OSError:
            index = 0
        is_loopback = _loopback_name(name) or any(a.is_loopback for a in v4)
        out.append(
            NetInterface(
                name=name,
                index=index,
                is_up=bool(st.isup) if st is not None else False,
                is_loopback=is_loopback,
                ipv4=tuple(v4),
                ipv6=tuple(v6),
            )
        )
    return out


async def async_select_host_interfaces(
    configured: Sequence[str] = (), *, skip_virtual: bool = True, ip_mode: IpMode = "v4"
) -> InterfaceSelection:
    """Snapshot the host's interfaces in a thread and select; ConfigError if nothing is usable."""
    available = await asyncio.to_thread(list_interfaces)
    selection = select_interfaces(available, configured=configured, skip_virtual=skip_virtual, ip_mode=ip_mode)
    if not selection.chosen:
        raise ConfigError(f"mesh: no usable network interface (configured={list(configured)}, skipped={list(selection.skipped)})")
    return selection
