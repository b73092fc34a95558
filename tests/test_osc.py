"""The OSC transport, over real UDP sockets on loopback: namespace, validation, replies, limits."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.udp_client import SimpleUDPClient

from server.osc import namespace as osc_ns
from server.osc import allow as osc_allow
from server.osc import protocol as osc_proto
from server.osc import output as osc_output
from server.osc import udp as udpbatch
from server.live.controls import ControlError
from server.live.modes import MODE_NAMES
from server.osc.table import AddressTable, ArgumentError, address
from server.osc.wire import (
    MAX_BUNDLE_DEPTH,
    BundleTooLarge,
    bundle_messages,
    encode_message,
    encode_prediction,
    message_problem,
)
from server.osc.ratelimit import TokenBuckets
from tests.oscfakes import FakeControls, StubTransport

TIMEOUT = 5.0  # how long to wait for what must come: only a failing test waits this long


class Server:
    """start_osc on a free loopback port, its event loop running in a background thread."""

    def __init__(self, allow: tuple[Any, ...] = (), destinations: tuple[tuple[str, int], ...] = ()) -> None:
        self.controls = FakeControls()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.transport, self.protocol, self.output = self.run(
            osc_proto.start_osc(self.controls, host="127.0.0.1", port=0, destinations=destinations, allow=allow)
        )
        self.port: int = self.transport.get_extra_info("sockname")[1]

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on the loop thread (the transport is not thread-safe) and return its result."""

        async def on_loop() -> Any:
            return fn(*args)

        return self.run(on_loop())

    def close(self) -> None:
        self.call(self.transport.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


class Client:
    """A performer's patch: one UDP socket that sends to the server and reads its replies."""

    def __init__(self, server_port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT)
        self.server = ("127.0.0.1", server_port)
        self.port: int = self.sock.getsockname()[1]

    def send(self, path: str, *args: Any) -> None:
        self.send_raw(message(path, *args))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def recv(self, timeout: float = TIMEOUT) -> OscMessage:
        self.sock.settimeout(timeout)
        data, sender = self.sock.recvfrom(65536)
        assert sender == self.server, "replies must come from the server's own port"
        return OscMessage(data)

    def expect_nothing(self, wait: float = 0.2) -> None:
        with pytest.raises(TimeoutError):
            self.recv(wait)

    def error(self) -> tuple[str, str]:
        reply = self.recv()
        assert reply.address == "/error", reply.params
        address, reason = reply.params
        return address, reason

    def status(self) -> dict[str, Any]:
        """Ask for /status and return it as a dict; also proves everything sent before was handled."""
        self.send("/status")
        while True:
            reply = self.recv()
            if reply.address == "/status":
                params = reply.params
                return dict(zip(params[::2], params[1::2]))

    def close(self) -> None:
        self.sock.close()


def message(path: str, *args: Any) -> bytes:
    builder = OscMessageBuilder(path)
    for arg in args:
        if isinstance(arg, tuple):  # (value, explicit OSC type tag)
            builder.add_arg(*arg)
        else:
            builder.add_arg(arg)
    return builder.build().dgram


def bundle(*contents: bytes | Any, timetag: float = IMMEDIATELY) -> Any:
    builder = OscBundleBuilder(timetag)
    for content in contents:
        builder.add_content(OscMessage(content) if isinstance(content, bytes) else content)
    return builder.build()


@pytest.fixture
def make_server() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(**kwargs: Any) -> Server:
        servers.append(Server(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    c = Client(server.port)
    yield c
    c.close()


# --- each address reaches the right control with converted values ---

GOOD = [
    (("/gesture", 0.25, 0.75), ("perform", 0.25, 0.75)),
    (("/gesture", 1, 0), ("perform", 1.0, 0.0)),  # ints accepted for floats
    (("/gesture", (0.5, "d"), (0.25, "d")), ("perform", 0.5, 0.25)),  # doubles too
    (("/interface", 0.25, 0.75), ("perform", 0.25, 0.75)),
    (("/note", 127, 127), ("perform", 1.0, 1.0)),
    (("/note", 0, 127), ("perform", 0.0, 1.0)),
    (("/note", 60.0, 127.0), ("perform", 60 / 127, 1.0)),  # Pd sends every number as a float
    (("/temperature", 0.5), ("set_temperature", 0.5)),
    (("/temperature", 0), ("set_temperature", 0.0)),
    (("/sigma_temperature", 0.0), ("set_sigma_temperature", 0.0)),
    (("/timescale", 2.0), ("set_timescale", 2.0)),
    (("/threshold", 1.5), ("set_threshold", 1.5)),
    (("/mode", "respond"), ("set_mode", "respond")),
    (("/reset",), ("reset",)),
    (("/pause", 1), ("set_paused", True)),
    (("/pause", 0), ("set_paused", False)),
    (("/pause", 1.0), ("set_paused", True)),
    (("/model", "my-model_2.v1"), ("load_model", "my-model_2.v1")),
]


@pytest.mark.parametrize(("sent", "expected"), GOOD, ids=[" ".join(map(str, s)) for s, _ in GOOD])
def test_each_address_calls_its_control(server: Server, client: Client, sent: tuple, expected: tuple) -> None:
    client.send(*sent)
    status = client.status()
    assert server.controls.calls == [expected]
    assert status["osc_handled"] == 1 and status["osc_rejected"] == 0  # /status counts once it is done


def test_every_mode_is_accepted(server: Server, client: Client) -> None:
    for name in MODE_NAMES:
        client.send("/mode", name)
    client.status()
    assert server.controls.calls == [("set_mode", name) for name in MODE_NAMES]


def test_note_off_is_ignored_not_an_event(server: Server, client: Client) -> None:
    client.send("/note", 60, 0)
    status = client.status()
    assert server.controls.calls == []
    assert status["osc_ignored"] == 1 and status["osc_rejected"] == 0
    client.expect_nothing(0.05)


def test_out_of_range_gesture_is_clamped_and_counted(server: Server, client: Client) -> None:
    client.send("/gesture", -0.5, 1.5)
    client.send("/interface", 0.5, 2)
    client.send("/gesture", 0.5, 0.5)
    status = client.status()
    assert server.controls.calls == [("perform", 0.0, 1.0), ("perform", 0.5, 1.0), ("perform", 0.5, 0.5)]
    assert status["osc_clamped"] == 2 and status["osc_rejected"] == 0


def test_bundles_nested_or_timed_are_applied_at_once_in_order(server: Server, client: Client) -> None:
    inner = bundle(message("/gesture", 0.1, 0.2), message("/temperature", 0.5))
    future = time.time() + 3600  # timetags are ignored: a gesture means now
    client.send_raw(bundle(inner, message("/reset"), timetag=future).dgram)
    client.status()
    assert server.controls.calls == [
        ("perform", pytest.approx(0.1), pytest.approx(0.2)),
        ("set_temperature", 0.5),
        ("reset",),
    ]


def test_simple_udp_client_round_trip(server: Server) -> None:
    """python-osc's own client works as-is, replies included."""
    with SimpleUDPClient("127.0.0.1", server.port, timeout=TIMEOUT) as c:
        c.send_message("/gesture", [0.5, 0.5])
        c.send_message("/status", [])
        reply = next(c.get_messages(TIMEOUT))
    assert reply.address == "/status"
    assert server.controls.calls == [("perform", 0.5, 0.5)]


# --- every kind of bad input: an /error reply naming address and reason; the server keeps serving ---

_GESTURE = message("/gesture", 0.5, 0.5)
_NEG_SIZE_BUNDLE = b"#bundle\0" + bytes(8) + struct.pack(">i", -8) + b"/a\0\0"


def _deep_bundle(depth: int) -> bytes:
    content: Any = bundle(message("/reset"))
    for _ in range(depth - 1):
        content = bundle(content)
    return content.dgram


BAD: list[tuple[str, bytes, str, str]] = [
    ("unknown address", message("/nope", 1), "/nope", "unknown address"),
    ("too few arguments", message("/gesture", 0.5), "/gesture", "expected 2-3 arguments"),
    ("too many arguments", message("/reset", 1, 2), "/reset", "expected 0-1 arguments"),
    ("hello takes at most one", message("/hello", 1, 2), "/hello", "expected 0-1 arguments"),
    ("string where float", message("/temperature", "hot"), "/temperature", "expected a number"),
    ("nan", message("/temperature", math.nan), "/temperature", "finite"),
    ("inf", message("/gesture", math.inf, 0.5), "/gesture", "finite"),
    ("-inf as double", message("/timescale", (-math.inf, "d")), "/timescale", "finite"),
    ("boolean", message("/pause", True), "/pause", "boolean"),
    ("blob", message("/temperature", b"\x01\x02"), "/temperature", "blob"),
    ("nil", message("/threshold", None), "/threshold", "nil"),
    ("float for int", message("/pause", 0.5), "/pause", "expected an integer"),
    ("number for string", message("/mode", 1), "/mode", "expected a string"),
    ("pause 2", message("/pause", 2), "/pause", "1 (pause) or 0"),
    ("negative temperature", message("/temperature", -0.1), "/temperature", ">= 0"),
    ("negative sigma", message("/sigma_temperature", -1), "/sigma_temperature", ">= 0"),
    ("timescale 0", message("/timescale", 0.0), "/timescale", "> 0"),
    ("negative threshold", message("/threshold", -1.0), "/threshold", ">= 0"),
    ("bad mode", message("/mode", "loud"), "/mode", "unknown mode"),
    ("model ..", message("/model", ".."), "/model", "invalid model name"),
    ("model ../x", message("/model", "../secrets"), "/model", "invalid model name"),
    ("model a/b", message("/model", "a/b"), "/model", "invalid model name"),
    ("model absolute", message("/model", "/etc"), "/model", "invalid model name"),
    ("model backslash", message("/model", "a\\b"), "/model", "invalid model name"),
    ("model hidden", message("/model", ".git"), "/model", "invalid model name"),
    ("engine refuses model", message("/model", "missing"), "/model", "no model named 'missing'"),
    ("note pitch 128", message("/note", 128, 64), "/note", "0-127"),
    ("hello port", message("/hello", 70000), "/hello", "port"),
    ("garbage bytes", b"\x00\x01\x02garbage", "?", "not an OSC message"),
    ("empty datagram", b"", "?", "not an OSC message"),
    ("truncated argument", _GESTURE[:-4], "/gesture", "truncated"),
    ("truncated address", b"/gest", "/gest", "malformed OSC message"),
    ("unsupported type tag", b"/gesture\0\0\0\0,c\0\0\0\0\0a", "/gesture", "unsupported OSC type tag"),
    ("no comma", b"/gesture\0\0\0\0ff\0\0" + bytes(8), "/gesture", "must start with ','"),
    ("invalid UTF-8", b"/\xff\xfe\0", "/\ufffd\ufffd", "malformed OSC message"),
    ("negative bundle element size", _NEG_SIZE_BUNDLE, "#bundle", "malformed OSC bundle"),
    ("truncated bundle", bundle(_GESTURE).dgram[:-4], "#bundle", "malformed OSC bundle"),
    ("bundles too deep", _deep_bundle(MAX_BUNDLE_DEPTH + 1), "#bundle", "nested deeper"),
    ("bad message in a nested bundle", bundle(bundle(message("/temperature", -1.0))).dgram,
     "/temperature", ">= 0"),
]


@pytest.mark.parametrize(("packet", "address", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_an_error_reply_and_service_continues(
    server: Server, client: Client, packet: bytes, address: str, reason: str
) -> None:
    client.send_raw(packet)
    got_address, got_reason = client.error()
    assert got_address == address
    assert reason in got_reason
    status = client.status()  # still serving
    assert status["osc_rejected"] == 1 and status["osc_internal_errors"] == 0
    assert server.controls.calls == []


def test_one_bad_message_in_a_bundle_does_not_spoil_the_others(server: Server, client: Client) -> None:
    client.send_raw(bundle(message("/temperature", 0.5), message("/timescale", 0), message("/reset")).dgram)
    assert client.error() == ("/timescale", "timescale must be > 0, got 0")
    client.status()
    assert server.controls.calls == [("set_temperature", 0.5), ("reset",)]


def test_engine_bug_is_an_internal_error_not_a_crash(server: Server, client: Client) -> None:
    server.controls.broken = True
    client.send("/gesture", 0.5, 0.5)
    assert client.error() == ("/gesture", "internal error")
    server.controls.broken = False
    status = client.status()
    assert status["osc_internal_errors"] == 1


def test_error_replies_are_rate_limited_per_sender(server: Server, client: Client) -> None:
    for _ in range(100):
        client.send("/nope")
    client.send("/status")  # answered after every /nope, so its reply comes after every /error sent
    errors = 0
    while (reply := client.recv()).address != "/status":
        assert reply.address == "/error"
        errors += 1
    assert 10 <= errors <= 20  # a burst of 10, plus what refilled at 10/s while the server read them
    status = dict(zip(reply.params[::2], reply.params[1::2]))
    assert status["osc_rejected"] == 100
    assert status["osc_errors_suppressed"] == 100 - errors
    # another sender has its own budget
    other = Client(server.port)
    other.send("/nope")
    assert other.error()[0] == "/nope"
    other.close()


# --- /hello, /status, output ---


def test_hello_without_port_adds_the_sender(server: Server) -> None:
    listener = Client(server.port)
    listener.send("/hello")
    listener.status()
    assert server.output.destinations == (("127.0.0.1", listener.port),)
    server.call(server.output.send_prediction, (0.25, 0.5))
    reply = listener.recv()
    assert reply.address == "/prediction" and reply.params == [0.25, 0.5]
    listener.close()


def test_hello_with_port_adds_that_port_once(server: Server, client: Client) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(TIMEOUT)
    port = receiver.getsockname()[1]
    client.send("/hello", port)
    client.send("/hello", port)
    client.status()
    assert server.output.destinations == (("127.0.0.1", port),)
    server.call(server.output.send_prediction, (0.125, 1.0))
    data, sender = receiver.recvfrom(1024)
    assert sender == ("127.0.0.1", server.port)
    assert OscMessage(data).params == [0.125, 1.0]
    receiver.close()


def test_status_replies_key_value_pairs(server: Server, client: Client) -> None:
    client.send("/gesture", 0.5, 0.5)
    status = client.status()
    assert status["mode"] == "accompany"  # an enum is sent as its value
    assert status["paused"] == 0  # a bool as 0/1
    assert status["temperature"] == 0.5 and status["model"] == "default"
    assert status["osc_received"] == 2 and status["osc_handled"] == 1
    for name in osc_output.OscStats().as_dict():
        assert f"osc_{name}" in status
    assert status["osc_destinations"] == 0


def test_configured_destinations_receive_predictions(make_server: Callable[..., Server]) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(TIMEOUT)
    port = receiver.getsockname()[1]
    server = make_server(destinations=(("localhost", port), ("127.0.0.1", port)))  # resolved, then deduplicated
    assert server.output.destinations == (("127.0.0.1", port),)
    server.call(server.output.send_prediction, (0.5, 0.75))
    assert OscMessage(receiver.recvfrom(1024)[0]).params == [0.5, 0.75]
    receiver.close()


def test_allow_list_drops_other_networks_silently(make_server: Callable[..., Server]) -> None:
    server = make_server(allow=(ipaddress.ip_network("10.0.0.0/8"),))
    client = Client(server.port)
    client.send("/status")
    client.send("/nope")
    client.expect_nothing()
    stats = server.call(lambda: server.protocol.stats.as_dict())
    assert stats["denied"] == 2 and stats["received"] == 0 and stats["rejected"] == 0
    client.close()


def test_allow_list_admits_matching_network(make_server: Callable[..., Server]) -> None:
    server = make_server(allow=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.0/8")))
    client = Client(server.port)
    assert client.status()["osc_denied"] == 0
    client.close()


def test_port_in_use_is_a_readable_error(server: Server) -> None:
    async def clash() -> None:
        await osc_proto.start_osc(FakeControls(), host="127.0.0.1", port=server.port, destinations=())

    with pytest.raises(OSError, match=f"cannot listen for OSC on 127.0.0.1:{server.port}"):
        asyncio.run(clash())


def test_sending_never_raises_and_failures_are_counted() -> None:
    output = osc_output.OscOutput([("127.0.0.1", 9)])
    output.send_prediction((0.5, 0.5))  # not attached yet: dropped quietly
    output.attach(StubTransport(OSError("network unreachable")))  # type: ignore[arg-type]
    output.send_prediction((0.5, 0.5))
    output.send_status(("127.0.0.1", 9), {"x": object(), "none": None})
    output.send_error(("127.0.0.1", 9), "/x", "why")
    assert output.stats.send_errors == 3 and output.stats.sent == 0
    protocol = osc_proto.OscServerProtocol(FakeControls(), output)
    protocol.error_received(ConnectionRefusedError())  # an ICMP report about an earlier send
    assert output.stats.send_errors == 4


def test_a_full_destination_list_evicts_the_quietest_hello_and_never_a_live_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    output = osc_output.OscOutput([("10.0.0.1", 1)], max_destinations=3)
    a, b, c, d = (("127.0.0.1", port) for port in range(1, 5))
    assert output.add_destination(a, a, 0.0) and output.add_destination(b, b, 1.0)
    with pytest.raises(osc_output.DestinationsFull, match="destination list is full"):
        output.add_destination(c, c, 5.0)  # a and b were heard within PROTECTED_SECONDS
    output.last_heard[a] = 8.0  # a is still playing (the protocol notes every datagram)
    with caplog.at_level(logging.DEBUG, logger="server.osc"):
        assert output.add_destination(c, c, 12.0)  # b, quiet since 1.0, makes room
        assert output.add_destination(d, d, 30.0)  # all quiet now: a (8.0) is the quietest
    assert output.destinations == (("10.0.0.1", 1), c, d)
    assert output.stats.destinations_evicted == 2
    assert len(caplog.records) <= 1, "one line at most, not one per eviction"
    assert set(output.last_heard) == {c, d}  # bounded by the list: evicted senders are forgotten
    assert output.add_destination(("10.0.0.1", 1)) is False  # configured ones are never duplicated
    assert output.add_destination(c, c, 31.0) is False
    with pytest.raises(ValueError):
        output.set_destinations([("h", p) for p in range(4)])


# --- load: the flood policy, per-address rate limits, the batched socket ---


def _protocol(**kwargs: Any) -> tuple[osc_proto.OscServerProtocol, FakeControls, StubTransport]:
    controls, sock = FakeControls(), StubTransport()
    output = osc_output.OscOutput()
    output.attach(sock)  # type: ignore[arg-type]
    return osc_proto.OscServerProtocol(controls, output, **kwargs), controls, sock


def _gestures(n: int, offset: int = 0, sender: tuple[str, int] = ("127.0.0.1", 9)) -> list[tuple[bytes, Any, float]]:
    """A batch of n /gesture datagrams (x exact in float32), arriving 1 ms apart."""
    return [_arrived(message("/gesture", (i + offset) / 1024, 0.5), i + offset, sender) for i in range(n)]


def _arrived(data: bytes, ms: float = 0.0, sender: tuple[str, int] = ("127.0.0.1", 9)) -> tuple[bytes, Any, float]:
    """A datagram as the transport hands it over: (data, sender, arrival time `ms` milliseconds in)."""
    return data, sender, ms / 1000


def test_a_long_run_of_positions_collapses_to_the_newest() -> None:
    protocol, controls, _ = _protocol()
    protocol.datagrams_received(_gestures(100))
    assert controls.calls == [("perform", 99 / 1024, 0.5)]
    assert protocol.stats.coalesced == 99 and protocol.stats.handled == 100 and protocol.stats.batch_max == 100


def test_a_batch_the_server_keeps_up_with_is_applied_whole_in_order() -> None:
    protocol, controls, _ = _protocol()
    temperature = _arrived(message("/temperature", 0.5))
    note = _arrived(message("/note", 127, 127))
    batch = _gestures(osc_proto.MAX_RUN - 4) + [temperature] + _gestures(3, offset=512) + [note]
    protocol.datagrams_received(batch)
    assert controls.calls == (
        [("perform", i / 1024, 0.5) for i in range(osc_proto.MAX_RUN - 4)]
        + [("set_temperature", 0.5), ("perform", 512 / 1024, 0.5), ("perform", 513 / 1024, 0.5),
           ("perform", 514 / 1024, 0.5), ("perform", 1.0, 1.0)]
    )
    assert protocol.stats.coalesced == 0 and protocol.stats.handled == len(batch)


def test_a_batch_behind_keeps_each_senders_newest_position_in_place_and_every_control() -> None:
    protocol, controls, _ = _protocol()
    other = ("127.0.0.1", 10)
    batch = (_gestures(osc_proto.MAX_RUN) + [_arrived(message("/reset"))] + _gestures(2, offset=512)
             + _gestures(2, offset=256, sender=other) + [_arrived(message("/temperature", 0.5))])
    protocol.datagrams_received(batch)
    assert controls.calls == [
        ("reset",),  # nothing from before the /reset reaches the model after it
        ("perform", 513 / 1024, 0.5),  # the first sender's newest, where it arrived
        ("perform", 257 / 1024, 0.5),  # the other sender's newest
        ("set_temperature", 0.5),
    ]
    assert controls.times == [0.513, 0.257]  # each kept position keeps its arrival time
    assert protocol.stats.coalesced == osc_proto.MAX_RUN + 2 and protocol.stats.handled == len(batch)


def test_a_bundle_of_positions_is_one_run() -> None:
    protocol, controls, _ = _protocol()
    packet = bundle(*[message("/gesture", i / 128, 0.25) for i in range(50)], message("/reset")).dgram
    protocol.datagram_received(packet, ("127.0.0.1", 9))
    assert controls.calls == [("perform", 49 / 128, 0.25), ("reset",)]


def test_costly_requests_are_limited_per_sender() -> None:
    protocol, controls, sock = _protocol()
    load = message("/model", "default")
    protocol.datagrams_received([_arrived(load)] * 20 + [_arrived(load, sender=("127.0.0.1", 10))])
    allowed = int(osc_ns.MODEL_LOADS_PER_SECOND)
    assert controls.calls == [("load_model", "default")] * (allowed + 1)  # the other sender has its own budget
    assert protocol.stats.rate_limited == protocol.stats.rejected == 20 - allowed
    reasons = {OscMessage(data).params[1] for data, _ in sock.sent}
    assert reasons == {f"too many requests: at most {allowed} per second"}


def test_engine_refusing_a_position_is_a_rejection() -> None:
    class Refusing(FakeControls):
        def perform(self, x: float, y: float, at: float | None = None, voice: int | None = None,
                    route: Any = None) -> None:
            raise ControlError("not now")

    output = osc_output.OscOutput()
    output.attach(StubTransport())  # type: ignore[arg-type]
    protocol = osc_proto.OscServerProtocol(Refusing(), output)
    protocol.datagrams_received(_gestures(2))
    assert protocol.stats.rejected == 2 and protocol.stats.handled == 0 and protocol.stats.internal_errors == 0


def test_socket_is_drained_in_one_batch_after_a_stall(server: Server, client: Client) -> None:
    """While the loop is busy, datagrams wait in the kernel; the next wake-up reads them all at once."""
    release = threading.Event()
    server.loop.call_soon_threadsafe(release.wait, 5.0)  # block the loop thread, as a long stall would
    for i in range(200):
        client.send("/gesture", i / 1024, 0.5)
    release.set()
    status = client.status()
    assert server.controls.calls == [("perform", 199 / 1024, 0.5)]
    assert status["osc_batch_max"] >= 200 and status["osc_coalesced"] == 199
    assert status["osc_kernel_drops"] == (0 if sys.platform.startswith("linux") else "none")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel drop counts come from Linux SO_MEMINFO")
def test_kernel_drops_are_counted_when_the_receive_buffer_overflows(server: Server, client: Client) -> None:
    release = threading.Event()
    server.loop.call_soon_threadsafe(release.wait, 5.0)
    sent = 20_000  # ~16 MB of kernel memory: far more than the receive buffer holds
    for _ in range(sent):
        client.send_raw(_GESTURE)
    release.set()
    asked = 0  # a /status sent while the buffer is still full is dropped too: ask until one is answered
    end = time.monotonic() + 10 * TIMEOUT
    while True:
        client.send("/status")
        asked += 1
        try:
            while (reply := client.recv(1.0)).address != "/status":
                pass
            break
        except TimeoutError:
            assert time.monotonic() < end, "no /status reply after the flood"
    status = dict(zip(reply.params[::2], reply.params[1::2]))
    assert status["osc_kernel_drops"] > 0
    # every datagram read or counted as dropped: the flood and the /status answered (and any asked before it)
    assert sent + 1 <= status["osc_received"] + status["osc_kernel_drops"] <= sent + asked
    assert server.controls.calls[-1] == ("perform", 0.5, 0.5)


def test_receive_buffer_is_raised_and_a_64k_datagram_arrives_whole(server: Server, client: Client) -> None:
    granted = server.call(server.transport.receive_buffer)
    assert granted >= min(udpbatch.RECEIVE_BUFFER, _rmem_max())
    data = message("/gesture", 0.5, 0.5)
    client.send_raw(data + bytes(65507 - len(data)))  # the largest IPv4 UDP payload; trailing bytes are tolerated
    client.status()
    assert server.controls.calls == [("perform", 0.5, 0.5)]


def test_loops_without_add_reader_fall_back_to_asyncio_transport() -> None:
    """Windows' proactor loop has no add_reader: the server must still listen, one datagram per batch."""

    class Recording(FakeControls):
        def __init__(self) -> None:
            super().__init__()
            self.got = asyncio.Event()

        def perform(self, x: float, y: float, at: float | None = None, voice: int | None = None,
                    route: Any = None) -> None:
            super().perform(x, y, at, voice, route)
            self.got.set()

    def no_add_reader(*args: Any) -> None:
        raise NotImplementedError

    async def scenario() -> tuple[Any, list[tuple[Any, ...]]]:
        loop = asyncio.get_running_loop()
        loop.add_reader = no_add_reader  # type: ignore[method-assign]  # asyncio itself uses _add_reader
        controls = Recording()
        transport, protocol, _ = await osc_proto.start_osc(controls, host="127.0.0.1", port=0, destinations=())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(message("/gesture", 0.25, 0.5), transport.get_extra_info("sockname"))
            await asyncio.wait_for(controls.got.wait(), TIMEOUT)
        counters = protocol.counters()
        transport.close()
        return transport, [controls.calls, counters["kernel_drops"], controls.times, loop.time()]

    transport, (calls, drops, times, end) = asyncio.run(scenario())
    assert not isinstance(transport, udpbatch.BatchDatagramTransport)
    assert calls == [("perform", 0.25, 0.5)] and drops is None
    assert times[0] is not None and end - 1.0 < times[0] <= end  # arrival is the read time, on the loop's clock


def _rmem_max() -> int:
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            return int(f.read())
    except OSError:
        return 0


@pytest.mark.parametrize(
    ("sockname", "allow", "expected"),
    [
        (("127.0.0.1", 5710), (), None),
        (("127.0.0.2", 5710), (), None),
        (("::1", 5710, 0, 0), (), None),
        (("::ffff:127.0.0.1", 5710, 0, 0), (), None),
        (("0.0.0.0", 5710), (), "every interface"),
        (("::", 5710, 0, 0), (), "every interface"),
        (("192.168.1.20", 5710), (), "--allow"),
        (("192.168.1.20", 5710), (ipaddress.ip_network("192.168.1.0/24"),), "192.168.1.0/24 only"),
    ],
)
def test_exposure_warning_judges_the_bound_address(sockname: tuple, allow: tuple, expected: str | None) -> None:
    warning = osc_allow.exposure_warning(sockname, allow)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None and expected in warning


# --- documentation generated from the table ---


def test_namespace_docs_list_every_address_exactly_once() -> None:
    text_lines = osc_ns.namespace_text().splitlines()
    markdown_lines = osc_ns.namespace_markdown().splitlines()
    assert len(text_lines) == len(osc_ns.ADDRESSES)
    for path in osc_ns.ADDRESSES:
        assert sum(line.split()[0] == path for line in text_lines) == 1
        assert sum(line.startswith(f"| `{path}` |") for line in markdown_lines) == 1
    assert set(osc_ns.ADDRESSES) == {
        "/gesture", "/interface", "/note", "/temperature", "/sigma_temperature", "/timescale", "/mode", "/lookahead",
        "/threshold", "/reset", "/pause", "/model", "/hello", "/status", "/learn", "/learn/stop",
        "/subscribe", "/unsubscribe",
    }
    assert osc_ns.OUTPUT_ADDRESSES == ("/prediction", "/status", "/error", "/learn/progress", "/learn/done",
                                       "/mixture", "/performer", "/surprise", "/model/dims")
    assert "[port:int]" in osc_ns.namespace_text()
    mode_line = next(line for line in text_lines if line.startswith("/mode "))
    assert all(name in mode_line for name in MODE_NAMES)


def test_every_handler_in_the_module_is_in_the_table() -> None:
    marked = {v.osc_address.path for v in vars(osc_ns).values() if hasattr(v, "osc_address")}
    assert marked == set(osc_ns.ADDRESSES)


def test_table_rejects_malformed_handlers() -> None:
    def undocumented(ctx: object, x: float) -> None:
        pass

    def untyped(ctx: object, x) -> None:  # type: ignore[no-untyped-def]
        """Doc."""

    def fine(ctx: object) -> None:
        """Doc."""

    with pytest.raises(TypeError, match="docstring"):
        address("/a")(undocumented)
    with pytest.raises(TypeError, match="annotated"):
        address("/a")(untyped)
    with pytest.raises(ValueError, match="literal"):
        address("/a*")(fine)
    with pytest.raises(ValueError, match="duplicate"):
        AddressTable([address("/a")(fine), address("/a")(fine)])


def test_argument_rules() -> None:
    @address("/t")
    def t(ctx: list, f: float, i: int, s: str = "x") -> None:
        """Test."""
        ctx.append((f, i, s))

    spec = AddressTable([t]).lookup["/t"]
    got: list = []
    spec.invoke(got, [1, 2.0])
    spec.invoke(got, [0.5, 3, "y"])
    assert got == [(1.0, 2, "x"), (0.5, 3, "y")]
    assert type(got[0][0]) is float and type(got[0][1]) is int
    for bad in ([True, 1], [1.0, 1.5], [1.0, math.nan], [1.0, 1, 2], [1.0], [1.0, 1, b"s"]):
        with pytest.raises(ArgumentError):
            spec.invoke(got, bad)


# --- wire format ---


@given(st.floats(width=32), st.floats(width=32))
def test_prediction_encoding_matches_python_osc(x: float, y: float) -> None:
    params = OscMessage(encode_prediction((x, y))).params
    assert OscMessage(encode_prediction((x, y))).address == "/prediction"
    assert [struct.pack(">f", v) for v in params] == [struct.pack(">f", x), struct.pack(">f", y)]


def test_prediction_encoding_saturates_instead_of_raising() -> None:
    assert OscMessage(encode_prediction((1e300, -1e300))).params == [math.inf, -math.inf]


_ARG = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.floats(width=32, allow_nan=False),
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20),
)


def test_unencodable_text_is_replaced_not_raised() -> None:
    # A lone surrogate (e.g. echoed from a client's bad string) cannot be UTF-8: sent as '?'.
    assert OscMessage(encode_message("/error", "\ud800")).params == ["?"]


@given(st.lists(_ARG, max_size=6))
def test_message_encoding_matches_python_osc(args: list) -> None:
    data = encode_message("/status", *args)
    assert message_problem(data) is None
    assert OscMessage(data).params == args


_TYPED_ARG = st.one_of(
    st.integers(-(2**31), 2**31 - 1).map(lambda v: (v, "i")),
    st.floats(width=32).map(lambda v: (v, "f")),
    st.floats().map(lambda v: (v, "d")),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: (v, "h")),
    st.text(max_size=9).filter(lambda s: "\0" not in s).map(lambda v: (v, "s")),
    st.binary(min_size=1, max_size=9).map(lambda v: (v, "b")),  # python-osc cannot build empty blobs
)


@given(st.lists(_TYPED_ARG, min_size=1, max_size=5))
def test_layout_check_accepts_whole_messages_and_flags_every_truncation(args: list) -> None:
    data = message("/gesture", *args)
    assert message_problem(data) is None
    address_end = 12  # "/gesture\0\0\0\0"; cutting exactly there leaves a valid argument-less message
    for cut in range(address_end + 1, len(data)):
        assert message_problem(data[:cut]) is not None, cut


@settings(max_examples=300)
@given(st.one_of(
    st.binary(max_size=80),
    st.binary(max_size=80).map(lambda b: b"/gesture\0\0\0\0" + b),
    st.binary(max_size=80).map(lambda b: b"#bundle\0" + b),
    st.lists(st.binary(max_size=12).map(lambda b: struct.pack(">i", len(b) - 4) + b), max_size=4)
    .map(lambda parts: b"#bundle\0" + bytes(8) + b"".join(parts)),
))
def test_no_datagram_escapes_or_hangs_the_protocol(data: bytes) -> None:
    output = osc_output.OscOutput()
    output.attach(StubTransport())  # type: ignore[arg-type]
    protocol = osc_proto.OscServerProtocol(FakeControls(), output)
    protocol.datagram_received(data, ("127.0.0.1", 9))
    assert protocol.stats.internal_errors == 0


def test_bundle_unpacking_keeps_order_and_depth() -> None:
    inner = bundle(message("/a"), message("/b"))
    assert bundle_messages(bundle(message("/x"), inner, message("/y")).dgram) == [
        message("/x"), message("/a"), message("/b"), message("/y")
    ]
    assert bundle_messages(_deep_bundle(MAX_BUNDLE_DEPTH)) == [message("/reset")]
    with pytest.raises(ValueError, match="size"):
        bundle_messages(_NEG_SIZE_BUNDLE)
    nested = bundle(message("/x"), inner, message("/y")).dgram
    assert bundle_messages(nested, limit=4) == [message("/x"), message("/a"), message("/b"), message("/y")]
    with pytest.raises(BundleTooLarge) as caught:  # a limit reached inside a nested bundle, more left outside
        bundle_messages(nested, limit=2)
    assert caught.value.messages == [message("/x"), message("/a")]
    with pytest.raises(BundleTooLarge) as caught:  # beyond the limit nothing is read, valid or not
        bundle_messages(nested + b"\xff" * 3, limit=4)
    assert len(caught.value.messages) == 4


# --- rate limiter ---


def test_token_buckets_burst_then_refill() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=10.0, burst=10, clock=lambda: now[0])
    assert sum(buckets.allow("a") for _ in range(100)) == 10
    assert buckets.allow("b")  # per key
    now[0] += 0.25
    assert sum(buckets.allow("a") for _ in range(100)) == 2
    now[0] += 100.0
    assert sum(buckets.allow("a") for _ in range(100)) == 10  # never more than the burst


def test_token_buckets_memory_is_bounded() -> None:
    buckets = TokenBuckets(max_keys=4, clock=lambda: 0.0)
    for key in range(100):
        assert buckets.allow(key)
    assert len(buckets) == 4
