"""MDN maths against closed-form results: the tfp loss, the numpy log-density and the sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.model import mdn, network


def pack(means, scales, logits) -> np.ndarray:
    """Parameters in the layout of the head: means | scales | logits."""
    return np.concatenate([np.ravel(means), np.ravel(scales), np.ravel(logits)]).astype(np.float64)


def normal_pdf(x, mu, s):
    return math.exp(-0.5 * ((x - mu) / s) ** 2) / (s * math.sqrt(2 * math.pi))


def tf_loss(params, target, k, d) -> float:
    import tensorflow as tf

    loss = network.mdn_loss(k, d)
    return float(loss(tf.constant(np.atleast_2d(target), tf.float32), tf.constant(np.atleast_2d(params), tf.float32)))


# --------------------------------------------------------------------------- loss: closed form


def test_loss_one_gaussian_closed_form():
    mu, s, x = 0.3, 0.7, 1.1
    expected = 0.5 * math.log(2 * math.pi) + math.log(s) + (x - mu) ** 2 / (2 * s * s)
    assert tf_loss(pack([mu], [s], [0.0]), [x], 1, 1) == pytest.approx(expected, rel=1e-5)


def test_loss_two_component_mixture_by_hand():
    w = (0.3, 0.7)
    mus, ss, x = (-1.0, 2.0), (0.5, 1.5), 0.4
    expected = -math.log(w[0] * normal_pdf(x, mus[0], ss[0]) + w[1] * normal_pdf(x, mus[1], ss[1]))
    params = pack(mus, ss, [math.log(w[0]), math.log(w[1])])
    assert tf_loss(params, [x], 2, 1) == pytest.approx(expected, rel=1e-5)
    assert -mdn.log_density(params, np.array([x]), 2, 1) == pytest.approx(expected, rel=1e-9)


def test_loss_three_dimensions_is_sum_of_independent_normals():
    mu, s, x = np.array([0.1, -0.2, 0.5]), np.array([0.3, 1.2, 2.0]), np.array([0.0, 0.4, -1.0])
    expected = -sum(math.log(normal_pdf(x[i], mu[i], s[i])) for i in range(3))
    assert tf_loss(pack(mu, s, [0.0]), x, 1, 3) == pytest.approx(expected, rel=1e-5)


def test_loss_is_mean_over_batch():
    params = np.stack([pack([0.0], [1.0], [0.0]), pack([1.0], [2.0], [0.0])])
    targets = np.array([[0.5], [-1.0]])
    expected = -np.mean([mdn.log_density(p, t, 1, 1) for p, t in zip(params, targets)])
    assert tf_loss(params, targets, 1, 1) == pytest.approx(expected, rel=1e-5)


def test_numpy_log_density_matches_tfp_on_random_parameters():
    rng = np.random.default_rng(0)
    k, d, n = 5, 3, 64
    params = np.concatenate([rng.normal(0, 2, (n, k * d)), rng.uniform(0.05, 3, (n, k * d)), rng.normal(0, 3, (n, k))], axis=1)
    x = rng.normal(0, 2, (n, d))
    dist = network.mixture_distribution(params.astype(np.float32), k, d)
    expected = dist.log_prob(x.astype(np.float32)).numpy()
    np.testing.assert_allclose(mdn.log_density(params, x, k, d), expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the Keras head


def test_head_scales_positive_and_layout(tmp_path):
    import keras

    MDN = network.make_mdn_layer_class()
    layer = MDN(dims=3, mixtures=5)
    out = np.asarray(layer(np.random.default_rng(1).normal(0, 50, (8, 16)).astype(np.float32)))
    assert out.shape == (8, mdn.param_count(5, 3))
    _, scales, _ = mdn.split_params(out, 5, 3)
    assert np.all(scales >= mdn.SCALE_EPS * 0.99) and np.all(np.isfinite(out))
    model = keras.Sequential([keras.Input((16,)), MDN(dims=3, mixtures=5)])
    model.save(tmp_path / "m.keras")
    # Registered for serialization: loads in safe mode without custom_objects.
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    x = np.ones((2, 16), np.float32)
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(model(x)), rtol=1e-6)


# --------------------------------------------------------------------------- sampling


def test_sample_moments_match_mixture():
    rng = np.random.default_rng(42)
    w = np.array([0.25, 0.75])
    mus, ss = np.array([[-2.0, 1.0], [3.0, 0.0]]), np.array([[0.5, 1.0], [1.0, 0.2]])
    params = pack(mus, ss, np.log(w))
    draws = mdn.sample(np.tile(params, (20000, 1)), 2, 2, rng)
    mean = (w[:, None] * mus).sum(0)
    var = (w[:, None] * (ss**2 + mus**2)).sum(0) - mean**2
    np.testing.assert_allclose(draws.mean(0), mean, atol=0.06)
    np.testing.assert_allclose(draws.std(0), np.sqrt(var), rtol=0.03)


def test_temperature_divides_logits():
    rng = np.random.default_rng(5)
    logits = np.log(np.array([0.2, 0.8]))
    params = pack([[-10.0], [10.0]], [[0.01], [0.01]], logits)
    for temperature in (0.5, 1.0, 2.0):
        draws = mdn.sample(np.tile(params, (8000, 1)), 2, 1, rng, temperature=temperature)
        p = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        assert (draws[:, 0] > 0).mean() == pytest.approx(p[1], abs=0.02)


def test_sigma_temperature_scales_spread():
    rng = np.random.default_rng(6)
    params = pack([0.0], [2.0], [0.0])
    for st_ in (0.5, 1.0, 3.0):
        draws = mdn.sample(np.tile(params, (6000, 1)), 1, 1, rng, sigma_temperature=st_)
        assert draws.std() == pytest.approx(2.0 * st_, rel=0.04)


def test_temperature_zero_is_greedy():
    rng = np.random.default_rng(7)
    params = pack([[1.0, 2.0], [5.0, 6.0], [-3.0, 0.5]], np.ones((3, 2)), [0.1, 0.3, 0.2])
    np.testing.assert_array_equal(mdn.sample(params, 3, 2, rng, 0.0, 0.0), [5.0, 6.0])
    near = mdn.sample(np.tile(params, (500, 1)), 3, 2, rng, 0.0, 0.1)
    assert np.all(np.abs(near - [5.0, 6.0]) < 1.0)


@pytest.mark.parametrize("logit", [100.0, -100.0, 1e30, -1e30])
@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_extreme_parameters_stay_finite(logit, scale):
    rng = np.random.default_rng(8)
    k, d = 5, 3
    params = pack(np.zeros((k, d)), np.full((k, d), scale), [logit, -logit, 0.0, logit, -logit])
    for t in (0.0, 0.01, 1.0, 100.0):
        out = mdn.sample(np.tile(params, (100, 1)), k, d, rng, t, 1.0)
        assert np.all(np.isfinite(out))
    assert np.isfinite(mdn.log_density(params, np.zeros(d), k, d))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=15, max_size=15),
    st.floats(0, 50),
    st.floats(0, 50),
)
def test_any_parameters_give_a_finite_sample(values, temperature, sigma_temperature):
    params = np.array(values, dtype=np.float64)
    params[6:12] = np.abs(np.nan_to_num(params[6:12], nan=1.0))  # scales come out of ELU+1: positive
    out = mdn.sample(params, 3, 2, np.random.default_rng(0), temperature, sigma_temperature)
    assert out.shape == (2,) and np.all(np.isfinite(out))


def test_negative_temperature_is_refused():
    with pytest.raises(ValueError):
        mdn.sample(pack([0.0], [1.0], [0.0]), 1, 1, np.random.default_rng(0), temperature=-1)


def test_scalar_sampler_matches_the_vectorised_one():
    rng = np.random.default_rng(11)
    k, d = 3, 2
    params = pack([[0.0, 1.0], [4.0, -2.0], [-3.0, 3.0]], [[0.3, 0.5], [1.0, 0.2], [0.7, 0.7]], [0.5, -0.2, 1.0])
    for t, s in ((1.0, 1.0), (0.5, 2.0), (3.0, 0.3)):
        fast = np.array([mdn.sample_row(params, k, d, rng, t, s) for _ in range(6000)])
        ref = mdn.sample(np.tile(params, (6000, 1)), k, d, rng, t, s)
        np.testing.assert_allclose(fast.mean(0), ref.mean(0), atol=0.15)
        np.testing.assert_allclose(fast.std(0), ref.std(0), rtol=0.06)
    greedy = mdn.sample_row(params, k, d, rng, 0.0, 0.0)
    np.testing.assert_array_equal(greedy, mdn.sample(params, k, d, rng, 0.0, 0.0))
    wild = params.copy()
    wild[:] = [np.nan, np.inf, -np.inf, 1e30, 0, 0, 1e-9, np.inf, 1e4, np.nan, 0.1, 0.1, 1e30, np.nan, -np.inf]
    for t in (0.0, 1e-7, 1.0, 1e3):
        assert np.all(np.isfinite(mdn.sample_row(wild, k, d, rng, t, 1.0)))


def test_random_blocks_are_seeded_and_well_distributed():
    a = mdn.RandomBlocks(np.random.default_rng(3), 3, block=100)
    b = mdn.RandomBlocks(np.random.default_rng(3), 3, block=100)
    draws_a = [a.next() for _ in range(5000)]  # crosses many block boundaries
    assert draws_a == [b.next() for _ in range(5000)]
    u = np.array([d[0] for d in draws_a])
    z = np.array([d[1] for d in draws_a])
    assert z.shape == (5000, 3) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.02 and np.allclose(z.mean(0), 0, atol=0.05) and np.allclose(z.std(0), 1, atol=0.05)
    params = pack([[0.0, 1.0], [4.0, -2.0]], [[0.3, 0.5], [1.0, 0.2]], [0.5, -0.2])
    blocks = mdn.RandomBlocks(np.random.default_rng(4), 2)
    fast = np.array([mdn.sample_row_from(params, 2, 2, *blocks.next()) for _ in range(6000)])
    ref = mdn.sample(np.tile(params, (6000, 1)), 2, 2, np.random.default_rng(5))
    np.testing.assert_allclose(fast.mean(0), ref.mean(0), atol=0.15)
