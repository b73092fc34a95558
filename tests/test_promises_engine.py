"""What the README promises about the live engine, each at its edge, on a virtual clock (`tests.rig`).

Every number here is written as the README states it, never imported from the code: a
test that imports a constant follows the constant when it changes, and cannot fail.
Closed forms (the greedy answer, the mixture the stream should show, the running
surprise) are computed here with numpy from the model's own parameters and its
`model.json`, not by calling the code under test.

Only the engine's public surface is used: `build_engine` and `Played`, the controls,
`status()`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.event import Event
from server.live.controls import ControlError
from server.live.engine import Settings
from server.live.modes import Mode
from server.live.voices import VoiceOptions, VoicePolicy
from server.model.predictor import Predictor
from tests.rig import VirtualLoop, build_engine

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default"
A, B, C = ("127.0.0.1", 9001), ("127.0.0.1", 9002), ("127.0.0.1", 9003)

# The README's numbers.
MAX_RATE = 200  # model events per second per voice, by default
BURST = 8  # "a chord of up to 8 still sounds"
LATE_LIMIT = 0.050  # "more than 50 ms late" is dropped
PENDING = 256  # "answers dropped because 256 were already waiting in their voice"
STEP_WINDOW = 2048  # "median over the last 2,048 steps"
MAX_LOOKAHEAD = 2.0  # "0-2 s"
MAX_VOICES = 16
VOICE_TIMEOUT = 60.0
THRESHOLD = 1.5
STREAM_RATE = 30  # "at most 30 a second ... after a burst of 30"
SMOOTHING = 0.1  # "a running figure over about the last ten events"

# A phrase whose mixtures are far from one-hot (the likeliest component weighs 0.5-0.9), so sampling
# at temperature 1 and picking greedily tell apart; 0.125 s apart so every time and dt is exact in binary.
PHRASE = [(0.1, 0.9), (0.9, 0.1), (0.1, 0.1), (0.9, 0.9), (0.5, 0.5), (0.2, 0.7)]
GAP = 0.125


@pytest.fixture(scope="module")
def model() -> Predictor:
    return Predictor.load(DEFAULT)


@pytest.fixture(scope="module")
def norm() -> dict[str, Any]:
    info = json.loads((DEFAULT / "model.json").read_text())
    n = info["normalisation"]
    return {"K": info["spec"]["mixtures"], "D": info["spec"]["dims"],
            **{k: np.asarray(n[k], np.float64) for k in ("shift", "scale", "offset", "clip_min", "clip_max")}}


def engine_for(model: Predictor, mode: Mode = Mode.ACCOMPANY, *, per_sender: bool = False, watch: bool = False,
               predictor: Any = None, voices: VoiceOptions | None = None,
               **settings: Any) -> tuple[VirtualLoop, Any, Any]:
    """An engine on a fresh state of the default model, started; seed 1."""
    loop = VirtualLoop()
    if voices is None and per_sender:
        voices = VoiceOptions(VoicePolicy.PER_SENDER)
    engine, played = build_engine(loop, predictor or model.fork(), Settings(mode=mode, **settings), voices=voices,
                                  watch=watch)
    engine.start()
    return loop, engine, played


def play_phrase(loop: VirtualLoop, engine: Any, routes: tuple[Any, ...], settle: float = 8.0) -> None:
    """Each route plays PHRASE, interleaved, GAP apart; then every answer (dt <= 5 s) has time to play."""
    for x, y in PHRASE:
        for route in routes:
            engine.perform(x, y, route=route)
        loop.advance(GAP)
    loop.advance(settle)


def answers(events: list[Event]) -> list[tuple[float, float, float]]:
    """(dt, x, y) of each answer, in the order of the performer events they answer."""
    return [(e.dt, e.x, e.y) for e in sorted(events, key=lambda e: e.time - e.dt)]


def phrase_params(model: Predictor) -> list[np.ndarray]:
    """The model's parameters after each event of PHRASE from a zero state (dt 0 first, then GAP)."""
    p = model.fork()
    return [np.asarray(p.observe(0.0 if i == 0 else GAP, x, y), np.float64).copy() for i, (x, y) in enumerate(PHRASE)]


def split(params: np.ndarray, norm: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The documented layout: [means (K*D) | scales (K*D) | logits (K)], grouped by component."""
    k, d = norm["K"], norm["D"]
    return params[:k * d].reshape(k, d), params[k * d:2 * k * d].reshape(k, d), params[2 * k * d:]


def original_units(z: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """Normalised -> seconds and positions: dt through exp(.) - offset, all clipped to the valid range."""
    f = z * norm["scale"] + norm["shift"]
    f[..., 0] = np.exp(f[..., 0]) - norm["offset"][0]
    return np.clip(f, norm["clip_min"], norm["clip_max"])


# --------------------------------------------------------------------------- 1. a voice's own temperatures


def test_a_voices_own_temperatures_reach_its_sampler_and_no_other_voice(model, norm):
    loop, engine, played = engine_for(model, per_sender=True)
    for route in (A, B, C):
        engine.perform(0.5, 0.5, route=route)  # voices 0, 1, 2
    engine.set_temperature(0.0, 0, A)  # voice 0: greedy (each voice set by its own sender)
    engine.set_sigma_temperature(0.0, 0, A)
    engine.set_sigma_temperature(0.0, 1, B)  # voice 1: the components' means, picked at the global temperature 1
    engine.set_temperature(0.0, 2, C)  # voice 2: the likeliest component, still spread by the global sigma 1
    takes: dict[int, list[list[tuple[float, float, float]]]] = {0: [], 1: [], 2: []}
    for _ in range(3):
        for n, route in zip(takes, (A, B, C)):
            engine.reset(n, route)
        before = {n: len(played.model(n)) for n in takes}
        play_phrase(loop, engine, (A, B, C))
        for n in takes:
            takes[n].append(answers(played.model(n)[before[n]:]))
    assert all(len(take) == len(PHRASE) for n in takes for take in takes[n])
    # voice 0 answers the same phrase the same way every time: the greedy prediction
    assert takes[0][0] == takes[0][1] == takes[0][2]
    greedy = []
    for params in phrase_params(model):
        means, _, logits = split(params, norm)
        greedy.append(tuple(original_units(means[int(np.argmax(logits))], norm)))
    assert takes[0][0] == [pytest.approx(g, rel=1e-9, abs=1e-12) for g in greedy]
    # ... which is what a global temperature 0 gives
    loop_g, engine_g, greedy_played = engine_for(model, temperature=0.0, sigma_temperature=0.0)
    play_phrase(loop_g, engine_g, (None,))
    assert answers(greedy_played.model()) == takes[0][0]
    # the others sample: voice 1 its component at the global temperature 1, voice 2 its place at the global sigma 1
    assert len({tuple(take) for take in takes[1]}) >= 2, "voice 1 picked the same components every time"
    assert len({tuple(take) for take in takes[2]}) == 3, "voice 2 answered a phrase the same way twice"
    assert engine.status()["temperature"] == 1.0 and engine.status()["sigma_temperature"] == 1.0


# --------------------------------------------------------------------------- 2. the mixture stream


def expected_mixture(params: np.ndarray, norm: dict[str, Any], temperature: float, sigma: float) -> np.ndarray:
    """`/mixture`'s values in closed form: K, softmax(logits / T) (one-hot at 0), then per component
    dt_median x_mean y_mean dt_log_sigma x_sigma y_sigma, the sigmas times the sigma temperature."""
    means, scales, logits = split(params, norm)
    if temperature == 0.0:
        weights = np.eye(norm["K"])[int(np.argmax(logits))]
    else:
        e = np.exp((logits - logits.max()) / temperature)
        weights = e / e.sum()
    locations = original_units(means, norm)
    spreads = scales * norm["scale"] * sigma
    return np.concatenate([[norm["K"]], weights, np.concatenate([locations, spreads], axis=1).ravel()])


def components(values: list[float], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weights [K], locations [K, 3], sigmas [K, 3] from a `/mixture` message's values."""
    assert values[0] == k and len(values) == 1 + k + 6 * k
    rows = np.asarray(values[1 + k:]).reshape(k, 6)
    return np.asarray(values[1:1 + k]), rows[:, :3], rows[:, 3:]


@pytest.mark.parametrize("temperature, sigma", [(1.0, 1.0), (1.0, 0.5), (0.5, 1.0), (2.0, 0.25), (0.0, 1.0)])
def test_mixture_weights_follow_temperature_and_sigmas_sigma_temperature(model, norm, temperature, sigma):
    loop, engine, played = engine_for(model, watch=True, temperature=temperature, sigma_temperature=sigma)
    play_phrase(loop, engine, (None,))
    mixtures = [values for values, voice in played.mixtures]
    assert len(mixtures) == len(PHRASE) and all(voice is None for _, voice in played.mixtures)
    for values, params in zip(mixtures, phrase_params(model)):
        assert np.asarray(values) == pytest.approx(expected_mixture(params, norm, temperature, sigma), rel=1e-6,
                                                   abs=1e-9)


def test_mixture_sigmas_at_half_the_sigma_temperature_are_exactly_half(model, norm):
    runs = {}
    for sigma in (1.0, 0.5):
        loop, engine, played = engine_for(model, watch=True, sigma_temperature=sigma)
        play_phrase(loop, engine, (None,))
        runs[sigma] = [components(values, norm["K"]) for values, _ in played.mixtures]
    assert len(runs[1.0]) == len(runs[0.5]) == len(PHRASE)
    for (w1, loc1, s1), (w2, loc2, s2) in zip(runs[1.0], runs[0.5]):
        assert (w1 == w2).all() and (loc1 == loc2).all()  # the same state, the same weights and places
        assert (s2 == s1 * 0.5).all() and (s1 > 0).all()  # every sigma exactly half


def test_a_voices_own_temperatures_reach_its_mixture_and_no_other_voice(model, norm):
    loop, engine, played = engine_for(model, per_sender=True, watch=True)
    for route in (A, B):
        engine.perform(0.5, 0.5, route=route)
    engine.set_sigma_temperature(0.5, 0, A)
    engine.set_temperature(0.5, 1, B)
    engine.reset(0, A)
    engine.reset(1, B)
    loop.advance(1.0)
    played.mixtures.clear()
    play_phrase(loop, engine, (A, B))  # both voices hear the same phrase: the same state, their own temperatures
    by_voice = {n: [values for values, voice in played.mixtures if voice == n] for n in (0, 1)}
    assert len(by_voice[0]) == len(by_voice[1]) == len(PHRASE)
    for v0, v1, params in zip(by_voice[0], by_voice[1], phrase_params(model)):
        assert np.asarray(v0) == pytest.approx(expected_mixture(params, norm, 1.0, 0.5), rel=1e-6, abs=1e-9)
        assert np.asarray(v1) == pytest.approx(expected_mixture(params, norm, 0.5, 1.0), rel=1e-6, abs=1e-9)


# --------------------------------------------------------------------------- 3. max_rate: the burst and the rate


def chord(engine: Any, notes: int, route: Any = None) -> None:
    for i in range(notes):
        engine.perform(0.1 + 0.05 * i, 0.5, route=route)


def test_a_chord_of_8_answers_sounds_and_a_9th_is_dropped(model):
    # timescale 1e-6: nine answers all within 5 us of each other, far closer than 1/max_rate
    loop, engine, played = engine_for(model, timescale=1e-6)
    chord(engine, BURST + 1)
    loop.advance(1.0)
    out = played.model()
    assert len(out) == BURST and engine.status()["rate_dropped"] == 1
    assert out[-1].time - out[0].time < 1 / MAX_RATE
    # the bucket refills: a second chord a second later sounds whole too, its 9th again dropped
    chord(engine, BURST + 1)
    loop.advance(1.0)
    assert len(played.model()) == 2 * BURST and engine.status()["rate_dropped"] == 2


def test_after_a_chord_answers_come_at_most_200_a_second(model):
    loop, engine, played = engine_for(model, timescale=1e-6)
    chord(engine, BURST)
    loop.advance(1 / MAX_RATE - 1e-4)  # not yet a token's worth of time
    chord(engine, 1)
    loop.advance(2e-4)  # now a token has come back
    chord(engine, 1)
    loop.advance(1.0)
    assert len(played.model()) == BURST + 1 and engine.status()["rate_dropped"] == 1


def test_the_burst_is_per_voice(model):
    loop, engine, played = engine_for(model, per_sender=True, timescale=1e-6)
    chord(engine, BURST + 1, A)
    chord(engine, BURST + 1, B)
    loop.advance(1.0)
    assert len(played.model(0)) == len(played.model(1)) == BURST
    assert engine.status()["rate_dropped"] == 2


@pytest.mark.parametrize("timescale", [1e-6, 1e-3, 1.0])
def test_generate_plays_at_most_200_events_a_second_at_any_timescale(model, timescale):
    loop, engine, played = engine_for(model, Mode.GENERATE, timescale=timescale)
    assert engine.status()["max_rate"] == MAX_RATE
    loop.advance(10.0)
    times = [e.time for e in played.model()]
    gaps = np.diff(times)
    assert len(times) > 10 and gaps.min() >= 1 / MAX_RATE - 1e-9
    if timescale == 1e-6:  # every wait is under the floor: it plays at the floor exactly, not slower
        assert gaps == pytest.approx(1 / MAX_RATE, abs=1e-9)
        assert MAX_RATE * 10 - 1 <= len(times) <= MAX_RATE * 10 + 1


# --------------------------------------------------------------------------- 4. the late limit


def first_answer(model: Predictor, mode: Mode) -> float:
    """How long after the start (generate) or the performer event (accompany) the first model event is due."""
    loop, engine, played = engine_for(model, mode)
    start = loop.now
    if mode is Mode.ACCOMPANY:
        engine.perform(0.3, 0.6)
    loop.advance(10.0)
    assert engine.status()["late_dropped"] == 0
    return played.model()[0].time - start


@pytest.mark.parametrize("mode", [Mode.ACCOMPANY, Mode.GENERATE])
@pytest.mark.parametrize("late, plays", [(0.040, True), (0.060, False)])
def test_an_event_40_ms_late_is_played_and_60_ms_late_is_dropped(model, mode, late, plays):
    due = first_answer(model, mode)
    loop, engine, played = engine_for(model, mode)
    start = loop.now
    if mode is Mode.ACCOMPANY:
        engine.perform(0.3, 0.6)
    loop.stall(due + late)  # the loop stalls past the event's time; nothing runs
    loop.advance(0.0)
    due_at = pytest.approx(start + due, abs=1e-9)
    firsts = [(t, e) for t, e in played.timed() if e.source == "model" and e.time == due_at]
    if plays:
        assert len(firsts) == 1 and engine.status()["late_dropped"] == 0
        left, event = firsts[0]
        assert left - event.time == pytest.approx(late, abs=1e-9)
    else:
        assert firsts == [] and engine.status()["late_dropped"] == 1


@pytest.mark.parametrize("late, plays", [(0.040, True), (0.060, False)])
def test_an_answer_to_an_event_that_arrived_during_a_stall_is_dropped_past_50_ms(model, late, plays):
    due = first_answer(model, Mode.ACCOMPANY)  # the first answer's wait does not depend on when it arrived
    loop, engine, played = engine_for(model)
    engine.perform(0.3, 0.6, at=loop.now - due - late)  # arrived long enough ago that its answer is `late` now
    assert len(played.model()) == int(plays) and engine.status()["late_dropped"] == int(not plays)


# --------------------------------------------------------------------------- 5. the running surprise


def ema(values: list[float]) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else out[-1] + SMOOTHING * (v - out[-1]))
    return out


def test_the_running_surprise_weighs_each_new_event_a_tenth(model):
    loop, engine, played = engine_for(model, Mode.LISTEN, watch=True)
    figure = [(0.5 + 0.4 * math.cos(i / 3), 0.5 + 0.4 * math.sin(i / 3)) for i in range(12)]
    figure += [(0.05, 0.95), (0.95, 0.05)] * 4  # jumps: the surprise moves a lot
    for x, y in figure:
        engine.perform(x, y)
        loop.advance(GAP)
    nll = [s[0] for s in played.surprises]
    smoothed = [s[1] for s in played.surprises]
    assert len(nll) == len(figure) and max(nll) - min(nll) > 5
    assert smoothed[0] == nll[0]
    assert smoothed == pytest.approx(ema(nll), rel=1e-12, abs=1e-12)


def test_each_voice_has_its_own_running_surprise(model):
    loop, engine, played = engine_for(model, Mode.LISTEN, per_sender=True, watch=True)
    for i in range(10):
        engine.perform(0.5 + 0.3 * math.cos(i), 0.5, route=A)
        engine.perform((0.05, 0.95)[i % 2], (0.95, 0.05)[i % 2], route=B)
        loop.advance(GAP)
    for n in (0, 1):
        mine = [(nll, smoothed) for nll, smoothed, voice in played.surprises if voice == n]
        assert len(mine) == 10
        assert [s for _, s in mine] == pytest.approx(ema([nll for nll, _ in mine]), rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------- 6. the other numbers


def test_256_answers_wait_per_voice_and_the_257th_drops_the_oldest(model):
    # A long timescale keeps every answer waiting; greedy, so none is due at once; no rate limit in the way.
    loop, engine, played = engine_for(model, voices=VoiceOptions(VoicePolicy.PER_SENDER, timeout=1e6), timescale=1e4,
                                      temperature=0.0, sigma_temperature=0.0, max_rate=1e9)
    now = loop.now
    causes = [now - 0.001 * (PENDING - i) for i in range(PENDING + 1)]  # distinct arrival times, oldest first
    for at in causes[:PENDING]:
        engine.perform(0.3, 0.6, at=at, route=A)
    assert (engine.status()["pending"], engine.status()["dropped"]) == (PENDING, 0)
    engine.perform(0.7, 0.2, route=B)  # another voice's answer waits in its own voice
    assert (engine.status()["pending"], engine.status()["dropped"]) == (PENDING + 1, 0)
    engine.perform(0.3, 0.6, at=causes[PENDING], route=A)
    assert (engine.status()["pending"], engine.status()["dropped"]) == (PENDING + 1, 1)
    loop.advance(6e4)
    answered = sorted(e.time - e.dt for e in played.model(0))
    assert answered == pytest.approx(causes[1:], abs=1e-6)  # the oldest was dropped, every other one played
    assert len(played.model(1)) == 1 and engine.status()["late_dropped"] == 0


def test_lookahead_is_0_to_2_seconds(model):
    _, engine, _ = engine_for(model)
    assert engine.status()["lookahead"] == 0.0  # the default: plain messages when due
    for ok in (MAX_LOOKAHEAD, 0.0, 0.05, MAX_LOOKAHEAD):
        engine.set_lookahead(ok)
        assert engine.status()["lookahead"] == ok
    for bad in (MAX_LOOKAHEAD + 0.0001, -0.0001, math.inf, math.nan):
        with pytest.raises(ControlError):
            engine.set_lookahead(bad)
    assert engine.status()["lookahead"] == MAX_LOOKAHEAD


@pytest.mark.parametrize("control, edge, refused", [
    ("set_temperature", 0.0, -1e-9), ("set_sigma_temperature", 0.0, -1e-9), ("set_threshold", 0.0, -1e-9),
    ("set_timescale", 1e-9, 0.0)])
def test_controls_accept_their_edge_and_refuse_beyond_it(model, control, edge, refused):
    """temperature, sigma_temperature and threshold >= 0; timescale > 0."""
    _, engine, _ = engine_for(model)
    key = control.removeprefix("set_")
    getattr(engine, control)(edge)
    assert engine.status()[key] == edge
    with pytest.raises(ControlError):
        getattr(engine, control)(refused)
    assert engine.status()[key] == edge


def test_16_voices_play_and_a_17th_is_refused(model):
    loop, engine, _ = engine_for(model, per_sender=True)
    for port in range(MAX_VOICES):
        engine.perform(0.5, 0.5, route=("127.0.0.1", 10000 + port))
    assert (engine.status()["voices"], engine.status()["voices_refused"]) == (MAX_VOICES, 0)
    with pytest.raises(ControlError):
        engine.perform(0.5, 0.5, route=("127.0.0.1", 20000))
    assert (engine.status()["voices"], engine.status()["voices_refused"]) == (MAX_VOICES, 1)
    _, fresh, _ = engine_for(model, per_sender=True)
    fresh.perform(0.5, 0.5, voice=MAX_VOICES - 1)  # numbers 0 to 15
    with pytest.raises(ControlError):
        fresh.perform(0.5, 0.5, voice=MAX_VOICES)
    assert fresh.status()["voices"] == 1 and "voice15_inputs" in fresh.status()


def test_a_voice_silent_for_60_s_is_forgotten_and_not_before(model):
    loop, engine, _ = engine_for(model, per_sender=True)
    engine.perform(0.5, 0.5, route=A)
    loop.advance(VOICE_TIMEOUT - 0.001)
    assert engine.status()["voices"] == 1 and engine.status()["voice0_idle_s"] == VOICE_TIMEOUT  # 59.999, to 0.1
    loop.advance(0.002)
    assert engine.status()["voices"] == 0 and engine.status()["voices_expired"] == 1
    # playing keeps a voice: its 60 s count from its performer's last event
    engine.perform(0.5, 0.5, route=B)
    loop.advance(30.0)
    engine.perform(0.5, 0.5, route=B)
    loop.advance(VOICE_TIMEOUT - 0.001)
    assert engine.status()["voices"] == 1
    loop.advance(0.002)
    assert engine.status()["voices"] == 0 and engine.status()["voices_expired"] == 2


@pytest.mark.parametrize("threshold", [None, 0.25, 0.0])
def test_respond_takes_over_exactly_threshold_after_the_last_performer_event(model, threshold):
    loop, engine, played = engine_for(model, Mode.RESPOND, watch=True)
    if threshold is None:
        threshold = THRESHOLD  # the default
    else:
        engine.set_threshold(threshold)
    assert engine.status()["threshold"] == threshold
    engine.perform(0.3, 0.3)
    loop.advance(0.5)
    engine.perform(0.4, 0.4)  # the performer plays again (with threshold 0 the model had taken over: it stops)
    last = loop.now
    sampled, answered = len(played.mixtures), len(played.model())
    if threshold > 0:
        loop.advance(threshold - 1e-6)
        assert (len(played.mixtures), len(played.model())) == (sampled, answered)  # the performer has the floor
    loop.advance(2e-6)
    assert len(played.mixtures) == sampled + 1  # the takeover sampled its first event
    loop.advance(10.0)
    first = played.model()[answered]
    assert first.time - first.dt == pytest.approx(last + threshold, abs=1e-9)  # its wait counts from the takeover


def test_status_step_figures_cover_the_last_2048_steps(model, monkeypatch):
    """Step i (from 1) takes i microseconds on a fake clock; the median is that of the last 2,048 steps only."""
    clock = [0]

    class Timed:
        def __init__(self, predictor: Predictor) -> None:
            self._p, self.steps = predictor, 0

        def observe(self, dt: float, x: float, y: float) -> np.ndarray:
            self.steps += 1
            clock[0] += self.steps * 1000  # nanoseconds
            return self._p.observe(dt, x, y)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._p, name)

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0] * 1e-9)
    steps = 3000
    loop, engine, _ = engine_for(model, Mode.LISTEN, predictor=Timed(model.fork()))
    for i in range(steps):
        engine.perform(0.5, 0.5)
        loop.advance(0.01)
    window = np.arange(steps - STEP_WINDOW + 1, steps + 1)  # microseconds
    status = engine.status()
    assert status["step_us_median"] == pytest.approx(float(np.median(window)), abs=0.051)
    assert status["step_us_p99"] == pytest.approx(float(np.percentile(window, 99)), abs=0.051)


def test_streams_score_a_quick_run_of_30_whole_then_30_a_second(model):
    loop, engine, played = engine_for(model, watch=True)  # accompany: each event is scored and sampled
    chord(engine, STREAM_RATE + 1)  # 31 events at one instant
    loop.advance(0.0)
    assert len(played.surprises) == len(played.mixtures) == STREAM_RATE  # each stream its own 30; the 31st skipped
    loop.advance(0.5)  # half a second: 15 more each
    chord(engine, STREAM_RATE // 2 + 1)
    loop.advance(0.0)
    assert len(played.surprises) == len(played.mixtures) == STREAM_RATE + STREAM_RATE // 2


def test_the_server_runs_with_the_readmes_defaults():
    import argparse

    from server.config import ConfigError, add_run_arguments, resolve_run_config

    def resolve(*argv: str) -> Any:
        parser = argparse.ArgumentParser()
        add_run_arguments(parser)
        return resolve_run_config(parser.parse_args(list(argv)))

    cfg = resolve()
    assert (cfg.max_rate, cfg.max_voices, cfg.voice_timeout, cfg.lookahead, cfg.threshold) == (
        MAX_RATE, MAX_VOICES, VOICE_TIMEOUT, 0.0, THRESHOLD)
    assert resolve("--lookahead", "2").lookahead == MAX_LOOKAHEAD
    assert (resolve("--max-voices", "1").max_voices, resolve("--max-voices", "128").max_voices) == (1, 128)
    for argv in (("--lookahead", "2.0001"), ("--lookahead", "-0.0001"), ("--max-voices", "0"),
                 ("--max-voices", "129")):
        with pytest.raises(ConfigError):
            resolve(*argv)
