"""Export: a trained Keras model becomes a checked model folder (model.keras, step.tflite, step.npz, model.json).

The folder is written only after both steps the stage can run, `step.tflite` (LiteRT)
and `step.npz` (numpy, where LiteRT is missing), reproduce the Keras model over a
200-step sequence, so a broken model never reaches the stage; it is written to a
temporary folder and renamed into place, so a reader never sees half a model.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from server import __version__
from server.model.files import sha256_file
from server.model.litert import LiteRTStep, StepFunction
from server.model.numpy_step import HEADS, NumpyStep, pack_step_npz
from server.model.quiet import native_stderr_silenced
from server.model.network import build_model, keras, lstm_layers, make_step_function, tf
from server.model.spec import ModelError, ModelInfo, ModelSpec

log = logging.getLogger(__name__)

CHECK_STEPS = 200
CHECK_TOLERANCE = 1e-4


def convert_to_tflite(model: keras.Model, spec: ModelSpec) -> bytes:
    # The converter freezes variables it can reach from the trackable object: a tf.Module
    # holding the step and the Keras variables (Keras 3 models are not tf trackables).
    holder = tf.Module()
    holder.step = make_step_function(model, spec)
    holder.variables_ = [v.value for v in model.variables]
    concrete = holder.step.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
    with native_stderr_silenced():  # the converter narrates every pass on stderr
        return converter.convert()


def step_npz(model: keras.Model, spec: ModelSpec) -> bytes:
    """`step.npz` bytes: the LSTM cells' and the MDN heads' weights, named as `server.model.numpy_step` documents."""
    arrays: dict[str, np.ndarray] = {}
    for i, layer in enumerate(lstm_layers(model, spec)):
        cell = layer.cell
        for name in ("kernel", "recurrent_kernel", "bias"):
            arrays[f"lstm_{i}.{name}"] = keras.ops.convert_to_numpy(getattr(cell, name)).astype(np.float32)
    head = model.get_layer("mdn")
    for name, dense in zip(HEADS, (head.mu, head.sigma, head.pi)):
        arrays[f"mdn.{name}.kernel"] = keras.ops.convert_to_numpy(dense.kernel).astype(np.float32)
        arrays[f"mdn.{name}.bias"] = keras.ops.convert_to_numpy(dense.bias).astype(np.float32)
    return pack_step_npz(arrays, spec)


def check_tflite(tflite: bytes, model: keras.Model, spec: ModelSpec, events: np.ndarray,
                 expected: np.ndarray | None = None) -> float:
    """Max abs difference between the Keras sequence model and the `.tflite` step over ``events``."""
    return check_step(LiteRTStep(tflite, spec), model, spec, events, expected)


def check_npz(npz: bytes, model: keras.Model, spec: ModelSpec, events: np.ndarray,
              expected: np.ndarray | None = None) -> float:
    """Max abs difference between the Keras sequence model and the numpy step of `step.npz` over ``events``."""
    return check_step(NumpyStep(npz, spec), model, spec, events, expected)


def sequence_output(model: keras.Model, events: np.ndarray) -> np.ndarray:
    """The Keras sequence model's parameters ``[T, P]`` for ``events [T, D]``, from a zero state.

    Run as one graph: eagerly the LSTM's loop runs in Python a step at a time (0.8 s for
    200 steps of an xs model, 0.2 s as a graph), and every export checks two step engines.
    """
    run = tf.function(lambda x: model(x, training=False), autograph=False)
    return run(np.asarray(events, dtype=np.float32)[None]).numpy()[0]


def check_step(step: StepFunction, model: keras.Model, spec: ModelSpec, events: np.ndarray,
               expected: np.ndarray | None = None) -> float:
    """Max abs difference between the Keras sequence model (``expected``: its output over ``events``,
    computed here when not given) and a one-step function run over ``events``."""
    events = np.asarray(events, dtype=np.float32)[None]
    if expected is None:
        expected = sequence_output(model, events[0])
    state = np.zeros((1, spec.state_size), np.float32)
    got = np.empty_like(expected)
    for t in range(events.shape[1]):
        got[t], state = step(events[0, t : t + 1], state)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - expected)))


def library_versions() -> dict[str, str]:
    import tensorflow_probability as tfp

    return {
        "antiphon": __version__,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tensorflow_probability": tfp.__version__,
        "numpy": np.__version__,
    }


def export(
    model: keras.Model,
    info: ModelInfo,
    folder: Path,
    check_events: np.ndarray,
    extra_files: dict[str, Path] | None = None,
    tflite: bytes | None = None,
) -> Path:
    """Write `model.keras`, `step.tflite`, `step.npz` and `model.json` atomically into ``folder``.

    ``check_events`` (normalised, >= 200 rows are used) drive the Keras-vs-LiteRT and
    Keras-vs-numpy checks; if either differs by more than 1e-4 nothing is written and
    ModelError is raised.
    """
    folder = Path(folder)
    check_events = np.asarray(check_events, np.float32)[:CHECK_STEPS]
    if len(check_events) < CHECK_STEPS:
        reps = -(-CHECK_STEPS // max(len(check_events), 1))
        check_events = np.tile(check_events, (reps, 1))[:CHECK_STEPS]
    if tflite is None:
        tflite = convert_to_tflite(model, info.spec)
    expected = sequence_output(model, check_events)  # once, for both step engines
    diff = check_tflite(tflite, model, info.spec, check_events, expected)
    if not diff <= CHECK_TOLERANCE:
        raise ModelError(f"step.tflite differs from model.keras by {diff:.3g} (> {CHECK_TOLERANCE}); not exported")
    npz = step_npz(model, info.spec)
    npz_diff = check_npz(npz, model, info.spec, check_events, expected)
    if not npz_diff <= CHECK_TOLERANCE:
        raise ModelError(f"step.npz differs from model.keras by {npz_diff:.3g} (> {CHECK_TOLERANCE}); not exported")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _inference_copy(model, info.spec).save(tmp / "model.keras")
        (tmp / "step.tflite").write_bytes(tflite)
        (tmp / "step.npz").write_bytes(npz)
        doc = info.to_json()
        doc["files"] = {name: sha256_file(tmp / name) for name in ("model.keras", "step.tflite", "step.npz")}
        doc["export_check"] = {"steps": CHECK_STEPS, "max_abs_diff": diff, "numpy_max_abs_diff": npz_diff}
        (tmp / "model.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        for name, src in (extra_files or {}).items():
            shutil.copy(src, tmp / name)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.debug("exported %s (check: max abs diff %.2g LiteRT, %.2g numpy, over %d steps)", folder, diff, npz_diff,
              CHECK_STEPS)
    return folder


def add_step_npz(folder: Path) -> float:
    """Write a checked `step.npz` into a model folder exported before it existed; returns the check's difference.

    The weights come from the folder's `model.keras` (verified against model.json); the
    numpy step must reproduce that model within 1e-4 over 200 steps of normalised events,
    else nothing is written. `step.npz` and then `model.json` (its SHA-256 added) are each
    replaced atomically, so a reader sees the folder without `step.npz` or with it, whole.
    """
    from server.model.files import read_model, sha256_bytes
    from server.model.network import keras_model_from_bytes

    folder = Path(folder)
    files = read_model(folder, ("model.keras",))
    spec = files.info.spec
    model = keras_model_from_bytes(files.file("model.keras"), f"{files.label}/model.keras")
    npz = step_npz(model, spec)
    events = np.random.default_rng(0).normal(0.0, 1.0, (CHECK_STEPS, spec.dims)).astype(np.float32)
    diff = check_npz(npz, model, spec, events)
    if not diff <= CHECK_TOLERANCE:
        raise ModelError(f"step.npz would differ from model.keras by {diff:.3g} (> {CHECK_TOLERANCE}); not written")
    doc = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    if doc.get("files") != files.info.files:
        raise ModelError(f"{files.label} was re-exported while step.npz was made; run numpy-step again")
    doc["files"]["step.npz"] = sha256_bytes(npz)
    doc.setdefault("export_check", {})["numpy_max_abs_diff"] = diff
    mode = stat.S_IMODE(os.stat(folder / "model.json").st_mode)  # readable by whoever reads the model now
    _replace(folder / "step.npz", npz, mode)
    _replace(folder / "model.json", (json.dumps(doc, indent=2) + "\n").encode("utf-8"), mode)
    return diff


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _inference_copy(model: keras.Model, spec: ModelSpec) -> keras.Model:
    """An uncompiled copy with the same weights: `model.keras` carries no optimizer state."""
    copy = build_model(spec)
    copy.set_weights(model.get_weights())
    return copy


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
