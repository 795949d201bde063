"""Consistency models on the VP process: the consistency function, its training targets'
pieces and the discretisation schedule, as pure functions (Song et al. 2023, "Consistency
Models"; Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models" (iCT);
Geng et al. 2024, "Consistency Models Made Easy" (ECT)).

Everything is written in EDM's variables, as the Heun stepper is: x~ = x_t / alpha_t and
s = sigma_t / alpha_t = exp(-lambda_t), so that x~ = x_0 + s eps and the probability-flow ODE
carries x~ at s to x~ at s' along dx~/ds = eps_hat. The consistency function maps a point of
an ODE trajectory at s to the trajectory's point at s_min = s(t_min) (t_min = 1/T, the first
chain step). CM (eq. 7, Appendix C) writes it f = c_skip(s) x~ + c_out(s) F with
c_skip = sigma_data^2 / ((s - s_min)^2 + sigma_data^2) and c_out = sigma_data (s - s_min) /
sqrt(sigma_data^2 + s^2): EDM's preconditioning of a denoiser D = c_skip^EDM(s) x~ +
c_out^EDM(s) F (the same with s_min = 0) shifted so that f = x~ at s = s_min. Here F is the
network's own, read off its data prediction x0_hat (`process.eps_and_x0`): F = (x0_hat -
c_skip^EDM x~) / c_out^EDM, so that

    f(x_t, t) = (c_skip(s) - k(s) c_skip^EDM(s)) x~ + k(s) x0_hat,   k(s) = (s - s_min) / s.

Then f = x~ exactly at s = s_min whatever the network (the boundary condition is built in), and
at s_min -> 0 f is the denoiser x0_hat itself: a trained diffusion model is a consistency
model with the largest steps (ECT's view), so the teacher's weights start the student where
its denoising already is. c_out is O(s - s_min) as the distance from x~ to the data is, so x0_hat
stays O(1) near s_min (a c_out of 1 - c_skip, O((s - s_min)^2), would need x0_hat ~ 1 / s
there). The student predicts v (or x0): it stays bounded where alpha_t -> 0, which a one-step
model needs (an eps output would multiply its error by s ~ 10^2..10^4 at t = 1).
sigma_data = 0.5 as in CM and EDM, for data in [-1, 1].

Training pairs (ECT's continuous-time form of iCT's schedule): s ~ lognormal(P_mean, P_std),
clipped to [s_min, s_max]; its partner r = s (1 - n(s) / q^stage), n(s) = 1 + k sigmoid(-b s),
not below s_min. In stage 0, r = s_min everywhere (n >= 1): the target is the boundary value,
i.e. plain denoising, the diffusion model's own task; each later stage divides the gap s - r by
q, so the discretisation shrinks over training (ECT eq. 10; iCT doubles its step count per
stage). The distance is iCT's pseudo-Huber sqrt(||a - b||^2 + c^2) - c with c = 0.00054
sqrt(d) (d = pixels x channels), or squared L2 (CM), weighted by 1 / (s - r) (iCT's
lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i)) or 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion.process import NoiseProcess

SIGMA_DATA = 0.5  # CM / EDM's data standard deviation in c_skip
HUBER_C_PER_SQRT_DIM = 0.00054  # iCT: c = 0.00054 sqrt(d)
DISTANCES = ("pseudo_huber", "l2")
WEIGHTINGS = ("inverse_delta", "uniform")


def vp_from_edm(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t) of the VP point whose EDM noise level is s: alpha = 1 / sqrt(1 + s^2)."""
    alpha = jax.lax.rsqrt(1.0 + jnp.square(s))
    return alpha, s * alpha


def sigma_range(process: NoiseProcess) -> tuple[float, float]:
    """(s_min, s_max): the EDM noise levels at t_min = 1/T and t_max = 1 (float64)."""
    s = np.exp(-process.lam(np.array([process.t_min, process.t_max])))
    return float(s[0]), float(s[1])


def c_skip(s: Any, s_min: float, sigma_data: float = SIGMA_DATA) -> Any:
    """CM's skip weight: 1 at s = s_min, -> 0 as s grows (module docstring); NumPy or JAX.
    With s_min = 0 it is EDM's."""
    return sigma_data**2 / ((s - s_min) ** 2 + sigma_data**2)


def consistency_fn(
    x: jax.Array, x0_hat: jax.Array, alpha: jax.Array, s: jax.Array, s_min: float
) -> jax.Array:
    """f(x_t, t) = (c_skip(s) - k c_skip^EDM(s)) x_t / alpha_t + k x0_hat, k = (s - s_min) / s
    (module docstring), for x_t, x0_hat [B, ...] and alpha_t, s [B] (or scalars); [B, ...] in
    x~ units (the data plus s_min noise)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    if jnp.ndim(s):
        s = jnp.reshape(s, shape)
    if jnp.ndim(alpha):
        alpha = jnp.reshape(alpha, shape)
    k = (s - s_min) / s
    return (c_skip(s, s_min) - k * c_skip(s, 0.0)) * (x / alpha) + k * x0_hat


def partner(s: jax.Array, stage: jax.Array, s_min: float, q: float, k: float, b: float):
    """ECT's r(s) of `stage` (module docstring): s (1 - n(s) / q^stage), n(s) = 1 + k
    sigmoid(-b s), clipped to [s_min, s]. [B]"""
    n = 1.0 + k * jax.nn.sigmoid(-b * s)
    r = s * (1.0 - n / jnp.power(q, stage.astype(s.dtype)))
    return jnp.clip(r, s_min, s)


def sample_sigmas(
    key: jax.Array, n: int, p_mean: float, p_std: float, s_min: float, s_max: float
) -> jax.Array:
    """n noise levels s = exp(P_mean + P_std z), z ~ N(0, 1), clipped to (s_min, s_max]. [n]"""
    s = jnp.exp(p_mean + p_std * jax.random.normal(key, (n,)))
    return jnp.clip(s, s_min * (1.0 + 1e-3), s_max)


def distance(a: jax.Array, b: jax.Array, kind: str) -> jax.Array:
    """Per-example distance of a, b [B, ...]: pseudo-Huber (iCT) or the mean squared error. [B]"""
    diff = (a - b).reshape(a.shape[0], -1).astype(jnp.float32)
    if kind == "l2":
        return jnp.mean(jnp.square(diff), axis=1)
    c = HUBER_C_PER_SQRT_DIM * np.sqrt(diff.shape[1])
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=1) + c * c) - c


def weight(s: jax.Array, r: jax.Array, kind: str) -> jax.Array:
    """lambda(s, r): 1 / (s - r) (iCT) or 1 (CM). [B]"""
    return 1.0 / (s - r) if kind == "inverse_delta" else jnp.ones_like(s)


def ddim_to(x0_hat: jax.Array, eps_hat: jax.Array, r: jax.Array) -> jax.Array:
    """The teacher's DDIM (= Euler in x~) step to noise level r: x~_r = x0_hat + r eps_hat.
    [B, ...]"""
    return x0_hat + jnp.reshape(r, (-1,) + (1,) * (x0_hat.ndim - 1)) * eps_hat


def heun_to(
    x_tilde: jax.Array, s: jax.Array, r: jax.Array, eps_hat: jax.Array, eps_hat_r: jax.Array
) -> jax.Array:
    """EDM's Heun step from s to r in x~, given eps_hat at (x~, s) and eps_hat_r at the Euler
    point (x0_hat + r eps_hat, r): x~ + (r - s) (eps_hat + eps_hat_r) / 2. [B, ...]"""
    shape = (-1,) + (1,) * (x_tilde.ndim - 1)
    return x_tilde + jnp.reshape(r - s, shape) * 0.5 * (eps_hat + eps_hat_r)
