"""A model's own scale temperature: found at training on held-out data, kept in model.json, played from on stage.

Fast tests here, in this process: the search against a stand-in player whose lines are a
random walk with a known spread, `model.json`'s checks, and an engine on a virtual clock
playing at the model's temperature until `/sigma_temperature` says otherwise. The CLI,
training and a real server over OSC are in tests/test_notes.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from server.learn import music
from server.learn.calibrate import COARSE, calibrate
from server.live.engine import Settings
from server.model.predictor import Predictor
from server.model.spec import ModelInfo
from tests.rig import VirtualLoop, build_engine

DEFAULT = Path(__file__).resolve().parent.parent / "models" / "default"
DATA_SPREAD = 1.4  # semitones: the data's steps
PLAYER_SPREAD = 2.0  # the stand-in's steps at sigma_temperature 1, so 0.7 plays like the data


def walk(n: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """A line ``[n, 3]``: pitch a random walk of rounded normal steps, quarter notes, one velocity."""
    pitch = np.clip(64 + np.cumsum(np.rint(rng.normal(0.0, spread, n))), 30, 100)
    return np.column_stack([np.full(n, 0.5), pitch / 127, np.full(n, 90 / 127)])


class Walker:
    """Stands in for a `Predictor`: plays a random walk whose step spread is its sigma_temperature times 2."""

    def __init__(self) -> None:
        self.info = SimpleNamespace(spec=SimpleNamespace(dims=3),
                                    normaliser=SimpleNamespace(grid=(0.0, 1 / 127, 0.0)))
        self.last = 64.0

    def reset(self) -> None:
        self.last = 64.0

    def observe(self, dt: float, x: float, y: float) -> None:
        self.last = x * 127

    def sample(self, draws, temperature: float, sigma: float) -> tuple[float, float, float]:
        _, normals = draws.next()
        pitch = min(max(self.last + round(normals[1] * PLAYER_SPREAD * sigma), 30), 100)
        return 0.5, pitch / 127, 90 / 127


def test_calibration_finds_the_scale_temperature_that_plays_like_the_data():
    rng = np.random.default_rng(5)
    data = [walk(60, DATA_SPREAD, rng) for _ in range(80)]
    found = calibrate(Walker(), data, seed=1)
    assert found.sigma_temperature == pytest.approx(DATA_SPREAD / PLAYER_SPREAD, abs=0.051)
    assert set(COARSE) <= set(found.tried) and len(found.tried) == len(COARSE) + 2  # the best's two neighbours
    assert found.distance == min(found.tried.values()) < found.tried[1.0]
    record = found.record(seed=1)
    assert record["sigma_temperature"] == found.sigma_temperature and record["calibration"]["seed"] == 1
    assert calibrate(Walker(), data, seed=1) == found  # seeded: the same answer again


def test_shape_distance_counts_steps_skips_and_leaps_and_rhythm():
    same = music.note_distances(music.note_stats([walk(50, 1.0, np.random.default_rng(0))]),
                                music.note_stats([walk(50, 1.0, np.random.default_rng(0))]))
    assert music.shape_distance(same) == 0.0
    steps = music.note_stats([np.column_stack([np.full(4, 0.5), np.array([60, 62, 64, 65]) / 127, np.zeros(4)])])
    leaps = music.note_stats([np.column_stack([np.full(4, 0.5), np.array([60, 72, 60, 72]) / 127, np.zeros(4)])])
    assert music.note_distances(steps, leaps)["classes_tv"] == 1.0  # all steps against all leaps
    assert music.shape_distance({"move_tv": 0.25, "dt_tv": 0.5}) == 0.75


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.7", True])
def test_model_json_refuses_a_sampling_temperature_that_is_not_a_number_at_least_0(bad):
    doc = Predictor.load(DEFAULT).info.to_json()
    assert ModelInfo.from_json({**doc, "sampling": {"sigma_temperature": 0.6}}).sigma_temperature == 0.6
    assert ModelInfo.from_json({k: v for k, v in doc.items() if k != "sampling"}).sigma_temperature == 1.0
    with pytest.raises(ValueError, match="sigma_temperature"):
        ModelInfo.from_json({**doc, "sampling": {"sigma_temperature": bad}})


def with_own_sigma(predictor: Predictor, sigma: float) -> Predictor:
    """The same network and state, with ``sigma`` as its model.json's calibrated scale temperature."""
    info = replace(predictor.info, sampling={"sigma_temperature": sigma})
    return Predictor(replace(predictor.model, info=info), step=(predictor.step, predictor.backend))


def answers_to_a_phrase(predictor: Predictor, **settings) -> tuple[list[tuple[float, float, float]], object]:
    loop = VirtualLoop()
    engine, played = build_engine(loop, predictor, Settings(temperature=0.0, **settings))
    engine.start()
    for i in range(6):
        engine.perform(0.1 * i + 0.2, 0.5)
        loop.advance(0.3)
    loop.advance(8.0)
    return [(e.dt, e.x, e.y) for e in played.model()], engine


def test_the_engine_plays_at_the_models_own_scale_temperature_until_told_otherwise():
    base = Predictor.load(DEFAULT)
    own, engine = answers_to_a_phrase(with_own_sigma(base, 0.0))
    assert engine.status()["sigma_temperature"] == 0.0  # /status shows the one it plays at
    told, _ = answers_to_a_phrase(base.fork(), sigma_temperature=0.0)
    assert len(own) == 6 and own == told  # the model's 0: the components' means, as a set 0 gives
    wide, engine = answers_to_a_phrase(with_own_sigma(base, 0.0), sigma_temperature=1.0)
    assert engine.status()["sigma_temperature"] == 1.0 and wide != own  # a setting (flag, config) wins
    engine.set_sigma_temperature(0.5)
    assert engine.status()["sigma_temperature"] == 0.5  # and so does /sigma_temperature, live
    assert answers_to_a_phrase(base.fork())[1].status()["sigma_temperature"] == 1.0  # no calibration: 1
