"""The classic MDN demonstration: inverting t = x + 0.3 sin(2 pi x), a one-to-many mapping.

A unimodal model can only average the branches where the curve folds back; a 5-component
MDN of the same 510-parameter network covers each of them.
"""

from __future__ import annotations

import numpy as np
import pytest

from server.model import mdn, network


def inverse_sine(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(0, 1, n)
    t = x + 0.3 * np.sin(2 * np.pi * x) + rng.normal(0, 0.02, n)
    return t[:, None].astype(np.float32), x[:, None].astype(np.float32)


def fit(mixtures: int, t: np.ndarray, x: np.ndarray, steps: int, seed: int):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    MDN = network.make_mdn_layer_class()
    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(15, "relu"), keras.layers.Dense(15, "relu"), MDN(dims=1, mixtures=mixtures)]
    )
    loss_fn = network.mdn_loss(mixtures, 1)
    opt = keras.optimizers.Adam(0.01)
    tt, xx = tf.constant(t), tf.constant(x)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(xx, model(tt, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    for _ in range(steps):
        step()
    return model


def branches(t: float) -> list[float]:
    """All x in [0, 1] with x + 0.3 sin(2 pi x) = t, by a fine grid and sign changes."""
    grid = np.linspace(0, 1, 200001)
    f = grid + 0.3 * np.sin(2 * np.pi * grid) - t
    return list(grid[np.where((f[:-1] < 0) != (f[1:] < 0))[0]])


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    t, x = inverse_sine(2000, rng)
    return fit(5, t, x, 1500, seed=1), fit(1, t, x, 1500, seed=1), inverse_sine(1000, rng)


def test_network_has_exactly_510_parameters(trained):
    mixture, single, _ = trained
    assert mixture.count_params() == 510
    assert single.count_params() == 318  # the same network with a one-component head


def test_mdn_beats_a_single_gaussian(trained):
    mixture, single, (t, x) = trained
    nll = lambda m, k: -np.mean(mdn.log_density(np.asarray(m(t)), x, k, 1))  # noqa: E731
    nll_mdn, nll_single = nll(mixture, 5), nll(single, 1)
    assert nll_mdn < nll_single - 0.5, (nll_mdn, nll_single)


@pytest.mark.parametrize("t", [0.45, 0.5, 0.55])
def test_samples_cover_every_branch_where_the_curve_folds(trained, draw, t):
    """Drawn through the live sampler (`mdn.sample_event` with `RandomBlocks`), 4,000 draws per t."""
    mixture, single, _ = trained
    roots = branches(t)
    assert len(roots) == 3
    rng = np.random.default_rng(3)
    params = np.asarray(mixture(np.full((4000, 1), t, np.float32)))
    draws = draw(params, 5, 1, len(params), rng)[:, 0]
    for r in roots:
        assert np.mean(np.abs(draws - r) < 0.06) > 0.08, (t, r)
    # The single Gaussian puts most of its samples between the branches.
    single_params = np.asarray(single(np.full((4000, 1), t, np.float32)))
    one = draw(single_params, 1, 1, len(single_params), rng)[:, 0]
    assert sum(np.mean(np.abs(one - r) < 0.06) for r in roots) < 0.7
