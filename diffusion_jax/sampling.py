"""Samplers over any (respaced) chain, compiled as one `lax.scan` over the steps.

Every sampler takes a `denoise_fn(x_t, timesteps) -> model_output`, where `timesteps` [B] are
the ORIGINAL training timesteps (a respaced `Diffusion` maps chain positions to them), and a
PRNG key. Images are NHWC [B, H, W, C]. Nothing here loops over timesteps in Python: the
chain is traced once, whatever its length.

The chain samplers here are 'ancestral' and 'ddim' (`METHODS`). The training-free ODE
solvers (DPM-Solver, DPM-Solver++, Karras' Heun) live in `solvers` and take the same
`DenoiseFn`, fed float32 FRACTIONAL timesteps t N - 1 (`continuous_time.model_timestep`);
`classifier_free_guidance` works for both. `generation.make_sampler` picks one from
`config.sampling.method`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from diffusion_jax import errors
from diffusion_jax.diffusion import extract, p_mean_variance, predict_eps_from_x0, q_sample
from diffusion_jax.schedules import Diffusion

# (x_t [B, ...], timesteps [B] int32 on the chain, float32 for the ODE solvers) -> output
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
NoiseFn = Callable[[jax.Array, tuple[int, ...]], jax.Array]
METHODS = ("ancestral", "ddim")


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32)


def p_sample(
    diffusion: Diffusion,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One ancestral step (Algorithm 2): x_{t-1} = mu_theta + sigma_t z, no noise at t = 1.

    Returns (x_{t-1}, x0_hat)."""
    out = p_mean_variance(diffusion, model_output, x_t, t, clip_denoised)
    return out.mean + _nonzero(t, x_t) * jnp.exp(0.5 * out.log_variance) * noise, out.pred_x0


def _nonzero(t: jax.Array, x: jax.Array) -> jax.Array:
    """1 where t > 0, 0 at the last step (t = 1 in the paper): no noise is added there."""
    return (t != 0).astype(x.dtype).reshape(t.shape + (1,) * (x.ndim - 1))


def ddim_sample(
    diffusion: Diffusion,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    clip_denoised: bool = True,
    eta: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step (Song et al. 2021, eq. 12), deterministic at eta = 0.

    sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev);
    x_{t-1} = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z.
    Returns (x_{t-1}, x0_hat)."""
    out = p_mean_variance(diffusion, model_output, x_t, t, clip_denoised)
    eps = predict_eps_from_x0(diffusion, x_t, t, out.pred_x0)
    n = x_t.ndim
    ab = extract(diffusion.alphas_cumprod, t, n)
    ab_prev = extract(diffusion.alphas_cumprod_prev, t, n)
    sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab)) * jnp.sqrt(1.0 - ab / ab_prev)
    mean = out.pred_x0 * jnp.sqrt(ab_prev) + jnp.sqrt(1.0 - ab_prev - sigma**2) * eps
    return mean + _nonzero(t, x_t) * sigma * noise, out.pred_x0


def sample_loop(
    diffusion: Diffusion,
    denoise_fn: DenoiseFn,
    shape: Sequence[int],
    key: jax.Array,
    *,
    method: str = "ancestral",
    eta: float = 0.0,
    clip_denoised: bool = True,
    x_init: jax.Array | None = None,
    start_index: int | None = None,
    snapshot_every: int = 0,
    noise_fn: NoiseFn = _normal,
) -> dict[str, jax.Array]:
    """Runs the reverse chain from x_T ~ N(0, I) (or `x_init` at chain position `start_index`)
    down to x_0 with ancestral sampling (Algorithm 2) or DDIM, over `diffusion`'s chain (full
    or respaced). `shape` is [B, H, W, C].

    With `snapshot_every = k`, also returns 'snapshots' [S, B, H, W, C]: x0_hat at every chain
    position i with i % k == 0, ordered from the noisiest to the last step (DDPM Fig. 6), and
    'snapshot_timesteps' [S]. Per-step noise is `noise_fn(fold_in(key, i), shape)`.
    """
    if method not in METHODS:
        raise errors.ConfigError(f"sampling.method={method!r}; allowed: {', '.join(METHODS)}")
    shape = tuple(shape)
    start = diffusion.num_timesteps - 1 if start_index is None else int(start_index)
    if not 0 <= start < diffusion.num_timesteps:
        raise errors.ConfigError(
            f"start_index={start} outside the chain [0, {diffusion.num_timesteps - 1}]"
        )
    init_key, loop_key = jax.random.split(key)
    x = noise_fn(init_key, shape) if x_init is None else x_init
    if x.shape != shape:
        raise ValueError(f"x_init has shape {x.shape}; expected {shape}")
    num_snapshots = start // snapshot_every + 1 if snapshot_every else 0
    # One scratch slot at the end receives the steps that are not snapshotted.
    snaps = jnp.zeros((num_snapshots + 1,) + shape, x.dtype) if snapshot_every else None

    def step(carry, i):
        x, snaps = carry
        t = jnp.full(shape[:1], i, jnp.int32)
        output = denoise_fn(x, diffusion.timesteps[t])
        noise = noise_fn(jax.random.fold_in(loop_key, i), shape)
        if method == "ancestral":
            x, pred_x0 = p_sample(diffusion, output, x, t, noise, clip_denoised)
        else:
            x, pred_x0 = ddim_sample(diffusion, output, x, t, noise, clip_denoised, eta)
        if snapshot_every:
            slot = jnp.where(i % snapshot_every == 0, i // snapshot_every, num_snapshots)
            snaps = jax.lax.dynamic_update_index_in_dim(snaps, pred_x0, slot, 0)
        return (x, snaps), None

    (x, snaps), _ = jax.lax.scan(step, (x, snaps), jnp.arange(start, -1, -1))
    result = {"sample": x}
    if snapshot_every:
        positions = jnp.arange(num_snapshots - 1, -1, -1) * snapshot_every
        result["snapshots"] = jnp.flip(snaps[:num_snapshots], 0)
        result["snapshot_timesteps"] = diffusion.timesteps[positions]
    return result


def interpolate(
    diffusion: Diffusion,
    denoise_fn: DenoiseFn,
    x_a: jax.Array,
    x_b: jax.Array,
    lambdas: jax.Array,
    t_index: int,
    key: jax.Array,
    clip_denoised: bool = True,
) -> jax.Array:
    """DDPM §4.4: encode x_a, x_b [B, H, W, C] with q to chain position t, mix
    (1 - lam) x_t + lam x_t' for each lam in `lambdas` [L], and decode with the reverse process.
    The encoding and decoding noise is shared across lambdas. Returns [L, B, H, W, C]."""
    if x_a.shape != x_b.shape:
        raise ValueError(f"interpolate: x_a {x_a.shape} and x_b {x_b.shape} differ in shape")
    key_a, key_b, key_loop = jax.random.split(key, 3)
    t = jnp.full(x_a.shape[:1], t_index, jnp.int32)
    xt_a = q_sample(diffusion, x_a, t, jax.random.normal(key_a, x_a.shape))
    xt_b = q_sample(diffusion, x_b, t, jax.random.normal(key_b, x_b.shape))
    lam = jnp.asarray(lambdas, jnp.float32).reshape((-1,) + (1,) * x_a.ndim)
    num = lam.shape[0]
    mixed = ((1.0 - lam) * xt_a + lam * xt_b).reshape((-1,) + x_a.shape[1:])

    def shared_noise(k, shape):
        return jnp.tile(jax.random.normal(k, x_a.shape), (num,) + (1,) * (x_a.ndim - 1))

    out = sample_loop(
        diffusion,
        denoise_fn,
        mixed.shape,
        key_loop,
        clip_denoised=clip_denoised,
        x_init=mixed,
        start_index=t_index,
        noise_fn=shared_noise,
    )
    return out["sample"].reshape((num,) + x_a.shape)


def classifier_free_guidance(
    model_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    labels: jax.Array,
    guidance_scale: float,
    null_label: int,
) -> DenoiseFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a `DenoiseFn`.

    `model_fn(x, t, y)` is the class-conditional network; the guided mean output is
    (1 + w) * out(x, t, y) - w * out(x, t, null). Learned-variance channels (beyond x's C)
    are taken from the conditional output. Both passes run as one batch of 2B.
    """

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        null = jnp.full_like(labels, null_label)
        both = model_fn(
            jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null])
        )
        cond, uncond = jnp.split(both, 2)
        c = x.shape[-1]
        guided = (1.0 + guidance_scale) * cond[..., :c] - guidance_scale * uncond[..., :c]
        return jnp.concatenate([guided, cond[..., c:]], axis=-1)

    return denoise
