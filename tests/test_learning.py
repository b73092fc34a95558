"""Learning from real-shaped data: quantised and constant dimensions, short performances, time budgets.

Small data the tests make themselves (a fresh clone has no ../shared): quantised like a
touch screen (1/128), constant like notated velocity, short like chorale parts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from server.learn.data import Dataset
from server.model.likelihood import event_log_likelihoods, log_normal_cell
from server.learn.synth import synthetic_dataset
from server.learn.windows import make_windows
from server.model.mdn import RandomBlocks
from server.model.normalise import Normaliser, detect_grid
from server.model.predictor import Predictor
from server.model.spec import ModelInfo, ModelSpec


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def quantised(ds: Dataset, grid: int = 128, constant_y: float | None = None) -> Dataset:
    perfs = []
    for p in ds.performances:
        q = p.copy()
        q[:, 1] = np.round(q[:, 1] * grid) / grid
        q[:, 2] = constant_y if constant_y is not None else np.round(q[:, 2] * grid) / grid
        perfs.append(q)
    return Dataset.from_performances(perfs)


# --------------------------------------------------------------------------- detection


def test_grids_and_constants_are_detected():
    rng = np.random.default_rng(0)
    assert detect_grid(rng.integers(0, 128, 500) / 128) == pytest.approx(1 / 128)
    assert detect_grid((rng.integers(0, 128, 500) / 127).astype(np.float32)) == pytest.approx(1 / 127)
    assert detect_grid(rng.integers(0, 64, 500) / 64) == pytest.approx(1 / 64)  # the coarsest grid that fits
    assert detect_grid(rng.random(500)) == 0.0
    events = np.column_stack([rng.random(300), rng.integers(0, 128, 300) / 128, np.full(300, 90 / 127)])
    norm = Normaliser.fit(events, 5.0)
    assert norm.grid == (0.0, 1 / 128, 0.0) and norm.constant == (None, None, pytest.approx(90 / 127))
    assert norm.active == (0, 1) and norm.gridded == (1,)
    again = Normaliser.from_json(json.loads(json.dumps(norm.to_json())))
    assert again == norm


def test_a_constant_dimension_never_makes_a_huge_z_live():
    events = np.column_stack([np.full(50, 0.1), np.linspace(0, 1, 50), np.full(50, 0.5)])
    norm = Normaliser.fit(events, 5.0)
    assert norm.forward_event((0.1, 0.3, 0.99))[2] == 0.0  # whatever velocity arrives
    assert norm.inverse_event((0.0, 0.0, 123.0))[2] == 0.5  # and it is played back exactly
    assert np.all(norm.forward(np.array([[0.1, 0.3, 0.0], [0.1, 0.3, 1.0]]))[:, 2] == 0.0)


# --------------------------------------------------------------------------- the dequantised likelihood


def test_dequantised_likelihood_of_one_gaussian_is_its_mass_over_the_cell():
    """A single Gaussian over x (on a 1/128 grid), dt continuous, y constant: closed form."""
    rng = np.random.default_rng(1)
    events = np.column_stack([rng.uniform(0.01, 1.0, 400), rng.integers(10, 100, 400) / 128, np.full(400, 0.3)])
    norm = Normaliser.fit(events, 5.0)
    info = ModelInfo(ModelSpec(units=4, layers=1, mixtures=1), norm, 10, 5.0, None, "", {}, "", {})
    sigma = np.array([0.7, 0.05, 1.0])  # sharp in x: the cell matters
    for dt, x in ((0.3, 40 / 128), (1.2, 77 / 128), (0.05, 12 / 128)):
        event = np.array([[dt, x, 0.3]])
        z = norm.forward(event)[0].astype(np.float64)
        mu = np.array([0.2, z[1] + 0.03, 0.0])
        params = np.concatenate([mu, sigma, [0.0]])[None, :]
        raw, deq = event_log_likelihoods(params, event, info)
        h = norm.grid[1]
        half = h / 2 / norm.scale[1]
        log_dt_density = (-0.5 * ((z[0] - mu[0]) / sigma[0]) ** 2 - math.log(sigma[0] * math.sqrt(2 * math.pi))
                          - math.log(norm.scale[0]) - math.log(dt + norm.offset[0]))
        mass = phi((z[1] + half - mu[1]) / sigma[1]) - phi((z[1] - half - mu[1]) / sigma[1])
        assert deq[0] == pytest.approx(log_dt_density + math.log(mass / h), abs=1e-9)
        x_density = (-0.5 * ((z[1] - mu[1]) / sigma[1]) ** 2 - math.log(sigma[1] * math.sqrt(2 * math.pi))
                     - math.log(norm.scale[1]))
        assert raw[0] == pytest.approx(log_dt_density + x_density, abs=1e-9)  # y constant: in neither


def test_cell_mass_is_accurate_far_in_both_tails():
    for lo in (-40.0, 8.0, 30.0):
        mass = log_normal_cell(np.array(0.0), np.array(1.0), np.array(lo), np.array(lo + 0.01))
        # mass ~ pdf(mid) * width there; the log of a tiny number, not log(0)
        mid = lo + 0.005
        expected = -0.5 * mid * mid - 0.5 * math.log(2 * math.pi) + math.log(0.01)
        assert float(mass) == pytest.approx(expected, abs=0.05)


# --------------------------------------------------------------------------- windows


def test_every_performance_with_two_events_makes_a_window():
    perfs = [np.ones((n, 3), np.float32) * n for n in (1, 2, 3, 7, 51, 52, 120)]
    w = make_windows(perfs, length=50, stride=10)
    assert w.performances == 6 and w.events == sum(n - 1 for n in (2, 3, 7, 51, 52, 120))
    covered = set()
    for window in w.data:  # every target event of every performance has weight 1 somewhere
        n = int(window[0, 0])
        for t in np.nonzero(window[1:, 3])[0]:
            covered.add((n, round(float(window[t + 1, 0]), 3), t))
    short = [x for x in w.data if x[0, 0] == 3][0]
    assert list(short[:, 3][:4]) == [0, 1, 1, 0]  # first event is no target; padding weighs 0
    tail = [x for x in w.data if x[0, 0] == 120][-1]
    assert tail[-1, 3] == 1  # the last event of a long performance trains


# --------------------------------------------------------------------------- train end to end (tiny)


@pytest.fixture(scope="module")
def chorale_like(tmp_path_factory) -> tuple[Path, Dataset]:
    """Short performances on a 1/127 pitch grid with one velocity: like notated MIDI."""
    from server.learn.train import TrainConfig, train

    rng = np.random.default_rng(5)
    perfs = []
    for i in range(40):
        n = int(rng.integers(4, 30))  # all shorter than a window of 50
        pitch = np.clip(60 + np.cumsum(rng.integers(-3, 4, n)), 30, 100)
        dt = rng.choice([0.25, 0.5, 1.0], n)
        dt[0] = 0.0
        perfs.append(np.column_stack([dt, pitch / 127, np.full(n, 90 / 127)]).astype(np.float32))
    ds = Dataset.from_performances(perfs)
    models = tmp_path_factory.mktemp("models")
    result = train(ds, "short", models, TrainConfig(size="xs", epochs=3, seed=2, report=False), echo=lambda s: None)
    return result.folder, ds


def test_short_performances_train_and_a_constant_comes_back_exactly(chorale_like):
    folder, ds = chorale_like
    doc = json.loads((folder / "model.json").read_text())
    assert doc["normalisation"]["constant"][2] == pytest.approx(90 / 127)
    assert doc["normalisation"]["grid"][1] == pytest.approx(1 / 127)
    assert math.isfinite(doc["validation_nll_per_event"]) and math.isfinite(doc["validation_nll_per_event_dequantised"])
    predictor = Predictor.load(folder)
    draws = RandomBlocks(np.random.default_rng(0), 3)
    played = []
    for _ in range(200):
        dt, x, y = predictor.sample(draws, 1.5, 1.5)  # hot: whatever the network says
        predictor.observe(dt, x, y)
        played.append(y)
    assert set(played) == {np.float32(90 / 127).item()}


def test_evaluate_leads_with_the_dequantised_figure_and_it_matches_model_json(chorale_like, tmp_path, capsys):
    from server.cli import main
    from server.learn.data import save_dataset
    from server.learn.data import split_performances

    folder, ds = chorale_like
    _, val, _ = split_performances(ds, 0.15, seed=2)
    path = save_dataset(val, tmp_path / "val.npz")
    assert main(["evaluate", "--model", str(folder), "--data", str(path)]) == 0
    out = capsys.readouterr().out
    lead = float(out.split(": ")[1].split(" nats")[0])
    raw = float(out.split("raw density at the points: ")[1].split()[0])
    doc = json.loads((folder / "model.json").read_text())
    assert lead == pytest.approx(doc["validation_nll_per_event_dequantised"], abs=1e-3)
    assert raw == pytest.approx(doc["validation_nll_per_event"], abs=1e-3)
    assert "y constant" in out and "x on a grid of 1/127" in out


def test_a_time_budget_ends_training_and_exports(tmp_path):
    from server.learn.train import TrainConfig, train

    ds = synthetic_dataset(30, seed=4, phrases=8)
    result = train(ds, "budget", tmp_path, TrainConfig(size="xs", minutes=0.2, seed=1, report=False),
                   echo=lambda s: None)
    assert result.folder is not None and (result.folder / "step.tflite").is_file()
    assert result.seconds <= 0.2 * 60 + 5  # within its budget (a little slack for a loaded machine)
    assert result.epochs_run >= 1


def test_early_stopping_ends_train_at_the_epoch_its_rule_names(tmp_path):
    """`--patience 0`: training ends at the first epoch no better that does not continue a better trend,
    replayed from the held-out figures train reports (not at the 60 epochs or the budget)."""
    from server.learn.schedule import EarlyStop
    from server.learn.train import TrainConfig, train

    class Model:
        stop_training = False

    ds = synthetic_dataset(12, seed=6, phrases=4)
    result = train(ds, "patient", tmp_path, TrainConfig(size="xs", epochs=60, patience=0, minutes=2, seed=1,
                                                         report=False), echo=lambda s: None)
    rule, model = EarlyStop(0), Model()
    for epoch, figure in enumerate(result.history["val_loss"]):
        rule.on_epoch_end(epoch, {"val_loss": figure}, model)
        if model.stop_training:
            break
    assert model.stop_training and result.epochs_run == epoch + 1 < 60


def test_train_goes_back_to_the_best_epoch_when_a_plateau_halves_the_rate(tmp_path, monkeypatch):
    """The held-out figures are scripted (best at epoch 1, then two epochs worse): at epoch 3 the
    plateau halves the rate and the model must hold epoch 1's weights again, not where the
    rate took it. Without it a two-worker run ended far from its best (docs/distributed.md)."""
    from server.learn import train as train_module
    from server.learn.train import BestWeights, TrainConfig

    script = [3.0, 1.0, 4.0, 5.0]
    seen: dict[int, tuple[list, list | None]] = {}

    class Scripted(train_module.EarlyStop):
        def on_epoch_end(self, epoch: int, logs: dict, model) -> None:
            logs["val_loss"] = script[epoch]  # the dict every later callback reads

    class Watching(BestWeights):
        def on_epoch_end(self, epoch: int, logs: dict, model) -> None:
            seen[epoch] = ([w.copy() for w in model.get_weights()], self.weights)  # after the schedule ran
            super().on_epoch_end(epoch, logs, model)

    monkeypatch.setattr(train_module, "EarlyStop", Scripted)
    monkeypatch.setattr(train_module, "BestWeights", Watching)
    ds = synthetic_dataset(12, seed=6, phrases=4)
    result = train_module.train(ds, "plateau", tmp_path, TrainConfig(size="xs", epochs=4, patience=6, minutes=2,
                                                                     seed=1, report=False), echo=lambda s: None)
    assert result.history["lr"][3] == pytest.approx(result.history["lr"][2] / 2)  # the halving, at epoch 3
    best_weights = seen[2][1]  # epoch 1's, kept when epoch 1 ended
    moved, _ = seen[2]
    assert not all(np.array_equal(a, b) for a, b in zip(moved, best_weights))  # epoch 2 trained away from them
    held, _ = seen[3]
    assert all(np.array_equal(a, b) for a, b in zip(held, best_weights))  # and epoch 3's halving went back
