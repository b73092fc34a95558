"""Export and the TensorFlow side of the model, on tiny untrained networks (fast: nothing is trained).

What a user relies on: the exported `step.tflite` plays exactly what the Keras model
computes (event by event, with the state carried outside); a step that does not match is
refused with a clear error and nothing is written; a model folder appears whole or not at
all; `model.json` records the files' hashes, the check and the library versions; a
`model.keras` is loaded safely (no code runs from it) and a bad one is named in the error.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from server.model.spec import ModelError
from tests.tinynet import (check_events, export_tiny, sequence_params, step_params, tiny_info, tiny_model,
                           tiny_spec)


@pytest.fixture(scope="module")
def net():
    """(spec, info, model, tflite bytes) of one tiny network, converted once for the module."""
    from server.model.export import convert_to_tflite

    info = tiny_info()
    model = tiny_model(info.spec)
    return info.spec, info, model, convert_to_tflite(model, info.spec)


# --------------------------------------------------------------------------- the network


def test_the_sequence_model_maps_events_to_mixture_parameters_with_positive_scales(net) -> None:
    spec, _, model, _ = net
    params = sequence_params(model, check_events(7))
    k, d = spec.mixtures, spec.dims
    assert params.shape == (7, spec.param_size) == (7, k * (2 * d + 1))
    scales = params[:, k * d : 2 * k * d]
    assert np.all(scales > 0)  # ELU + 1 + eps: a scale is never 0 or negative
    assert model.name == "antiphon" and model.inputs[0].name == "events"
    assert [layer.name for layer in model.layers[1:]] == ["lstm_0", "lstm_1", "mdn"]
    assert [layer.units for layer in model.layers[1:3]] == [spec.units, spec.units]


def test_dropout_layers_sit_between_the_lstms_only_when_asked_for() -> None:
    from server.model.network import build_model

    spec = tiny_spec()
    with_dropout = build_model(spec, dropout=0.5)
    assert [layer.name for layer in with_dropout.layers[1:]] == ["lstm_0", "dropout_0", "lstm_1", "dropout_1", "mdn"]
    assert [layer.rate for layer in with_dropout.layers if layer.name.startswith("dropout")] == [0.5, 0.5]
    assert not any(layer.name.startswith("dropout") for layer in build_model(spec, dropout=0.0).layers)


def test_lstm_layers_are_the_models_lstms_in_order(net) -> None:
    from server.model.network import lstm_layers

    spec, _, model, _ = net
    assert lstm_layers(model, spec) == [model.get_layer("lstm_0"), model.get_layer("lstm_1")]


def test_the_tensorflow_step_reproduces_the_sequence_model_event_by_event(net) -> None:
    """The fallback step carries the state (h, c per layer) outside, and plays what the sequence model plays."""
    from server.model.network import TensorFlowStep

    spec, _, model, _ = net
    events = check_events(12)
    step = TensorFlowStep(model, spec)
    got, state = step_params(step, events, spec.state_size)
    np.testing.assert_allclose(got, sequence_params(model, events), atol=1e-5)
    assert state.shape == (1, spec.state_size) and np.all(np.isfinite(state)) and np.any(state != 0)
    params, state1 = step(events[:1], np.zeros((1, spec.state_size), np.float32))
    assert params.shape == (spec.param_size,) and state1.shape == (1, spec.state_size)


def test_the_naive_keras_predict_step_keeps_its_own_state_and_prints_nothing(net, capsys) -> None:
    from server.model.network import KerasPredictStep

    spec, _, model, _ = net
    events = check_events(3)
    step = KerasPredictStep(model, spec)
    state = np.zeros((1, spec.state_size), np.float32)
    got = []
    for t in range(len(events)):
        params, returned = step(events[t : t + 1], state)
        assert returned is state  # the state lives in the stateful layers, not in the caller's hands
        got.append(params)
    np.testing.assert_allclose(np.array(got), sequence_params(model, events), atol=1e-5)
    assert capsys.readouterr().out == ""  # no progress bar per event


# --------------------------------------------------------------------------- conversion and the check


def test_the_converted_step_plays_what_the_keras_model_plays(net) -> None:
    from server.model.export import check_tflite
    from server.model.litert import LiteRTStep

    spec, _, model, tflite = net
    events = check_events(30)
    got, _ = step_params(LiteRTStep(tflite, spec), events, spec.state_size)
    expected = sequence_params(model, events)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    diff = check_tflite(tflite, model, spec, events.astype(np.float64))  # any float events will do
    assert diff == pytest.approx(float(np.max(np.abs(got - expected))), abs=1e-6)
    assert 0.0 <= diff < 1e-5


def test_the_check_compares_with_the_model_as_it_plays_not_as_it_trains() -> None:
    """Dropout is for training only: the check runs the Keras model in inference mode."""
    from server.model.export import check_tflite, convert_to_tflite

    spec = tiny_spec()
    model = tiny_model(spec, seed=4, dropout=0.9)
    assert check_tflite(convert_to_tflite(model, spec), model, spec, check_events(20)) < 1e-5


def test_the_check_measures_how_far_a_mismatched_step_is(net) -> None:
    from server.model.export import check_tflite

    spec, _, model, tflite = net
    other = tiny_model(spec, seed=9)
    events = check_events(10)
    diff = check_tflite(tflite, other, spec, events)
    assert diff == pytest.approx(float(np.max(np.abs(sequence_params(model, events) - sequence_params(other, events)))),
                                 rel=1e-4)
    assert diff > 1e-2


def test_the_check_calls_a_step_that_gives_nan_infinitely_far(net) -> None:
    from server.model.export import check_tflite, convert_to_tflite

    spec, _, model, _ = net
    broken = tiny_model(spec, seed=1)
    weights = broken.get_weights()
    weights[-1] = np.full_like(weights[-1], np.nan)  # the head's last bias: logits become NaN
    broken.set_weights(weights)
    assert check_tflite(convert_to_tflite(broken, spec), model, spec, check_events(5)) == float("inf")


def test_a_step_of_another_shape_is_refused_by_name(net) -> None:
    from server.model.export import check_tflite

    spec, _, model, tflite = net
    with pytest.raises(ModelError, match=r"step.tflite has inputs .* re-export"):
        check_tflite(tflite, model, tiny_spec(units=spec.units + 1), check_events(5))


# --------------------------------------------------------------------------- export


def test_export_writes_a_checked_folder_with_hashes_and_the_check(net, tmp_path: Path) -> None:
    from server.model.export import export
    from server.model.files import read_model
    from server.model.network import load_keras_model

    spec, info, model, tflite = net
    folder = tmp_path / "deep" / "er" / "tiny"  # parents are made
    assert export(model, info, folder, check_events(200), tflite=tflite) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.keras", "step.npz", "step.tflite"]
    text = (folder / "model.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and text.startswith('{\n  "format": 1,')  # indented by 2, one newline at the end
    doc = json.loads(text)
    for name in ("model.keras", "step.tflite", "step.npz"):
        assert doc["files"][name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert doc["export_check"]["steps"] == 200 and 0.0 <= doc["export_check"]["max_abs_diff"] < 1e-5
    assert doc["spec"] == {"units": spec.units, "layers": spec.layers, "mixtures": spec.mixtures, "dims": 3,
                           "size": "custom"}
    assert (folder / "step.tflite").read_bytes() == tflite  # the conversion is deterministic
    read_model(folder, ("model.keras", "step.tflite", "step.npz"))  # the hashes check out
    assert 0.0 <= doc["export_check"]["numpy_max_abs_diff"] < 1e-5
    loaded = load_keras_model(folder / "model.keras")
    np.testing.assert_allclose(sequence_params(loaded, check_events(9)), sequence_params(model, check_events(9)),
                               atol=1e-6)
    assert not [p for p in tmp_path.rglob(".*")], "no temporary or old folder left"


def test_model_keras_is_saved_without_the_optimizer(net, tmp_path: Path) -> None:
    from server.model.export import export
    from server.model.network import keras, load_keras_model, mdn_loss

    spec, info, _, _ = net
    model = tiny_model(spec, seed=5)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=mdn_loss(spec.mixtures, spec.dims))
    export(model, info, tmp_path / "m", check_events(40))
    with zipfile.ZipFile(tmp_path / "m" / "model.keras") as z:
        config = json.loads(z.read("config.json"))
    assert not config.get("compile_config")  # no loss, no optimizer
    assert not load_keras_model(tmp_path / "m" / "model.keras").compiled


def test_export_refuses_a_step_that_does_not_match_and_writes_nothing(net, tmp_path: Path) -> None:
    from server.model.export import convert_to_tflite, export

    spec, info, model, _ = net
    wrong = convert_to_tflite(tiny_model(spec, seed=7), spec)
    with pytest.raises(ModelError, match=r"^step.tflite differs from model.keras by [0-9.e+-]+ \(> 0.0001\); not exported$"):
        export(model, info, tmp_path / "broken", check_events(200), tflite=wrong)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("diff, kept", [(1e-4, True), (1.0001e-4, False), (float("nan"), False)])
def test_export_keeps_a_step_within_1e_4_of_the_model_and_no_further(net, tmp_path: Path, monkeypatch, diff, kept) -> None:
    from server.model import export as export_module

    spec, info, model, tflite = net
    monkeypatch.setattr(export_module, "check_tflite", lambda *args: diff)
    monkeypatch.setattr(export_module, "_inference_copy", lambda m, s: m)
    if kept:
        export_module.export(model, info, tmp_path / "edge", check_events(200), tflite=tflite)
        assert json.loads((tmp_path / "edge" / "model.json").read_text())["export_check"]["max_abs_diff"] == diff
    else:
        with pytest.raises(ModelError, match="not exported"):
            export_module.export(model, info, tmp_path / "edge", check_events(200), tflite=tflite)
        assert not (tmp_path / "edge").exists()


@pytest.mark.parametrize("rows", [1, 7, 200, 250])
def test_export_checks_200_steps_repeating_short_check_events(net, tmp_path: Path, monkeypatch, rows) -> None:
    from server.model import export as export_module

    spec, info, model, tflite = net
    seen = []

    def check(tflite_, model_, spec_, events, expected=None):
        seen.append((tflite_, model_, spec_, np.array(events)))
        return 0.0

    monkeypatch.setattr(export_module, "check_tflite", check)
    monkeypatch.setattr(export_module, "_inference_copy", lambda m, s: m)
    events = check_events(rows).astype(np.float64)
    export_module.export(model, info, tmp_path / "m", events, tflite=tflite)
    (got_tflite, got_model, got_spec, checked), = seen
    assert got_tflite == tflite and got_model is model and got_spec == spec
    assert checked.dtype == np.float32 and checked.shape == (200, 3)
    np.testing.assert_array_equal(checked, np.tile(events.astype(np.float32), (-(-200 // rows), 1))[:200])


def test_export_converts_the_model_itself_when_given_no_step(net, tmp_path: Path) -> None:
    from server.model.export import export

    spec, info, model, tflite = net
    export(model, info, tmp_path / "m", check_events(200))
    assert (tmp_path / "m" / "step.tflite").read_bytes() == tflite


def test_export_replaces_an_existing_model_whole_and_leaves_no_old_copy(net, tmp_path: Path) -> None:
    from server.model.export import export

    spec, info, model, tflite = net
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "stale.txt").write_text("from the model before")
    old = tmp_path / ".m.old"  # left by an export that was interrupted
    old.mkdir()
    (old / "junk").write_text("x")
    export(model, info, folder, check_events(200), tflite=tflite)
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.keras", "step.npz", "step.tflite"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    export(model, info, folder, check_events(200), tflite=tflite)  # and again, over a complete model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_export_writes_in_a_hidden_folder_beside_the_target_then_renames(net, tmp_path: Path, monkeypatch) -> None:
    """A reader listing the models folder never sees a half-written model under a model's name."""
    from server.model import export as export_module

    spec, info, model, tflite = net
    hashed: list[Path] = []
    real = export_module.sha256_file

    def sha(path: Path) -> str:
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(export_module, "sha256_file", sha)
    export_module.export(model, info, tmp_path / "m", check_events(200), tflite=tflite)
    assert [p.name for p in hashed] == ["model.keras", "step.tflite", "step.npz"]
    working = hashed[0].parent
    assert working.parent == tmp_path and working.name.startswith(".m.") and not working.exists()


def test_export_copies_extra_files_and_cleans_up_when_one_is_missing(net, tmp_path: Path) -> None:
    from server.model.export import export

    spec, info, model, tflite = net
    report = tmp_path / "report.png"
    report.write_bytes(b"\x89PNG...")
    out = tmp_path / "models"
    export(model, info, out / "m", check_events(200), extra_files={"report.png": report}, tflite=tflite)
    assert (out / "m" / "report.png").read_bytes() == b"\x89PNG..."
    with pytest.raises(FileNotFoundError):
        export(model, info, out / "n", check_events(200), extra_files={"x.png": tmp_path / "missing.png"}, tflite=tflite)
    assert sorted(p.name for p in out.iterdir()) == ["m"], "no half-written folder left"


def test_library_versions_name_each_library_and_its_version() -> None:
    import platform

    import keras
    import tensorflow as tf
    import tensorflow_probability as tfp

    from server import __version__
    from server.model.export import library_versions

    assert library_versions() == {"antiphon": __version__, "python": platform.python_version(),
                                  "tensorflow": tf.__version__, "keras": keras.__version__,
                                  "tensorflow_probability": tfp.__version__, "numpy": np.__version__}


def test_now_iso_is_utc_to_the_second() -> None:
    from server.model.export import now_iso

    before = datetime.now(timezone.utc).replace(microsecond=0)
    text = now_iso()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", text)
    assert before <= datetime.fromisoformat(text) <= before + timedelta(seconds=5)


# --------------------------------------------------------------------------- loading model.keras


def test_a_model_keras_loads_back_to_the_same_network(net, tmp_path: Path) -> None:
    from server.model.network import keras_model_from_bytes

    _, info, model, tflite = net
    folder = export_tiny(tmp_path / "m", model=model, info=info)
    loaded = keras_model_from_bytes((folder / "model.keras").read_bytes())
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_model_keras_is_refused_by_its_label_not_a_temporary_path() -> None:
    from server.model.network import keras_model_from_bytes

    with pytest.raises(ModelError) as caught:
        keras_model_from_bytes(b"PK\x03\x04 not a zip at all", "mine/model.keras")
    text = str(caught.value)
    assert text.startswith("mine/model.keras cannot be loaded (") and text.endswith("); re-export the model")
    assert "antiphon-" not in text and "/tmp" not in text
    with pytest.raises(ModelError, match=r"^model.keras cannot be loaded \("):  # the default label
        keras_model_from_bytes(b"garbage")


def test_a_damaged_model_keras_file_is_named_with_the_error_type(tmp_path: Path) -> None:
    from server.model.network import load_keras_model

    path = tmp_path / "model.keras"
    path.write_bytes(b"garbage")
    with pytest.raises(ModelError, match=rf"^{re.escape(str(path))} cannot be loaded \(\w+Error: .*\); re-export the model$"):
        load_keras_model(path)


def test_a_model_keras_with_python_code_in_it_is_refused(tmp_path: Path) -> None:
    """safe_mode: a Lambda layer would run arbitrary code when loaded."""
    from server.model.network import keras, load_keras_model

    inputs = keras.Input(shape=(3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs))
    model.save(tmp_path / "model.keras")
    with pytest.raises(ModelError, match="cannot be loaded"):
        load_keras_model(tmp_path / "model.keras")


def test_a_compiled_model_keras_loads_without_its_training_setup(net, tmp_path: Path) -> None:
    """An older `model.keras` saved with its optimizer and loss still loads (uncompiled) for playing."""
    from server.model.network import keras, load_keras_model, mdn_loss

    spec, _, _, _ = net
    model = tiny_model(spec, seed=6)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=mdn_loss(spec.mixtures, spec.dims))
    model.save(tmp_path / "model.keras")
    loaded = load_keras_model(tmp_path / "model.keras")  # compiling would need the loss, which is not registered
    assert not loaded.compiled
    np.testing.assert_allclose(sequence_params(loaded, check_events(4)), sequence_params(model, check_events(4)),
                               atol=1e-6)
