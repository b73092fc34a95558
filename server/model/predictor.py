"""The model's side of the conversation, one event at a time: state, normalisation, sampling.

`Predictor` keeps the RNN state, observes events and samples the next one, all in
original units (seconds and [0, 1] positions) so the engine never sees normalised
values. Its step runs `step.tflite` under LiteRT, or when LiteRT is missing the numpy
step of `step.npz`, or for a model without one a compiled `tf.function` (TensorFlow is
imported only then); `--step-engine` may force any of them. Built from `ModelFiles`, the checked bytes of a
model: nothing on disk is read after construction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.model import mdn
from server.model.engines import check_backend, open_step, read_for
from server.model.files import ModelFiles
from server.model.likelihood import event_log_likelihoods
from server.model.litert import StepFunction
from server.model.spec import ModelInfo

BACKENDS = ("auto", "litert", "numpy", "tensorflow")  # the step engines `--step-engine` may force


class Predictor:
    """Keeps the RNN state, observes events, predicts the next; events are ``(dt seconds, v1 .. vN)``, N = `values`."""

    def __init__(self, model: ModelFiles, backend: str = "auto", step: tuple[StepFunction, str] | None = None) -> None:
        self.model = model
        self.info: ModelInfo = model.info
        self.requested = check_backend(backend) if step is None else backend  # what was asked: a swap asks the same
        self.step, self.backend = step or open_step(model, backend)
        spec = self.info.spec
        self.norm = self.info.normaliser
        self._k, self._d = spec.mixtures, spec.dims
        self.values = spec.values  # N: how many values an event carries after dt
        self._relatives = self.norm.relatives  # predicted as steps from the value just heard
        # (dimension, steps per unit) of each quantised one: a draw plays the cell it falls in
        self._cells = tuple((d, round(1.0 / self.norm.grid[d])) for d in self.norm.gridded)
        self._event = np.zeros((1, spec.dims), np.float32)
        self._zero_state = np.zeros((1, spec.state_size), np.float32)
        self.state = self._zero_state
        self.params = self._prime()

    @classmethod
    def load(cls, folder: Path, backend: str = "auto", label: str | None = None, *, prove: bool = False) -> "Predictor":
        """Read, check and open a model folder (what `run` and the tools do).

        ``prove``: first build and run the step on those same bytes in a short-lived child
        process (`server.model.sandbox`), so a file that would crash, hang or poison the
        interpreter is refused with a ModelError instead of taking this process down. The
        server does it for every model it plays; it blocks for the child's run (~0.2 s).
        """
        model = read_for(folder, backend, label)
        if prove:
            from server.model.sandbox import prove as prove_model

            prove_model(model, backend)
        return cls(model, backend)

    def fork(self) -> "Predictor":
        """Another state on the same model and interpreter (a voice): the step is stateless, so it is shared."""
        return Predictor(self.model, self.requested, step=(self.step, self.backend))

    @property
    def label(self) -> str:
        return self.model.label

    def _prime(self) -> np.ndarray:
        """Parameters for a first event, from a neutral start (mid-pad, no wait); the state stays zero.

        Training starts every performance from a zero state, so the first real event
        must meet a zero state too; these parameters only let `generate` begin alone.
        """
        self.state = self._zero_state
        self._event[0] = self.norm.forward_event((0.0,) + (0.5,) * self.values)
        params, _ = self.step(self._event, self._zero_state)
        return self._values(params)

    def _values(self, params: np.ndarray) -> np.ndarray:
        """The step's parameters with a relative dimension's predicted steps moved to values (in place)."""
        if self._relatives:
            means = params[: self._k * self._d].reshape(self._k, self._d)
            for d in self._relatives:
                means[:, d] += self._event[0, d]
        return params

    def reset(self) -> None:
        """Zero the RNN state."""
        self.params = self._prime()

    def observe(self, dt: float, *values: float) -> np.ndarray:
        """Feed one event (original units; clipped to the valid range) and return the next-event parameters.

        Exactly `values` values after dt, else ValueError (a short event would otherwise be cut silently).
        """
        if len(values) != self.values:
            raise ValueError(f"the model takes {self.values} values after dt, got {len(values)}")
        self._event[0] = self.norm.forward_event((dt, *values))
        params, self.state = self.step(self._event, self.state)
        self.params = self._values(params)
        return self.params

    def sample(self, draws: mdn.RandomBlocks, temperature: float, sigma_temperature: float) -> tuple[float, ...]:
        """Draw the next event ``(dt, v1 .. vN)`` in original units; ``draws`` must give `info.spec.dims` normals.

        On a dimension the data had on a grid (MIDI pitch: 1/127) the value played is the
        grid point of the cell the continuous draw falls in, so each note comes with the
        probability the model gives its whole cell, the figure training and evaluation
        (dequantised) measure; temperatures act on the draw before the cell is taken, so
        at ``sigma_temperature`` 0 it is the cell holding the component's mean.
        """
        u, normals = draws.next()
        if len(normals) != self._d:  # too few would cut the event short, silently
            raise ValueError(f"draws give {len(normals)} normals, the model needs {self._d} (RandomBlocks(rng, dims))")
        z = mdn.sample_event(self.params, self._k, self._d, u, normals, temperature, sigma_temperature)
        event = self.norm.inverse_event(z)
        for d, steps in self._cells:
            event[d] = round(event[d] * steps) / steps
        return tuple(event)

    def mixture(self, temperature: float, sigma_temperature: float, params: np.ndarray | None = None) -> list[float]:
        """The predictive distribution of the next event in original units, as the `mixture` stream sends it.

        ``[K, w_1..w_K, then per component: dt_median_s, N value means, dt_log_sigma, N value sigmas]``:
        weights after ``temperature``, scales times ``sigma_temperature``. dt is log-normal
        (its median in seconds and the sigma of log(dt + offset)); a constant dimension has
        its value and sigma 0; on a gridded dimension each mean is the grid point of the cell
        it falls in (what the component plays at ``sigma_temperature`` 0), its sigma the
        density's. ``params`` are an earlier prediction's (the current one by default).
        """
        params = self.params if params is None else params
        means, scales, logits = mdn.split_params(np.asarray(params, np.float64), self._k, self._d)
        logits = np.nan_to_num(logits, nan=0.0, posinf=1e6, neginf=-1e6)
        if temperature < mdn.GREEDY_BELOW:
            weights = np.zeros(self._k)
            weights[int(np.argmax(logits))] = 1.0
        else:
            weights = np.exp(mdn.log_softmax(logits / temperature))
        norm = self.norm
        locations = norm.inverse(means)  # [K, D] in original units, clipped; constants as their value
        for d, steps in self._cells:  # on a grid: the cell each mean falls in (what it plays at sigma_temperature 0)
            locations[:, d] = np.round(locations[:, d] * steps) / steps
        spreads = np.clip(scales, mdn.SCALE_EPS, 1e6) * np.asarray(norm.scale) * sigma_temperature
        spreads[:, [d for d, c in enumerate(norm.constant) if c is not None]] = 0.0
        return [float(self._k), *weights.tolist(), *np.concatenate([locations, spreads], axis=1).ravel().tolist()]

    def surprise(self, dt: float, *values: float, params: np.ndarray | None = None) -> float:
        """How unlikely an event is under the current prediction (or ``params``): NLL in nats, dequantised where quantised."""
        params = self.params if params is None else params
        if len(values) != self.values:
            raise ValueError(f"the model takes {self.values} values after dt, got {len(values)}")
        event = np.clip(np.asarray([[dt, *values]], np.float64), self.norm.clip_min, self.norm.clip_max)
        _, deq = event_log_likelihoods(np.asarray(params)[None, :], event, self.info, raw=False)
        return float(-deq[0])
