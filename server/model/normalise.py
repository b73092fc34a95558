"""Per-dimension normalisation of (dt, x, y) events, fitted on training data and stored with the model.

dt is heavy-tailed (fast strokes vs long pauses) so it goes through ``log(dt + offset)``
before standardising; x and y are standardised directly. Every transform is affine
after an optional log, so the log-Jacobian is exact and evaluation can report
likelihoods in the original units (seconds and [0, 1] coordinates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

DT_OFFSET = 0.01  # seconds; keeps log(dt) finite for simultaneous events


@dataclass(frozen=True)
class Normaliser:
    """``z = (f(v) - shift) / scale`` per dimension, with ``f = log(v + offset)`` where ``log`` is set."""

    shift: tuple[float, ...]
    scale: tuple[float, ...]
    log: tuple[bool, ...]
    offset: tuple[float, ...]
    clip_min: tuple[float, ...]
    clip_max: tuple[float, ...]

    @classmethod
    def fit(cls, events: np.ndarray, dt_max: float) -> "Normaliser":
        """Fit on ``events [N, 3]`` (dt, x, y) in original units."""
        events = np.asarray(events, dtype=np.float64)
        if events.ndim != 2 or events.shape[1] != 3 or len(events) < 2:
            raise ValueError("need events of shape [N>=2, 3]")
        logs = (True, False, False)
        offsets = (DT_OFFSET, 0.0, 0.0)
        f = _forward_raw(events, logs, offsets)
        shift = f.mean(axis=0)
        scale = np.maximum(f.std(axis=0), 1e-3)
        return cls(
            shift=tuple(float(v) for v in shift),
            scale=tuple(float(v) for v in scale),
            log=logs,
            offset=offsets,
            clip_min=(0.0, 0.0, 0.0),
            clip_max=(float(dt_max), 1.0, 1.0),
        )

    def to_json(self) -> dict:
        return {
            "shift": list(self.shift),
            "scale": list(self.scale),
            "log": list(self.log),
            "offset": list(self.offset),
            "clip_min": list(self.clip_min),
            "clip_max": list(self.clip_max),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Normaliser":
        fields = ("shift", "scale", "log", "offset", "clip_min", "clip_max")
        missing = [k for k in fields if k not in d]
        if missing:
            raise ValueError(f"normalisation lacks {', '.join(missing)}")
        n = len(d["shift"])
        values = {k: tuple(d[k]) for k in fields}
        if any(len(v) != n for v in values.values()):
            raise ValueError("normalisation fields differ in length")
        if any(not (s > 0 and math.isfinite(s)) for s in values["scale"]):
            raise ValueError("normalisation scales must be positive and finite")
        return cls(
            shift=tuple(float(v) for v in values["shift"]),
            scale=tuple(float(v) for v in values["scale"]),
            log=tuple(bool(v) for v in values["log"]),
            offset=tuple(float(v) for v in values["offset"]),
            clip_min=tuple(float(v) for v in values["clip_min"]),
            clip_max=tuple(float(v) for v in values["clip_max"]),
        )

    @cached_property
    def _rows(self) -> tuple[tuple[float, float, bool, float, float, float], ...]:
        """Per dimension (clip_min, clip_max, log, offset, shift, scale) as plain floats for the scalar path."""
        return tuple(zip(self.clip_min, self.clip_max, self.log, self.offset, self.shift, self.scale))

    def forward_event(self, event: Sequence[float]) -> list[float]:
        """One event, original units -> normalised: `forward` in scalar Python for the live loop (~1 us)."""
        out = []
        for v, (lo, hi, lg, off, sh, sc) in zip(event, self._rows):
            v = lo if v < lo else hi if v > hi else v
            out.append(((math.log(v + off) if lg else v) - sh) / sc)
        return out

    def inverse_event(self, z: Sequence[float]) -> list[float]:
        """One event, normalised -> original units: `inverse` in scalar Python, finite and clipped whatever z is."""
        out = []
        for v, (lo, hi, lg, off, sh, sc) in zip(z, self._rows):
            f = v * sc + sh
            if f != f:  # NaN: 0, as `inverse` does
                f = 0.0
            elif lg:
                f = math.exp(f if f < 50.0 else 50.0) - off
            out.append(lo if f < lo else hi if f > hi else f)
        return out

    def forward(self, events: np.ndarray) -> np.ndarray:
        """Original units -> normalised (float32), clipping to the valid range first."""
        v = np.clip(np.asarray(events, dtype=np.float64), self.clip_min, self.clip_max)
        f = _forward_raw(v, self.log, self.offset)
        return ((f - np.asarray(self.shift)) / np.asarray(self.scale)).astype(np.float32)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """Normalised -> original units, clipped to the valid range (dt >= 0, x and y in [0, 1])."""
        f = np.asarray(z, dtype=np.float64) * np.asarray(self.scale) + np.asarray(self.shift)
        out = np.empty_like(f)
        for i, (lg, off) in enumerate(zip(self.log, self.offset)):
            out[..., i] = np.exp(np.minimum(f[..., i], 50.0)) - off if lg else f[..., i]
        return np.clip(np.nan_to_num(out, nan=0.0), self.clip_min, self.clip_max)

    def log_jacobian(self, events: np.ndarray) -> np.ndarray:
        """``log |dz/dv|`` summed over dimensions, per event: add it to a normalised log-density."""
        v = np.clip(np.asarray(events, dtype=np.float64), self.clip_min, self.clip_max)
        total = -np.sum(np.log(self.scale)) * np.ones(v.shape[:-1])
        for i, (lg, off) in enumerate(zip(self.log, self.offset)):
            if lg:
                total = total - np.log(v[..., i] + off)
        return total


def _forward_raw(v: np.ndarray, logs, offsets) -> np.ndarray:
    out = np.array(v, dtype=np.float64, copy=True)
    for i, (lg, off) in enumerate(zip(logs, offsets)):
        if lg:
            out[..., i] = np.log(out[..., i] + off)
    return out
