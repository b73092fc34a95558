"""The end of training is timed before it starts: the reserve, the steps it counts, the budget train keeps.

A one-minute run at size xs used to train ~35 s of its 60 (20 s were kept whatever the
model), while at size l the end took 18-19 s and a larger held-out set would overrun
`--minutes`. These tests hold the pieces: the reserve's formula at its edges, that the
steps counted are the steps `score` and `calibrate` really make (counted on a real tiny
model), that the timing times the step that scores, and that `train` gives the fit what
is left after the reserve.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from server.learn import finishing
from tests.tinynet import export_tiny, performance, tiny_info


def test_the_reserve_is_the_fixed_part_plus_the_margin_on_the_measured_steps():
    assert finishing.reserve_seconds(0.0, 0) == finishing.FIXED_S == 4.0
    assert finishing.reserve_seconds(1e-4, 10_000) == pytest.approx(4.0 + 1.5 * 1.0)
    assert finishing.reserve_seconds(2e-4, 86_760) == pytest.approx(4.0 + 1.5 * 17.352)  # size l-like on the chorales
    assert finishing.reserve_seconds(-1.0, -5) == 4.0  # nonsense never shrinks it below the fixed part


def test_the_steps_counted_are_held_out_events_and_calibration_play():
    from server.learn.calibrate import COARSE
    from server.learn.evaluate import CONTINUATION, MAX_OPENINGS, OPENING, ZERO_LENGTH, ZERO_LINES

    lengths = [1, 2, 8, 9, 50]  # 1 event: not scored, not played; 8: too short for an opening (> 8)
    held = [performance(n, seed=n) for n in lengths]
    candidates = len(COARSE) + 2
    assert candidates == 15
    opening = OPENING + CONTINUATION
    resets = ZERO_LINES + 2 + 1  # each primes the state with a step: the zero lines, the openings, and at the end
    assert finishing.finishing_steps(held) == (1 + 7 + 8 + 49) + candidates * (ZERO_LINES * ZERO_LENGTH + 2 * opening
                                                                               + resets)
    many = [performance(10, seed=i) for i in range(MAX_OPENINGS + 6)]  # openings stop at MAX_OPENINGS
    assert finishing.finishing_steps(many) == len(many) * 9 + candidates * (ZERO_LINES * ZERO_LENGTH
                                                                           + MAX_OPENINGS * (opening + 1)
                                                                           + ZERO_LINES + 1)


def test_the_count_is_what_score_and_calibrate_really_step(tmp_path):
    """A real tiny model, its step wrapped to count: scoring and calibration make exactly the steps counted
    (calibration tries every candidate here at most, so the count is an upper bound that is met or close)."""
    from server.learn.calibrate import calibrate
    from server.learn.data import Dataset
    from server.learn.evaluate import score
    from server.model.predictor import Predictor

    folder = export_tiny(tmp_path / "tiny")
    predictor = Predictor.load(folder)
    calls = {"n": 0}
    step = predictor.step

    def counting(z, state):
        calls["n"] += 1
        return step(z, state)

    held = [performance(n, seed=n) for n in (1, 5, 12, 30)]
    score(counting, predictor.info, Dataset.from_performances(held))
    scored = calls["n"]
    assert scored == 4 + 11 + 29
    predictor.step = counting
    found = calibrate(predictor, [p for p in held if len(p) >= 2], seed=0)
    played = calls["n"] - scored
    counted = finishing.finishing_steps(held) - scored
    tried = len(found.tried)
    assert played == counted * tried // 15  # each candidate tried plays the same steps
    assert 14 <= tried <= 15


def test_the_timing_times_the_step_that_will_score(monkeypatch):
    """A step made 2 ms slower must be measured at least 2 ms a step: the reserve follows the real step."""
    import time

    from server.learn import evaluate

    real = evaluate.step_for

    def slow_step_for(tflite, info, model=None):
        step = real(tflite, info, model)

        def slow(z, state):
            time.sleep(0.002)
            return step(z, state)
        return slow

    fast = finishing.step_seconds(tiny_info())
    assert 0 < fast < 0.002
    monkeypatch.setattr(evaluate, "step_for", slow_step_for)
    assert finishing.step_seconds(tiny_info()) >= 0.002


def test_train_gives_the_fit_the_budget_less_the_measured_reserve(tmp_path, monkeypatch):
    """On a clock that stands still, the fit gets minutes x 60 - reserve, the reserve from the measured step."""
    from server.learn import train as train_module
    from server.learn.synth import synthetic_dataset

    class Stop(Exception):
        pass

    seen = {}

    def fit_within(model, train_w, val_w, norm, budget, cfg, extra, strategy=None, folder=None):
        seen["budget"] = budget
        raise Stop

    steps = {}
    real_steps = finishing.finishing_steps

    def counted(held):
        steps["n"] = real_steps(held)
        return steps["n"]

    monkeypatch.setattr(train_module, "fit_within", fit_within)
    monkeypatch.setattr(train_module, "time", SimpleNamespace(monotonic=lambda: 100.0))
    monkeypatch.setattr(finishing, "step_seconds", lambda info: 1e-4)
    monkeypatch.setattr(finishing, "finishing_steps", counted)
    said: list[str] = []
    ds = synthetic_dataset(12, seed=6, phrases=4)
    with pytest.raises(Stop):
        train_module.train(ds, "budget", tmp_path, train_module.TrainConfig(size="xs", minutes=1.0, report=False),
                           echo=said.append)
    reserve = 4.0 + 1.5 * 1e-4 * steps["n"]
    assert seen["budget"] == pytest.approx(60.0 - reserve)
    assert any(line.startswith(f"keeping {reserve:.0f} s of the budget") and f"{steps['n']} steps at 100 us"
               in line for line in said), said
    with pytest.raises(Stop):  # a request shorter than the reserve still fits a second
        train_module.train(ds, "budget", tmp_path, train_module.TrainConfig(size="xs", minutes=0.05, report=False),
                           echo=said.append)
    assert seen["budget"] == 1.0
    assert np.isfinite(reserve)
