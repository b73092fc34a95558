"""Mixture density network maths in numpy: parameter layout, sampling and log-density.

Parameter layout, shared by the head, the loss and the sampler (K mixtures, D dims):
``[means (K*D) | scales (K*D) | logits (K)]``, means and scales grouped by component.
No TensorFlow here, so the live server can sample without it; the Keras head and
the tfp loss are in `server.model.network`.
"""

from __future__ import annotations

import math

import numpy as np

SCALE_EPS = 1e-6  # floor on every scale so no component collapses to a delta
GREEDY_BELOW = 1e-6  # temperatures this small are greedy: dividing by them would overflow


def param_count(mixtures: int, dims: int) -> int:
    """Length of one MDN parameter vector."""
    return mixtures * (2 * dims + 1)


def split_params(params: np.ndarray, mixtures: int, dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``[..., P]`` into means ``[..., K, D]``, scales ``[..., K, D]`` and logits ``[..., K]``."""
    params = np.asarray(params)
    kd = mixtures * dims
    lead = params.shape[:-1]
    if params.shape[-1] != param_count(mixtures, dims):
        raise ValueError(f"expected {param_count(mixtures, dims)} parameters, got {params.shape[-1]}")
    means = params[..., :kd].reshape(*lead, mixtures, dims)
    scales = params[..., kd : 2 * kd].reshape(*lead, mixtures, dims)
    logits = params[..., 2 * kd :]
    return means, scales, logits


def shift_means(params: np.ndarray, mixtures: int, dims: int, offsets: np.ndarray) -> np.ndarray:
    """A copy of ``params [..., P]`` with every component's means moved by ``offsets [..., D]``.

    A relative dimension is predicted as the step from the previous event's value: adding
    that value (0 elsewhere) makes the mixture one over values again, for sampling,
    likelihoods and displays alike.
    """
    out = np.array(params, dtype=np.float64 if np.asarray(params).dtype == np.float64 else np.float32, copy=True)
    kd = mixtures * dims
    lead = out.shape[:-1]
    means = out[..., :kd].reshape(*lead, mixtures, dims) + np.asarray(offsets)[..., None, :]
    out[..., :kd] = means.reshape(*lead, kd)
    return out


# --------------------------------------------------------------------------- numpy side


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (finite for logits of any size)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def log_density(params: np.ndarray, x: np.ndarray, mixtures: int, dims: int) -> np.ndarray:
    """Log-density of ``x [..., D]`` under the mixture ``params [..., P]`` (float64 reference)."""
    means, scales, logits = split_params(np.asarray(params, dtype=np.float64), mixtures, dims)
    x = np.asarray(x, dtype=np.float64)[..., None, :]
    z = (x - means) / scales
    comp = -0.5 * np.sum(z * z, axis=-1) - np.sum(np.log(scales), axis=-1) - 0.5 * dims * math.log(2 * math.pi)
    joint = log_softmax(logits) + comp
    top = joint.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(joint - top).sum(axis=-1, keepdims=True)))[..., 0]


def sample_event(
    params: np.ndarray,
    mixtures: int,
    dims: int,
    uniform: float,
    normals: list[float],
    temperature: float = 1.0,
    sigma_temperature: float = 1.0,
) -> list[float]:
    """Draw one event (normalised units) from one parameter vector ``[P]``: the only sampler.

    The random numbers are given, drawn by the caller from an explicit Generator (the
    live loop and the tools use `RandomBlocks`): one ``uniform`` in [0, 1) picks the
    component, ``dims`` standard ``normals`` place the point. ``temperature`` divides the
    logits (0, or below 1e-6, = the most likely component); ``sigma_temperature``
    multiplies the scales (0 = the component mean). Whatever the network emits (NaN,
    infinities, huge logits or scales, scales <= 0), the result is finite and comes from
    a valid component: NaN counts as 0, values are clipped to +-1e6 and scales to
    [1e-6, 1e6]. Scalar Python, since the live loop samples one event at a time and
    numpy's per-call overhead would cost more than the maths.
    """
    if not (temperature >= 0.0 and sigma_temperature >= 0.0):  # also refuses NaN
        raise ValueError("temperatures must be >= 0")
    p = params.tolist()
    kd = mixtures * dims
    if len(p) != kd * 2 + mixtures:
        raise ValueError(f"expected {param_count(mixtures, dims)} parameters, got {len(p)}")
    base = pick_component(p[2 * kd :], uniform, temperature) * dims
    means = [v if -1e6 < v < 1e6 else _finite(v) for v in p[base : base + dims]]
    if sigma_temperature == 0.0:
        return means
    spread = sigma_temperature if sigma_temperature < 1e6 else 1e6  # keeps mean + scale * spread * z finite
    return [
        m + (s if SCALE_EPS < s < 1e6 else min(max(_finite(s), SCALE_EPS), 1e6)) * spread * z
        for m, s, z in zip(means, p[kd + base : kd + base + dims], normals)
    ]


def pick_component(logits: list[float], uniform: float, temperature: float) -> int:
    """The mixture component for one draw: index into ``logits`` of softmax(logits / temperature).

    Inverse CDF with ``uniform`` in [0, 1); below 1e-6 the temperature is greedy (argmax,
    the first on ties). Always a valid index of a component with non-zero weight.
    """
    logits = [v if -1e6 < v < 1e6 else _finite(v) for v in logits]
    top = max(logits)
    if temperature < GREEDY_BELOW:
        return logits.index(top)
    weights = [math.exp((v - top) / temperature) for v in logits]  # the top one is exactly 1
    u = uniform * sum(weights)
    acc, last = 0.0, 0
    for i, w in enumerate(weights):
        if w > 0.0:
            acc += w
            last = i
            if u < acc:
                return i
    return last  # u rounded up to the total: the last component that has any weight


class RandomBlocks:
    """Uniforms and standard normals from an explicit Generator, drawn a block at a time.

    One numpy call per 1,024 events instead of two per event: the same seeded stream of
    numbers, a microsecond less per step.
    """

    def __init__(self, rng: np.random.Generator, dims: int, block: int = 1024) -> None:
        self._rng, self._dims, self._block = rng, dims, block
        self._i = block
        self._uniforms: list[float] = []
        self._normals: list[list[float]] = []

    def next(self) -> tuple[float, list[float]]:
        """One uniform in [0, 1) and ``dims`` standard normals."""
        i = self._i
        if i >= self._block:
            self._uniforms = self._rng.random(self._block).tolist()
            self._normals = self._rng.standard_normal((self._block, self._dims)).tolist()
            i = 0
        self._i = i + 1
        return self._uniforms[i], self._normals[i]


def _finite(v: float) -> float:
    """NaN -> 0, anything else clipped to [-1e6, 1e6]."""
    if v != v:
        return 0.0
    return min(max(v, -1e6), 1e6)
