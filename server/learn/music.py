"""What a musician hears in a set of lines, as numbers: intervals, register, pitch classes, rhythm; and how far apart two sets are.

NLL per event says how well a model predicts its data, not whether what it plays moves
like it. These statistics do, for note data (x = pitch/127): the interval histogram
(steps of at most 2 semitones, leaps over 7), the pitches (register and range), the pitch
classes and the inter-onset intervals; for gestures: the size of each move and the dt
histogram. Each comparison is a distance between histograms a musician can read: total
variation (the share of events that would have to change bin: 0 same, 1 disjoint) or, where
bins are ordered in semitones, the earth mover's distance (how many semitones the
distribution must move). Pure numpy, no model: `server.learn.evaluate` generates, this
module measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STEP_MAX = 2  # semitones: an interval of at most this is a step (a repeated note included)
LEAP_OVER = 7  # semitones: an interval over this (beyond a fifth) is a leap
INTERVAL_SPAN = 12  # the interval histogram: -12..12 semitones, wider intervals in the two end bins
PITCHES = 128  # MIDI notes
IOI_BINS = np.concatenate([[0.0], np.logspace(-3, np.log10(5.0), 25)])  # seconds: 0, then 1 ms .. 5 s, log-spaced
MOVE_BINS = np.concatenate([[0.0], np.logspace(-3, np.log10(1.5), 25)])  # a gesture's move, in pad units (diagonal 1.41)
NOTE_GRID = 1.0 / 127  # x = pitch/127: the grid that says a dimension holds MIDI notes


INTERVALS = ("no", "yes")  # `train --intervals`: whether x is predicted as the step from the previous event's


def relative_dims(grid: Sequence[float], constant: Sequence[float | None], choice: str = "no") -> tuple[bool, ...]:
    """Which dimensions to predict as the step from the previous event's value (`train --intervals`).

    ``yes``: x (a melodic interval, for notes), unless x is constant; ``no``: none, the
    default, since on the Bach chorales it measured worse at the same training budget
    (docs/models.md, "A better model of notes").
    """
    if choice not in INTERVALS:
        raise ValueError(f"intervals must be one of {', '.join(INTERVALS)}, got {choice!r}")
    return tuple(d == 1 and choice == "yes" and constant[1] is None for d in range(len(grid)))


MIXTURES, STEP_MIXTURES = 10, 30  # components unless `train --mixtures` says: gestures; pitch as steps


def mixtures_for(norm) -> int:
    """Mixture components for a model of this data: more where a dimension is predicted as steps.

    The components are diagonal over (dt, x, ...) together, so a step histogram with ten
    modes (unison, seconds, thirds, fourths, fifths, octaves, each way) times the rhythm's
    three or four durations needs far more than 10 (measured on the chorales: docs/models.md,
    "A better model of notes").
    """
    return STEP_MIXTURES if any(norm.relative) else MIXTURES


def is_notes(grid: Sequence[float]) -> bool:
    """Whether data whose per-dimension grid is ``grid`` (dt first) holds notes: x on MIDI's 1/127 grid."""
    return len(grid) > 1 and abs(grid[1] - NOTE_GRID) < 1e-9


def pitches(performance: np.ndarray) -> np.ndarray:
    """MIDI note numbers of a performance's events (x * 127, rounded; clipped to 0..127)."""
    return np.clip(np.rint(np.asarray(performance, np.float64)[:, 1] * 127), 0, PITCHES - 1).astype(np.int64)


def on_grid_share(performances: Sequence[np.ndarray]) -> float:
    """Share of events whose pitch x * 127 is a whole number (to float32 precision)."""
    x = np.concatenate([np.asarray(p, np.float64)[:, 1] for p in performances]) * 127
    return float(np.mean(np.abs(x - np.rint(x)) < 1e-4)) if len(x) else float("nan")


def histogram(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Fractions of ``values`` in ``bins`` (edges), the outermost bins taking whatever lies beyond."""
    values = np.clip(np.asarray(values, np.float64), bins[0], bins[-1])
    counts, _ = np.histogram(values, bins)
    return counts / max(1, counts.sum())


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Half the L1 distance between two histograms over the same bins: 0 same, 1 disjoint."""
    return 0.5 * float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


def earth_movers(p: np.ndarray, q: np.ndarray, width: float = 1.0) -> float:
    """Earth mover's distance between histograms over the same ordered bins ``width`` apart (1-D: the L1 of the CDFs)."""
    return float(np.abs(np.cumsum(p) - np.cumsum(q)).sum() * width)


@dataclass(frozen=True)
class NoteStats:
    """What a set of note lines sounds like; every histogram sums to 1."""

    intervals: np.ndarray  # [25]: -12..12 semitones (the ends take wider intervals)
    pitches: np.ndarray  # [128]: MIDI notes
    pitch_classes: np.ndarray  # [12]: C, C#, .. B
    iois: np.ndarray  # [len(IOI_BINS) - 1]: inter-onset intervals (dt)
    step_share: float  # intervals of at most STEP_MAX semitones
    leap_share: float  # intervals over LEAP_OVER semitones
    span: tuple[float, float]  # 5th and 95th percentile pitch
    median_ioi: float  # seconds
    events: int
    on_grid: float  # share of pitches exactly on a key


def note_stats(performances: Sequence[np.ndarray]) -> NoteStats:
    """The statistics of note lines ``[n, 1 + dims]`` (dt, x = pitch/127, ...); intervals within each line only."""
    perfs = [np.asarray(p, np.float64) for p in performances if len(p)]
    if not perfs:
        raise ValueError("no events")
    notes = [pitches(p) for p in perfs]
    steps = np.concatenate([np.diff(n) for n in notes])
    every = np.concatenate(notes)
    dts = np.concatenate([p[1:, 0] for p in perfs])  # a line's first dt is no interval between onsets
    edges = np.arange(-INTERVAL_SPAN - 0.5, INTERVAL_SPAN + 1.0)
    return NoteStats(
        intervals=histogram(steps, edges),
        pitches=np.bincount(every, minlength=PITCHES) / len(every),
        pitch_classes=np.bincount(every % 12, minlength=12) / len(every),
        iois=histogram(dts, IOI_BINS),
        step_share=float(np.mean(np.abs(steps) <= STEP_MAX)) if len(steps) else float("nan"),
        leap_share=float(np.mean(np.abs(steps) > LEAP_OVER)) if len(steps) else float("nan"),
        span=(float(np.percentile(every, 5)), float(np.percentile(every, 95))),
        median_ioi=float(np.median(dts)) if len(dts) else float("nan"),
        events=len(every),
        on_grid=on_grid_share(perfs),
    )


def interval_classes(stats: NoteStats) -> np.ndarray:
    """The shares of steps, skips (3 to 7 semitones) and leaps: the shape of a line, in three bins."""
    return np.array([stats.step_share, 1.0 - stats.step_share - stats.leap_share, stats.leap_share])


def note_distances(model: NoteStats, data: NoteStats) -> dict[str, float]:
    """How far a model's lines are from the data's, one figure per statistic (0: the same)."""
    return {
        "classes_tv": total_variation(interval_classes(model), interval_classes(data)),
        "intervals_tv": total_variation(model.intervals, data.intervals),
        "pitch_emd_semitones": earth_movers(model.pitches, data.pitches),
        "pitch_class_tv": total_variation(model.pitch_classes, data.pitch_classes),
        "ioi_tv": total_variation(model.iois, data.iois),
    }


@dataclass(frozen=True)
class GestureStats:
    """What a set of gestures moves like: the size of each move and the time between events."""

    moves: np.ndarray  # [len(MOVE_BINS) - 1]: Euclidean distance between consecutive positions
    dts: np.ndarray  # [len(IOI_BINS) - 1]
    median_move: float
    median_dt: float
    events: int


def gesture_stats(performances: Sequence[np.ndarray]) -> GestureStats:
    """The statistics of gestures ``[n, 1 + dims]`` (dt, positions ...); moves within each performance only."""
    perfs = [np.asarray(p, np.float64) for p in performances if len(p)]
    if not perfs:
        raise ValueError("no events")
    moves = np.concatenate([np.linalg.norm(np.diff(p[:, 1:], axis=0), axis=1) for p in perfs])
    dts = np.concatenate([p[1:, 0] for p in perfs])
    return GestureStats(
        moves=histogram(moves, MOVE_BINS),
        dts=histogram(dts, IOI_BINS),
        median_move=float(np.median(moves)) if len(moves) else float("nan"),
        median_dt=float(np.median(dts)) if len(dts) else float("nan"),
        events=sum(len(p) for p in perfs),
    )


def gesture_distances(model: GestureStats, data: GestureStats) -> dict[str, float]:
    return {"move_tv": total_variation(model.moves, data.moves), "dt_tv": total_variation(model.dts, data.dts)}


def shape_distance(distances: dict[str, float]) -> float:
    """One figure for how unlike its data a model moves (0: the same), what `server.learn.calibrate` minimises.

    Notes: the steps/skips/leaps TV plus the inter-onset intervals' TV; the 25-bin interval
    TV is left out because which second or third a line takes depends on a sense of key no
    temperature gives (on the chorales it was lowest at temperature 1, with a quarter of the
    steps missing). Gestures: the moves' TV plus the dt TV.
    """
    if "classes_tv" in distances:
        return distances["classes_tv"] + distances["ioi_tv"]
    return distances["move_tv"] + distances["dt_tv"]
