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


def test_a_weight_column_averages_over_the_weighted_events_only():
    """Padding of a short performance (weight 0) counts for nothing; all padding is a loss of 0, not 0/0."""
    import tensorflow as tf

    params = np.stack([pack([0.0], [1.0], [0.0]), pack([1.0], [2.0], [0.0]), pack([5.0], [0.1], [0.0])])
    targets = np.array([[0.5, 1.0], [-1.0, 1.0], [0.0, 0.0]])  # the last column: each event's weight
    expected = -np.mean([mdn.log_density(p, t[:1], 1, 1) for p, t in zip(params[:2], targets[:2])])
    loss = network.mdn_loss(1, 1)
    assert float(loss(tf.constant(targets, tf.float32), tf.constant(params, tf.float32))) == pytest.approx(expected, rel=1e-5)
    padding = np.array([[0.5, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    assert float(loss(tf.constant(padding, tf.float32), tf.constant(params, tf.float32))) == 0.0


def test_a_constant_dimension_is_left_out_of_the_loss():
    """Two mixtures over three dimensions, the middle one constant (not in ``active``): the mixture of the
    other two, by hand."""
    import tensorflow as tf

    w = (0.25, 0.75)
    mus = np.array([[0.1, 9.0, -0.3], [1.0, -9.0, 0.6]])
    ss = np.array([[0.5, 0.01, 1.5], [2.0, 0.01, 0.7]])
    x = np.array([0.4, 3.0, 0.2])
    expected = -math.log(sum(w[k] * normal_pdf(x[0], mus[k, 0], ss[k, 0]) * normal_pdf(x[2], mus[k, 2], ss[k, 2])
                             for k in range(2)))
    loss = network.mdn_loss(2, 3, active=(0, 2))
    params = pack(mus, ss, [math.log(w[0]), math.log(w[1])])
    got = float(loss(tf.constant(np.atleast_2d(x), tf.float32), tf.constant(np.atleast_2d(params), tf.float32)))
    assert got == pytest.approx(expected, rel=1e-5)


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


# --------------------------------------------------------------------------- sampling: the live sampler
#
# Every draw goes through `mdn.sample_event`, the one sampler the Predictor (and so the
# live loop, bench and report) runs, fed by `RandomBlocks` from an explicit Generator.
# Tolerances are statistical: 5 standard errors, with fixed seeds.


def softmax(logits, temperature):
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def within(observed, expected, se, what):
    assert abs(observed - expected) <= 5 * se, f"{what}: {observed:.5f} vs {expected:.5f} (5 SE = {5 * se:.5f})"


def component_of(draws, spacing=10.0):
    """Which component each draw came from, for components with means 0, spacing, 2*spacing, ... and tiny scales."""
    return np.rint(draws[:, 0] / spacing).astype(int)


def test_greedy_is_the_most_likely_components_mean():
    means = [[1.0, 2.0], [5.0, 6.0], [-3.0, 0.5]]
    params = pack(means, np.ones((3, 2)), [0.1, 0.3, 0.2])
    for u in (0.0, 0.5, 0.999999):
        for t in (0.0, 1e-7):  # below 1e-6 counts as 0: dividing by it would overflow
            assert mdn.sample_event(params, 3, 2, u, [2.5, -1.0], t, 0.0) == [5.0, 6.0]
    # Ties go to the first; a NaN logit counts as 0 and never wins over a larger one.
    assert mdn.sample_event(pack(means, np.ones((3, 2)), [0.3, 0.3, 0.3]), 3, 2, 0.9, [0, 0], 0.0, 0.0) == [1.0, 2.0]
    assert mdn.sample_event(pack(means, np.ones((3, 2)), [np.nan, -1.0, 0.5]), 3, 2, 0.0, [0, 0], 0.0, 0.0) == [-3.0, 0.5]
    # Greedy component, scaled noise: mean + scale * sigma_temperature * normal, exactly.
    params = pack(means, [[1.0, 1.0], [0.5, 2.0], [1.0, 1.0]], [0.1, 0.3, 0.2])
    assert mdn.sample_event(params, 3, 2, 0.3, [1.0, -2.0], 0.0, 0.5) == pytest.approx([5.0 + 0.25, 6.0 - 2.0])


@pytest.mark.parametrize("temperature", [0.05, 0.25, 0.5, 1.0, 2.0, 10.0])
def test_component_frequencies_are_softmax_of_logits_over_temperature(draw, temperature):
    logits = [0.0, 0.1, -0.05, 0.15] if temperature == 0.05 else [0.0, 1.0, -0.5, 1.5]
    params = pack([[0.0], [10.0], [20.0], [30.0]], np.full((4, 1), 1e-3), logits)
    n = 6000
    comp = component_of(draw(params, 4, 1, n, np.random.default_rng(100 + int(temperature * 100)), temperature))
    assert set(comp) <= {0, 1, 2, 3}
    expected = softmax(logits, temperature)
    for k in range(4):
        within(np.mean(comp == k), expected[k], math.sqrt(expected[k] * (1 - expected[k]) / n), f"T={temperature} component {k}")


def test_greedy_temperature_always_picks_the_top_component(draw):
    params = pack([[0.0], [10.0], [20.0]], np.full((3, 1), 1e-3), [0.0, 0.2, 0.1])
    comp = component_of(draw(params, 3, 1, 5000, np.random.default_rng(2), temperature=0.0))
    assert np.all(comp == 1)


@pytest.mark.parametrize("sigma_temperature", [0.0, 0.3, 1.0, 3.0])
def test_one_gaussian_mean_and_variance_with_sigma_temperature(draw, sigma_temperature):
    mu, s, n = np.array([0.7, -1.5, 3.0]), np.array([2.0, 0.5, 1e-3]), 8000
    got = draw(pack(mu, s, [0.3]), 1, 3, n, np.random.default_rng(31), sigma_temperature=sigma_temperature)
    if sigma_temperature == 0.0:
        np.testing.assert_array_equal(got, np.tile(mu, (n, 1)))
        return
    std = s * sigma_temperature
    for i in range(3):
        within(got[:, i].mean(), mu[i], std[i] / math.sqrt(n), f"mean {i}")
        within(got[:, i].var() / std[i] ** 2, 1.0, math.sqrt(2 / n), f"variance {i} / expected")
    # Each dimension draws its own normal: no correlation between them.
    corr = np.corrcoef(got[:, 0], got[:, 1])[0, 1]
    within(corr, 0.0, 1 / math.sqrt(n), "correlation of dims 0 and 1")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_mixture_mean_and_variance(draw, temperature):
    w = np.array([0.25, 0.75])
    mus, ss = np.array([[-2.0, 1.0], [3.0, 0.0]]), np.array([[0.5, 1.0], [1.0, 0.2]])
    n = 20000
    got = draw(pack(mus, ss, np.log(w)), 2, 2, n, np.random.default_rng(42), temperature)
    wt = softmax(np.log(w), temperature)
    mean = (wt[:, None] * mus).sum(0)
    var = (wt[:, None] * (ss**2 + mus**2)).sum(0) - mean**2
    for i in range(2):
        within(got[:, i].mean(), mean[i], math.sqrt(var[i] / n), f"T={temperature} mean {i}")
        # Sample variance of a mixture: SE from the mixture's fourth central moment.
        c = mus[:, i] - mean[i]
        m4 = (wt * (c**4 + 6 * c**2 * ss[:, i] ** 2 + 3 * ss[:, i] ** 4)).sum()
        within(got[:, i].var(), var[i], math.sqrt((m4 - var[i] ** 2) / n), f"T={temperature} variance {i}")


BAD = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("logits", [[100.0, -100.0, 0.0, 100.0, -100.0], [1e30, -1e30, np.nan, np.inf, -np.inf],
                                    [np.nan] * 5, [-np.inf] * 5, [1e300, 1e300, -1e300, 0.0, 5.0]])
@pytest.mark.parametrize("scale", [0.0, -1.0, 1e-30, 1e-6, 1e4, 1e30, np.inf, np.nan])
def test_extreme_parameters_give_finite_draws_from_valid_components(draw, logits, scale):
    k, d, n = 5, 3, 1000
    means = np.repeat(np.arange(k, dtype=np.float64)[:, None], d, axis=1)  # component i has mean i
    params = pack(means, np.full((k, d), scale), logits)
    clean = np.clip(np.nan_to_num(np.asarray(logits, dtype=np.float64), nan=0.0), -1e6, 1e6)
    for t in (0.0, 1e-7, 0.01, 1.0, 100.0, 1e300):
        weights = np.exp((clean - clean.max()) / t) if t >= mdn.GREEDY_BELOW else (clean == clean.max()) * 1.0
        allowed = set(np.flatnonzero(weights > 0)) if t >= mdn.GREEDY_BELOW else {int(np.argmax(clean))}
        comp = draw(params, k, d, n, np.random.default_rng(8), t, 0.0)[:, 0]
        assert set(comp.astype(int)) <= allowed and np.all(comp == np.rint(comp)), (t, set(comp))
        for st_ in (1.0, 1e300, np.inf):
            assert np.all(np.isfinite(draw(params, k, d, n, np.random.default_rng(9), t, st_))), (t, st_)
    # Infinite and NaN means come out finite too.
    wild = pack([[np.nan, np.inf, -np.inf]] * k, np.full((k, d), scale), logits)
    assert np.all(np.isfinite(draw(wild, k, d, 200, np.random.default_rng(10), 1.0, 1.0)))
    assert np.isfinite(mdn.log_density(pack(np.zeros((k, d)), np.full((k, d), 1e-6), [100.0, -100.0, 0.0, 100.0, -100.0]),
                                       np.zeros(d), k, d))


def test_non_finite_logits_count_as_documented(draw):
    """NaN is 0, +-inf is +-1e6: [1e30, -1e30, nan, inf, -inf] puts half the draws on component 0, half on 3."""
    params = pack([[0.0], [10.0], [20.0], [30.0], [40.0]], np.full((5, 1), 1e-3), [1e30, -1e30, np.nan, np.inf, -np.inf])
    comp = component_of(draw(params, 5, 1, 5000, np.random.default_rng(12)))
    assert set(comp) == {0, 3}
    within(np.mean(comp == 0), 0.5, math.sqrt(0.25 / 5000), "share of component 0")


def test_a_draw_past_the_running_total_never_picks_a_component_with_no_weight():
    """Rounding (e.g. `sum` compensating, the running total not) can put u at the total: fall back to a weighted one."""
    assert mdn.pick_component([0.0, 0.0, 0.0, -1e9], 1.0, 1.0) == 2
    assert mdn.pick_component([0.0, -1e9, -1e9], 1.0, 1.0) == 0


any_float = st.floats(allow_nan=True, allow_infinity=True)
any_temperature = st.one_of(st.floats(0, 1e-5), st.floats(0, 100), st.floats(min_value=0, allow_infinity=True))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(any_float, min_size=15, max_size=15),
    any_temperature,
    any_temperature,
    st.floats(0, 1, exclude_max=True),
    st.lists(st.floats(-8, 8), min_size=2, max_size=2),
)
def test_any_parameters_give_a_finite_draw_from_a_valid_component(values, temperature, sigma_temperature, u, normals):
    k, d = 3, 2
    params = np.array(values, dtype=np.float64)
    out = mdn.sample_event(params, k, d, u, normals, temperature, sigma_temperature)
    assert len(out) == d and all(math.isfinite(v) for v in out)
    logits = np.clip(np.nan_to_num(params[2 * k * d :], nan=0.0), -1e6, 1e6)
    comp = mdn.pick_component(list(params[2 * k * d :]), u, temperature)
    assert 0 <= comp < k
    if temperature < mdn.GREEDY_BELOW:
        assert logits[comp] == logits.max()
    else:
        assert math.exp((logits[comp] - logits.max()) / temperature) > 0, "a component with no weight"
    # With no spread the draw is that component's mean, made finite.
    mean = np.clip(np.nan_to_num(params[comp * d : comp * d + d], nan=0.0), -1e6, 1e6)
    assert mdn.sample_event(params, k, d, u, normals, temperature, 0.0) == list(mean)


@pytest.mark.parametrize("temperatures", [(-1.0, 1.0), (1.0, -0.5), (np.nan, 1.0), (1.0, np.nan)])
def test_negative_or_nan_temperature_is_refused(temperatures):
    with pytest.raises(ValueError):
        mdn.sample_event(pack([0.0], [1.0], [0.0]), 1, 1, 0.5, [0.0], *temperatures)


def test_wrong_parameter_count_is_refused():
    with pytest.raises(ValueError, match="^expected 15 parameters, got 14$"):
        mdn.sample_event(np.zeros(14), 3, 2, 0.5, [0.0, 0.0])
    for params in (np.zeros(14), np.zeros((4, 14))):  # one vector, or a row per step: the count is the last axis
        with pytest.raises(ValueError, match="^expected 15 parameters, got 14$"):
            mdn.log_density(params, np.zeros(2), 3, 2)


def test_random_blocks_are_seeded_and_well_distributed():
    a = mdn.RandomBlocks(np.random.default_rng(3), 3, block=100)
    b = mdn.RandomBlocks(np.random.default_rng(3), 3, block=100)
    draws_a = [a.next() for _ in range(5000)]  # crosses many block boundaries
    assert draws_a == [b.next() for _ in range(5000)]
    c = mdn.RandomBlocks(np.random.default_rng(4), 3, block=100)
    assert [c.next() for _ in range(5000)] != draws_a
    u = np.array([d[0] for d in draws_a])
    z = np.array([d[1] for d in draws_a])
    assert z.shape == (5000, 3) and u.min() >= 0 and u.max() < 1
    within(u.mean(), 0.5, math.sqrt(1 / 12 / 5000), "uniform mean")
    for i in range(3):
        within(z[:, i].mean(), 0.0, 1 / math.sqrt(5000), f"normal mean {i}")
        within(z[:, i].var(), 1.0, math.sqrt(2 / 5000), f"normal variance {i}")


def test_seeded_draws_repeat_exactly(draw):
    params = pack([[0.0, 1.0], [4.0, -2.0]], [[0.3, 0.5], [1.0, 0.2]], [0.5, -0.2])
    first = draw(params, 2, 2, 3000, np.random.default_rng(4))
    np.testing.assert_array_equal(first, draw(params, 2, 2, 3000, np.random.default_rng(4)))
    assert not np.array_equal(first, draw(params, 2, 2, 3000, np.random.default_rng(5)))


# --------------------------------------------------------------------------- seed 4's survivors (2026-12-06)


def test_log_density_of_a_batch_holds_each_row_apart_however_far_their_densities_differ():
    """logsumexp is shifted by each row's own maximum: with one shift for the whole batch, a point 60 sigmas out
    beside one at the mean underflows to -inf instead of its closed form."""
    k, d = 2, 1
    params = np.array([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]] * 2)  # two unit normals at 0, equal weights
    x = np.array([[0.0], [60.0]])
    got = mdn.log_density(params, x, k, d)
    expected = [-0.5 * math.log(2 * math.pi), -0.5 * 60.0**2 - 0.5 * math.log(2 * math.pi)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_shift_means_moves_integer_parameters_by_fractional_offsets():
    """A copy in floating point whatever comes in: integer parameters (a list, say) must not truncate the shift."""
    params = np.array([1, 2, 1, 1, 0])  # one component, two dims: means 1, 2; scales 1, 1; a logit
    moved = mdn.shift_means(params, 1, 2, np.array([0.25, -0.5]))
    assert moved.dtype == np.float32
    np.testing.assert_allclose(moved, [1.25, 1.5, 1.0, 1.0, 0.0])
    assert mdn.shift_means(params.astype(np.float64), 1, 2, np.zeros(2)).dtype == np.float64  # float64 stays


@pytest.mark.parametrize("x", [25.0, 25.5, 26.0])
def test_log_erfc_past_the_switch_to_its_series_matches_erfc_itself(x):
    """erfc(26) ~ 5e-296 is still a normal double, so math.erfc is the reference where the asymptotic series takes over."""
    from server.model.likelihood import _log_erfc

    # the series stops at x^-4: its next term, 15/(8 x^6), is 8e-9 at 25
    assert float(_log_erfc(np.array([x]))[0]) == pytest.approx(math.log(math.erfc(x)), abs=2e-8)
