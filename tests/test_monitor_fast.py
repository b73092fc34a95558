"""The web monitor's OSC side and its `serve`, in this process (fast: no process, no browser).

tests/test_monitor.py starts the monitor and a server as processes and drives Chromium,
so under `-p tests.fast` (and so under `make mutants`) most of it is skipped. Here the
same paths run in the test's own process:

- what the bridge shows for each message a server sends (`decode`, from the real OSC
  bytes `server.osc.wire.encode_message` makes), and how it reads `--server HOST:PORT`;
- the `Bridge` on a real loopback UDP socket against a fake server socket: what it
  resolves and binds, what it sends, that it reads only what the server sent, and its
  keep-alive; its timing (the status poll, "connected") on a virtual clock;
- `serve` itself on this process's event loop: the ready line (flushed at once, as a
  parent reading the pipe waits for it), the page, the WebSocket fed from the fake
  server, the lines printed beyond loopback, and a clean stop on SIGTERM and SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import os
import re
import select
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from server.model.files import DEFAULT_MODELS_DIR, available_models
from server.monitor import app as app_module
from server.monitor import bridge as bridge_module
from server.monitor.app import CSP, MODELS_REFRESH_S, Monitor
from server.live.controls import ControlError
from server.monitor.bridge import (CONNECTED_S, FLOAT32_RANGE, POLL_S, PUSH_STALE_S, RECEIVE_BUFFER, STREAMS, Bridge,
                                   _finite, decode, encode, parse_server)
from server.monitor.controls import validate
from server.osc.wire import encode_message

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
SECONDS = 5.0  # the most any wait here takes; only a failing test waits this long


def shown(address: str, *args: Any) -> dict[str, Any] | None:
    """What the bridge shows for the bytes a server sends (`server.osc.wire`: ints `i`, floats `f`, strings `s`)."""
    msg = OscMessage(encode_message(address, *args))
    return decode(msg.address, list(msg.params))


def built(address: str, *args: Any) -> bytes:
    """An OSC message with the types the server's wire does not make (nil, blob, true)."""
    b = OscMessageBuilder(address)
    for a in args:
        b.add_arg(a, OscMessageBuilder.ARG_TYPE_BLOB if isinstance(a, bytes) else None)
    return b.build().dgram


def shown_built(address: str, *args: Any) -> dict[str, Any] | None:
    msg = OscMessage(built(address, *args))
    return decode(msg.address, list(msg.params))


# --------------------------------------------------------------------------- decode: what the page is shown


@pytest.mark.parametrize("kind", ["prediction", "performer"])
def test_a_position_is_shown_with_its_voice_when_it_carries_one(kind):
    address = f"/{kind}"
    assert shown(address, 0.25, 0.75) == {"type": kind, "values": [0.25, 0.75], "voice": None}
    assert shown(address, 0.25, 0.75, 3) == {"type": kind, "values": [0.25, 0.75], "voice": 3}
    assert shown(address, 0.0, 1.0, 0)["voice"] == 0  # voices are numbered from 0
    assert shown(address, 0.0, 1.0, 999)["voice"] == 999
    for not_a_voice in (1000, -1, "2"):  # out of range, or not an integer
        assert shown(address, 0.5, 0.5, not_a_voice) == {"type": kind, "values": [0.5, 0.5], "voice": None}, not_a_voice
    assert shown(address, 0.5, 0.5, 3, 4)["voice"] is None  # not the shape a voice's message has


NINE = [0.5, 0.0, 1.0, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875]  # float32 exact, so they come back as sent


@pytest.mark.parametrize("kind", ["prediction", "performer"])
@pytest.mark.parametrize("values", [NINE[:1], NINE[:2], NINE], ids=["N=1", "N=2", "N=9"])
def test_an_event_of_any_width_is_shown_as_its_values_and_the_trailing_int_as_its_voice(kind, values):
    """The server sends N float32 values, then with voices per-sender the voice as an int32: the types tell the
    two apart at any N, so a float after the values is one more value, never a voice."""
    address = f"/{kind}"
    assert shown(address, *values) == {"type": kind, "values": values, "voice": None}
    assert shown(address, *values, 7) == {"type": kind, "values": values, "voice": 7}
    assert shown(address, *values, 7.0) == {"type": kind, "values": [*values, 7.0], "voice": None}
    assert shown(address, *values, 7, 8) == {"type": kind, "values": values, "voice": None}


@pytest.mark.parametrize("kind", ["prediction", "performer"])
def test_an_event_of_no_value_or_more_than_sixteen_or_a_bad_one_is_not_shown(kind):
    address = f"/{kind}"
    assert shown(address) is None
    assert shown(address, 3) is None  # an int alone: a voice without values
    assert shown(address, *[0.5] * 16)["values"] == [0.5] * 16  # the widest model
    assert shown(address, *[0.5] * 17) is None
    assert shown(address, math.nan, 0.5) is None
    assert shown(address, 0.5, math.inf) is None
    assert shown(address, "left", 0.5) is None  # not a number
    # what follows the values is not theirs to spoil
    assert shown(address, 0.5, 0.25, "label") == {"type": kind, "values": [0.5, 0.25], "voice": None}
    assert shown_built(address, 0.5, None) == {"type": kind, "values": [0.5], "voice": None}  # OSC nil


def test_surprise_is_shown_as_its_two_figures():
    assert shown("/surprise", 2.5, 1.25) == {"type": "surprise", "nll": 2.5, "smoothed": 1.25}
    assert shown("/surprise", 2.5, 1.25, 4) == {"type": "surprise", "nll": 2.5, "smoothed": 1.25}  # a voice's
    assert shown("/surprise", 2.5, 1.25, "label") == {"type": "surprise", "nll": 2.5, "smoothed": 1.25}
    assert shown("/surprise", 2.5) is None
    assert shown("/surprise", math.inf, 1.0) is None
    assert shown("/surprise", 1.0, math.nan) is None


COMPONENTS = [[0.5, 0.125, 0.25, 1.5, 0.0625, 0.03125], [2.0, 0.75, 0.875, 0.5, 0.25, 0.375]]
TWO = [2.0, 0.25, 0.75, *COMPONENTS[0], *COMPONENTS[1]]  # K, the weights, then each component's six figures


def component(figures: list[float]) -> dict[str, Any]:
    """`dt_median v1_mean .. vN_mean dt_log_sigma v1_sigma .. vN_sigma` as the page is shown it."""
    n = (len(figures) - 2) // 2
    return {"dt": figures[0], "means": figures[1:1 + n], "dt_sigma": figures[1 + n], "sigmas": figures[2 + n:]}


def test_a_mixture_is_shown_as_its_weights_and_components():
    assert shown("/mixture", *TWO) == {"type": "mixture", "dims": 2, "weights": [0.25, 0.75],
                                       "components": [component(c) for c in COMPONENTS]}
    assert shown("/mixture", *TWO)["components"][0] == {"dt": 0.5, "means": [0.125, 0.25], "dt_sigma": 1.5,
                                                        "sigmas": [0.0625, 0.03125]}
    assert shown("/mixture", *TWO, 3) == shown("/mixture", *TWO)  # with voices per-sender, the voice's number last
    one = [1.0, 1.0, *COMPONENTS[1]]
    assert shown("/mixture", *one) == {"type": "mixture", "dims": 2, "weights": [1.0],
                                       "components": [component(COMPONENTS[1])]}
    assert shown("/mixture", *one, 0) == shown("/mixture", *one)
    assert shown("/mixture", 2, *TWO[1:]) == shown("/mixture", *TWO)  # K sent as an int


@pytest.mark.parametrize("n", [1, 2, 9, 16])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_a_mixture_of_any_width_is_read_from_its_length_with_or_without_a_voice(n, k):
    """2 + 2N figures per component: N follows from K and the length, and a voice's one figure more never reads
    as another width."""
    rows = [[0.5 + i, *[(j + 1) / 32 for j in range(n)], 1.0 + i, *[(j + 1) / 64 for j in range(n)]] for i in range(k)]
    weights = [1 / k] * k
    figures = [k, *weights, *[f for row in rows for f in row]]
    expected = {"type": "mixture", "dims": n, "weights": shown("/mixture", *figures)["weights"],
                "components": [component(row) for row in rows]}
    assert shown("/mixture", *figures) == expected
    assert shown("/mixture", *figures, 3) == expected
    assert shown("/mixture", *figures[:-1]) is None  # a figure short: no width, even with a voice read off
    assert shown("/mixture", *figures[:-1], 3) is None
    assert shown("/mixture", *figures, 0.5) is None  # a float more is a figure, not a voice


def test_a_mixture_of_the_wrong_shape_or_with_a_bad_figure_is_not_shown():
    assert shown("/mixture") is None
    assert shown("/mixture", 0.0) is None  # no components
    assert shown("/mixture", -1.0, *TWO[1:]) is None
    assert shown("/mixture", 1.5, *TWO[1:]) is None
    assert shown("/mixture", *TWO[:-1]) is None  # a figure short
    assert shown("/mixture", *TWO, 3, 4) is None  # two too many
    assert shown("/mixture", *TWO, "voice") is None
    assert shown("/mixture", 1, 1.0, 0.5, 0.5, 1.0) is None  # 3 figures: dt, a mean, and no sigma for it
    assert shown("/mixture", 1, 1.0, *[0.5] * 36) is None  # 17 values
    bad = list(TWO)
    bad[5] = math.nan
    assert shown("/mixture", *bad) is None
    bad[5] = math.inf
    assert shown("/mixture", *bad) is None


def test_status_is_shown_as_its_pairs():
    assert shown("/status", "mode", "accompany", "temperature", 0.5, "voices", 2) == {
        "type": "status", "values": {"mode": "accompany", "temperature": 0.5, "voices": 2}}
    assert shown("/status", 7, "seven", "left over") == {"type": "status", "values": {"7": "seven"}}
    assert shown("/status") == {"type": "status", "values": {}}


def test_an_error_is_shown_with_its_address_and_reason():
    assert shown("/error", "/temperature", "expected", "a", "number", 3) == {
        "type": "error", "address": "/temperature", "reason": "expected a number 3"}
    assert shown("/error", "/temperature") == {"type": "error", "address": "/temperature", "reason": ""}
    assert shown("/error") == {"type": "error", "address": "", "reason": ""}


def test_learning_is_shown_with_its_arguments_as_json_can_carry_them():
    assert shown("/learn/progress", 0.5, "training", 3) == {
        "type": "learn", "address": "/learn/progress", "args": [0.5, "training", 3]}
    assert shown("/learn/done", "fine-1", 1) == {"type": "learn", "address": "/learn/done", "args": ["fine-1", 1]}
    done = shown_built("/learn/done", b"\x01\x02", None)  # a blob and a nil: as text, so the page gets JSON
    assert done == {"type": "learn", "address": "/learn/done", "args": [str(b"\x01\x02"), "None"]}
    json.dumps(done, allow_nan=False)


def test_a_swap_to_another_width_is_shown_as_the_new_width():
    assert shown("/model/dims", 8) == {"type": "dims", "dims": 8}
    for bad in ((0,), (17,), (8.0,), (8, 1), ()):
        assert shown("/model/dims", *bad) is None, bad


def test_messages_the_page_does_not_draw_are_not_shown():
    for address in ("/hello", "/predictions", "/learn", "/learn/progress/x", "/Status"):
        assert shown(address, 0.5, 0.5) is None, address


def test_finite_takes_numbers_and_refuses_anything_else():
    assert _finite([1, 2.5, True]) == [1.0, 2.5, 1.0]
    assert _finite([]) == []
    assert _finite([1.0, "x"]) is None  # ValueError
    assert _finite([1.0, None]) is None  # TypeError
    assert _finite([1.0, -math.inf]) is None


# --------------------------------------------------------------------------- --server HOST:PORT


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:5005", ("127.0.0.1", 5005)),
    ("localhost:1", ("localhost", 1)),
    ("studio.local:65535", ("studio.local", 65535)),
    ("[::1]:5005", ("::1", 5005)),  # IPv6 in brackets: the last colon is the port's
    ("STUDIO-X:5005", ("STUDIO-X", 5005)),  # the name as given
])
def test_server_addresses_are_read_as_host_and_port(text, expected):
    assert parse_server(text) == expected


@pytest.mark.parametrize("text", ["5005", ":5005", "localhost:", "localhost", "localhost:0", "localhost:65536",
                                  "localhost:-1", "localhost:5e3", "localhost:http", "localhost: 5005", ""])
def test_a_malformed_server_address_is_refused_with_what_was_expected(text):
    with pytest.raises(ValueError) as refused:
        parse_server(text)
    assert str(refused.value) == f"expected HOST:PORT, got {text!r}"


# --------------------------------------------------------------------------- what the monitor sends


def tags(address: str, args: list[Any]) -> str:
    """The OSC type tags of what the bridge sends for `args`."""
    data = encode(address, args)
    start = len(address) + 4 - len(address) % 4
    return data[start:data.index(b"\0", start)].decode()


def test_floats_go_as_float32_where_it_holds_them_and_as_float64_where_it_would_not():
    smallest, largest = FLOAT32_RANGE  # normal float32 magnitudes
    assert tags("/t", [0.0, 1.0, -0.5, smallest, largest, -largest]) == ",ffffff"
    assert tags("/t", [1e-300, 1e300, -1e300, smallest / 2, largest * 1.0001]) == ",ddddd"  # lost to 0, or inf
    assert tags("/t", [1, (1 << 63) - 1, "s"]) == ",ihs"
    msg = OscMessage(encode("/t", [1e-300, -1e300, 0.25]))
    assert list(msg.params) == [1e-300, -1e300, 0.25]  # what the server reads is what the page asked for


def test_a_control_is_refused_with_the_reason_for_what_is_wrong():
    def reason(message: Any) -> str:
        with pytest.raises(ControlError) as refused:
            validate(message, MODELS)
        return str(refused.value)

    assert reason([1]) == "a control is a JSON object"
    assert reason({"address": "/dance"}) == ("unknown control; expected one of /learn, /learn/stop, /mode, /model, "
                                             "/pause, /reset, /sigma_temperature, /temperature, /timescale")
    assert reason({"address": "/reset", "args": 0}) == "args must be a list"
    assert reason({"address": "/temperature", "args": [0.5, -(1 << 63) - 1]}) == (
        "integers must fit in 64 bits (OSC has no wider number)")
    assert reason({"address": "/reset", "args": [1 << 63]}) == "integers must fit in 64 bits (OSC has no wider number)"
    # the 64 bits OSC carries are the monitor's only check; the rest is the server's rule, with its reason
    assert validate({"address": "/temperature", "args": [0.5, (1 << 63) - 1]}, MODELS) == (
        "/temperature", [0.5, (1 << 63) - 1])
    assert "a voice number is 0 or more" in reason({"address": "/temperature", "args": [0.5, -(1 << 63)]})
    assert reason({"address": "/model", "args": ["nope"]}) == "no model 'nope' in the models folder"


# --------------------------------------------------------------------------- the Bridge on a real socket


class FakeServer:
    """A UDP socket on loopback standing in for an Antiphon server: what the bridge sent it, and its replies."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        self.port = self.address[1]
        self.got: list[tuple[str, list[Any], tuple[str, int]]] = []  # (OSC address, args, from)

    def drain(self) -> list[tuple[str, list[Any], tuple[str, int]]]:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                return self.got
            msg = OscMessage(data)
            self.got.append((msg.address, list(msg.params), addr))

    def sent(self) -> list[tuple[str, list[Any]]]:
        return [(address, args) for address, args, _ in self.drain()]

    async def until(self, predicate: Any, seconds: float = SECONDS) -> None:
        await until(lambda: predicate(self.sent()), seconds, lambda: f"the fake server got {self.sent()}")

    def say(self, to: tuple[str, int], data: bytes) -> None:
        self.sock.sendto(data, to)

    def close(self) -> None:
        self.sock.close()


async def until(predicate: Any, seconds: float = SECONDS, what: Any = lambda: "") -> None:
    """Wait until `predicate()` holds; fail after `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        assert loop.time() < deadline, f"gave up after {seconds} s: {what()}"
        await asyncio.sleep(0.01)


def waiting(sock: socket.socket) -> None:
    """Wait until a datagram is waiting on `sock` (loopback delivers within the sender's call; this is a guard)."""
    assert select.select([sock], [], [], SECONDS)[0], "nothing arrived"


@contextlib.asynccontextmanager
async def bridged(host: str = "localhost") -> AsyncIterator[tuple[Bridge, FakeServer, list[dict]]]:
    """A started Bridge to a fake server on loopback (named `host`), and what the bridge published."""
    server = FakeServer()
    published: list[dict] = []
    bridge = Bridge((host, server.port), published.append)
    await bridge.start()
    try:
        yield bridge, server, published
    finally:
        bridge.close()
        server.close()


def test_the_bridge_resolves_the_server_over_ipv4_and_binds_a_fresh_loopback_port():
    async def go():
        async with bridged("localhost") as (bridge, server, _):
            assert bridge.server == ("127.0.0.1", server.port)
            assert bridge.server_ips == {"127.0.0.1"}
            assert bridge.sock.getsockname()[0] == "127.0.0.1"
            async with bridged("127.0.0.1") as (other, _, _):  # a second monitor beside it: a port of its own
                assert other.sock.getsockname()[1] != bridge.sock.getsockname()[1]
            # a loopback server gets a loopback socket, whatever interface the caller would bind
            told = Bridge(("127.0.0.1", server.port), print)
            await told.start(bind_host="0.0.0.0")
            assert told.sock.getsockname()[0] == "127.0.0.1"
            told.close()
            # a server on another machine (192.0.2.1: TEST-NET, never sent to) gets a socket that can reach it:
            # every interface, not loopback, whence sendto() beyond this machine fails (EINVAL)
            elsewhere = Bridge(("192.0.2.1", 5005), print)
            await elsewhere.start()
            assert elsewhere.sock.getsockname()[0] == "0.0.0.0"
            elsewhere.close()
            # or where the caller said
            far = Bridge(("192.0.2.1", 5005), print)
            await far.start(bind_host="127.0.0.1")
            assert far.server == ("192.0.2.1", 5005) and far.server_ips == {"192.0.2.1"}
            assert far.sock.getsockname()[0] == "127.0.0.1"
            far.close()
            with pytest.raises(OSError):  # an IPv6 server fails at start, not as a monitor that never connects
                await Bridge(("::1", server.port), print).start()

    asyncio.run(go())


def test_the_bridges_socket_never_blocks_and_has_a_large_receive_buffer():
    reference = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    reference.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    asked = reference.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # what the kernel grants for the ask
    reference.close()

    async def go():
        async with bridged() as (bridge, _, _):
            assert bridge.sock.getblocking() is False
            assert bridge.read_now() == 0  # nothing waiting: returns at once
            assert bridge.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == asked

    asyncio.run(go())


def test_a_name_that_resolves_to_nothing_is_an_error_naming_it():
    async def go():
        loop = asyncio.get_running_loop()

        async def nothing(*args: Any, **kwargs: Any) -> list:
            return []

        loop.getaddrinfo = nothing  # type: ignore[method-assign]
        with pytest.raises(OSError, match="^cannot resolve nowhere.example$"):
            await Bridge(("nowhere.example", 5005), print).start()

    asyncio.run(go())


def test_the_bridge_sends_osc_to_the_server_and_never_raises():
    async def go():
        async with bridged() as (bridge, server, _):
            bridge.send("/temperature", [0.5, 2])
            bridge.send("/status")
            bridge.send("/mode", ["generate"])
            await server.until(lambda got: len(got) >= 3)
            assert server.sent() == [("/temperature", [0.5, 2]), ("/status", []), ("/mode", ["generate"])]
            assert {addr for _, _, addr in server.got} == {bridge.sock.getsockname()}
            bridge.send("/learn", ["x" * 70_000])  # too large for a datagram (OSError): dropped
            bridge.send("/reset", [1 << 70])  # no OSC type holds it (BuildError): dropped
            bridge.send("/pause", [1])
            await server.until(lambda got: len(got) >= 4)
            assert server.sent()[3:] == [("/pause", [1])]
            bridge.close()
            bridge.send("/pause", [0])  # closed: nothing, and no error
            assert bridge.sock is None
        unstarted = Bridge(("127.0.0.1", 9), print)
        unstarted.send("/status")  # not started: nothing, and no error
        assert unstarted.read_now() == 0

    asyncio.run(go())


def test_close_releases_the_socket_and_a_second_close_is_harmless():
    async def go():
        async with bridged() as (bridge, _, _):
            sock = bridge.sock
            bridge.close()
            assert bridge.sock is None and sock.fileno() == -1
            bridge.close()
            assert bridge.read_now() == 0

    asyncio.run(go())


def test_read_now_handles_what_is_waiting_up_to_its_limit_in_order():
    async def go():
        async with bridged() as (bridge, server, published):
            me = bridge.sock.getsockname()
            for x in (0.125, 0.25, 0.375):
                server.say(me, encode_message("/prediction", x, 0.5))
            waiting(bridge.sock)
            assert bridge.read_now(most=2) == 2
            assert [m["values"][0] for m in published] == [0.125, 0.25]
            waiting(bridge.sock)
            assert bridge.read_now() == 1
            assert bridge.read_now() == 0
            assert [m["values"][0] for m in published] == [0.125, 0.25, 0.375]
            server.say(me, b"not OSC")  # counted as read, shown as nothing
            waiting(bridge.sock)
            assert bridge.read_now() == 1 and len(published) == 3

    asyncio.run(go())


class Reports:
    """A socket whose reads give these results in turn: a datagram (bytes, addr), or an error to raise."""

    def __init__(self, *results: Any) -> None:
        self.results = list(results)

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result


def test_an_icmp_report_between_datagrams_does_not_end_the_read():
    """Where the OS reports an unreachable port to an unconnected UDP socket (Windows does), the next read goes on."""
    bridge = Bridge(("127.0.0.1", 5005), (published := []).append)
    bridge.server_ips = {"127.0.0.1"}
    server = ("127.0.0.1", 5005)
    bridge.sock = Reports((encode_message("/surprise", 1.0, 0.5), server), ConnectionResetError(),
                          (encode_message("/surprise", 2.0, 0.5), server), BlockingIOError())  # type: ignore[assignment]
    assert bridge.read_now() == 2
    assert [m["nll"] for m in published] == [1.0, 2.0]


class Clock:
    """The bridge's `time` on a virtual clock, and an `asyncio.sleep` that moves it (up to `steps` sleeps)."""

    def __init__(self, now: float = 1000.0, steps: int = 0) -> None:
        self.now = now
        self.steps = steps
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if len(self.slept) == self.steps:
            raise Done
        self.slept.append(seconds)
        self.now += seconds


class Done(Exception):
    """The virtual clock ran its steps."""


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """The bridge module's clock, virtual (its `time.monotonic` only; the event loop keeps its own)."""
    c = Clock()
    monkeypatch.setattr(bridge_module, "time", SimpleNamespace(monotonic=c.monotonic))
    return c


def test_only_what_the_server_sends_is_shown_and_heard(clock):
    bridge = Bridge(("127.0.0.1", 5005), (published := []).append)
    bridge.server_ips = {"127.0.0.1"}
    prediction = encode_message("/prediction", 0.25, 0.75, 2)
    bridge.datagram_received(prediction, ("127.0.0.2", 5005))  # another host
    bridge.datagram_received(prediction, ("127.0.0.1", 5006))  # another port of the server's host
    assert published == [] and not bridge.connected()
    bridge.datagram_received(b"\x00garbage", ("127.0.0.1", 5005))
    bundled = OscBundleBuilder(IMMEDIATELY)
    bundled.add_content(OscMessageBuilder("/prediction").build())
    bridge.datagram_received(bundled.build().dgram, ("127.0.0.1", 5005))
    assert published == [] and not bridge.connected()  # neither is a message from the server
    bridge.datagram_received(encode_message("/hello"), ("127.0.0.1", 5005))  # heard, but nothing to show
    assert published == [] and bridge.connected() and bridge.last_heard == clock.now
    bridge.datagram_received(prediction, ("127.0.0.1", 5005))
    assert published == [{"type": "prediction", "values": [0.25, 0.75], "voice": 2}]


def test_connected_means_heard_from_within_the_last_two_and_a_half_seconds(clock):
    bridge = Bridge(("127.0.0.1", 5005), print)
    bridge.server_ips = {"127.0.0.1"}
    assert not bridge.connected()  # never heard
    bridge.datagram_received(encode_message("/status"), ("127.0.0.1", 5005))
    clock.now += CONNECTED_S - 0.001
    assert bridge.connected()
    clock.now += 0.001
    assert not bridge.connected()


def test_a_pushed_status_is_told_apart_from_a_polls_reply(clock):
    bridge = Bridge(("127.0.0.1", 5005), (published := []).append)
    bridge.server_ips = {"127.0.0.1"}
    status = encode_message("/status", "mode", "accompany")
    bridge.datagram_received(status, ("127.0.0.1", 5005))  # none asked for: the stream pushed it
    assert (bridge.last_push, bridge.polls_outstanding) == (clock.now, 0)
    pushed = clock.now
    clock.now += 1.0
    bridge.polls_outstanding = 2
    bridge.datagram_received(status, ("127.0.0.1", 5005))  # the reply to a poll
    assert (bridge.last_push, bridge.polls_outstanding) == (pushed, 1)
    bridge.datagram_received(status, ("127.0.0.1", 5005))
    assert (bridge.last_push, bridge.polls_outstanding) == (pushed, 0)
    bridge.datagram_received(status, ("127.0.0.1", 5005))  # pushed again
    assert (bridge.last_push, bridge.polls_outstanding) == (clock.now, 0)
    bridge.datagram_received(encode_message("/prediction", 0.5, 0.5), ("127.0.0.1", 5005))
    assert (bridge.last_push, bridge.polls_outstanding) == (clock.now, 0)  # only /status counts
    assert published == [{"type": "status", "values": {"mode": "accompany"}}] * 4 + [
        {"type": "prediction", "values": [0.5, 0.5], "voice": None}]


def test_only_a_refused_subscribe_makes_the_bridge_say_hello_instead():
    bridge = Bridge(("127.0.0.1", 5005), (published := []).append)
    bridge.server_ips = {"127.0.0.1"}
    server = ("127.0.0.1", 5005)
    for other in (("/error",), ("/error", "/temperature", "/subscribe"), ("/status", "/subscribe", "x")):
        bridge.datagram_received(encode_message(*other), server)
        assert bridge.subscribe_refused is False, other
    bridge.datagram_received(encode_message("/error", "/subscribe", "unknown address"), server)
    assert bridge.subscribe_refused is True
    assert published[-1] == {"type": "error", "address": "/subscribe", "reason": "unknown address"}


def test_the_bridge_polls_status_only_while_no_pushed_status_is_fresh(clock, monkeypatch):
    monkeypatch.setattr(bridge_module, "asyncio", SimpleNamespace(sleep=clock.sleep))
    bridge = Bridge(("127.0.0.1", 5005), print)
    polls: list[int] = []  # the outstanding count as each poll goes out
    bridge.send = lambda address, args=None: polls.append((address, args, bridge.polls_outstanding))  # type: ignore

    clock.steps = 12  # no status ever pushed: a poll each period; lost replies are counted afresh past 8
    with pytest.raises(Done):
        asyncio.run(bridge.poll_status())
    assert clock.slept == [POLL_S] * 12
    assert polls == [("/status", None, n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3)]

    polls.clear()
    clock.slept.clear()
    clock.steps = 5
    bridge.polls_outstanding = 0
    bridge.last_push = clock.now  # pushed just now: polled again only once it is over PUSH_STALE_S old
    assert PUSH_STALE_S == 4 * POLL_S  # so the 4th period ends exactly at the edge
    with pytest.raises(Done):
        asyncio.run(bridge.poll_status())
    assert polls == [("/status", None, 1)]  # the 5th period's


def test_the_keepalive_subscribes_to_every_stream_and_says_hello_once_refused(monkeypatch):
    monkeypatch.setattr(bridge_module, "KEEPALIVE_S", 0.05)

    async def go():
        async with bridged() as (bridge, server, published):
            task = asyncio.create_task(bridge.keepalive())
            subscribes = [("/subscribe", [stream]) for stream in STREAMS]
            assert len(STREAMS) == 5
            await server.until(lambda got: len(got) >= len(STREAMS))
            first = server.sent()[:len(STREAMS)]
            assert first == subscribes  # and no /hello: subscribing was not refused
            assert published[0] == {"type": "server", "connected": False, "address": f"127.0.0.1:{server.port}"}
            server.say(bridge.sock.getsockname(), encode_message("/error", "/subscribe", "unknown address"))
            waiting(bridge.sock)
            bridge.read_now()
            await server.until(lambda got: ("/hello", []) in got)
            again = server.sent()
            start = again.index(("/hello", [])) - len(STREAMS)
            assert again[start:start + len(STREAMS) + 1] == [*subscribes, ("/hello", [])]
            await until(lambda: {"type": "server", "connected": True,
                                 "address": f"127.0.0.1:{server.port}"} in published)
            assert not task.done()  # it goes on
            task.cancel()

    asyncio.run(go())


def test_the_bridge_reads_what_came_once_a_frame():
    async def go():
        async with bridged() as (bridge, server, published):
            task = asyncio.create_task(bridge.read())
            server.say(bridge.sock.getsockname(), encode_message("/performer", 0.5, 0.25))
            await until(lambda: published == [{"type": "performer", "values": [0.5, 0.25], "voice": None}])
            server.say(bridge.sock.getsockname(), encode_message("/performer", 0.75, 0.25))
            await until(lambda: len(published) == 2)  # and again: it goes on
            assert not task.done()
            task.cancel()

    asyncio.run(go())


# --------------------------------------------------------------------------- the monitor's models


class Browser:
    """Stands in for a browser's WebSocket: what the monitor offers it."""

    def __init__(self) -> None:
        self.got: list[dict] = []

    def offer(self, text: str) -> None:
        self.got.append(json.loads(text))


def model(folder: Path, name: str) -> None:
    (folder / name).mkdir()
    (folder / name / "model.json").write_text("{}")


def test_the_model_menu_is_the_models_folder_and_follows_it(tmp_path, monkeypatch):
    """The menu: the models in the models folder (it follows the folder) with the shipped ones."""
    shipped = available_models(DEFAULT_MODELS_DIR)
    model(tmp_path, "alpha")
    monitor = Monitor(("127.0.0.1", 9), tmp_path)
    browser = Browser()
    monitor.clients.add(browser)  # type: ignore[arg-type]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:  # a model appears while it waits
        slept.append(seconds)
        if len(slept) == 2:
            raise Done
        model(tmp_path, "beta")

    monkeypatch.setattr(app_module, "asyncio", SimpleNamespace(sleep=sleep))
    with pytest.raises(Done):
        asyncio.run(monitor.refresh_models())
    assert slept == [MODELS_REFRESH_S] * 2
    assert browser.got == [{"type": "models", "names": sorted(["alpha", *shipped])},
                           {"type": "models", "names": sorted(["alpha", "beta", *shipped])}]
    assert json.loads(monitor.latest["models"]) == browser.got[-1]  # what a browser that connects later gets first


# --------------------------------------------------------------------------- a browser's controls, in this process


def controlled(tmp_path: Path, *messages: Any) -> tuple[list[tuple[str, Any]], list[dict[str, Any]], Monitor]:
    """Each message as a browser's WebSocket text reaches the monitor: what it sent the server, what it told the page."""
    monitor = Monitor(("127.0.0.1", 9), tmp_path)
    sent: list[tuple[str, Any]] = []
    monitor.bridge.send = lambda address, args=None: sent.append((address, args))  # type: ignore[method-assign]
    client = app_module.Client(None)  # type: ignore[arg-type]  # the socket is only read by pump
    for message in messages:
        monitor._control(client, json.dumps(message))
    told = []
    while not client.queue.empty():
        told.append(json.loads(client.queue.get_nowait()))
    return sent, told, monitor


@pytest.mark.parametrize("address, args", [("/mode", ["generate"]), ("/pause", [1]), ("/model", ["default"])])
def test_a_control_that_changes_what_plays_asks_for_status_at_once(tmp_path, address, args):
    sent, told, monitor = controlled(tmp_path, {"address": address, "args": args})
    assert told == [] and [a for a, _ in sent] == [address, "/status"]
    assert monitor.bridge.polls_outstanding == 1


def test_a_refused_control_is_reported_under_its_own_address_and_an_unknown_one_under_the_monitors(tmp_path):
    sent, told, _ = controlled(tmp_path, {"address": "/temperature", "args": [-1]}, {"address": "/nope", "args": []})
    assert sent == []
    assert [t["address"] for t in told] == ["/temperature", "monitor"]


def test_a_page_that_cannot_keep_up_loses_messages_and_they_are_counted():
    client = app_module.Client(None)  # type: ignore[arg-type]
    for i in range(app_module.QUEUE_SIZE + 3):
        client.offer(str(i))
    assert client.queue.qsize() == app_module.QUEUE_SIZE and client.dropped == 3


# --------------------------------------------------------------------------- serve, in this process


class Stdout(io.RawIOBase):
    """What reached the bottom of a buffered stdout: a print that is not flushed does not get here."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += bytes(b)
        return len(b)

    def lines(self) -> list[str]:
        return self.data.decode().splitlines()


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Serving(SimpleNamespace):
    """A running `serve`: its task, its Monitor, the fake server it talks to, its stdout and HTTP port."""


@contextlib.asynccontextmanager
async def serving(monkeypatch, host: str, allow_hosts: tuple[str, ...] = (), lines: int = 1) -> AsyncIterator[Serving]:
    """`serve(host, a free port, the fake server, models/)` on this loop, once it has printed `lines` lines."""
    out = Stdout()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(out, 1 << 16), encoding="utf-8"))
    made: list[Monitor] = []

    class Seen(Monitor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(app_module, "Monitor", Seen)
    server = FakeServer()
    port = free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
    task = asyncio.create_task(app_module.serve(host, port, ("127.0.0.1", server.port), MODELS, iter(allow_hosts)))
    try:
        await until(lambda: task.done() or len(out.lines()) >= lines, what=lambda: out.lines())
        if task.done():
            task.result()  # its error
        yield Serving(task=task, monitor=made[0], server=server, port=port, out=out)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        server.close()


@contextlib.contextmanager
def signals_kept() -> Any:
    """SIGINT and SIGTERM as they were after the test; a signal the monitor did not take fails the test, not pytest."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def untaken(sig: int, frame: Any) -> None:
        raise AssertionError(f"signal {sig} reached the test, not the monitor")

    for sig in before:
        signal.signal(sig, untaken)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


async def stopped(s: Serving, sig: int) -> None:
    """Send `sig` to this process: the monitor stops within seconds, without error."""
    os.kill(os.getpid(), sig)
    await asyncio.wait_for(asyncio.shield(s.task), SECONDS)
    assert s.task.result() is None


SAFE = {"Cache-Control": "no-store", "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer"}  # the page (and a refusal for want of the token) is never cached or sniffed


async def fetched(session: aiohttp.ClientSession, url: str, host: str | None = None) -> tuple[int, dict[str, str]]:
    """GET `url` (with this Host): the status and the headers of `SAFE`."""
    async with session.get(url, headers={"Host": host} if host else {}) as r:
        await r.read()
        return r.status, {name: r.headers[name] for name in SAFE if name in r.headers}


async def page(session: aiohttp.ClientSession, url: str, host: str | None = None) -> int:
    return (await fetched(session, url, host))[0]


def test_serve_on_loopback_prints_its_address_serves_the_page_and_the_servers_streams_and_stops_on_sigterm(
        monkeypatch, caplog):
    async def go():
        async with serving(monkeypatch, "127.0.0.1") as s, aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{s.port}/"
            # the ready line reached stdout unflushed by anyone else: a parent reading the pipe sees it at once
            assert s.out.lines() == [f"monitor: {url} (server 127.0.0.1:{s.server.port})"]
            assert await fetched(session, url) == (200, SAFE)  # no token on loopback
            assert await page(session, url, host=f"evil.example:{s.port}") == 403
            await s.server.until(lambda got: all(("/subscribe", [stream]) in got for stream in STREAMS))
            await s.server.until(lambda got: ("/status", []) in got)  # no status pushed: it polls
            ws = await session.ws_connect(url + "ws")
            kinds: dict[str, dict] = {}

            async def next_kind(kind: str) -> dict:
                while kind not in kinds:
                    msg = await asyncio.wait_for(ws.receive(), SECONDS)
                    assert msg.type == aiohttp.WSMsgType.TEXT, msg
                    data = json.loads(msg.data)
                    kinds[data["type"]] = data
                return kinds.pop(kind)

            assert (await next_kind("models"))["names"] == available_models(MODELS) != []
            bridge_port = s.monitor.bridge.sock.getsockname()
            s.server.say(bridge_port, encode_message("/status", "mode", "accompany", "voices", 1))
            assert (await next_kind("status"))["values"] == {"mode": "accompany", "voices": 1}
            s.server.say(bridge_port, encode_message("/prediction", 0.25, 0.5))
            assert await next_kind("prediction") == {"type": "prediction", "values": [0.25, 0.5], "voice": None}
            await stopped(s, signal.SIGTERM)
            closed = await asyncio.wait_for(ws.receive(), SECONDS)  # the browser is told, not left hanging
            assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
            with pytest.raises(aiohttp.ClientConnectionError):
                await page(session, url)  # the port is closed
            assert s.monitor.bridge.sock is None
            assert s.out.lines() == [f"monitor: {url} (server 127.0.0.1:{s.server.port})"]  # nothing else said
            await ws.close()

    with signals_kept(), caplog.at_level(logging.INFO):
        asyncio.run(go())
    assert not [r for r in caplog.records if r.name.startswith("aiohttp.access")]  # no line per request


TOKENED = re.compile(r"monitor: (http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]{43})) \(server 127\.0\.0\.1:(\d+)\)")


async def page_that_stopped_reading(port: int) -> asyncio.StreamWriter:
    """A WebSocket opened by hand that then neither reads nor answers, as a frozen tab or a shut laptop."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SECONDS)
    assert head.startswith(b"HTTP/1.1 101"), head
    writer.transport.pause_reading()
    return writer


def test_pages_that_stopped_reading_do_not_hold_the_stop(monkeypatch):
    """SIGTERM stops the monitor within seconds (~3 CLOSE_S), however many open pages stopped reading.

    Such a page's socket fills, and writing the close frame to it waits for room that never
    comes: the stop hung until the test's monitor process was killed.
    """
    async def go():
        async with serving(monkeypatch, "127.0.0.1") as s:
            pages = [await page_that_stopped_reading(s.port) for _ in range(2)]
            await until(lambda: len(s.monitor.clients) == 2, what=lambda: len(s.monitor.clients))
            chunk = "x" * 60_000

            def all_full() -> bool:  # the kernel's buffers are full and asyncio is holding the rest
                for _ in range(8):
                    s.monitor.publish({"type": "status", "values": {"pad": chunk}})
                return all(c.ws._payload_writer.transport.get_write_buffer_size() > 0 for c in s.monitor.clients)

            await until(all_full, seconds=30, what=lambda: [c.queue.qsize() for c in s.monitor.clients])
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(asyncio.shield(s.task), 2 * SECONDS)  # ~3 s; it hung forever before
            assert s.task.result() is None
            for writer in pages:
                writer.close()

    with signals_kept():
        asyncio.run(go())


def test_serve_on_every_interface_prints_the_tokened_address_and_the_allow_host_advice_and_stops_on_sigint(monkeypatch):
    async def go():
        async with serving(monkeypatch, "0.0.0.0", lines=3) as s, aiohttp.ClientSession() as session:
            first, second, third = s.out.lines()  # all three flushed
            ready = TOKENED.fullmatch(first)
            assert ready and ready[2] == str(s.port) and ready[4] == str(s.server.port), first
            assert second == "monitor: listening beyond loopback, so a browser needs this run's token, in the address above"
            assert third == ("monitor: listening on every interface, but only loopback names are allowed; "
                             "name this machine with --allow-host NAME (or its address) for other devices")
            assert await page(session, ready[1]) == 200  # the printed address opens the page...
            refused = await fetched(session, f"http://127.0.0.1:{s.port}/")  # ...and without its token nothing does
            assert refused == (403, SAFE)
            await stopped(s, signal.SIGINT)

    with signals_kept():
        asyncio.run(go())


def test_serve_beyond_loopback_prints_the_address_for_each_allowed_host(monkeypatch):
    async def go():
        async with serving(monkeypatch, "0.0.0.0", ("studio.local", "192.0.2.2"), lines=2) as s:
            first, second = s.out.lines()  # all of them: serve prints its lines with no await between them
            ready = TOKENED.fullmatch(first)
            assert ready, first
            token = ready[3]
            assert second == ("monitor: listening beyond loopback, so a browser needs this run's token, in the address "
                              f"above; from another device: http://studio.local:{s.port}/?token={token} "
                              f"http://192.0.2.2:{s.port}/?token={token}")
            async with aiohttp.ClientSession() as session:
                assert await page(session, f"http://127.0.0.1:{s.port}/?token={token}", f"studio.local:{s.port}") == 200
            await stopped(s, signal.SIGTERM)

    with signals_kept():
        asyncio.run(go())


def test_serve_on_ipv6_loopback_prints_the_address_in_brackets(monkeypatch):
    async def go():
        async with serving(monkeypatch, "::1") as s:
            url = f"http://[::1]:{s.port}/"
            assert s.out.lines() == [f"monitor: {url} (server 127.0.0.1:{s.server.port})"]
            async with aiohttp.ClientSession() as session:
                assert await page(session, url) == 200
            await stopped(s, signal.SIGTERM)

    with signals_kept():
        asyncio.run(go())


def test_a_page_that_connects_later_gets_the_latest_of_each_state_and_no_past_events(tmp_path):
    """Status, the mixture, the server, the models and the modes are states (the newest of each is kept for
    a page that connects later); a surprise or an error is an event of its moment (not kept)."""
    monitor = Monitor(("127.0.0.1", 9), tmp_path)
    for n in (1, 2):
        for kind in ("status", "mixture", "server", "models", "modes", "surprise", "error"):
            monitor.publish({"type": kind, "n": n})
    assert {kind: json.loads(text) for kind, text in monitor.latest.items()} == {
        kind: {"type": kind, "n": 2} for kind in ("status", "mixture", "server", "models", "modes")}


def test_text_that_is_not_json_is_refused_saying_what_a_control_is(tmp_path):
    monitor = Monitor(("127.0.0.1", 9), tmp_path)
    sent: list = []
    monitor.bridge.send = lambda address, args=None: sent.append((address, args))  # type: ignore[method-assign]
    client = app_module.Client(None)  # type: ignore[arg-type]
    monitor._control(client, "{address: /temperature}")
    told = json.loads(client.queue.get_nowait())
    assert told == {"type": "error", "address": "monitor", "reason": "a control is a JSON object"} and sent == []
