"""Packet and stream transports: real UDP+TCP, and a seeded in-memory network for tests.

Transports move opaque (already encrypted) bytes. Streams carry length-prefixed frames whose
length is checked against the cap before the body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import structlog

from mongarsd.const import DEFAULT_GOSSIP_PORT
from mongarsd.errors import MeshError
from mongarsd.mesh import const
from mongarsd.mesh.security import DropError
from mongarsd.mesh.wire import Addr
from mongarsd.supervisor import TaskSupervisor

log = structlog.get_logger("mongarsd.mesh.transport")

_LEN = struct.Struct(">I")

PacketHandler = Callable[[bytes, Addr], None]


class Stream(Protocol):
    """A bidirectional framed byte stream (TCP or in-memory)."""

    peer: Addr

    async def async_read_frame(self, max_bytes: int) -> bytes: ...

    async def async_write_frame(self, data: bytes) -> None: ...

    async def async_close(self) -> None: ...


StreamHandler = Callable[[Stream], Awaitable[None]]


class Transport(Protocol):
    """What GossipNode needs from the network."""

    @property
    def local_addr(self) -> Addr: ...

    def set_handlers(self, on_packet: PacketHandler, on_stream: StreamHandler) -> None: ...

    async def async_start(self) -> None: ...

    async def async_stop(self) -> None: ...

    def send_packet(self, addr: Addr, data: bytes) -> None: ...

    async def async_open_stream(self, addr: Addr) -> Stream: ...


class _StreamTasks:
    """Own the tasks that serve inbound streams; bounded, cancelled on stop."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.tasks: set[asyncio.Task[None]] = set()

    def full(self) -> bool:
        return len(self.tasks) >= self._limit

    def add(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mesh_stream_handler_crashed", error=repr(task.exception()))

    async def async_cancel_all(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


# --- real UDP + TCP -------------------------------------------------------------------------


class _TcpStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self.peer: Addr = (str(peer[0]), int(peer[1])) if peer else ("?", 0)

    async def async_read_frame(self, max_bytes: int) -> bytes:
        try:
            header = await self._reader.readexactly(_LEN.size)
            (length,) = _LEN.unpack(header)
            if length > max_bytes:  # cap checked before reading the body
                raise DropError("too_large", f"frame of {length} bytes")
            return await self._reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError) as err:
            raise MeshError("stream closed") from err

    async def async_write_frame(self, data: bytes) -> None:
        try:
            self._writer.write(_LEN.pack(len(data)) + data)
            await self._writer.drain()
        except ConnectionError as err:
            raise MeshError("stream closed") from err

    async def async_close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):  # peer already gone
            await self._writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpTcpTransport) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self._owner._on_datagram(data, (str(addr[0]), int(str(addr[1]))))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable etc.: the peer is gone; SWIM will notice by itself.
        log.debug("mesh_udp_error", error=repr(exc))


class UdpTcpTransport:
    """UDP for packets and TCP (same port) for push-pull streams, both bounded."""

    def __init__(
        self,
        *,
        bind_host: str = "0.0.0.0",
        port: int = DEFAULT_GOSSIP_PORT,
        max_streams: int = const.MAX_CONCURRENT_STREAMS,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self._bind_host = bind_host
        self._port = port
        self._connect_timeout_s = connect_timeout_s
        self._on_packet: PacketHandler | None = None
        self._on_stream: StreamHandler | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._streams = _StreamTasks(max_streams)
        self.dropped_oversize = 0
        self.dropped_bad_addr = 0

    @property
    def local_addr(self) -> Addr:
        return (self._bind_host, self._port)

    def set_handlers(self, on_packet: PacketHandler, on_stream: StreamHandler) -> None:
        self._on_packet = on_packet
        self._on_stream = on_stream

    async def async_start(self) -> None:
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=(self._bind_host, self._port))
        self._udp = udp
        self._port = int(udp.get_extra_info("sockname")[1])
        try:
            self._server = await asyncio.start_server(self._on_client, self._bind_host, self._port, reuse_address=True)
        except OSError:
            udp.close()
            self._udp = None
            raise

    async def async_stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._streams.async_cancel_all()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        if len(data) > const.MAX_UDP_PACKET_BYTES:
            self.dropped_oversize += 1
            return
        if self._on_packet is not None:
            self._on_packet(data, addr)

    def send_packet(self, addr: Addr, data: bytes) -> None:
        if self._udp is None or self._udp.is_closing():
            return
        try:
            # IP literals only: a hostname would make sendto resolve synchronously.
            ipaddress.ip_address(addr[0])
        except ValueError:
            self.dropped_bad_addr += 1
            return
        self._udp.sendto(data, addr)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._streams.full() or self._on_stream is None:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        stream = _TcpStream(reader, writer)
        try:
            await self._on_stream(stream)
        finally:
            await stream.async_close()

    async def async_open_stream(self, addr: Addr) -> Stream:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                reader, writer = await asyncio.open_connection(addr[0], addr[1])
        except (OSError, TimeoutError) as err:
            raise MeshError(f"cannot connect to {addr[0]}:{addr[1]}") from err
        return _TcpStream(reader, writer)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port free for both UDP and TCP on `host` (for tests; racy by nature)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise MeshError("no free port")


# --- in-memory network ----------------------------------------------------------------------


class _MemStream:
    def __init__(self, peer: Addr, inbox: asyncio.Queue[bytes | None], outbox: asyncio.Queue[bytes | None]) -> None:
        self.peer = peer
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False

    async def async_read_frame(self, max_bytes: int) -> bytes:
        data = await self._inbox.get()
        if data is None:
            raise MeshError("stream closed")
        if len(data) > max_bytes:
            raise DropError("too_large", f"frame of {len(data)} bytes")
        return data

    async def async_write_frame(self, data: bytes) -> None:
        if self._closed:
            raise MeshError("stream closed")
        self._outbox.put_nowait(data)

    async def async_close(self) -> None:
        if not self._closed:
            self._closed = True
            self._outbox.put_nowait(None)


Tap = Callable[[Addr, Addr, bytes], None]


class InMemoryNetwork:
    """A seeded lossy, delaying, partitionable network carrying the real encrypted bytes."""

    def __init__(
        self,
        *,
        seed: int = 0,
        loss: float = 0.0,
        delay_s: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.delay_s = delay_s
        self._nodes: dict[Addr, InMemoryTransport] = {}
        self._groups: list[tuple[frozenset[Addr], frozenset[Addr]]] = []
        self._pending: set[asyncio.TimerHandle] = set()
        self.tap: Tap | None = None
        self.sent = 0
        self.delivered = 0
        self.lost = 0
        self.blocked = 0

    def transport(self, host: str, port: int = 8643) -> InMemoryTransport:
        """Create a transport at (host, port) on this network."""
        return InMemoryTransport(self, (host, port))

    def partition(self, a: Iterable[Addr], b: Iterable[Addr]) -> None:
        """Cut all traffic between the two address sets (both directions)."""
        self._groups.append((frozenset(a), frozenset(b)))

    def heal(self) -> None:
        """Remove every partition."""
        self._groups.clear()

    def reachable(self, src: Addr, dst: Addr) -> bool:
        """Return whether src can currently reach dst."""
        for a, b in self._groups:
            if (src in a and dst in b) or (src in b and dst in a):
                return False
        return dst in self._nodes

    def _register(self, t: InMemoryTransport) -> None:
        if t.local_addr in self._nodes:
            raise MeshError(f"address {t.local_addr} in use")
        self._nodes[t.local_addr] = t

    def _unregister(self, t: InMemoryTransport) -> None:
        if self._nodes.get(t.local_addr) is t:
            del self._nodes[t.local_addr]

    def send(self, src: Addr, dst: Addr, data: bytes) -> None:
        """Send a packet subject to partitions, loss and delay."""
        self.sent += 1
        if self.tap is not None:
            self.tap(src, dst, data)
        if not self.reachable(src, dst):
            self.blocked += 1
            return
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return
        lo, hi = self.delay_s
        delay = self.rng.uniform(lo, hi) if hi > 0 else 0.0
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def deliver() -> None:
            if handle is not None:
                self._pending.discard(handle)
            self.inject(src, dst, data)

        handle = loop.call_later(delay, deliver)
        self._pending.add(handle)

    def inject(self, src: Addr, dst: Addr, data: bytes) -> None:
        """Deliver a packet now, bypassing loss and delay (tests use it to replay)."""
        node = self._nodes.get(dst)
        if node is None or not self.reachable(src, dst):
            return
        self.delivered += 1
        node._deliver(data, src)

    async def async_open_stream(self, src: Addr, dst: Addr) -> Stream:
        if not self.reachable(src, dst):
            raise MeshError(f"cannot connect to {dst[0]}:{dst[1]}")
        server = self._nodes[dst]
        a_to_b: asyncio.Queue[bytes | None] = asyncio.Queue()
        b_to_a: asyncio.Queue[bytes | None] = asyncio.Queue()
        client = _MemStream(dst, inbox=b_to_a, outbox=a_to_b)
        server_side = _MemStream(src, inbox=a_to_b, outbox=b_to_a)
        server._accept(server_side)
        return client

    def close(self) -> None:
        """Cancel every packet still in flight."""
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()


class InMemoryTransport:
    """One node's endpoint on an InMemoryNetwork."""

    def __init__(self, network: InMemoryNetwork, addr: Addr) -> None:
        self._network = network
        self._addr = addr
        self._on_packet: PacketHandler | None = None
        self._on_stream: StreamHandler | None = None
        self._streams = TaskSupervisor()  # one-shot tasks serving inbound streams, at most MAX_CONCURRENT_STREAMS
        self._running = False

    @property
    def local_addr(self) -> Addr:
        return self._addr

    def set_handlers(self, on_packet: PacketHandler, on_stream: StreamHandler) -> None:
        self._on_packet = on_packet
        self._on_stream = on_stream

    async def async_start(self) -> None:
        self._network._register(self)
        self._running = True

    async def async_stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self._network._unregister(self)
        await self._streams.async_stop()

    def send_packet(self, addr: Addr, data: bytes) -> None:
        if self._running:
            self._network.send(self._addr, addr, data)

    def _deliver(self, data: bytes, src: Addr) -> None:
        if self._running and self._on_packet is not None:
            if len(data) > const.MAX_UDP_PACKET_BYTES:  # what a real socket would truncate
                return
            self._on_packet(data, src)

    def _accept(self, stream: _MemStream) -> None:
        handler = self._on_stream
        if not self._running or handler is None or self._streams.count() >= const.MAX_CONCURRENT_STREAMS:
            stream._closed = True
            stream._outbox.put_nowait(None)
            return

        async def serve() -> None:
            try:
                await handler(stream)
            finally:
                await stream.async_close()

        self._streams.spawn_once("mesh-mem-stream", serve())

    async def async_open_stream(self, addr: Addr) -> Stream:
        if not self._running:
            raise MeshError("transport stopped")
        return await self._network.async_open_stream(self._addr, addr)
