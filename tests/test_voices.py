"""Voices and lookahead in the engine, on a virtual clock (see `tests/test_engine.py`'s `VirtualLoop`).

Each test plays performers into an `Engine` and checks what leaves it and when: a voice's
answers depend on its own input only (identical to playing alone with the same seed),
resets and overrides reach the voice they name, voices are limited and forgotten after
silence, and with lookahead every model event leaves exactly that much before its time.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from server.event import Event
from server.live.controls import ControlError
from server.live.engine import Engine, Settings
from server.live.modes import Mode
from server.live.voices import VoiceOptions, VoicePolicy
from server.model.predictor import Predictor
from tests.rig import VirtualLoop, build_engine
from tests.test_engine import DEFAULT, Spy

A, B = ("127.0.0.1", 9001), ("127.0.0.1", 9002)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load(DEFAULT)


class Sent:
    """A sink that notes each event with the loop time it left at."""

    def __init__(self, loop: VirtualLoop) -> None:
        self.loop = loop
        self.events: list[tuple[float, Event]] = []

    def emit(self, event: Event) -> None:
        self.events.append((self.loop.now, event))

    def silence(self, voice: int | None) -> None:
        pass

    def model(self, voice: int | None = "any") -> list[Event]:  # type: ignore[assignment]
        return [e for _, e in self.events if e.source == "model" and (voice == "any" or e.voice == voice)]


def make(predictor: Predictor, mode: Mode = Mode.ACCOMPANY, policy: VoicePolicy = VoicePolicy.PER_SENDER,
         seed: int = 7, limit: int = 16, timeout: float = 60.0, sinks: tuple[Any, ...] = (),
         **settings: Any) -> tuple[VirtualLoop, Engine, Sent]:
    loop = VirtualLoop()
    predictor.reset()
    sent = Sent(loop)
    engine, _ = build_engine(loop, predictor, Settings(mode=mode, **settings), seed=seed,  # type: ignore[arg-type]
                             voices=VoiceOptions(policy, limit, timeout), sinks=(sent, *sinks))
    engine.start()
    return loop, engine, sent


def circle(i: int) -> tuple[float, float]:
    return 0.5 + 0.4 * math.cos(i / 5), 0.5 + 0.4 * math.sin(i / 5)


def zigzag(i: int) -> tuple[float, float]:
    return (i % 7) / 7, 0.1 if i % 2 else 0.9


def play(loop: VirtualLoop, engine: Engine, figures: dict[Any, Any], steps: int, gap: float = 0.1) -> None:
    """Each route plays its figure, one event per `gap` seconds, interleaved."""
    for i in range(steps):
        for route, figure in figures.items():
            engine.perform(*figure(i), route=route)
        loop.advance(gap)


def answers(sent: Sent, voice: int | None) -> list[tuple[float, float, float]]:
    return [(round(e.time, 9), e.x, e.y) for e in sent.model(voice)]


def test_a_voice_answers_exactly_as_it_would_alone(predictor):
    loop, engine, duo = make(predictor)
    play(loop, engine, {A: circle, B: zigzag}, 40)
    loop_a, engine_a, solo_a = make(predictor)
    play(loop_a, engine_a, {A: circle}, 40)
    loop_b, engine_b, solo_b = make(predictor)
    play(loop_b, engine_b, {B: zigzag}, 40)
    assert len(answers(duo, 0)) > 30 and len(answers(duo, 1)) > 30
    assert answers(duo, 0) == answers(solo_a, 0)  # every answer's time and place, to the bit
    assert [a[1:] for a in answers(duo, 1)] == [a[1:] for a in answers(solo_b, 0)]
    assert {e.route for e in duo.model(0)} == {A} and {e.route for e in duo.model(1)} == {B}
    # and a single voice under `one` is today's engine: same answers as per-sender alone
    loop_1, engine_1, one = make(predictor, policy=VoicePolicy.ONE)
    play(loop_1, engine_1, {A: circle}, 40)
    assert [a[1:] for a in answers(one, None)] == [a[1:] for a in answers(solo_a, 0)]
    assert all(e.voice is None for e in one.model())


def test_each_voice_has_its_own_dt_clock(predictor):
    loop, engine, _ = make(predictor, mode=Mode.LISTEN)
    engine.perform(0.1, 0.1, route=A)
    loop.advance(0.25)
    engine.perform(0.2, 0.2, route=B)
    spies = {n: Spy(engine.voice(n).predictor) for n in (0, 1)}
    for n, spy in spies.items():
        engine.voice(n).predictor = spy  # type: ignore[assignment]
    loop.advance(0.5)
    engine.perform(0.3, 0.3, route=A)
    loop.advance(0.125)
    engine.perform(0.4, 0.4, route=B)
    assert spies[0].observed == [(pytest.approx(0.75), 0.3, 0.3)]  # since A's own last event, not B's
    assert spies[1].observed == [(pytest.approx(0.625), 0.4, 0.4)]


def test_reset_naming_a_voice_leaves_the_others_alone(predictor):
    loop, engine, sent = make(predictor)
    play(loop, engine, {A: circle, B: zigzag}, 10)
    a_state = engine.voice(0).predictor.state.copy()
    b_state = engine.voice(1).predictor.state.copy()
    engine.reset(1, route=B)  # B's own voice
    assert (engine.voice(0).predictor.state == a_state).all()
    assert not engine.voice(1).predictor.state.any() and engine.voice(1).fresh
    assert (b_state != 0).any()
    engine.reset()  # no voice: every voice
    assert not engine.voice(0).predictor.state.any()
    with pytest.raises(ControlError, match="not playing"):
        engine.reset(5, route=B)


def test_mode_and_temperature_per_voice_override_the_global_ones(predictor):
    loop, engine, sent = make(predictor)
    play(loop, engine, {A: circle, B: zigzag}, 3)
    engine.set_mode("generate", 1, route=B)  # B's own voice
    engine.set_temperature(0.0, 1, route=B)
    engine.set_mode("listen")  # global: voice 0 stops answering; voice 1 keeps its own mode
    before = len(sent.model(0))
    loop.advance(5.0)
    play(loop, engine, {A: circle}, 5)
    assert len(sent.model(0)) == before
    assert len(sent.model(1)) > 10  # it generates on its own
    status = engine.status()
    assert status["voice1_mode"] == "generate" and status["voice0_mode"] == "listen"
    assert status["voice1_temperature"] == 0.0 and status["voice0_temperature"] == 1.0


def test_voices_are_limited_and_refusals_counted(predictor):
    loop, engine, _ = make(predictor, limit=2)
    engine.perform(0.5, 0.5, route=A)
    engine.perform(0.5, 0.5, route=B)
    with pytest.raises(ControlError, match="all 2 voices"):
        engine.perform(0.5, 0.5, route=("127.0.0.1", 9003))
    with pytest.raises(ControlError, match="voice must be 0-1"):
        engine.perform(0.5, 0.5, voice=2)
    engine.perform(0.5, 0.5, voice=1, route=B)  # its own voice by number: fine
    with pytest.raises(ControlError, match="belongs to another sender"):  # another's: refused (test_ownership.py)
        engine.perform(0.5, 0.5, voice=1, route=("127.0.0.1", 9003))
    assert engine.counts["voices_refused"] == 1 and engine.status()["voices"] == 2


def test_a_silent_voice_is_forgotten_and_its_number_reused(predictor):
    loop, engine, sent = make(predictor, timeout=10.0)
    engine.perform(0.5, 0.5, route=A)
    engine.perform(0.5, 0.5, route=B)
    for _ in range(12):  # B keeps playing, A is silent
        loop.advance(1.0)
        engine.perform(0.4, 0.6, route=B)
    assert engine.voice(0) is None and engine.voice(1) is not None
    assert engine.counts["voices_expired"] == 1
    engine.perform(0.5, 0.5, route=("127.0.0.1", 9003))  # a newcomer gets the free number, fresh
    assert engine.voice(0).route == ("127.0.0.1", 9003) and engine.voice(0).inputs == 1


def test_voice_numbers_need_per_sender(predictor):
    _, engine, _ = make(predictor, policy=VoicePolicy.ONE)
    with pytest.raises(ControlError, match="per-sender"):
        engine.perform(0.5, 0.5, voice=1)
    with pytest.raises(ControlError, match="per-sender"):
        engine.set_temperature(0.5, 1)


def test_lookahead_sends_every_generated_event_that_much_before_its_time(predictor):
    loop, engine, sent = make(predictor, mode=Mode.GENERATE, policy=VoicePolicy.ONE, lookahead=0.05, timescale=0.5)
    start = loop.now
    loop.advance(60.0)
    out = [(t, e) for t, e in sent.events if e.source == "model"]
    assert len(out) > 50
    previous = start + 0.05  # generate starts a lookahead ahead, so even the first event is early
    for left, e in out:
        assert left == pytest.approx(e.time - 0.05, abs=1e-9)  # it left exactly 50 ms before its time
        assert e.time == pytest.approx(max(previous + e.dt, previous + 1 / 200), abs=1e-9)  # spaced by the model's dt
        previous = e.time
    assert engine.lateness.percentile(100) == 0.0


def test_lookahead_cannot_send_an_answer_before_its_cause(predictor):
    loop, engine, sent = make(predictor, policy=VoicePolicy.ONE, lookahead=0.05)
    for i in range(30):
        engine.perform(*circle(i))
        loop.advance(0.2)
    out = [(t, e) for t, e in sent.events if e.source == "model"]
    assert len(out) > 20 and engine.counts["late_dropped"] == 0
    early = 0
    for left, answer in out:
        cause = answer.time - answer.dt  # the performer event it answers
        assert left == pytest.approx(max(cause, answer.time - 0.05), abs=1e-9)  # never before its cause
        early += answer.dt > 0.05
    assert early > 5  # and those with room for it left a full lookahead early


def test_lookahead_zero_leaves_each_event_at_its_time(predictor):
    loop, engine, sent = make(predictor, mode=Mode.GENERATE, policy=VoicePolicy.ONE)
    loop.advance(20.0)
    out = [(t, e) for t, e in sent.events if e.source == "model"]
    assert out and all(t == e.time for t, e in out)


def test_changing_lookahead_reschedules_what_waits(predictor):
    loop, engine, sent = make(predictor, mode=Mode.GENERATE, policy=VoicePolicy.ONE, timescale=4.0)
    loop.advance(0.001)
    chain = engine.voice(0).chain
    engine.set_lookahead(0.5)
    assert chain.send_at == pytest.approx(max(loop.now, chain.when - 0.5))
    with pytest.raises(ControlError):
        engine.set_lookahead(5.0)


def test_the_log_keeps_each_voice_apart_and_reads_back_one_performance_per_voice(predictor, tmp_path):
    from server.learn.data import dataset_from_logs, read_log_streams
    from server.live.recorder import Recorder

    recorder = Recorder(tmp_path, voices=True)
    loop, engine, _ = make(predictor, sinks=(recorder,))
    play(loop, engine, {A: circle, B: zigzag}, 20, gap=0.1)
    recorder.close()
    header = recorder.path.read_text().splitlines()[0]
    assert header == "time,source,x,y,voice"
    streams = read_log_streams(recorder.path)
    assert set(streams) == {"performer.0", "performer.1", "model.0", "model.1"}
    for voice, figure in ((0, circle), (1, zigzag)):
        events = streams[f"performer.{voice}"]
        assert len(events) == 20
        assert events[1:, 0] == pytest.approx(0.1, abs=1e-5)  # dt within the voice, not between the two voices
        assert events[:, 1] == pytest.approx([figure(i)[0] for i in range(20)], abs=1e-5)
    assert len(dataset_from_logs([recorder.path]).starts) == 2  # a performance per voice
