"""IDDPM importance sampler: probabilities, history semantics, and use inside jit."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import timestep_sampler as TS


def filled_history(num_t=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    history = rng.uniform(0.1, 2.0, (num_t, k)).astype(np.float32)
    state = TS.LossHistory(
        history=jnp.asarray(history),
        counts=jnp.full((num_t,), k, jnp.int32),
        position=jnp.zeros((num_t,), jnp.int32),
    )
    return state, history


def test_probabilities_are_normalised_root_mean_square():
    state, history = filled_history()
    rms = np.sqrt((history.astype(np.float64) ** 2).mean(axis=1))
    np.testing.assert_allclose(
        TS.loss_aware_probs(state, uniform_prob=0.0), rms / rms.sum(), rtol=1e-6
    )
    mixed = 0.999 * rms / rms.sum() + 0.001 / 5
    np.testing.assert_allclose(TS.loss_aware_probs(state), mixed, rtol=1e-6)


def test_uniform_until_every_timestep_has_k_values():
    state, _ = filled_history()
    state = state.replace(counts=state.counts.at[2].set(2))
    np.testing.assert_allclose(TS.loss_aware_probs(state), np.full(5, 0.2), rtol=1e-6)


def test_update_equals_appending_one_example_at_a_time():
    num_t, k = 4, 3
    rng = np.random.default_rng(1)
    state = TS.init_loss_history(num_t, k)
    reference = [[] for _ in range(num_t)]
    for _ in range(6):
        t = rng.integers(0, num_t, 9)  # many repeats, some beyond k in one batch
        losses = rng.uniform(0, 1, 9).astype(np.float32)
        state = jax.jit(TS.update_loss_history)(
            state, jnp.asarray(t, jnp.int32), jnp.asarray(losses)
        )
        for ti, li in zip(t, losses, strict=True):
            reference[ti] = (reference[ti] + [li])[-k:]
        for ti in range(num_t):
            n = int(state.counts[ti])
            assert n == len(reference[ti])
            stored = np.asarray(state.history[ti])
            # ring buffer: the same multiset of the last k values
            if n == k:
                np.testing.assert_allclose(np.sort(stored), np.sort(reference[ti]))
            else:
                np.testing.assert_allclose(np.sort(stored[:n]), np.sort(reference[ti]))


def test_sampling_frequencies_and_weights():
    state, history = filled_history(num_t=4, k=10, seed=2)
    t, w = TS.sample_timesteps(jax.random.PRNGKey(0), 200_000, 4, state)
    p = np.asarray(TS.loss_aware_probs(state))
    freq = np.bincount(np.asarray(t), minlength=4) / t.size
    np.testing.assert_allclose(freq, p, atol=5e-3)
    np.testing.assert_allclose(w, 1.0 / (4 * p[np.asarray(t)]), rtol=1e-6)
    # importance weights keep the estimator unbiased: E_p[w f(t)] = mean_t f(t)
    f = np.arange(4.0)
    np.testing.assert_allclose(np.mean(np.asarray(w) * f[np.asarray(t)]), f.mean(), rtol=2e-2)


def test_uniform_sampler():
    n, num_t = 200_000, 10
    t, w = TS.sample_timesteps(jax.random.PRNGKey(1), n, num_t)
    assert t.dtype == jnp.int32 and int(t.min()) >= 0 and int(t.max()) < num_t
    np.testing.assert_array_equal(w, 1.0)
    # Each timestep's count is Binomial(n, 1/T): within 5 standard deviations of n/T.
    counts = np.bincount(np.asarray(t), minlength=num_t)
    sd = np.sqrt(n * (1 / num_t) * (1 - 1 / num_t))
    assert np.all(np.abs(counts - n / num_t) < 5 * sd), counts
    # Consecutive draws are independent: the pair (t_i, t_{i+1}) is uniform over T^2 cells.
    pairs = np.bincount(np.asarray(t[:-1]) * num_t + np.asarray(t[1:]), minlength=num_t**2)
    chi2 = np.sum((pairs - (n - 1) / num_t**2) ** 2 / ((n - 1) / num_t**2))
    assert chi2 < num_t**2 + 6 * np.sqrt(2 * num_t**2), chi2
