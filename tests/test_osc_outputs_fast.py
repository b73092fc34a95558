"""The OSC sending side in this process, byte for byte: broadcasts, `/unsubscribe prediction`, where a voice's
answers go, the `/mixture` and `/surprise` streams, closed ports, and the transport's small questions.

Everything here runs against `tests.oscfakes.StubTransport` (what would go on the wire,
and to whom) or a socket on loopback owned by this process, so it runs under
`-p tests.fast` and a mutant of these functions meets it.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from pythonosc.osc_message import OscMessage

from server.osc.consent import PROBE_BYTES
from server.osc.namespace import OUTPUTS, STREAMS
from server.osc.output import OscOutput
from server.osc.protocol import OscServerProtocol
from server.osc.sink import OscSink
from server.osc.streams import Subscriptions
from server.osc.udp import BatchDatagramTransport
from server.event import Event
from server.osc.wire import (NTP_EPOCH_OFFSET, encode_bundle, encode_message, encode_prediction, ntp_timetag,
                             timetag_seconds)
from tests.oscfakes import FakeControls, StubTransport
from tests.rig import VirtualLoop

SEND = ("127.0.0.1", 9000)  # a --send destination
SELF = ("127.0.0.1", 9001)  # said a bare /hello: its own destination, proven
NAMED = ("127.0.0.1", 9002)  # named by SPONSOR's `/hello 9002`: unproven, paid for by SPONSOR
SPONSOR = ("127.0.0.1", 7000)
OTHER = ("127.0.0.1", 7001)


def decoded(data: bytes) -> tuple[Any, ...]:
    message = OscMessage(data)
    return (message.address, *message.params)


def output_with_three(max_destinations: int = 32) -> tuple[OscOutput, StubTransport]:
    output = OscOutput([SEND], max_destinations=max_destinations)
    transport = StubTransport()
    output.attach(transport)  # type: ignore[arg-type]
    assert output.add_destination(SELF, now=1.0)
    assert output.add_destination(NAMED, sender=SPONSOR, now=2.0)
    return output, transport


# --------------------------------------------------------------------------- broadcast


def test_a_broadcast_goes_once_to_every_destination_configured_first() -> None:
    output, transport = output_with_three()
    output.broadcast("/learn/done", "cand", -10.5, 2.25, 1)
    data = encode_message("/learn/done", "cand", -10.5, 2.25, 1)
    assert transport.sent == [(data, SEND), (data, SELF), (data, NAMED)]
    assert decoded(data) == ("/learn/done", "cand", -10.5, 2.25, 1)
    assert output.stats.sent == 3 and output.stats.unproven_withheld == 0
    assert output.consent.credit(SPONSOR) == PROBE_BYTES - len(data)  # the named port's share was paid for


def test_a_broadcast_to_a_port_nobody_pays_for_is_withheld_and_counted() -> None:
    output, transport = output_with_three()
    big = "x" * (PROBE_BYTES + 8)  # more than the sponsor's first credit
    output.broadcast("/error", "/learn", big)
    data = encode_message("/error", "/learn", big)
    assert transport.sent == [(data, SEND), (data, SELF)]
    assert output.stats.unproven_withheld == 1 and output.stats.sent == 2


def test_a_broadcast_without_arguments_or_destinations() -> None:
    output = OscOutput()
    transport = StubTransport()
    output.attach(transport)  # type: ignore[arg-type]
    output.broadcast("/learn/done")
    assert transport.sent == [] and output.stats.sent == 0
    output.set_destinations([SEND])
    output.broadcast("/learn/progress")
    assert transport.sent == [(encode_message("/learn/progress"), SEND)]


# --------------------------------------------------------------------------- /unsubscribe prediction


def test_a_destinations_own_word_removes_it_whoever_asked() -> None:
    output, transport = output_with_three()
    assert output.remove_destination(["127.0.0.1", "9002"]) is True  # type: ignore[arg-type]  # as decoded
    assert output.destinations == (SEND, SELF)
    assert output.consent.credit(SPONSOR) is None  # nothing left for the sponsor to pay for
    output.broadcast("/learn/progress", 0.5, 1.0)
    assert [to for _, to in transport.sent] == [SEND, SELF]
    assert output.remove_destination(NAMED) is False  # nothing left to stop
    assert output.remove_destination(SELF, sender=None) is True
    assert output.destinations == (SEND,)


def test_a_sender_withdraws_only_its_own_request() -> None:
    output, _ = output_with_three()
    assert output.remove_destination(NAMED, sender=OTHER) is False  # it never asked
    assert output.remove_destination(SELF, sender=SPONSOR) is False  # SELF's own
    assert output.destinations == (SEND, SELF, NAMED)
    assert output.add_destination(NAMED, sender=OTHER, now=3.0) is False  # a second requester
    assert output.remove_destination(NAMED, sender=SPONSOR) is True  # withdrawn; OTHER still asks for it
    assert output.destinations == (SEND, SELF, NAMED)
    assert output.remove_destination(("127.0.0.1", 9002), sender=OTHER) is True  # the last requester: it goes
    assert output.destinations == (SEND, SELF)


def test_a_configured_destination_stays() -> None:
    output, _ = output_with_three()
    assert output.remove_destination(SEND) is False
    assert output.remove_destination(SEND, sender=SPONSOR) is False
    assert output.destinations == (SEND, SELF, NAMED)


def test_a_removed_destination_makes_room() -> None:
    output, _ = output_with_three(max_destinations=3)
    assert output.remove_destination(SELF)
    assert output.add_destination(("127.0.0.1", 9003), now=100.0)  # room without evicting anyone
    assert output.stats.destinations_evicted == 0
    assert output.destinations == (SEND, NAMED, ("127.0.0.1", 9003))


# --------------------------------------------------------------------------- a voice's answers


def test_a_voice_answers_at_the_port_its_performer_said_hello_for() -> None:
    output, transport = output_with_three()
    assert output.reply_to(SPONSOR) == NAMED
    assert output.reply_to(SELF) == SELF
    assert output.reply_to(OTHER) == OTHER  # no /hello: its own address
    output.send_prediction((0.25, 0.75), voice=2, route=SPONSOR)
    data = encode_prediction((0.25, 0.75), 2)
    assert transport.sent == [(data, SEND), (data, NAMED)]
    transport.sent.clear()
    output.send_prediction((0.25, 0.75), voice=3, route=OTHER)
    assert transport.sent == [(encode_prediction((0.25, 0.75), 3), SEND), (encode_prediction((0.25, 0.75), 3), OTHER)]


# --------------------------------------------------------------------------- the streams


def subscribed(*streams: str) -> tuple[OscSink, StubTransport, OscOutput]:
    output = OscOutput()
    transport = StubTransport()
    output.attach(transport)  # type: ignore[arg-type]
    sink = OscSink(VirtualLoop(), output)  # type: ignore[arg-type]
    for stream in streams:
        assert output.streams.add(stream, SELF, now=0.0)
    return sink, transport, output


MIXTURE = [2.0, 0.25, 0.75,  # K, then the weights
           0.125, 0.5, 0.5, -1.5, 0.25, 0.0625,  # component 1: dt_median x_mean y_mean dt_log_sigma x_sigma y_sigma
           0.375, 0.25, 0.75, -2.0, 0.5, 0.125]  # component 2


def test_the_mixture_message_is_k_then_weights_then_six_figures_a_component() -> None:
    sink, transport, _ = subscribed("mixture")
    assert "`K w_1 .. w_K`, then for each component `dt_median x_mean y_mean dt_log_sigma x_sigma y_sigma`" \
        in OUTPUTS["/mixture"]
    sink.mixture(list(MIXTURE), None)
    (data, to), = transport.sent
    assert to == SELF
    assert data == encode_message("/mixture", 2, *MIXTURE[1:])  # K an int32, the rest float32
    assert decoded(data) == ("/mixture", 2, *MIXTURE[1:])
    assert OscMessage(data).params[0].__class__ is int


def test_the_mixture_message_of_a_voice_ends_with_its_number() -> None:
    sink, transport, _ = subscribed("mixture")
    sink.mixture(list(MIXTURE), 3)
    sink.mixture([1.0, 1.0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0], 0)
    assert [decoded(data) for data, _ in transport.sent] == [("/mixture", 2, *MIXTURE[1:], 3),
                                                            ("/mixture", 1, 1.0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0)]
    assert transport.sent[0][0] == encode_message("/mixture", 2, *MIXTURE[1:], 3)


def test_the_surprise_message_is_nll_smoothed_then_the_voice() -> None:
    sink, transport, _ = subscribed("surprise")
    sink.surprise(2.5, -0.75, None)
    sink.surprise(-1.25, 4.0, 5)
    assert [decoded(data) for data, _ in transport.sent] == [("/surprise", 2.5, -0.75), ("/surprise", -1.25, 4.0, 5)]
    assert [data for data, _ in transport.sent] == [encode_message("/surprise", 2.5, -0.75),
                                                   encode_message("/surprise", -1.25, 4.0, 5)]
    assert all(to == SELF for _, to in transport.sent)


def test_each_stream_goes_only_to_its_own_subscribers() -> None:
    sink, transport, output = subscribed("surprise")
    assert sink.wants("surprise") and not sink.wants("mixture")
    sink.mixture(list(MIXTURE), None)
    assert transport.sent == []
    output.streams.add("mixture", ("127.0.0.1", 9005), now=0.0)
    sink.surprise(1.0, 2.0, None)
    sink.mixture(list(MIXTURE), None)
    assert [(decoded(data)[0], to) for data, to in transport.sent] == [("/surprise", SELF),
                                                                       ("/mixture", ("127.0.0.1", 9005))]


# --------------------------------------------------------------------------- closed ports


def protocol() -> tuple[OscServerProtocol, OscOutput]:
    output = OscOutput([SEND])
    output.attach(StubTransport())  # type: ignore[arg-type]
    return OscServerProtocol(FakeControls(), output), output  # type: ignore[arg-type]


def test_a_closed_port_loses_every_stream_and_is_counted_once_a_stream() -> None:
    proto, output = protocol()
    streams = output.streams
    for stream in ("mixture", "surprise", "status"):
        streams.add(stream, SELF, now=0.0)
    streams.add("mixture", ("127.0.0.1", 9003), now=0.0)
    output.add_destination(SELF, now=0.0)
    proto.unreachable(["127.0.0.1", "9001"])  # type: ignore[arg-type]  # however the endpoint is spelt
    assert output.stats.subscribers_dropped == 3
    assert [streams.subscribers(s) for s in ("mixture", "surprise", "status")] == [(("127.0.0.1", 9003),), (), ()]
    assert output.destinations == (SEND, SELF)  # a /hello destination stays: its patch may come back
    proto.unreachable(SELF)  # nothing left to drop
    assert output.stats.subscribers_dropped == 3
    proto.unreachable(("127.0.0.1", 9003))
    assert output.stats.subscribers_dropped == 4 and not streams.active("mixture")


def test_a_closed_port_that_subscribed_nothing_changes_nothing() -> None:
    proto, output = protocol()
    proto.unreachable(SEND)
    proto.unreachable(("::1", 5))
    assert output.stats.subscribers_dropped == 0 and output.destinations == (SEND,)
    output.streams = None  # no streams at all
    proto.unreachable(SELF)
    assert output.stats.subscribers_dropped == 0


def test_the_protocol_makes_the_streams_it_drops_from() -> None:
    proto, output = protocol()
    assert isinstance(output.streams, Subscriptions)
    assert all(not output.streams.active(stream) for stream in STREAMS)


def test_a_subscriber_whose_socket_closes_is_dropped_through_the_real_transport() -> None:
    """On loopback, in this process: the ICMP report reaches `unreachable` through `server.osc.udp`."""
    loop = asyncio.new_event_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    output = OscOutput()
    proto = OscServerProtocol(FakeControls(), output, loop=loop)  # type: ignore[arg-type]
    transport = BatchDatagramTransport(loop, sock, proto)
    try:
        if not transport.reports_unreachable:
            pytest.skip("this system does not report closed ports")
        gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        gone.bind(("127.0.0.1", 0))
        endpoint = gone.getsockname()
        output.streams.add("surprise", endpoint, now=0.0)
        gone.close()

        async def until_dropped() -> None:
            end = loop.time() + 5.0
            while not output.stats.subscribers_dropped:
                assert loop.time() < end, "no report of the closed port"
                output.streams.send("surprise", "/surprise", 1.0, 2.0)
                await asyncio.sleep(0.01)

        loop.run_until_complete(until_dropped())
        assert output.stats.subscribers_dropped == 1 and not output.streams.active("surprise")
    finally:
        transport.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


# --------------------------------------------------------------------------- the transport and the wire


def test_the_transport_reads_until_paused_or_closed() -> None:
    loop = asyncio.new_event_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    proto, _ = protocol()
    transport = BatchDatagramTransport(loop, sock, proto)
    try:
        assert transport.is_reading() is True
        transport.pause_reading()
        assert transport.is_reading() is False
        transport.resume_reading()
        assert transport.is_reading() is True
        transport.close()
        assert transport.is_reading() is False and transport.is_closing()
    finally:
        transport.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def test_timetag_seconds_reads_whole_seconds_and_the_fraction() -> None:
    assert timetag_seconds((NTP_EPOCH_OFFSET + 5) << 32 | 0x80000000) == 5.5
    assert timetag_seconds((NTP_EPOCH_OFFSET + 1_700_000_000) << 32 | 0x40000000) == 1_700_000_000.25
    assert timetag_seconds(NTP_EPOCH_OFFSET << 32 | 1) == 1 / 4294967296
    assert timetag_seconds(NTP_EPOCH_OFFSET << 32 | 0xFFFFFFFF) == 0xFFFFFFFF / 4294967296
    assert timetag_seconds(0) == -NTP_EPOCH_OFFSET
    assert timetag_seconds(1 << 32) == 1 - NTP_EPOCH_OFFSET


def test_timetag_seconds_inverts_ntp_timetag() -> None:
    for unix in (1_700_000_000.123456, 1_800_000_000.999999, 2_000_000_000.0):
        assert abs(timetag_seconds(ntp_timetag(unix)) - unix) < 1e-6


# --------------------------------------------------------------------------- played events


def played(*streams: str) -> tuple[OscSink, StubTransport, OscOutput, VirtualLoop]:
    output, transport = output_with_three()
    loop = VirtualLoop(start=500.0)
    sink = OscSink(loop, output)  # type: ignore[arg-type]
    for stream in streams:
        assert output.streams.add(stream, ("127.0.0.1", 9100), now=0.0)
    return sink, transport, output, loop


WATCHER = ("127.0.0.1", 9100)


def test_a_model_event_goes_to_every_destination_as_prediction() -> None:
    sink, transport, _, _ = played()
    sink.emit(Event(500.0, (0.25, 0.75), "model", dt=0.1))
    data = encode_prediction((0.25, 0.75))
    assert transport.sent == [(data, SEND), (data, SELF), (data, NAMED)]
    assert decoded(data) == ("/prediction", 0.25, 0.75)


def test_a_voices_model_event_goes_to_the_send_destinations_and_its_performer() -> None:
    sink, transport, _, _ = played()
    sink.emit(Event(500.0, (0.25, 0.75), "model", voice=2, route=SPONSOR))
    data = encode_prediction((0.25, 0.75), 2)
    assert transport.sent == [(data, SEND), (data, NAMED)]
    assert decoded(data) == ("/prediction", 0.25, 0.75, 2)


def test_a_model_event_handed_over_early_is_a_bundle_timetagged_with_its_time(monkeypatch) -> None:
    from server.osc import sink as sink_module

    sink, transport, _, loop = played()
    monkeypatch.setattr(sink_module.time, "time", lambda: 1_700_000_000.0)
    sink.emit(Event(500.25, (0.25, 0.75), "model", voice=1, route=OTHER, timetagged=True))  # due in 0.25 s
    bundle = encode_bundle(ntp_timetag(1_700_000_000.25), encode_prediction((0.25, 0.75), 1))
    assert transport.sent == [(bundle, SEND), (bundle, OTHER)]
    assert timetag_seconds(int.from_bytes(bundle[8:16], "big")) == pytest.approx(1_700_000_000.25, abs=1e-6)
    transport.sent.clear()
    loop.now = 500.5  # late: its time has passed
    sink.emit(Event(500.25, (0.5, 0.5), "model", timetagged=True))
    late = encode_bundle(ntp_timetag(1_699_999_999.75), encode_prediction((0.5, 0.5)))
    assert transport.sent == [(late, SEND), (late, SELF), (late, NAMED)]
    transport.sent.clear()
    sink.emit(Event(501.0, (0.5, 0.5), "model"))  # not handed over early: plain, whatever its time
    assert transport.sent[0] == (encode_prediction((0.5, 0.5)), SEND)


def test_prediction_subscribers_get_plain_messages_with_the_voice() -> None:
    sink, transport, _, _ = played("prediction")
    sink.emit(Event(500.0, (0.25, 0.75), "model", voice=3, route=OTHER, timetagged=True))
    sink.emit(Event(500.0, (0.5, 0.125), "model"))
    to_watcher = [decoded(data) for data, to in transport.sent if to == WATCHER]
    assert to_watcher == [("/prediction", 0.25, 0.75, 3), ("/prediction", 0.5, 0.125)]
    assert [data for data, to in transport.sent if to == WATCHER] == [
        encode_message("/prediction", 0.25, 0.75, 3), encode_message("/prediction", 0.5, 0.125)]


def test_performer_events_go_only_to_performer_subscribers() -> None:
    sink, transport, _, _ = played()
    sink.emit(Event(500.0, (0.5, 0.25), "performer", voice=1, route=SPONSOR))
    assert transport.sent == []  # not a prediction; and nobody watches
    sink, transport, output, _ = played("performer", "prediction")
    sink.emit(Event(500.0, (0.5, 0.25), "performer", voice=1, route=SPONSOR))
    sink.emit(Event(500.0, (0.75, 0.125), "performer"))
    assert transport.sent == [(encode_message("/performer", 0.5, 0.25, 1), WATCHER),
                              (encode_message("/performer", 0.75, 0.125), WATCHER)]
    sink.silence(None)  # OSC holds no notes
    sink.silence(1)
    assert len(transport.sent) == 2


def test_model_events_do_not_reach_performer_subscribers() -> None:
    sink, transport, _, _ = played("performer")
    sink.emit(Event(500.0, (0.5, 0.25), "model"))
    assert [to for _, to in transport.sent] == [SEND, SELF, NAMED]


# --------------------------------------------------------------------------- counters, failed sends, our own bugs


def test_every_counter_starts_at_zero_and_says_what_it_counts() -> None:
    from dataclasses import fields

    from server.osc.output import OscStats

    names = [f.name for f in fields(OscStats)]
    assert OscStats().as_dict() == dict.fromkeys(names, 0)
    assert all(type(v) is int for v in OscStats().as_dict().values())
    docs = OscStats.docs()
    assert list(docs) == names and all(isinstance(d, str) and d for d in docs.values())
    assert docs["sent"] == "datagrams handed to the socket"


def test_a_failed_send_is_counted_and_warned_about_once(caplog) -> None:
    import logging

    output = OscOutput([SEND, SELF])
    output.attach(StubTransport(error=OSError("no route")))  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG, logger="server.osc.output"):
        output.broadcast("/learn/done")
        output.send_to(SEND, b"x")
    assert output.stats.send_errors == 3 and output.stats.sent == 0
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "server.osc.output"]
    assert records == [(logging.WARNING, "OSC send failed (no route); further failures are only counted"),
                       (logging.DEBUG, "OSC send failed: no route"), (logging.DEBUG, "OSC send failed: no route")]


def test_an_icmp_report_is_a_failed_send(caplog) -> None:
    import logging

    proto, output = protocol()
    with caplog.at_level(logging.WARNING, logger="server.osc.output"):
        proto.error_received(ConnectionRefusedError(111, "Connection refused"))
    assert output.stats.send_errors == 1
    assert [r.getMessage() for r in caplog.records if r.name == "server.osc.output"] == [
        "OSC send failed ([Errno 111] Connection refused); further failures are only counted"]


def test_our_own_bugs_are_answered_counted_and_logged_sparingly(caplog) -> None:
    import logging

    from server.osc.output import OscStats
    from server.osc.refusals import LOGGED_ERRORS, Refusals

    assert LOGGED_ERRORS == 10
    output = OscOutput()
    transport = StubTransport()
    output.attach(transport)  # type: ignore[arg-type]
    stats = OscStats()
    refusals = Refusals(output, stats, frozenset({"/gesture"}), rate=1.0, burst=3)
    with caplog.at_level(logging.ERROR, logger="server.osc.refusals"):
        for _ in range(2002):
            refusals.internal_error("/gesture", SPONSOR)
    assert stats.internal_errors == 2002
    logged = [r.getMessage() for r in caplog.records if r.name == "server.osc.refusals"]
    assert logged == [f"internal error handling /gesture from ('127.0.0.1', 7000) (#{n})"
                      for n in (*range(1, 11), 1000, 2000)]
    reply = encode_message("/error", "/gesture", "internal error")
    assert transport.sent[:3] == [(reply, SPONSOR)] * 3  # within the sender's error budget
    assert stats.errors_suppressed == 2002 - len(transport.sent)


def test_withdrawing_what_was_never_asked_for_is_nothing() -> None:
    from server.osc.consent import Consent, Entries

    entries = Entries(Consent())
    assert entries.withdraw(NAMED, SPONSOR) is False  # no such entry
    entries.add(NAMED, SPONSOR, 0.0)
    assert entries.withdraw(NAMED, OTHER) is False  # not OTHER's request
    assert entries.requesters == {NAMED: {SPONSOR: None}}
    assert entries.withdraw(NAMED, SPONSOR) is True and len(entries) == 0


def test_a_limit_of_one_entry_lets_a_sender_ask_once_and_no_more() -> None:
    """The limit counts what a sender has asked for: one who has asked for nothing yet is under any limit."""
    from server.osc.consent import Consent, TooMany

    consent = Consent(max_per_sender=1)
    consent.check(SPONSOR)  # asked for nothing yet
    consent.join(NAMED, SPONSOR, 0.0)
    with pytest.raises(TooMany, match="at most 1 streams"):
        consent.check(SPONSOR)
    consent.check(OTHER)


def test_a_destination_that_speaks_itself_is_not_the_idlest_however_quiet_its_requester() -> None:
    from server.osc.consent import Consent, Entries

    entries = Entries(Consent())
    entries.add(NAMED, SPONSOR, 0.0)
    entries.add(("127.0.0.1", 9003), OTHER, 1.0)
    entries.consent.hear(NAMED, 10.0, 16)  # the named port answered at 10 s; its sponsor has said nothing since 0
    assert entries.last(NAMED) == 10.0
    assert entries.idlest() == ("127.0.0.1", 9003)


def test_a_model_of_another_width_is_announced_to_every_destination() -> None:
    """`/model/dims N` when a swap changes the width, so a patch can follow (docs/osc.md)."""
    output, transport = output_with_three()
    OscSink(VirtualLoop(), output).retune(9)  # type: ignore[arg-type]
    sent = {(to, decoded(data)) for data, to in transport.sent}
    assert sent == {(to, ("/model/dims", 9)) for to in (SEND, SELF, NAMED)}
