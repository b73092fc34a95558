"""A UDP endpoint that drains its socket in batches, so a flood costs one wake-up per batch.

asyncio's datagram transport hands its protocol one datagram per callback, so the
protocol can never see that newer input is already waiting, and a backlog is worked
through one stale message at a time. Here the socket is non-blocking and watched with
`loop.add_reader`: each wake-up reads until the kernel has nothing more (at most
`max_batch` datagrams, so timers still run during a flood) and hands over the whole
batch, letting the protocol skip what newer input supersedes. The protocol may
`pause_reading` while it works through a batch in slices (see `server.osc.protocol`),
so the kernel buffer stays the only queue.

Each datagram carries its arrival time on the loop's clock. On Linux the kernel stamps
every datagram as it arrives (`SO_TIMESTAMPNS`, wall clock); the stamp is converted to
the loop's monotonic clock with one wall-minus-loop offset read per batch, so a stalled
loop still hands on the true spacing of what queued meanwhile. Elsewhere, when a
datagram comes without a stamp, or when the stamp is implausible (later than the read,
or older than `MAX_STAMP_AGE`, as after a wall-clock step), its arrival time is when
it was read.

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
import time
from collections.abc import Sequence
from typing import Any, Protocol

MAX_DATAGRAM = 65536  # the largest UDP payload (65,507 bytes over IPv4) fits whole
MAX_BATCH = 256  # datagrams per wake-up: ~2 ms of parsing, after which due timers get their turn
RECEIVE_BUFFER = 1 << 20  # requested SO_RCVBUF; Linux doubles it: ~2,500 small datagrams, a ~20 ms drain
MAX_STAMP_AGE = 10.0  # seconds; an older kernel stamp means the wall clock was stepped: use the read time

Address = tuple[Any, ...]
Datagram = tuple[bytes, Address, float]  # payload, sender, arrival time on the loop's clock

# Linux: getsockopt(SO_MEMINFO) returns u32 counters; SK_MEMINFO_DROPS is the ninth.
_SO_MEMINFO = 55
_MEMINFO = struct.Struct("=9I")
# Linux: SO_TIMESTAMPNS (the "old" layout: a native struct timespec of two longs, wall clock);
# Python 3.11 does not name it. The control message type equals the option.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@ll")
_STAMP_BUFFER = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0


class BatchProtocol(Protocol):
    """What the transport calls; mirrors `asyncio.DatagramProtocol` with a batch in place of one datagram."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def datagrams_received(self, batch: Sequence[Datagram]) -> None: ...

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
        self._reading = True
        self._stamped = _enable_timestamps(sock)
        loop.add_reader(sock.fileno(), self._read_ready)  # NotImplementedError on Windows' proactor loop
        protocol.connection_made(self)

    @property
    def stamped(self) -> bool:
        """True if arrival times come from the kernel's receive stamps (Linux), not from read times."""
        return self._stamped

    def _read_ready(self) -> None:
        now = self._loop.time()
        batch: list[Datagram] = []
        try:
            if self._stamped:
                self._read_stamped(batch, now, now - time.time())
            else:
                recv = self._sock.recvfrom
                for _ in range(self._max_batch):
                    data, addr = recv(MAX_DATAGRAM)
                    batch.append((data, addr, now))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # e.g. an ICMP error reported on a later read (not on Linux)
            self._protocol.error_received(exc)
        if batch:
            self._protocol.datagrams_received(batch)

    def _read_stamped(self, batch: list[Datagram], now: float, offset: float) -> None:
        """Read up to `max_batch` datagrams into `batch`, each with its kernel stamp on the loop's clock.

        `offset` is loop time minus wall time; a stamp later than `now`, or older than
        MAX_STAMP_AGE, is replaced by `now`.
        """
        recvmsg = self._sock.recvmsg
        oldest = now - MAX_STAMP_AGE
        for _ in range(self._max_batch):
            data, ancdata, _flags, addr = recvmsg(MAX_DATAGRAM, _STAMP_BUFFER)
            at = now
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(cdata) >= _TIMESPEC.size:
                    seconds, nanoseconds = _TIMESPEC.unpack_from(cdata)
                    stamp = seconds + nanoseconds * 1e-9 + offset
                    if oldest <= stamp < now:
                        at = stamp
            batch.append((data, addr, at))

    def pause_reading(self) -> None:
        """Stop watching the socket (arrivals wait in the kernel buffer) until `resume_reading`."""
        if self._reading and not self._closing:
            self._reading = False
            self._loop.remove_reader(self._sock.fileno())

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._sock.fileno(), self._read_ready)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

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
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_protocol(self) -> BatchProtocol:  # type: ignore[override]
        return self._protocol


def _enable_timestamps(sock: socket.socket) -> bool:
    """Ask the kernel to stamp each arriving datagram (Linux); False where that is not available."""
    if not sys.platform.startswith("linux") or not _STAMP_BUFFER or not hasattr(sock, "recvmsg"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


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
