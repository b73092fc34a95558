"""Destinations belong to their own port: no other socket can stop, take over or aim the server's output.

Over real loopback with two or three senders (a performer, another socket, a silent
port): a third party cannot stop a performer's `/hello` output or another client's
streams, nor route its own voice to a performer's port; a port that another socket
names is sent at most `AMPLIFICATION` times what that socket sent until it speaks
itself, and everything once it has; a crowd of subscribers cannot lock the monitor out;
a sender asks for at most `MAX_PER_SENDER` destinations; nobody can point the server at
its own port. Every probe is answered, the
performer's output is waited for (with deadlines) and the server is alive at the end.

The amplification table in the README ("Destinations: whose they are, and what a request
can cost") is measured here (`measure_amplification`; `python -m tests.test_destinations`
prints it afresh). The in-process tests at the end pin the ledger's arithmetic on a fake
engine, and that a few busy sockets cannot lock the `/hello` list or a stream.
"""

from __future__ import annotations

import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from pythonosc.osc_message import OscMessage

from tests.live import REPO, OscPeer, ServerProcess, decode_datagram, start_server

AMPLIFICATION = 4  # the README's: bytes a port that has not spoken may be sent per byte its namer sent
MAX_PER_SENDER = 8  # the README's: streams and /hello destinations one sender may ask for
STREAM_SUBSCRIBERS = 32  # the README's: subscribers one stream holds
WAIT = 10.0  # the most any test waits for what it expects (only a failing test waits this long)
ACCOMPANY = ("--mode", "accompany", "--timescale", "0.05", "--seed", "3")


class Peer(OscPeer):
    """An OscPeer that counts the bytes it sends (what pays for a port it names)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_bytes = 0

    def send_raw(self, data: bytes) -> None:
        self.sent_bytes += len(data)
        super().send_raw(data)

    def play(self, count: int, spacing: float = 0.05, voice: int | None = None) -> None:
        """`count` gestures along a line, `spacing` seconds apart, on an absolute schedule."""
        start = time.monotonic()
        for i in range(count):
            time.sleep(max(0.0, start + i * spacing - time.monotonic()))
            args = (0.2 + 0.6 * i / max(1, count - 1), 0.5) + (() if voice is None else (voice,))
            self.send("/gesture", *args)

    def errors(self, count: int = 1) -> list[list]:
        """Wait for `count` /error replies (deadline WAIT); their arguments."""
        got = self.receive(WAIT, "/error", count=count)
        assert len(got) >= count, f"expected {count} /error replies, got {got}"
        return [args for _, _, args in got]


class Listener:
    """A port that never sends: counts what reaches it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.got: list[tuple[str, int]] = []  # (address, datagram bytes), in arrival order

    def read(self, seconds: float, until: Callable[[list[tuple[str, int]]], bool] = lambda got: False) -> None:
        """Read for `seconds`, or until `until(self.got)` holds."""
        end = time.monotonic() + seconds
        while not until(self.got) and (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return
            self.got += [(msg.address, len(data)) for _, msg in decode_datagram(data)]

    def count(self, address: str) -> int:
        return sum(a == address for a, _ in self.got)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.got)

    def close(self) -> None:
        self.sock.close()


@contextmanager
def serving(tmp_path: Path, *flags: str) -> Iterator[tuple[ServerProcess, Callable[[], Peer], Callable[[], Listener]]]:
    """A real server whose `--send` goes to a port we hold (and never read); makers of peers and listeners."""
    dummy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dummy.bind(("127.0.0.1", 0))
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{dummy.getsockname()[1]}", *flags)
    made: list[Any] = [dummy]

    def peer() -> Peer:
        p = Peer()
        p.target = ("127.0.0.1", srv.port)
        made.append(p)
        return p

    def listener() -> Listener:
        made.append(Listener())
        return made[-1]

    try:
        yield srv, peer, listener
        alive = peer()
        assert srv.proc.poll() is None and alive.status()["mode"], "the server should still be serving"
    finally:
        code = srv.stop()
        for thing in made:
            thing.close()
    assert code == 0, "".join(srv.output)


# --------------------------------------------------------------------------- finding 2, probe by probe


@pytest.mark.parametrize("listens", ["own port", "another port"])
def test_another_socket_cannot_stop_a_performers_hello_output(tmp_path: Path, listens: str) -> None:
    """`/unsubscribe prediction <the performer's port>` from another socket is refused and the performer's answers
    go on, whether it hears on its own port (`/hello`) or, as Pd does, on another (`/hello PORT` from netsend's)."""
    with serving(tmp_path, *ACCOMPANY) as (srv, peer, listener):
        performer, intruder = peer(), peer()
        ear = performer if listens == "own port" else listener()
        performer.send("/hello", *(() if ear is performer else (ear.port,)))
        performer.send("/subscribe", "surprise", *(() if ear is performer else (ear.port,)))
        performer.status()  # both applied
        performer.play(10)
        if isinstance(ear, Listener):
            ear.read(WAIT, lambda got: sum(a == "/prediction" for a, _ in got) >= 9)
            assert ear.count("/prediction") >= 9, ear.got
        else:
            assert len(ear.receive(WAIT, "/prediction", count=9)) >= 9
        intruder.send("/unsubscribe", "prediction", ear.port)
        intruder.send("/unsubscribe", "surprise", ear.port)
        refused = intruder.errors(2)
        assert [args[0] for args in refused] == ["/unsubscribe", "/unsubscribe"], refused
        assert all("only that port itself" in args[1] for args in refused), refused
        performer.play(20)
        if isinstance(ear, Listener):
            before = len(ear.got)
            ear.read(WAIT, lambda got: sum(a == "/prediction" for a, _ in got[before:]) >= 18
                     and sum(a == "/surprise" for a, _ in got[before:]) >= 18)
            after = [a for a, _ in ear.got[before:]]
            assert after.count("/prediction") >= 18 and after.count("/surprise") >= 18, ear.got
            # a port that never spoke was sent no more than AMPLIFICATION x what the performer sent
            assert ear.bytes <= AMPLIFICATION * performer.sent_bytes, (ear.bytes, performer.sent_bytes)
        else:
            got = ear.receive(WAIT, count=38)
            assert sum(a == "/prediction" for _, a, _ in got) >= 18 and sum(a == "/surprise" for _, a, _ in got) >= 18


def test_another_socket_cannot_unsubscribe_a_clients_streams_or_take_them_over(tmp_path: Path) -> None:
    """A display's own subscriptions survive another socket's `/unsubscribe` and `/subscribe` naming its port."""
    with serving(tmp_path, *ACCOMPANY) as (srv, peer, listener):
        display, performer, intruder = peer(), peer(), peer()
        streams = ("surprise", "mixture", "performer")
        for stream in streams:
            display.send("/subscribe", stream)
        display.status()
        for stream in streams:
            intruder.send("/unsubscribe", stream, display.port)
        for stream in streams:
            intruder.send("/subscribe", stream, display.port)
        refused = intruder.errors(2 * len(streams))
        assert all(args[0] in ("/unsubscribe", "/subscribe") for args in refused), refused
        assert sum("asked for this itself" in args[1] for args in refused) == len(streams), refused
        performer.play(10)
        got = display.receive(WAIT, count=3 * 9)
        for address in ("/surprise", "/mixture", "/performer"):
            assert sum(a == address for _, a, _ in got) >= 9, (address, [a for _, a, _ in got])


def test_another_socket_cannot_route_its_voice_to_a_performers_port(tmp_path: Path) -> None:
    """With voices per sender, `/hello <performer's port>` from another socket is refused: its voice's answers come
    back to itself, never to the performer, who said `/hello` for its own."""
    with serving(tmp_path, *ACCOMPANY, "--voices", "per-sender") as (srv, peer, listener):
        performer, intruder = peer(), peer()
        performer.send("/hello")
        performer.status()
        intruder.send("/hello", performer.port)
        [refused] = intruder.errors()
        assert refused[0] == "/hello" and "asked for this itself" in refused[1]
        intruder.play(10)
        assert len(intruder.receive(WAIT, "/prediction", count=9)) >= 9  # its answers reached it
        assert performer.receive(0.3, "/prediction") == []  # and none the performer
        performer.play(10)
        assert len(performer.receive(WAIT, "/prediction", count=9)) >= 9


def test_a_port_named_by_another_socket_gets_a_small_multiple_of_what_that_socket_sent_until_it_speaks(
        tmp_path: Path) -> None:
    """`/subscribe status <victim>` (and mixture, and `/hello <victim>`) from another socket: while the victim has
    not sent anything it gets at most AMPLIFICATION x the namer's bytes, however much the server has to send;
    once it sends a datagram itself it is proven and gets the pushed status."""
    with serving(tmp_path, *ACCOMPANY) as (srv, peer, listener):
        namer, performer, victim = peer(), peer(), listener()
        for stream in ("status", "mixture", "prediction"):
            namer.send("/subscribe", stream, victim.port)
        namer.send("/hello", victim.port)
        namer.status()  # applied (the reply goes to the namer)
        performer.play(40)  # answers, mixtures and 4 status pushes a second to send, 2 s long
        victim.read(0.5)
        assert victim.bytes <= AMPLIFICATION * namer.sent_bytes, (victim.bytes, namer.sent_bytes, victim.got)
        assert victim.count("/status") == 0, "a whole /status push is more than the namer paid for"
        victim.sock.sendto(b"/proven\0,\0\0\0", ("127.0.0.1", srv.port))  # anything at all, from the named port
        victim.read(WAIT, lambda got: sum(a == "/status" for a, _ in got) >= 3)
        assert victim.count("/status") >= 3, "once it has spoken, the port gets the pushes it was subscribed to"


def test_a_crowd_of_subscribers_cannot_lock_the_monitor_out(tmp_path: Path) -> None:
    """40 sockets subscribe to every stream and go quiet; then a monitor-like socket subscribes (as the monitor's
    bridge does: every stream, no port) and gets its pushes and streams: the idlest made room."""
    with serving(tmp_path, *ACCOMPANY) as (srv, peer, listener):
        crowd = [peer() for _ in range(STREAM_SUBSCRIBERS + 8)]
        streams = ("prediction", "mixture", "surprise", "status", "performer")
        for junk in crowd:
            for stream in streams:
                junk.send("/subscribe", stream)
        for junk in crowd:
            junk.status()  # each one's subscriptions are applied
        monitor, performer = peer(), peer()
        for stream in streams:
            monitor.send("/subscribe", stream)
        performer.play(10)
        got = monitor.receive(WAIT, count=4 + 9 + 9)
        counts = {a: sum(x == a for _, x, _ in got) for a in ("/status", "/performer", "/surprise", "/error")}
        assert counts["/error"] == 0, got
        assert counts["/status"] >= 1 and counts["/performer"] >= 1 and counts["/surprise"] >= 1, counts
        status = monitor.status()
        assert status["osc_subscribers_evicted"] >= len(streams) * 9, status  # 8 more in the crowd, then the monitor


def test_a_sender_asks_for_at_most_8_destinations(tmp_path: Path) -> None:
    """Naming one port after another: the 9th request (streams and /hello together) is refused; withdrawing one
    makes room again; the named ports cost the namer's credit, never the server's."""
    with serving(tmp_path, *ACCOMPANY) as (srv, peer, listener):
        namer = peer()
        ports = [listener().port for _ in range(MAX_PER_SENDER + 1)]
        for port in ports[:-2]:
            namer.send("/subscribe", "status", port)
        namer.send("/hello", ports[-2])
        namer.send("/subscribe", "status", ports[-1])
        [refused] = namer.errors()
        assert refused[0] == "/subscribe" and f"at most {MAX_PER_SENDER}" in refused[1], refused
        namer.send("/unsubscribe", "prediction", ports[-2])
        namer.send("/subscribe", "status", ports[-1])
        namer.send("/status")
        got = namer.receive(WAIT, count=1, address=None)
        while got and got[-1][1] != "/status":
            got += namer.receive(WAIT, count=1)
        assert [a for _, a, _ in got] == ["/status"], got  # no /error before the reply: room again


def test_nobody_can_point_the_server_at_itself(tmp_path: Path) -> None:
    """`/hello <the server's port>` and `/subscribe status <the server's port>` would make it feed itself
    (each datagram it sent itself answered with an `/error` to itself): refused, and it keeps serving."""
    with serving(tmp_path, *ACCOMPANY) as (srv, peer, listener):
        asker = peer()
        asker.send("/hello", srv.port)
        asker.send("/subscribe", "status", srv.port)
        refused = asker.errors(2)
        assert [args[0] for args in refused] == ["/hello", "/subscribe"], refused
        assert all("this server's own" in args[1] for args in refused), refused
        assert asker.status()["osc_destinations"] == 1  # --send alone


# --------------------------------------------------------------------------- the amplification table


class Row(NamedTuple):
    request: str  # what was sent, as the README's table spells it
    to: str  # who receives what it causes
    request_bytes: int
    sent_bytes: int  # reply bytes, or bytes over the window for a destination or stream

    @property
    def factor(self) -> float:
        return self.sent_bytes / self.request_bytes


STREAMS = ("prediction", "mixture", "surprise", "status", "performer")
REPLY, ERROR, SILENT = "the sender (one reply)", "the sender (one `/error`)", "a port that never sends"
WINDOW = 10.0
SCENARIO = ("--mode", "accompany", "--timescale", "0.05", "--seed", "1")  # and a performer: 20 /gesture a second


def _osc(address: str, *args: Any) -> bytes:
    from server.osc.wire import encode_message

    return encode_message(address, *args)


def measure_amplification(tmp_path: Path, seconds: float = WINDOW) -> list[Row]:
    """Each reply and stream's bytes per request byte, against a real server in `SCENARIO`.

    Replies (`/status`, `/error`) are one reply over its request. A destination or a stream
    is what reaches its port over `seconds` after one request: the requester's own port,
    or a port that never sends, named by a socket that sends nothing but that request.
    All run at once, in one window, while a performer on another socket plays.
    """
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    received: dict[socket.socket, int] = {}

    def sock() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
        received[s] = 0
        return s

    plan: list[tuple[str, str, bytes, socket.socket, socket.socket]] = [
        ("`/status`", REPLY, _osc("/status"), *(2 * [sock()])),
        ("`/x` (an unknown address)", ERROR, _osc("/x"), *(2 * [sock()])),
        ("`/gesture` (no arguments)", ERROR, _osc("/gesture"), *(2 * [sock()])),
        ("`/hello`", "the sender", _osc("/hello"), *(2 * [sock()])),
    ]
    silent = sock()
    plan.append(("`/hello PORT`", SILENT, _osc("/hello", silent.getsockname()[1]), sock(), silent))
    for stream in STREAMS:
        plan.append((f"`/subscribe {stream}`", "the sender", _osc("/subscribe", stream), *(2 * [sock()])))
        silent = sock()
        plan.append((f"`/subscribe {stream} PORT`", SILENT,
                     _osc("/subscribe", stream, silent.getsockname()[1]), sock(), silent))
    dummy = sock()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{dummy.getsockname()[1]}", *SCENARIO)
    server = ("127.0.0.1", srv.port)
    stop = threading.Event()

    def perform() -> None:
        player = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        i = 0
        while not stop.wait(0.05):
            player.sendto(_osc("/gesture", 0.3 + 0.4 * (i % 20) / 20, 0.5), server)
            i += 1
        player.close()

    replies: dict[socket.socket, int] = {}
    try:
        player = threading.Thread(target=perform, daemon=True)
        player.start()
        time.sleep(0.5)  # the performer has opened the stage
        for _, _, data, sender, _ in plan:
            sender.sendto(data, server)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                while True:
                    try:
                        data = s.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    received[s] += len(data)
                    replies.setdefault(s, len(data))
    finally:
        stop.set()
        srv.stop()
        for s in socks:
            s.close()
    rows = []
    for request, to, data, sender, target in plan:
        rows.append(Row(request, to, len(data), replies.get(target, 0) if to in (REPLY, ERROR) else received[target]))
    return rows


def markdown(rows: list[Row], seconds: float = WINDOW) -> str:
    lines = [f"| request | reaches | request bytes | bytes sent (replies: one; else over {seconds:g} s) | factor |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {r.request} | {r.to} | {r.request_bytes} | {r.sent_bytes:,} | {r.factor:,.1f} |" for r in rows]
    return "\n".join(lines)


def readme_factors() -> dict[str, float]:
    """The factors of the README's amplification table, by request."""
    text = (REPO / "docs" / "osc.md").read_text(encoding="utf-8")
    section = text.split("<!-- amplification table -->", 2)
    assert len(section) == 3, "docs/osc.md's amplification table should sit between two `<!-- amplification table -->`"
    rows = re.findall(r"^\| (`[^|]+`[^|]*) \| [^|]+ \| \d+ \| [\d,]+ \| ([\d,.]+) \|$", section[1], re.MULTILINE)
    return {request: float(factor.replace(",", "")) for request, factor in rows}


def test_amplification_is_as_the_readme_says_and_a_silent_port_never_gets_more_than_4x(tmp_path: Path) -> None:
    """Measured: every port that never spoke gets at most AMPLIFICATION x its request (here, only the request paid);
    every other figure stays within 1.5x of the README's table (so the table stays true)."""
    rows = measure_amplification(tmp_path)
    table = markdown(rows)
    for row in rows:
        if row.to == SILENT:
            assert row.factor <= AMPLIFICATION, f"{row.request}: {row.factor:.1f}x to a silent port\n{table}"
        if row.to in (REPLY, ERROR):
            assert row.sent_bytes > 0, f"{row.request}: no reply\n{table}"
    stated = readme_factors()
    assert set(stated) == {r.request for r in rows}, f"the README's rows differ from the measured ones:\n{table}"
    for row in rows:
        assert row.factor <= 1.5 * stated[row.request] + 0.5, f"{row.request}: {row.factor:.1f}x, README says " \
            f"{stated[row.request]}x; measure again (python -m tests.test_destinations)\n{table}"


# --------------------------------------------------------------------------- the ledger, in process


def _protocol() -> tuple[Any, Any]:
    from server.osc import output as osc_output
    from server.osc import protocol as osc_proto
    from tests.oscfakes import FakeControls, StubTransport

    sock = StubTransport()
    out = osc_output.OscOutput([("127.0.0.1", 5711)])
    out.attach(sock)  # type: ignore[arg-type]
    return osc_proto.OscServerProtocol(FakeControls(), out), sock


def _sent_to(sock: Any, to: tuple[str, int]) -> list[bytes]:
    return [data for data, addr in sock.sent if addr == to]


A, B, P = ("127.0.0.1", 7001), ("127.0.0.1", 7002), ("127.0.0.1", 7003)


def test_an_unproven_port_is_paid_for_by_its_namer_4_bytes_per_byte_then_free_once_it_speaks() -> None:
    from server.osc.consent import BANK_BYTES, PROBE_BYTES

    protocol, sock = _protocol()
    out = protocol.output
    hello = _osc("/hello", P[1])
    protocol.datagrams_received([(hello, A, 0.0)])
    assert out.consent.credit(A) == PROBE_BYTES  # the first credit: 4 x a 16-byte /hello PORT
    for _ in range(3):
        out.send_prediction((0.5, 0.5))  # 24 bytes each: 2 fit in 64
    assert len(_sent_to(sock, P)) == 2 and out.stats.unproven_withheld == 1  # the third is withheld
    assert len(_sent_to(sock, ("127.0.0.1", 5711))) == 3  # --send is proven by the configuration
    gesture = _osc("/gesture", 0.5, 0.5)  # 24 bytes from the namer: 96 more
    protocol.datagrams_received([(gesture, A, 1.0)])
    assert out.consent.credit(A) == PROBE_BYTES - 48 + AMPLIFICATION * len(gesture)
    protocol.datagrams_received([(gesture, A, 1.0 + i / 1000) for i in range(1000)])
    assert out.consent.credit(A) == BANK_BYTES  # banked, but no more than 4096
    protocol.datagrams_received([(gesture, B, 2.0)])  # anyone else's bytes pay nothing
    assert out.consent.credit(A) == BANK_BYTES and out.consent.credit(B) is None
    protocol.datagrams_received([(_osc("/status"), P, 3.0)])  # the named port speaks
    before = out.consent.credit(A)
    for _ in range(500):
        out.send_prediction((0.5, 0.5))
    predictions = [d for d in _sent_to(sock, P) if d.startswith(b"/prediction")]
    assert len(predictions) == 2 + 500 and out.consent.credit(A) == before  # free now


def test_only_the_destination_or_its_requester_can_stop_it_and_a_self_request_makes_it_its_own() -> None:
    protocol, sock = _protocol()
    out = protocol.output
    protocol.datagrams_received([(_osc("/subscribe", "surprise", P[1]), A, 0.0),
                                 (_osc("/subscribe", "surprise", P[1]), B, 0.0)])
    streams = out.streams
    assert streams.subscribers("surprise") == (P,)
    protocol.datagrams_received([(_osc("/unsubscribe", "surprise", P[1]), A, 1.0)])  # A withdraws its own
    assert streams.subscribers("surprise") == (P,) and out.consent.credit(A) is None
    protocol.datagrams_received([(_osc("/subscribe", "surprise"), P, 2.0)])  # P asks itself: its own now
    assert out.consent.credit(B) is None and out.consent.proven(P)
    protocol.datagrams_received([(_osc("/unsubscribe", "surprise", P[1]), B, 3.0),
                                 (_osc("/subscribe", "surprise", P[1]), A, 3.0)])
    refusals = [OscMessage(d).params for d, addr in sock.sent if d.startswith(b"/error") and addr in (A, B)]
    assert [r[0] for r in refusals] == ["/unsubscribe", "/subscribe"], refusals
    assert streams.subscribers("surprise") == (P,)
    protocol.datagrams_received([(_osc("/unsubscribe", "surprise"), P, 4.0)])  # the destination's own word
    assert streams.subscribers("surprise") == () and out.last_heard == {}  # nothing left to remember


def test_a_newcomer_in_a_full_stream_evicts_the_idlest_never_one_still_talking() -> None:
    protocol, _ = _protocol()
    crowd = [("127.0.0.1", 8000 + i) for i in range(STREAM_SUBSCRIBERS)]
    protocol.datagrams_received([(_osc("/subscribe", "status"), c, 0.0) for c in crowd])
    protocol.datagrams_received([(_osc("/gesture", 0.5, 0.5), c, 5.0) for c in crowd if c != crowd[7]])
    protocol.datagrams_received([(_osc("/subscribe", "status"), A, 6.0)])
    subscribers = protocol.output.streams.subscribers("status")
    assert A in subscribers and crowd[7] not in subscribers and len(subscribers) == STREAM_SUBSCRIBERS


def test_a_few_busy_sockets_naming_many_ports_cannot_lock_the_hello_list() -> None:
    """4 sockets name 8 ports each (the most a sender may) and keep talking: each keeps only its first destination
    protected, so a newcomer's `/hello` still finds room (before, 4 sockets held 32 protected destinations)."""
    protocol, sock = _protocol()
    busy = [("127.0.0.1", 9000 + i) for i in range(4)]
    from server.osc.output import DestinationsFull

    for i, b in enumerate(busy):  # straight to the list: /hello's own rate (5 a second) is not the point here
        for j in range(MAX_PER_SENDER):
            try:
                protocol.output.add_destination(("127.0.0.1", 10000 + 100 * i + j), b, 0.0)
            except DestinationsFull:  # the 32nd: 31 fit beside --send
                assert (i, j) == (3, MAX_PER_SENDER - 1)
    protocol.datagrams_received([(_osc("/gesture", 0.5, 0.5), b, 15.0) for b in busy])  # still talking
    protocol.datagrams_received([(_osc("/hello"), A, 16.0)])
    destinations = protocol.output.destinations
    assert A in destinations and len(destinations) == 32
    assert all(("127.0.0.1", 10000 + 100 * i) in destinations for i in range(4))  # each one's first stays
    assert not [OscMessage(d).params for d, addr in sock.sent if d.startswith(b"/error") and addr == A]


if __name__ == "__main__":  # print the README's table afresh
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(markdown(measure_amplification(Path(folder))))
