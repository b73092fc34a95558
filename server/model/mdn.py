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


def sample(
    params: np.ndarray,
    mixtures: int,
    dims: int,
    rng: np.random.Generator,
    temperature: float = 1.0,
    sigma_temperature: float = 1.0,
) -> np.ndarray:
    """Draw one sample per row of ``params [N, P]`` (or ``[P]``); returns ``[N, D]`` (or ``[D]``).

    ``temperature`` divides the logits (0, or below 1e-6, = the most likely component); ``sigma_temperature``
    multiplies the scales (0 = the component mean). Inputs are sanitised so the result is
    always finite and the chosen component always valid, whatever the network emits.
    """
    if temperature < 0 or sigma_temperature < 0:
        raise ValueError("temperatures must be >= 0")
    params = np.asarray(params, dtype=np.float64)
    single = params.ndim == 1
    params = np.atleast_2d(params)
    clean = np.clip(np.nan_to_num(params, nan=0.0, posinf=1e6, neginf=-1e6), -1e6, 1e6)
    means, scales, logits = split_params(clean, mixtures, dims)
    n = params.shape[0]
    rows = np.arange(n)
    if temperature < GREEDY_BELOW:
        comp = np.argmax(logits, axis=-1)
    else:
        logp = log_softmax(logits / temperature)
        # Inverse-CDF draw: one uniform per row, searched in the cumulative weights.
        cdf = np.cumsum(np.exp(logp), axis=-1)
        u = rng.random(n) * cdf[:, -1]
        comp = np.minimum((cdf < u[:, None]).sum(axis=-1), mixtures - 1)
    mu = means[rows, comp]
    if sigma_temperature == 0.0:
        out = mu
    else:
        sigma = np.clip(scales[rows, comp], SCALE_EPS, 1e6) * sigma_temperature
        out = mu + sigma * rng.standard_normal((n, dims))
    return out[0] if single else out


def sample_row(
    params: np.ndarray,
    mixtures: int,
    dims: int,
    rng: np.random.Generator,
    temperature: float = 1.0,
    sigma_temperature: float = 1.0,
) -> list[float]:
    """One draw from one parameter vector: `sample` for a single row, in scalar Python.

    The live loop samples one event at a time; numpy's per-call overhead made the
    vectorised path ~30 us, this one is a few. Same algorithm, same guarantees
    (finite output, valid component), tested against `sample`.
    """
    return sample_row_from(
        params, mixtures, dims, rng.random(), rng.standard_normal(dims).tolist(), temperature, sigma_temperature
    )


def sample_row_from(
    params: np.ndarray,
    mixtures: int,
    dims: int,
    uniform: float,
    normals: list[float],
    temperature: float = 1.0,
    sigma_temperature: float = 1.0,
) -> list[float]:
    """`sample_row` with its random numbers given: one uniform in [0, 1) and ``dims`` standard normals.

    Lets the live loop draw its random numbers in blocks (see `RandomBlocks`).
    """
    if temperature < 0 or sigma_temperature < 0:
        raise ValueError("temperatures must be >= 0")
    p = params.tolist()
    kd = mixtures * dims
    logits = [v if -1e6 < v < 1e6 else _finite(v) for v in p[2 * kd : 2 * kd + mixtures]]
    if temperature < GREEDY_BELOW:
        comp = logits.index(max(logits))
    else:
        top = max(logits)
        weights = [math.exp((v - top) / temperature) for v in logits]
        u = uniform * sum(weights)
        comp, acc = mixtures - 1, 0.0
        for i, w in enumerate(weights):
            acc += w
            if u < acc:
                comp = i
                break
    base = comp * dims
    means = [v if -1e6 < v < 1e6 else _finite(v) for v in p[base : base + dims]]
    if sigma_temperature == 0.0:
        return means
    scales = p[kd + base : kd + base + dims]
    return [
        m + (s if SCALE_EPS < s < 1e6 else min(max(_finite(s), SCALE_EPS), 1e6)) * sigma_temperature * z
        for m, s, z in zip(means, scales, normals)
    ]


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
    """NaN -> 0, +-inf -> +-1e6: what `sample` does with nan_to_num, for scalars."""
    if v != v:
        return 0.0
    return min(max(v, -1e6), 1e6)
