"""The Predictor on its own: units in and out, greedy output, reset, determinism, and seeded performances.

Expected values are computed here from `predictor.params` and the normalisation in
`model.json`, not through the Predictor's own normaliser, so a unit slip on either side
shows up.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from server.model import mdn
from server.model.litert import LiteRTStep
from server.model.predictor import Predictor
from server.model.files import read_info
from tests.live import OscPeer, start_server

EVENTS = [(0.0, 0.3, 0.6), (0.12, 0.35, 0.62), (0.03, 0.4, 0.61), (1.5, 0.9, 0.1), (0.02, 0.88, 0.12), (4.0, 0.5, 0.5)]


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model[0]


@pytest.fixture(scope="module")
def norm(folder):
    """model.json's normalisation, read as plain numbers."""
    return json.loads((folder / "model.json").read_text())["normalisation"]


@pytest.fixture
def predictor(folder):
    return Predictor.load(folder)


def forward(norm, event):
    """Original units -> normalised, from model.json: clip, log(v + offset) where log is set, standardise.

    A dimension that was constant in the training data maps to 0 whatever arrives.
    """
    out = []
    for i, v in enumerate(event):
        if norm.get("constant", [None] * 3)[i] is not None:
            out.append(0.0)
            continue
        v = min(max(v, norm["clip_min"][i]), norm["clip_max"][i])
        f = math.log(v + norm["offset"][i]) if norm["log"][i] else v
        out.append((f - norm["shift"][i]) / norm["scale"][i])
    return out


def inverse(norm, z):
    """Normalised -> original units, from model.json, clipped to the valid range (a constant dimension: its value)."""
    out = []
    for i, v in enumerate(z):
        if norm.get("constant", [None] * 3)[i] is not None:
            out.append(norm["constant"][i])
            continue
        f = v * norm["scale"][i] + norm["shift"][i]
        if norm["log"][i]:
            f = math.exp(min(f, 50.0)) - norm["offset"][i]  # anything past log(dt_max) clips anyway
        out.append(min(max(f, norm["clip_min"][i]), norm["clip_max"][i]))
    return out


def greedy_event(params, norm, d=3):
    """The most likely component's mean, in original units."""
    k = len(params) // (2 * d + 1)
    means, _, logits = mdn.split_params(np.asarray(params, np.float64), k, d)
    return inverse(norm, means[int(np.argmax(logits))])


def test_observe_takes_seconds_and_unit_positions(folder, norm, predictor):
    """The step sees exactly the model.json normalisation of (seconds, x, y)."""
    info = read_info(folder)
    step = LiteRTStep((folder / "step.tflite").read_bytes(), info.spec)
    state = np.zeros((1, info.spec.state_size), np.float32)
    for event in EVENTS:
        expected, state = step(np.array([forward(norm, event)], np.float32), state)
        np.testing.assert_allclose(predictor.observe(*event), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "given, clipped",
    [((-1.0, -0.5, 1.5), (0.0, 0.0, 1.0)), ((100.0, 2.0, -3.0), (5.0, 1.0, 0.0)), ((7.5, 0.5, 0.5), (5.0, 0.5, 0.5))],
)
def test_observe_clips_to_the_valid_range(folder, norm, given, clipped):
    assert norm["clip_max"][0] == 5.0  # dt_max
    a, b = Predictor.load(folder), Predictor.load(folder)
    for event in EVENTS[:3]:
        a.observe(*event), b.observe(*event)
    np.testing.assert_array_equal(a.observe(*given), b.observe(*clipped))
    assert not np.array_equal(a.observe(*EVENTS[3]), a.observe(*EVENTS[3])), "a real step each time"


@pytest.mark.parametrize("temperature, sigma_temperature", [(1.0, 1.0), (0.5, 0.2), (3.0, 5.0), (1.0, 50.0)])
def test_sample_is_in_seconds_and_unit_positions(predictor, norm, temperature, sigma_temperature):
    """Every draw is the live sampler's normalised draw mapped back by model.json, and lies in range."""
    ours = mdn.RandomBlocks(np.random.default_rng(21), 3)
    theirs = mdn.RandomBlocks(np.random.default_rng(21), 3)
    got = []
    for i in range(2000):
        if i % 100 == 0:
            predictor.observe(*EVENTS[(i // 100) % len(EVENTS)])
        event = predictor.sample(theirs, temperature, sigma_temperature)
        z = mdn.sample_event(predictor.params, predictor.info.spec.mixtures, 3, *ours.next(), temperature, sigma_temperature)
        assert event == pytest.approx(inverse(norm, z), rel=1e-9, abs=1e-12)
        got.append(event)
    got = np.array(got)
    assert np.all(np.isfinite(got))
    assert np.all((got[:, 0] >= 0) & (got[:, 0] <= 5.0)) and np.all((got[:, 1:] >= 0) & (got[:, 1:] <= 1))
    if sigma_temperature >= 50:  # far outside: clipped to the edges, not wrapped or dropped
        assert np.mean((got[:, 1] == 0) | (got[:, 1] == 1)) > 0.5 and np.any(got[:, 0] == 5.0)


def test_greedy_is_the_most_likely_components_mean_in_original_units(predictor, norm):
    draws = mdn.RandomBlocks(np.random.default_rng(0), 3)
    checked = set()
    for event in EVENTS * 3:
        predictor.observe(*event)
        expected = greedy_event(predictor.params, norm)
        assert predictor.sample(draws, 0.0, 0.0) == pytest.approx(expected, rel=1e-6, abs=1e-9)
        _, _, logits = mdn.split_params(np.asarray(predictor.params), predictor.info.spec.mixtures, 3)
        checked.add(int(np.argmax(logits)))
    # Greedy with scale noise stays centred on that mean (sigma_temperature multiplies the scales).
    near = np.array([predictor.sample(draws, 0.0, 1e-3) for _ in range(200)])
    np.testing.assert_allclose(near.mean(0), greedy_event(predictor.params, norm), atol=0.02)


def test_reset_returns_to_the_zero_state_parameters(folder):
    p = Predictor.load(folder)
    zero = p.params.copy()
    first = p.observe(*EVENTS[0]).copy()
    for event in EVENTS[1:]:
        p.observe(*event)
    assert not np.array_equal(p.params, zero) and np.any(p.state != 0)
    p.reset()
    np.testing.assert_array_equal(p.params, zero)
    assert not np.any(p.state)
    np.testing.assert_array_equal(p.observe(*EVENTS[0]), first)


def test_observe_is_deterministic(folder):
    a, b = Predictor.load(folder), Predictor.load(folder)
    runs = []
    for p in (a, b, a):
        p.reset()
        runs.append([p.observe(*e).copy() for e in EVENTS])
    for run in runs[1:]:
        for x, y in zip(runs[0], run):
            np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- --seed on the real server


def generate_performance(tmp_path, seed: int, n: int = 60, attempts: int = 3) -> list[tuple[float, ...]]:
    """The first ``n`` /prediction messages of `run --mode generate --seed <seed>`.

    An event dropped late (a stall of the machine) is missing from what is played, so such a run is not
    comparable: it is run again, up to ``attempts`` times.
    """
    for _ in range(attempts):
        peer = OscPeer()
        srv = start_server(tmp_path / f"logs-{seed}-{len(list(tmp_path.iterdir()))}", "--mode", "generate",
                           "--seed", str(seed), "--timescale", "0.01", "--send", f"127.0.0.1:{peer.port}")
        peer.target = ("127.0.0.1", srv.port)
        try:
            got = peer.receive(20.0, "/prediction", count=n)
            late = peer.status().get("late_dropped", 0)
        finally:
            assert srv.stop() == 0
            peer.close()
        assert len(got) == n, f"only {len(got)} predictions"
        if late == 0:
            return [tuple(args) for _, _, args in got]
    raise AssertionError(f"{attempts} runs each had late events dropped, so none is comparable")


def test_seed_reproduces_a_generate_performance(tmp_path):
    first = generate_performance(tmp_path, 7)
    assert len(set(first)) > len(first) // 2, "a performance, not one event repeated"
    assert generate_performance(tmp_path, 7) == first
    assert generate_performance(tmp_path, 8) != first
