"""THE noise process: one immutable object read by the losses, the bound, every sampler, the
ODE likelihood and distillation.

`NoiseProcess` holds the float64 betas [T] of `config.diffusion` (`schedules.get_beta_schedule`),
the static parameterisation (`model_output`, `model_var_type`) and, for a respaced chain
(IDDPM §4.3, `respace`), the kept 0-based timesteps. It is read three ways:

- the chain (DDPM eq. 4, 6, 7): `arrays` (float64 [N], N = chain length), `array(name)` /
  `at(name, t, ndim)` (float32, for jitted code), and the pure functions `q_sample`,
  `q_mean_variance`, `q_posterior_mean_variance`, `training_target`, `p_mean_variance` below;
- the continuous-time view of the full chain (DPM-Solver, Lu et al. 2022a, §3.4 and appendix):
  chain index i (the paper's timestep i + 1) sits at t = (i + 1) / T with log(alpha_t) =
  0.5 log(alphabar_{i+1}), t = 0 is the data (log alpha = 0, sigma = 0); log(alpha_t) is linear
  between the knots and extrapolated linearly beyond them. Then x_t = alpha_t x_0 + sigma_t eps,
  sigma_t = sqrt(1 - alpha_t^2), lambda_t = log(alpha_t / sigma_t), and the network is fed
  `model_timestep(t)` = t T - 1 (the integer chain timestep at the knots). A chain step from
  timestep k to k' is the step between times (k + 1) / T and (k' + 1) / T; the chain's last
  step goes to t = 0 (alphabar_0 = 1). These accept host values (float64 NumPy, step tables)
  or traced JAX arrays (float32, the probability-flow likelihood);
- the parameterisations, each written once: `eps_and_x0` (network output -> (eps_hat, x0_hat),
  for eps, x0, v at any time and xprev on the chain, with the clipping of x0_hat) and
  `model_log_variance` (the variance rule: fixed_small, fixed_large, learned, learned_range).

Indexing convention: array index i (0-based) is the paper's timestep t = i + 1, so
`alphas_cumprod[0]` is alphabar_1 and `alphas_cumprod_prev[0]` is alphabar_0 = 1. Images are
NHWC [B, H, W, C]; any trailing shape works, coefficients broadcast over the non-batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion.schedules import LEARNED_VARIANCE, MODEL_OUTPUTS, MODEL_VAR_TYPES
from diffusion_jax.runtime import errors
from diffusion_jax.runtime.errors import ConfigError

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
class NoiseProcess:
    """The Gaussian diffusion of `config.diffusion` (module docstring).

    full_betas: float64 [T], the full chain's betas; use_timesteps: the sorted 0-based
    timesteps a respaced chain keeps (None: the full chain, its betas unchanged)."""

    full_betas: np.ndarray
    model_output: str = "eps"
    model_var_type: str = "fixed_large"
    use_timesteps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        errors.check_choice("diffusion.model_output", self.model_output, MODEL_OUTPUTS)
        errors.check_choice("diffusion.model_var_type", self.model_var_type, MODEL_VAR_TYPES)
        betas = np.asarray(self.full_betas, np.float64)
        schedules.check_betas(betas)
        object.__setattr__(self, "full_betas", betas)
        if self.use_timesteps is not None:
            kept = tuple(sorted(set(int(t) for t in self.use_timesteps)))
            if not kept or kept[0] < 0 or kept[-1] >= len(betas):
                raise ValueError(f"use_timesteps must lie in [0, {len(betas) - 1}]")
            object.__setattr__(self, "use_timesteps", kept)

    def respace(self, use_timesteps: Sequence[int]) -> NoiseProcess:
        """The chain keeping `use_timesteps` (IDDPM §4.3): beta_{S_i} = 1 - alphabar_{S_i} /
        alphabar_{S_{i-1}}; same continuous-time view (the full chain's)."""
        return dataclasses.replace(self, use_timesteps=tuple(use_timesteps))

    # --- the chain (float64 host arrays [N])

    @property
    def num_timesteps(self) -> int:
        """N, the chain's length (T unless respaced)."""
        return int(self.betas.shape[0])

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """The chain's betas [N] (float64)."""
        if self.use_timesteps is None:
            return self.full_betas
        return schedules.respace_betas(self.full_betas, self.use_timesteps)

    @functools.cached_property
    def timesteps(self) -> np.ndarray:
        """timesteps[i]: the network's (original) timestep at chain position i [N] int."""
        if self.use_timesteps is None:
            return np.arange(len(self.full_betas))
        return np.asarray(self.use_timesteps)

    @functools.cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        """The DDPM quantities of the chain (eq. 4, 6, 7; `schedules.schedule_arrays`) and
        the fixed variances of p_theta (`fixed_variance`, `fixed_log_variance`: beta~_t for
        fixed_small; beta_t with beta~_2 at t = 1 for fixed_large, the official code), float64
        [N]."""
        a = schedules.schedule_arrays(self.betas)
        if self.model_var_type == "fixed_small":
            variance, log_variance = a["posterior_variance"], a["posterior_log_variance_clipped"]
        else:  # fixed_large (and unused for learned variances)
            variance = a["betas"].copy()
            if len(variance) > 1:
                variance[0] = a["posterior_variance"][1]
            log_variance = np.log(variance)
        return {
            **a,
            "log_betas": np.log(a["betas"]),
            "fixed_variance": variance,
            "fixed_log_variance": log_variance,
        }

    def array(self, name: str) -> jax.Array:
        """`arrays[name]` as float32 [N] (the precision of the reference implementations)."""
        return jnp.asarray(self.arrays[name], jnp.float32)

    def at(self, name: str, t: jax.Array, ndim: int) -> jax.Array:
        """`array(name)[t]` for chain positions t [B], reshaped to [B, 1, ..., 1] (ndim axes)."""
        return self.array(name)[t].reshape(t.shape + (1,) * (ndim - t.ndim))

    # --- the continuous-time view of the full chain (t of any shape; NumPy or traced JAX)

    @property
    def num_full_timesteps(self) -> int:
        """T, the full chain's length: continuous time t = (k + 1) / T at timestep k."""
        return int(self.full_betas.shape[0])

    @property
    def t_min(self) -> float:
        """The first chain timestep, t = 1 / T, where the ODE solvers stop."""
        return 1.0 / self.num_full_timesteps

    @property
    def t_max(self) -> float:
        return 1.0

    @property
    def knot_t(self) -> np.ndarray:
        """[T + 1]: i / T."""
        return np.arange(self.num_full_timesteps + 1) / self.num_full_timesteps

    @property
    def knot_log_alpha(self) -> np.ndarray:
        """[T + 1]: 0 at t = 0, then 0.5 log(alphabar_k)."""
        alphas_cumprod = np.cumprod(1.0 - self.full_betas)
        return np.concatenate([[0.0], 0.5 * np.log(alphas_cumprod)])

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
        """The network's (fractional) timestep input for time t: t T - 1."""
        return t * self.num_full_timesteps - 1.0

    def chain_time(self, timesteps: Any) -> np.ndarray:
        """Continuous times (k + 1) / T of 0-based (original) chain timesteps k."""
        return (np.asarray(timesteps, np.float64) + 1.0) / self.num_full_timesteps


def from_config(diffusion: Any) -> NoiseProcess:
    """The full chain's `NoiseProcess` of `config.diffusion`."""
    betas = schedules.get_beta_schedule(
        diffusion.schedule, diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end
    )
    return NoiseProcess(betas, diffusion.model_output, diffusion.model_var_type)


# ---------------------------------------------------------------------------------------------
# The parameterisations (eq. 11; Salimans & Ho 2022; IDDPM eq. 15), each written once


def _expand(a: Any, x: jax.Array) -> jax.Array:
    """a ([], [B] or already [B, 1, ..., 1]) as [B, 1, ..., 1] against x [B, ...]."""
    a = jnp.asarray(a, x.dtype)
    if a.ndim == x.ndim:
        return a
    return jnp.broadcast_to(a, x.shape[:1]).reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def eps_and_x0(
    model_output: str,
    output: jax.Array,
    x: jax.Array,
    alpha: Any,
    sigma: Any,
    *,
    clip: bool = False,
    coef1: Any = None,
    coef2: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """(eps_hat, x0_hat) [B, ...] from a network output (its mean part: learned-variance
    channels beyond x's C are dropped) at x [B, ...] with alpha_t, sigma_t ([], [B] or [B, 1,
    ..]):  eps: x0 = (x - sigma eps) / alpha;  x0: eps = (x - alpha x0) / sigma;
    v = alpha eps - sigma x0 (Salimans & Ho 2022): eps = sigma x + alpha v, x0 = alpha x - sigma v;
    xprev (chain only, eq. 7 inverted, needs the posterior coefficients coef1, coef2):
    x0 = (xprev - coef2 x) / coef1, eps = (x - alpha x0) / sigma.
    With `clip`, x0_hat is clipped to [-1, 1] and eps_hat re-derived from it (DDPM's official
    code; DPM-Solver++'s static thresholding)."""
    out = output[..., : x.shape[-1]]
    if model_output == "xprev" and coef1 is not None:
        x0 = (out - coef2 * x) / coef1
        eps = (x - alpha * x0) / sigma
    else:
        a, s = _expand(alpha, x), _expand(sigma, x)
        if model_output == "eps":
            eps, x0 = out, (x - s * out) / a
        elif model_output == "x0":
            eps, x0 = (x - a * out) / s, out
        elif model_output == "v":
            eps, x0 = s * x + a * out, a * x - s * out
        else:
            raise ConfigError(
                f"diffusion.model_output={model_output!r} has no form at an arbitrary time; "
                f"allowed: {', '.join(ODE_MODEL_OUTPUTS)}"
            )
    if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - alpha * x0) / sigma
    return eps, x0


def model_log_variance(
    model_var_type: str,
    var_output: jax.Array | None,
    fixed_log: Any,
    min_log: Any,
    max_log: Any,
) -> Any:
    """log sigma_t^2 of p_theta(x_{t-1} | x_t) for `model_var_type`: fixed_small / fixed_large:
    `fixed_log` (`NoiseProcess.arrays['fixed_log_variance']`); learned: the output is the log
    variance; learned_range (IDDPM eq. 15): with v in [-1, 1] mapped to frac in [0, 1],
    log sigma^2 = frac log beta_t + (1 - frac) log beta~_t (max_log, min_log)."""
    if model_var_type == "learned":
        return var_output
    if model_var_type == "learned_range":
        frac = (var_output + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log
    return fixed_log


def split_model_output(
    process: NoiseProcess, model_output: jax.Array, x_t: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """Splits the network output [B, ..., C or 2C] into (mean part, variance part or None)."""
    c = x_t.shape[-1]
    if process.model_var_type in LEARNED_VARIANCE:
        if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != 2 * c:
            raise ValueError(
                f"model_var_type={process.model_var_type!r} needs a model output of shape "
                f"{x_t.shape[:-1] + (2 * c,)} (2x channels); got {model_output.shape}"
            )
        return model_output[..., :c], model_output[..., c:]
    if model_output.shape != x_t.shape:
        raise ValueError(
            f"model_var_type={process.model_var_type!r} needs a model output of shape "
            f"{x_t.shape}; got {model_output.shape}"
        )
    return model_output, None


# ---------------------------------------------------------------------------------------------
# Forward process q (DDPM eq. 4, 6, 7); t: int32 chain positions [B]


def q_mean_variance(
    process: NoiseProcess, x_start: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eq. 4: mean, variance and log variance of q(x_t | x_0)."""
    n = x_start.ndim
    mean = process.at("sqrt_alphas_cumprod", t, n) * x_start
    variance = jnp.square(process.at("sqrt_one_minus_alphas_cumprod", t, n))
    return mean, variance, process.at("log_one_minus_alphas_cumprod", t, n)


def q_sample(
    process: NoiseProcess, x_start: jax.Array, t: jax.Array, noise: jax.Array
) -> jax.Array:
    """Eq. 4: x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps."""
    n = x_start.ndim
    return (
        process.at("sqrt_alphas_cumprod", t, n) * x_start
        + process.at("sqrt_one_minus_alphas_cumprod", t, n) * noise
    )


def q_posterior_mean_variance(
    process: NoiseProcess, x_start: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eq. 6-7: mean mu~_t, variance beta~_t and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    n = x_t.ndim
    mean = (
        process.at("posterior_mean_coef1", t, n) * x_start
        + process.at("posterior_mean_coef2", t, n) * x_t
    )
    variance = process.at("posterior_variance", t, n)
    return mean, variance, process.at("posterior_log_variance_clipped", t, n)


def training_target(
    process: NoiseProcess, x_start: jax.Array, x_t: jax.Array, t: jax.Array, noise: jax.Array
) -> jax.Array:
    """What the network regresses onto in L_simple (eq. 14) for `process.model_output`:
    eps, x0, the posterior mean (xprev) or v = sqrt(alphabar) eps - sqrt(1 - alphabar) x0."""
    kind = process.model_output
    if kind == "eps":
        return noise
    if kind == "x0":
        return x_start
    if kind == "xprev":
        return q_posterior_mean_variance(process, x_start, x_t, t)[0]
    n = x_start.ndim
    return (
        process.at("sqrt_alphas_cumprod", t, n) * noise
        - process.at("sqrt_one_minus_alphas_cumprod", t, n) * x_start
    )


# ---------------------------------------------------------------------------------------------
# Reverse process p_theta (eq. 1, 11; IDDPM eq. 15)


class PMeanVariance(NamedTuple):
    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array
    pred_eps: jax.Array


def p_mean_variance(
    process: NoiseProcess,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    clip_denoised: bool = True,
) -> PMeanVariance:
    """Mean, variance, log variance of p_theta(x_{t-1} | x_t) and (x0_hat, eps_hat) (eq. 11).

    `model_output` is the network's output at (x_t, t): [B, H, W, C], or [B, H, W, 2C] for
    learned variances. With `clip_denoised`, x0_hat is clipped to [-1, 1] before it enters
    the posterior mean (the sampling-time convention of the official code); an xprev output
    is the mean itself."""
    mean_output, var_output = split_model_output(process, model_output, x_t)
    n = x_t.ndim
    log_variance = model_log_variance(
        process.model_var_type,
        var_output,
        process.at("fixed_log_variance", t, n),
        process.at("posterior_log_variance_clipped", t, n),
        process.at("log_betas", t, n),
    )
    if var_output is None:
        variance = process.at("fixed_variance", t, n)
    else:
        variance = jnp.exp(log_variance)
    variance = jnp.broadcast_to(variance, x_t.shape)
    log_variance = jnp.broadcast_to(log_variance, x_t.shape)
    coef1, coef2 = (
        process.at("posterior_mean_coef1", t, n),
        process.at("posterior_mean_coef2", t, n),
    )
    pred_eps, pred_x0 = eps_and_x0(
        process.model_output,
        mean_output,
        x_t,
        process.at("sqrt_alphas_cumprod", t, n),
        process.at("sqrt_one_minus_alphas_cumprod", t, n),
        clip=clip_denoised,
        coef1=coef1,
        coef2=coef2,
    )
    if process.model_output == "xprev":
        mean = mean_output
    else:
        mean = coef1 * pred_x0 + coef2 * x_t
    return PMeanVariance(mean, variance, log_variance, pred_x0, pred_eps)


def score_from_eps(process: NoiseProcess, t: jax.Array, eps: jax.Array) -> jax.Array:
    """Tweedie (Luo 2022 eq. 151): grad log q(x_t) = -eps / sqrt(1 - alphabar_t), [B, ...]."""
    return -eps / process.at("sqrt_one_minus_alphas_cumprod", t, eps.ndim)
