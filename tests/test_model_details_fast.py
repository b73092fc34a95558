"""Small promises of the model's maths that the rest of the suite reaches only on their common path: the
mixture a client is sent for a constant dimension, and log-sum-exp over the last axis of any shape."""

from __future__ import annotations

import numpy as np

from server.model.files import DEFAULT_MODELS_DIR
from server.model.likelihood import logsumexp
from server.model.predictor import Predictor


def test_a_constant_dimension_is_sent_as_its_value_with_no_spread_at_any_sigma_temperature() -> None:
    """The chorale model plays one velocity: a client drawing the `/mixture` must see a point, not a bell."""
    model = Predictor.load(DEFAULT_MODELS_DIR / "chorale")
    constant = model.norm.constant
    d = next(i for i, c in enumerate(constant) if c is not None)
    dims = len(constant)
    for sigma in (0.5, 1.0, 3.0):
        message = model.mixture(1.0, sigma)
        k = int(message[0])
        components = np.array(message[1 + k:]).reshape(k, 2 * dims)
        np.testing.assert_array_equal(components[:, dims + d], 0.0)
        np.testing.assert_allclose(components[:, d], constant[d])
        assert np.all(components[:, dims + 1] > 0.0)  # a dimension that varies keeps its spread


def test_log_sum_exp_is_taken_over_the_last_axis_whatever_the_shape() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3, 4)) * 30
    np.testing.assert_allclose(logsumexp(x), np.log(np.exp(x).sum(axis=-1)), rtol=1e-12)
    assert logsumexp(x).shape == (2, 3)
    np.testing.assert_allclose(logsumexp(np.array([[1000.0, 1000.0]])), [1000.0 + np.log(2.0)])  # no overflow
