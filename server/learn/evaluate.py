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

from dataclasses import dataclass

import numpy as np

from server.learn.data import Dataset
from server.model.likelihood import event_log_likelihoods
from server.model.litert import LiteRTStep, StepFunction, litert_available
from server.model.spec import ModelInfo

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
