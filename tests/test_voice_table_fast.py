"""The voice table's bookkeeping, on a virtual clock: a forgotten voice gives back exactly what it held.

When a silent voice is forgotten its sender may open one more voice (not none, not two),
its sender's next unnumbered event opens a fresh voice rather than finding the old one,
and the voice number's running surprise starts again for whoever plays it next.
"""

from __future__ import annotations

import math

import pytest

from server.live.controls import ControlError
from server.live.engine import Settings
from server.live.modes import Mode
from server.live.voices import MAX_VOICE_LIMIT, VoiceOptions, VoicePolicy
from server.model.predictor import Predictor
from tests.rig import VirtualLoop, build_engine
from tests.test_engine import DEFAULT

A, B = ("127.0.0.1", 9001), ("127.0.0.1", 9002)
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load(DEFAULT)


def make(predictor: Predictor, per_sender_limit: int = 4, watch: bool = False):
    loop = VirtualLoop()
    predictor.reset()
    options = VoiceOptions(VoicePolicy.PER_SENDER, 16, TIMEOUT, per_sender_limit)
    engine, played = build_engine(loop, predictor, Settings(mode=Mode.LISTEN), voices=options, watch=watch,
                                  stream_rate=1000.0)
    engine.start()
    return loop, engine, played


def outlive(loop: VirtualLoop, engine, keep: list[tuple[int | None, tuple]]) -> None:
    """Let every other voice fall silent for longer than the timeout while the voices in ``keep`` play on."""
    for _ in range(int(TIMEOUT) + 2):
        loop.advance(1.0)
        for number, route in keep:
            engine.perform(0.4, 0.6, voice=number, route=route)


def test_a_forgotten_voice_frees_exactly_one_of_its_senders_places(predictor):
    loop, engine, _ = make(predictor, per_sender_limit=2)
    engine.perform(0.5, 0.5, voice=0, route=A)
    engine.perform(0.5, 0.5, voice=1, route=A)
    with pytest.raises(ControlError, match="at most 2 voices"):
        engine.perform(0.5, 0.5, voice=2, route=A)
    outlive(loop, engine, keep=[(1, A)])  # voice 0 falls silent and is forgotten
    assert engine.voice(0) is None and engine.counts["voices_expired"] == 1
    engine.perform(0.5, 0.5, voice=2, route=A)  # one place is free again
    with pytest.raises(ControlError, match="at most 2 voices"):  # and only one
        engine.perform(0.5, 0.5, voice=3, route=A)
    assert [v.number for v in engine.voices] == [1, 2]


def test_a_sender_whose_only_voice_was_forgotten_opens_its_full_share_again(predictor):
    loop, engine, _ = make(predictor, per_sender_limit=2)
    engine.perform(0.5, 0.5, voice=0, route=A)
    outlive(loop, engine, keep=[(5, B)])
    assert engine.voice(0) is None
    engine.perform(0.5, 0.5, voice=0, route=A)
    engine.perform(0.5, 0.5, voice=1, route=A)
    with pytest.raises(ControlError, match="at most 2 voices"):
        engine.perform(0.5, 0.5, voice=2, route=A)


def test_a_sender_whose_voice_was_forgotten_gets_a_fresh_one_by_playing_again(predictor):
    loop, engine, _ = make(predictor)
    engine.perform(0.5, 0.5, route=A)  # A's voice, found by its sender: number 0
    engine.perform(0.5, 0.5, route=B)  # B's: number 1
    outlive(loop, engine, keep=[(None, B)])
    assert engine.voice(0) is None
    engine.perform(0.5, 0.5, route=A)  # A again: a new voice, fresh
    v = engine.voice(0)
    assert v is not None and v.route == A and v.inputs == 1
    engine.perform(0.5, 0.5, route=A)  # and later events find it
    assert v.inputs == 2 and len(engine.voices) == 2


def test_the_running_surprise_of_a_forgotten_voice_starts_again(predictor):
    loop, engine, played = make(predictor, watch=True)
    for i in range(5):
        engine.perform(0.1 + 0.15 * i, 0.9 - 0.15 * i, route=A)
        loop.advance(0.01)
    outlive(loop, engine, keep=[(None, B)])
    played.surprises.clear()
    engine.perform(0.5, 0.5, route=("127.0.0.1", 9003))  # a newcomer on the forgotten number 0
    loop.advance(0.01)
    mine = [(nll, smoothed) for nll, smoothed, voice in played.surprises if voice == 0]
    assert len(mine) == 1 and mine[0][0] == mine[0][1]  # its first figure is its own, not an average with A's


def test_voice_options_accept_their_edges_and_refuse_past_them() -> None:
    """One voice and MAX_VOICE_LIMIT are allowed, 0 and one more are not; any finite timeout above 0 is."""
    for limit in (1, MAX_VOICE_LIMIT):
        assert VoiceOptions(limit=limit, per_sender_limit=limit).limit == limit
    for limit in (0, MAX_VOICE_LIMIT + 1):
        with pytest.raises(ValueError, match=f"^max_voices must be 1-{MAX_VOICE_LIMIT}, got {limit}$"):
            VoiceOptions(limit=limit)
        with pytest.raises(ValueError, match=f"^max_voices_per_sender must be 1-{MAX_VOICE_LIMIT}, got {limit}$"):
            VoiceOptions(per_sender_limit=limit)
    assert VoiceOptions(timeout=0.5).timeout == 0.5
    for timeout in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="^voice_timeout must be a finite number of seconds > 0"):
            VoiceOptions(timeout=timeout)
