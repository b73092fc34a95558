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
from server.learn.shards import ShardedDataset
from server.learn.streaming import ShardedPart
from server.model.likelihood import event_log_likelihoods
from server.model.mdn import shift_means
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


def score(step: StepFunction, info: ModelInfo, ds: Dataset | ShardedPart) -> Scores:
    """Mean NLL per predicted event (nats; dt in seconds, x and y in [0, 1]), raw and dequantised.

    Runs the one-step function event by event from a zero state, exactly as the live
    loop does: with LiteRT about 10 us an event, where the Keras sequence model takes
    minutes over a performance of 20,000 events. A performance at a time: a sharded corpus
    is never in memory whole.
    """
    spec, norm = info.spec, info.normaliser
    raw_total = deq_total = 0.0
    count = performances = 0
    relative = relative_mask(norm)
    for p in ds.performances:
        if len(p) < 2:
            continue
        p = np.clip(p.astype(np.float64), norm.clip_min, norm.clip_max)
        performances += 1
        n = len(p) - 1
        z = norm.forward(p[:-1])
        state = np.zeros((1, spec.state_size), np.float32)
        params = np.empty((n, spec.param_size), np.float32)
        for t in range(n):
            params[t], state = step(z[t : t + 1], state)
        if relative.any():  # predicted steps from each event heard -> values
            params = shift_means(params, spec.mixtures, spec.dims, z * relative)
        raw, deq = event_log_likelihoods(params, p[1:], info)
        raw_total -= float(raw.sum())
        deq_total -= float(deq.sum())
        count += n
    if not count:
        raise ValueError("no performance has two or more events")
    return Scores(raw_total / count, deq_total / count, count, performances)


def relative_mask(norm) -> np.ndarray:
    """1.0 for each dimension predicted as a step from the previous event's value, else 0.0."""
    return np.array([1.0 if d in norm.relatives else 0.0 for d in range(len(norm.shift))], np.float32)


def step_for(tflite: bytes, info: ModelInfo, keras_model=None) -> StepFunction:
    """The fastest step for scoring: LiteRT on the `.tflite` bytes, else the compiled TensorFlow step."""
    if litert_available():
        return LiteRTStep(tflite, info.spec)
    from server.model.network import TensorFlowStep

    return TensorFlowStep(keras_model, info.spec)


def predictor_on(step: StepFunction, tflite: bytes, info: ModelInfo, label: str):
    """A `Predictor` over ``step`` for a model not yet written to a folder (training's calibration and timing)."""
    from server.model.files import ModelFiles
    from server.model.predictor import Predictor

    return Predictor(ModelFiles(label, info, {"step.tflite": tflite}), step=(step, label))


# --------------------------------------------------------------------------- what the model plays


ZERO_LINES, ZERO_LENGTH = 20, 100  # lines played from a zero state, events each (2,000 events)
OPENING, CONTINUATION, MAX_OPENINGS = 8, 32, 64  # a held-out opening heard, then continued (up to 2,048 events)


def play_steps(data: list[np.ndarray]) -> int:
    """The one-step calls `play` makes over ``data`` (what the training budget keeps time for), a reset's
    priming step (`Predictor.reset`) among them."""
    openings = min(MAX_OPENINGS, sum(1 for p in data if len(p) > OPENING))
    resets = ZERO_LINES + openings + 1
    return ZERO_LINES * ZERO_LENGTH + openings * (OPENING + CONTINUATION) + resets


@dataclass(frozen=True)
class Played:
    """What a model played: lines from a zero state, and continuations of held-out openings (events ``[n, 3]``)."""

    zero: list[np.ndarray]
    openings: list[np.ndarray]


def play(predictor, data: list[np.ndarray], seed: int = 0, temperature: float = 1.0,
         sigma_temperature: float = 1.0) -> Played:
    """Let the model play a fixed, seeded amount, the way `generate` plays live (sample, then hear it).

    ``ZERO_LINES`` lines of ``ZERO_LENGTH`` events from a zero state (as after `/reset`),
    and for each of the first ``MAX_OPENINGS`` performances of ``data`` long enough, its
    first ``OPENING`` events heard, then ``CONTINUATION`` events played on from them.
    """
    from server.model.mdn import RandomBlocks

    draws = RandomBlocks(np.random.default_rng(seed), predictor.info.spec.dims)

    def go_on(n: int) -> np.ndarray:
        out = np.empty((n, predictor.info.spec.dims))
        for i in range(n):
            out[i] = predictor.sample(draws, temperature, sigma_temperature)
            predictor.observe(*out[i])
        return out

    zero = []
    for _ in range(ZERO_LINES):
        predictor.reset()
        zero.append(go_on(ZERO_LENGTH))
    openings = []
    for p in [p for p in data if len(p) > OPENING][:MAX_OPENINGS]:
        predictor.reset()
        predictor.observe(*p[0])  # a performance's first event meets a zero state, as in training
        for event in p[1:OPENING]:
            predictor.observe(*event)
        openings.append(go_on(CONTINUATION))
    predictor.reset()
    return Played(zero, openings)


def held_out(ds: Dataset | ShardedDataset, info: ModelInfo) -> tuple[list[np.ndarray], str]:
    """The performances the model never saw when ``ds`` is its training data (model.json names them), else all of ``ds``.

    From shards only those are read (all of them when ``ds`` is other data).
    """
    held = info.training.get("validation_performances") or []
    if isinstance(ds, ShardedDataset):
        count, wanted = ds.performance_count, set(held)
        if info.dataset_sha256 == ds.sha256() and held and max(held) < count:
            return list(ds.performances(lambda i: i in wanted)), f"the {len(held)} performances held out in training"
        return list(ds.performances()), f"all {count} performances (not the model's training data, so nothing is held out)"
    perfs = ds.performances
    if info.dataset_sha256 == ds.sha256() and held and max(held) < len(perfs):
        return [perfs[i] for i in held], f"the {len(held)} performances held out in training"
    return perfs, f"all {len(perfs)} performances (not the model's training data, so nothing is held out)"


@dataclass(frozen=True)
class MusicReport:
    """A model's playing beside held-out data: statistics for each and distances to the data."""

    notes: bool  # note data (x = pitch/127) or gestures
    data: object  # music.NoteStats or music.GestureStats
    zero: object
    openings: object | None  # None when no performance is long enough to give an opening
    distances: dict[str, dict[str, float]]  # "zero" / "openings" -> statistic -> distance


def music_report(predictor, data: list[np.ndarray], seed: int = 0, temperature: float = 1.0,
                 sigma_temperature: float = 1.0) -> MusicReport:
    """Play (`play`) and compare with ``data`` on the statistics of `server.learn.music`."""
    from server.learn import music

    notes = music.is_notes(predictor.info.normaliser.grid)
    stats, distance = (music.note_stats, music.note_distances) if notes else (music.gesture_stats,
                                                                                music.gesture_distances)
    played = play(predictor, data, seed, temperature, sigma_temperature)
    reference = stats(data)
    zero = stats(played.zero)
    openings = stats(played.openings) if played.openings else None
    distances = {"zero": distance(zero, reference)}
    if openings is not None:
        distances["openings"] = distance(openings, reference)
    return MusicReport(notes, reference, zero, openings, distances)


def music_lines(report: MusicReport) -> list[str]:
    """The report as a table for a terminal: data, zero state, openings."""
    columns = [("data", report.data, None), ("zero state", report.zero, report.distances["zero"])]
    if report.openings is not None:
        columns.append(("openings", report.openings, report.distances["openings"]))
    if report.notes:
        rows = [
            ("steps <= 2 semitones", lambda s, d: f"{100 * s.step_share:.1f} %"),
            ("leaps > 7 semitones", lambda s, d: f"{100 * s.leap_share:.1f} %"),
            ("pitches on a key", lambda s, d: f"{100 * s.on_grid:.1f} %"),
            ("pitch span (5-95 %)", lambda s, d: f"{s.span[0]:.0f}-{s.span[1]:.0f}"),
            ("median IOI (s)", lambda s, d: f"{s.median_ioi:.3f}"),
            ("steps/skips/leaps: TV", lambda s, d: "" if d is None else f"{d['classes_tv']:.3f}"),
            ("intervals: TV", lambda s, d: "" if d is None else f"{d['intervals_tv']:.3f}"),
            ("pitches: EMD (semitones)", lambda s, d: "" if d is None else f"{d['pitch_emd_semitones']:.2f}"),
            ("pitch classes: TV", lambda s, d: "" if d is None else f"{d['pitch_class_tv']:.3f}"),
            ("IOIs: TV", lambda s, d: "" if d is None else f"{d['ioi_tv']:.3f}"),
        ]
    else:
        rows = [
            ("median move", lambda s, d: f"{s.median_move:.4f}"),
            ("median dt (s)", lambda s, d: f"{s.median_dt:.3f}"),
            ("moves: TV", lambda s, d: "" if d is None else f"{d['move_tv']:.3f}"),
            ("dt: TV", lambda s, d: "" if d is None else f"{d['dt_tv']:.3f}"),
        ]
    width = max(len(r[0]) for r in rows) + 2
    lines = ["".ljust(width) + "".join(f"{name:>14}" for name, _, _ in columns),
             "events".ljust(width) + "".join(f"{s.events:>14,}" for _, s, _ in columns)]
    for label, cell in rows:
        lines.append(label.ljust(width) + "".join(f"{cell(s, d):>14}" for _, s, d in columns))
    return lines
