"""The forward process, its posterior and the model's reverse process as pure functions.

Every function takes the immutable `Diffusion` pytree first. `t` is an int32 array [B] of
chain positions (0-based: index i is the paper's t = i + 1). Images are NHWC [B, H, W, C];
any trailing shape works, the schedule coefficients broadcast over all non-batch axes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.schedules import LEARNED_VARIANCE, Diffusion


def extract(arr: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """arr[t] reshaped to [B, 1, ..., 1] with `ndim` axes for broadcasting against x."""
    return arr[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all non-batch axes: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------------------------------------
# Forward process q (DDPM eq. 4, 6, 7)


def q_mean_variance(diffusion: Diffusion, x_start: jax.Array, t: jax.Array):
    """Eq. 4: mean, variance and log variance of q(x_t | x_0)."""
    mean = extract(diffusion.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
    variance = jnp.square(extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_start.ndim))
    log_variance = extract(diffusion.log_one_minus_alphas_cumprod, t, x_start.ndim)
    return mean, variance, log_variance


def q_sample(diffusion: Diffusion, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Eq. 4: x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps."""
    n = x_start.ndim
    return (
        extract(diffusion.sqrt_alphas_cumprod, t, n) * x_start
        + extract(diffusion.sqrt_one_minus_alphas_cumprod, t, n) * noise
    )


def q_posterior_mean_variance(
    diffusion: Diffusion, x_start: jax.Array, x_t: jax.Array, t: jax.Array
):
    """Eq. 6-7: mean mu~_t, variance beta~_t and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    n = x_t.ndim
    mean = (
        extract(diffusion.posterior_mean_coef1, t, n) * x_start
        + extract(diffusion.posterior_mean_coef2, t, n) * x_t
    )
    variance = extract(diffusion.posterior_variance, t, n)
    log_variance = extract(diffusion.posterior_log_variance_clipped, t, n)
    return mean, variance, log_variance


# ---------------------------------------------------------------------------------------------
# Conversions between parameterisations (eq. 11; Salimans & Ho 2022; Luo 2022 eq. 133-151)


def predict_x0_from_eps(diffusion: Diffusion, x_t: jax.Array, t: jax.Array, eps: jax.Array):
    """x0_hat = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t)."""
    n = x_t.ndim
    return (
        extract(diffusion.sqrt_recip_alphas_cumprod, t, n) * x_t
        - extract(diffusion.sqrt_recipm1_alphas_cumprod, t, n) * eps
    )


def predict_eps_from_x0(diffusion: Diffusion, x_t: jax.Array, t: jax.Array, x_start: jax.Array):
    """eps = (x_t / sqrt(alphabar_t) - x0) / sqrt(1 / alphabar_t - 1)."""
    n = x_t.ndim
    return (extract(diffusion.sqrt_recip_alphas_cumprod, t, n) * x_t - x_start) / extract(
        diffusion.sqrt_recipm1_alphas_cumprod, t, n
    )


def predict_x0_from_xprev(diffusion: Diffusion, x_t: jax.Array, t: jax.Array, xprev: jax.Array):
    """Inverts eq. 7's mean: x0 = (mu~ - coef2 x_t) / coef1."""
    n = x_t.ndim
    coef1 = extract(diffusion.posterior_mean_coef1, t, n)
    coef2 = extract(diffusion.posterior_mean_coef2, t, n)
    return xprev / coef1 - coef2 / coef1 * x_t


def v_from_x0_eps(diffusion: Diffusion, x_start: jax.Array, t: jax.Array, eps: jax.Array):
    """v = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x0 (Salimans & Ho 2022)."""
    n = x_start.ndim
    return (
        extract(diffusion.sqrt_alphas_cumprod, t, n) * eps
        - extract(diffusion.sqrt_one_minus_alphas_cumprod, t, n) * x_start
    )


def predict_x0_from_v(diffusion: Diffusion, x_t: jax.Array, t: jax.Array, v: jax.Array):
    """x0 = sqrt(alphabar_t) x_t - sqrt(1 - alphabar_t) v."""
    n = x_t.ndim
    return (
        extract(diffusion.sqrt_alphas_cumprod, t, n) * x_t
        - extract(diffusion.sqrt_one_minus_alphas_cumprod, t, n) * v
    )


def score_from_eps(diffusion: Diffusion, t: jax.Array, eps: jax.Array) -> jax.Array:
    """Tweedie (Luo 2022 eq. 151): grad log q(x_t) = -eps / sqrt(1 - alphabar_t)."""
    return -eps / extract(diffusion.sqrt_one_minus_alphas_cumprod, t, eps.ndim)


def training_target(
    diffusion: Diffusion, x_start: jax.Array, x_t: jax.Array, t: jax.Array, noise: jax.Array
) -> jax.Array:
    """What the network regresses onto in L_simple (eq. 14) for `diffusion.model_output`."""
    kind = diffusion.model_output
    if kind == "eps":
        return noise
    if kind == "x0":
        return x_start
    if kind == "xprev":
        return q_posterior_mean_variance(diffusion, x_start, x_t, t)[0]
    return v_from_x0_eps(diffusion, x_start, t, noise)


# ---------------------------------------------------------------------------------------------
# Reverse process p_theta (eq. 1, 11; IDDPM eq. 15)


class PMeanVariance(NamedTuple):
    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array


def split_model_output(diffusion: Diffusion, model_output: jax.Array, x_t: jax.Array):
    """Splits the network output [B, ..., C or 2C] into (mean part, variance part or None)."""
    c = x_t.shape[-1]
    if diffusion.model_var_type in LEARNED_VARIANCE:
        if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != 2 * c:
            raise ValueError(
                f"model_var_type={diffusion.model_var_type!r} needs a model output of shape "
                f"{x_t.shape[:-1] + (2 * c,)} (2x channels); got {model_output.shape}"
            )
        return model_output[..., :c], model_output[..., c:]
    if model_output.shape != x_t.shape:
        raise ValueError(
            f"model_var_type={diffusion.model_var_type!r} needs a model output of shape "
            f"{x_t.shape}; got {model_output.shape}"
        )
    return model_output, None


def model_log_variance(
    diffusion: Diffusion, var_output: jax.Array | None, t: jax.Array, ndim: int
) -> tuple[jax.Array, jax.Array]:
    """(variance, log variance) of p_theta(x_{t-1} | x_t) for `diffusion.model_var_type`.

    fixed_small: beta~_t. fixed_large: beta_t, with beta~ at t = 1 (official code).
    learned: the output is the log variance. learned_range (IDDPM eq. 15): with v in [-1, 1]
    mapped to [0, 1], log sigma^2 = v log beta_t + (1 - v) log beta~_t.
    """
    kind = diffusion.model_var_type
    if kind == "learned":
        return jnp.exp(var_output), var_output
    if kind == "learned_range":
        min_log = extract(diffusion.posterior_log_variance_clipped, t, ndim)
        max_log = extract(jnp.log(diffusion.betas), t, ndim)
        frac = (var_output + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        return jnp.exp(log_variance), log_variance
    if kind == "fixed_small":
        variance = diffusion.posterior_variance
        log_variance = diffusion.posterior_log_variance_clipped
    else:  # fixed_large
        variance = diffusion.betas
        if diffusion.num_timesteps > 1:
            variance = variance.at[0].set(diffusion.posterior_variance[1])
        log_variance = jnp.log(variance)
    return extract(variance, t, ndim), extract(log_variance, t, ndim)


def p_mean_variance(
    diffusion: Diffusion,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    clip_denoised: bool = True,
) -> PMeanVariance:
    """Mean, variance, log variance of p_theta(x_{t-1} | x_t) and the predicted x0 (eq. 11).

    `model_output` is the network's output at (x_t, t): [B, H, W, C], or [B, H, W, 2C] for
    learned variances. With `clip_denoised`, x0_hat is clipped to [-1, 1] before it enters
    the posterior mean (the sampling-time convention of the official code).
    """
    mean_output, var_output = split_model_output(diffusion, model_output, x_t)
    variance, log_variance = model_log_variance(diffusion, var_output, t, x_t.ndim)
    variance = jnp.broadcast_to(variance, x_t.shape)
    log_variance = jnp.broadcast_to(log_variance, x_t.shape)
    process = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_denoised else (lambda x: x)
    kind = diffusion.model_output
    if kind == "xprev":
        pred_x0 = process(predict_x0_from_xprev(diffusion, x_t, t, mean_output))
        return PMeanVariance(mean_output, variance, log_variance, pred_x0)
    if kind == "eps":
        pred_x0 = predict_x0_from_eps(diffusion, x_t, t, mean_output)
    elif kind == "x0":
        pred_x0 = mean_output
    else:  # v
        pred_x0 = predict_x0_from_v(diffusion, x_t, t, mean_output)
    pred_x0 = process(pred_x0)
    mean, _, _ = q_posterior_mean_variance(diffusion, pred_x0, x_t, t)
    return PMeanVariance(mean, variance, log_variance, pred_x0)
