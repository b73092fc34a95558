"""Export: a trained Keras model becomes a checked model folder (`model.keras`, `step.tflite`, `model.json`).

The folder is written only after `step.tflite` reproduces the Keras model over a
200-step sequence, so a broken model never reaches the stage; it is written to a
temporary folder and renamed into place, so a reader never sees half a model.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from server import __version__
from server.model.files import sha256_file
from server.model.litert import LiteRTStep
from server.model.quiet import native_stderr_silenced
from server.model.network import build_model, keras, make_step_function, tf
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


def check_tflite(tflite: bytes, model: keras.Model, spec: ModelSpec, events: np.ndarray) -> float:
    """Max abs difference between the Keras sequence model and the `.tflite` step over ``events``."""
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
    tflite: bytes | None = None,
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
    if tflite is None:
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
    log.debug("exported %s (check: max abs diff %.2g over %d steps)", folder, diff, CHECK_STEPS)
    return folder


def _inference_copy(model: keras.Model, spec: ModelSpec) -> keras.Model:
    """An uncompiled copy with the same weights: `model.keras` carries no optimizer state."""
    copy = build_model(spec)
    copy.set_weights(model.get_weights())
    return copy


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
