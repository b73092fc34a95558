"""When training ends and how fast it learns on the way: the time budget, early stopping and the learning rate.

A budget in minutes, not epochs, is what a musician gives, so the rate follows the budget:
it holds until `ANNEAL_FROM` of the budget is spent, then falls along a half cosine to
`ANNEAL_FLOOR` of itself at the end, so the model that is exported has settled instead of
being wherever the last large step threw it. Independently, it halves when the held-out
figure has not improved for a while (a plateau), and training goes back to the best
weights so far: a plateau at a high rate is often a large step that threw the model off,
and halving the rate where it landed kept it there (two workers on the chorales, size s:
stuck at -4.86 nats/event with the rate run down, after a best of -5.15). On a cluster
both are decided from values every worker shares (the chief's clock through `SharedStop`,
the held-out figure computed alike everywhere), at the same batch, so every worker applies
the same rate to the same all-reduced gradients and goes back to the same weights.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

ANNEAL_FROM = 0.5  # of the budget spent before the rate starts to fall
ANNEAL_FLOOR = 0.05  # of the rate, reached as the budget runs out
PLATEAU_FACTOR = 0.5  # the rate is multiplied by this after `patience` epochs without a better held-out figure
MIN_RATE = 1e-5  # a plateau never takes the rate below this
MIN_GAIN = 1e-4  # a held-out figure better by less than this (normalised nats/event) is not better
EVERY_BATCHES = 16  # the rate is set again every this many batches (and at every epoch's end)


def annealing(fraction: float) -> float:
    """The rate's multiplier when ``fraction`` of the budget is spent: 1 until ANNEAL_FROM, ANNEAL_FLOOR at 1."""
    if fraction <= ANNEAL_FROM:
        return 1.0
    progress = min(1.0, (fraction - ANNEAL_FROM) / (1.0 - ANNEAL_FROM))
    return ANNEAL_FLOOR + (1.0 - ANNEAL_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TimeBudget:
    """Stops training when the next epoch would not fit in the budget (or mid-epoch, once it is spent)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def fraction(self) -> float:
        """How much of the budget is spent (0 at the start, 1 when it is)."""
        return (time.monotonic() - self.start) / max(self.seconds, 1e-9)

    def on_train_begin(self, logs: dict, model: Any) -> None:
        self.start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict, model: Any) -> None:
        elapsed = time.monotonic() - self.start
        if elapsed + elapsed / (epoch + 1) > self.seconds:
            model.stop_training = True

    def on_train_batch_end(self, batch: int, logs: dict, model: Any) -> None:
        if time.monotonic() - self.start > self.seconds:
            model.stop_training = True


class RateSchedule:
    """Callback hooks that set the optimiser's rate: ``base``, halved on plateaus, times `annealing(clock())`.

    ``clock`` gives the fraction of the budget spent; on a cluster it must be a value every
    worker shares (`SharedStop.fraction`), and these hooks must come after `SharedStop`'s.
    """

    def __init__(self, base: float, patience: int, clock: Callable[[], float], every: int = EVERY_BATCHES,
                 back_to_best: Callable[[Any], None] | None = None) -> None:
        self.base, self.patience, self.clock, self.every = base, patience, clock, every
        self.back_to_best = back_to_best  # called with the model when the rate halves
        self.best = math.inf
        self.waited = 0

    def rate(self) -> float:
        return self.base * annealing(self.clock())

    def on_train_begin(self, logs: dict, model: Any) -> None:
        model.optimizer.learning_rate = self.rate()

    def on_train_batch_end(self, batch: int, logs: dict, model: Any) -> None:
        if (batch + 1) % self.every == 0:
            model.optimizer.learning_rate = self.rate()

    def on_epoch_end(self, epoch: int, logs: dict, model: Any) -> None:
        val = float(logs.get("val_loss", math.nan))
        if math.isfinite(val) and val < self.best - MIN_GAIN:
            self.best, self.waited = val, 0
        else:
            self.waited += 1
            if self.waited >= self.patience:
                self.base, self.waited = max(MIN_RATE, self.base * PLATEAU_FACTOR), 0
                if self.back_to_best is not None:
                    self.back_to_best(model)
        model.optimizer.learning_rate = self.rate()


class EarlyStop:
    """Callback hooks that end training once the held-out figure has stopped getting better.

    It stops after ``patience`` epochs without a better held-out figure (by more than
    MIN_GAIN), but not while the figure is still trending better: while the mean of the
    last ``patience // 3`` epochs is below the mean of the ``patience // 3`` before them.
    At a high rate one lucky epoch can set a best the model only beats again once the
    rate has settled; Keras's EarlyStopping then ends the run mid-way down (the chorales,
    size s: stopped at 2:08 of 3 minutes while every epoch was better than the last).
    The decision reads only the held-out figure, which every worker of a cluster shares,
    so all of them stop at the same epoch.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.window = max(2, patience // 3)
        self.best = math.inf
        self.waited = 0
        self.figures: list[float] = []
        self.stopped_epoch: int | None = None

    def trending_better(self) -> bool:
        """Whether the last `window` epochs' mean held-out figure is below the `window` before them."""
        if len(self.figures) < 2 * self.window:
            return False
        recent = self.figures[-self.window:]
        before = self.figures[-2 * self.window:-self.window]
        return sum(recent) / self.window < sum(before) / self.window - MIN_GAIN

    def on_epoch_end(self, epoch: int, logs: dict, model: Any) -> None:
        val = float(logs.get("val_loss", math.nan))
        self.figures.append(val if math.isfinite(val) else math.inf)
        if math.isfinite(val) and val < self.best - MIN_GAIN:
            self.best, self.waited = val, 0
            return
        self.waited += 1
        if self.waited >= self.patience and not self.trending_better():
            self.stopped_epoch = epoch
            model.stop_training = True
