"""A UDP endpoint that drains its socket in batches, so a flood costs one wake-up per batch.

asyncio's datagram transport hands its protocol one datagram per callback, so the
protocol can never see that newer input is already waiting, and a backlog is worked
through one stale message at a time. Here the socket is non-blocking and watched with
`loop.add_reader`: each wake-up reads until the kernel has nothing more (at most
`max_batch` datagrams, so timers still run during a flood) and hands over the whole
batch, letting the protocol skip what newer input supersedes.

Memory stays bounded: the kernel receive buffer (a fixed number of bytes; when it is
full the kernel drops arrivals and counts them, see `kernel_drops`) plus one batch.
Sending goes straight to the socket and never queues: a datagram the kernel cannot
take right now raises BlockingIOError for the caller to count, as UDP may lose it
anyway.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from typing import Any, Protocol

MAX_DATAGRAM = 65536  # the largest UDP payload (65,507 bytes over IPv4) fits whole
MAX_BATCH = 256  # datagrams per wake-up: ~2 ms of parsing, after which due timers get their turn
RECEIVE_BUFFER = 1 << 20  # requested SO_RCVBUF; Linux doubles it: ~2,500 small datagrams, a ~20 ms drain

Address = tuple[Any, ...]

# Linux: getsockopt(SO_MEMINFO) returns u32 counters; SK_MEMINFO_DROPS is the ninth.
_SO_MEMINFO = 55
_MEMINFO = struct.Struct("=9I")


class BatchProtocol(Protocol):
    """What the transport calls; mirrors `asyncio.DatagramProtocol` with a batch in place of one datagram."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def datagrams_received(self, batch: list[tuple[bytes, Address]]) -> None: ...

    def error_received(self, exc: Exception) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


class BatchDatagramTransport(asyncio.DatagramTransport):
    """Reads a bound non-blocking UDP socket in batches; `close()` stops reading and closes it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: BatchProtocol,
        *,
        max_batch: int = MAX_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        sock.setblocking(False)
        super().__init__({"socket": sock, "sockname": sock.getsockname()})
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._max_batch = max_batch
        self._closing = False
        loop.add_reader(sock.fileno(), self._read_ready)  # NotImplementedError on Windows' proactor loop
        protocol.connection_made(self)

    def _read_ready(self) -> None:
        recv = self._sock.recvfrom
        batch: list[tuple[bytes, Address]] = []
        try:
            for _ in range(self._max_batch):
                batch.append(recv(MAX_DATAGRAM))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # e.g. an ICMP error reported on a later read (not on Linux)
            self._protocol.error_received(exc)
        if batch:
            self._protocol.datagrams_received(batch)

    def sendto(self, data: bytes | bytearray | memoryview, addr: Address | None = None) -> None:
        """Send now or raise OSError (BlockingIOError when the send buffer is full); never queues."""
        if addr is None:
            raise ValueError("this transport is unconnected: give an address")
        self._sock.sendto(data, addr)

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped because the receive buffer was full (Linux; None elsewhere)."""
        if not sys.platform.startswith("linux") or self._closing:
            return None
        try:
            raw = self._sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size)
        except OSError:
            return None
        return _MEMINFO.unpack(raw)[8] if len(raw) == _MEMINFO.size else None

    def receive_buffer(self) -> int:
        """The receive buffer the kernel granted, in bytes (Linux reports twice the request)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_protocol(self) -> BatchProtocol:  # type: ignore[override]
        return self._protocol


async def bind_udp(
    loop: asyncio.AbstractEventLoop, host: str, port: int, *, receive_buffer: int = RECEIVE_BUFFER
) -> socket.socket:
    """A non-blocking UDP socket bound to the first address `host` resolves to that binds; OSError if none."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    error: OSError = OSError(f"{host} has no address")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            except OSError:
                pass  # keep the OS default rather than refuse to start
            sock.bind(sockaddr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error
