"""Losses: L_simple (DDPM eq. 14), the variational bound terms (eq. 5, 13) and L_hybrid (IDDPM).

All values are per example ([B]) so that timestep samplers can use them; bound terms are in
bits per dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion.process import (
    NoiseProcess,
    PMeanVariance,
    p_mean_variance,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    training_target,
)
from diffusion_jax.diffusion.schedules import LEARNED_VARIANCE
from diffusion_jax.runtime import errors

LOSS_TYPES = ("mse", "kl", "hybrid")
LOG2 = math.log(2.0)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B, ...], t [B]) -> output


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all non-batch axes: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats (closed form)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


_TANH_C = math.sqrt(2.0 / math.pi)  # Phi(z) ~ 0.5 (1 + tanh(c (z + 0.044715 z^3)))
_TANH_K = 0.044715
LOG_PROB_FLOOR = math.log(1e-12)  # the official code floors bin probabilities at 1e-12


def _approx_cdf_logit(z: jax.Array) -> jax.Array:
    """2 c (z + 0.044715 z^3): since 0.5 (1 + tanh(y)) = sigmoid(2 y) exactly, the official
    tanh approximation of Phi(z) is sigmoid of this (odd in z, so 1 - Phi(z) = Phi(-z))."""
    return 2.0 * _TANH_C * z * (1.0 + _TANH_K * jnp.square(z))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of the standard normal CDF used by the official DDPM code,
    0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), evaluated as the equal sigmoid(2 y)."""
    return jax.nn.sigmoid(_approx_cdf_logit(x))


def approx_standard_normal_log_cdf(x: jax.Array) -> jax.Array:
    """log of `approx_standard_normal_cdf`, accurate in both tails (log sigmoid)."""
    return jax.nn.log_sigmoid(_approx_cdf_logit(x))


def discretized_gaussian_log_likelihood(
    x: jax.Array, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
    """Eq. 13: log-probability of x's 8-bit bin under N(means, e^(2 log_scales)), elementwise.

    x holds data in {0..255} scaled to [-1, 1]; bins have width 2/255 around each value, the
    outermost bins extend to -inf and +inf. Probabilities are floored at 1e-12. The CDF is the
    official tanh approximation Phi~(z) = sigmoid(u(z)), u = 2 c (z + 0.044715 z^3), but the
    bin probability is evaluated without cancellation: for bin edges a < b (in units of the
    scale) and u_b = u(b), u_a = u(a),
        sigmoid(u_b) - sigmoid(u_a) = sigmoid(u_b) sigmoid(-u_a) (1 - exp(-(u_b - u_a))),
    so log P = log_sigmoid(u_b) + log_sigmoid(-u_a) + log(-expm1(-(u_b - u_a))), with
    u_b - u_a = 2 c (b - a) (1 + 0.044715 (a^2 + a b + b^2)) and b - a = (2/255) / scale taken
    directly, not as a difference. Each factor is accurate to float32 relative precision in
    either tail (this is the symmetric CDF(b) - CDF(a) = CDF(-a) - CDF(-b) folded into one
    formula). Edge bins: log Phi~(b) at x = -1 and log(1 - Phi~(a)) = log Phi~(-a) at x = 1.
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)  # b, the upper bin edge in units of scale
    min_in = inv_stdv * (centered - 1.0 / 255.0)  # a, the lower bin edge
    u_plus = _approx_cdf_logit(plus_in)
    u_min = _approx_cdf_logit(min_in)
    log_cdf_plus = jax.nn.log_sigmoid(u_plus)  # log Phi~(b)
    log_one_minus_cdf_min = jax.nn.log_sigmoid(-u_min)  # log (1 - Phi~(a))
    width = inv_stdv * (2.0 / 255.0)  # b - a, without cancellation
    u_gap = (
        2.0
        * _TANH_C
        * width
        * (1.0 + _TANH_K * (jnp.square(plus_in) + plus_in * min_in + jnp.square(min_in)))
    )
    log_cdf_delta = log_cdf_plus + log_one_minus_cdf_min + jnp.log(-jnp.expm1(-u_gap))
    log_probs = jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )
    # log(max(P, 1e-12)) of the reference, without ever forming P.
    return jnp.maximum(log_probs, LOG_PROB_FLOOR)


def prior_bpd(diffusion: NoiseProcess, x_start: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, [B]."""
    t = jnp.full(x_start.shape[:1], diffusion.num_timesteps - 1, jnp.int32)
    mean, _, log_variance = q_mean_variance(diffusion, x_start, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / LOG2


def vb_terms_bpd(
    diffusion: NoiseProcess,
    model_output: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    clip_denoised: bool = False,
) -> tuple[jax.Array, PMeanVariance]:
    """One term of the bound (eq. 5) in bits/dim, [B]: L_{t-1} for t > 1, L_0 at t = 1.

    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)); L_0 = -log p_theta(x_0 | x_1)
    under the discretized Gaussian decoder (eq. 13). Also returns p_theta's `PMeanVariance`
    (with x0_hat and eps_hat).
    """
    true_mean, _, true_log_variance = q_posterior_mean_variance(diffusion, x_start, x_t, t)
    out = p_mean_variance(diffusion, model_output, x_t, t, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / LOG2
    decoder_nll = (
        -mean_flat(discretized_gaussian_log_likelihood(x_start, out.mean, 0.5 * out.log_variance))
        / LOG2
    )
    return jnp.where(t == 0, decoder_nll, kl), out


def training_losses(
    diffusion: NoiseProcess,
    model_fn: ModelFn,
    x_start: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    loss_type: str = "mse",
    hybrid_lambda: float = 0.001,
) -> dict[str, jax.Array]:
    """Per-example training losses [B] at timesteps t [B] for x_start [B, H, W, C].

    mse:    L_simple (eq. 14), the MSE between the network's output and its target; with a
            learned variance the bound term is added unscaled (IDDPM's MSE loss).
    kl:     the bound term L_{t-1} of eq. 5 in bits/dim (the official code's 'kl' loss).
    hybrid: L_simple + lambda * T * L_{t-1} with a stop-gradient on the mean, so the bound only
            trains the variance (IDDPM §3.1; T * L_{t-1} is an unbiased estimate of L_vlb).
    Returns {'loss', 'mse', 'vb'}: 'vb' is the unscaled bound term L_{t-1} in bits/dim (zeros
    for 'mse' with a fixed variance, where it is not computed).
    """
    if loss_type not in LOSS_TYPES:
        raise errors.ConfigError(
            f"diffusion.loss_type={loss_type!r}; allowed: {', '.join(LOSS_TYPES)}"
        )
    x_t = q_sample(diffusion, x_start, t, noise)
    model_output = model_fn(x_t, t)
    if loss_type == "kl":
        vb, _ = vb_terms_bpd(diffusion, model_output, x_start, x_t, t)
        return {"loss": vb, "mse": jnp.zeros_like(vb), "vb": vb}
    c = x_start.shape[-1]
    target = training_target(diffusion, x_start, x_t, t, noise)
    mse = mean_flat(jnp.square(target - model_output[..., :c]))
    learned = diffusion.model_var_type in LEARNED_VARIANCE
    if loss_type == "mse" and not learned:
        return {"loss": mse, "mse": mse, "vb": jnp.zeros_like(mse)}
    # The bound term sees a frozen mean, so it trains only the variance (IDDPM §3.1).
    mean_part = jax.lax.stop_gradient(model_output[..., :c])
    frozen = jnp.concatenate([mean_part, model_output[..., c:]], axis=-1) if learned else mean_part
    vb, _ = vb_terms_bpd(diffusion, frozen, x_start, x_t, t)
    weight = hybrid_lambda * diffusion.num_timesteps if loss_type == "hybrid" else 1.0
    return {"loss": mse + weight * vb, "mse": mse, "vb": vb}
