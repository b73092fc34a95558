"""Fast one-event-at-a-time predictors for the live loop.

`LiteRTStep` runs `step.tflite` with the LSTM state passed in and out explicitly; the
TensorFlow fallback runs a compiled `tf.function` step on `model.keras` and is imported
only when LiteRT is missing. `Predictor` wraps either with the state, the normaliser and
the sampler: observe an event, get the next one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np

from server import mdn
from server.modelspec import ModelError, ModelInfo, ModelSpec, read_info, verify_file


class StepFunction(Protocol):
    def __call__(self, event: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(event [1,3], state [1,S]) -> (params [P], state [1,S])``, all float32 normalised."""


def litert_available() -> bool:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


class LiteRTStep:
    """`step.tflite` under the LiteRT interpreter, single-threaded (one event is tiny)."""

    def __init__(self, tflite: bytes | Path, spec: ModelSpec) -> None:
        from ai_edge_litert.interpreter import Interpreter

        name = tflite if isinstance(tflite, Path) else "step.tflite"
        try:
            if isinstance(tflite, (bytes, bytearray)):
                self._interp = Interpreter(model_content=bytes(tflite), num_threads=1)
            else:
                self._interp = Interpreter(model_path=str(tflite), num_threads=1)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"{name} is not a valid LiteRT model ({e})") from e
        inputs = {tuple(int(n) for n in d["shape"]): d["index"] for d in self._interp.get_input_details()}
        outputs = {tuple(int(n) for n in d["shape"]): d["index"] for d in self._interp.get_output_details()}
        want_in = [(1, spec.dims), (1, spec.state_size)]
        want_out = [(1, spec.param_size), (1, spec.state_size)]
        if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(want_out):
            raise ModelError(
                f"{name} has inputs {sorted(inputs)} and outputs {sorted(outputs)}, "
                f"but model.json describes {want_in} -> {want_out}; re-export the model"
            )
        self._event_in, self._state_in = inputs[want_in[0]], inputs[want_in[1]]
        self._params_out, self._state_out = outputs[want_out[0]], outputs[want_out[1]]
        self._set = self._interp.set_tensor
        self._get = self._interp.get_tensor
        self._invoke = self._interp.invoke

    def __call__(self, event: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._set(self._event_in, event)
        self._set(self._state_in, state)
        self._invoke()
        return self._get(self._params_out)[0], self._get(self._state_out)


class TensorFlowStep:
    """Fallback: the compiled `tf.function` step on `model.keras` (imports TensorFlow)."""

    def __init__(self, keras_path: Path, spec: ModelSpec) -> None:
        from server.model import load_keras_model, make_step_function

        self._fn = make_step_function(load_keras_model(keras_path), spec)

    def __call__(self, event: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._fn(event, state)
        return out["params"].numpy()[0], out["state"].numpy()


class KerasPredictStep:
    """The naive path older systems used: `model.predict` on the sequence model per event (bench only)."""

    def __init__(self, keras_path: Path, spec: ModelSpec) -> None:
        import keras

        from server.model import load_keras_model

        src = load_keras_model(keras_path)
        # A stateful copy of the sequence model so predict() can run one step at a time.
        inputs = keras.Input(batch_shape=(1, 1, spec.dims))
        x = inputs
        for i in range(spec.layers):
            x = keras.layers.LSTM(spec.units, return_sequences=True, stateful=True, name=f"lstm_{i}")(x)
        x = src.get_layer("mdn").__class__(spec.dims, spec.mixtures, name="mdn")(x)
        self._model = keras.Model(inputs, x)
        self._model.set_weights(src.get_weights())

    def __call__(self, event: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        params = self._model.predict(event[None], verbose=0)[0, 0]
        return params, state


def open_step(folder: Path, info: ModelInfo, backend: str = "auto") -> tuple[StepFunction, str]:
    """Open the fastest available step for a model folder; returns it and the backend's name."""
    folder = Path(folder)
    if backend not in ("auto", "litert", "tensorflow"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend in ("auto", "litert") and litert_available():
        return LiteRTStep(verify_file(folder, info, "step.tflite"), info.spec), "litert"
    if backend == "litert":
        raise ModelError("LiteRT (ai-edge-litert) is not installed")
    return TensorFlowStep(verify_file(folder, info, "model.keras"), info.spec), "tensorflow"


class Predictor:
    """The model's side of the conversation: keeps the RNN state, observes events, predicts the next.

    Events are in original units: ``(dt seconds, x, y)``. Normalisation and sampling happen
    here so the engine deals only in seconds and positions.
    """

    def __init__(
        self,
        folder: Path,
        backend: str = "auto",
        info: ModelInfo | None = None,
        step: tuple[StepFunction, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.info = info or read_info(self.folder)
        self.step, self.backend = step or open_step(self.folder, self.info, backend)
        spec = self.info.spec
        norm = self.info.normaliser
        self._k, self._d = spec.mixtures, spec.dims
        self._shift_l, self._scale_l = list(norm.shift), list(norm.scale)  # plain floats: faster scalar maths
        if not (norm.log[0] and not any(norm.log[1:])):
            raise ModelError(f"{self.folder / 'model.json'}: only a log transform on dt is supported")
        self._dt_offset = norm.offset[0]
        self._dt_max = norm.clip_max[0]
        self._event = np.zeros((1, spec.dims), np.float32)
        self._zero_state = np.zeros((1, spec.state_size), np.float32)
        self.state = self._zero_state
        self.params = self._prime()

    def _prime(self) -> np.ndarray:
        """Parameters for a first event, from a neutral start (mid-pad, no wait); the state stays zero.

        Training starts every performance from a zero state, so the first real event
        must meet a zero state too; these parameters only let `generate` begin alone.
        """
        self.state = self._zero_state
        self._event[0] = self._normalise(0.0, 0.5, 0.5)
        params, _ = self.step(self._event, self._zero_state)
        return params

    def reset(self) -> None:
        """Zero the RNN state."""
        self.params = self._prime()

    def _normalise(self, dt: float, x: float, y: float) -> tuple[float, float, float]:
        dt = min(max(dt, 0.0), self._dt_max)
        sh, sc = self._shift_l, self._scale_l
        return (
            (math.log(dt + self._dt_offset) - sh[0]) / sc[0],
            (min(max(x, 0.0), 1.0) - sh[1]) / sc[1],
            (min(max(y, 0.0), 1.0) - sh[2]) / sc[2],
        )

    def observe(self, dt: float, x: float, y: float) -> np.ndarray:
        """Feed one event (original units; clipped to the valid range) and return the next-event parameters."""
        self._event[0] = self._normalise(dt, x, y)
        self.params, self.state = self.step(self._event, self.state)
        return self.params

    def sample(self, draws: mdn.RandomBlocks, temperature: float, sigma_temperature: float) -> tuple[float, float, float]:
        """Draw the next event ``(dt, x, y)`` in original units from the current parameters."""
        u, normals = draws.next()
        z0, z1, z2 = mdn.sample_row_from(self.params, self._k, self._d, u, normals, temperature, sigma_temperature)
        sh, sc = self._shift_l, self._scale_l
        dt = math.exp(min(z0 * sc[0] + sh[0], 50.0)) - self._dt_offset
        x = z1 * sc[1] + sh[1]
        y = z2 * sc[2] + sh[2]
        return (min(max(dt, 0.0), self._dt_max), min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0))
