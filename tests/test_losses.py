"""Losses: KL and decoder against closed forms, Monte Carlo and probability axioms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as D
from diffusion_jax import losses as L
from diffusion_jax import schedules as S

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


@pytest.mark.parametrize(
    "mean, log_scale",
    [(0.0, -3.0), (0.9, -1.0), (-1.0, -12.0), (5.0, -8.0), (-7.0, 0.5), (0.2, -15.0)],
)
def test_decoder_probabilities_sum_to_one_and_are_positive(mean, log_scale):
    bins = jnp.arange(256) / 127.5 - 1.0  # every 8-bit value on the [-1, 1] scale
    logp = L.discretized_gaussian_log_likelihood(
        bins, jnp.full(256, mean), jnp.full(256, log_scale)
    )
    p = np.exp(np.asarray(logp, np.float64))
    assert np.all(p > 0)
    # Bin edges telescope; each probability is floored at 1e-12 (at most 256e-12 extra).
    assert abs(p.sum() - 1.0) < 1e-5


def test_decoder_matches_float64_reference():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, 500) / 127.5 - 1.0
    means = rng.uniform(-1.2, 1.2, 500)
    log_scales = rng.uniform(-6, 0, 500)

    def cdf(u):  # the official code's tanh approximation, in float64
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))

    hi = np.where(x > 0.999, np.inf, (x - means + 1 / 255) / np.exp(log_scales))
    lo = np.where(x < -0.999, -np.inf, (x - means - 1 / 255) / np.exp(log_scales))
    ref = np.log(np.maximum(cdf(hi) - cdf(lo), 1e-12))
    got = L.discretized_gaussian_log_likelihood(jnp.asarray(x), means, log_scales)
    # Far in the tails the float32 difference of two CDFs near 1 cancels (as in the official
    # float32 code); compare where the bin probability is representable, > 1e-4.
    ok = ref > math.log(1e-4)
    assert ok.sum() > 100
    np.testing.assert_allclose(np.asarray(got)[ok], ref[ok], rtol=1e-4, atol=1e-4)


def test_true_noise_makes_every_kl_term_zero_under_fixed_small():
    d = S.make_diffusion(BETAS, "eps", "fixed_small")
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
    d = S.make_diffusion(BETAS, "eps", "fixed_large")
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
    d = S.make_diffusion(BETAS)
    x0 = jnp.ones((1, 4, 4, 3))
    # L_T = KL(N(sqrt(ab_T), 1 - ab_T) || N(0, 1)) in closed form, per dimension.
    ab = np.prod(1 - BETAS)
    ref = 0.5 * (-np.log(1 - ab) + (1 - ab) + ab - 1) / math.log(2)
    np.testing.assert_allclose(L.prior_bpd(d, x0), [ref], rtol=1e-3)


def model_and_data(var, kind="eps"):
    d = S.make_diffusion(BETAS, kind, var)
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
