"""The step in plain numpy, from `step.npz`: the same maths as `step.tflite`, with no TensorFlow and no LiteRT.

Where LiteRT has no wheel (Windows, some small boards) the stage would otherwise need
TensorFlow (a 1.9 GB install, ~300-700 µs a step). `step.npz` holds the network's weight
arrays, by name (`step_npz_names`), float32, written by export beside `step.tflite`:

- ``lstm_<i>.kernel`` ``[in, 4u]``, ``lstm_<i>.recurrent_kernel`` ``[u, 4u]``, ``lstm_<i>.bias``
  ``[4u]`` for each LSTM layer ``i`` (Keras' gate order: input, forget, cell, output;
  ``in`` is the event's dims for layer 0, ``u`` after);
- ``mdn.means.kernel`` / ``.bias``, ``mdn.scales.kernel`` / ``.bias``, ``mdn.logits.kernel`` /
  ``.bias``: the three dense heads ``[u, K*D]``, ``[u, K*D]``, ``[u, K]``.

One step: each layer's LSTM cell (sigmoid gates, tanh cell), then means linear, scales
ELU + 1 + eps, logits; the state is ``[h, c]`` per layer, as the `.tflite` step's. The file
is read with ``allow_pickle=False`` and every array's name, dtype and shape is checked
against model.json, so a step.npz is data, never code.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

from server.model.mdn import SCALE_EPS
from server.model.spec import ModelError, ModelSpec

HEADS = ("means", "scales", "logits")  # the MDN's dense heads, in parameter order


def step_npz_names(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every array `step.npz` holds for ``spec``, with its shape, in the documented order."""
    u, kd = spec.units, spec.mixtures * spec.dims
    names: dict[str, tuple[int, ...]] = {}
    for i in range(spec.layers):
        names[f"lstm_{i}.kernel"] = (spec.dims if i == 0 else u, 4 * u)
        names[f"lstm_{i}.recurrent_kernel"] = (u, 4 * u)
        names[f"lstm_{i}.bias"] = (4 * u,)
    for head, width in zip(HEADS, (kd, kd, spec.mixtures)):
        names[f"mdn.{head}.kernel"] = (u, width)
        names[f"mdn.{head}.bias"] = (width,)
    return names


def pack_step_npz(arrays: dict[str, np.ndarray], spec: ModelSpec) -> bytes:
    """`step.npz` bytes from named weight arrays (checked as a reader will check them)."""
    checked = _checked(arrays, spec, "step.npz")
    buffer = io.BytesIO()
    np.savez(buffer, **checked)
    return buffer.getvalue()


def unpack_step_npz(data: bytes, spec: ModelSpec, label: str = "step.npz") -> dict[str, np.ndarray]:
    """The named arrays of `step.npz` bytes; ModelError if they are not exactly what ``spec`` needs."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ModelError(f"{label} is not a readable numpy archive ({e}); re-export the model") from None
    return _checked(arrays, spec, label)


def _checked(arrays: dict[str, np.ndarray], spec: ModelSpec, label: str) -> dict[str, np.ndarray]:
    want = step_npz_names(spec)
    if set(arrays) != set(want):
        missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
        raise ModelError(f"{label} does not fit model.json (missing {missing}, unexpected {extra}); "
                         "re-export the model")
    out: dict[str, np.ndarray] = {}
    for name, shape in want.items():
        a = np.asarray(arrays[name])
        if a.dtype != np.float32 or a.shape != shape:
            raise ModelError(f"{label}: {name} is {a.dtype} {a.shape}, model.json needs float32 {shape}; "
                             "re-export the model")
        if not np.all(np.isfinite(a)):
            raise ModelError(f"{label}: {name} holds NaN or infinity; re-export the model")
        out[name] = a
    return out


class NumpyStep:
    """One step of the stacked LSTM and MDN head in numpy; stateless (the state is an input), so voices share it.

    Prepared once for speed: each layer's input and recurrent kernels are stacked into one
    matrix, and the sigmoid gates' columns halved so one `tanh` serves every gate
    (sigmoid(a) = (1 + tanh(a / 2)) / 2); the three heads are one matrix.
    """

    def __init__(self, data: bytes, spec: ModelSpec, label: str = "step.npz") -> None:
        arrays = unpack_step_npz(data, spec, label)
        u = self._units = spec.units
        half = np.ones(4 * u, np.float32)
        half[: 2 * u] = half[3 * u :] = 0.5  # input, forget and output gates are sigmoids; the cell's is tanh
        self._layers = []
        for i in range(spec.layers):
            w = np.concatenate([arrays[f"lstm_{i}.kernel"], arrays[f"lstm_{i}.recurrent_kernel"]]) * half
            self._layers.append((np.ascontiguousarray(w), arrays[f"lstm_{i}.bias"] * half))
        self._head_w = np.ascontiguousarray(np.concatenate([arrays[f"mdn.{h}.kernel"] for h in HEADS], axis=1))
        self._head_b = np.concatenate([arrays[f"mdn.{h}.bias"] for h in HEADS])
        kd = spec.mixtures * spec.dims
        self._scales = slice(kd, 2 * kd)
        self._state_size = spec.state_size

    def __call__(self, event: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = self._units
        x = np.asarray(event, np.float32).reshape(-1)
        old = np.asarray(state, np.float32).reshape(-1)
        new = np.empty((1, self._state_size), np.float32)
        flat = new[0]
        for i, (w, b) in enumerate(self._layers):
            base = 2 * i * u
            z = np.concatenate((x, old[base : base + u])) @ w
            z += b
            np.tanh(z, out=z)
            gates = z * 0.5
            gates += 0.5  # input, forget, (unused), output as sigmoids; z[2u:3u] is the cell's tanh
            c = flat[base + u : base + 2 * u]
            np.multiply(gates[u : 2 * u], old[base + u : base + 2 * u], out=c)
            c += gates[:u] * z[2 * u : 3 * u]
            h = flat[base : base + u]
            np.tanh(c, out=h)
            h *= gates[3 * u :]
            x = h
        params = x @ self._head_w
        params += self._head_b
        scales = params[self._scales]
        negative = np.minimum(scales, 0.0)
        np.expm1(negative, out=negative)
        np.maximum(scales, 0.0, out=scales)
        scales += negative  # ELU
        scales += 1.0
        scales += SCALE_EPS
        return params, new
