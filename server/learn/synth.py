"""Seeded synthetic gestures: curves, spirals, strokes and taps with pauses, for tests and the default model.

They stand in for a touch-screen performer: continuous gestures at a jittered
controller rate, sparse taps, and pauses between phrases for the long tail of dt.
"""

from __future__ import annotations

import numpy as np

from server.learn.data import DT_MAX, Dataset, DatasetError


GESTURE_FAMILIES = ("curve", "spiral", "stroke", "taps")


def synthetic_performance(rng: np.random.Generator, phrases: int = 12) -> np.ndarray:
    """One performance: phrases of varied gesture families separated by pauses.

    Continuous gestures are sampled at a jittered controller rate (~25-60 Hz); taps are
    sparse with longer gaps; pauses between phrases give the long dt tail of real playing.
    """
    events: list[np.ndarray] = []
    for i in range(phrases):
        family = GESTURE_FAMILIES[rng.integers(len(GESTURE_FAMILIES))]
        xy, dt = _PHRASES[family](rng)
        pause = rng.uniform(0.3, 2.5) if i > 0 else 0.0
        dt[0] = pause
        events.append(np.column_stack([dt, np.clip(xy, 0.0, 1.0)]))
    out = np.concatenate(events).astype(np.float32)
    out[:, 0] = np.clip(out[:, 0], 0.0, DT_MAX)
    return out


def _controller_dt(rng: np.random.Generator, n: int) -> np.ndarray:
    rate = rng.uniform(25, 60)
    return np.abs(rng.normal(1.0 / rate, 0.15 / rate, n))


def _curve(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(20, 70))
    t = np.linspace(0, 1, n)
    c = rng.uniform(0.25, 0.75, 2)
    a = rng.uniform(0.1, 0.3, 2)
    f = rng.integers(1, 4, 2)
    ph = rng.uniform(0, 2 * np.pi, 2)
    xy = c + a * np.sin(2 * np.pi * f[None, :] * t[:, None] * 0.5 + ph)
    return xy + rng.normal(0, 0.004, xy.shape), _controller_dt(rng, n)


def _spiral(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(30, 80))
    t = np.linspace(0, 1, n)
    c = rng.uniform(0.35, 0.65, 2)
    turns = rng.uniform(1.0, 3.0) * rng.choice([-1, 1])
    r = rng.uniform(0.15, 0.35) * (t if rng.random() < 0.5 else 1 - t) + 0.02
    ang = 2 * np.pi * turns * t + rng.uniform(0, 2 * np.pi)
    xy = c + np.column_stack([r * np.cos(ang), r * np.sin(ang)])
    return xy + rng.normal(0, 0.004, xy.shape), _controller_dt(rng, n)


def _stroke(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(10, 40))
    a, b = rng.uniform(0.05, 0.95, 2), rng.uniform(0.05, 0.95, 2)
    s = np.linspace(0, 1, n)
    ease = s * s * (3 - 2 * s)  # a hand accelerates then brakes
    xy = a + (b - a) * ease[:, None]
    return xy + rng.normal(0, 0.003, xy.shape), _controller_dt(rng, n)


def _taps(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(3, 12))
    centre = rng.uniform(0.15, 0.85, 2)
    xy = centre + rng.normal(0, 0.08, (n, 2))
    beat = rng.uniform(0.12, 0.45)
    dt = beat * rng.choice([1.0, 1.0, 0.5, 2.0], n) + rng.normal(0, 0.01, n)
    return xy, np.abs(dt)


_PHRASES = {"curve": _curve, "spiral": _spiral, "stroke": _stroke, "taps": _taps}


def synthetic_dataset(performances: int, seed: int, phrases: int = 12) -> Dataset:
    """A seeded synthetic corpus: the same seed gives the same bytes."""
    if performances < 1 or phrases < 1:
        raise DatasetError(f"synth needs at least one performance of at least one phrase, "
                           f"got {performances} performances of {phrases} phrases")
    if seed < 0:
        raise DatasetError(f"the seed must be >= 0, got {seed}")
    rng = np.random.default_rng(seed)
    return Dataset.from_performances(synthetic_performance(rng, phrases) for _ in range(performances))
