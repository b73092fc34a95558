"""Small promises of the model's maths that the rest of the suite reaches only on their common path: the
mixture a client is sent for a constant dimension, and log-sum-exp over the last axis of any shape."""

from __future__ import annotations

import numpy as np

from server.model.files import DEFAULT_MODELS_DIR
from server.model.likelihood import logsumexp
from server.model.predictor import Predictor


def test_a_constant_dimension_is_sent_as_its_value_with_no_spread_at_any_sigma_temperature() -> None:
    """The chorale model plays one velocity: a client drawing the `/mixture` must see a point, not a bell."""
    model = Predictor.load(DEFAULT_MODELS_DIR / "chorale")
    constant = model.norm.constant
    d = next(i for i, c in enumerate(constant) if c is not None)
    dims = len(constant)
    for sigma in (0.5, 1.0, 3.0):
        message = model.mixture(1.0, sigma)
        k = int(message[0])
        components = np.array(message[1 + k:]).reshape(k, 2 * dims)
        np.testing.assert_array_equal(components[:, dims + d], 0.0)
        np.testing.assert_allclose(components[:, d], constant[d])
        assert np.all(components[:, dims + 1] > 0.0)  # a dimension that varies keeps its spread


def test_log_sum_exp_is_taken_over_the_last_axis_whatever_the_shape() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3, 4)) * 30
    np.testing.assert_allclose(logsumexp(x), np.log(np.exp(x).sum(axis=-1)), rtol=1e-12)
    assert logsumexp(x).shape == (2, 3)
    np.testing.assert_allclose(logsumexp(np.array([[1000.0, 1000.0]])), [1000.0 + np.log(2.0)])  # no overflow


def test_a_model_read_without_litert_is_named_as_asked_in_what_it_says(monkeypatch) -> None:
    """A client's error names the model (`default`), not the server's folder, on every step engine."""
    import pytest

    from server.model import engines
    from server.model.spec import ModelError

    monkeypatch.setattr(engines, "litert_available", lambda: False)
    for backend in ("auto", "numpy", "tensorflow"):
        files = engines.read_for(DEFAULT_MODELS_DIR / "default", backend, "default")
        assert files.label == "default"
        with pytest.raises(ModelError, match="^default: step.tflite was not read"):
            files.file("step.tflite")


def test_a_value_the_data_had_on_a_grid_is_played_on_that_grid(tmp_path) -> None:
    """MIDI pitch (1/127): every note sampled is a grid point, however the continuous draw falls."""
    from server.model.mdn import RandomBlocks
    from server.model.normalise import Normaliser
    from tests.tinynet import export_tiny, tiny_info

    rng = np.random.default_rng(3)
    events = np.column_stack([rng.uniform(0.05, 0.5, 300), rng.integers(30, 100, 300) / 127,
                              rng.uniform(0.0, 1.0, 300)])
    norm = Normaliser.fit(events, 5.0)
    assert norm.grid[1] == 1 / 127 and norm.grid[2] == 0.0
    predictor = Predictor.load(export_tiny(tmp_path / "notes", info=tiny_info(normaliser=norm)))
    draws = RandomBlocks(np.random.default_rng(0), 3)
    played = [predictor.sample(draws, 1.0, 1.0) for _ in range(100)]
    pitches = np.array([p[1] for p in played]) * 127
    np.testing.assert_allclose(pitches, np.round(pitches), atol=1e-9)
    assert len(set(np.round(pitches))) > 3  # and not one note: the draw still chooses
    assert len({p[2] for p in played}) > 50  # the continuous value stays continuous


def test_without_litert_auto_takes_step_npz_where_the_model_has_one_else_tensorflow(monkeypatch) -> None:
    import sys
    from types import SimpleNamespace

    from server.model import engines
    from server.model.litert import litert_available

    assert litert_available()  # installed here
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # as on a platform without its wheel
    assert not litert_available()
    assert engines.resolve_backend(SimpleNamespace(contents={"step.npz": b"", "model.keras": b""})) == "numpy"
    assert engines.resolve_backend(SimpleNamespace(contents={"model.keras": b""})) == "tensorflow"
    assert engines.resolve_backend(SimpleNamespace(contents={"model.keras": b""}), "litert") == "litert"  # as asked


def test_a_models_held_out_figure_is_read_from_model_json() -> None:
    """The figure a fine-tune's gate compares against (and /status, `models` show) is the file's, not lost."""
    import json

    from server.model.spec import ModelInfo

    doc = json.loads((DEFAULT_MODELS_DIR / "default" / "model.json").read_text())
    assert ModelInfo.from_json(doc).validation_nll == doc["validation_nll_per_event"] != 0
    assert ModelInfo.from_json({**doc, "validation_nll_per_event": None}).validation_nll is None


def test_the_litert_step_runs_on_one_thread(monkeypatch) -> None:
    """The step is tiny (one event of a small LSTM): a pool of threads costs more in wake-ups than it saves,
    and would take the core the event loop and the other voices need."""
    from ai_edge_litert import interpreter

    from server.model.litert import LiteRTStep

    asked = []
    real = interpreter.Interpreter

    def recording(*args, **kwargs):
        asked.append(kwargs.get("num_threads"))
        return real(*args, **kwargs)

    monkeypatch.setattr(interpreter, "Interpreter", recording)
    predictor = Predictor.load(DEFAULT_MODELS_DIR / "default", "litert")
    assert isinstance(predictor.step, LiteRTStep) and asked == [1]


def test_a_model_json_without_a_creation_time_reads_as_created_unknown() -> None:
    import json

    from server.model.spec import ModelInfo

    doc = json.loads((DEFAULT_MODELS_DIR / "default" / "model.json").read_text())
    assert ModelInfo.from_json(doc).created == doc["created"] != ""
    del doc["created"]
    assert ModelInfo.from_json(doc).created == ""


def test_a_missing_model_in_an_empty_folder_says_none_were_found(tmp_path) -> None:
    """`antiphon run --model gone`: the error lists the models there are, "none" when there are none."""
    import pytest

    from server.model.files import resolve_model_dir
    from server.model.spec import ModelError

    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"^no model folder 'gone' in \S*nothing \(found: none; shipped: none\)"):
        resolve_model_dir("gone", empty, allow_paths=True, shipped=empty)  # the command line: a path was allowed


def test_a_missing_model_lists_the_models_there_are_comma_separated(tmp_path) -> None:
    import pytest

    from server.model.files import resolve_model_dir
    from server.model.spec import ModelError
    from tests.tinynet import export_tiny

    export_tiny(tmp_path / "alpha")
    export_tiny(tmp_path / "beta")
    with pytest.raises(ModelError, match=r"\(found: alpha, beta; shipped: "):
        resolve_model_dir("gone", tmp_path, allow_paths=True)


def test_model_json_keeps_the_library_versions_it_was_exported_with(tmp_path) -> None:
    import json

    from server.model.spec import ModelInfo
    from tests.tinynet import export_tiny, tiny_info

    folder = export_tiny(tmp_path / "m", info=tiny_info(versions={"tensorflow": "2.21.0", "python": "3.11.7"}))
    doc = json.loads((folder / "model.json").read_text())
    assert doc["versions"] == {"tensorflow": "2.21.0", "python": "3.11.7"}
    assert ModelInfo.from_json(doc).versions == doc["versions"]
