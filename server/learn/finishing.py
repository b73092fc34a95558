"""How long the end of training takes, measured before training starts, so `--minutes` holds at any size.

After the fit, `train` scores every held-out event through the one-step function and lets
the model play ~68,000 steps to calibrate its sampling (server.learn.calibrate); both cost
one step per event, and a step's cost grows with the model (on the 2-core VM, 2026-12-06,
chorales, 18,623 held-out events: the whole end took 3.4 s at size xs and 18-19 s at l).
A fixed reserve was either too long for small models (a one-minute run trained ~35 s) or
too short for large ones. So the step that will score is timed on an untrained copy
before the clock starts, and the reserve is that cost times the steps to come, with a
margin, plus what does not scale with the data (conversion, export, report).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

FIXED_S = 4.0  # conversion, the export's check, writing the folder and its report (2.5-3.3 s measured, xs to l)
MARGIN = 1.5  # on the measured steps: the machine may be busier at the end than when it was measured
TIMED_STEPS = 200  # steps timed, after WARM_STEPS untimed ones
WARM_STEPS = 20


def reserve_seconds(step_seconds: float, steps: int) -> float:
    """Seconds to keep from the budget for the end of training: FIXED_S + MARGIN x the steps' measured cost."""
    return FIXED_S + MARGIN * max(0.0, step_seconds) * max(0, steps)


def finishing_steps(held_out: Iterable[np.ndarray]) -> int:
    """One-step calls the end of training makes: scoring every held-out event, and calibration's play."""
    from server.learn.calibrate import calibration_steps

    playable = [p for p in held_out if len(p) >= 2]
    return sum(len(p) - 1 for p in playable) + calibration_steps(playable)


def step_seconds(info) -> float:
    """Seconds per sampled-and-heard step of an untrained model of ``info.spec``, with the step that will score it."""
    from server.learn.evaluate import predictor_on, step_for
    from server.model.export import convert_to_tflite
    from server.model.mdn import RandomBlocks
    from server.model.network import build_model

    model = build_model(info.spec)
    tflite = convert_to_tflite(model, info.spec)
    predictor = predictor_on(step_for(tflite, info, model), tflite, info, "timing")
    draws = RandomBlocks(np.random.default_rng(0), info.spec.dims)
    for _ in range(WARM_STEPS):
        predictor.observe(*predictor.sample(draws, 1.0, 1.0))
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        predictor.observe(*predictor.sample(draws, 1.0, 1.0))
    return (time.perf_counter() - start) / TIMED_STEPS
