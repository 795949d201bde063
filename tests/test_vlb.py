"""The full-chain bound: composition of its terms, compiled once, sharded equals unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.diffusion import losses as L
from diffusion_jax.diffusion import process as D
from diffusion_jax.diffusion import schedules as S
from diffusion_jax.diffusion import vlb


def toy_denoiser(x_t, t):
    """A fixed, t-dependent function standing in for a network."""
    return 0.5 * jnp.tanh(x_t) * (t[:, None, None, None] / 1000.0)


def data(batch=8):
    x = jax.random.randint(jax.random.PRNGKey(0), (batch, 4, 4, 3), 0, 256)
    return x / 127.5 - 1.0


def test_total_is_prior_plus_every_term_from_an_independent_loop():
    d = D.NoiseProcess(S.get_beta_schedule("linear", 20), "eps", "fixed_large")
    x0, key = data(), jax.random.PRNGKey(1)
    out = jax.jit(lambda k: vlb.calc_bpd_loop(d, toy_denoiser, x0, k))(key)
    terms, x0_mse, eps_mse = [], [], []
    for i in range(20):  # a plain Python loop over t as the oracle
        t = jnp.full((8,), i, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape)
        x_t = D.q_sample(d, x0, t, noise)
        vb, _ = L.vb_terms_bpd(d, toy_denoiser(x_t, t), x0, x_t, t, True)
        terms.append(vb)
        # x0_hat from eps, clipped to [-1, 1] (clip_denoised), in float64
        ab = np.asarray(d.array("alphas_cumprod"), np.float64)[i]
        eps_hat = np.asarray(toy_denoiser(x_t, t), np.float64)
        x0_hat = np.clip(
            (np.asarray(x_t, np.float64) - np.sqrt(1 - ab) * eps_hat) / np.sqrt(ab), -1, 1
        )
        x0_mse.append(np.mean((x0_hat - np.asarray(x0)) ** 2, axis=(1, 2, 3)))
        eps_from_x0 = (np.asarray(x_t, np.float64) - np.sqrt(ab) * x0_hat) / np.sqrt(1 - ab)
        eps_mse.append(np.mean((eps_from_x0 - np.asarray(noise)) ** 2, axis=(1, 2, 3)))
    terms = np.stack(terms, 1)
    np.testing.assert_allclose(out["vb"], terms, rtol=2e-5, atol=1e-6)
    total = terms.sum(1) + np.asarray(L.prior_bpd(d, x0))
    np.testing.assert_allclose(out["total_bpd"], total, rtol=1e-5)
    np.testing.assert_allclose(out["x0_mse"], np.stack(x0_mse, 1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out["eps_mse"], np.stack(eps_mse, 1), rtol=1e-3, atol=1e-6)
    assert np.all(np.isfinite(out["total_bpd"]))


def test_loop_is_traced_once_whatever_t():
    """The program does not grow with T: the loop over t is one scan, not unrolled."""
    x0 = data(2)

    def size(num_timesteps):
        d = D.NoiseProcess(S.get_beta_schedule("linear", num_timesteps))
        fn = lambda k: vlb.calc_bpd_loop(d, toy_denoiser, x0, k)
        eqns = jax.make_jaxpr(fn)(jax.random.PRNGKey(0)).jaxpr.eqns
        scans = [e for e in eqns if e.primitive.name == "scan"]
        assert [e.params["length"] for e in scans] == [num_timesteps]
        return len(eqns), len(scans[0].params["jaxpr"].jaxpr.eqns)

    assert size(10) == size(1000)


def test_rate_distortion_bookkeeping():
    vb = jnp.array([[5.0, 1.0, 2.0, 3.0]])
    bpd = {"vb": vb, "prior_bpd": jnp.array([0.5]), "x0_mse": jnp.full((1, 4), (2 / 127.5) ** 2)}
    rd = vlb.rate_distortion(bpd)
    # received x_T..x_{i+1}: prior + sum_{s > i, s >= 1} L_s; the decoder L_0 is not rate.
    np.testing.assert_allclose(rd["rate"], [6.5, 5.5, 3.5, 0.5])
    np.testing.assert_allclose(rd["distortion"], 2.0, rtol=1e-6)


def test_sharded_equals_unsharded(devices):
    mesh = Mesh(np.array(devices), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    d = D.NoiseProcess(S.get_beta_schedule("cosine", 50), "eps", "fixed_small")
    x0, key = data(16), jax.random.PRNGKey(3)
    fn = lambda x, k: vlb.calc_bpd_loop(d, toy_denoiser, x, k)
    ref = jax.jit(fn)(x0, key)
    sharded = jax.jit(fn, in_shardings=(batch, None))(jax.device_put(x0, batch), key)
    assert sharded["total_bpd"].sharding.spec == PartitionSpec("data")
    for name in ref:
        np.testing.assert_allclose(sharded[name], ref[name], rtol=1e-6, atol=1e-7)
