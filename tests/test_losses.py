"""Losses: KL and decoder against closed forms, Monte Carlo and probability axioms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import losses as L
from diffusion_jax.diffusion import process as D
from diffusion_jax.diffusion import schedules as S

BETAS = S.get_beta_schedule("linear", 1000)


def test_kl_of_identical_gaussians_is_zero():
    m = jnp.linspace(-3, 3, 7)
    lv = jnp.linspace(-5, 2, 7)
    np.testing.assert_allclose(L.normal_kl(m, lv, m, lv), 0.0, atol=1e-6)


def test_kl_agrees_with_monte_carlo():
    rng = np.random.default_rng(0)
    m1, s1, m2, s2 = 0.3, 0.7, -0.4, 1.3
    x = rng.normal(m1, s1, size=2_000_000)
    log_ratio = (-0.5 * ((x - m1) / s1) ** 2 - math.log(s1)) - (
        -0.5 * ((x - m2) / s2) ** 2 - math.log(s2)
    )
    mc, se = log_ratio.mean(), log_ratio.std() / math.sqrt(x.size)
    kl = float(L.normal_kl(m1, 2 * math.log(s1), m2, 2 * math.log(s2)))
    assert abs(kl - mc) < 4 * se


BINS = np.arange(256) / 127.5 - 1.0  # every 8-bit value on the [-1, 1] scale
EXTREME_MEANS = (-5.0, -3.0, -1.5, -1.0, -1 + 1 / 255, -0.5, 0.0, 0.37, 0.9, 1.0, 1.2, 2.0, 5.0)
LOG_SCALES = (-15.0, -12.0, -9.0, -7.0, -5.0, -3.0, -2.0, -1.0, 0.0, 0.5, 1.0)


def decoder_log_prob_float64(x, means, log_scales):
    """The official tanh-CDF decoder in float64, as an independent oracle.

    Phi~(z) = 0.5 (1 + tanh(y)) = sigmoid(2 y), y = sqrt(2/pi) (z + 0.044715 z^3). A bin in the
    upper tail is reflected to the lower tail (Phi~(b) - Phi~(a) = Phi~(-a) - Phi~(-b)), and
    the difference of two lower-tail CDFs is taken in log space, so no step cancels. The
    inputs are the float32 values the code receives, and the half bin width 1/255 is the float32
    constant the code (like the official float32 code) uses: 1/255 is not representable, and
    for scales below ~1e-5 the bin edge's own rounding (~1e-10) would otherwise dominate.
    """
    x, means, log_scales = (
        np.asarray(v, np.float32).astype(np.float64) for v in (x, means, log_scales)
    )
    half = float(np.float32(1 / 255))
    inv = np.exp(-log_scales)
    b = np.where(x > 0.999, np.inf, (x - means + half) * inv)
    a = np.where(x < -0.999, -np.inf, (x - means - half) * inv)
    flip = a + b > 0
    hi, lo = np.where(flip, -a, b), np.where(flip, -b, a)
    log_cdf = lambda z: -np.logaddexp(0.0, -2 * np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))
    with np.errstate(invalid="ignore", over="ignore"):
        log_hi, log_lo = log_cdf(hi), log_cdf(lo)
        log_p = log_hi + np.log1p(-np.exp(log_lo - log_hi))
    return np.maximum(log_p, math.log(1e-12))  # the reference's floor at probability 1e-12


def decoder_grid():
    """Every bin x every (mean, log_scale) of the extreme grid, flattened, float32."""
    x, m, s = np.meshgrid(BINS, EXTREME_MEANS, LOG_SCALES, indexing="ij")
    return (np.asarray(v.ravel(), np.float32) for v in (x, m, s))


def test_decoder_has_no_cancellation_on_every_bin():
    """All 256 bins, extreme means and tiny scales: within 1e-5 nats of float64 everywhere
    (bins whose float64 probability is below 1e-12 must sit at the floor)."""
    x, m, s = decoder_grid()
    ref = decoder_log_prob_float64(x, m, s)
    got = np.asarray(L.discretized_gaussian_log_likelihood(x, m, s), np.float64)
    assert np.sum(ref > math.log(1e-12)) > 10_000  # most of the grid is not floored
    assert np.sum(ref < math.log(1e-6)) > 1_000  # and many bins are deep in a tail
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_decoder_matches_float64_reference_at_random_points():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, 2000) / 127.5 - 1.0
    means = rng.uniform(-3, 3, 2000)
    log_scales = rng.uniform(-9, 1, 2000)
    ref = decoder_log_prob_float64(x, means, log_scales)
    got = L.discretized_gaussian_log_likelihood(
        jnp.asarray(x, jnp.float32), jnp.asarray(means, jnp.float32), log_scales
    )
    assert np.sum(ref < math.log(1e-4)) > 200
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0, atol=1e-5)


def test_approx_cdf_is_the_official_tanh_formula():
    z = np.linspace(-4, 4, 81)
    official = 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    np.testing.assert_allclose(L.approx_standard_normal_cdf(jnp.asarray(z)), official, atol=1e-7)
    np.testing.assert_allclose(
        L.approx_standard_normal_log_cdf(jnp.asarray(z)), np.log(official), rtol=1e-5
    )


def test_decoder_probabilities_sum_to_one_and_are_positive():
    x, m, s = decoder_grid()
    logp = L.discretized_gaussian_log_likelihood(x, m, s)
    p = np.exp(np.asarray(logp, np.float64)).reshape(256, len(EXTREME_MEANS), len(LOG_SCALES))
    assert np.all(p > 0)
    total = p.sum(0)  # [means, log_scales]
    # Scale < 1e-5 with the mean at a bin edge: x_k + 1/255 and x_(k+1) - 1/255 differ by
    # float32 rounding (~1e-10), a noticeable fraction of the scale: the edges do not telescope.
    edges = (BINS[:-1] + BINS[1:]) / 2
    at_edge = np.array([np.min(np.abs(edges - mu)) < 1e-6 for mu in EXTREME_MEANS])
    skip = at_edge[:, None] & (np.array(LOG_SCALES) < -10)[None, :]
    assert 0 < skip.sum() <= 4
    # Otherwise edges telescope up to float32 rounding of x +- 1/255; each probability is
    # floored at 1e-12 (at most 256e-12 extra).
    np.testing.assert_allclose(total[~skip], 1.0, rtol=0, atol=1e-5)


def test_decoder_gradients_are_finite_everywhere():
    """L_hybrid trains the variance through the decoder: no NaN or inf from the tails."""
    x, m, s = decoder_grid()
    g_mean, g_scale = jax.grad(
        lambda mm, ss: jnp.sum(L.discretized_gaussian_log_likelihood(x, mm, ss)), (0, 1)
    )(jnp.asarray(m), jnp.asarray(s))
    assert np.all(np.isfinite(g_mean)) and np.all(np.isfinite(g_scale))


def test_true_noise_makes_every_kl_term_zero_under_fixed_small():
    d = D.NoiseProcess(BETAS, "eps", "fixed_small")
    key = jax.random.PRNGKey(0)
    x0 = jax.random.uniform(key, (1000, 2, 2, 3), minval=-0.9, maxval=0.9)
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t = jnp.arange(1000)
    x_t = D.q_sample(d, x0, t, noise)
    vb, _ = L.vb_terms_bpd(d, noise, x0, x_t, t, clip_denoised=False)
    # float32 reconstruction of x0 from x_t loses a little at large t; the KL is ~1e-6.
    assert float(jnp.max(jnp.abs(vb[1:]))) < 1e-3
    assert float(jnp.mean(jnp.abs(vb[1:]))) < 1e-5


def test_vb_term_equals_kl_and_decoder_definitions():
    d = D.NoiseProcess(BETAS, "eps", "fixed_large")
    x0 = (
        jnp.round(
            jax.random.uniform(jax.random.PRNGKey(2), (2, 3, 3, 1), minval=-1, maxval=1) * 127.5
        )
        / 127.5
    )
    noise = jax.random.normal(jax.random.PRNGKey(3), x0.shape)
    out = jax.random.normal(jax.random.PRNGKey(4), x0.shape)
    t = jnp.array([0, 400])
    x_t = D.q_sample(d, x0, t, noise)
    vb, _ = L.vb_terms_bpd(d, out, x0, x_t, t)
    p = D.p_mean_variance(d, out, x_t, t, clip_denoised=False)
    qm, _, qlv = D.q_posterior_mean_variance(d, x0, x_t, t)
    kl = np.mean(L.normal_kl(qm, qlv, p.mean, p.log_variance)[1]) / math.log(2)
    nll = -np.mean(L.discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)[0])
    np.testing.assert_allclose(vb, [nll / math.log(2), kl], rtol=1e-5)


def test_prior_term_is_tiny_for_the_paper_schedule():
    d = D.NoiseProcess(BETAS)
    x0 = jnp.ones((1, 4, 4, 3))
    # L_T = KL(N(sqrt(ab_T), 1 - ab_T) || N(0, 1)) in closed form, per dimension.
    ab = np.prod(1 - BETAS)
    ref = 0.5 * (-np.log(1 - ab) + (1 - ab) + ab - 1) / math.log(2)
    np.testing.assert_allclose(L.prior_bpd(d, x0), [ref], rtol=1e-3)


def model_and_data(var, kind="eps"):
    d = D.NoiseProcess(BETAS, kind, var)
    x0 = jax.random.uniform(jax.random.PRNGKey(5), (4, 4, 4, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.PRNGKey(6), x0.shape)
    t = jnp.array([0, 10, 500, 999])
    return d, x0, noise, t


@pytest.mark.parametrize("kind", S.MODEL_OUTPUTS)
def test_mse_loss_is_zero_for_the_true_target(kind):
    d, x0, noise, t = model_and_data("fixed_large", kind)
    target = lambda x_t, tt: D.training_target(d, x0, x_t, tt, noise)
    losses = L.training_losses(d, target, x0, t, noise, "mse")
    np.testing.assert_allclose(losses["loss"], 0.0, atol=1e-10)


def test_hybrid_bound_term_trains_only_the_variance():
    d, x0, noise, t = model_and_data("learned_range")

    def loss(params, part):
        fn = lambda x_t, tt: jnp.concatenate(
            [params["mean"] * x_t, params["var"] * jnp.ones_like(x_t)], -1
        )
        return jnp.sum(L.training_losses(d, fn, x0, t, noise, "hybrid")[part])

    params = {"mean": jnp.float32(0.3), "var": jnp.float32(0.2)}
    g_vb = jax.grad(loss)(params, "vb")
    g_mse = jax.grad(loss)(params, "mse")
    g_all = jax.grad(loss)(params, "loss")
    assert float(g_vb["mean"]) == 0.0 and float(g_vb["var"]) != 0.0
    assert float(g_mse["var"]) == 0.0
    # loss = mse + lambda * T * vb with lambda = 0.001 and T = 1000
    np.testing.assert_allclose(g_all["var"], g_vb["var"], rtol=1e-6)
    np.testing.assert_allclose(g_all["mean"], g_mse["mean"], rtol=1e-6)


def test_hybrid_loss_is_mse_plus_lambda_t_times_the_bound():
    """IDDPM eq. 16 with a lambda whose lambda * T is not 1, so the weight is visible."""
    d, x0, noise, t = model_and_data("learned_range")
    fn = lambda x_t, tt: jnp.concatenate([0.3 * x_t, 0.2 * jnp.ones_like(x_t)], -1)
    terms = L.training_losses(d, fn, x0, t, noise, "hybrid", hybrid_lambda=0.0035)
    assert float(jnp.max(jnp.abs(terms["vb"]))) > 1e-3  # the bound term is not negligible
    expected = terms["mse"] + 0.0035 * d.num_timesteps * terms["vb"]
    np.testing.assert_allclose(terms["loss"], expected, rtol=1e-6)


def test_kl_loss_is_the_bound_term():
    d, x0, noise, t = model_and_data("fixed_large")
    fn = lambda x_t, tt: 0.5 * x_t
    losses = L.training_losses(d, fn, x0, t, noise, "kl")
    x_t = D.q_sample(d, x0, t, noise)
    np.testing.assert_allclose(losses["loss"], L.vb_terms_bpd(d, 0.5 * x_t, x0, x_t, t)[0])


def test_unknown_loss_type():
    d, x0, noise, t = model_and_data("fixed_large")
    with pytest.raises(ValueError, match="loss_type='l1'.*allowed: mse, kl, hybrid"):
        L.training_losses(d, lambda x, t: x, x0, t, noise, "l1")
