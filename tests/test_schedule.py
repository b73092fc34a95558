"""The learning rate's schedule: held for half the budget, a half cosine down to 5 % at its end, halved on plateaus.

The numbers are docs/training.md's, written here, not imported: a changed constant must fail.
"""

from __future__ import annotations

import math

import pytest

from server.learn.schedule import EarlyStop, RateSchedule, TimeBudget, annealing


class _Optimizer:
    learning_rate = 0.0


class _Model:
    def __init__(self) -> None:
        self.optimizer = _Optimizer()
        self.stop_training = False


@pytest.mark.parametrize("fraction, factor", [
    (0.0, 1.0), (0.25, 1.0), (0.5, 1.0),  # held for the first half
    (0.75, 0.05 + 0.95 * 0.5),  # half way down the half cosine
    (0.5 + 0.5 / 3, 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi / 3))),
    (1.0, 0.05), (1.7, 0.05),  # 5 % at the end, and after it (an epoch that overran)
])
def test_the_rate_holds_for_half_the_budget_then_falls_to_five_percent(fraction, factor):
    assert annealing(fraction) == pytest.approx(factor, rel=1e-12)


def test_the_fall_starts_just_after_half_the_budget_and_never_rises():
    assert annealing(0.501) < 1.0
    values = [annealing(i / 200) for i in range(201)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_the_schedule_follows_the_clock_every_sixteen_batches():
    clock = [0.0]
    rate, model = RateSchedule(1e-3, patience=5, clock=lambda: clock[0]), _Model()
    rate.on_train_begin({}, model)
    assert model.optimizer.learning_rate == pytest.approx(1e-3)
    clock[0] = 1.0
    for batch in range(15):
        rate.on_train_batch_end(batch, {}, model)
    assert model.optimizer.learning_rate == pytest.approx(1e-3)  # not yet: every 16 batches
    rate.on_train_batch_end(15, {}, model)
    assert model.optimizer.learning_rate == pytest.approx(5e-5)


def test_a_plateau_halves_the_rate_after_patience_epochs_without_a_better_figure():
    rate, model = RateSchedule(1e-3, patience=3, clock=lambda: 0.0), _Model()
    rate.on_epoch_end(0, {"val_loss": 2.0}, model)
    for epoch, val in enumerate([2.0, 2.5], start=1):  # no better: two epochs waited
        rate.on_epoch_end(epoch, {"val_loss": val}, model)
        assert model.optimizer.learning_rate == pytest.approx(1e-3)
    rate.on_epoch_end(3, {"val_loss": 2.0}, model)  # the third
    assert model.optimizer.learning_rate == pytest.approx(5e-4)
    rate.on_epoch_end(4, {"val_loss": 1.0}, model)  # better: the count starts again
    for epoch in range(5, 7):
        rate.on_epoch_end(epoch, {"val_loss": 1.5}, model)
    assert model.optimizer.learning_rate == pytest.approx(5e-4)
    rate.on_epoch_end(7, {"val_loss": float("nan")}, model)  # a NaN figure is not better
    assert model.optimizer.learning_rate == pytest.approx(2.5e-4)


def test_plateaus_never_take_the_rate_below_1e_5_and_the_clock_multiplies_what_they_leave():
    clock = [0.0]
    rate, model = RateSchedule(4e-5, patience=1, clock=lambda: clock[0]), _Model()
    for epoch in range(6):
        rate.on_epoch_end(epoch, {"val_loss": 1.0}, model)
    assert model.optimizer.learning_rate == pytest.approx(1e-5)
    clock[0] = 1.0
    rate.on_epoch_end(6, {"val_loss": 1.0}, model)
    assert model.optimizer.learning_rate == pytest.approx(1e-5 * 0.05)


def test_the_budget_stops_when_the_next_epoch_would_not_fit(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("server.learn.schedule.time.monotonic", lambda: now[0])
    budget, model = TimeBudget(10.0), _Model()
    budget.on_train_begin({}, model)
    now[0] = 104.0  # 4 s an epoch: a second would end at 8 s, in the budget
    budget.on_epoch_end(0, {}, model)
    assert not model.stop_training and budget.fraction() == pytest.approx(0.4)
    now[0] = 106.0  # 3 s an epoch: a third would end at 9 s
    budget.on_epoch_end(1, {}, model)
    assert not model.stop_training
    now[0] = 107.0  # 7/3 s an epoch: a fourth would end at 9.33 s, still in
    budget.on_epoch_end(2, {}, model)
    assert not model.stop_training
    now[0] = 109.0  # 2.25 s an epoch: a fifth would end at 11.25 s, past it
    budget.on_epoch_end(3, {}, model)
    assert model.stop_training
    model.stop_training = False
    now[0] = 110.5
    budget.on_train_batch_end(0, {}, model)  # spent mid-epoch
    assert model.stop_training and budget.fraction() == pytest.approx(1.05)


def _stopped_at(figures: list[float], patience: int) -> int | None:
    stop, model = EarlyStop(patience), _Model()
    for epoch, figure in enumerate(figures):
        stop.on_epoch_end(epoch, {"val_loss": figure}, model)
        if model.stop_training:
            return epoch
    return None


def test_early_stopping_ends_a_flat_run_after_patience_epochs():
    """-1.0 at epoch 0, then 15 epochs alternating no better: the 15th ends it (patience 15)."""
    flat = [-1.0] + [-0.9, -0.95] * 20
    assert _stopped_at(flat, 15) == 15
    assert _stopped_at(flat, 6) == 6


def test_early_stopping_ends_a_run_that_overfits_after_patience_epochs():
    rising = [-2.0] + [-2.0 + 0.05 * i for i in range(1, 40)]
    assert _stopped_at(rising, 15) == 15


def test_early_stopping_waits_while_the_held_out_figure_is_still_getting_better():
    """A lucky epoch (-5.4) at a high rate, then a steady climb back that has not beaten it yet."""
    spike_then_settling = [-5.4] + [-4.0 - 0.05 * i for i in range(30)]  # -4.0, -4.05, ..., -5.45 at epoch 30
    assert _stopped_at(spike_then_settling, 15) is None  # it reaches a new best instead of stopping at 15
    # the same climb, flattening out below the spike: stops once the last 5 are no better than the 5 before
    flattening = [-5.4] + [-4.0 - 0.1 * i for i in range(10)] + [-4.95] * 20
    assert _stopped_at(flattening, 15) == 20  # epoch 20: waited 20 >= 15, and epochs 16-20 equal 11-15


def test_early_stopping_with_patience_zero_stops_at_the_first_epoch_no_better():
    assert _stopped_at([-1.0, -1.5, -1.2, -2.0], 0) == 2


class _WeightedModel(_Model):
    """A model whose one weight is a number: enough to see which epoch's weights it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = 0.0

    def get_weights(self) -> list:
        import numpy as np
        return [np.array(self.weight)]

    def set_weights(self, weights: list) -> None:
        self.weight = float(weights[0])


def test_when_a_plateau_halves_the_rate_training_goes_back_to_the_best_weights():
    from server.learn.train import BestWeights

    best, model = BestWeights(), _WeightedModel()
    rate = RateSchedule(1e-3, patience=2, clock=lambda: 0.0, back_to_best=best.restore)
    for epoch, (weight, val) in enumerate([(1.0, 3.0), (2.0, 1.0), (3.0, 4.0)]):
        model.weight = weight
        rate.on_epoch_end(epoch, {"val_loss": val}, model)
        best.on_epoch_end(epoch, {"val_loss": val, "loss": val}, model)
        assert model.weight == weight  # no plateau yet: where training took it
    model.weight = 4.0
    rate.on_epoch_end(3, {"val_loss": 5.0}, model)  # the second epoch without a better figure
    assert model.optimizer.learning_rate == pytest.approx(5e-4)
    assert model.weight == 2.0  # the best epoch's


def test_going_back_before_any_finite_figure_leaves_the_model_where_it_is():
    from server.learn.train import BestWeights

    best, model = BestWeights(), _WeightedModel()
    rate = RateSchedule(1e-3, patience=1, clock=lambda: 0.0, back_to_best=best.restore)
    model.weight = 7.0
    rate.on_epoch_end(0, {"val_loss": float("nan")}, model)
    assert model.optimizer.learning_rate == pytest.approx(5e-4) and model.weight == 7.0
