"""A model's dimensions come from its data: events of dt and N values, N from 1 to 16, end to end.

The way a user reaches it: a dataset file of N values, `train`, `evaluate`, the exported
folder proven in its sandbox, and a Predictor stepping and sampling N values. N = 2 is
the default and the rest of the suite holds it to today's behaviour.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from server.cli import main
from server.learn.data import Dataset, DatasetError, read_log_streams, save_dataset
from server.model.dims import MAX_VALUES, value_names
from server.model.likelihood import event_log_likelihoods
from server.model.mdn import RandomBlocks
from server.model.normalise import Normaliser
from server.model.spec import ModelInfo, ModelSpec


def performances(values: int, count: int, length: int, seed: int) -> list[np.ndarray]:
    """Smooth walks of ``values`` values on a 1/128 grid, with quick runs and pauses: learnable at any N."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        dt = np.where(rng.random(length) < 0.1, rng.uniform(0.3, 1.0, length), rng.uniform(0.01, 0.05, length))
        dt[0] = 0.0
        walk = np.clip(0.5 + np.cumsum(rng.normal(0, 0.03, (length, values)), axis=0), 0, 1)
        out.append(np.column_stack([dt, np.round(walk * 128) / 128]))
    return out


# --------------------------------------------------------------------------- the pieces, at any N


@pytest.mark.parametrize("values", [1, 3, 8, MAX_VALUES])
def test_the_normaliser_finds_each_dimensions_grid_and_constant_at_any_n(values):
    rng = np.random.default_rng(values)
    n = 500
    columns = [rng.uniform(0.001, 2.0, n)]
    for d in range(values):
        kind = d % 3
        columns.append(rng.integers(0, 128, n) / 128 if kind == 0 else
                       np.full(n, 0.25) if kind == 1 else rng.uniform(0, 1, n))
    events = np.column_stack(columns)
    norm = Normaliser.fit(events, 5.0)
    assert len(norm.shift) == 1 + values
    assert norm.grid == (0.0, *(1 / 128 if d % 3 == 0 else 0.0 for d in range(values)))
    assert norm.constant == (None, *(0.25 if d % 3 == 1 else None for d in range(values)))
    assert norm.clip_max == (5.0, *(1.0,) * values)
    for d, name in enumerate(value_names(values), start=1):
        assert name in norm.describe()
    assert Normaliser.from_json(json.loads(json.dumps(norm.to_json()))) == norm
    np.testing.assert_allclose(norm.inverse(norm.forward(events)), np.clip(events, 0, 5), atol=1e-4)
    assert len(norm.forward_event(events[0])) == 1 + values


def test_values_outside_the_supported_range_are_refused():
    with pytest.raises(ValueError, match="1 to 16"):
        Normaliser.fit(np.zeros((4, 18)), 5.0)
    with pytest.raises(ValueError, match="1 to 16"):
        ModelSpec.of_size("xs", dims=18)
    for dims in (1, 18):
        doc = _info(2).to_json()
        doc["spec"]["dims"] = dims
        with pytest.raises(ValueError, match="unsupported spec"):
            ModelInfo.from_json(doc)
    for dims in (2, 9, 17):
        assert ModelInfo.from_json(_info(dims).to_json()).spec.dims == dims


def test_a_model_of_one_and_of_sixteen_values_can_be_made_and_an_unknown_size_is_named() -> None:
    assert ModelSpec.of_size("xs", dims=17).values == MAX_VALUES
    assert ModelSpec.of_size("xs", dims=2).values == 1
    with pytest.raises(ValueError, match=r"^unknown size 'xxl'; expected one of xs, s, m, l$"):
        ModelSpec.of_size("xxl")


def test_model_json_tells_another_runtime_how_the_state_is_laid_out() -> None:
    """A runtime outside Antiphon (Max, a C++ host) reads `step_io` to feed the state back in the right order."""
    io = _info(3).to_json()["step_io"]
    assert io["state_layout"] == "per layer: h (units), c (units)"
    assert io["param_layout"] == "means K*D | scales K*D | logits K"


def _info(dims: int, norm: Normaliser | None = None, mixtures: int = 1) -> ModelInfo:
    norm = norm or Normaliser.fit(np.random.default_rng(0).uniform(0, 1, (50, dims)), 5.0)
    return ModelInfo(ModelSpec(units=4, layers=1, mixtures=mixtures, dims=dims), norm, 10, 5.0, None, "", {}, "", {})


def test_the_dequantised_likelihood_at_n_5_integrates_each_gridded_value_over_its_own_cell():
    """One Gaussian: dt continuous, v1 on 1/128, v2 on 1/127, v3 constant, v4 continuous, v5 on 1/128."""
    rng = np.random.default_rng(3)
    n = 400
    events = np.column_stack([rng.uniform(0.01, 1.0, n), rng.integers(0, 128, n) / 128, rng.integers(0, 128, n) / 127,
                              np.full(n, 0.3), rng.uniform(0, 1, n), rng.integers(0, 128, n) / 128])
    norm = Normaliser.fit(events, 5.0)
    assert norm.gridded == (1, 2, 5) and norm.active == (0, 1, 2, 4, 5)
    info = _info(6, norm)
    sigma = np.array([0.7, 0.05, 0.08, 1.0, 0.5, 0.02])
    event = events[7:8]
    z = norm.forward(event)[0].astype(np.float64)
    mu = z + np.array([0.2, 0.03, -0.05, 0.0, 0.1, 0.01])
    _, deq = event_log_likelihoods(np.concatenate([mu, sigma, [0.0]])[None, :], event, info)
    expected = 0.0
    for d in (0, 4):  # continuous: the density in original units
        expected += (-0.5 * ((z[d] - mu[d]) / sigma[d]) ** 2 - math.log(sigma[d] * math.sqrt(2 * math.pi))
                     - math.log(norm.scale[d]))
    expected -= math.log(event[0, 0] + norm.offset[0])  # dt's log transform
    for d in (1, 2, 5):  # gridded: the mass of the cell over its width
        h = norm.grid[d]
        half = h / 2 / norm.scale[d]
        mass = _phi((z[d] + half - mu[d]) / sigma[d]) - _phi((z[d] - half - mu[d]) / sigma[d])
        expected += math.log(mass / h)
    assert deq[0] == pytest.approx(expected, abs=1e-9)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


@pytest.mark.parametrize("header, values", [("time,source,x", 1), ("time,source,x,y", 2),
                                            ("time,source,v1,v2,v3", 3), ("time,source,v1,v2,v3,voice", 3)])
def test_our_logs_with_a_column_per_value_read_back(tmp_path, header, values):
    voice = header.endswith("voice")
    row = ",".join(f"0.{i + 1}" for i in range(values))
    lines = [f"{100 + t * 0.5},performer,{row}" + (",1" if voice else "") for t in range(3)]
    (tmp_path / "a.csv").write_text(header + "\n" + "\n".join(lines) + "\n")
    streams = read_log_streams(tmp_path / "a.csv")
    stream = streams["performer.1" if voice else "performer"]
    np.testing.assert_allclose(stream, [[0.0, *(0.1 * (i + 1) for i in range(values))]] + [
        [0.5, *(0.1 * (i + 1) for i in range(values))]] * 2, atol=1e-6)


def test_a_log_header_naming_values_wrongly_is_refused(tmp_path):
    (tmp_path / "a.csv").write_text("time,source,v1,v2\n1.0,performer,0.1,0.2\n")
    with pytest.raises(DatasetError, match="expected header time,source,x,y"):
        read_log_streams(tmp_path / "a.csv")


# --------------------------------------------------------------------------- end to end through the CLI


@pytest.fixture(scope="module")
def three_values(tmp_path_factory) -> tuple[Path, Path]:
    """A dataset of dt and 3 values and a model trained on it by `train`: (dataset, models folder)."""
    root = tmp_path_factory.mktemp("dims3")
    data = save_dataset(Dataset.from_performances(performances(3, 12, 120, seed=1)), root / "three.npz")
    code = main(["train", "--data", str(data), "--name", "three", "--models-dir", str(root / "models"),
                 "--size", "xs", "--epochs", "3", "--minutes", "1", "--no-report"])
    assert code == 0
    return data, root / "models"


def test_train_makes_a_model_of_the_datas_dimensions_and_evaluate_scores_it(three_values, capsys):
    data, models = three_values
    doc = json.loads((models / "three" / "model.json").read_text())
    assert doc["spec"]["dims"] == 4 and len(doc["normalisation"]["shift"]) == 4
    assert doc["step_io"]["inputs"][0] == "event [1, 4] normalised (dt, v1, v2, v3)"
    capsys.readouterr()
    assert main(["evaluate", "--model", "three", "--models-dir", str(models), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "v3 on a grid of 1/128 (dequantised)" in out
    figure = float(out.split(": ")[1].split(" nats")[0])
    assert math.isfinite(figure)


def test_evaluate_refuses_data_of_another_controller(three_values, tmp_path, capsys):
    _, models = three_values
    other = save_dataset(Dataset.from_performances(performances(2, 2, 20, seed=2)), tmp_path / "two.npz")
    assert main(["evaluate", "--model", "three", "--models-dir", str(models), "--data", str(other)]) == 1
    assert "2 value(s), but three takes 3" in capsys.readouterr().err


def test_fine_tuning_on_data_of_another_controller_is_refused(three_values, tmp_path, capsys):
    _, models = three_values
    other = save_dataset(Dataset.from_performances(performances(2, 4, 60, seed=2)), tmp_path / "two.npz")
    code = main(["train", "--data", str(other), "--name", "t2", "--models-dir", str(models), "--init-from", "three",
                 "--epochs", "1", "--minutes", "1", "--no-report"])
    assert code == 1 and "takes 3 values per event, the data has 2" in capsys.readouterr().err


def test_a_model_of_three_values_is_proven_steps_and_samples_three_values(three_values):
    from server.model.predictor import Predictor

    _, models = three_values
    p = Predictor.load(models / "three", prove=True)
    assert p.values == 3
    draws = RandomBlocks(np.random.default_rng(0), p.info.spec.dims)
    event = (0.0, 0.5, 0.5, 0.5)
    for _ in range(50):
        params = p.observe(*event)
        assert params.shape == (p.info.spec.param_size,)
        event = p.sample(draws, 1.0, 1.0)
        assert len(event) == 4 and event[0] >= 0 and all(0 <= v <= 1 for v in event[1:])
    k = p.info.spec.mixtures
    assert len(p.mixture(1.0, 1.0)) == 1 + k + k * 2 * 4
    assert math.isfinite(p.surprise(0.02, 0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="takes 3 values after dt, got 2"):
        p.observe(0.1, 0.5, 0.5)
    with pytest.raises(ValueError, match="takes 3 values after dt, got 4"):
        p.surprise(0.1, 0.5, 0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="draws give 3 normals, the model needs 4"):
        p.sample(RandomBlocks(np.random.default_rng(0), 3), 1.0, 1.0)  # drawn for a model of (dt, x, y)


def test_the_tensorflow_step_plays_an_n_d_model_as_litert_does(three_values):
    """The fallback backend (no LiteRT) builds its step from model.keras at the model's N."""
    from server.model.predictor import Predictor

    _, models = three_values
    lite, tf = Predictor.load(models / "three", backend="litert"), Predictor.load(models / "three", backend="tensorflow")
    assert (lite.backend, tf.backend) == ("litert", "tensorflow")
    for event in performances(3, 1, 30, seed=5)[0]:
        np.testing.assert_allclose(tf.observe(*event), lite.observe(*event), atol=1e-4)


@pytest.mark.parametrize("values", [1, MAX_VALUES])
def test_the_extremes_train_export_and_pass_their_proof(tmp_path, values):
    """N = 1 (one fader; its report plots the value over time) and N = 16 (the most a model takes)."""
    from server.learn.train import TrainConfig, train
    from server.model.predictor import Predictor

    ds = Dataset.from_performances(performances(values, 6, 80, seed=values))
    cfg = TrainConfig(size="xs", epochs=1, patience=1, minutes=1, report=values == 1)
    result = train(ds, f"n{values}", tmp_path, cfg, echo=lambda s: None)
    assert result.folder is not None and math.isfinite(result.validation_nll_dequantised)
    assert (result.folder / "report.png").exists() == (values == 1)
    p = Predictor.load(result.folder, prove=True)
    event = p.sample(RandomBlocks(np.random.default_rng(1), 1 + values), 1.0, 1.0)
    assert len(event) == 1 + values
    p.observe(*event)
