"""Samplers: Gaussian data with the known optimal denoiser, structure, and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax import sampling as SM
from diffusion_jax import schedules as S

BETAS = S.get_beta_schedule("linear", 1000)
S2 = 0.25  # data x_0 ~ N(0, S2), elementwise


def optimal_eps(diffusion):
    """For Gaussian data, E[eps | x_t] = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab) in closed form."""
    abar = jnp.asarray(np.cumprod(1 - BETAS), jnp.float32)

    def denoise(x_t, timesteps):
        ab = abar[timesteps].reshape((-1,) + (1,) * (x_t.ndim - 1))
        return jnp.sqrt(1 - ab) * x_t / (ab * S2 + 1 - ab)

    return denoise


def exact_final_variance(use, var_type, method):
    """The samplers are linear-Gaussian here, so the variance of x_0 follows a float64
    recursion: x_{t-1} = a_t x_t + sigma_t z."""
    betas = S.respace_betas(BETAS, use) if use is not None else BETAS
    arr = S.schedule_arrays(betas)
    var = 1.0
    for i in range(len(betas) - 1, -1, -1):
        ab, abp = arr["alphas_cumprod"][i], arr["alphas_cumprod_prev"][i]
        gain = np.sqrt(ab) * S2 / (ab * S2 + 1 - ab)  # x0_hat = gain * x_t
        if method == "ddim":
            eps_gain = (1 / np.sqrt(ab) - gain) / np.sqrt(1 / ab - 1)
            var = (np.sqrt(abp) * gain + np.sqrt(1 - abp) * eps_gain) ** 2 * var
            continue
        a = arr["posterior_mean_coef1"][i] * gain + arr["posterior_mean_coef2"][i]
        if var_type == "fixed_small":
            noise_var = arr["posterior_variance"][i]
        else:
            noise_var = arr["betas"][i]
        var = a**2 * var + (noise_var if i > 0 else 0.0)
    return var


@pytest.mark.parametrize(
    "method, var_type, respacing",
    [
        ("ancestral", "fixed_large", None),
        ("ancestral", "fixed_small", None),
        ("ddim", "fixed_large", None),
        ("ancestral", "fixed_large", "100"),
        ("ddim", "fixed_small", "ddim50"),
    ],
)
def test_gaussian_data_is_reproduced(method, var_type, respacing):
    use = S.space_timesteps(1000, respacing) if respacing else None
    d = S.make_diffusion(BETAS, "eps", var_type, use)
    shape = (2048, 4, 4, 2)  # 65,536 independent scalars
    out = jax.jit(
        lambda k: SM.sample_loop(d, optimal_eps(d), shape, k, method=method, clip_denoised=False)
    )(jax.random.PRNGKey(0))
    x = np.asarray(out["sample"], np.float64).ravel()
    se_var = S2 * np.sqrt(2 / x.size)
    exact = exact_final_variance(use, var_type, method)
    assert abs(x.mean()) < 4 * np.sqrt(S2 / x.size)
    assert abs(x.var() - exact) < 4 * se_var  # the sampler does exactly what the math says
    if respacing is None:  # and the full chain reproduces the data distribution
        assert abs(x.var() - S2) < 0.03 * S2


def test_ddim_eta_zero_is_deterministic_given_x_t():
    d = S.make_diffusion(BETAS, "eps", "fixed_large", S.space_timesteps(1000, "20"))
    x_init = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 1))
    run = lambda k: SM.sample_loop(d, optimal_eps(d), x_init.shape, k, method="ddim", x_init=x_init)
    np.testing.assert_array_equal(
        run(jax.random.PRNGKey(1))["sample"], run(jax.random.PRNGKey(2))["sample"]
    )


def test_single_steps_match_hand_formulas():
    d = S.make_diffusion(BETAS, "eps", "fixed_large")
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (3, 2, 2, 1))
    eps = jax.random.normal(k2, x.shape)
    z = jax.random.normal(k3, x.shape)
    t = jnp.array([0, 300, 999])
    abar = np.cumprod(1 - BETAS)
    ti = np.asarray(t)[:, None, None, None]
    ab, b = abar[ti], BETAS[ti]
    x64, e64, z64 = (np.asarray(a, np.float64) for a in (x, eps, z))
    # Algorithm 2 / eq. 11 without clipping: mu = (x - b / sqrt(1 - ab) eps) / sqrt(1 - b)
    sigma = np.sqrt(np.where(ti == 0, 0.0, b))
    ref = (x64 - b / np.sqrt(1 - ab) * e64) / np.sqrt(1 - b) + sigma * z64
    got, _ = SM.p_sample(d, eps, x, t, z, clip_denoised=False)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # DDIM eta = 0: x_{t-1} = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps
    abp = np.append(1.0, abar[:-1])[ti]
    x0 = (x64 - np.sqrt(1 - ab) * e64) / np.sqrt(ab)
    ref = np.sqrt(abp) * x0 + np.sqrt(1 - abp) * e64
    got, _ = SM.ddim_sample(d, eps, x, t, z, clip_denoised=False)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_progressive_snapshots():
    d = S.make_diffusion(BETAS[:30])
    denoise = lambda x, t: 0.1 * x
    shape, key = (2, 2, 2, 1), jax.random.PRNGKey(0)
    out = SM.sample_loop(d, denoise, shape, key, snapshot_every=10)
    assert out["snapshots"].shape == (3, 2, 2, 2, 1)
    np.testing.assert_array_equal(out["snapshot_timesteps"], [20, 10, 0])
    # Oracle: the chain stepped in a Python loop with the same noise, x0_hat kept at i % 10 == 0.
    init_key, loop_key = jax.random.split(key)
    x, kept = jax.random.normal(init_key, shape), {}
    for i in range(29, -1, -1):
        t = jnp.full((2,), i, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(loop_key, i), shape)
        x, x0_hat = SM.p_sample(d, denoise(x, t), x, t, noise)
        if i % 10 == 0:
            kept[i] = x0_hat
    np.testing.assert_allclose(out["snapshots"], np.stack([kept[20], kept[10], kept[0]]), 1e-5)
    np.testing.assert_allclose(out["sample"], x, rtol=1e-5, atol=1e-6)


def test_interpolation_shares_noise_across_lambdas():
    d = S.make_diffusion(BETAS[:50])
    denoise = lambda x, t: 0.3 * x
    xa = jnp.full((2, 2, 2, 1), -0.5)
    xb = jnp.full((2, 2, 2, 1), 0.5)
    key = jax.random.PRNGKey(0)
    three = SM.interpolate(d, denoise, xa, xb, jnp.array([0.0, 0.5, 1.0]), 25, key)
    two = SM.interpolate(d, denoise, xa, xb, jnp.array([0.0, 1.0]), 25, key)
    assert three.shape == (3, 2, 2, 2, 1)
    np.testing.assert_allclose(three[0], two[0], rtol=1e-6)
    np.testing.assert_allclose(three[2], two[1], rtol=1e-6)
    # a linear denoiser keeps the chain linear, so the midpoint decodes to the mean
    np.testing.assert_allclose(three[1], (three[0] + three[2]) / 2, atol=1e-5)


def test_classifier_free_guidance_combination():
    def model_fn(x, t, y):
        return x + y[:, None, None, None].astype(x.dtype)

    labels = jnp.array([1, 2])
    x = jnp.zeros((2, 1, 1, 1))
    t = jnp.zeros(2, jnp.int32)
    guided = SM.classifier_free_guidance(model_fn, labels, 3.0, null_label=10)(x, t)
    # (1 + w) * cond - w * uncond = 4 y - 3 * 10
    np.testing.assert_allclose(guided[:, 0, 0, 0], [4 * 1 - 30, 4 * 2 - 30])
    off = SM.classifier_free_guidance(model_fn, labels, 0.0, null_label=10)(x, t)
    np.testing.assert_allclose(off[:, 0, 0, 0], [1, 2])


def test_bad_method():
    d = S.make_diffusion(BETAS[:5])
    with pytest.raises(ValueError, match="method='euler'.*ancestral, ddim"):
        SM.sample_loop(d, lambda x, t: x, (1, 1), jax.random.PRNGKey(0), method="euler")


def test_every_sampler_sharded_equals_unsharded(devices):
    mesh = Mesh(np.array(devices), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    d = S.make_diffusion(BETAS, "eps", "fixed_large", S.space_timesteps(1000, "25"))
    shape = (16, 4, 4, 3)
    key = jax.random.PRNGKey(0)
    denoise = lambda x, t: jnp.tanh(x) * (t[:, None, None, None] / 1000.0)

    def labels_model(x, t, y):
        return denoise(x, t) + 0.01 * y[:, None, None, None]

    xa = jax.random.uniform(jax.random.PRNGKey(1), shape, minval=-1, maxval=1)
    xb = -xa
    labels = jnp.arange(16) % 10
    cases = {
        "ancestral": lambda k, xa, xb, y: SM.sample_loop(d, denoise, shape, k, snapshot_every=5),
        "ddim": lambda k, xa, xb, y: SM.sample_loop(d, denoise, shape, k, method="ddim", eta=0.5),
        "interpolate": lambda k, xa, xb, y: SM.interpolate(
            d, denoise, xa, xb, jnp.array([0.0, 0.5]), 12, k
        ),
        "guided": lambda k, xa, xb, y: SM.sample_loop(
            d, SM.classifier_free_guidance(labels_model, y, 2.0, 10), shape, k
        ),
    }
    sharded_args = [jax.device_put(a, batch) for a in (xa, xb, labels)]
    for name, fn in cases.items():
        ref = jax.jit(fn)(key, xa, xb, labels)
        out_shardings = None
        if name != "interpolate":
            out_shardings = jax.tree.map(lambda _: batch, ref)
            if name == "ancestral":
                out_shardings["snapshots"] = NamedSharding(mesh, PartitionSpec(None, "data"))
                out_shardings["snapshot_timesteps"] = NamedSharding(mesh, PartitionSpec())
        got = jax.jit(fn, in_shardings=(None, batch, batch, batch), out_shardings=out_shardings)(
            key, *sharded_args
        )
        for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=name)
