"""The numpy step (`step.npz`): it plays what `step.tflite` plays, export checks it, a bad file is refused,
and the engine is chosen as README says (LiteRT, else numpy, else TensorFlow; `--step-engine` forces one).

In-process and fast: the shipped models are read as they are; the networks made here are tiny and untrained
(tests/tinynet.py). The process-level promises (no TensorFlow imported, the server over UDP) are in
tests/test_numpy_step.py.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from server.model.files import DEFAULT_MODELS_DIR, available_models, read_model
from server.model.spec import ModelError
from tests.tinynet import check_events, export_tiny, sequence_params, tiny_info, tiny_model, tiny_spec

SHIPPED = available_models(DEFAULT_MODELS_DIR)
STEPS = 50
ATOL = RTOL = 1e-5  # float32: two correct implementations differ by a few ulps of values of order 1-10


def walk(info, steps: int = STEPS, seed: int = 0) -> np.ndarray:
    """Normalised events ``[steps, dims]`` of a random walk in original units (waits 0 to past dt_max, any values)."""
    rng = np.random.default_rng(seed)
    waits = rng.choice([0.0, 0.005, 0.05, 0.3, 1.0, float(info.dt_max) * 1.5], steps)
    values = rng.uniform(0.0, 1.0, (steps, info.spec.values))
    return np.array([info.normaliser.forward_event((w, *v)) for w, v in zip(waits, values)], np.float32)


def assert_same_steps(a, b, events: np.ndarray, state_size: int) -> None:
    """Two step functions, each carrying its own state, agree on every parameter and state at every step."""
    sa = sb = np.zeros((1, state_size), np.float32)
    for t, event in enumerate(events):
        pa, sa = a(event[None], sa)
        pb, sb = b(event[None], sb)
        np.testing.assert_allclose(pb, pa, atol=ATOL, rtol=RTOL, err_msg=f"params at step {t}")
        np.testing.assert_allclose(sb, sa, atol=ATOL, rtol=RTOL, err_msg=f"state at step {t}")
        assert pb.shape == pa.shape and sb.shape == sa.shape and pb.dtype == sb.dtype == np.float32


def both_steps(folder: Path):
    from server.model.litert import LiteRTStep
    from server.model.numpy_step import NumpyStep

    model = read_model(folder, ("step.tflite", "step.npz"))
    spec = model.info.spec
    return model.info, LiteRTStep(model.file("step.tflite"), spec), NumpyStep(model.file("step.npz"), spec)


# --------------------------------------------------------------------------- numpy == LiteRT


def test_every_shipped_model_ships_a_step_npz() -> None:
    assert {"default", "touch", "chorale"} <= set(SHIPPED)
    for name in SHIPPED:
        assert "step.npz" in read_model(DEFAULT_MODELS_DIR / name, ("step.npz",)).contents


@pytest.mark.parametrize("name", SHIPPED)
def test_the_numpy_step_plays_what_litert_plays_on_every_shipped_model(name: str) -> None:
    info, lite, numpy_step = both_steps(DEFAULT_MODELS_DIR / name)
    assert_same_steps(lite, numpy_step, walk(info), info.spec.state_size)


def test_the_numpy_step_of_a_fresh_export_plays_what_litert_and_keras_play(tmp_path: Path) -> None:
    info = tiny_info()
    model = tiny_model(info.spec, seed=3)
    folder = export_tiny(tmp_path / "tiny", model=model, info=info)
    _, lite, numpy_step = both_steps(folder)
    events = check_events(STEPS)
    assert_same_steps(lite, numpy_step, events, info.spec.state_size)
    state = np.zeros((1, info.spec.state_size), np.float32)
    got = []
    for event in events:
        params, state = numpy_step(event[None], state)
        got.append(params)
    np.testing.assert_allclose(np.array(got), sequence_params(model, events), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("units, layers, dims", [(3, 1, 3), (4, 3, 2), (2, 2, 17)])
def test_the_numpy_step_follows_keras_at_any_depth_width_and_dims(units: int, layers: int, dims: int) -> None:
    """One layer, three layers, N = 1 and N = 16: the state's per-layer slices and the first kernel's height."""
    from server.model.export import check_npz, step_npz
    from server.model.spec import ModelSpec

    spec = ModelSpec(units=units, layers=layers, mixtures=3, dims=dims)
    model = tiny_model(spec, seed=units + layers)
    events = np.random.default_rng(1).normal(0.0, 1.0, (40, dims)).astype(np.float32)
    assert check_npz(step_npz(model, spec), model, spec, events) < 1e-5


def test_scales_are_elu_plus_one_plus_eps_even_far_below_zero() -> None:
    """A scale's pre-activation of -100 gives eps + 1 - 1 = ~eps, never 0 or negative (and no overflow above)."""
    from server.model.mdn import SCALE_EPS
    from server.model.numpy_step import NumpyStep, pack_step_npz, step_npz_names

    spec = tiny_spec(units=2, layers=1, mixtures=1)
    arrays = {name: np.zeros(shape, np.float32) for name, shape in step_npz_names(spec).items()}
    arrays["mdn.scales.bias"] = np.array([-100.0, 0.0, 50.0], np.float32)
    params, _ = NumpyStep(pack_step_npz(arrays, spec), spec)(np.zeros((1, 3), np.float32), np.zeros((1, 4), np.float32))
    np.testing.assert_allclose(params[3:6], [SCALE_EPS, 1.0 + SCALE_EPS, 51.0 + SCALE_EPS], rtol=1e-6, atol=1e-9)
    assert params[3] > 0


# --------------------------------------------------------------------------- export checks it


def test_export_refuses_a_step_npz_that_does_not_play_the_model_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    from server.model import export as export_module

    info = tiny_info()
    other = tiny_model(info.spec, seed=8)
    real = export_module.step_npz
    monkeypatch.setattr(export_module, "step_npz", lambda model, spec: real(other, spec))
    with pytest.raises(ModelError, match=r"^step.npz differs from model.keras by [0-9.e+-]+ \(> 0.0001\); not exported$"):
        export_tiny(tmp_path / "m", model=tiny_model(info.spec, seed=0), info=info)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("diff, kept", [(1e-4, True), (1.0001e-4, False), (float("nan"), False)])
def test_export_keeps_a_step_npz_within_1e_4_of_the_model_and_no_further(tmp_path: Path, monkeypatch, diff,
                                                                         kept) -> None:
    from server.model import export as export_module

    monkeypatch.setattr(export_module, "check_npz", lambda *args: diff)
    if kept:
        folder = export_tiny(tmp_path / "edge")
        assert json.loads((folder / "model.json").read_text())["export_check"]["numpy_max_abs_diff"] == diff
    else:
        with pytest.raises(ModelError, match="^step.npz differs .* not exported$"):
            export_tiny(tmp_path / "edge")
        assert not (tmp_path / "edge").exists()


@pytest.mark.parametrize("check_recorded", [True, False])
def test_numpy_step_adds_a_checked_step_npz_to_an_older_export(tmp_path: Path, check_recorded: bool) -> None:
    """`antiphon numpy-step`: a folder exported before step.npz (no file, no hash) gets both, and plays on numpy;
    one older still, without an `export_check` in model.json, gets the check recorded too."""
    from server.cli import main
    from server.model.predictor import Predictor

    folder = older_export(tmp_path)
    if not check_recorded:
        doc = json.loads((folder / "model.json").read_text())
        del doc["export_check"]
        (folder / "model.json").write_text(json.dumps(doc, indent=2) + "\n")
    with pytest.raises(ModelError, match=r"records no step.npz .*numpy-step"):
        Predictor.load(folder, "numpy")
    assert main(["numpy-step", "--model", str(folder)]) == 0
    doc = json.loads((folder / "model.json").read_text())
    assert set(doc["files"]) == {"model.keras", "step.tflite", "step.npz"}
    assert 0.0 <= doc["export_check"]["numpy_max_abs_diff"] < 1e-5
    assert (folder / "step.npz").stat().st_mode & 0o777 == (folder / "model.json").stat().st_mode & 0o777
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "no temporary file left"
    lite, numpy_step = Predictor.load(folder, "litert"), Predictor.load(folder, "numpy")
    assert numpy_step.backend == "numpy"
    for event in [(0.1, 0.2, 0.3), (0.0, 1.0, 0.0), (2.0, 0.5, 0.5)]:
        np.testing.assert_allclose(numpy_step.observe(*event), lite.observe(*event), atol=ATOL, rtol=RTOL)


def older_export(tmp_path: Path) -> Path:
    """A copy of models/default as exported before step.npz existed."""
    folder = tmp_path / "older"
    shutil.copytree(DEFAULT_MODELS_DIR / "default", folder)
    (folder / "step.npz").unlink()
    doc = json.loads((folder / "model.json").read_text())
    del doc["files"]["step.npz"]
    (folder / "model.json").write_text(json.dumps(doc, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------- a bad step.npz is refused


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def good_arrays(spec) -> dict[str, np.ndarray]:
    from server.model.numpy_step import step_npz_names

    return {name: np.full(shape, 0.1, np.float32) for name, shape in step_npz_names(spec).items()}


@pytest.mark.parametrize("damage, reason", [
    (lambda a: a.pop("lstm_1.bias"), r"missing \['lstm_1.bias'\]"),
    (lambda a: a.update(extra=np.zeros(1, np.float32)), r"unexpected \['extra'\]"),
    (lambda a: a.update({"mdn.logits.bias": np.zeros(3, np.float32)}), r"mdn.logits.bias is float32 \(3,\).*\(2,\)"),
    (lambda a: a.update({"lstm_0.kernel": a["lstm_0.kernel"].astype(np.float64)}), "lstm_0.kernel is float64"),
    (lambda a: a["lstm_0.recurrent_kernel"].__setitem__((0, 0), np.nan), "lstm_0.recurrent_kernel holds NaN"),
])
def test_a_step_npz_that_does_not_fit_model_json_is_refused_by_name(damage, reason) -> None:
    from server.model.numpy_step import NumpyStep

    spec = tiny_spec()
    arrays = good_arrays(spec)
    NumpyStep(npz_bytes(**arrays), spec)  # the good one builds
    damage(arrays)
    with pytest.raises(ModelError, match=reason):
        NumpyStep(npz_bytes(**arrays), spec, "x/step.npz")


@pytest.mark.parametrize("data", [b"", b"not a zip", npz_bytes(**{"lstm_0.kernel": np.array([object()], object)})])
def test_a_step_npz_that_is_not_a_plain_numpy_archive_is_refused_without_running_anything(data: bytes) -> None:
    from server.model.numpy_step import NumpyStep

    with pytest.raises(ModelError, match=r"^x/step.npz (is not a readable numpy archive|does not fit)"):
        NumpyStep(data, tiny_spec(), "x/step.npz")


def test_a_step_npz_without_a_model_label_is_named_as_the_file_export_writes() -> None:
    """Export checks the file it is about to write before the model has a folder: the message names `step.npz`."""
    from server.model.numpy_step import NumpyStep

    with pytest.raises(ModelError, match=r"^step.npz is not a readable numpy archive"):
        NumpyStep(b"not a zip", tiny_spec())


def test_a_damaged_step_npz_whose_hash_was_rewritten_is_refused_by_its_proof(tmp_path: Path) -> None:
    from server.model.files import sha256_bytes
    from server.model.predictor import Predictor

    folder = tmp_path / "bad"
    shutil.copytree(DEFAULT_MODELS_DIR / "default", folder)
    data = bytearray((folder / "step.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "step.npz").write_bytes(bytes(data))
    doc = json.loads((folder / "model.json").read_text())
    doc["files"]["step.npz"] = sha256_bytes(bytes(data))
    (folder / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="bad/step.npz"):
        Predictor.load(folder, "numpy", label="bad", prove=True)


# --------------------------------------------------------------------------- which engine plays


def test_without_litert_auto_reads_and_plays_step_npz_only(monkeypatch) -> None:
    from server.model import engines, predictor as predictor_module

    monkeypatch.setattr(engines, "litert_available", lambda: False)
    p = predictor_module.Predictor.load(DEFAULT_MODELS_DIR / "default")
    assert p.backend == "numpy" and p.requested == "auto"
    assert set(p.model.contents) == {"step.npz"}  # neither step.tflite nor model.keras is read
    assert p.fork().backend == "numpy" and p.fork().requested == "auto"


def test_without_litert_a_model_without_step_npz_falls_back_to_tensorflow(tmp_path: Path, monkeypatch) -> None:
    from server.model import engines, predictor as predictor_module

    monkeypatch.setattr(engines, "litert_available", lambda: False)
    p = predictor_module.Predictor.load(older_export(tmp_path))
    assert p.backend == "tensorflow" and set(p.model.contents) == {"model.keras"}


@pytest.mark.parametrize("engine, reads", [("litert", "step.tflite"), ("numpy", "step.npz"), ("tensorflow", "model.keras")])
def test_a_forced_engine_reads_its_own_file_and_plays_on_it(engine: str, reads: str) -> None:
    from server.model.predictor import Predictor

    p = Predictor.load(DEFAULT_MODELS_DIR / "default", engine)
    assert (p.backend, p.requested, set(p.model.contents)) == (engine, engine, {reads})


def test_forcing_litert_where_it_is_missing_says_to_use_numpy(monkeypatch) -> None:
    from server.model import engines, predictor as predictor_module

    monkeypatch.setattr(engines, "litert_available", lambda: False)
    with pytest.raises(ModelError, match="LiteRT .* is not installed; use --step-engine numpy"):
        predictor_module.Predictor.load(DEFAULT_MODELS_DIR / "default", "litert")


def test_an_unknown_engine_is_refused_by_name() -> None:
    from server.model.predictor import Predictor

    with pytest.raises(ValueError, match="unknown step engine 'onnx'; expected one of auto, litert, numpy, tensorflow"):
        Predictor.load(DEFAULT_MODELS_DIR / "default", "onnx")


def test_step_engine_is_a_flag_and_a_toml_key(tmp_path: Path) -> None:
    import argparse

    from server.config import ConfigError, add_run_arguments, resolve_run_config

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    assert resolve_run_config(parser.parse_args([])).step_engine == "auto"
    assert resolve_run_config(parser.parse_args(["--step-engine", "NumPy"])).step_engine == "numpy"
    toml = tmp_path / "a.toml"
    toml.write_text('step-engine = "tensorflow"\n')
    assert resolve_run_config(parser.parse_args(["--config", str(toml)])).step_engine == "tensorflow"
    with pytest.raises(ConfigError, match="--step-engine: expected one of auto, litert, numpy, tensorflow"):
        resolve_run_config(parser.parse_args(["--step-engine", "onnx"]))


# --------------------------------------------------------------------------- bench shows both


def test_bench_reports_each_engine_side_by_side_and_says_why_one_is_missing(monkeypatch) -> None:
    from server.model import engines as choice
    from server.tools.bench import bench_steps, step_lines

    folder = DEFAULT_MODELS_DIR / "default"
    r = bench_steps(folder, quick=True, engines=("litert", "numpy"), naive=False)
    assert r["litert"]["steps"] == r["numpy"]["steps"] == 2000
    assert r["ratio_numpy_vs_litert"] == r["numpy"]["median_us"] / r["litert"]["median_us"]
    lines = step_lines(r)
    assert [line.split()[0] for line in lines[1:3]] == ["litert", "numpy"] and "numpy / litert:" in lines[-1]
    monkeypatch.setattr(choice, "litert_available", lambda: False)
    r = bench_steps(folder, quick=True, engines=("litert", "numpy"), naive=False)
    assert "not installed" in r["litert"]["unavailable"] and "median_us" in r["numpy"]
    assert "litert                           unavailable: LiteRT" in "\n".join(step_lines(r))


def test_a_step_npz_missing_an_array_says_which_and_what_to_do() -> None:
    import io

    import numpy as np
    import pytest

    from server.model.numpy_step import step_npz_names, unpack_step_npz
    from server.model.spec import ModelError
    from tests.tinynet import tiny_spec

    spec = tiny_spec()
    names = step_npz_names(spec)
    dropped = sorted(names)[0]
    buffer = io.BytesIO()
    np.savez(buffer, **{n: np.zeros(shape, np.float32) for n, shape in names.items() if n != dropped})
    with pytest.raises(ModelError, match=rf"^m/step.npz does not fit model.json \(missing \['{dropped}'\], "
                                         r"unexpected \[\]\); re-export the model$"):
        unpack_step_npz(buffer.getvalue(), spec, "m/step.npz")
