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

Closed ports: a subscriber that goes away without a word (a killed monitor, a closed
patch) leaves only ICMP "port unreachable" replies, which Linux drops on an unconnected
socket unless `IP_RECVERR` (`IPV6_RECVERR`) is on. With it on, the transport reads
them off the socket's error queue and hands each closed (host, port) to the protocol's
optional `unreachable`, so the server stops working for a port nobody listens on. But
any ICMP error, port unreachable or not, then also fails the socket's next read and its
next send, wherever that goes: a read drains the queue and reads on, and `sendto`
drains it and sends again, once, so a datagram waiting behind a report is not held
back and a live destination never loses one to a dead one. The queue is drained only
when an error is pending (a read or send fails, or a wake-up finds no datagram), as a
dead `--send` destination makes a report per send, and promptly, as reports count
against the receive buffer. Elsewhere ICMP errors come from reads, to `error_received`,
as before.
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
Endpoint = tuple[str, int]  # as `server.osc.output` keys destinations
Datagram = tuple[bytes, Address, float]  # payload, sender, arrival time on the loop's clock

# Linux: getsockopt(SO_MEMINFO) returns u32 counters; SK_MEMINFO_DROPS is the ninth.
_SO_MEMINFO = 55
_MEMINFO = struct.Struct("=9I")
# Linux: SO_TIMESTAMPNS (the "old" layout: a native struct timespec of two longs, wall clock);
# Python 3.11 does not name it. The control message type equals the option.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@ll")
_STAMP_BUFFER = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0
# Linux: IP_RECVERR / IPV6_RECVERR (unnamed in Python 3.11) queue ICMP errors about what the socket
# sent; recvmsg(MSG_ERRQUEUE) returns one with the original destination as its address and a
# struct sock_extended_err (errno, origin, type, code, pad, info, data; the offender follows)
# under the same level and type. A dual-stack IPv6 socket needs IP_RECVERR too for IPv4 peers.
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_ERROR_KINDS = frozenset({(socket.IPPROTO_IP, _IP_RECVERR), (socket.IPPROTO_IPV6, _IPV6_RECVERR)})
_EXTENDED_ERR = struct.Struct("=IBBBBII")
# (ee_origin, ee_type, ee_code) of "port unreachable": SO_EE_ORIGIN_ICMP with type 3 code 3,
# SO_EE_ORIGIN_ICMP6 with type 1 code 4 (the kernel reports both as ECONNREFUSED)
_PORT_UNREACHABLE = frozenset({(2, 3, 3), (3, 1, 4)})
_ERROR_BUFFER = 256  # the error, its offender's address and a receive stamp (SO_TIMESTAMPNS applies here too)
_MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0)


class BatchProtocol(Protocol):
    """What the transport calls; mirrors `asyncio.DatagramProtocol` with a batch in place of one datagram."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def datagrams_received(self, batch: Sequence[Datagram]) -> None: ...

    def error_received(self, exc: Exception) -> None: ...

    # Optional: `unreachable(endpoint)`, called with each (host, port) that reported its port closed.

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
        self._errors = _enable_error_queue(sock)
        self._unreported: dict[Endpoint, None] = {}  # closed endpoints found while sending, reported soon
        loop.add_reader(sock.fileno(), self._read_ready)  # NotImplementedError on Windows' proactor loop
        protocol.connection_made(self)

    @property
    def stamped(self) -> bool:
        """True if arrival times come from the kernel's receive stamps (Linux), not from read times."""
        return self._stamped

    @property
    def reports_unreachable(self) -> bool:
        """True if ICMP "port unreachable" reports reach the protocol's `unreachable` (Linux)."""
        return self._errors

    def _read_ready(self) -> None:
        now = self._loop.time()
        batch: list[Datagram] = []
        closed: list[Endpoint] = []
        failed = 0
        try:
            failed = self._read(batch, now, closed)
        except OSError as exc:  # e.g. an ICMP error reported on a later read (where the error queue is off)
            self._protocol.error_received(exc)
        if self._errors and not batch and not failed:
            self._drain_errors(closed)  # woken for a report alone (its pending error already taken)
        if closed or self._unreported:
            self._report(closed)  # before the batch: a /subscribe in it is newer than the reports
        if batch:
            self._protocol.datagrams_received(batch)

    def _read(self, batch: list[Datagram], now: float, closed: list[Endpoint]) -> int:
        """Read up to `max_batch` datagrams into `batch`, each with its arrival time on the loop's clock.

        With kernel stamps, a stamp later than `now`, or older than MAX_STAMP_AGE, is
        replaced by `now`; without, every datagram arrived `now`. A read failed by a
        pending ICMP report drains the error queue (closed endpoints into `closed`) and
        reading goes on; it takes one datagram's place in the batch. Returns how many
        reads failed so; any other error raises.
        """
        stamped = self._stamped
        offset = now - time.time()  # loop time minus wall time, for the kernel's wall-clock stamps
        oldest = now - MAX_STAMP_AGE
        recvmsg, recvfrom = self._sock.recvmsg, self._sock.recvfrom
        failed = 0
        for _ in range(self._max_batch):
            try:
                if stamped:
                    data, ancdata, _flags, addr = recvmsg(MAX_DATAGRAM, _STAMP_BUFFER)
                else:
                    data, addr = recvfrom(MAX_DATAGRAM)
                    ancdata = []
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # an ICMP report pending: it fails this read, not the datagrams behind it
                if not self._errors or not self._drain_errors(closed):
                    raise
                failed += 1
                continue
            at = now
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(cdata) >= _TIMESPEC.size:
                    seconds, nanoseconds = _TIMESPEC.unpack_from(cdata)
                    stamp = seconds + nanoseconds * 1e-9 + offset
                    if oldest <= stamp < now:
                        at = stamp
            batch.append((data, addr, at))
        return failed

    def _drain_errors(self, closed: list[Endpoint]) -> int:
        """Read the error queue (at most `max_batch` reports), adding each port reported closed to `closed`.

        Returns how many reports there were. One left over keeps the socket readable and
        an error pending, so the next wake-up reads on.
        """
        recvmsg = self._sock.recvmsg
        count = 0
        for _ in range(self._max_batch):
            try:
                _data, ancdata, _flags, addr = recvmsg(0, _ERROR_BUFFER, _MSG_ERRQUEUE)
            except OSError:  # BlockingIOError: the queue is empty
                break
            count += 1
            endpoint = port_unreachable(ancdata, addr)
            if endpoint is not None and endpoint not in closed:
                closed.append(endpoint)
        return count

    def _report(self, closed: list[Endpoint]) -> None:
        """Hand each closed endpoint (and any found while sending) to the protocol's `unreachable`, once."""
        endpoints = dict(self._unreported)
        self._unreported.clear()
        endpoints.update(dict.fromkeys(closed))
        unreachable = getattr(self._protocol, "unreachable", None)
        if unreachable is None or self._closing:
            return
        for endpoint in endpoints:
            try:
                unreachable(endpoint)
            except Exception as exc:  # a report must not cost the batch behind it
                self._loop.call_exception_handler(
                    {"message": "unreachable() failed", "exception": exc, "protocol": self._protocol}
                )

    def _report_unreported(self) -> None:
        if self._unreported:
            self._report([])

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
        """Send now or raise OSError (BlockingIOError when the send buffer is full); never queues.

        With the error queue on, a send can fail with an ICMP report about an earlier
        one (Linux fails the next send with it, wherever it goes): if reports were
        queued, they are read, the closed ports among them reported at the loop's next
        turn (the caller may be going through a list of them), and the datagram is sent
        again, once.
        """
        if addr is None:
            raise ValueError("this transport is unconnected: give an address")
        try:
            self._sock.sendto(data, addr)
        except BlockingIOError:
            raise
        except OSError:
            closed: list[Endpoint] = []
            if not self._errors or not self._drain_errors(closed):
                raise  # this send's own failure
            if closed:
                if not self._unreported:
                    self._loop.call_soon(self._report_unreported)
                self._unreported.update(dict.fromkeys(closed))
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


def _enable_error_queue(sock: socket.socket) -> bool:
    """Ask the kernel to queue ICMP errors about what `sock` sends (Linux); False where that is not available."""
    if not sys.platform.startswith("linux") or not _MSG_ERRQUEUE or not hasattr(sock, "recvmsg"):
        return False
    if sock.family == socket.AF_INET:
        options = [(socket.IPPROTO_IP, _IP_RECVERR)]
    elif sock.family == socket.AF_INET6:  # IPv4 peers of a dual-stack socket report through IP_RECVERR
        options = [(socket.IPPROTO_IPV6, _IPV6_RECVERR), (socket.IPPROTO_IP, _IP_RECVERR)]
    else:
        return False
    enabled = False
    for level, option in options:
        try:
            sock.setsockopt(level, option, 1)
        except OSError:
            continue
        enabled = True
    return enabled


def port_unreachable(ancdata: Sequence[tuple[int, int, bytes]], addr: Address | None) -> Endpoint | None:
    """The (host, port) an error-queue message reports closed (ICMP or ICMPv6 port unreachable), else None.

    `ancdata` and `addr` are what `recvmsg(..., MSG_ERRQUEUE)` returned; `addr` is the
    destination of the datagram that was refused, keyed as senders are: (host, port),
    an IPv4 peer of a dual-stack socket as `::ffff:a.b.c.d`.
    """
    if not addr:
        return None
    for level, kind, cdata in ancdata:
        if (level, kind) in _ERROR_KINDS and len(cdata) >= _EXTENDED_ERR.size:
            _errno, origin, icmp_type, icmp_code = _EXTENDED_ERR.unpack_from(cdata)[:4]
            if (origin, icmp_type, icmp_code) in _PORT_UNREACHABLE:
                return (str(addr[0]), int(addr[1]))
    return None


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
