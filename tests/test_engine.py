"""The engine's timing and controls on a virtual clock (`tests.rig`): exact schedules, rate floors, stalls, resets, swaps."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.event import Event
from server.live.controls import ControlError
from server.live.engine import RATE_BURST, Engine, Settings
from server.live.modes import Mode
from server.model.predictor import Predictor
from tests.rig import VirtualLoop, build_engine

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default"


class Spy:
    """Wraps a Predictor and records what it observes."""

    def __init__(self, predictor: Predictor) -> None:
        self._p = predictor
        self.observed: list[tuple[float, float, float]] = []
        self.resets = 0

    def observe(self, dt: float, x: float, y: float) -> np.ndarray:
        self.observed.append((dt, x, y))
        return self._p.observe(dt, x, y)

    def reset(self) -> None:
        self.resets += 1
        self._p.reset()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._p, name)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load(DEFAULT)


SILENCED: dict[Engine, list] = {}  # each engine `make` built -> what its outputs were told to release


def make(mode: Mode, predictor: Predictor, seed: int = 1, **settings: Any) -> tuple[VirtualLoop, Engine, list[Event], Spy]:
    loop = VirtualLoop()
    predictor.reset()
    spy = Spy(predictor)
    engine, played = build_engine(loop, spy, Settings(mode=mode, **settings), seed=seed)
    SILENCED[engine] = played.silenced
    return loop, engine, played.events, spy


def model_events(events: list[Event]) -> list[Event]:
    return [e for e in events if e.source == "model"]


# --------------------------------------------------------------------------- the schedule


def test_generate_keeps_an_absolute_schedule_with_no_drift(predictor):
    loop, engine, events, _ = make(Mode.GENERATE, predictor, timescale=0.5)
    start = loop.now
    engine.start()
    loop.advance(300.0)
    out = model_events(events)
    assert len(out) > 500
    gap = 1.0 / engine.settings.max_rate
    previous = start
    for e in out:  # each event is its wait after the previous one's *scheduled* time, exactly
        assert e.time == max(previous + e.dt, previous + gap)
        previous = e.time
    # no drift: the last event is where the sum of the waits puts it
    assert out[-1].time == pytest.approx(start + math.fsum(max(e.dt, gap) for e in out), abs=1e-6)
    assert engine.lateness.percentile(100) == 0.0
    engine.stop()


def test_max_rate_holds_at_any_timescale_in_generate(predictor):
    loop, engine, events, _ = make(Mode.GENERATE, predictor, timescale=1e-4)
    engine.start()
    loop.advance(10.0)
    out = model_events(events)
    rate = 200  # the README: most model events per second per voice, by default
    assert rate * 10 * 0.9 <= len(out) <= rate * 10 + 1  # it plays, at the floor, not faster
    assert min(b.time - a.time for a, b in zip(out, out[1:])) >= 1 / rate - 1e-12
    engine.stop()


def test_max_rate_holds_in_accompany_under_a_flood(predictor):
    loop, engine, events, _ = make(Mode.ACCOMPANY, predictor, timescale=1e-4, max_rate=50.0)
    for i in range(2000):  # 1,000 performer events per second for 2 s
        engine.perform((i % 100) / 100, 0.5)
        loop.advance(0.001)
    loop.advance(1.0)
    out = model_events(events)
    assert len(out) <= 50 * 3 + RATE_BURST  # 3 s of playing at most, plus one burst
    assert len(out) >= 50 * 2 * 0.8  # and it does keep answering
    assert engine.counts["rate_dropped"] == 2000 - len(out) - engine.counts["late_dropped"] - engine.counts["dropped"]
    engine.stop()


def test_respond_chain_also_obeys_max_rate(predictor):
    loop, engine, events, _ = make(Mode.RESPOND, predictor, timescale=1e-5, threshold=0.1, max_rate=20.0)
    engine.perform(0.5, 0.5)
    loop.advance(5.1)
    out = model_events(events)
    assert 20 * 5 * 0.9 <= len(out) <= 20 * 5 + 1
    engine.stop()


# --------------------------------------------------------------------------- arrival times and stalls


def test_dt_is_measured_from_arrival_not_from_processing(predictor):
    loop, engine, events, spy = make(Mode.LISTEN, predictor)
    t = loop.now
    loop.stall(2.0)  # three events arrived during a stall, 0.25 s apart, handled together now
    for i in range(3):
        engine.perform(0.1 * i, 0.5, at=t + 0.25 * i)
    assert [round(dt, 9) for dt, _, _ in spy.observed] == [0.0, 0.25, 0.25]
    assert [e.time for e in events] == [t, t + 0.25, t + 0.5]  # logged at their arrival


def test_an_arrival_time_in_the_future_or_not_finite_counts_as_now(predictor):
    loop, engine, events, _ = make(Mode.LISTEN, predictor)
    engine.perform(0.5, 0.5, at=loop.now + 100.0)
    engine.perform(0.5, 0.5, at=math.nan)
    assert [e.time for e in events] == [loop.now, loop.now]


def test_answers_due_during_a_stall_are_dropped_and_counted_not_played_in_a_burst(predictor):
    loop, engine, events, _ = make(Mode.ACCOMPANY, predictor, timescale=0.01)
    for _ in range(10):
        engine.perform(0.5, 0.5)
    assert engine.status()["pending"] == 10
    loop.stall(0.5)
    loop.advance(0.001)
    assert model_events(events) == []
    assert engine.counts["late_dropped"] == 10
    # answers to events that arrived before a stall and are already overdue are dropped as well
    t = loop.now
    loop.stall(1.0)
    for i in range(5):
        engine.perform(0.5, 0.5, at=t + 0.01 * i)
    loop.advance(1.0)
    assert model_events(events) == [] and engine.counts["late_dropped"] == 15


def test_generate_resumes_from_now_after_a_stall(predictor):
    loop, engine, events, _ = make(Mode.GENERATE, predictor, timescale=0.02)
    engine.start()
    loop.advance(2.0)
    before = len(model_events(events))
    loop.stall(3.0)
    resumed = loop.now
    loop.advance(0.03)
    after = model_events(events)[before:]
    assert engine.counts["late_dropped"] == 1  # the one event that was due: skipped
    # no catching up: the chain starts again from now, each event its own wait after the last
    # (and at least 1/max_rate after the last one played)
    previous, played = resumed, model_events(events)[before - 1].time
    for e in after:
        assert e.time == max(previous + e.dt, played + 1 / engine.settings.max_rate)
        previous = played = e.time
    engine.stop()


# --------------------------------------------------------------------------- controls


def test_timescale_change_reschedules_pending_output_from_now(predictor):
    loop, engine, events, _ = make(Mode.GENERATE, predictor, timescale=1.0)
    engine.start()
    loop.advance(1.0)
    engine.set_timescale(1e6)  # everything pending is now days away
    loop.advance(10.0)
    quiet = len(model_events(events))
    engine.set_timescale(1.0)
    pending_wait = engine.voice(0).chain.dt  # the model's next predicted wait
    changed = loop.now
    loop.advance(pending_wait + 0.011)
    later = model_events(events)[quiet:]
    assert later, "generate resumed"
    assert later[0].time <= changed + pending_wait + 1e-9
    engine.stop()


def test_timescale_change_reschedules_accompaniment_answers(predictor):
    loop, engine, events, _ = make(Mode.ACCOMPANY, predictor, timescale=1e6)
    engine.perform(0.5, 0.5)
    loop.advance(5.0)
    assert model_events(events) == []
    engine.set_timescale(1.0)
    loop.advance(5.1)
    assert len(model_events(events)) == 1 and engine.counts["late_dropped"] == 0


def test_reset_in_generate_cancels_the_old_chain_and_starts_from_zero(predictor):
    loop = VirtualLoop()
    predictor.reset()
    spy = Spy(predictor)
    engine, played = build_engine(loop, spy, Settings(mode=Mode.GENERATE, timescale=0.05))
    engine.start()
    loop.advance(1.0)
    stale = engine.voice(0).chain
    observed = len(spy.observed)
    engine.reset()
    assert stale.handle is None and played.silenced == [(loop.now, None)] and spy.resets == 1
    assert np.all(predictor.state == 0)
    fresh = engine.voice(0).chain
    assert fresh is not stale
    loop.advance(fresh.when - loop.now)
    # the first event fed to the zeroed state is the one sampled after the reset, not the stale one
    assert spy.observed[observed] == (fresh.dt, *fresh.values)
    assert (stale.dt, *stale.values) not in spy.observed[observed:]
    engine.stop()


def test_reset_in_respond_cancels_the_takeover_and_waits_for_the_performer(predictor):
    loop, engine, events, _ = make(Mode.RESPOND, predictor, timescale=0.05, threshold=0.5)
    engine.perform(0.5, 0.5)
    loop.advance(0.2)
    engine.reset()
    loop.advance(3.0)
    assert model_events(events) == []  # nothing from before the reset plays
    engine.perform(0.2, 0.2)
    assert engine.voice(0).fresh is False
    loop.advance(1.0)
    assert model_events(events) and model_events(events)[0].time >= events[1].time + 0.5


def test_reset_in_accompany_cancels_answers_already_scheduled(predictor):
    loop, engine, events, _ = make(Mode.ACCOMPANY, predictor, timescale=1.0)
    for _ in range(5):
        engine.perform(0.5, 0.5)
    engine.reset()
    loop.advance(10.0)
    assert model_events(events) == [] and engine.status()["pending"] == 0


def test_threshold_sets_when_respond_takes_over_even_while_waiting(predictor):
    loop, engine, events, _ = make(Mode.RESPOND, predictor, timescale=0.05, threshold=0.5)
    engine.perform(0.5, 0.5)
    last = loop.now
    loop.advance(0.3)
    engine.set_threshold(2.0)  # the performer asks for more room while the model waits
    loop.advance(1.5)
    assert model_events(events) == []
    loop.advance(1.0)
    out = model_events(events)
    assert out and out[0].time >= last + 2.0
    engine.perform(0.4, 0.4)  # the performer plays again: the model stops at once
    count = len(model_events(events))
    loop.advance(1.9)
    assert len(model_events(events)) == count


def test_bad_control_values_are_refused_and_change_nothing(predictor):
    loop, engine, _, _ = make(Mode.ACCOMPANY, predictor)
    for call in (lambda: engine.set_timescale(0.0), lambda: engine.set_timescale(math.inf),
                 lambda: engine.set_temperature(-1.0), lambda: engine.set_threshold(math.nan),
                 lambda: engine.set_mode("loud"), lambda: engine.perform(math.nan, 0.5),
                 lambda: engine.load_model("../default"), lambda: engine.load_model("default\n")):
        with pytest.raises(ControlError):
            call()
    s = engine.settings
    assert (s.timescale, s.temperature, s.threshold, s.mode) == (1.0, 1.0, 1.5, Mode.ACCOMPANY)


# --------------------------------------------------------------------------- model swaps


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name in ("a", "b"):
        shutil.copytree(DEFAULT, root / name)
    (root / "broken").mkdir()
    (root / "broken" / "model.json").write_text("{}")
    return root


def swap_engine(models: Path) -> tuple[VirtualLoop, Engine, list[Event]]:
    loop = VirtualLoop()
    engine, played = build_engine(loop, Predictor.load(models / "a"), Settings(mode=Mode.GENERATE, timescale=0.1),
                                  seed=3, models_dir=models, model_name="a")
    return loop, engine, played.events


def test_the_swap_asked_for_last_wins(two_models):
    loop, engine, _ = swap_engine(two_models)
    engine.load_model("b")
    engine.load_model("a")
    engine.load_model("b")
    assert engine.status()["loading"] == "b"
    loop.advance(0.001)
    assert engine.model_name == "b" and engine.counts["model_swaps"] == 1 and engine.status()["loading"] == ""


def test_a_failed_load_keeps_the_old_model_playing_and_names_no_path(two_models):
    loop, engine, events = swap_engine(two_models)
    engine.start()
    loop.advance(1.0)
    errors: list[str] = []
    for name in ("broken", "missing"):
        engine.load_model(name, errors.append)
    loop.advance(1.0)
    assert len(errors) == 1  # the later request superseded the first
    assert "missing" in errors[0] and "keeping 'a'" in errors[0]
    engine.load_model("broken", errors.append)
    loop.advance(1.0)
    assert "broken" in errors[1] and "model.json" in errors[1]
    assert all(str(two_models) not in e and "/tmp" not in e for e in errors)
    assert engine.model_name == "a" and engine.counts["model_load_errors"] == 2
    before = len(model_events(events))
    loop.advance(2.0)
    assert len(model_events(events)) > before  # still playing
    engine.stop()


def test_a_symlink_out_of_the_models_folder_is_refused(two_models, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(DEFAULT, outside)
    (two_models / "sneaky").symlink_to(outside)
    loop, engine, _ = swap_engine(two_models)
    errors: list[str] = []
    engine.load_model("sneaky", errors.append)
    loop.advance(0.01)
    assert engine.model_name == "a" and errors and "outside the models folder" in errors[0]
    assert str(outside) not in errors[0]


def test_every_status_key_is_documented_and_every_documented_key_is_sent(predictor):
    from server.live.engine import STATUS_KEYS

    _, engine, _, _ = make(Mode.ACCOMPANY, predictor)
    shared = [k for k in STATUS_KEYS if not k.startswith("voice<n>_")]
    assert list(engine.status()) == shared
    # per-sender: each playing voice adds its own keys, as documented by the voice<n>_ pattern
    from server.live.voices import VoiceOptions, VoicePolicy

    loop = VirtualLoop()
    engine, _ = build_engine(loop, predictor, Settings(), seed=1, voices=VoiceOptions(VoicePolicy.PER_SENDER))
    engine.perform(0.5, 0.5, route=("127.0.0.1", 9000))
    engine.perform(0.5, 0.5, voice=3)
    per_voice = [k.replace("<n>", str(n)) for n in (0, 3) for k in STATUS_KEYS if k.startswith("voice<n>_")]
    assert list(engine.status()) == shared + per_voice
    assert engine.status()["voice0_from"] == "127.0.0.1:9000" and engine.status()["voices"] == 2


def test_streams_see_a_quick_run_whole_and_thin_a_sustained_flood(predictor):
    """The surprise stream's budget is a bucket: 20 notes in 0.2 s are all scored; 2 s at 200/s get rate x time."""
    loop = VirtualLoop()
    predictor.reset()
    engine, played = build_engine(loop, predictor, Settings(mode=Mode.LISTEN), watch=True, stream_rate=30.0)
    scored = played.surprises
    for i in range(20):
        engine.perform(0.3 + 0.01 * i, 0.5)
        loop.advance(0.01)
    assert len(scored) == 20
    loop.advance(2.0)  # the bucket refills
    scored.clear()
    for i in range(400):
        engine.perform(0.5, 0.3 + 0.001 * i)
        loop.advance(0.005)
    assert 30 + 2.0 * 30 - 2 <= len(scored) <= 30 + 2.0 * 30 + 2
