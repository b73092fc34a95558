"""Per-dimension normalisation of (dt, v1 .. vN) events, fitted on training data and stored with the model.

dt is heavy-tailed (fast strokes vs long pauses) so it goes through ``log(dt + offset)``
before standardising; the N values (x and y by default) are standardised directly.
Every transform is affine after an optional log, so the log-Jacobian is exact and evaluation can report
likelihoods in the original units (seconds and [0, 1] coordinates).

Fitting also records what the data is made of, per dimension, because an honest
likelihood depends on it:

- a *grid* (touch screens report x and y in steps of 1/128, MIDI pitch in steps of
  1/127): training adds uniform noise within each cell and evaluation integrates the
  density over the cell, so a model cannot score by spiking on grid points;
- a *constant* (notated MIDI has one velocity, so y never changes): the dimension is
  played back exactly, maps to z = 0 whatever arrives live, and is left out of the
  density.

A dimension may also be *relative* (chosen at training, e.g. MIDI pitch): the network
still hears its value but predicts the step from the previous event's, ``z_t - z_{t-1}``
in these same units, so a melodic step is a constant the mixture can hold exactly
wherever the line is. The shift cancels and the scale is shared, so cells and
likelihoods are unchanged; `server.model.mdn.shift_means` turns a prediction back into
values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from server.model.dims import check_values, value_names

DT_OFFSET = 0.001  # seconds in log(dt + offset): finite for simultaneous events; beat 0.01 by 0.17 nats/event (touch corpus)
GRID_CANDIDATES = (64, 100, 127, 128, 255, 256, 1000)  # steps per unit, coarsest first
GRID_TOLERANCE = 1e-3  # in steps: float32 storage of k/128 is exact, of k/127 within ~1e-5
MIN_SCALE = 1e-3


@dataclass(frozen=True)
class Normaliser:
    """``z = (f(v) - shift) / scale`` per dimension, with ``f = log(v + offset)`` where ``log`` is set.

    ``grid[d]`` is the cell width of a quantised dimension in original units (0: continuous);
    ``constant[d]`` the value of a constant dimension (None: it varies).
    """

    shift: tuple[float, ...]
    scale: tuple[float, ...]
    log: tuple[bool, ...]
    offset: tuple[float, ...]
    clip_min: tuple[float, ...]
    clip_max: tuple[float, ...]
    grid: tuple[float, ...] = ()  # () : continuous everywhere
    constant: tuple[float | None, ...] = ()  # () : nothing constant
    relative: tuple[bool, ...] = ()  # predicted as the step from the previous event's value; () : none

    def __post_init__(self) -> None:
        n = len(self.shift)
        if not self.grid:
            object.__setattr__(self, "grid", (0.0,) * n)
        if not self.constant:
            object.__setattr__(self, "constant", (None,) * n)
        if not self.relative:
            object.__setattr__(self, "relative", (False,) * n)

    @classmethod
    def fit(cls, events: np.ndarray, dt_max: float, detect: bool = True, dt_offset: float = DT_OFFSET) -> "Normaliser":
        """Fit on ``events [n, 1 + N]`` (dt, N values) in original units; ``detect`` finds grids and constants."""
        events = np.asarray(events, dtype=np.float64)
        if events.ndim != 2 or events.shape[1] < 2 or len(events) < 2:
            raise ValueError("need events of shape [n>=2, 1 + N]")
        width = 1 + check_values(events.shape[1] - 1, "each event")
        logs = (True,) + (False,) * (width - 1)
        offsets = (float(dt_offset),) + (0.0,) * (width - 1)
        f = _forward_raw(events, logs, offsets)
        shift = f.mean(axis=0)
        scale = np.maximum(f.std(axis=0), MIN_SCALE)
        grid = [0.0] * width
        constant: list[float | None] = [None] * width
        if detect:
            for d in range(1, width):  # the values; dt is continuous in performance data
                column = events[:, d]
                if np.all(column == column[0]):
                    constant[d] = float(column[0])
                    shift[d], scale[d] = column[0], 1.0
                else:
                    grid[d] = detect_grid(column)
        return cls(
            shift=tuple(float(v) for v in shift),
            scale=tuple(float(v) for v in scale),
            log=logs,
            offset=offsets,
            clip_min=(0.0,) * width,
            clip_max=(float(dt_max),) + (1.0,) * (width - 1),
            grid=tuple(grid),
            constant=tuple(constant),
        )

    @classmethod
    def fit_performances(cls, performances: Callable[[], Iterable[np.ndarray]], dt_max: float, detect: bool = True,
                         dt_offset: float = DT_OFFSET) -> "Normaliser":
        """`fit` on performances ``[n, 1 + N]`` read twice through ``performances()``, never all in memory.

        Sums are taken per performance and added exactly (``math.fsum``), so the result does not
        depend on how the performances are grouped: a corpus in shards and the same corpus in
        memory get the same normaliser, to the bit.
        """
        width = 0
        count = 0
        sums: list[np.ndarray] = []
        for p in performances():
            width = width or p.shape[1]
            count += len(p)
            sums.append(_forward_raw(np.asarray(p, np.float64), *_transform(width, dt_offset)).sum(axis=0))
        if count < 2:
            raise ValueError("need events of shape [n>=2, 1 + N]")
        width = 1 + check_values(width - 1, "each event")
        logs, offsets = _transform(width, dt_offset)
        shift = np.array([math.fsum(column) for column in zip(*sums)]) / count
        found = _Found(width)
        squares: list[np.ndarray] = []
        for p in performances():
            squares.append(((_forward_raw(np.asarray(p, np.float64), logs, offsets) - shift) ** 2).sum(axis=0))
            if detect:
                found.see(np.asarray(p, np.float64))
        scale = np.maximum(np.sqrt(np.array([math.fsum(column) for column in zip(*squares)]) / count), MIN_SCALE)
        grid, constant = found.result() if detect else ([0.0] * width, [None] * width)
        for d, c in enumerate(constant):
            if c is not None:
                shift[d], scale[d] = c, 1.0
        return cls(shift=tuple(float(v) for v in shift), scale=tuple(float(v) for v in scale), log=logs,
                   offset=offsets, clip_min=(0.0,) * width, clip_max=(float(dt_max),) + (1.0,) * (width - 1),
                   grid=tuple(grid), constant=tuple(constant))

    # ------------------------------------------------------------------ what the dimensions are

    @cached_property
    def active(self) -> tuple[int, ...]:
        """The dimensions the density covers: all but the constant ones."""
        return tuple(d for d, c in enumerate(self.constant) if c is None)

    @cached_property
    def relatives(self) -> tuple[int, ...]:
        """Active dimensions predicted as the step from the previous event's value."""
        return tuple(d for d in self.active if self.relative[d])

    @cached_property
    def gridded(self) -> tuple[int, ...]:
        """Active dimensions that sit on a grid."""
        return tuple(d for d in self.active if self.grid[d] > 0)

    def describe(self) -> str:
        """One line per dimension for people: what training and evaluation will do with it."""
        names = ("dt", *value_names(len(self.shift) - 1))
        parts = []
        for d, name in enumerate(names):
            if self.constant[d] is not None:
                parts.append(f"{name} constant {self.constant[d]:.4g} (played back exactly, not modelled)")
            elif self.grid[d] > 0:
                parts.append(f"{name} on a grid of 1/{round(1 / self.grid[d])} (dequantised)")
            else:
                parts.append(f"{name} continuous")
            if d in self.relatives:
                parts[-1] += ", predicted as the step from the previous event's"
        return "; ".join(parts)

    # ------------------------------------------------------------------ json

    def to_json(self) -> dict:
        return {
            "shift": list(self.shift),
            "scale": list(self.scale),
            "log": list(self.log),
            "offset": list(self.offset),
            "clip_min": list(self.clip_min),
            "clip_max": list(self.clip_max),
            "grid": list(self.grid),
            "constant": list(self.constant),
            "relative": list(self.relative),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Normaliser":
        fields = ("shift", "scale", "log", "offset", "clip_min", "clip_max")
        missing = [k for k in fields if k not in d]
        if missing:
            raise ValueError(f"normalisation lacks {', '.join(missing)}")
        n = len(d["shift"])
        values = {k: tuple(d[k]) for k in fields}
        grid = tuple(float(v) for v in d.get("grid", [0.0] * n))
        constant = tuple(None if v is None else float(v) for v in d.get("constant", [None] * n))
        relative = tuple(v is True for v in d.get("relative", [False] * n))
        if any(len(v) != n for v in (*values.values(), grid, constant, relative)):
            raise ValueError("normalisation fields differ in length")
        if any(not (s > 0 and math.isfinite(s)) for s in values["scale"]):
            raise ValueError("normalisation scales must be positive and finite")
        if any(not (0 <= g < 1 and math.isfinite(g)) for g in grid):
            raise ValueError("normalisation grid steps must be in [0, 1)")
        if any(c is not None and not math.isfinite(c) for c in constant):
            raise ValueError("normalisation constants must be finite")
        return cls(
            shift=tuple(float(v) for v in values["shift"]),
            scale=tuple(float(v) for v in values["scale"]),
            log=tuple(bool(v) for v in values["log"]),
            offset=tuple(float(v) for v in values["offset"]),
            clip_min=tuple(float(v) for v in values["clip_min"]),
            clip_max=tuple(float(v) for v in values["clip_max"]),
            grid=grid,
            constant=constant,
            relative=relative,
        )

    # ------------------------------------------------------------------ scalar path (the live loop)

    @cached_property
    def _rows(self) -> tuple[tuple[float, float, bool, float, float, float, float | None], ...]:
        """Per dimension (clip_min, clip_max, log, offset, shift, scale, constant) as plain floats."""
        return tuple(zip(self.clip_min, self.clip_max, self.log, self.offset, self.shift, self.scale, self.constant))

    def forward_event(self, event: Sequence[float]) -> list[float]:
        """One event, original units -> normalised: `forward` in scalar Python for the live loop (~1 us)."""
        out = []
        for v, (lo, hi, lg, off, sh, sc, const) in zip(event, self._rows):
            if const is not None:
                out.append(0.0)
                continue
            v = lo if v < lo else hi if v > hi else v
            out.append(((math.log(v + off) if lg else v) - sh) / sc)
        return out

    def inverse_event(self, z: Sequence[float]) -> list[float]:
        """One event, normalised -> original units: `inverse` in scalar Python, finite and clipped whatever z is."""
        out = []
        for v, (lo, hi, lg, off, sh, sc, const) in zip(z, self._rows):
            if const is not None:
                out.append(const)
                continue
            f = v * sc + sh
            if f != f:  # NaN: 0, as `inverse` does
                f = 0.0
            elif lg:
                f = math.exp(f if f < 50.0 else 50.0) - off
            out.append(lo if f < lo else hi if f > hi else f)
        return out

    # ------------------------------------------------------------------ arrays (training, evaluation)

    def _constant_mask(self) -> np.ndarray:
        return np.array([c is not None for c in self.constant])

    def forward(self, events: np.ndarray) -> np.ndarray:
        """Original units -> normalised (float32), clipping to the valid range first; constants map to 0."""
        v = np.clip(np.asarray(events, dtype=np.float64), self.clip_min, self.clip_max)
        f = _forward_raw(v, self.log, self.offset)
        z = (f - np.asarray(self.shift)) / np.asarray(self.scale)
        z[..., self._constant_mask()] = 0.0
        return z.astype(np.float32)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """Normalised -> original units, clipped to the valid range (dt >= 0, values in [0, 1])."""
        f = np.asarray(z, dtype=np.float64) * np.asarray(self.scale) + np.asarray(self.shift)
        out = np.empty_like(f)
        for i, (lg, off) in enumerate(zip(self.log, self.offset)):
            out[..., i] = np.exp(np.minimum(f[..., i], 50.0)) - off if lg else f[..., i]
        out = np.clip(np.nan_to_num(out, nan=0.0), self.clip_min, self.clip_max)
        for d, c in enumerate(self.constant):
            if c is not None:
                out[..., d] = c
        return out

    def log_jacobian(self, events: np.ndarray, dims: Sequence[int] | None = None) -> np.ndarray:
        """``log |dz/dv|`` summed over ``dims`` (default: the active ones), per event.

        Add it to a normalised log-density to get the density in original units.
        """
        dims = self.active if dims is None else tuple(dims)
        v = np.clip(np.asarray(events, dtype=np.float64), self.clip_min, self.clip_max)
        total = -float(np.sum(np.log([self.scale[d] for d in dims]))) * np.ones(v.shape[:-1])
        for d in dims:
            if self.log[d]:
                total = total - np.log(v[..., d] + self.offset[d])
        return total

    def cell_half_width_z(self) -> np.ndarray:
        """Half a grid cell in normalised units per dimension (0 where continuous): the dequantisation noise."""
        return np.array([self.grid[d] / 2 / self.scale[d] if d in self.gridded else 0.0 for d in range(len(self.grid))])


def detect_grid(values: np.ndarray) -> float:
    """The cell width of the coarsest candidate grid all `values` sit on (1/k), or 0 if none."""
    values = np.asarray(values, dtype=np.float64)
    if len(np.unique(values)) < 3:
        return 0.0
    for k in GRID_CANDIDATES:
        steps = values * k
        if np.max(np.abs(steps - np.round(steps))) < GRID_TOLERANCE:
            return 1.0 / k
    return 0.0


def _transform(width: int, dt_offset: float) -> tuple[tuple[bool, ...], tuple[float, ...]]:
    """Which dimensions go through log and with what offset: dt only."""
    return (True,) + (False,) * (width - 1), (float(dt_offset),) + (0.0,) * (width - 1)


class _Found:
    """Constants and grids of the values (not dt), seen a performance at a time: what `detect_grid` decides."""

    def __init__(self, width: int) -> None:
        self.first: np.ndarray | None = None
        self.varies = np.zeros(width, bool)
        self.distinct: list[set[float]] = [set() for _ in range(width)]  # up to 3 kept: enough to decide
        self.off_grid = np.zeros((width, len(GRID_CANDIDATES)))  # the most any value lies off each grid, in steps

    def see(self, p: np.ndarray) -> None:
        if len(p) == 0:
            return
        if self.first is None:
            self.first = p[0].copy()
        self.varies |= np.any(p != self.first, axis=0)
        for d in range(1, p.shape[1]):
            if len(self.distinct[d]) < 3:
                self.distinct[d].update(np.unique(p[:, d])[:3].tolist())
            for j, k in enumerate(GRID_CANDIDATES):
                steps = p[:, d] * k
                self.off_grid[d, j] = max(self.off_grid[d, j], float(np.max(np.abs(steps - np.round(steps)))))

    def result(self) -> tuple[list[float], list[float | None]]:
        width = len(self.varies)
        grid, constant = [0.0] * width, [None] * width
        for d in range(1, width):
            if not self.varies[d]:
                constant[d] = float(self.first[d])
            elif len(self.distinct[d]) >= 3:
                grid[d] = next((1.0 / k for j, k in enumerate(GRID_CANDIDATES) if self.off_grid[d, j] < GRID_TOLERANCE),
                               0.0)
        return grid, constant


def _forward_raw(v: np.ndarray, logs, offsets) -> np.ndarray:
    out = np.array(v, dtype=np.float64, copy=True)
    for i, (lg, off) in enumerate(zip(logs, offsets)):
        if lg:
            out[..., i] = np.log(out[..., i] + off)
    return out
