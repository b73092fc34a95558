"""The stage's step backend: `step.tflite` under the LiteRT interpreter, built from checked bytes.

One event is tiny, so the interpreter runs single-threaded; the LSTM state is an
explicit input and output, so one interpreter could serve many states.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from server.model.quiet import native_stderr_silenced
from server.model.spec import ModelError, ModelSpec


class StepFunction(Protocol):
    def __call__(self, event: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(event [1, dims], state [1, S]) -> (params [P], state [1, S])``, all float32 normalised."""


def litert_available() -> bool:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


class LiteRTStep:
    """`step.tflite` bytes under the LiteRT interpreter (from memory: no file is mapped)."""

    def __init__(self, tflite: bytes, spec: ModelSpec, label: str = "step.tflite") -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            with native_stderr_silenced():  # LiteRT announces its CPU delegate on stderr
                self._interp = Interpreter(model_content=bytes(tflite), num_threads=1)
                self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"{label} is not a valid LiteRT model ({e})") from e
        inputs = {tuple(int(n) for n in d["shape"]): d["index"] for d in self._interp.get_input_details()}
        outputs = {tuple(int(n) for n in d["shape"]): d["index"] for d in self._interp.get_output_details()}
        want_in = [(1, spec.dims), (1, spec.state_size)]
        want_out = [(1, spec.param_size), (1, spec.state_size)]
        if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(want_out):
            raise ModelError(
                f"{label} has inputs {sorted(inputs)} and outputs {sorted(outputs)}, "
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
