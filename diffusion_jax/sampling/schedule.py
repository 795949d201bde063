"""One noise schedule, read two ways: the (respaced) discrete chain and its continuous-time view.

`Schedule` holds the float64 betas [N] of `config.diffusion` and the knots of log(alpha_t)
derived from them (DPM-Solver, Lu et al. 2022a, §3.4 and appendix): chain index i (the paper's
timestep i + 1) sits at continuous time t = (i + 1) / N with log(alpha_t) = 0.5 log(alphabar_{i+1}),
and t = 0 is the data (log alpha = 0, sigma = 0); log(alpha_t) is linear between knots and
extrapolated linearly beyond them. Then
    x_t = alpha_t x_0 + sigma_t eps,   sigma_t = sqrt(1 - alpha_t^2),
    lambda_t = log(alpha_t / sigma_t)            (half the log-SNR),
and the network is fed `model_timestep(t)` = t N - 1, the ONE map from time to the network's
input: the integer chain timestep at the knots, a fractional one between them. A chain step
from timestep k to k' is the step between times (k + 1) / N and (k' + 1) / N; the chain's last
step goes to t = 0 (alphabar_0 = 1).

Every function here accepts host values (float64 NumPy, for step tables built before a scan)
or traced JAX arrays (float32, for the probability-flow likelihood, whose times are traced);
the interpolation is written once (`_interp`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedules
from diffusion_jax.errors import ConfigError

# Model outputs that can be turned into (eps, x0) at any time; 'xprev' only on the chain.
ODE_MODEL_OUTPUTS = ("eps", "x0", "v")


def _xnp(x: Any) -> Any:
    return jnp if isinstance(x, jax.Array) else np


def _interp(x: Any, xp: np.ndarray, fp: np.ndarray) -> Any:
    """Piecewise-linear interpolation through increasing knots xp, extrapolated linearly
    beyond both ends (DPM-Solver's `interpolate_fn`); NumPy float64 for host x, float32 JAX
    for traced x."""
    xnp = _xnp(x)
    if xnp is jnp:
        x, xp, fp = (
            jnp.asarray(x, jnp.float32),
            jnp.asarray(xp, jnp.float32),
            jnp.asarray(fp, jnp.float32),
        )
    else:
        x = np.asarray(x, np.float64)
    i = xnp.clip(xnp.searchsorted(xp, x, side="right") - 1, 0, xp.shape[0] - 2)
    return fp[i] + (x - xp[i]) * (fp[i + 1] - fp[i]) / (xp[i + 1] - xp[i])


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """The noise schedule of `config.diffusion`: float64 betas [N] (host) and the static
    parameterisation. `knot_t` [N + 1] = i / N and `knot_log_alpha` [N + 1] (0 at t = 0)."""

    betas: np.ndarray
    model_output: str = "eps"
    model_var_type: str = "fixed_large"

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def t_min(self) -> float:
        """The first chain timestep, t = 1 / N, where the ODE solvers stop."""
        return 1.0 / self.num_timesteps

    @property
    def t_max(self) -> float:
        return 1.0

    @property
    def knot_t(self) -> np.ndarray:
        return np.arange(self.num_timesteps + 1) / self.num_timesteps

    @property
    def knot_log_alpha(self) -> np.ndarray:
        alphas_cumprod = np.cumprod(1.0 - np.asarray(self.betas, np.float64))
        return np.concatenate([[0.0], 0.5 * np.log(alphas_cumprod)])

    # --- the continuous-time view (t of any shape; NumPy or traced JAX)

    def log_alpha(self, t: Any) -> Any:
        """log(alpha_t), linear in t between the knots."""
        return _interp(t, self.knot_t, self.knot_log_alpha)

    def alpha(self, t: Any) -> Any:
        return _xnp(t).exp(self.log_alpha(t))

    def sigma(self, t: Any) -> Any:
        """sigma_t = sqrt(1 - alpha_t^2) (0 at t = 0)."""
        return _xnp(t).sqrt(-_xnp(t).expm1(2.0 * self.log_alpha(t)))

    def lam(self, t: Any) -> Any:
        """lambda_t = log(alpha_t) - log(sigma_t) (+inf at t = 0)."""
        xnp, log_alpha = _xnp(t), self.log_alpha(t)
        with np.errstate(divide="ignore"):
            return log_alpha - 0.5 * xnp.log(-xnp.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lam: Any) -> Any:
        """The t with lambda_t = lam: log(alpha) = -0.5 log(1 + exp(-2 lam)), then t by inverse
        interpolation of log(alpha_t) (decreasing in t)."""
        xnp = _xnp(lam)
        log_alpha = -0.5 * xnp.logaddexp(0.0, -2.0 * lam)
        return _interp(log_alpha, self.knot_log_alpha[::-1], self.knot_t[::-1])

    def drift(self, t: Any) -> Any:
        """f(t) = d log(alpha_t) / dt, the slope of the knot segment holding t (negative)."""
        xnp = _xnp(t)
        xp, fp = self.knot_t, self.knot_log_alpha
        if xnp is jnp:
            t, xp, fp = (
                jnp.asarray(t, jnp.float32),
                jnp.asarray(xp, jnp.float32),
                jnp.asarray(fp, jnp.float32),
            )
        i = xnp.clip(xnp.searchsorted(xp, t, side="right") - 1, 0, xp.shape[0] - 2)
        return (fp[i + 1] - fp[i]) / (xp[i + 1] - xp[i])

    def model_timestep(self, t: Any) -> Any:
        """The network's (fractional) timestep input for time t: t N - 1."""
        return t * self.num_timesteps - 1.0

    # --- the chain

    def chain_time(self, timesteps: Any) -> np.ndarray:
        """Continuous times (k + 1) / N of 0-based chain timesteps k."""
        return (np.asarray(timesteps, np.float64) + 1.0) / self.num_timesteps

    def chain_arrays(self, timesteps: Any) -> dict[str, np.ndarray]:
        """The DDPM quantities (eq. 4, 6, 7; `schedules.schedule_arrays`) of the chain that
        keeps the sorted 0-based `timesteps` (IDDPM respacing, §4.3), float64 [K]."""
        return schedules.schedule_arrays(schedules.respace_betas(self.betas, timesteps))


def from_config(diffusion: Any) -> Schedule:
    """`Schedule` of `config.diffusion`."""
    betas = schedules.get_beta_schedule(
        diffusion.schedule, diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end
    )
    return Schedule(betas, diffusion.model_output, diffusion.model_var_type)


def eps_and_x0(
    model_output: str, output: Any, x: Any, alpha: Any, sigma: Any
) -> tuple[jax.Array, jax.Array]:
    """(eps_hat, x0_hat) from a network output (mean part: learned-variance channels beyond x's
    C are dropped) at a time with alpha_t, sigma_t ([] or [B]).
    eps: x0 = (x - sigma eps) / alpha; x0: eps = (x - alpha x0) / sigma;
    v = alpha eps - sigma x0 (Salimans & Ho 2022): eps = sigma x + alpha v, x0 = alpha x - sigma v.
    """
    out = output[..., : x.shape[-1]]
    alpha, sigma = _expand(alpha, x), _expand(sigma, x)
    if model_output == "eps":
        return out, (x - sigma * out) / alpha
    if model_output == "x0":
        return (x - alpha * out) / sigma, out
    if model_output == "v":
        return sigma * x + alpha * out, alpha * x - sigma * out
    raise ConfigError(
        f"diffusion.model_output={model_output!r} has no form at an arbitrary time; "
        f"allowed: {', '.join(ODE_MODEL_OUTPUTS)}"
    )


def _expand(a: Any, x: jax.Array) -> jax.Array:
    a = jnp.asarray(a, x.dtype)
    return jnp.broadcast_to(a, x.shape[:1]).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
