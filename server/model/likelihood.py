"""The likelihood of one event under a predicted mixture, in original units: raw and dequantised.

Shared by offline evaluation and the live `surprise` stream, so both report the same
figure. Raw is the density at the event; dequantised integrates each quantised
coordinate over its grid cell (exactly, through the normal CDF) and divides by the
cell width; constant dimensions are in neither.
"""

from __future__ import annotations

import math

import numpy as np

from server.model import mdn
from server.model.spec import ModelInfo

_erfc = np.vectorize(math.erfc, otypes=[np.float64])


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


def event_log_likelihoods(params: np.ndarray, events: np.ndarray, info: ModelInfo,
                          raw: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """Per event (raw, dequantised) log-likelihood in original units for ``params [n, P]`` and ``events [n, dims]``.

    ``raw=False`` skips the raw figure (None), for the live `surprise` stream, which sends only the dequantised one.
    """
    spec, norm = info.spec, info.normaliser
    means, scales, logits = mdn.split_params(np.asarray(params, np.float64), spec.mixtures, spec.dims)
    scales = np.maximum(scales, mdn.SCALE_EPS)
    z = norm.forward(events).astype(np.float64)
    log_w = mdn.log_softmax(logits)  # [n, K]
    active, gridded = norm.active, norm.gridded
    # raw: Gaussian density over the active dimensions
    zz = (z[:, None, :] - means) / scales
    log_pdf = -0.5 * zz * zz - np.log(scales) - 0.5 * math.log(2 * math.pi)  # [n, K, D]
    raw_ll = logsumexp(log_w + log_pdf[:, :, list(active)].sum(-1)) + norm.log_jacobian(events) if raw else None
    # dequantised: gridded dimensions as the mass of their cell divided by its width
    continuous = [d for d in active if d not in gridded]
    comp = log_pdf[:, :, continuous].sum(-1)
    for d in gridded:
        half = norm.grid[d] / 2 / norm.scale[d]
        lo, hi = z[:, None, d] - half, z[:, None, d] + half
        comp = comp + log_normal_cell(means[:, :, d], scales[:, :, d], lo, hi) - math.log(norm.grid[d])
    deq = logsumexp(log_w + comp) + norm.log_jacobian(events, continuous)
    return raw_ll, deq


def logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]
