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
                                           ("set_threshold", "threshold"), ("set_lookahead", "lookahead")])
def test_a_refused_value_is_named_by_its_control(predictor, control, name):
    _, engine, _ = make(predictor)
    with pytest.raises(ControlError) as refused:
        getattr(engine, control)(-1.0)
    assert str(refused.value) == f"{name} must be >= 0, got -1"


def test_a_lookahead_beyond_its_bound_is_refused_with_the_bound(predictor):
    _, engine, _ = make(predictor)
    with pytest.raises(ControlError) as refused:
        engine.set_lookahead(3.0)
    assert str(refused.value) == "lookahead must be at most 2 s, got 3"


def test_a_sender_refused_another_senders_voice_is_told_what_to_do_instead(predictor):
    _, engine, _ = make(predictor, per_sender=True)
    engine.perform(0.5, 0.5, route=A)
    with pytest.raises(ControlError) as refused:
        engine.perform(0.5, 0.5, voice=0, route=B)
    assert str(refused.value).endswith("a voice answers only to the sender that opened it "
                                       "(name one of your own voices, or none for the global setting)")
    with pytest.raises(ControlError, match="^voice 0 belongs to another sender"):  # steering it, too
        engine.set_temperature(0.5, voice=0, route=B)


# --------------------------------------------------------------------------- respond


def test_a_new_threshold_does_not_make_respond_play_before_its_performer_has(predictor):
    loop, engine, played = make(predictor, Mode.RESPOND, timescale=0.05, threshold=0.5)
    engine.set_threshold(0.2)
    loop.advance(5.0)
    assert played.model() == []


def test_a_new_timescale_does_not_make_respond_play_before_its_performer_has(predictor):
    loop, engine, played = make(predictor, Mode.RESPOND, timescale=0.05, threshold=0.5)
    engine.set_timescale(0.1)
    loop.advance(5.0)
    assert played.model() == []


def test_respond_unpaused_after_its_performer_played_takes_over_the_silence(predictor):
    """Pausing cancels the takeover; unpausing arms it again, because the performer has played (and the
    silence since is longer than the threshold)."""
    loop, engine, played = make(predictor, Mode.RESPOND, timescale=1.0, threshold=0.2)
    engine.perform(0.5, 0.5)
    engine.set_paused(True)
    loop.advance(1.0)
    assert played.model() == []
    unpaused = loop.time()
    engine.set_paused(False)
    loop.advance(1.0)
    assert played.model() and all(e.time >= unpaused for e in played.model())


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


class FailingDisplay:
    """A `StreamSink` whose displays break: every figure handed to it raises."""

    def __init__(self) -> None:
        self.asked = 0

    def wants(self, stream: str) -> bool:
        return True

    def mixture(self, values: list[float], voice: int | None) -> None:
        self.asked += 1
        raise RuntimeError("display gone")

    def surprise(self, nll: float, smoothed: float, voice: int | None) -> None:
        self.asked += 1
        raise RuntimeError("display gone")


def test_each_failed_display_figure_is_counted_once_and_the_rest_still_computed(predictor):
    from server.live.streams import StreamMaths

    loop = VirtualLoop()
    counts = {"sink_errors": 0}
    display = FailingDisplay()
    streams = StreamMaths(loop, display, counts, rate=1000.0, burst=1000.0)
    predictor.reset()
    for i in range(3):
        streams.surprise(0, None, predictor, 0.1, (0.2 * i, 0.5))
        streams.mixture(0, None, predictor, 1.0, 1.0)
    loop.advance(0.0)
    assert display.asked == 6 and counts == {"sink_errors": 6}


# --------------------------------------------------------------------------- /status of voices


def test_a_voices_idle_time_is_shown_to_a_tenth_of_a_second_and_its_sender_by_name(predictor):
    loop, engine, _ = make(predictor, Mode.LISTEN, per_sender=True)
    engine.perform(0.5, 0.5, route=A)
    engine.perform(0.5, 0.5, route="midi channel 3")
    engine.perform(0.5, 0.5)  # an in-process caller: a voice with no sender to name
    loop.advance(2.34)
    status = engine.status()
    assert [status[f"voice{n}_idle_s"] for n in range(3)] == [2.3, 2.3, 2.3]
    assert [status[f"voice{n}_from"] for n in range(3)] == ["127.0.0.1:9001", "midi channel 3", ""]


def test_a_voice_number_that_cannot_be_used_is_refused_with_the_reason(predictor):
    _, one, _ = make(predictor)
    with pytest.raises(ControlError) as refused:
        one.perform(0.5, 0.5, voice=1)
    assert str(refused.value) == "voice numbers need voices = per-sender (this server plays one voice)"
    _, engine, _ = make(predictor, per_sender=True)
    for voice, reason in [(1.5, "voice must be an integer 0-15, got 1.5"), (True, "voice must be an integer 0-15, got True"),
                          (16, "voice must be 0-15, got 16"), (-1, "voice must be 0-15, got -1")]:
        with pytest.raises(ControlError) as refused:
            engine.perform(0.5, 0.5, voice=voice, route=A)
        assert str(refused.value) == reason


def test_a_sender_allowed_one_voice_opens_it_and_every_refusal_is_counted(predictor):
    loop = VirtualLoop()
    engine, _ = build_engine(loop, predictor, Settings(mode=Mode.LISTEN),
                             voices=VoiceOptions(VoicePolicy.PER_SENDER, 2, 60.0, 1))
    engine.perform(0.5, 0.5, route=A)  # its one voice
    engine.perform(0.5, 0.5, route=B)  # the other sender's
    for route in (("127.0.0.1", 9003), ("127.0.0.1", 9004)):  # all voices taken
        with pytest.raises(ControlError, match="all 2 voices are playing"):
            engine.perform(0.5, 0.5, route=route)
    assert engine.counts["voices_refused"] == 2 and len(engine.voices) == 2


def test_unpausing_shows_in_status_and_a_second_unpause_changes_nothing(predictor):
    loop, engine, played = make(predictor, Mode.GENERATE)
    engine.set_paused(True)
    assert engine.status()["paused"] == 1
    engine.set_paused(False)
    assert engine.status()["paused"] == 0
    loop.advance(1.0)
    heard = len(played.model())
    assert heard > 0
    engine.set_paused(False)  # already playing: not restarted, so the chain's schedule goes on undisturbed
    loop.advance(1.0)
    assert len(played.silenced) == 1  # only the pause released notes


def test_an_unknown_mode_is_refused_with_the_modes_there_are(predictor):
    _, engine, _ = make(predictor)
    with pytest.raises(ControlError) as refused:
        engine.set_mode("jam")
    assert str(refused.value) == "unknown mode 'jam'; expected one of respond, accompany, generate, listen"


def test_respond_heard_while_paused_does_not_take_over(predictor):
    loop, engine, played = make(predictor, Mode.RESPOND, timescale=0.05, threshold=0.3)
    engine.set_paused(True)
    engine.perform(0.5, 0.5)
    loop.advance(3.0)
    assert played.model() == []


def test_respond_takes_over_a_lookahead_early_so_its_first_event_is_on_time(predictor):
    loop, engine, played = make(predictor, Mode.RESPOND, timescale=0.05, threshold=0.5, lookahead=0.2)
    heard = loop.now
    engine.perform(0.5, 0.5)
    loop.advance(3.0)
    (left, first), *_ = [(t, e) for t, e in played.timed() if e.source == "model"]
    assert first.time == heard + 0.5 + first.dt  # its wait after the threshold, not after a late wake-up
    assert left == first.time - 0.2 and first.timetagged


# --------------------------------------------------------------------------- rescheduling


def test_answers_rescheduled_by_a_timescale_leave_the_pending_count_when_played(predictor):
    loop, engine, played = make(predictor, timescale=50.0)
    for i in range(3):
        engine.perform(0.3 + 0.2 * i, 0.5)
        loop.advance(0.01)
    assert engine.status()["pending"] == 3
    engine.set_timescale(0.5)
    loop.advance(60.0)
    assert len(played.model()) == 3 and engine.status()["pending"] == 0


def test_a_new_timescale_times_a_waiting_chain_event_from_its_cause(predictor):
    loop, engine, played = make(predictor, Mode.GENERATE, timescale=1.0)
    loop.advance(0.0)
    while not played.model():
        loop.advance(0.01)
    cause = played.model()[-1].time
    asked = loop.now
    engine.set_timescale(3.0)  # the next event, already waiting, is now three times its wait after its cause
    count = len(played.model())
    while len(played.model()) == count:
        loop.advance(0.01)
    following = played.model()[count]  # its dt is its wait at the new timescale
    assert following.time == max(asked, cause + following.dt, cause + 1.0 / engine.settings.max_rate)


def test_answers_waiting_when_the_lookahead_rises_leave_that_much_before_their_time(predictor):
    loop, engine, played = make(predictor, timescale=200.0)  # answers due many seconds from now
    for i in range(3):
        engine.perform(0.3 + 0.2 * i, 0.5)
        loop.advance(0.01)
    engine.set_lookahead(0.5)
    loop.advance(600.0)
    answers = [(t, e) for t, e in played.timed() if e.source == "model"]
    assert len(answers) == 3
    for left, e in answers:
        assert left == pytest.approx(e.time - 0.5) and e.timetagged


def test_an_answer_exactly_50_ms_late_still_plays_and_one_later_is_dropped() -> None:
    """The README drops what would leave *more than* 50 ms late: the edge itself still sounds."""
    from server.live.schedule import Scheduled

    event = Scheduled(start=0.0, dt=0.0, values=(0.5, 0.5))
    assert not event.late(0.050)
    assert event.late(0.0501)


def test_status_reports_the_median_and_99th_percentile_of_lateness_and_step_time_in_microseconds(predictor):
    """Four answers left 1, 2, 3 and 10 ms late: the median is 2.5 ms, the 99th percentile 9.79 ms (linear
    between the two highest); the step times likewise."""
    loop, engine, played = make(predictor)
    for seconds in (0.003, 0.001, 0.010, 0.002):
        engine.lateness.add(seconds)
        engine.latency.add(seconds / 10)
    status = engine.status()
    assert (status["late_us_median"], status["late_us_p99"]) == (2500.0, 9790.0)
    assert (status["step_us_median"], status["step_us_p99"]) == (250.0, 979.0)
