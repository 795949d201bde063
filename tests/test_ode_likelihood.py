"""Probability-flow ODE likelihood: closed-form Gaussian oracles, Hutchinson within its
standard error, the dequantized bits/dim bookkeeping, sharding invariance."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.diffusion import ode_likelihood as OL
from diffusion_jax.diffusion import schedules as S
from diffusion_jax.diffusion.process import NoiseProcess

N = 1000
BETAS = S.get_beta_schedule("linear", N)
ALPHABAR = np.cumprod(1.0 - BETAS.astype(np.float64))
VP = NoiseProcess(BETAS)
SHAPE = (2, 2, 2)  # NHWC per example, D = 8
D = math.prod(SHAPE)


class GaussianData:
    """Data N(m, Q diag(s^2) Q^T) in D dimensions and its optimal denoiser at every t.

    x_t = alpha x_0 + sigma eps is Gaussian with covariance alpha^2 Sigma + sigma^2 I, so
    E[eps | x_t] = sigma (alpha^2 Sigma + sigma^2 I)^-1 (x_t - alpha m) (Tweedie), and along
    the probability-flow ODE the eigen-coordinates w = Q^T (x_t - alpha_t m) scale as
    v_t = sqrt(alpha_t^2 s^2 + sigma_t^2): the flow from t_min to 1 is affine and the ODE
    likelihood with the N(0, I) prior is closed form (`log_p`).
    """

    def __init__(self, seed: int, rotate: bool):
        rng = np.random.default_rng(seed)
        self.q = np.linalg.qr(rng.normal(size=(D, D)))[0] if rotate else np.eye(D)
        self.s = np.geomspace(0.02, 0.6, D) if rotate else np.full(D, 0.3)
        self.m = rng.uniform(-0.5, 0.5, D)
        self.rng = rng

    def denoise_fn(self, output: str = "eps"):
        q, s, m = (jnp.asarray(a, jnp.float32) for a in (self.q, self.s, self.m))

        def fn(x, timesteps):  # x [B, 2, 2, 2], timesteps [B] = t N - 1
            t = (timesteps[0] + 1.0) / N
            alpha = VP.alpha(t)
            sigma = VP.sigma(t)
            xf = x.reshape(x.shape[0], D)
            eps = sigma * ((xf - alpha * m) @ q / (alpha**2 * s**2 + sigma**2)) @ q.T
            if output == "v":  # v = alpha eps - sigma x0, x0 = (x - sigma eps) / alpha
                eps = alpha * eps - sigma * (xf - sigma * eps) / alpha
            return eps.reshape(x.shape)

        return fn

    def flow(self):
        """(A, c): x(1) = A y + c for the exact ODE flow from t_min; float64."""
        a0, a1 = math.sqrt(ALPHABAR[0]), math.sqrt(ALPHABAR[-1])
        v0 = np.sqrt(a0**2 * self.s**2 + 1 - a0**2)
        v1 = np.sqrt(a1**2 * self.s**2 + 1 - a1**2)
        scale = self.q @ np.diag(v1 / v0) @ self.q.T
        return scale, a1 * self.m - scale @ (a0 * self.m), np.sum(np.log(v1 / v0))

    def log_p(self, y):
        """Exact log p_{t_min}(y) of the ODE model: log N(A y + c; 0, I) + log|det A|."""
        scale, shift, logdet = self.flow()
        x1 = np.asarray(y, np.float64).reshape(-1, D) @ scale.T + shift
        return -0.5 * np.sum(x1**2, 1) - 0.5 * D * math.log(2 * math.pi) + logdet

    def images(self, batch: int) -> np.ndarray:
        """8-bit samples [B, 2, 2, 2] of the data distribution (k / 127.5 - 1 scale)."""
        x = self.m + (self.rng.normal(size=(batch, D)) * self.s) @ self.q.T
        return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8).reshape(batch, *SHAPE)


@pytest.fixture(scope="module")
def rotated():
    data = GaussianData(0, rotate=True)
    y = OL.uniform_dequantize(jax.random.PRNGKey(0), jnp.asarray(data.images(16)))
    return data, y, data.log_p(y)


@pytest.mark.parametrize("output", ["eps", "v"])
def test_exact_divergence_matches_the_closed_form_gaussian(rotated, output):
    """Stiff near t_min (s down to 0.02 against sigma = 0.01); 60 RK4 steps in lambda."""
    data, y, ref = rotated
    fn = jax.jit(
        lambda yy: OL.ode_log_likelihood(
            VP, output, data.denoise_fn(output), yy, None, num_steps=60, divergence="exact"
        )
    )
    out = fn(y)
    assert out["log_p"].shape == (16, 1) and int(out["nfe"]) == 240
    np.testing.assert_allclose(np.asarray(out["log_p"][:, 0], np.float64), ref, rtol=1e-4)
    # The latent is the exact flow's image of y.
    scale, shift, _ = data.flow()
    z = np.asarray(y, np.float64).reshape(16, D) @ scale.T + shift
    np.testing.assert_allclose(np.asarray(out["z"]).reshape(16, D), z, atol=1e-4)


@pytest.mark.parametrize("probe", OL.PROBES)
def test_hutchinson_is_within_three_standard_errors(rotated, probe):
    data, y, ref = rotated
    fn = lambda yy, k, num_probes: OL.ode_log_likelihood(
        VP, "eps", data.denoise_fn(), yy, k, num_steps=40, probe=probe, num_probes=num_probes
    )
    out = jax.jit(lambda yy, k: fn(yy, k, 32))(y, jax.random.PRNGKey(1))
    err = np.asarray(out["log_p"], np.float64) - ref[:, None]  # [16 images, 32 probes]
    # Probes are i.i.d. given the (fixed) images: SE of the mean over all 512 estimates.
    se = err.std(ddof=1) / math.sqrt(err.size)
    # Random (the Jacobian is not diagonal, so not even Rademacher probes are exact), but
    # informative: far smaller than the divergence integral it estimates.
    assert 1e-3 < se < 0.1 * float(jnp.mean(jnp.abs(out["delta_logp"])))
    assert abs(err.mean()) < 3 * se
    # A single probe takes the one-jvp path (K > 1 uses linearize + vmap): same estimator.
    one = jax.jit(lambda yy, k: fn(yy, k, 1))(y, jax.random.PRNGKey(2))
    assert one["log_p"].shape == (16, 1)
    assert abs(float(np.mean(one["log_p"][:, 0] - ref))) < 3 * err.std(ddof=1) / 4


def test_bits_per_dim_bound_the_discrete_likelihood():
    """score_sde's bookkeeping: bpd = -log p_y / (D ln 2) + 7 with y = (k + U) / 128 - 1
    bounds -log2 P(k) / D from above (Jensen), and is nearly tight for a smooth density.

    The ODE model of an axis-aligned Gaussian is the Gaussian N(mu, tau^2) per dimension
    (`GaussianData.flow`), so P(k) = prod_d [Phi((hi - mu) / tau) - Phi((lo - mu) / tau)] over
    the bin [k, k + 1) / 128 - 1. One image, 64 dequantization draws.
    """
    data = GaussianData(3, rotate=False)
    k = np.repeat(data.images(1), 64, axis=0)
    fn = jax.jit(
        lambda kk, key: OL.ode_bpd(
            VP, "eps", data.denoise_fn(), kk, key, num_steps=60, divergence="exact"
        )
    )
    out = fn(jnp.asarray(k), jax.random.PRNGKey(2))
    assert out["bpd"].shape == (64,) and out["bpd_per_probe"].shape == (64, 1)
    y = np.asarray(out["y"], np.float64).reshape(64, D)
    lo = k[0].reshape(D) / 128.0 - 1.0
    assert np.all((y >= lo) & (y < lo + 1 / 128))
    # The same numbers from the parts: bookkeeping of ode_bpd.
    np.testing.assert_allclose(
        out["bpd"], -data.log_p(y) / (D * math.log(2)) + 7.0, rtol=0, atol=2e-5
    )
    scale, shift, _ = data.flow()
    tau, mu = 1.0 / np.diag(scale), -shift / np.diag(scale)
    cdf = lambda u: 0.5 * (1 + np.vectorize(math.erf)((u - mu) / (tau * math.sqrt(2))))
    discrete_bpd = -np.sum(np.log2(cdf(lo + 1 / 128) - cdf(lo))) / D
    bpd = np.asarray(out["bpd"], np.float64)
    se = float(OL.standard_error(out["bpd_per_probe"]))
    np.testing.assert_allclose(se, bpd.std(ddof=1) / 8, rtol=1e-5)
    assert 1e-5 < se < 2e-3
    assert discrete_bpd - 3 * se < bpd.mean() < discrete_bpd + 3 * se + 1e-4


def test_uniform_density_is_eight_bits():
    """A uniform density on [-1, 1)^D (log p_y = -D log 2) is the uniform distribution on
    256 values per dimension: exactly 8 bits/dim."""
    np.testing.assert_allclose(OL.dequantized_bpd(jnp.float32(-D * math.log(2)), D), 8.0)


def test_sharded_batch_gives_the_same_bpd_in_the_same_number_of_steps(devices):
    data = GaussianData(4, rotate=True)
    mesh = Mesh(np.array(devices), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    k = jnp.asarray(data.images(16))
    fn = lambda kk, key: OL.ode_bpd(VP, "eps", data.denoise_fn(), kk, key, num_steps=10)
    key = jax.random.PRNGKey(5)
    ref = jax.jit(fn)(k, key)
    sharded = jax.jit(fn, in_shardings=(batch, None))(jax.device_put(k, batch), key)
    assert sharded["bpd"].sharding.spec == PartitionSpec("data")
    for name in ("bpd", "bpd_per_probe", "log_p", "z", "y"):
        # Equal up to float reassociation of the per-shard programs, propagated over 40 NFE.
        np.testing.assert_allclose(sharded[name], ref[name], rtol=1e-5, atol=1e-5)
    # One fixed-length scan: every shard (and host) runs the same 20 steps, 80 NFE.
    eqns = jax.make_jaxpr(fn)(k, key).jaxpr.eqns
    assert [e.params["length"] for e in eqns if e.primitive.name == "scan"] == [10]
    assert int(sharded["nfe"]) == OL.ode_nfe(10, "rk4") == 40
    assert OL.ode_nfe(20, "heun") == 40


def test_lambda_spacing_beats_t_spacing_at_equal_nfe(rotated):
    """The linear schedule changes fastest near t_min: uniform steps in t are inaccurate
    where uniform steps in lambda are not (the module docstring's choice of variable)."""
    data, y, ref = rotated
    errors = {}
    for spacing in OL.SPACINGS:
        out = jax.jit(
            lambda yy, sp=spacing: OL.ode_log_likelihood(
                VP,
                "eps",
                data.denoise_fn(),
                yy,
                None,
                num_steps=30,
                spacing=sp,
                divergence="exact",
            )
        )(y)
        errors[spacing] = np.max(np.abs(np.asarray(out["log_p"][:, 0]) - ref))
    assert errors["logsnr"] < 2e-3 < 0.1 < errors["uniform"]


def test_bad_options_name_the_field():
    fn = lambda **kw: OL.ode_log_likelihood(
        VP, "eps", lambda x, t: x, jnp.zeros((1, 2)), None, num_steps=2, **kw
    )
    with pytest.raises(ValueError, match="divergence='trace' is not supported; allowed: hutch"):
        fn(divergence="trace")
    with pytest.raises(ValueError, match="solver='rk45'"):
        fn(solver="rk45")
    with pytest.raises(ValueError, match="model_output_type='xprev'"):
        OL.ode_log_likelihood(VP, "xprev", lambda x, t: x, jnp.zeros((1, 2)), None, num_steps=2)
