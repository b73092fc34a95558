"""The numbers the README promises for the OSC and MIDI transports, each tested at its edge.

Every figure here is the README's own, written out as a literal, never imported from
the code: a changed constant (or a changed rule) fails a test. Rates are judged on an
injected clock or on arrival times the test hands over, never on the wall clock, so
nothing here depends on how busy the machine is. The one real server (the pushed
`/status`) is measured on the server's own clock (`uptime_s`), not on when datagrams
reach the test.
"""

from __future__ import annotations

import argparse
import struct
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from pythonosc.osc_message import OscMessage

from server.config import ConfigError, RunConfig, add_run_arguments, resolve_run_config
from server.midi import link as midilink
from server.midi import mapping as midimap
from server.osc import output as osc_output
from server.osc import protocol as osc_proto
from server.osc import refusals as osc_refusals
from server.osc.ratelimit import TokenBuckets
from server.osc.streams import StreamsFull, Subscriptions
from server.osc.wire import encode_message
from tests.live import OscPeer, start_server
from tests.oscfakes import FakeControls, StubTransport

SENDER = ("127.0.0.1", 9000)
OTHER = ("127.0.0.1", 9001)


# --------------------------------------------------------------------------- helpers


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def protocol_on(monkeypatch: pytest.MonkeyPatch | None = None, clock: Clock | None = None,
                controls: FakeControls | None = None, **kwargs: Any
                ) -> tuple[osc_proto.OscServerProtocol, FakeControls, StubTransport]:
    """The OSC protocol over a fake engine and socket; with `clock`, every per-sender rate limit runs on it."""
    if clock is not None:
        assert monkeypatch is not None
        # Every token bucket made without a clock of its own (the per-address limits, the /error budget),
        # wherever in the transport it is made, reads this one. A subclass rather than a patched default:
        # under `make mutants` the constructor is mutmut's trampoline, which has no keyword defaults.
        class OnTheClock(TokenBuckets):
            def __init__(self, *args: Any, **kw: Any) -> None:
                kw.setdefault("clock", clock)
                super().__init__(*args, **kw)

        for module in (osc_proto, osc_refusals):
            monkeypatch.setattr(module, "TokenBuckets", OnTheClock)
    controls = controls or FakeControls()
    sock = StubTransport()
    output = osc_output.OscOutput()
    output.attach(sock)  # type: ignore[arg-type]
    return osc_proto.OscServerProtocol(controls, output, **kwargs), controls, sock


def arrived(address: str, *args: Any, sender: tuple[str, int] = SENDER, at: float = 0.0) -> tuple[bytes, Any, float]:
    """One datagram as the transport hands it over: (data, sender, arrival time)."""
    return encode_message(address, *args), sender, at


def gestures(n: int, sender: tuple[str, int] = SENDER, offset: int = 0) -> list[tuple[bytes, Any, float]]:
    """n /gesture datagrams from one sender, x = i/1024 (exact in float32), arriving 1 ms apart."""
    return [arrived("/gesture", (i + offset) / 1024, 0.5, sender=sender, at=(i + offset) / 1000) for i in range(n)]


def replies(sock: StubTransport, address: str, to: tuple[str, int] | None = None) -> list[list[Any]]:
    """The arguments of every `address` message the server sent (to `to`, if given)."""
    head = address.encode() + b"\0"
    return [OscMessage(data).params for data, addr in sock.sent if data.startswith(head) and (to is None or addr == to)]


def bundle(elements: list[bytes]) -> bytes:
    return b"#bundle\0" + bytes(7) + b"\1" + b"".join(struct.pack(">i", len(e)) + e for e in elements)


def resolve(*argv: str) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return resolve_run_config(parser.parse_args(list(argv)))


# --------------------------------------------------------------------------- floods: 32 positions a batch, per voice


def test_32_positions_in_one_batch_are_all_applied_in_order() -> None:
    """README: "a batch with more than 32 positions is 'behind'" -- so 32 are not."""
    protocol, controls, _ = protocol_on()
    protocol.datagrams_received(gestures(32))
    assert controls.calls == [("perform", i / 1024, 0.5) for i in range(32)]
    assert protocol.stats.coalesced == 0


def test_33_positions_in_one_batch_collapse_to_the_newest() -> None:
    protocol, controls, _ = protocol_on()
    protocol.datagrams_received(gestures(33))
    assert controls.calls == [("perform", 32 / 1024, 0.5)]
    assert controls.times == [0.032]  # the kept one keeps its own arrival time
    assert protocol.stats.coalesced == 32 and protocol.stats.handled == 33


def test_33_positions_from_two_senders_are_behind_and_each_sender_keeps_its_newest() -> None:
    """The count is of the batch, not of one sender: 20 + 13 positions are more than 32."""
    protocol, controls, _ = protocol_on()
    protocol.datagrams_received(gestures(20) + gestures(13, sender=OTHER, offset=100))
    assert controls.calls == [("perform", 19 / 1024, 0.5), ("perform", 112 / 1024, 0.5)]
    assert controls.routes == [SENDER, OTHER]


def test_a_flood_keeps_the_newest_position_of_each_voice_of_a_sender() -> None:
    """Flood coalescing is per (sender, voice): a sender playing two voices loses neither.

    Interleaved `/gesture x y 0` and `/gesture x y 1` from one sender, 40 in one batch
    (more than 32): the last position of voice 0 and the last of voice 1 both reach the
    engine, each with its voice and its own arrival time, in arrival order.
    """
    protocol, controls, _ = protocol_on()
    batch = [arrived("/gesture", i / 1024, 0.25 + 0.5 * (i % 2), i % 2, at=i / 1000) for i in range(40)]
    batch += [arrived("/gesture", 0.75, 0.75, sender=OTHER, at=0.040)]  # another sender, no voice argument
    protocol.datagrams_received(batch)
    assert controls.calls == [
        ("perform", 38 / 1024, 0.25, 0),  # voice 0's newest
        ("perform", 39 / 1024, 0.75, 1),  # voice 1's newest
        ("perform", 0.75, 0.75),  # the other sender's only one
    ]
    assert controls.times == [0.038, 0.039, 0.040]
    assert protocol.stats.coalesced == 38 and protocol.stats.handled == 41


def test_a_flood_with_and_without_a_voice_argument_keeps_both() -> None:
    """A sender's own voice (no argument) and a numbered voice are two voices: each keeps its newest."""
    protocol, controls, _ = protocol_on()
    batch = [arrived("/gesture", i / 1024, 0.5, *((3,) if i % 2 else ()), at=i / 1000) for i in range(34)]
    protocol.datagrams_received(batch)
    assert controls.calls == [("perform", 32 / 1024, 0.5), ("perform", 33 / 1024, 0.5, 3)]


# --------------------------------------------------------------------------- bundles: at most 64 messages


def test_a_bundle_of_64_messages_is_applied_whole() -> None:
    protocol, controls, sock = protocol_on()
    protocol.datagram_received(bundle([encode_message("/temperature", i / 1024) for i in range(64)]), SENDER)
    assert controls.calls == [("set_temperature", i / 1024) for i in range(64)]
    assert replies(sock, "/error") == [] and protocol.stats.bundles_capped == 0


def test_the_65th_message_of_a_bundle_is_refused_with_one_error() -> None:
    protocol, controls, sock = protocol_on()
    protocol.datagram_received(bundle([encode_message("/temperature", i / 1024) for i in range(65)]), SENDER)
    assert controls.calls == [("set_temperature", i / 1024) for i in range(64)]
    [(address, reason)] = replies(sock, "/error", SENDER)
    assert address == "#bundle" and "at most 64" in reason
    assert protocol.stats.bundles_capped == 1


def test_the_bundle_cap_counts_nested_messages_too() -> None:
    """README: "Bundles (nested too, at most 64 messages)": 40 inside a nested bundle plus 25 is 65."""
    protocol, controls, sock = protocol_on()
    inner = bundle([encode_message("/temperature", i / 1024) for i in range(40)])
    packet = bundle([inner] + [encode_message("/temperature", (40 + i) / 1024) for i in range(25)])
    protocol.datagram_received(packet, SENDER)
    assert controls.calls == [("set_temperature", i / 1024) for i in range(64)]
    assert protocol.stats.bundles_capped == 1 and len(replies(sock, "/error")) == 1


# --------------------------------------------------------------------------- one wake-up works at most 2 ms


class FakeLoop:
    """Enough of a loop for the protocol's work slicing: a clock and a list of continuations."""

    def __init__(self) -> None:
        self.later: list[Callable[[], None]] = []

    def time(self) -> float:
        return 0.0

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        self.later.append(callback)


def test_one_wake_up_works_at_most_2_ms_then_lets_due_timers_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each control costs 0.3 ms of (fake) CPU: the 7th ends past 2 ms, so the slice stops there.

    The rest waits for the loop's next turn (`osc_deferred`), and nothing is lost or
    reordered.
    """
    work = Clock(0.0)
    monkeypatch.setattr(osc_proto, "time", SimpleNamespace(perf_counter=work, monotonic=time.monotonic))

    class Costly(FakeControls):
        def set_temperature(self, value: float, voice: int | None = None, route: object = None) -> None:
            work.now += 0.0003
            super().set_temperature(value, voice, route)

    loop = FakeLoop()
    protocol, controls, _ = protocol_on(controls=Costly(), loop=loop)  # type: ignore[arg-type]
    protocol.datagrams_received([arrived("/temperature", i / 1024) for i in range(10)])
    assert len(controls.calls) == 7  # 6 x 0.3 ms = 1.8 ms: one more; 7 x 0.3 = 2.1 ms: out of budget
    assert protocol.stats.deferred == 1 and len(loop.later) == 1
    loop.later.pop()()
    assert controls.calls == [("set_temperature", i / 1024) for i in range(10)]
    assert protocol.stats.deferred == 1 and not loop.later


# --------------------------------------------------------------------------- per-sender rate limits

# README: "Per sender, `/model` and `/hello` are limited to 5 per second, `/status` to 50,
# `/learn` to 1". `/subscribe` and `/unsubscribe` (10) are the code's, not stated in the README.
RATES = [
    ("/model", ("default",), 5),
    ("/hello", (), 5),
    ("/status", (), 50),
    ("/learn", (30.0,), 1),
    ("/subscribe", ("status",), 10),
    ("/unsubscribe", ("status",), 10),
]


@pytest.mark.parametrize(("address", "args", "rate"), RATES, ids=[r[0] for r in RATES])
def test_per_sender_rate_limits_at_their_edge(monkeypatch: pytest.MonkeyPatch, address: str, args: tuple,
                                              rate: int) -> None:
    """`rate` at once (the burst), then one more every 1/rate s; a second sender has its own budget."""
    clock = Clock(100.0)
    protocol, _, sock = protocol_on(monkeypatch, clock)

    def send(n: int, sender: tuple[str, int] = SENDER) -> int:
        """Send n at the clock's time; how many were refused for their rate."""
        before = protocol.stats.rate_limited
        protocol.datagrams_received([arrived(address, *args, sender=sender)] * n)
        return protocol.stats.rate_limited - before

    assert send(rate) == 0  # the whole burst
    assert send(1) == 1  # one more at once is too many
    [(where, reason)] = replies(sock, "/error", SENDER)
    assert where == address and reason == f"too many requests: at most {rate} per second"
    assert send(1, OTHER) == 0  # another sender is not held by this one
    clock.now += 0.9 / rate
    assert send(1) == 1  # not yet a whole token back
    clock.now += 0.2 / rate
    assert send(1) == 0 and send(1) == 1  # 1/rate s later: exactly one more
    clock.now += 3600.0  # a long rest refills the burst, and no more than the burst
    assert send(rate) == 0 and send(1) == 1


def test_error_replies_are_limited_to_10_a_second_per_sender(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(100.0)
    protocol, _, sock = protocol_on(monkeypatch, clock)
    protocol.datagrams_received([arrived("/nope")] * 11)
    assert len(replies(sock, "/error", SENDER)) == 10
    assert protocol.stats.rejected == 11 and protocol.stats.errors_suppressed == 1
    protocol.datagrams_received([arrived("/nope", sender=OTHER)])
    assert len(replies(sock, "/error", OTHER)) == 1  # its own budget
    clock.now += 0.09
    protocol.datagrams_received([arrived("/nope")])
    assert len(replies(sock, "/error", SENDER)) == 10
    clock.now += 0.02
    protocol.datagrams_received([arrived("/nope")] * 2)
    assert len(replies(sock, "/error", SENDER)) == 11  # 0.1 s: one more reply, not two
    clock.now += 3600.0
    protocol.datagrams_received([arrived("/nope")] * 11)
    assert len(replies(sock, "/error", SENDER)) == 21  # the burst is back, and it is 10


# --------------------------------------------------------------------------- destinations: 32, protected for 10 s


def test_the_destination_list_holds_32() -> None:
    output = osc_output.OscOutput()
    output.set_destinations([("127.0.0.1", 1 + i) for i in range(32)])
    assert len(output.destinations) == 32
    with pytest.raises(ValueError, match="at most 32"):
        output.set_destinations([("127.0.0.1", 1 + i) for i in range(33)])


def test_send_takes_up_to_32_destinations() -> None:
    """README: `--send HOST:PORT (repeatable) ... (up to 32)`."""
    ok = [arg for port in range(1, 33) for arg in ("--send", f"127.0.0.1:{port}")]
    assert len(resolve(*ok).send) == 32
    with pytest.raises(ConfigError, match="at most 32"):
        resolve(*ok, "--send", "127.0.0.1:33")


def test_hello_fills_32_places_and_a_client_heard_within_10_s_is_never_evicted(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: "nor a /hello client that has sent anything in the last 10 s; when the list (32) is full,
    the longest-quiet one goes"."""
    protocol, _, sock = protocol_on(monkeypatch, Clock())
    clients = [("127.0.0.1", 2000 + i) for i in range(32)]
    protocol.datagrams_received([arrived("/hello", sender=c, at=0.0) for c in clients])
    assert protocol.output.destinations == tuple(clients)
    newcomer = ("127.0.0.1", 3000)
    protocol.datagrams_received([arrived("/hello", sender=newcomer, at=9.9)])
    [(address, reason)] = replies(sock, "/error", newcomer)
    assert address == "/hello" and "destination list is full (32)" in reason
    assert newcomer not in protocol.output.destinations
    protocol.datagrams_received([arrived("/gesture", 0.5, 0.5, sender=clients[0], at=5.0)])  # plays on
    protocol.datagrams_received([arrived("/hello", sender=newcomer, at=10.1)])
    destinations = protocol.output.destinations
    assert newcomer in destinations and clients[1] not in destinations  # quiet for 10.1 s: the one to go
    assert clients[0] in destinations and len(destinations) == 32
    assert protocol.stats.destinations_evicted == 1


# --------------------------------------------------------------------------- streams: 30 a second, burst 30


def test_each_stream_sends_at_most_30_a_second_per_destination_after_a_burst_of_30() -> None:
    clock = Clock(100.0)
    sock = StubTransport()
    output = osc_output.OscOutput()
    output.attach(sock)  # type: ignore[arg-type]
    streams = Subscriptions(output, ("mixture", "surprise"), clock=clock)
    a, b = ("127.0.0.1", 7001), ("127.0.0.1", 7002)
    streams.add("mixture", a)
    streams.add("mixture", b)
    streams.add("surprise", a)

    def sent(to: tuple[str, int], address: str = "/mixture") -> int:
        return len(replies(sock, address, to))

    for i in range(31):
        streams.send("mixture", "/mixture", float(i))
    assert sent(a) == 30 and sent(b) == 30  # each destination its own burst of 30
    streams.send("surprise", "/surprise", 1.0, 1.0)
    assert sent(a, "/surprise") == 1  # and each stream its own
    clock.now += 0.9 / 30
    streams.send("mixture", "/mixture", 0.0)
    assert sent(a) == 30
    clock.now += 0.2 / 30
    streams.send("mixture", "/mixture", 0.0)
    streams.send("mixture", "/mixture", 0.0)
    assert sent(a) == 31  # 1/30 s later: one more
    clock.now += 10.0
    for _ in range(40):
        streams.send("mixture", "/mixture", 0.0)
    assert sent(a) == 61  # a long rest gives back a burst of 30, not more


def test_a_stream_holds_32_subscribers_and_the_idlest_makes_room_for_a_newcomer(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: a stream holds 32 subscribers; a full one makes room for a sender with none there by dropping
    the idlest (counted), and refuses a sender that already has one there."""
    protocol, _, sock = protocol_on(monkeypatch, Clock())
    subscribers = [("127.0.0.1", 4000 + i) for i in range(33)]
    protocol.datagrams_received([arrived("/subscribe", "surprise", sender=s, at=float(i))
                                 for i, s in enumerate(subscribers[:32])])
    protocol.datagrams_received([arrived("/gesture", 0.5, 0.5, sender=subscribers[0], at=40.0)])  # still there
    protocol.datagrams_received([arrived("/subscribe", "surprise", sender=subscribers[32], at=41.0)])
    streams = protocol.output.streams
    assert len(streams.subscribers("surprise")) == 32
    assert subscribers[32] in streams.subscribers("surprise") and subscribers[1] not in streams.subscribers("surprise")
    assert subscribers[0] in streams.subscribers("surprise")  # heard at 40: not the idlest
    assert protocol.stats.subscribers_evicted == 1 and replies(sock, "/error") == []
    protocol.datagrams_received([arrived("/subscribe", "surprise", 5000, sender=subscribers[32], at=42.0)])
    [(address, reason)] = replies(sock, "/error", subscribers[32])  # it has one there: no second eviction
    assert address == "/subscribe" and "32 subscribers" in reason
    assert protocol.stats.subscribers_evicted == 1
    protocol.datagrams_received([arrived("/subscribe", "mixture", sender=subscribers[-1])])
    assert streams.subscribers("mixture") == (subscribers[-1],)  # another stream has room
    with pytest.raises(StreamsFull):
        streams.add("surprise", ("127.0.0.1", 5000), subscribers[32])


def test_status_is_pushed_4_times_a_second_on_the_loops_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """13 pushes in 3 s (at 0, 0.25, ... 3.0): 3 Hz would be 10, 5 Hz 16; none after `/unsubscribe`."""
    from tests.rig import VirtualLoop

    loop = VirtualLoop(start=0.0)
    protocol, controls, sock = protocol_on(monkeypatch, Clock(), loop=loop)
    osc_proto.push_status(loop, controls, protocol)  # what start_osc wires (adapt here if that moves)
    protocol.datagrams_received([arrived("/subscribe", "status")])
    loop.advance(3.0)
    pushed = replies(sock, "/status", SENDER)
    assert len(pushed) == 13
    assert dict(zip(pushed[-1][::2], pushed[-1][1::2]))["model"] == "default"
    protocol.datagrams_received([arrived("/unsubscribe", "status")])
    loop.advance(2.0)
    assert len(replies(sock, "/status", SENDER)) == 13


def test_status_is_pushed_4_times_a_second(tmp_path) -> None:
    """Measured on the server's clock: the `uptime_s` of consecutive pushes, not when they reach the test.

    Pushes run on an absolute schedule, so a late wake-up does not move the next one;
    `uptime_s` is rounded to 0.1 s, which over 12 intervals is under 0.01 s of a period.
    """
    peer = OscPeer()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{peer.port}")
    peer.target = ("127.0.0.1", srv.port)
    try:
        peer.send("/subscribe", "status")
        pushed: list[float] = []
        deadline = time.monotonic() + 15.0
        while len(pushed) < 13 and time.monotonic() < deadline:
            for _, _, args in peer.receive(deadline - time.monotonic(), "/status", count=1):
                pushed.append(float(dict(zip(args[::2], args[1::2]))["uptime_s"]))
        assert len(pushed) == 13, pushed
        period = (pushed[-1] - pushed[0]) / 12
        assert 0.235 <= period <= 0.29, pushed  # 4 Hz; 3 Hz would be 0.33, 5 Hz 0.2
    finally:
        assert srv.stop() == 0
        peer.close()


# --------------------------------------------------------------------------- ports and argument ranges


@pytest.mark.parametrize("address", ["/hello", "/subscribe"])
def test_a_reply_port_is_0_to_65535(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    """0 (or none) means the sender's own port; 1-65535 that port; anything else is refused."""
    protocol, _, sock = protocol_on(monkeypatch, Clock())
    lead = ("status",) if address == "/subscribe" else ()
    for port in (65535, 0, 65536, -1):
        protocol.datagrams_received([arrived(address, *lead, port)])
    errors = replies(sock, "/error", SENDER)
    assert [a for a, _ in errors] == [address, address]
    assert all("port must be 1-65535" in reason for _, reason in errors)
    if address == "/hello":
        targets = protocol.output.destinations
    else:
        targets = protocol.output.streams.subscribers("status")
    assert targets == (("127.0.0.1", 65535), SENDER)


def test_run_ports_are_0_to_65535_and_send_ports_1_to_65535() -> None:
    assert resolve("--port", "0").port == 0 and resolve("--port", "65535").port == 65535
    assert resolve("--monitor-port", "0").monitor_port == 0 and resolve("--monitor-port", "65535").monitor_port == 65535
    assert resolve("--send", "h:1").send == (("h", 1),) and resolve("--send", "h:65535").send == (("h", 65535),)
    for argv in (("--port", "65536"), ("--port", "-1"), ("--monitor-port", "65536"), ("--send", "h:0"),
                 ("--send", "h:65536")):
        with pytest.raises(ConfigError, match="port must be"):
            resolve(*argv)


def test_default_ports_are_5710_5711_and_5712() -> None:
    config = resolve()
    assert (config.port, config.send, config.monitor_port) == (5710, (("127.0.0.1", 5711),), 5712)


def test_note_pitch_and_velocity_are_0_to_127_and_velocity_0_is_no_event() -> None:
    protocol, controls, sock = protocol_on()
    for pitch, velocity in ((0, 1), (127, 127), (128, 64), (64, 128), (-1, 64), (60, 0)):
        protocol.datagrams_received([arrived("/note", pitch, velocity)])
    assert controls.calls == [("perform", 0.0, 1 / 127), ("perform", 1.0, 1.0)]
    assert len(replies(sock, "/error")) == 3 and protocol.stats.ignored == 1


def test_learn_asks_for_60_seconds_unless_told_and_more_than_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: "for at most the seconds asked (`/learn 60` by default)"."""
    clock = Clock()
    protocol, controls, sock = protocol_on(monkeypatch, clock)
    for args in ((), (0.0,), (-1.0,), (0.5,)):
        clock.now += 2.0  # /learn is limited to one a second per sender
        protocol.datagrams_received([arrived("/learn", *args)])
    assert controls.calls == [("learn", 60.0), ("learn", 0.5)]
    assert [address for address, _ in replies(sock, "/error")] == ["/learn", "/learn"]


def test_lookahead_and_voice_settings_at_their_edges() -> None:
    """README: lookahead 0-2 s; `max_voices` (16 by default) 1-128; `voice_timeout` 60 s by default, > 0."""
    config = resolve()
    assert (config.max_voices, config.voice_timeout, config.lookahead) == (16, 60.0, 0.0)
    assert resolve("--lookahead", "2").lookahead == 2.0 and resolve("--max-voices", "128").max_voices == 128
    assert resolve("--max-voices", "1").max_voices == 1
    for argv in (("--lookahead", "2.001"), ("--lookahead", "-0.001"), ("--max-voices", "129"),
                 ("--max-voices", "0"), ("--voice-timeout", "0")):
        with pytest.raises(ConfigError):
            resolve(*argv)


# --------------------------------------------------------------------------- MIDI


def test_midi_echo_window_is_20_ms() -> None:
    guard = midilink.EchoGuard()
    guard.sent(0, 60, 100, at=10.0)
    assert guard.is_echo(0, 60, 100, 10.019)
    assert not guard.is_echo(0, 60, 100, 10.021)


def test_midi_auto_note_length_is_the_predicted_dt_between_10_ms_and_half_a_second() -> None:
    assert midimap.note_duration(None) == 0.5
    assert midimap.note_duration(0.49) == pytest.approx(0.49) and midimap.note_duration(0.51) == 0.5
    assert midimap.note_duration(0.011) == pytest.approx(0.011) and midimap.note_duration(0.009) == 0.01
    assert midimap.note_duration(0.0) == 0.01


def test_midi_notes_map_x_and_y_to_0_127_and_velocity_is_at_least_1() -> None:
    assert midimap.note_for(0.0, 0.0) == (0, 1) and midimap.note_for(1.0, 1.0) == (127, 127)
    assert midimap.note_for(60 / 127, 1 / 127) == (60, 1)


def test_midi_voice_n_plays_on_channel_n_plus_1_and_voices_from_16_share_again() -> None:
    out = midilink.MidiOutput(None, None, channel=4)  # type: ignore[arg-type]
    assert out.channel_for(None) == 4  # no voice: midi_channel (here 5, 0-based 4)
    assert [out.channel_for(v) for v in (0, 1, 15, 16, 17)] == [0, 1, 15, 0, 1]


def test_a_missing_midi_port_is_looked_for_every_2_s() -> None:
    delays: list[float] = []
    loop = SimpleNamespace(call_later=lambda delay, callback: delays.append(delay) or SimpleNamespace(cancel=lambda: None))
    port = midilink.KeptPort(loop, "output", "Synth", lambda name: SimpleNamespace(name=name, close=lambda: None),
                             lambda: ["Synth"])  # type: ignore[arg-type]
    port.open()
    assert delays == [2.0]
    port.close()


def test_midi_settings_at_their_edges() -> None:
    """Channels 1-16 (input: 0 = any), controllers 0-127, CC 1 and 2 by default."""
    config = resolve()
    assert (config.midi_channel, config.midi_input_channel, config.midi_cc_x, config.midi_cc_y) == (1, 0, 1, 2)
    ok = resolve("--midi-channel", "16", "--midi-input-channel", "16", "--midi-cc-x", "127", "--midi-cc-y", "0")
    assert (ok.midi_channel, ok.midi_input_channel, ok.midi_cc_x, ok.midi_cc_y) == (16, 16, 127, 0)
    for argv in (("--midi-channel", "17"), ("--midi-channel", "0"), ("--midi-input-channel", "17"),
                 ("--midi-input-channel", "-1"), ("--midi-cc-x", "128"), ("--midi-cc-y", "-1")):
        with pytest.raises(ConfigError):
            resolve(*argv)
