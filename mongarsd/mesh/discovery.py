"""Peer discovery: mDNS/DNS-SD announcement and browsing of `_mongars._tcp.local.`, plus static seeds.

Every node registers one service instance named by its node id, with TXT keys `id`, `ver`,
`board`, `api`, `gossip`, `fp` (identity fingerprint) and `ck` (cluster key id, never the key).
Everything read from the network is hostile: the raw TXT bytes are parsed here (RFC 6763 §6)
under a size cap and every value is checked for length, charset and range before a peer is
reported. Discovery only reports candidates; whether a peer is admitted (same cluster key,
valid signed identity) is the gossip layer's decision.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
from zeroconf import (
    BadTypeInNameException,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mongarsd.errors import ConfigError, MeshError
from mongarsd.mesh import const
from mongarsd.mesh.interfaces import (
    IpMode,
    NetInterface,
    advertised_addresses,
    rank_peer_addresses,
    zeroconf_interfaces,
)
from mongarsd.mesh.wire import Addr, NodeId
from mongarsd.supervisor import TaskSupervisor

log = structlog.get_logger("mongarsd.mesh.discovery")

SERVICE_TYPE: Final = "_mongars._tcp.local."

# Hostile-input caps (RFC 6763 §6.1 recommends TXT records well under 1300 bytes).
MAX_TXT_BYTES: Final = 1300
MAX_TXT_ENTRIES: Final = 32
MAX_PEER_ADDRESSES: Final = 16
MAX_PEERS: Final = 1024
MAX_PENDING_RESOLVES: Final = 32

# Timing.
RESOLVE_TIMEOUT_MS: Final = 3000
SEED_REFRESH_INTERVAL_S: Final = 30.0
SEED_RESOLVE_TIMEOUT_S: Final = 5.0
REJECT_LOG_INTERVAL_S: Final = 60.0
REJECT_LOG_MAX_KEYS: Final = 256

# TXT value grammars. Node ids are DNS labels (<= 63 octets) and mDNS names are
# case-insensitive, hence lowercase only.
NODE_ID_RE: Final = re.compile(r"[0-9a-z][0-9a-z_-]{0,62}")
VERSION_RE: Final = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}")
BOARD_RE: Final = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}")
PORT_RE: Final = re.compile(r"[0-9]{1,5}")
FINGERPRINT_RE: Final = re.compile(r"[0-9a-f]{32}")
CLUSTER_KEY_ID_RE: Final = re.compile("[0-9a-f]{" + str(2 * const.KEY_ID_BYTES) + "}")

TXT_KEYS: Final = ("id", "ver", "board", "api", "gossip", "fp", "ck")

_IP_VERSIONS: Final[dict[str, IPVersion]] = {"v4": IPVersion.V4Only, "v6": IPVersion.V6Only, "all": IPVersion.All}


class DiscoveryError(MeshError):
    """Discovery could not start (socket, name conflict) or was misconfigured."""


class TxtError(MeshError):
    """A peer's TXT record is malformed or out of range; `reason` is a short stable tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ServiceProps:
    """What a node announces about itself besides its id and addresses."""

    version: str
    board: str
    api_port: int
    gossip_port: int
    fingerprint: str  # identity fingerprint, 32 hex chars
    cluster_key_id: str  # hex key id of the primary cluster key; never the key itself

    def to_txt(self, node_id: str) -> dict[str, str]:
        """Return the TXT key/values to publish (checked by the same rules peers apply)."""
        txt = {
            "id": node_id,
            "ver": self.version,
            "board": self.board,
            "api": str(self.api_port),
            "gossip": str(self.gossip_port),
            "fp": self.fingerprint,
            "ck": self.cluster_key_id,
        }
        try:
            validate_txt(txt, instance_id=node_id)
        except TxtError as err:
            raise ConfigError(f"mesh discovery: own announcement is invalid ({err})") from err
        return txt


FoundCallback = Callable[[NodeId, tuple[str, ...], ServiceProps], None]
LostCallback = Callable[[NodeId], None]
SeedCallback = Callable[[Addr], None]


def instance_name(node_id: str) -> str:
    """Return the DNS-SD instance name for a node id."""
    return f"{node_id}.{SERVICE_TYPE}"


def node_id_from_instance(name: str) -> str | None:
    """Return the node id encoded in an instance name, or None if it is not one of ours (pure)."""
    suffix = "." + SERVICE_TYPE
    if not name.lower().endswith(suffix):
        return None
    label = name[: -len(suffix)]
    return label if NODE_ID_RE.fullmatch(label) else None


def parse_txt(raw: bytes) -> dict[str, str]:
    """Parse raw TXT rdata into key/values (pure; RFC 6763 §6).

    Caps total size and entry count; keys are printable ASCII without '=', compared
    case-insensitively; the first occurrence of a key wins (§6.4); values must be UTF-8.
    An entry without '=' (a boolean attribute, §6.4) is recorded as "", which the value
    grammars reject where a value is required.
    """
    if len(raw) > MAX_TXT_BYTES:
        raise TxtError("txt_too_large", str(len(raw)))
    out: dict[str, str] = {}
    pos = 0
    entries = 0
    while pos < len(raw):
        length = raw[pos]
        pos += 1
        if length == 0:
            continue  # an empty string: the encoding of an empty TXT record
        if pos + length > len(raw):
            raise TxtError("txt_truncated")
        entry = raw[pos : pos + length]
        pos += length
        entries += 1
        if entries > MAX_TXT_ENTRIES:
            raise TxtError("txt_too_many_entries")
        key_b, sep, value_b = entry.partition(b"=")
        if not key_b or any(c < 0x20 or c > 0x7E for c in key_b):
            raise TxtError("txt_bad_key")
        key = key_b.decode("ascii").lower()
        if key in out:
            continue
        try:
            value = value_b.decode("utf-8", errors="strict") if sep else ""
        except UnicodeDecodeError as err:
            raise TxtError("txt_bad_utf8", key) from err
        out[key] = value
    return out


def _port(txt: Mapping[str, str], key: str) -> int:
    text = txt.get(key, "")
    if not PORT_RE.fullmatch(text):
        raise TxtError("bad_port", key)
    port = int(text)
    if not 1 <= port <= 65535:
        raise TxtError("bad_port", key)
    return port


def _match(txt: Mapping[str, str], key: str, pattern: re.Pattern[str]) -> str:
    value = txt.get(key)
    if value is None:
        raise TxtError("missing_key", key)
    if not pattern.fullmatch(value):
        raise TxtError("bad_value", key)
    return value


def validate_txt(txt: Mapping[str, str], *, instance_id: str | None) -> tuple[NodeId, ServiceProps]:
    """Check a peer's TXT values and return its node id and props (pure; raises TxtError).

    `instance_id` is the node id from the instance name; the `id` key must agree with it so a
    node cannot announce one name and claim another id.
    """
    node_id = _match(txt, "id", NODE_ID_RE)
    if instance_id is not None and node_id != instance_id:
        raise TxtError("id_mismatch")
    props = ServiceProps(
        version=_match(txt, "ver", VERSION_RE),
        board=_match(txt, "board", BOARD_RE),
        api_port=_port(txt, "api"),
        gossip_port=_port(txt, "gossip"),
        fingerprint=_match(txt, "fp", FINGERPRINT_RE),
        cluster_key_id=_match(txt, "ck", CLUSTER_KEY_ID_RE),
    )
    return NodeId(node_id), props


def filter_peer_addresses(addresses: Iterable[str], *, allow_loopback: bool) -> tuple[str, ...]:
    """Keep usable unicast addresses, deduplicated and capped (pure)."""
    out: list[str] = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if ip.is_unspecified or ip.is_multicast or (ip.is_loopback and not allow_loopback):
            continue
        if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
            continue
        if text not in out:
            out.append(text)
        if len(out) >= MAX_PEER_ADDRESSES:
            break
    return tuple(out)


def parse_seed(text: str, default_port: int = 8643) -> tuple[str, int]:
    """Parse "host", "host:port", "[v6]:port" or a bare IPv6 address into (host, port) (pure)."""
    text = text.strip()
    if not text or len(text) > 255:
        raise ConfigError(f"mesh.seeds: invalid seed {text!r}")
    host: str
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"mesh.seeds: invalid seed {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text  # a bare host name, IPv4, or an unbracketed IPv6 address without port
    if not host or any(c.isspace() or c in "/@" for c in host):
        raise ConfigError(f"mesh.seeds: invalid seed {text!r}")
    if port_text is None:
        return host, default_port
    if not PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"mesh.seeds: invalid port in {text!r}")
    return host, int(port_text)


class _LogOnce:
    """Log one line per key per interval, with bounded memory (network is hostile)."""

    def __init__(self, interval_s: float, max_keys: int) -> None:
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._last: dict[tuple[str, str], float] = {}

    def should_log(self, key: tuple[str, str]) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            return False
        if len(self._last) >= self._max_keys:
            self._last = {k: t for k, t in self._last.items() if now - t < self._interval_s}
            if len(self._last) >= self._max_keys:
                return False
        self._last[key] = now
        return True


class Discovery:
    """Announce this node over mDNS, browse for peers and resolve static seeds."""

    name = "discovery"
    start_timeout_s = 15.0
    stop_timeout_s = 10.0

    def __init__(
        self,
        *,
        node_id: str,
        props: ServiceProps,
        interfaces: Sequence[NetInterface],
        on_found: FoundCallback,
        on_lost: LostCallback | None = None,
        seeds: Sequence[str] = (),
        on_seed: SeedCallback | None = None,
        ip_mode: IpMode = "v4",
        advertise_addresses: Sequence[str] | None = None,
        mdns: bool = True,
        tasks: TaskSupervisor | None = None,
    ) -> None:
        if not NODE_ID_RE.fullmatch(node_id):
            raise ConfigError(f"mesh discovery: node id {node_id!r} is not a valid DNS label")
        self._node_id = NodeId(node_id)
        self._props = props
        self._txt = props.to_txt(node_id)
        self._interfaces = tuple(interfaces)
        self._ip_mode: IpMode = ip_mode
        self._on_found = on_found
        self._on_lost = on_lost
        self._on_seed = on_seed
        self._mdns = mdns
        self._seeds = tuple(parse_seed(s, props.gossip_port) for s in seeds)
        addrs = list(advertise_addresses) if advertise_addresses is not None else advertised_addresses(interfaces, ip_mode)
        self._advertise = addrs
        self._zc_interfaces = zeroconf_interfaces(interfaces, ip_mode)
        if mdns and (not self._zc_interfaces or not addrs):
            raise ConfigError("mesh discovery: mDNS needs at least one interface with an address")
        # Loopback peers make sense only when we ourselves run on loopback (single-host tests).
        self._allow_loopback = any(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addrs)

        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks = tasks if tasks is not None else TaskSupervisor()
        self._resolving: set[str] = set()
        self._peers: dict[str, tuple[NodeId, tuple[str, ...], ServiceProps]] = {}
        self._seed_addrs: tuple[Addr, ...] = ()
        self._log_once = _LogOnce(REJECT_LOG_INTERVAL_S, REJECT_LOG_MAX_KEYS)
        self._started = False
        self._stopped = False
        self.stats: Counter[str] = Counter()

    # -- public -----------------------------------------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return self._node_id

    @property
    def seeds(self) -> tuple[tuple[str, int], ...]:
        """Return the configured seeds as (host, port), unresolved."""
        return self._seeds

    def peers(self) -> dict[NodeId, tuple[tuple[str, ...], ServiceProps]]:
        """Return the peers currently known from mDNS (node id -> addresses, props)."""
        return {nid: (addrs, props) for nid, addrs, props in self._peers.values()}

    async def async_start(self) -> None:
        """Register our service instance, start browsing and the seed loop."""
        if self._started:
            return
        self._started = True
        try:
            if self._mdns:
                await self._async_start_mdns()
            if self._seeds and self._on_seed is not None:
                self._tasks.spawn(f"discovery-seeds-{self._node_id}", self._async_seed_loop, restart=True, owner=self)
        except BaseException:
            await self.async_stop()
            raise
        log.info(
            "mesh_discovery_started",
            node_id=self._node_id,
            mdns=self._mdns,
            addresses=self._advertise,
            interfaces=[i.name for i in self._interfaces],
            seeds=len(self._seeds),
        )

    async def async_stop(self) -> None:
        """Say goodbye on mDNS, cancel our tasks and close the sockets (idempotent)."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        browser, self._browser = self._browser, None
        aiozc, self._aiozc = self._aiozc, None
        if browser is not None:
            await browser.async_cancel()
        await self._tasks.async_stop(self.stop_timeout_s, owner=self)
        if aiozc is not None:
            try:
                await aiozc.async_unregister_all_services()
            finally:
                await aiozc.async_close()
        log.info("mesh_discovery_stopped", node_id=self._node_id)

    @property
    def props(self) -> ServiceProps:
        """The properties this node currently advertises."""
        return self._props

    async def async_update_props(self, props: ServiceProps) -> None:
        """Re-announce changed props (e.g. a new primary cluster key id after rotation)."""
        self._txt = props.to_txt(self._node_id)
        self._props = props
        if self._aiozc is None or self._info is None:
            return
        self._info = self._make_info()
        await (await self._aiozc.async_update_service(self._info))

    async def async_resolve_seeds(self) -> list[Addr]:
        """Resolve the configured seeds to (ip, port) addresses; unresolvable ones are logged and skipped."""
        loop = asyncio.get_running_loop()
        family = {"v4": socket.AF_INET, "v6": socket.AF_INET6}.get(self._ip_mode, socket.AF_UNSPEC)
        out: list[Addr] = []
        for host, port in self._seeds:
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM),
                    SEED_RESOLVE_TIMEOUT_S,
                )
            except (OSError, TimeoutError) as err:  # DNS failure or timeout: retry next round
                log.warning("mesh_seed_unresolved", seed=f"{host}:{port}", error=str(err))
                continue
            for _family, _type, _proto, _canon, sockaddr in infos:
                addr: Addr = (str(sockaddr[0]), int(sockaddr[1]))
                if addr not in out:
                    out.append(addr)
        return out

    # -- mDNS -------------------------------------------------------------------------------

    def _make_info(self) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            instance_name(self._node_id),
            port=self._props.gossip_port,
            properties=self._txt,
            server=f"mongars-{self._node_id}.local.",
            parsed_addresses=list(self._advertise),
        )

    async def _async_start_mdns(self) -> None:
        try:
            self._aiozc = AsyncZeroconf(interfaces=self._zc_interfaces, ip_version=_IP_VERSIONS[self._ip_mode])
        except OSError as err:
            raise DiscoveryError(f"mesh discovery: cannot open mDNS sockets: {err}") from err
        self._info = self._make_info()
        try:
            await (await self._aiozc.async_register_service(self._info))
        except NonUniqueNameException as err:
            raise DiscoveryError(f"mesh discovery: another host already announces node id {self._node_id}") from err
        except BadTypeInNameException as err:
            raise DiscoveryError(f"mesh discovery: bad service name for {self._node_id}") from err
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change])

    def _on_state_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        """Handle a browser event (loop-only; called by zeroconf on our event loop)."""
        if self._stopped:
            return
        node_id = node_id_from_instance(name)
        if node_id is None:
            self._reject(name, "bad_instance_name")
            return
        if node_id == self._node_id:
            return
        if state_change is ServiceStateChange.Removed:
            entry = self._peers.pop(name, None)
            if entry is not None:
                log.info("mesh_peer_lost", peer=entry[0], via="mdns")
                self._call(self._on_lost, entry[0])
            return
        if name in self._resolving:
            return
        if len(self._resolving) >= MAX_PENDING_RESOLVES:
            self.stats["resolve_dropped"] += 1
            return
        if name not in self._peers and len(self._peers) >= MAX_PEERS:
            self._reject(name, "too_many_peers")
            return
        self._resolving.add(name)
        self._tasks.spawn_once("discovery-resolve", self._async_resolve(name, node_id), owner=self)

    async def _async_resolve(self, name: str, node_id: str) -> None:
        try:
            aiozc = self._aiozc
            if aiozc is None:
                return
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
                self.stats["resolve_timeout"] += 1
                log.debug("mesh_peer_resolve_timeout", instance=name)
                return
            self._accept(name, node_id, info)
        finally:
            self._resolving.discard(name)

    def _accept(self, name: str, node_id: str, info: AsyncServiceInfo) -> None:
        try:
            txt = parse_txt(info.text or b"")
            peer_id, props = validate_txt(txt, instance_id=node_id)
        except TxtError as err:
            self._reject(name, err.reason)
            return
        if info.port is not None and info.port != props.gossip_port:
            self._reject(name, "srv_port_mismatch")
            return
        raw_addrs = info.parsed_scoped_addresses(_IP_VERSIONS[self._ip_mode])
        addrs = filter_peer_addresses(raw_addrs, allow_loopback=self._allow_loopback)
        if not addrs:
            self._reject(name, "no_usable_address")
            return
        addrs = tuple(rank_peer_addresses(addrs, self._interfaces))
        entry = (peer_id, addrs, props)
        if self._peers.get(name) == entry:
            return
        self._peers[name] = entry
        self.stats["found"] += 1
        log.info(
            "mesh_peer_found",
            peer=peer_id,
            addresses=list(addrs),
            ck=props.cluster_key_id,
            gossip_port=props.gossip_port,
            via="mdns",
        )
        self._call(self._on_found, peer_id, addrs, props)

    def _reject(self, name: str, reason: str) -> None:
        self.stats[f"rejected_{reason}"] += 1
        if self._log_once.should_log((reason, name[:128])):
            log.warning("mesh_peer_announcement_rejected", instance=name[:128], reason=reason)

    # -- seeds ------------------------------------------------------------------------------

    async def _async_seed_loop(self) -> None:
        while True:
            addrs = tuple(await self.async_resolve_seeds())
            if addrs != self._seed_addrs:
                self._seed_addrs = addrs
                for addr in addrs:
                    self._call(self._on_seed, addr)
            await asyncio.sleep(SEED_REFRESH_INTERVAL_S)

    # -- callbacks --------------------------------------------------------------------------

    def _call(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception as err:  # a consumer bug must not kill discovery; it is logged
            log.error("mesh_discovery_callback_failed", error=repr(err), exc_info=err)


__all__ = [
    "SERVICE_TYPE",
    "Discovery",
    "DiscoveryError",
    "FoundCallback",
    "LostCallback",
    "SeedCallback",
    "ServiceProps",
    "TxtError",
    "filter_peer_addresses",
    "instance_name",
    "node_id_from_instance",
    "parse_seed",
    "parse_txt",
    "validate_txt",
]
