"""The normaliser's promises that training and playing rely on: one fit whether the corpus is in memory or read a
performance at a time, constants found per dimension, values clipped into range, and a description that names
the right dimension."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from server.model.normalise import Normaliser, detect_grid


def corpus() -> list[np.ndarray]:
    """Three performances of (dt, v1 on a grid of 1/64, v2 continuous, v3 constant at 0.25)."""
    rng = np.random.default_rng(7)
    out = []
    for n in (40, 25, 60):
        dt = rng.uniform(0.01, 0.5, n)
        grid = rng.integers(0, 65, n) / 64
        cont = rng.uniform(0.0, 1.0, n)
        out.append(np.stack([dt, grid, cont, np.full(n, 0.25)], axis=1))
    return out


def test_a_corpus_read_a_performance_at_a_time_gets_the_normaliser_of_the_corpus_in_memory() -> None:
    performances = corpus()
    whole = Normaliser.fit(np.concatenate(performances), 5.0)
    streamed = Normaliser.fit_performances(lambda: iter(performances), 5.0)
    assert streamed.log == whole.log and streamed.offset == whole.offset
    assert streamed.grid == whole.grid == (0.0, 1 / 64, 0.0, 0.0)
    assert streamed.constant == whole.constant == (None, None, None, 0.25)
    np.testing.assert_allclose(streamed.shift, whole.shift, rtol=1e-12)
    np.testing.assert_allclose(streamed.scale, whole.scale, rtol=1e-12)


def test_only_the_dimension_that_never_changes_is_constant_even_when_it_differs_from_the_others() -> None:
    first = np.array([[0.1, 0.5, 0.9], [0.2, 0.5, 0.9], [0.3, 0.5, 0.9]])
    second = np.array([[0.1, 0.5, 0.1], [0.2, 0.5, 0.7]])
    norm = Normaliser.fit_performances(lambda: iter([first, second]), 5.0)
    assert norm.constant == (None, 0.5, None)


@pytest.mark.parametrize("fit", ["in memory", "a performance at a time"])
def test_a_value_far_below_its_range_is_played_at_the_bottom_of_it(fit: str) -> None:
    performances = [p[:, :3] for p in corpus()]
    norm = (Normaliser.fit(np.concatenate(performances), 5.0) if fit == "in memory"
            else Normaliser.fit_performances(lambda: iter(performances), 5.0))
    dt, low, high = norm.inverse_event([0.0, -1e6, 1e6])
    assert low == 0.0 and high == 1.0 and dt > 0.0
    np.testing.assert_array_equal(norm.inverse(np.array([[0.0, -1e6, 1e6]]))[0, 1:], [0.0, 1.0])


def test_the_description_says_which_dimension_is_predicted_as_a_step() -> None:
    base = Normaliser.fit(np.concatenate(corpus())[:, :3], 5.0)
    norm = replace(base, relative=(False, False, True))
    parts = norm.describe().split("; ")
    assert parts[0] == "dt continuous"
    assert parts[1] == "x on a grid of 1/64 (dequantised)"
    assert parts[2] == "y continuous, predicted as the step from the previous event's"


def test_three_distinct_values_on_a_grid_are_a_grid_and_two_are_not() -> None:
    """Two values (a switch) are not worth a grid; three on one are (the coarsest candidate, 1/64)."""
    assert detect_grid(np.array([0.0, 0.5, 1.0, 0.5])) == 1 / 64
    assert detect_grid(np.array([0.0, 1.0, 1.0, 0.0])) == 0.0
    three = np.array([[0.1, 0.0], [0.2, 0.5], [0.3, 1.0], [0.1, 0.5]])
    assert Normaliser.fit(three, 5.0).grid == (0.0, 1 / 64)
    assert Normaliser.fit_performances(lambda: iter([three[:2], three[2:]]), 5.0).grid == (0.0, 1 / 64)


def test_too_few_events_to_fit_say_the_shape_it_needs() -> None:
    with pytest.raises(ValueError, match=r"^need events of shape \[n>=2, 1 \+ N\]$"):
        Normaliser.fit(np.zeros((1, 3)), 5.0)


def test_too_few_events_across_performances_say_the_shape_it_needs() -> None:
    with pytest.raises(ValueError, match=r"^need events of shape \[n>=2, 1 \+ N\]$"):
        Normaliser.fit_performances(lambda: iter([np.zeros((1, 3))]), 5.0)


def test_a_model_json_with_a_scale_not_positive_is_refused_saying_so() -> None:
    doc = Normaliser.fit(np.concatenate(corpus())[:, :3], 5.0).to_json()
    doc["scale"] = [0.0, *doc["scale"][1:]]
    with pytest.raises(ValueError, match=r"^normalisation scales must be positive and finite$"):
        Normaliser.from_json(doc)


def test_a_normalisation_written_before_grids_constants_and_steps_reads_as_none_of_them() -> None:
    """Models exported before those fields existed still load: no grid, no constant, nothing relative."""
    doc = Normaliser.fit(np.concatenate(corpus())[:, :3], 5.0).to_json()
    for key in ("grid", "constant", "relative"):
        del doc[key]
    old = Normaliser.from_json(doc)
    assert old.grid == (0.0, 0.0, 0.0) and old.constant == (None, None, None)
    assert old.relative == (False, False, False)


def test_a_normaliser_made_without_grids_constants_or_steps_has_one_of_each_per_dimension() -> None:
    made = Normaliser.fit(np.concatenate(corpus())[:, :3], 5.0, detect=False)
    bare = Normaliser(shift=made.shift, scale=made.scale, log=made.log, offset=made.offset,
                      clip_min=made.clip_min, clip_max=made.clip_max)
    assert bare.grid == (0.0, 0.0, 0.0) and bare.constant == (None, None, None)
    assert bare.relative == (False, False, False)
