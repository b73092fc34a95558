"""Likelihood of a dataset under a model, per event, in the original units.

Each performance runs statefully from a zero state (one pass of the sequence model);
the normaliser's log-Jacobian is added so models with different normalisations compare.
"""

from __future__ import annotations

import numpy as np

from server.model import mdn
from server.learn.data import Dataset
from server.model.spec import ModelInfo


def nll_per_event(model, info: ModelInfo, ds: Dataset, batch: int = 64) -> float:
    """Mean negative log-likelihood per predicted event (nats; dt in seconds, x and y in [0, 1]).

    Performances are padded at the end and run as one batch: the LSTM is causal, so
    padding after an event never changes the prediction made for it.
    """
    spec, norm = info.spec, info.normaliser
    perfs = [np.clip(p.astype(np.float64), norm.clip_min, norm.clip_max) for p in ds.performances if len(p) >= 2]
    if not perfs:
        raise ValueError("no performance has two or more events")
    total, count = 0.0, 0
    for first in range(0, len(perfs), batch):
        group = perfs[first : first + batch]
        longest = max(len(p) for p in group) - 1
        z_in = np.zeros((len(group), longest, spec.dims), np.float32)
        for i, p in enumerate(group):
            z_in[i, : len(p) - 1] = norm.forward(p[:-1])
        params = np.asarray(model(z_in, training=False))
        for i, p in enumerate(group):
            n = len(p) - 1
            logp = mdn.log_density(params[i, :n], norm.forward(p[1:]), spec.mixtures, spec.dims)
            total -= float(np.sum(logp + norm.log_jacobian(p[1:])))
            count += n
    return total / count
