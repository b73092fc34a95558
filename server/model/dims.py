"""What an event is: dt then N values, N from 1 to 16; the one place that says so.

A model's `dims` counts dt too (DESIGN.md): N = dims - 1. Datasets, model.json, the
normaliser, logs and the sampler all take their width from here, so a controller with
eight faders is as much a performance as a touch screen's (x, y).
"""

from __future__ import annotations

DEFAULT_VALUES = 2  # (x, y): a touch position, or (pitch, velocity)
MIN_VALUES, MAX_VALUES = 1, 16
DIMS = 1 + DEFAULT_VALUES  # (dt, x, y)


def check_values(n: int, what: str = "an event") -> int:
    """``n`` if it is a supported number of values per event, else ValueError naming the range."""
    if not isinstance(n, int) or isinstance(n, bool) or not MIN_VALUES <= n <= MAX_VALUES:
        raise ValueError(f"{what} has {n} values after dt; supported: {MIN_VALUES} to {MAX_VALUES}")
    return n


def value_names(n: int) -> tuple[str, ...]:
    """Column names of ``n`` values: ``x`` or ``x, y`` up to two (today's logs read unchanged), else ``v1 .. vN``."""
    check_values(n)
    return ("x", "y")[:n] if n <= 2 else tuple(f"v{i}" for i in range(1, n + 1))
