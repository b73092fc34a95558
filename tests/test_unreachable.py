"""Subscribers that go away: their closed port drops their streams, and costs no live destination a datagram.

Linux reports ICMP "port unreachable" on an unconnected UDP socket only with
`IP_RECVERR` on (`server.osc.udp`), and then also fails the socket's next send, to
anywhere, with the pending error: these tests pin both halves, through real sockets on
loopback.
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import struct
import sys
import time

import pytest

from server.osc.udp import BatchDatagramTransport, port_unreachable
from tests.live import OscPeer, start_server

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the error queue is Linux's")

_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err, without the offender's address


def closed_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def play(performer: OscPeer, count: int, spacing: float = 0.025, start_at: float = 0.0) -> None:
    """`count` gestures `spacing` apart (at most 20, inside the streams' burst of 30, so none is skipped)."""
    start = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, start + i * spacing - time.monotonic()))
        performer.send("/gesture", (start_at + 0.37 * i) % 1.0, 0.5)


def subscribe(server_port: int, *streams: str) -> OscPeer:
    peer = OscPeer()
    peer.target = ("127.0.0.1", server_port)
    for stream in streams:
        peer.send("/subscribe", stream)
    peer.status()  # in order after the /subscribe messages: they are applied
    return peer


def dropped_within(performer: OscPeer, expected: int, seconds: float = 10.0) -> float | None:
    """Play on until /status counts `expected` dropped subscriptions; how long that took, or None."""
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        performer.send("/gesture", (0.1 + 0.23 * i) % 1.0, 0.4)
        i += 1
        performer.drain(0.02)
        if performer.status()["osc_subscribers_dropped"] >= expected:
            return time.monotonic() - start
    return None


# --------------------------------------------------------------------------- the server, end to end


@linux_only
def test_a_subscriber_that_closes_is_dropped_and_the_engine_stops_computing_for_it(tmp_path):
    performer = OscPeer()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{performer.port}", "--timescale", "0.01", "--seed", "2")
    performer.target = ("127.0.0.1", srv.port)
    first = second = None
    try:
        first = subscribe(srv.port, "mixture", "surprise")
        second = subscribe(srv.port, "mixture", "surprise")
        play(performer, 5)
        for peer in (first, second):
            got = peer.receive(10.0, count=10)
            assert {address for _, address, _ in got} == {"/mixture", "/surprise"}, got

        first.close()  # killed without a word
        assert dropped_within(performer, 2) is not None, "the closed subscriber was not dropped"
        status = performer.status()
        assert status["osc_subscribers_dropped"] == 2 and status["osc_send_errors"] == 0
        second.drain(0.2)
        play(performer, 5, start_at=0.1)
        got = [address for _, address, _ in second.receive(10.0, count=10)]  # the other one is served as before
        assert got.count("/mixture") >= 3 and got.count("/surprise") >= 3, got  # (a stalled loop may skip one)

        second.close()
        assert dropped_within(performer, 4) is not None
        performer.drain(0.2)
        before = performer.status()
        play(performer, 20, start_at=0.2)
        assert len(performer.receive(10.0, "/prediction", count=20)) == 20
        after = performer.status()
        # Sent meanwhile: the 20 answers and the reply to the first /status, nothing for the dead ports.
        assert after["osc_sent"] - before["osc_sent"] == 20 + 1
        assert after["outputs"] - before["outputs"] == 20
        assert after["osc_subscribers_dropped"] == 4 and after["osc_destinations"] == 1
    finally:
        for peer in (first, second):
            if peer is not None:
                peer.close()
        assert srv.stop() == 0
        performer.close()


@linux_only
def test_a_live_destination_misses_no_prediction_beside_dead_ones(tmp_path):
    performer = OscPeer()
    listener = OscPeer()  # a second live destination, after the dead one in the list
    # The dead --send destination comes first: each answer is sent there just before the live ones.
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{closed_port()}", "--send", f"127.0.0.1:{performer.port}",
                       "--timescale", "1e-6", "--mode", "accompany")
    performer.target = listener.target = ("127.0.0.1", srv.port)
    try:
        listener.send("/hello")
        listener.status()
        dead = subscribe(srv.port, "mixture", "surprise", "prediction")
        dead.close()
        count = 50
        for i in range(count):  # paced like a performer, under max_rate (a burst would be coalesced)
            performer.send("/gesture", i / count, 0.5)
            time.sleep(0.008)  # after each send, not an absolute schedule: a delayed sender never catches up in a burst
        assert len(performer.receive(10.0, "/prediction", count=count)) == count
        assert len(listener.receive(10.0, "/prediction", count=count)) == count
        status = performer.status()
        assert status["outputs"] == count and status["osc_send_errors"] == 0
        assert status["osc_subscribers_dropped"] == 3  # the dead subscriber; the dead --send stays
        assert status["osc_destinations"] == 3
    finally:
        assert srv.stop() == 0
        performer.close()
        listener.close()


# --------------------------------------------------------------------------- the transport, in process


def test_port_unreachable_reads_the_extended_error() -> None:
    refused = _ERR.pack(errno.ECONNREFUSED, 2, 3, 3, 0, 0, 0) + bytes(16)  # ICMP, dest unreachable, port
    refused6 = _ERR.pack(errno.ECONNREFUSED, 3, 1, 4, 0, 0, 0) + bytes(28)  # ICMPv6, dest unreachable, port
    stamp = (socket.SOL_SOCKET, 35, bytes(16))
    assert port_unreachable([stamp, (socket.IPPROTO_IP, 11, refused)], ("127.0.0.1", 5711)) == ("127.0.0.1", 5711)
    assert port_unreachable([(socket.IPPROTO_IPV6, 25, refused)], ("::ffff:127.0.0.1", 9, 0, 0)) == (
        "::ffff:127.0.0.1", 9)
    assert port_unreachable([(socket.IPPROTO_IPV6, 25, refused6)], ("::1", 7, 0, 0)) == ("::1", 7)
    host_unreachable = _ERR.pack(errno.EHOSTUNREACH, 2, 3, 1, 0, 0, 0)
    local = _ERR.pack(errno.ECONNREFUSED, 1, 0, 0, 0, 0, 0)  # SO_EE_ORIGIN_LOCAL: no port said anything
    too_big = _ERR.pack(errno.EMSGSIZE, 2, 3, 4, 0, 1400, 0)
    for data in (host_unreachable, local, too_big, refused[:8]):
        assert port_unreachable([(socket.IPPROTO_IP, 11, data)], ("127.0.0.1", 5711)) is None
    assert port_unreachable([stamp], ("127.0.0.1", 5711)) is None
    assert port_unreachable([(socket.IPPROTO_IP, 11, refused)], None) is None
    assert port_unreachable([(socket.SOL_SOCKET, 11, refused)], ("127.0.0.1", 5711)) is None


def test_drop_leaves_every_stream_and_says_which_went_quiet() -> None:
    from server.osc.output import OscOutput
    from server.osc.streams import Subscriptions

    streams = Subscriptions(OscOutput(), ("prediction", "mixture", "surprise", "status"))
    changes: list[tuple[str, bool]] = []
    streams.on_change = lambda stream, active: changes.append((stream, active))
    gone, stays = ("127.0.0.1", 9001), ("127.0.0.1", 9002)
    for stream in ("mixture", "surprise", "status"):
        streams.add(stream, gone)
    streams.add("surprise", stays)
    changes.clear()
    assert streams.drop(gone) == ["mixture", "surprise", "status"]
    assert changes == [("mixture", False), ("status", False)]  # surprise still has a listener
    assert streams.subscribers("surprise") == (stays,)
    assert streams.drop(gone) == [] and changes == [("mixture", False), ("status", False)]


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.senders: list[tuple] = []
        self.closed: list[tuple[str, int]] = []
        self.errors: list[Exception] = []
        self.sending = False  # set by a test around its sends: no report may come from inside one

    def connection_made(self, transport) -> None:
        pass

    def datagrams_received(self, batch) -> None:
        self.batches.append([data for data, _, _ in batch])
        self.senders.extend(addr for _, addr, _ in batch)

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    def unreachable(self, endpoint: tuple[str, int]) -> None:
        # The sender may be going through a list of subscribers that this report changes.
        assert not self.sending, "reported from inside sendto"
        self.closed.append(endpoint)

    def connection_lost(self, exc) -> None:
        pass


def run(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


def run_until(loop: asyncio.AbstractEventLoop, condition, seconds: float = 5.0) -> None:
    """Run the loop until ``condition()`` holds (or fail after ``seconds``), then a few more turns: a
    report that came twice would show."""

    async def wait() -> None:
        end = loop.time() + seconds
        while not condition():
            assert loop.time() < end, "timed out"
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)

    loop.run_until_complete(wait())


def await_error(sock: socket.socket, seconds: float = 5.0) -> None:
    """Wait until an ICMP error is pending on ``sock`` (POLLERR; nothing is read): the reply is back."""
    poller = select.poll()
    poller.register(sock, select.POLLERR)
    assert poller.poll(seconds * 1000), "no ICMP error arrived"


@linux_only
@pytest.mark.parametrize("stamped", [True, False])
def test_the_transport_reports_closed_ports_and_loses_no_datagram(stamped: bool) -> None:
    loop = asyncio.new_event_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    protocol = Recorder()
    transport = BatchDatagramTransport(loop, sock, protocol)
    transport._stamped = stamped  # both read paths meet the pending error
    live = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    live.bind(("127.0.0.1", 0))
    live.settimeout(1.0)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead = ("127.0.0.1", closed_port())
    try:
        assert transport.reports_unreachable
        # Sending: the error pending from the dead port would fail the live send; it is sent all the same.
        for i in range(3):
            protocol.sending = True
            transport.sendto(b"to the dead", dead)
            await_error(sock)  # an ICMP reply is back (the first; the error queue is read at the loop's next turn)
            time.sleep(0.01)  # and, after the first round, room for this round's
            transport.sendto(b"live %d" % i, live.getsockname())
            protocol.sending = False
            assert live.recv(100) == b"live %d" % i
        run_until(loop, lambda: protocol.closed)
        assert protocol.closed == [dead] and protocol.errors == []  # at the loop's next turn, once

        # Reading: the error pending fails the first read; one wake-up still reads every datagram behind it.
        protocol.closed.clear()
        transport.pause_reading()
        for i in range(2):
            client.sendto(b"in %d" % i, sock.getsockname())
        transport.sendto(b"to the dead", dead)
        for i in range(2, 5):
            client.sendto(b"in %d" % i, sock.getsockname())
        await_error(sock)
        time.sleep(0.05)  # loopback delivers at once; this is only room for a slow softirq
        transport._read_ready()  # one wake-up
        assert protocol.batches == [[b"in %d" % i for i in range(5)]]
        assert protocol.closed == [dead] and protocol.errors == []
        transport.resume_reading()

        # A report whose pending flag was taken elsewhere (here by SO_ERROR) wakes the reader, which
        # finds no datagram: the queue is read all the same, and the socket is quiet again (no busy loop).
        protocol.closed.clear()
        transport.sendto(b"to the dead", dead)
        await_error(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
        run_until(loop, lambda: protocol.closed)
        assert protocol.closed == [dead] and protocol.batches == [[b"in %d" % i for i in range(5)]]
        calls = 0
        read_ready = transport._read_ready

        def counted() -> None:
            nonlocal calls
            calls += 1
            read_ready()

        loop.remove_reader(sock.fileno())
        loop.add_reader(sock.fileno(), counted)
        run(loop, 0.05)
        assert calls == 0
    finally:
        transport.close()
        run(loop, 0)
        loop.close()
        live.close()
        client.close()


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def forge_unreachable(raw: socket.socket, source_port: int, destination: tuple[str, int], code: int) -> None:
    """An ICMP "destination unreachable" (`code`) about a datagram from 127.0.0.1:`source_port` to `destination`,

    as a router on the way would send it: it lands on that socket's error queue."""
    inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 32, 0, 0, 64, socket.IPPROTO_UDP, 0,
                        socket.inet_aton("127.0.0.1"), socket.inet_aton(destination[0]))
    inner += struct.pack("!HHHH", source_port, destination[1], 12, 0) + b"osc?"
    raw.sendto(struct.pack("!BBHI", 3, code, _checksum(struct.pack("!BBHI", 3, code, 0, 0) + inner), 0) + inner,
               ("127.0.0.1", 0))


@linux_only
def test_any_icmp_error_pending_costs_no_datagram_and_only_a_closed_port_is_reported() -> None:
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except PermissionError:
        pytest.skip("forging ICMP needs CAP_NET_RAW")
    loop = asyncio.new_event_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    protocol = Recorder()
    transport = BatchDatagramTransport(loop, sock, protocol)
    port = sock.getsockname()[1]
    live = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    live.bind(("127.0.0.1", 0))
    live.settimeout(1.0)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    far = ("192.0.2.7", 4000)  # TEST-NET-1: never reached, only named
    try:
        # "Host unreachable" about an earlier send fails the next one, to a live destination: sent anyway.
        forge_unreachable(raw, port, far, 1)
        await_error(sock)
        protocol.sending = True
        transport.sendto(b"live", live.getsockname())
        protocol.sending = False
        assert live.recv(100) == b"live"

        # ... and the next read: every datagram is still read in the one wake-up.
        transport.pause_reading()
        forge_unreachable(raw, port, far, 1)
        for i in range(3):
            client.sendto(b"in %d" % i, sock.getsockname())
        await_error(sock)
        time.sleep(0.05)  # loopback delivers at once; this is only room for a slow softirq
        transport._read_ready()
        assert protocol.batches == [[b"in 0", b"in 1", b"in 2"]]
        transport.resume_reading()

        # Only "port unreachable" names a closed port: the datagram's destination, not the router.
        forge_unreachable(raw, port, far, 3)
        run_until(loop, lambda: protocol.closed)
        assert protocol.closed == [far] and protocol.errors == []
    finally:
        transport.close()
        run(loop, 0)
        loop.close()
        raw.close()
        live.close()
        client.close()


@linux_only
def test_a_dual_stack_socket_reports_an_ipv4_peer_as_it_keys_senders() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    loop = asyncio.new_event_loop()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
    except OSError:
        sock.close()
        pytest.skip("no dual-stack IPv6 socket here")
    protocol = Recorder()
    transport = BatchDatagramTransport(loop, sock, protocol)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    try:
        client.sendto(b"hello", ("127.0.0.1", sock.getsockname()[1]))
        run_until(loop, lambda: protocol.batches)
        assert protocol.batches == [[b"hello"]]
        addr = protocol.senders[0]
        sender = (addr[0], addr[1])  # how the protocol keys this sender, and so its subscriptions
        assert sender == ("::ffff:127.0.0.1", client.getsockname()[1])
        client.close()
        transport.sendto(b"anyone?", sender)
        run_until(loop, lambda: protocol.closed)
        assert protocol.closed == [sender]
    finally:
        transport.close()
        run(loop, 0)
        loop.close()
        client.close()
