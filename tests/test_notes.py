"""A note-trained model plays notes: every value it sends lies on its data's grid, drawn with its cell's probability.

The model is trained here for a few epochs on stepwise lines made in the test (integer
pitches over 127, one velocity), as `dataset --midi` writes them; it is played the way a
user plays it: a real server over loopback UDP.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from server.learn.data import Dataset
from server.model import mdn
from server.model.predictor import Predictor
from tests.live import OscPeer, start_server

VELOCITY = 90


def note_lines(performances: int, seed: int, length: tuple[int, int] = (20, 60)) -> Dataset:
    """Chorale-shaped data: stepwise pitch lines (mostly steps of 1-2, a few leaps), quarter and half notes."""
    rng = np.random.default_rng(seed)
    perfs = []
    for _ in range(performances):
        n = int(rng.integers(*length))
        steps = rng.choice([-2, -1, 0, 1, 2, -5, 5, -7, 7], n, p=[0.2, 0.15, 0.1, 0.15, 0.2, 0.05, 0.05, 0.05, 0.05])
        pitch = np.clip(60 + np.cumsum(steps), 48, 79)
        dt = rng.choice([0.5, 1.0], n, p=[0.8, 0.2])
        dt[0] = 0.0
        perfs.append(np.column_stack([dt, pitch / 127, np.full(n, VELOCITY / 127)]).astype(np.float32))
    return Dataset.from_performances(perfs)


@pytest.fixture(scope="module")
def note_model(tmp_path_factory) -> Path:
    from server.learn.train import TrainConfig, train

    models = tmp_path_factory.mktemp("models")
    result = train(note_lines(40, seed=3), "notes", models, TrainConfig(size="xs", epochs=4, seed=2, report=False),
                   echo=lambda s: None)
    return result.folder


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_a_note_model_sends_predictions_on_the_grid_over_osc(note_model, tmp_path):
    """`generate` through a real server: x * 127 and y * 127 are whole MIDI numbers, in float32 as Pd computes."""
    peer = OscPeer()
    srv = start_server(tmp_path / "logs", "--model", str(note_model), "--mode", "generate", "--timescale", "0.02",
                       "--seed", "4", "--temperature", "1.5", "--sigma-temperature", "1.5",
                       "--send", f"127.0.0.1:{peer.port}")
    peer.target = ("127.0.0.1", srv.port)
    try:
        got = peer.receive(20.0, "/prediction", count=80)
    finally:
        assert srv.stop() == 0
        peer.close()
    assert len(got) == 80
    values = np.array([args[:2] for _, _, args in got], np.float32)
    pitch = values[:, 0] * np.float32(127)  # float32 arithmetic, as a Pd or Max patch multiplies
    assert np.array_equal(pitch, np.round(pitch)), f"pitches off the grid: {pitch[pitch != np.round(pitch)][:5]}"
    assert np.all(values[:, 1] * np.float32(127) == VELOCITY)
    assert len(set(pitch.tolist())) > 5, "hot sampling plays many notes, each on a key"


def test_each_note_is_drawn_with_the_probability_of_its_cell(note_model):
    """One component over pitch (mean between two keys, 1.3 keys wide): note frequencies are the normal's cell masses."""
    predictor = Predictor.load(note_model)
    norm = predictor.norm
    k, d = predictor.info.spec.mixtures, predictor.info.spec.dims
    mean_x, sigma_x = 60.3 / 127, 1.3 / 127
    means = np.zeros((k, d))
    scales = np.ones((k, d))
    means[:, 1] = (mean_x - norm.shift[1]) / norm.scale[1]
    scales[:, 1] = sigma_x / norm.scale[1]
    logits = np.full(k, -50.0)
    logits[0] = 0.0
    predictor.params = np.concatenate([means.ravel(), scales.ravel(), logits]).astype(np.float32)
    draws = mdn.RandomBlocks(np.random.default_rng(11), d)
    n = 40_000
    notes = np.array([predictor.sample(draws, 1.0, 1.0)[1] * 127 for _ in range(n)])
    assert np.allclose(notes, np.round(notes), atol=1e-9)
    counts = {p: int(c) for p, c in zip(*np.unique(np.round(notes).astype(int), return_counts=True))}
    for pitch in range(57, 65):
        mass = phi((pitch + 0.5 - 60.3) / 1.3) - phi((pitch - 0.5 - 60.3) / 1.3)
        assert counts.get(pitch, 0) / n == pytest.approx(mass, abs=4 * math.sqrt(mass * (1 - mass) / n) + 1e-4), pitch
    # sigma_temperature 0: the cell holding the mean; 0.5 narrows the spread before the cell is taken
    assert predictor.sample(draws, 1.0, 0.0)[1] * 127 == pytest.approx(60.0)
    narrow = np.array([predictor.sample(draws, 1.0, 0.5)[1] * 127 for _ in range(n)])
    mass = phi((60.5 - 60.3) / 0.65) - phi((59.5 - 60.3) / 0.65)
    assert np.mean(np.round(narrow) == 60) == pytest.approx(mass, abs=0.01)
    # the mixture stream's means are the cells they fall in; its sigmas the density's
    stream = predictor.mixture(1.0, 1.0)
    x_means = np.array(stream[1 + k:]).reshape(k, 2 * d)[:, 1]
    assert np.allclose(x_means * 127, 60.0) and stream[1 + k + d + 1] == pytest.approx(sigma_x, rel=1e-5)
