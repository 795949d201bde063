"""The discrete DDPM chain seen as a continuous-time VP diffusion, for ODE solvers and the
probability-flow likelihood.

DPM-Solver (Lu et al. 2022, §3.4 and appendix) maps a discrete-time model with N steps to
continuous time t in [1/N, 1]: array index i (the paper's timestep i + 1) sits at
t_i = (i + 1) / N, and log(alpha_t) = 0.5 log(alphabar) is linearly interpolated between those
points. Then
    x_t = alpha_t x_0 + sigma_t eps,   sigma_t = sqrt(1 - alpha_t^2),
    lambda_t = log(alpha_t / sigma_t)            (half the log-SNR),
and the network is fed the (fractional) timestep t N - 1, which is the integer index i at the
grid points. Between grid points f(t) = d log(alpha_t)/dt is piecewise constant, and the
probability-flow ODE (Song et al. 2021, eq. 13) of the VP SDE with g(t)^2 = -2 f(t) is
    dx/dt = f(t) (x - eps_theta(x, t) / sigma_t).
All functions are pure and take a `VPSchedule` pytree; `t` is a float array of any shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffusion_jax import errors
from diffusion_jax.schedules import Diffusion

# Model outputs that an ODE solver can turn into (eps, x0); 'xprev' cannot be.
ODE_MODEL_OUTPUTS = ("eps", "x0", "v")


@struct.dataclass
class VPSchedule:
    """Knots of the interpolated log(alpha_t): t_array [N] = (i + 1) / N, increasing, and
    log_alpha_array [N] = 0.5 log(alphabar_{i+1}), decreasing."""

    t_array: jax.Array
    log_alpha_array: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.t_array.shape[0]

    @property
    def t_min(self) -> float:
        return 1.0 / self.num_timesteps

    @property
    def t_max(self) -> float:
        return 1.0


def vp_schedule(diffusion: Diffusion) -> VPSchedule:
    """The continuous-time view of a full (not respaced) chain."""
    n = diffusion.num_timesteps
    if not np.array_equal(np.asarray(diffusion.timesteps), np.arange(n)):
        raise ValueError("vp_schedule needs the full chain, not a respaced Diffusion")
    log_alpha = 0.5 * np.log(np.asarray(diffusion.alphas_cumprod, np.float64))
    return VPSchedule(
        t_array=jnp.asarray(np.arange(1, n + 1) / n, jnp.float32),
        log_alpha_array=jnp.asarray(log_alpha, jnp.float32),
    )


def _interp(x: jax.Array, xp: jax.Array, fp: jax.Array) -> jax.Array:
    """Piecewise-linear interpolation through increasing knots xp, extrapolated linearly
    beyond both ends (DPM-Solver's `interpolate_fn`)."""
    x = jnp.asarray(x, jnp.float32)
    if xp.shape[0] == 1:
        return jnp.broadcast_to(fp[0], x.shape)
    i = jnp.clip(jnp.searchsorted(xp, x, side="right") - 1, 0, xp.shape[0] - 2)
    x0, x1, y0, y1 = xp[i], xp[i + 1], fp[i], fp[i + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def marginal_log_alpha(vp: VPSchedule, t: jax.Array) -> jax.Array:
    """log(alpha_t), linearly interpolated in t."""
    return _interp(t, vp.t_array, vp.log_alpha_array)


def marginal_sigma(vp: VPSchedule, t: jax.Array) -> jax.Array:
    """sigma_t = sqrt(1 - alpha_t^2)."""
    return jnp.sqrt(-jnp.expm1(2.0 * marginal_log_alpha(vp, t)))


def marginal_lambda(vp: VPSchedule, t: jax.Array) -> jax.Array:
    """lambda_t = log(alpha_t) - log(sigma_t)."""
    log_alpha = marginal_log_alpha(vp, t)
    return log_alpha - 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def inverse_lambda(vp: VPSchedule, lam: jax.Array) -> jax.Array:
    """The t with lambda_t = lam: log(alpha) = -0.5 log(1 + exp(-2 lam)), then t by inverse
    interpolation of log(alpha_t) (decreasing in t)."""
    log_alpha = -0.5 * jnp.logaddexp(0.0, -2.0 * jnp.asarray(lam, jnp.float32))
    return _interp(log_alpha, jnp.flip(vp.log_alpha_array), jnp.flip(vp.t_array))


def drift_coefficient(vp: VPSchedule, t: jax.Array) -> jax.Array:
    """f(t) = d log(alpha_t) / dt, the slope of the knot segment holding t (negative)."""
    xp, fp = vp.t_array, vp.log_alpha_array
    i = jnp.searchsorted(xp, jnp.asarray(t, jnp.float32), side="right") - 1
    i = jnp.clip(i, 0, xp.shape[0] - 2)
    return (fp[i + 1] - fp[i]) / (xp[i + 1] - xp[i])


def model_timestep(vp: VPSchedule, t: jax.Array) -> jax.Array:
    """The network's (fractional) timestep input for continuous time t: t N - 1."""
    return jnp.asarray(t, jnp.float32) * vp.num_timesteps - 1.0


def _expand(a: jax.Array, x: jax.Array) -> jax.Array:
    a = jnp.asarray(a, x.dtype)
    return jnp.broadcast_to(a, x.shape[:1]).reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def eps_and_x0(
    vp: VPSchedule, model_output_type: str, output: jax.Array, x: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(eps_hat, x0_hat) from a network output at continuous time t ([] or [B]).

    Learned-variance channels beyond x's C are dropped (the ODE uses the mean part only).
    eps: x0 = (x - sigma eps) / alpha; x0: eps = (x - alpha x0) / sigma;
    v = alpha eps - sigma x0 (Salimans & Ho 2022): eps = sigma x + alpha v, x0 = alpha x - sigma v.
    """
    if model_output_type not in ODE_MODEL_OUTPUTS:
        raise errors.ConfigError(
            f"diffusion.model_output={model_output_type!r} has no ODE form; "
            f"allowed: {', '.join(ODE_MODEL_OUTPUTS)}"
        )
    alpha = jnp.exp(marginal_log_alpha(vp, t))
    return eps_and_x0_at(model_output_type, output, x, alpha, marginal_sigma(vp, t))


def host_knots(vp: VPSchedule) -> tuple[np.ndarray, np.ndarray]:
    """(t_array, log_alpha_array) as float64 NumPy, for step tables computed on the host at
    trace time (the schedule must be concrete, e.g. closed over, not a traced argument)."""
    try:
        return np.asarray(vp.t_array, np.float64), np.asarray(vp.log_alpha_array, np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError("host step tables need a concrete VPSchedule, not a traced one") from e


def _interp_host(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """`_interp` in float64 NumPy (same knots, same linear extrapolation)."""
    x = np.asarray(x, np.float64)
    if xp.shape[0] == 1:
        return np.broadcast_to(fp[0], x.shape).copy()
    i = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, xp.shape[0] - 2)
    return fp[i] + (x - xp[i]) * (fp[i + 1] - fp[i]) / (xp[i + 1] - xp[i])


def marginal_coefficients_host(
    vp: VPSchedule, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(log alpha_t, alpha_t, sigma_t, lambda_t) in float64 on the host (t of any shape)."""
    t_array, log_alpha_array = host_knots(vp)
    log_alpha = _interp_host(t, t_array, log_alpha_array)
    sigma2 = -np.expm1(2.0 * log_alpha)
    return log_alpha, np.exp(log_alpha), np.sqrt(sigma2), log_alpha - 0.5 * np.log(sigma2)


def inverse_lambda_host(vp: VPSchedule, lam: np.ndarray) -> np.ndarray:
    """`inverse_lambda` in float64 on the host."""
    t_array, log_alpha_array = host_knots(vp)
    log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lam, np.float64))
    return _interp_host(log_alpha, log_alpha_array[::-1], t_array[::-1])


def eps_and_x0_at(
    model_output_type: str, output: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`eps_and_x0` given alpha_t and sigma_t ([] or [B]) instead of t."""
    if model_output_type not in ODE_MODEL_OUTPUTS:
        raise errors.ConfigError(
            f"diffusion.model_output={model_output_type!r} has no ODE form; "
            f"allowed: {', '.join(ODE_MODEL_OUTPUTS)}"
        )
    out = output[..., : x.shape[-1]]
    alpha, sigma = _expand(alpha, x), _expand(sigma, x)
    if model_output_type == "eps":
        return out, (x - sigma * out) / alpha
    if model_output_type == "x0":
        return (x - alpha * out) / sigma, out
    return sigma * x + alpha * out, alpha * x - sigma * out
