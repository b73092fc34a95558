"""The engine's smaller promises, on a virtual clock: what a refusal says, when `respond` may not take over,
and that the displays' figures are those of the moment they describe."""

from __future__ import annotations

import pytest

from server.live.controls import ControlError
from server.live.engine import Settings
from server.live.modes import Mode
from server.live.voices import VoiceOptions, VoicePolicy
from server.model.predictor import Predictor
from tests.rig import VirtualLoop, build_engine
from tests.test_engine import DEFAULT

A, B = ("127.0.0.1", 9001), ("127.0.0.1", 9002)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load(DEFAULT)


def make(predictor: Predictor, mode: Mode = Mode.ACCOMPANY, per_sender: bool = False, watch: bool = False,
         **settings):
    loop = VirtualLoop()
    predictor.reset()
    voices = VoiceOptions(VoicePolicy.PER_SENDER) if per_sender else None
    engine, played = build_engine(loop, predictor, Settings(mode=mode, **settings), voices=voices, watch=watch,
                                  stream_rate=1000.0)
    engine.start()
    return loop, engine, played


# --------------------------------------------------------------------------- what a refusal says


@pytest.mark.parametrize("control, name", [("set_sigma_temperature", "sigma_temperature"),
                                           ("set_temperature", "temperature"),
                                           ("set_threshold", "threshold")])
def test_a_refused_value_is_named_by_its_control(predictor, control, name):
    _, engine, _ = make(predictor)
    with pytest.raises(ControlError) as refused:
        getattr(engine, control)(-1.0)
    assert str(refused.value) == f"{name} must be >= 0, got -1"


def test_a_sender_refused_another_senders_voice_is_told_what_to_do_instead(predictor):
    _, engine, _ = make(predictor, per_sender=True)
    engine.perform(0.5, 0.5, route=A)
    with pytest.raises(ControlError) as refused:
        engine.perform(0.5, 0.5, voice=0, route=B)
    assert str(refused.value).endswith("a voice answers only to the sender that opened it "
                                       "(name one of your own voices, or none for the global setting)")


# --------------------------------------------------------------------------- respond


def test_a_new_threshold_does_not_make_respond_play_before_its_performer_has(predictor):
    loop, engine, played = make(predictor, Mode.RESPOND, timescale=0.05, threshold=0.5)
    engine.set_threshold(0.2)
    loop.advance(5.0)
    assert played.model() == []


def test_a_new_threshold_does_not_start_a_second_takeover_while_respond_plays(predictor):
    loop, engine, played = make(predictor, Mode.RESPOND, timescale=1.0, threshold=0.2)
    engine.perform(0.5, 0.5)
    loop.advance(0.5)  # it has taken over and plays its chain
    before = len(played.model())
    engine.set_threshold(0.3)
    loop.advance(0.31)
    later = played.model()[before:]
    # the chain goes on from its own schedule: every event its wait after the one before, none restarted
    previous = played.model()[before - 1].time if before else None
    for e in later:
        if previous is not None:
            assert e.time == pytest.approx(max(previous + e.dt, previous + 1.0 / engine.settings.max_rate))
        previous = e.time


# --------------------------------------------------------------------------- the streams


def _figures(predictor: Predictor, same_turn: bool):
    loop, engine, played = make(predictor, watch=True)
    for i in range(4):
        engine.perform(0.2 + 0.2 * i, 0.8 - 0.2 * i, at=loop.now)
        if not same_turn:
            loop.advance(0.0)
    loop.advance(0.0)
    return played.mixtures, played.surprises


def test_the_streams_show_each_events_own_moment_even_when_several_come_in_one_turn(predictor):
    """The maths runs at the loop's next turn, from parameters captured at the step: the figures are those
    of computing inline, however many events came in between."""
    inline = _figures(predictor, same_turn=False)
    batched = _figures(predictor, same_turn=True)
    assert len(inline[0]) == len(batched[0]) == 4 and len(inline[1]) == len(batched[1]) == 4
    assert batched == inline
    assert inline[0][0] != inline[0][-1]  # the moments differ, so the figures would tell them apart


def test_a_reset_voice_starts_its_running_surprise_afresh(predictor):
    loop, engine, played = make(predictor, watch=True)
    for i in range(5):
        engine.perform(0.1 + 0.15 * i, 0.9 - 0.15 * i)
        loop.advance(0.05)
    engine.reset()
    played.surprises.clear()
    engine.perform(0.5, 0.5)
    loop.advance(0.0)
    ((nll, smoothed, _),) = played.surprises
    assert smoothed == nll
