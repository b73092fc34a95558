"""The RNN + MDN in Keras: the sequence model for training, the one-step function, and export.

Export writes a model folder only after checking that `step.tflite` reproduces the
Keras model over a 200-step sequence, so a broken model never reaches the stage.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from server import __version__
from server.mdn import make_mdn_layer_class
from server.modelspec import ModelError, ModelInfo, ModelSpec, sha256_file

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

log = logging.getLogger(__name__)

CHECK_STEPS = 200
CHECK_TOLERANCE = 1e-4


def build_model(spec: ModelSpec) -> keras.Model:
    """Sequence model ``[B, T, 3] -> [B, T, P]`` from a zero state (used for training and evaluation)."""
    MDN = make_mdn_layer_class()
    inputs = keras.Input(shape=(None, spec.dims), name="events")
    x = inputs
    for i in range(spec.layers):
        x = keras.layers.LSTM(spec.units, return_sequences=True, name=f"lstm_{i}")(x)
    outputs = MDN(spec.dims, spec.mixtures, name="mdn")(x)
    return keras.Model(inputs, outputs, name="antiphon")


def load_keras_model(path: Path) -> keras.Model:
    """Load `model.keras` with safe_mode (no arbitrary code, no pickles)."""
    make_mdn_layer_class()
    try:
        return keras.saving.load_model(Path(path), compile=False, safe_mode=True)
    except Exception as e:  # keras raises many types for a bad file
        raise ModelError(f"{path} cannot be loaded ({type(e).__name__}: {e}); re-export the model") from e


def lstm_layers(model: keras.Model, spec: ModelSpec) -> list:
    return [model.get_layer(f"lstm_{i}") for i in range(spec.layers)]


def make_step_function(model: keras.Model, spec: ModelSpec) -> tf.types.experimental.GenericFunction:
    """A compiled one-step function ``(event [1,3], state [1,S]) -> (params [1,P], state [1,S])``.

    The LSTM state is an explicit flat tensor (per layer h then c), so the caller owns it:
    that is what lets LiteRT run the model one event at a time.
    """
    cells = [layer.cell for layer in lstm_layers(model, spec)]
    head = model.get_layer("mdn")
    units = spec.units

    @tf.function(
        input_signature=[
            tf.TensorSpec([1, spec.dims], tf.float32, name="event"),
            tf.TensorSpec([1, spec.state_size], tf.float32, name="state"),
        ]
    )
    def step(event, state):
        x = event
        new_state = []
        for i, cell in enumerate(cells):
            h = state[:, (2 * i) * units : (2 * i + 1) * units]
            c = state[:, (2 * i + 1) * units : (2 * i + 2) * units]
            x, (h, c) = cell(x, [h, c], training=False)
            new_state += [h, c]
        return {"params": head(x), "state": tf.concat(new_state, axis=-1)}

    return step


def convert_to_tflite(model: keras.Model, spec: ModelSpec) -> bytes:
    # The converter freezes variables it can reach from the trackable object: a tf.Module
    # holding the step and the Keras variables (Keras 3 models are not tf trackables).
    holder = tf.Module()
    holder.step = make_step_function(model, spec)
    holder.variables_ = [v.value for v in model.variables]
    concrete = holder.step.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
    return converter.convert()


def check_tflite(tflite: bytes, model: keras.Model, spec: ModelSpec, events: np.ndarray) -> float:
    """Max abs difference between the Keras sequence model and the `.tflite` step over ``events``."""
    from server.runtime import LiteRTStep

    events = np.asarray(events, dtype=np.float32)[None]
    expected = model(events, training=False).numpy()[0]
    step = LiteRTStep(tflite, spec)
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
) -> Path:
    """Write `model.keras`, `step.tflite` and `model.json` atomically into ``folder``.

    ``check_events`` (normalised, >= 200 rows are used) drive the Keras-vs-LiteRT check;
    if the difference exceeds 1e-4 nothing is written and ModelError is raised.
    """
    folder = Path(folder)
    check_events = np.asarray(check_events, np.float32)[:CHECK_STEPS]
    if len(check_events) < CHECK_STEPS:
        reps = -(-CHECK_STEPS // max(len(check_events), 1))
        check_events = np.tile(check_events, (reps, 1))[:CHECK_STEPS]
    tflite = convert_to_tflite(model, info.spec)
    diff = check_tflite(tflite, model, info.spec, check_events)
    if not diff <= CHECK_TOLERANCE:
        raise ModelError(f"step.tflite differs from model.keras by {diff:.3g} (> {CHECK_TOLERANCE}); not exported")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _inference_copy(model, info.spec).save(tmp / "model.keras")
        (tmp / "step.tflite").write_bytes(tflite)
        doc = info.to_json()
        doc["files"] = {name: sha256_file(tmp / name) for name in ("model.keras", "step.tflite")}
        doc["export_check"] = {"steps": CHECK_STEPS, "max_abs_diff": diff}
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
    log.info("exported %s (check: max abs diff %.2g over %d steps)", folder, diff, CHECK_STEPS)
    return folder


def _inference_copy(model: keras.Model, spec: ModelSpec) -> keras.Model:
    """An uncompiled copy with the same weights: `model.keras` carries no optimizer state."""
    copy = build_model(spec)
    copy.set_weights(model.get_weights())
    return copy


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
