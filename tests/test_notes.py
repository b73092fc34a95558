"""A note-trained model plays notes: every value it sends lies on its data's grid, drawn with its cell's probability.

The model is trained here for a few epochs on stepwise lines made in the test (integer
pitches over 127, one velocity), as `dataset --midi` writes them; it is played the way a
user plays it: a real server over loopback UDP.
"""

from __future__ import annotations

import json
import math
import re
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


@pytest.fixture(scope="module")
def step_model(tmp_path_factory) -> Path:
    """The same data, x predicted as the step from the previous note (`train --intervals yes`)."""
    from server.learn.train import TrainConfig, train

    models = tmp_path_factory.mktemp("models")
    cfg = TrainConfig(size="xs", epochs=4, seed=2, report=False, intervals="yes", mixtures=6)
    return train(note_lines(40, seed=3), "steps", models, cfg, echo=lambda s: None).folder


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


def test_training_calibrates_the_scale_temperature_the_server_starts_from(note_model, tmp_path):
    """model.json keeps the calibrated sigma_temperature; `run` plays at it and /status says so, until told otherwise."""
    sampling = json.loads((note_model / "model.json").read_text())["sampling"]
    own = sampling["sigma_temperature"]
    assert 0.25 <= own <= 1.55 and sampling["calibration"]["distance"] <= sampling["calibration"]["distance_at_1"]
    peer = OscPeer()
    srv = start_server(tmp_path / "logs", "--model", str(note_model), "--send", f"127.0.0.1:{peer.port}")
    peer.target = ("127.0.0.1", srv.port)
    try:
        assert peer.status()["sigma_temperature"] == pytest.approx(own)
        peer.send("/sigma_temperature", 1.25)
        assert peer.status()["sigma_temperature"] == pytest.approx(1.25)
    finally:
        assert srv.stop() == 0
        peer.close()


def test_evaluate_calibrate_writes_the_models_own_temperature_into_an_older_model(note_model, tmp_path):
    """A model from before calibration (no sampling in model.json) gets what `train` would have found, files untouched."""
    import shutil
    import subprocess
    import sys

    from server.learn.data import save_dataset

    older = tmp_path / "older"
    shutil.copytree(note_model, older)
    doc = json.loads((older / "model.json").read_text())
    trained = doc.pop("sampling")
    (older / "model.json").write_text(json.dumps(doc))
    assert Predictor.load(older).info.sigma_temperature == 1.0
    data = save_dataset(note_lines(40, seed=3), tmp_path / "notes.npz")  # its training data: the held-out part
    out = subprocess.run([sys.executable, "-m", "server", "evaluate", "--model", str(older), "--data", str(data),
                          "--calibrate", "--music", "--seed", "2"],  # train calibrated with its --seed, 2
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    out = out.stdout
    assert json.loads((older / "model.json").read_text())["sampling"] == trained
    own = trained["sigma_temperature"]
    assert f"sigma_temperature {own:g} (shape distance" in out and f"sigma_temperature {own:g}, seed 2" in out
    assert Predictor.load(older).info.sigma_temperature == own  # the hashes still hold


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


# --------------------------------------------------------------------------- the music statistics, closed forms


def line(pitch_list, dts=None) -> np.ndarray:
    n = len(pitch_list)
    dts = [0.0] + [0.5] * (n - 1) if dts is None else dts
    return np.column_stack([dts, np.array(pitch_list) / 127, np.full(n, VELOCITY / 127)]).astype(np.float32)


def test_note_statistics_of_a_known_line():
    from server.learn import music

    stats = music.note_stats([line([60, 62, 64, 65, 72, 60], [0.0, 0.5, 0.5, 0.25, 1.0, 0.5]), line([67, 67])])
    # intervals 2 2 1 7 -12 and 0: steps (<= 2) 4 of 6; leaps (> 7) only the octave; a fifth (7) is neither
    assert stats.step_share == pytest.approx(4 / 6) and stats.leap_share == pytest.approx(1 / 6)
    assert stats.intervals[12 + 2] == pytest.approx(2 / 6) and stats.intervals[0] == pytest.approx(1 / 6)
    assert stats.intervals[12 + 7] == pytest.approx(1 / 6) and stats.intervals[12] == pytest.approx(1 / 6)
    assert stats.pitch_classes[0] == pytest.approx(3 / 8) and stats.pitch_classes[7] == pytest.approx(2 / 8)
    assert stats.pitches[60] == pytest.approx(2 / 8) and stats.events == 8 and stats.on_grid == 1.0
    assert stats.median_ioi == pytest.approx(0.5)  # the dts between onsets: .5 .5 .25 1 .5 and .5
    assert stats.iois.sum() == pytest.approx(1.0)
    assert music.note_stats([line([60, 60.5, 61])]).on_grid == pytest.approx(2 / 3)
    beyond = music.note_stats([line([30, 90, 30])])  # wider than an octave: the end bins
    assert beyond.intervals[-1] == pytest.approx(0.5) and beyond.intervals[0] == pytest.approx(0.5)


def test_distances_between_histograms():
    from server.learn import music

    a, b = np.zeros(10), np.zeros(10)
    a[2], b[5] = 1.0, 1.0
    assert music.total_variation(a, a) == 0.0 and music.total_variation(a, b) == 1.0
    assert music.earth_movers(a, b) == pytest.approx(3.0) and music.earth_movers(a, b, width=0.5) == pytest.approx(1.5)
    half = (a + b) / 2
    assert music.total_variation(a, half) == pytest.approx(0.5) and music.earth_movers(a, half) == pytest.approx(1.5)
    # one line transposed up by 2 semitones: the same intervals, the pitches 2 semitones away
    up = music.note_distances(music.note_stats([line([60, 62, 64, 62])]), music.note_stats([line([62, 64, 66, 64])]))
    assert up["intervals_tv"] == 0.0 and up["pitch_emd_semitones"] == pytest.approx(2.0) and up["ioi_tv"] == 0.0


def test_gesture_statistics_of_known_moves():
    from server.learn import music

    g = np.array([[0.0, 0.1, 0.1], [0.01, 0.4, 0.5], [0.2, 0.4, 0.5]])  # a 3-4-5 move of 0.5, then none
    stats = music.gesture_stats([g])
    assert stats.median_move == pytest.approx(0.25) and stats.median_dt == pytest.approx(0.105)
    assert stats.moves[0] == pytest.approx(0.5) and stats.moves.sum() == pytest.approx(1.0)
    assert music.gesture_distances(stats, stats) == {"move_tv": 0.0, "dt_tv": 0.0}
    assert not music.is_notes((0.0, 1 / 128, 1 / 128)) and music.is_notes((0.0, 1 / 127, 0.0))


# --------------------------------------------------------------------------- evaluate --music


def test_evaluate_music_compares_the_models_playing_with_held_out_data(note_model, tmp_path):
    """Through the CLI, as a user runs it: the training data's held-out part, a table, a plot; seeded."""
    import subprocess
    import sys

    from server.learn import music
    from server.learn.data import save_dataset

    data = save_dataset(note_lines(40, seed=3), tmp_path / "notes.npz")  # the training data: its held-out part is used
    cmd = [sys.executable, "-m", "server", "evaluate", "--model", str(note_model), "--data", str(data), "--music",
           "--plot", str(tmp_path / "music.png"), "--seed", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent).stdout
    assert "notes (x = pitch/127)" in out and "performances held out in training" in out
    own = json.loads((note_model / "model.json").read_text())["sampling"]["sigma_temperature"]
    assert f"sigma_temperature {own:g}, seed 3" in out  # the model's own, as `run` plays
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", l.strip()) for l in out.splitlines()[4:])}
    data_steps, zero_steps, opening_steps = (float(v.rstrip(" %")) for v in rows["steps <= 2 semitones"])
    held = json.loads((note_model / "model.json").read_text())["training"]["validation_performances"]
    perfs = note_lines(40, seed=3).performances
    assert data_steps == pytest.approx(100 * music.note_stats([perfs[i] for i in held]).step_share, abs=0.05)
    assert 0 < zero_steps < 100 and 0 < opening_steps < 100
    assert rows["pitches on a key"] == ["100.0 %"] * 3
    assert float(rows["intervals: TV"][0]) > 0 and len(rows["intervals: TV"]) == 2  # model columns only
    assert (tmp_path / "music.png").stat().st_size > 10_000
    assert subprocess.run(cmd, capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent.parent).stdout == out  # seeded: the same playing again
    other = tmp_path / "other.npz"
    save_dataset(note_lines(10, seed=9), other)
    out = subprocess.run(cmd[:7] + [str(other), "--music"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent).stdout
    assert "all 10 performances" in out


# --------------------------------------------------------------------------- pitch as the step from the previous note


def test_shift_means_moves_every_components_means_by_the_offsets():
    k, d = 3, 2
    means, scales, logits = np.arange(6.0).reshape(k, d), np.ones((k, d)), np.array([0.1, 0.2, 0.3])
    params = np.concatenate([means.ravel(), scales.ravel(), logits])
    moved = mdn.shift_means(params, k, d, np.array([0.0, 10.0]))
    m, s, l = mdn.split_params(moved, k, d)
    assert np.array_equal(m, means + [0.0, 10.0]) and np.array_equal(s, scales) and np.array_equal(l, logits)
    batch = mdn.shift_means(np.stack([params, params]), k, d, np.array([[0.0, 1.0], [2.0, 0.0]]))
    assert np.array_equal(mdn.split_params(batch, k, d)[0][1], means + [2.0, 0.0])
    assert np.array_equal(params[:6], means.ravel()), "a copy: the step's own output is left alone"


def test_training_targets_are_steps_from_the_clean_value_heard():
    from server.learn.windows import as_steps, make_windows

    p = np.array([[0.0, 1.0, 5.0], [0.5, 3.0, 5.0], [0.5, 2.0, 5.0]], np.float32)
    w = make_windows([p], length=4, stride=1)
    noisy = w.targets.copy()
    noisy[..., 1] += 0.25  # dequantisation noise on the targets only moves them, not what they are steps from
    steps = as_steps(w, noisy, np.array([0.0, 1.0, 0.0], np.float32))
    assert steps[0, :2, 1].tolist() == [2.25, -0.75] and steps[0, :2, 0].tolist() == [0.5, 0.5]
    assert steps[0, :2, 2].tolist() == [5.0, 5.0] and steps[0, :2, 3].tolist() == [1.0, 1.0]
    assert as_steps(w, noisy, np.zeros(3, np.float32)) is noisy


def test_a_step_model_predicts_steps_and_plays_notes(step_model, note_model):
    """`train --intervals yes` records it in model.json; the stage adds each step to the note it heard."""
    import json as json_

    from server.learn.music import relative_dims
    from server.model.files import read_info
    from server.model.litert import LiteRTStep

    assert json_.loads((note_model / "model.json").read_text())["normalisation"]["relative"] == [False] * 3
    assert json_.loads((step_model / "model.json").read_text())["normalisation"]["relative"] == [False, True, False]
    assert relative_dims((0.0, 1 / 127, 0.0), (None, None, None), "yes") == (False, True, False)
    assert relative_dims((0.0, 1 / 127, 0.0), (None, 0.5, None), "yes") == (False, False, False)
    assert relative_dims((0.0, 1 / 127, 0.0), (None, None, None)) == (False, False, False)
    note_model = step_model
    info = read_info(note_model)
    step = LiteRTStep((note_model / "step.tflite").read_bytes(), info.spec)
    predictor = Predictor.load(note_model)
    k, d, norm = info.spec.mixtures, info.spec.dims, info.normaliser
    state = np.zeros((1, info.spec.state_size), np.float32)
    for pitch in (60, 62, 64, 67, 55):
        event = (0.5, pitch / 127, VELOCITY / 127)
        z = np.array([norm.forward_event(event)], np.float32)
        raw, state = step(z, state)
        got = predictor.observe(*event)
        m_raw, s_raw, l_raw = mdn.split_params(raw, k, d)
        m, s, l = mdn.split_params(got, k, d)
        np.testing.assert_allclose(m[:, 1], m_raw[:, 1] + z[0, 1], atol=1e-5)  # the step, from the note heard
        assert np.array_equal(m[:, 0], m_raw[:, 0]) and np.array_equal(s, s_raw) and np.array_equal(l, l_raw)
        greedy = predictor.sample(mdn.RandomBlocks(np.random.default_rng(0), d), 0.0, 0.0)[1]
        best = int(np.argmax(l_raw))
        expected = norm.inverse_event([0.0, m_raw[best, 1] + z[0, 1], 0.0])[1]
        assert greedy * 127 == pytest.approx(round(expected * 127))


def test_the_training_pipeline_feeds_steps_as_targets():
    """What Keras is fed: noise within the cell on top of the step from the clean value heard."""
    from server.learn.windows import as_steps, make_windows, training_dataset

    rng = np.random.default_rng(0)
    perfs = [np.column_stack([rng.random(n), rng.integers(50, 70, n) / 127, np.zeros(n)]).astype(np.float32)
             for n in (5, 9, 30)]
    w = make_windows(perfs, length=8, stride=3)
    relative = np.array([0.0, 1.0, 0.0], np.float32)
    half = np.array([0.0, 0.004, 0.0])
    inputs, targets = (np.concatenate([b.numpy() for b in part]) for part in
                       zip(*training_dataset(w, 4, half, seed=1, shuffle=False, relative=relative)))
    clean = as_steps(w, w.targets, relative)
    assert np.array_equal(inputs[..., 0], w.inputs[..., 0]) and np.abs(inputs[..., 1] - w.inputs[..., 1]).max() <= 0.004
    assert np.abs(targets[..., 1] - clean[..., 1]).max() <= 0.004 + 1e-6
    assert np.abs(targets[..., 1] - clean[..., 1]).max() > 0.001  # noise there is
    assert np.abs(targets[..., 1] - w.targets[..., 1]).max() > 0.05  # steps, not values
