"""Fuzzing the OSC input layer: whatever arrives, nothing escapes, refusals are counted and change nothing.

The property tests drive `OscServerProtocol` directly (no sockets, so thousands of
examples take seconds): with a recording fake engine, and with a real `Engine` and
`Predictor` on models/default to check that refused input leaves the model state
untouched. The last test throws 10,000 malformed datagrams at a running server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from server.osc import namespace as osc_ns
from server.osc import protocol as osc_proto
from server.osc import output as osc_output
from server.live.engine import Engine
from server.live.modes import MODE_NAMES
from server.model.files import check_model_name
from server.osc.wire import encode_message
from server.model.predictor import Predictor
from tests.live import REPO, OscPeer, start_server
from tests.oscfakes import FakeControls, StubTransport

SENDER = ("127.0.0.1", 9000)


def fuzz(examples: int) -> settings:
    """Hypothesis settings for the property tests: `examples` each, no per-example deadline."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- strategies: OSC messages of every type python-osc can build, aimed at our addresses ---

_NUMBERS = st.one_of(
    st.floats(),  # NaN, +-inf, 1e308 and subnormals included
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, 0.5, -1e-300, 1e300, 127.0, 127.5, 128.0,
                     2.0**31, 2.0**63]),
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 1, -1, 127, 128, 65535, 65536, 2**31 - 1, -(2**31)]),
)

_STRINGS = st.sampled_from(["default", "respond", "accompany", "generate", "listen", "..", "../default", "/etc",
                            "a/b", ".git", "missing", "x" * 65, "", "DEFAULT"])

_TYPED = st.one_of(
    st.integers(-(2**31), 2**31 - 1).map(lambda v: (v, "i")),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: (v, "h")),
    st.floats(width=32).map(lambda v: (v, "f")),
    st.floats().map(lambda v: (v, "d")),
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=70).map(lambda v: (v, "s")),
    _STRINGS.map(lambda v: (v, "s")),
    st.binary(min_size=1, max_size=16).map(lambda v: (v, "b")),
    st.sampled_from([(True, "T"), (False, "F"), (None, "N")]),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda v: (v, "m")),
    st.integers(0, 2**32 - 1).map(lambda v: (v, "r")),
    st.lists(st.integers(-5, 5), min_size=1, max_size=3).map(lambda v: (v, None)),  # an OSC array
)

_REAL = st.sampled_from(osc_ns.ADDRESSES)
_FAKE = st.one_of(
    st.sampled_from(["/", "/gesture/", "/Gesture", "/gesture ", "/*", "/gest?re", "/{gesture,note}", "/note/1"]),
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20).map(lambda s: "/" + s),
)
_FOR_KIND = {"float": _NUMBERS, "int": _NUMBERS, "str": _STRINGS}


def _plain(value: float) -> tuple[float, str | None]:
    """A number as a client would send it: let python-osc pick the tag, or `d` beyond float32."""
    return (value, "d") if isinstance(value, float) and math.isfinite(value) and abs(value) > 3e38 else (value, None)


def _build(address: str, args: list[tuple[Any, str | None]]) -> bytes | None:
    builder = OscMessageBuilder(address)
    try:
        for value, tag in args:
            builder.add_arg(value, tag) if tag else builder.add_arg(value)
        return builder.build().dgram
    except Exception:  # python-osc refuses a few values (e.g. an unencodable string): not our input
        return None


@st.composite
def osc_messages(draw: st.DrawFn) -> bytes:
    """A message for a (usually real) address: arguments of the expected kinds with edge values, or anything."""
    address = draw(_REAL if draw(st.integers(0, 4)) else _FAKE)  # mostly real: their argument checks get fuzzed
    spec = osc_ns.TABLE.lookup.get(address)
    if spec is not None and draw(st.booleans()):
        kinds = [param.kind for param in spec.params[: draw(st.integers(spec.required, len(spec.params)))]]
        args = [draw(_FOR_KIND[kind].map(_plain) if kind != "str" else _STRINGS.map(lambda v: (v, "s")))
                for kind in kinds]
    else:
        args = [draw(st.one_of(_NUMBERS.map(_plain), _TYPED)) for _ in range(draw(st.integers(0, 4)))]
    data = _build(address, args)
    assume(data is not None)
    return data


def _bundle(timetag: bytes, elements: list[bytes]) -> bytes:
    return b"#bundle\0" + timetag + b"".join(struct.pack(">i", len(e)) + e for e in elements)


_TIMETAGS = st.one_of(
    st.sampled_from([bytes(8), (1).to_bytes(8, "big"), b"\xff" * 8, b"\x80" + bytes(7)]),
    st.binary(min_size=8, max_size=8),
)

_BUNDLES = st.recursive(
    osc_messages(),
    lambda inner: st.builds(_bundle, _TIMETAGS, st.lists(inner, max_size=4)),
    max_leaves=5,
)


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    """Anything a network can deliver: junk, truncated or bit-flipped OSC, odd and nested bundles."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=120))
    base = draw(st.one_of(osc_messages(), _BUNDLES))
    if kind == 1:
        return base[: draw(st.integers(0, max(0, len(base) - 1)))]
    if kind == 2 and base:
        position = draw(st.integers(0, len(base) - 1))
        return base[:position] + bytes([base[position] ^ (1 << draw(st.integers(0, 7)))]) + base[position + 1 :]
    if kind == 3:  # a bundle whose declared element size lies
        size = draw(st.sampled_from([-4, -1, 0, 3, 5, 2**31 - 1, len(base) + 4]))
        return b"#bundle\0" + draw(_TIMETAGS) + struct.pack(">i", size) + base
    return base


def _protocol(controls: Any) -> tuple[osc_proto.OscServerProtocol, StubTransport]:
    sock = StubTransport()
    output = osc_output.OscOutput()
    output.attach(sock)  # type: ignore[arg-type]
    return osc_proto.OscServerProtocol(controls, output), sock


def _errors(sock: StubTransport) -> list[list[Any]]:
    return [OscMessage(data).params for data, _ in sock.sent if data.startswith(b"/error\0")]


def _check_calls(calls: list[tuple[Any, ...]]) -> None:
    """Whatever reached the engine is in range and finite."""
    for name, *args in calls:
        for value in args:
            if isinstance(value, float):
                assert math.isfinite(value), (name, args)
        if name == "perform":
            assert all(0.0 <= v <= 1.0 for v in args[:2]), args
            assert len(args) == 2 or (type(args[2]) is int and args[2] >= 0), args  # a voice is asked for by number
        elif name in ("set_temperature", "set_sigma_temperature", "set_threshold"):
            assert args[0] >= 0.0
        elif name == "set_timescale":
            assert args[0] > 0.0
        elif name == "set_mode":
            assert args[0] in MODE_NAMES
        elif name == "set_paused":
            assert args[0] in (True, False)
        elif name == "load_model":
            assert check_model_name(args[0]) and "/" not in args[0] and ".." not in args[0]


# --- 1. the protocol with a recording engine (2,500 + 1,500 + 1,000 examples) ---


@fuzz(2500)
@given(osc_messages())
def test_any_message_is_applied_or_refused_exactly_once(packet: bytes) -> None:
    controls = FakeControls()
    protocol, sock = _protocol(controls)
    protocol.datagram_received(packet, SENDER)
    stats = protocol.stats
    assert stats.internal_errors == 0 and stats.received == 1
    assert stats.handled + stats.rejected == 1
    errors = _errors(sock)
    if stats.rejected:
        assert controls.calls == []
        assert len(errors) == 1  # the first refusal always gets its /error <address> <reason>
        assert isinstance(errors[0][0], str) and errors[0][1]
    else:
        assert errors == []
        assert len(controls.calls) <= 1
        _check_calls(controls.calls)


@fuzz(1000)
@given(st.lists(datagrams(), min_size=1, max_size=6))
def test_any_batch_of_datagrams_is_accounted_for(batch: list[bytes]) -> None:
    controls = FakeControls()
    protocol, sock = _protocol(controls)
    protocol.datagrams_received([(data, SENDER, 0.0) for data in batch])
    stats = protocol.stats
    assert stats.internal_errors == 0 and stats.received == len(batch)
    assert len(_errors(sock)) == stats.rejected - stats.errors_suppressed  # every refusal answered or counted
    _check_calls(controls.calls)


_VALID = st.one_of(
    st.tuples(st.just("/gesture"), st.integers(0, 1024).map(lambda i: i / 1024), st.just(0.5)),
    st.tuples(st.just("/interface"), st.just(0.25), st.integers(0, 1024).map(lambda i: i / 1024)),
    st.tuples(st.just("/note"), st.integers(0, 127), st.integers(0, 127)),
    st.tuples(st.just("/temperature"), st.sampled_from([0.0, 0.5, 2.0])),
    st.tuples(st.just("/reset")),
    st.tuples(st.just("/status")),
)


def _expected_calls(messages: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The flood policy, written the simple way: in a batch of more than MAX_RUN positions, only the newest plays."""
    calls: list[tuple[Any, ...]] = []
    for path, *args in messages:
        if path in ("/gesture", "/interface"):
            calls.append(("perform", float(args[0]), float(args[1])))
        elif path == "/note":
            if args[1]:
                calls.append(("perform", args[0] / 127, args[1] / 127))
        elif path == "/temperature":
            calls.append(("set_temperature", args[0]))
        elif path == "/reset":
            calls.append(("reset",))
    positions = [i for i, call in enumerate(calls) if call[0] == "perform"]
    if len(positions) > osc_proto.MAX_RUN:  # one sender: each position but the last is superseded, none moves
        superseded = set(positions[:-1])
        calls = [call for i, call in enumerate(calls) if i not in superseded]
    return calls


@fuzz(1000)
@given(st.lists(_VALID, max_size=90), st.integers(1, osc_proto.MAX_RUN))
def test_flood_policy_keeps_order_and_the_newest_position(messages: list[tuple[Any, ...]], split: int) -> None:
    """However the kernel splits the stream into batches, only batches with too many positions collapse,
    to their newest position, in place, with every control applied in order."""
    controls = FakeControls()
    protocol, _ = _protocol(controls)
    packets = [encode_message(*m) for m in messages]
    protocol.datagrams_received([(p, SENDER, 0.0) for p in packets])  # one batch: the policy in full
    assert controls.calls == _expected_calls(messages)
    assert protocol.stats.handled == len(messages) and protocol.stats.rejected == 0
    # the same stream in small batches, as the kernel hands it over when the server keeps up: nothing lost
    controls.calls.clear()
    expected: list[tuple[Any, ...]] = []
    for start in range(0, len(packets), split):
        protocol.datagrams_received([(p, SENDER, 0.0) for p in packets[start : start + split]])
        expected += _expected_calls(messages[start : start + split])
    assert controls.calls == expected
    assert sum(call[0] == "perform" for call in expected) == sum(
        m[0] != "/note" and m[0].startswith(("/gesture", "/interface")) or (m[0] == "/note" and m[2] > 0)
        for m in messages
    )


# --- 2. a real engine: refused input never changes the model's state (1,000 examples) ---


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    loop = asyncio.new_event_loop()  # never run: the engine only schedules on it
    engine = Engine(loop, Predictor.load(REPO / "models" / "default"), REPO / "models", seed=0)
    engine.start()
    yield engine
    engine.stop()
    loop.close()


def _snapshot(engine: Engine) -> tuple[Any, ...]:
    p = engine.predictor
    return (id(p), p.state.copy(), p.params.copy(), dataclasses.astuple(engine.settings), engine.model_name,
            dict(engine.counts))


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b))


@fuzz(1000)
@given(st.lists(osc_messages(), min_size=1, max_size=4))
def test_refused_input_never_changes_the_model_state(engine: Engine, packets: list[bytes]) -> None:
    protocol, _ = _protocol(engine)
    engine.perform(0.3, 0.7)  # a non-zero state, so a wrongful reset would show
    for packet in packets:
        before = _snapshot(engine)
        rejected = protocol.stats.rejected
        protocol.datagram_received(packet, SENDER)
        assert protocol.stats.internal_errors == 0
        if protocol.stats.rejected > rejected:
            assert _same(before, _snapshot(engine)), OscMessage(packet).address


# --- 3. a running server: 10,000 random datagrams, a 64 KB one, truncated OSC, odd bundles ---


def _random_datagram(rng: random.Random) -> bytes:
    valid = encode_message(rng.choice(osc_ns.ADDRESSES), *[rng.choice([rng.random(), rng.randint(-9, 200), "x"])
                                                          for _ in range(rng.randint(0, 3))])
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 200))
    if kind == 1:
        return valid[: rng.randint(0, len(valid) - 1)]
    if kind == 2:
        i = rng.randrange(len(valid))
        return valid[:i] + bytes([valid[i] ^ (1 << rng.randrange(8))]) + valid[i + 1 :]
    if kind == 3:
        content = valid
        for _ in range(rng.randint(1, 12)):  # nested past the depth limit sometimes
            content = _bundle(rng.choice([bytes(8), b"\xff" * 8, rng.randbytes(8)]), [content] * rng.randint(0, 2))
        return content
    if kind == 4:
        return b"#bundle\0" + rng.randbytes(8) + struct.pack(">i", rng.choice([-8, 0, 7, 1 << 30])) + valid
    return rng.choice([b"/", b"#", b"#bundle\0", b"/gesture\0\0\0\0,ff\0"]) + rng.randbytes(rng.randint(0, 40))


def _hostile_datagrams(rng: random.Random) -> list[bytes]:
    gesture = encode_message("/gesture", 0.5, 0.5)
    big_bundle = _bundle(bytes(8), [gesture] * ((65507 - 16) // (len(gesture) + 4)))
    return [_random_datagram(rng) for _ in range(10_000)] + [
        rng.randbytes(65507),  # 64 KB of noise
        b"/gesture\0\0\0\0,ff\0" + rng.randbytes(65507 - 16),  # 64 KB message, trailing noise
        big_bundle,  # 64 KB bundle of ~2,300 positions: MAX_BUNDLE read, one model step, the rest refused
        b"#bundle\0" + bytes(8),  # empty bundle
        gesture[:-1], gesture[:13], b"#bundle\0\0\0",  # truncated
    ]


def test_random_datagrams_against_a_running_server(tmp_path: Path) -> None:
    peer = OscPeer()
    srv = start_server(tmp_path, "--send", f"127.0.0.1:{peer.port}", "--timescale", "1e-6", "--seed", "1")
    peer.target = ("127.0.0.1", srv.port)
    fuzzer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packets = _hostile_datagrams(random.Random(20240601))
        for start in range(0, len(packets), 500):
            for data in packets[start : start + 500]:
                fuzzer.sendto(data, peer.target)
            peer.status()  # wait for the server to read them: the kernel buffer never overflows
        for control in (("/pause", 0), ("/mode", "accompany"), ("/timescale", 1e-6), ("/lookahead", 0.0)):  # undo what fuzz may have set
            peer.send(*control)
        status = peer.status()
        assert srv.proc.poll() is None
        assert status["osc_internal_errors"] == 0
        assert status["osc_kernel_drops"] == 0
        assert status["osc_received"] >= len(packets)
        assert status["osc_rejected"] > len(packets) // 2
        assert status["osc_bundles_capped"] >= 1
        peer.drain(0.1)
        for i in range(5):  # and it still plays (how fast is `antiphon bench`'s to say, not a timed test's)
            peer.send("/gesture", 0.2 + 0.1 * i, 0.5)
            assert peer.receive(10.0, "/prediction", count=1), "no answer after the fuzz"
    finally:
        fuzzer.close()
        assert srv.stop() == 0
        peer.close()


def test_engine_refuses_non_finite_positions_from_any_transport():
    """MIDI and future transports call `perform` directly: NaN must not reach the model there either."""
    import asyncio
    import math
    from pathlib import Path

    import numpy as np

    from server.live.controls import ControlError
    from server.live.engine import Engine
    from server.model.predictor import Predictor

    async def scenario():
        loop = asyncio.get_running_loop()
        models = Path(__file__).resolve().parent.parent / "models"
        engine = Engine(loop, Predictor.load(models / "default"), models)
        before = engine.predictor.state.copy()
        for bad in ((math.nan, 0.5), (0.5, math.inf), (-math.inf, math.nan)):
            with pytest.raises(ControlError):
                engine.perform(*bad)
        np.testing.assert_array_equal(engine.predictor.state, before)
        assert engine.counts["inputs"] == 0
        engine.stop()

    asyncio.run(scenario())
