"""Likelihood of a dataset under a model, per event, in the original units: raw and dequantised.

Each performance runs from a zero state through the one-step function, as on stage. The
normaliser's log-Jacobian is added so models with different normalisations compare.

- *raw*: the density at each event (what the loss sees). On quantised data it can be
  gamed by spikes on grid points.
- *dequantised*: each quantised coordinate integrated over its grid cell (exactly,
  through the normal CDF) and divided by the cell width: the density of the data
  spread uniformly over its cells. Honest on quantised data, equal to raw where no
  dimension is quantised, and the figure Antiphon leads with.

Constant dimensions are not modelled, so they are in neither figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from server.learn.data import Dataset
from server.model import mdn
from server.model.litert import LiteRTStep, StepFunction, litert_available
from server.model.spec import ModelInfo

_erfc = np.vectorize(math.erfc, otypes=[np.float64])


@dataclass(frozen=True)
class Scores:
    raw: float  # mean NLL per predicted event, nats, density at the event
    dequantised: float  # the same with quantised coordinates integrated over their cells
    events: int  # predicted events (every event but each performance's first)
    performances: int

    @property
    def lead(self) -> float:
        """The figure to quote: dequantised (equal to raw when nothing is quantised)."""
        return self.dequantised


def log_normal_cell(mu: np.ndarray, sigma: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``log P(lo < X < hi)`` for ``X ~ N(mu, sigma)``, elementwise, accurate in both tails.

    ``Phi(hi) - Phi(lo)`` is written as a difference of two erfc values that are small
    where it is used (above the mean by symmetry), in log space, so nothing cancels
    and nothing underflows even 40 standard deviations out.
    """
    a = (np.asarray(lo) - mu) / (sigma * math.sqrt(2.0))
    b = (np.asarray(hi) - mu) / (sigma * math.sqrt(2.0))
    upper = a > 0
    p = np.where(upper, a, -b)  # the erfc argument with the larger erfc
    q = np.where(upper, b, -a)
    log_p, log_q = _log_erfc(p), _log_erfc(q)
    return log_p + np.log1p(-np.exp(np.minimum(log_q - log_p, 0.0))) - math.log(2.0)


def _log_erfc(x: np.ndarray) -> np.ndarray:
    """``log erfc(x)``; past x = 25, where erfc underflows, its asymptotic series."""
    x = np.asarray(x, dtype=np.float64)
    safe = np.where(x < 25.0, x, 0.0)
    big = np.where(x >= 25.0, x, 25.0)
    series = -big * big - np.log(big) - 0.5 * math.log(math.pi) + np.log1p(-0.5 / big**2 + 0.75 / big**4)
    return np.where(x < 25.0, np.log(np.maximum(_erfc(safe), 1e-300)), series)


def event_log_likelihoods(params: np.ndarray, events: np.ndarray, info: ModelInfo) -> tuple[np.ndarray, np.ndarray]:
    """Per event (raw, dequantised) log-likelihood in original units for ``params [n, P]`` and ``events [n, 3]``."""
    spec, norm = info.spec, info.normaliser
    means, scales, logits = mdn.split_params(np.asarray(params, np.float64), spec.mixtures, spec.dims)
    scales = np.maximum(scales, mdn.SCALE_EPS)
    z = norm.forward(events).astype(np.float64)
    log_w = mdn.log_softmax(logits)  # [n, K]
    active, gridded = norm.active, norm.gridded
    # raw: Gaussian density over the active dimensions
    zz = (z[:, None, :] - means) / scales
    log_pdf = -0.5 * zz * zz - np.log(scales) - 0.5 * math.log(2 * math.pi)  # [n, K, D]
    raw = _logsumexp(log_w + log_pdf[:, :, list(active)].sum(-1)) + norm.log_jacobian(events)
    # dequantised: gridded dimensions as the mass of their cell divided by its width
    continuous = [d for d in active if d not in gridded]
    comp = log_pdf[:, :, continuous].sum(-1)
    for d in gridded:
        half = norm.grid[d] / 2 / norm.scale[d]
        lo, hi = z[:, None, d] - half, z[:, None, d] + half
        comp = comp + log_normal_cell(means[:, :, d], scales[:, :, d], lo, hi) - math.log(norm.grid[d])
    deq = _logsumexp(log_w + comp) + norm.log_jacobian(events, continuous)
    return raw, deq


def score(step: StepFunction, info: ModelInfo, ds: Dataset) -> Scores:
    """Mean NLL per predicted event (nats; dt in seconds, x and y in [0, 1]), raw and dequantised.

    Runs the one-step function event by event from a zero state, exactly as the live
    loop does: with LiteRT about 10 us an event, where the Keras sequence model takes
    minutes over a performance of 20,000 events.
    """
    spec, norm = info.spec, info.normaliser
    perfs = [np.clip(p.astype(np.float64), norm.clip_min, norm.clip_max) for p in ds.performances if len(p) >= 2]
    if not perfs:
        raise ValueError("no performance has two or more events")
    raw_total = deq_total = 0.0
    count = 0
    for p in perfs:
        n = len(p) - 1
        z = norm.forward(p[:-1])
        state = np.zeros((1, spec.state_size), np.float32)
        params = np.empty((n, spec.param_size), np.float32)
        for t in range(n):
            params[t], state = step(z[t : t + 1], state)
        raw, deq = event_log_likelihoods(params, p[1:], info)
        raw_total -= float(raw.sum())
        deq_total -= float(deq.sum())
        count += n
    return Scores(raw_total / count, deq_total / count, count, len(perfs))


def step_for(tflite: bytes, info: ModelInfo, keras_model=None) -> StepFunction:
    """The fastest step for scoring: LiteRT on the `.tflite` bytes, else the compiled TensorFlow step."""
    if litert_available():
        return LiteRTStep(tflite, info.spec)
    from server.model.network import TensorFlowStep

    return TensorFlowStep(keras_model, info.spec)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]
