"""Chain samplers and the run: Gaussian data with the known optimal denoiser, single steps by
hand, snapshots, interpolation, guidance, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import draw, sampler_config
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.diffusion import grids
from diffusion_jax.diffusion import schedules as S
from diffusion_jax.diffusion.process import NoiseProcess
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.sampling import registry, run, steppers

BETAS = S.get_beta_schedule("linear", 1000)
S2 = 0.25  # data x_0 ~ N(0, S2), elementwise
ABAR = jnp.asarray(np.cumprod(1 - BETAS), jnp.float32)


def optimal_eps(x_t, timesteps):
    """For Gaussian data, E[eps | x_t] = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab) in closed form;
    chain samplers feed integer timesteps (as float32)."""
    ab = ABAR[jnp.round(timesteps).astype(jnp.int32)].reshape((-1,) + (1,) * (x_t.ndim - 1))
    return jnp.sqrt(1 - ab) * x_t / (ab * S2 + 1 - ab)


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
        ("ancestral", "fixed_large", ""),
        ("ancestral", "fixed_small", ""),
        ("ddim", "fixed_large", ""),
        ("ancestral", "fixed_large", "100"),
        ("ddim", "fixed_small", "ddim50"),
    ],
)
def test_gaussian_data_is_reproduced(method, var_type, respacing):
    config = sampler_config(method=method, respacing=respacing)
    config.diffusion.model_var_type = var_type
    out = draw(config, optimal_eps, shape=(2048, 4, 4, 2), key=jax.random.PRNGKey(0))
    x = np.asarray(out["sample"], np.float64).ravel()  # 65,536 independent scalars
    se_var = S2 * np.sqrt(2 / x.size)
    use = grids.respacing_timesteps(1000, respacing) if respacing else None
    exact = exact_final_variance(use, var_type, method)
    assert abs(x.mean()) < 4 * np.sqrt(S2 / x.size)
    assert abs(x.var() - exact) < 4 * se_var  # the sampler does exactly what the math says
    if not respacing:  # and the full chain reproduces the data distribution
        assert abs(x.var() - S2) < 0.03 * S2


def test_ddim_eta_zero_is_deterministic_given_x_t():
    x_init = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 1))
    config = sampler_config(method="ddim", respacing="20")
    sample = lambda k: draw(config, optimal_eps, x_init, key=k)["sample"]
    np.testing.assert_array_equal(sample(jax.random.PRNGKey(1)), sample(jax.random.PRNGKey(2)))


def _first_row(stepper):
    return {k: v[0] for k, v in run.device_rows(stepper.rows).items()}


@pytest.mark.parametrize("t", [1, 300, 999])
def test_single_steps_match_hand_formulas(t):
    """The first row of the chain keeping (t - 1, t) is the full chain's step t -> t - 1."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (3, 2, 2, 1))
    eps = jax.random.normal(k2, x.shape)
    z = jax.random.normal(k3, x.shape)
    predict = run.make_predict(lambda x_t, steps: eps, "eps", clip_denoised=False)
    abar = np.cumprod(1 - BETAS)
    ab, abp, b = abar[t], abar[t - 1], BETAS[t]
    x64, e64, z64 = (np.asarray(a, np.float64) for a in (x, eps, z))
    sched = NoiseProcess(BETAS)
    # Algorithm 2 / eq. 11 without clipping: mu = (x - b / sqrt(1 - ab) eps) / sqrt(1 - b)
    ancestral = steppers.ancestral(sched, [t - 1, t])
    got, _ = ancestral.step(x, _first_row(ancestral), predict, z)
    ref = (x64 - b / np.sqrt(1 - ab) * e64) / np.sqrt(1 - b) + np.sqrt(b) * z64
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # DDIM eta = 0: x_{t-1} = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps
    ddim = registry.build(sampler_config(method="ddim"))
    row = {k: v[999 - t] for k, v in run.device_rows(ddim.rows).items()}
    (got, *_), _ = ddim.step(ddim.init(x), row, predict, z)
    x0 = (x64 - np.sqrt(1 - ab) * e64) / np.sqrt(ab)
    np.testing.assert_allclose(
        got, np.sqrt(abp) * x0 + np.sqrt(1 - abp) * e64, rtol=1e-4, atol=1e-5
    )


def test_progressive_snapshots():
    config = sampler_config(num_timesteps=30)
    denoise = lambda x, t: 0.1 * x
    shape, key = (2, 2, 2, 1), jax.random.PRNGKey(0)
    out = draw(config, denoise, shape=shape, key=key, clip=True, snapshot_every=10)
    assert out["snapshots"].shape == (3, 2, 2, 2, 1)
    np.testing.assert_array_equal(out["snapshot_timesteps"], [20, 10, 0])
    # Oracle: the chain stepped in float64 NumPy with the same noise, x0_hat kept at i % 10.
    arr = S.schedule_arrays(S.get_beta_schedule("linear", 30))
    init_key, loop_key = jax.random.split(key)
    x, kept = np.asarray(jax.random.normal(init_key, shape), np.float64), {}
    for i in range(29, -1, -1):
        noise = np.asarray(jax.random.normal(jax.random.fold_in(loop_key, i), shape))
        ab = arr["alphas_cumprod"][i]
        x0 = np.clip((x - np.sqrt(1 - ab) * 0.1 * x) / np.sqrt(ab), -1, 1)
        mean = arr["posterior_mean_coef1"][i] * x0 + arr["posterior_mean_coef2"][i] * x
        var = arr["betas"][i] if i else 0.0
        x = mean + np.sqrt(var) * noise
        if i % 10 == 0:
            kept[i] = x0
    np.testing.assert_allclose(out["snapshots"], np.stack([kept[20], kept[10], kept[0]]), 1e-5)
    np.testing.assert_allclose(out["sample"], x, rtol=1e-5, atol=1e-6)


def test_interpolation_shares_noise_across_lambdas():
    sched = NoiseProcess(BETAS[:50])
    predict = run.make_predict(lambda x, t: 0.3 * x, "eps", clip_denoised=True)
    xa = jnp.full((2, 2, 2, 1), -0.5)
    xb = jnp.full((2, 2, 2, 1), 0.5)
    key = jax.random.PRNGKey(0)
    three = run.interpolate(sched, predict, xa, xb, jnp.array([0.0, 0.5, 1.0]), 25, key)
    two = run.interpolate(sched, predict, xa, xb, jnp.array([0.0, 1.0]), 25, key)
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
    t = jnp.zeros(2, jnp.float32)
    guided = run.classifier_free_guidance(model_fn, labels, 3.0, null_label=10)(x, t)
    # (1 + w) * cond - w * uncond = 4 y - 3 * 10
    np.testing.assert_allclose(guided[:, 0, 0, 0], [4 * 1 - 30, 4 * 2 - 30])
    off = run.classifier_free_guidance(model_fn, labels, 0.0, null_label=10)(x, t)
    np.testing.assert_allclose(off[:, 0, 0, 0], [1, 2])


def test_bad_method():
    with pytest.raises(ConfigError, match="method='euler'.*ancestral, ddim"):
        registry.build(sampler_config(method="euler"))


def test_every_sampler_sharded_equals_unsharded(devices):
    mesh = Mesh(np.array(devices), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    sched = NoiseProcess(BETAS)
    shape = (16, 4, 4, 3)
    key = jax.random.PRNGKey(0)
    denoise = lambda x, t: jnp.tanh(x) * (t[:, None, None, None] / 1000.0)

    def labels_model(x, t, y):
        return denoise(x, t) + 0.01 * y[:, None, None, None]

    def chain(method, denoise, **options):
        stepper = registry.build(sampler_config(method=method, respacing="25", **options))
        predict = run.make_predict(denoise, "eps", clip_denoised=True)
        return lambda k, **kw: run.sample(stepper, predict, shape, k, **kw)

    xa = jax.random.uniform(jax.random.PRNGKey(1), shape, minval=-1, maxval=1)
    xb = -xa
    labels = jnp.arange(16) % 10
    predict = run.make_predict(denoise, "eps", clip_denoised=True)
    cases = {
        "ancestral": lambda k, xa, xb, y: chain("ancestral", denoise)(k, snapshot_every=5),
        "ddim": lambda k, xa, xb, y: chain("ddim", denoise, eta=0.5)(k),
        "interpolate": lambda k, xa, xb, y: run.interpolate(
            sched, predict, xa, xb, jnp.array([0.0, 0.5]), 12, k
        ),
        "guided": lambda k, xa, xb, y: chain(
            "ancestral", run.classifier_free_guidance(labels_model, y, 2.0, 10)
        )(k),
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
