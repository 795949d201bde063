"""Forward process, posterior, parameterisations and p_mean_variance against float64 oracles."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import process as D
from diffusion_jax.diffusion import schedules as S

T = 1000
BETAS = S.get_beta_schedule("linear", T)


def make(model_output="eps", var="fixed_large", betas=BETAS):
    return D.NoiseProcess(betas, model_output, var)


def data(key=0, shape=(6, 4, 4, 3)):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
    x0 = jax.random.uniform(k1, shape, minval=-1, maxval=1)
    noise = jax.random.normal(k2, shape)
    t = jax.random.randint(k3, shape[:1], 0, T)
    return x0, noise, t


def test_closed_form_marginal_equals_composed_one_step_transitions():
    """q(x_t | x_0) (eq. 4) equals t compositions of q(x_s | x_{s-1}) = N(sqrt(1-b) x, b)."""
    d = make()
    mean_coef, var = 1.0, 0.0
    coefs, variances = [], []
    for b in BETAS:  # float64: x_s = sqrt(1 - b) x_{s-1} + sqrt(b) z
        mean_coef *= np.sqrt(1 - b)
        var = (1 - b) * var + b
        coefs.append(mean_coef)
        variances.append(var)
    x0 = jnp.ones((T, 1))
    t = jnp.arange(T)
    mean, variance, log_variance = D.q_mean_variance(d, x0, t)
    np.testing.assert_allclose(mean[:, 0], coefs, rtol=2e-6)
    np.testing.assert_allclose(variance[:, 0], variances, rtol=5e-5)
    np.testing.assert_allclose(log_variance[:, 0], np.log(variances), rtol=2e-6)
    sample = D.q_sample(d, x0, t, 2.0 * x0)
    np.testing.assert_allclose(sample[:, 0], np.array(coefs) + 2 * np.sqrt(variances), rtol=1e-5)


def test_posterior_is_bayes_rule():
    """Eq. 6-7 from q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), in float64."""
    d = make()
    x0, x_t, t = (np.float64(0.3), np.float64(-0.7), np.arange(1, T))
    abar = np.cumprod(1 - BETAS)
    b, prev = BETAS[t], abar[t - 1]
    precision = (1 - b) / b + 1 / (1 - prev)
    mean = (np.sqrt(1 - b) * x_t / b + np.sqrt(prev) * x0 / (1 - prev)) / precision
    got_mean, got_var, got_logvar = D.q_posterior_mean_variance(
        d, jnp.full((T - 1, 1), 0.3), jnp.full((T - 1, 1), -0.7), jnp.asarray(t)
    )
    np.testing.assert_allclose(got_mean[:, 0], mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_var[:, 0], 1 / precision, rtol=2e-6)
    np.testing.assert_allclose(got_logvar[:, 0], np.log(1 / precision), rtol=2e-6)


def test_parameterisation_conversions_round_trip():
    d = make()
    x0, noise, t = data()
    x_t = D.q_sample(d, x0, t, noise)
    close = dict(rtol=1e-4, atol=2e-4)
    alpha = d.at("sqrt_alphas_cumprod", t, x0.ndim)
    sigma = d.at("sqrt_one_minus_alphas_cumprod", t, x0.ndim)
    np.testing.assert_allclose(D.eps_and_x0("eps", noise, x_t, alpha, sigma)[1], x0, **close)
    np.testing.assert_allclose(D.eps_and_x0("x0", x0, x_t, alpha, sigma)[0], noise, **close)
    v = D.training_target(make("v"), x0, x_t, t, noise)
    np.testing.assert_allclose(D.eps_and_x0("v", v, x_t, alpha, sigma)[1], x0, **close)
    ab = d.arrays["alphas_cumprod"][np.asarray(t)].reshape((-1,) + (1,) * (x0.ndim - 1))
    eps_from_v = np.sqrt(1 - ab) * np.asarray(x_t) + np.sqrt(ab) * np.asarray(v)  # v's definition
    np.testing.assert_allclose(eps_from_v, noise, **close)
    mu, _, _ = D.q_posterior_mean_variance(d, x0, x_t, t)
    coefs = {f"coef{i}": d.at(f"posterior_mean_coef{i}", t, x0.ndim) for i in (1, 2)}
    x0_from_xprev = D.eps_and_x0("xprev", mu, x_t, alpha, sigma, **coefs)[1]
    np.testing.assert_allclose(x0_from_xprev, x0, rtol=1e-3, atol=2e-3)
    score = D.score_from_eps(d, t, noise)  # Tweedie: -eps / sqrt(1 - alphabar_t)
    np.testing.assert_allclose(-np.sqrt(1 - ab) * np.asarray(score), noise, rtol=1e-5)


def test_score_is_gradient_of_log_marginal_for_gaussian_data():
    """Tweedie/LUO: for x_0 ~ N(0, s^2), q(x_t) = N(0, ab s^2 + 1 - ab), so the score is
    -x_t / (ab s^2 + 1 - ab); the optimal eps is -sqrt(1 - ab) times it."""
    d = make()
    s2 = 0.3
    t = jnp.array([0, 10, 500, 999])
    x_t = jnp.array([0.5, -1.0, 2.0, 0.1])
    abar = np.cumprod(1 - BETAS)[np.asarray(t)]
    true_score = -np.asarray(x_t) / (abar * s2 + 1 - abar)
    eps = -np.sqrt(1 - abar) * true_score
    np.testing.assert_allclose(D.score_from_eps(d, t, jnp.asarray(eps)), true_score, rtol=1e-5)


def true_output(d, kind, x0, noise, x_t, t):
    return {
        "eps": noise,
        "x0": x0,
        "xprev": D.q_posterior_mean_variance(d, x0, x_t, t)[0],
        "v": D.training_target(make("v"), x0, x_t, t, noise),
    }[kind]


@pytest.mark.parametrize("kind", S.MODEL_OUTPUTS)
def test_true_model_output_gives_posterior_mean(kind):
    d = make(kind, "fixed_small")
    x0, noise, t = data(1)
    x_t = D.q_sample(d, x0, t, noise)
    out = D.p_mean_variance(d, true_output(d, kind, x0, noise, x_t, t), x_t, t, clip_denoised=False)
    mu, _, _ = D.q_posterior_mean_variance(d, x0, x_t, t)
    np.testing.assert_allclose(out.mean, mu, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.pred_x0, x0, rtol=1e-3, atol=2e-3)
    assert out.mean.shape == out.variance.shape == out.log_variance.shape == x0.shape


@pytest.mark.parametrize("var", S.MODEL_VAR_TYPES)
def test_variance_types_match_float64(var):
    d = make("eps", var)
    x0, noise, t = data(2)
    t = t.at[0].set(0)  # include t = 1 (index 0), where fixed_large differs from beta_1
    x_t = D.q_sample(d, x0, t, noise)
    raw = jax.random.uniform(jax.random.PRNGKey(3), x0.shape, minval=-1, maxval=1)
    output = jnp.concatenate([noise, raw], -1) if var in S.LEARNED_VARIANCE else noise
    out = D.p_mean_variance(d, output, x_t, t)
    arr = S.schedule_arrays(BETAS)
    tt = np.asarray(t)[:, None, None, None]
    if var == "fixed_small":  # the variance is beta~ itself (0 at t = 1), its log is clipped
        ref = np.broadcast_to(arr["posterior_log_variance_clipped"][tt], x0.shape)
        np.testing.assert_allclose(
            out.variance, np.broadcast_to(arr["posterior_variance"][tt], x0.shape), rtol=2e-6
        )
    elif var == "fixed_large":
        ref = np.log(np.append(arr["posterior_variance"][1], BETAS[1:]))[tt]
        ref = np.broadcast_to(ref, x0.shape)
    elif var == "learned":
        ref = np.asarray(raw, np.float64)
    else:
        frac = (np.asarray(raw, np.float64) + 1) / 2
        ref = frac * np.log(BETAS)[tt] + (1 - frac) * arr["posterior_log_variance_clipped"][tt]
    np.testing.assert_allclose(out.log_variance, ref, rtol=2e-6, atol=1e-6)
    if var != "fixed_small":
        np.testing.assert_allclose(out.variance, np.exp(ref), rtol=2e-5)


def test_clipping_limits_pred_x0():
    d = make()
    x_t = jnp.full((2, 2, 2, 1), 3.0)
    t = jnp.array([999, 5])
    out = D.p_mean_variance(d, jnp.zeros_like(x_t), x_t, t, clip_denoised=True)
    assert float(jnp.max(jnp.abs(out.pred_x0))) <= 1.0
    unclipped = D.p_mean_variance(d, jnp.zeros_like(x_t), x_t, t, clip_denoised=False)
    assert float(jnp.max(unclipped.pred_x0)) > 1.0


@pytest.mark.parametrize("kind, var", itertools.product(["eps", "v"], S.LEARNED_VARIANCE))
def test_learned_variance_needs_double_channels(kind, var):
    d = make(kind, var)
    x = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 6\).*got \(2, 4, 4, 3\)"):
        D.p_mean_variance(d, x, x, jnp.zeros(2, jnp.int32))


def test_fixed_variance_rejects_mismatched_shape():
    d = make()
    x = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match="fixed_large.*got"):
        D.p_mean_variance(d, jnp.zeros((2, 4, 4, 1)), x, jnp.zeros(2, jnp.int32))
