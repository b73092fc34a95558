"""Fine-tuning on a session: the playing model learns what the performer just played, or nothing changes.

The performer's events of a session are cut into phrases at pauses; the last phrases
(about a fifth of the events) are held out. The model is trained from its own weights
and normalisation on the rest, within a time budget, and kept only if it gives the
held-out phrases a higher likelihood than the model it started from. A kept model is
a new folder whose `model.json` records its lineage, so the performer can keep it,
load it next time, or throw it away; the parent is never touched.

Runs in its own process when started from the stage (`server.live.learning`); reports
progress through a callback (JSON lines on stdout there).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from server.learn.data import Dataset, DatasetError
from server.learn.train import TrainConfig, _info, _windows, build_for, fit_within, nats_offset
from server.live.learning import MIN_EVENTS  # the stage refuses /learn with fewer; this checks the log again
PHRASE_GAP = 1.0  # seconds of silence that end a phrase
HOLD_OUT = 0.2  # of the events, the last phrases, held out to judge the new model
FINE_TUNE_LEARNING_RATE = 3e-3
FINISH_RESERVE_S = 4.0  # of the budget, for judging and writing the new model (small data: seconds)


@dataclass(frozen=True)
class FineTuneResult:
    model: str  # the new model's name, or the parent's if nothing better was found
    nll_before: float  # held-out NLL per event under the parent (dequantised)
    nll_after: float  # the same under the fine-tuned model
    better: bool
    events_train: int
    events_held_out: int
    seconds: float
    epochs: int
    interrupted: bool = False


def phrases(events: np.ndarray, gap: float = PHRASE_GAP) -> list[np.ndarray]:
    """Cut one performer stream ``[n, 1 + N]`` at pauses longer than ``gap``; each phrase starts with dt 0."""
    events = np.asarray(events, np.float32)
    cuts = [0] + [i for i in range(1, len(events)) if events[i, 0] > gap] + [len(events)]
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        phrase = events[a:b].copy()
        phrase[0, 0] = 0.0
        out.append(phrase)
    return out


def hold_out_last(perfs: list[np.ndarray], fraction: float = HOLD_OUT) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The last whole phrases with at least ``fraction`` of the events, and the rest; a long phrase is split."""
    total = sum(len(p) for p in perfs)
    want = max(2, int(math.ceil(total * fraction)))
    held: list[np.ndarray] = []
    rest = list(perfs)
    while rest and sum(len(p) for p in held) < want:
        held.insert(0, rest.pop())
    if not rest:  # one long phrase (or very few): split the last one at the held-out share
        phrase = held.pop(0)
        cut = max(2, len(phrase) - (want - sum(len(p) for p in held)))
        rest, tail = [phrase[:cut]], phrase[cut:].copy()
        tail[0, 0] = 0.0
        held.insert(0, tail)
    return rest, held


def fine_tune(
    parent_folder: Path,
    performances: list[np.ndarray],
    seconds: float,
    models_dir: Path,
    name: str,
    progress: Callable[[float, float], None] = lambda fraction, nll: None,
    lineage: dict[str, Any] | None = None,
    seed: int = 0,
    stop: threading.Event | None = None,
) -> FineTuneResult:
    """Fine-tune ``parent_folder`` on ``performances`` (performer streams) for at most ``seconds``.

    ``stop``, once set (by `/learn/stop`'s SIGINT through `learn`'s handler), ends training at
    the next batch; the best epoch so far is still judged and kept if better. A flag, not
    Ctrl-C's KeyboardInterrupt: an exception raised at any bytecode can land inside Keras' or
    Python's import machinery and leave a half-made object behind (an AttributeError seen once
    under load, never reproduced), where a flag is only read between batches.
    """
    from server.learn.evaluate import score, step_for
    from server.model.export import convert_to_tflite, export, library_versions, now_iso

    started = time.monotonic()
    parts = [p for perf in performances for p in phrases(perf) if len(p) >= 2]
    events = sum(len(p) for p in parts)
    if events < MIN_EVENTS:
        raise DatasetError(f"too few performer events to learn from: {events}; play at least {MIN_EVENTS}")
    train_perfs, held = hold_out_last(parts)
    train_ds, held_ds = Dataset.from_performances(train_perfs), Dataset.from_performances(held)
    cfg = TrainConfig(init_from=Path(parent_folder), learning_rate=FINE_TUNE_LEARNING_RATE, seed=seed,
                      sequence_length=24, stride=1, batch_size=16, patience=40, report=False, minutes=seconds / 60)
    model, spec, norm, parent = build_for(cfg, train_ds)
    before = score(step_for(parent.file("step.tflite"), parent.info, model), parent.info, held_ds).dequantised
    progress(0.0, before)  # the first figure a performer sees: the parent's, on the held-out phrases
    train_w, held_w = _windows(train_ds, held_ds, norm, cfg)
    jacobian = nats_offset(norm, held)
    budget = max(1.0, seconds - FINISH_RESERVE_S - 0.05 * seconds - (time.monotonic() - started))
    reporter = _Reporter(progress, budget, jacobian)
    asked = stop or threading.Event()
    best, interrupted = None, True
    if not asked.is_set():  # a stop asked while the parent was scored: nothing to train
        best, interrupted = fit_within(model, train_w, held_w, norm, budget, cfg, [reporter, StopWhenAsked(asked)])
    interrupted = interrupted or asked.is_set()
    if best is None or best.weights is None:
        return FineTuneResult(Path(parent_folder).name, before, math.inf, False, train_w.events, held_w.events,
                              time.monotonic() - started, 0, interrupted)
    model.set_weights(best.weights)
    tflite = convert_to_tflite(model, spec)
    history = best.history
    info = _info(spec, norm, cfg, train_ds, None, history, [])
    after = score(step_for(tflite, info, model), info, held_ds)
    better = after.dequantised < before
    epochs = len(history["loss"])
    if not better:
        return FineTuneResult(Path(parent_folder).name, before, after.dequantised, False, train_w.events,
                              held_w.events, time.monotonic() - started, epochs, interrupted)
    record = {"parent": Path(parent_folder).name, "parent_files": parent.info.files, **(lineage or {}),
              "events_train": train_w.events, "events_held_out": held_w.events,
              "held_out_nll_before": before, "held_out_nll_after": after.dequantised}
    info = _info(spec, norm, cfg, train_ds, after, history, [], versions=library_versions(), created=now_iso(),
                 seconds=time.monotonic() - started, lineage=record,
                 sampling=parent.info.sampling)  # a session is too short to calibrate on: the parent's temperature
    export(model, info, Path(models_dir) / name, check_events=norm.forward(held_ds.events), tflite=tflite)
    return FineTuneResult(name, before, after.dequantised, True, train_w.events, held_w.events,
                          time.monotonic() - started, epochs, interrupted)


class StopWhenAsked:
    """Ends training at the next batch once ``asked`` is set (Keras still scores that epoch)."""

    def __init__(self, asked: threading.Event) -> None:
        self.asked = asked

    def on_train_batch_end(self, batch: int, logs: dict, model: Any) -> None:
        if self.asked.is_set():
            model.stop_training = True


class _Reporter:
    """After each epoch: the fraction of the budget spent and the held-out NLL per event in original units.

    The validation loss is a normalised NLL (with dequantisation noise); adding the mean
    log-Jacobian of the held-out events turns it into nats per event in seconds and [0, 1].
    """

    def __init__(self, progress: Callable[[float, float], None], budget: float, jacobian: float) -> None:
        self.progress, self.budget, self.jacobian = progress, budget, jacobian
        self.start = time.monotonic()

    def on_train_begin(self, logs: dict, model: Any) -> None:
        self.start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict, model: Any) -> None:
        fraction = min(1.0, (time.monotonic() - self.start) / self.budget)
        self.progress(fraction, float(logs.get("val_loss", math.nan)) - self.jacobian)
