"""Steppers: one step of a sampler over one row of its step table.

A `Stepper` is a step table `rows` (host NumPy, one row per step, every value a sampler needs
computed in float64 before the scan) and `step(carry, row, predict, noise) -> (carry, x0_hat)`,
run by `run.sample` as ONE `lax.scan` over the rows. `predict(x, row, suffix="")` is the one
clip-aware network call (`run.make_predict`) returning (eps_hat, x0_hat, raw output) at the
row's point `t_model{suffix}`, `alpha{suffix}`, `sigma{suffix}`; `noise` is the row's
N(0, I) draw (unused, hence compiled away, by deterministic steppers). Every table has
`t_model`, `alpha`, `sigma` (the step's start), `position` (steps still to go after this one:
the chain position for chain grids) and `nfe` (network calls of the row).

- `ancestral`: DDPM Algorithm 2 on a chain grid, every variance type (fixed_small,
  fixed_large, learned, learned_range) and model output (eps, x0, v, xprev).
- `multistep`: the linear multistep updates of the exponential integrator, one network call a
  step, all written as x_t = c_x x + c_0 m_s + c_z z (+ history terms, `_multistep_columns`):
  DDIM (eq. 12, with eta; its eta = 0 step IS DPM-Solver-1 and DPM-Solver++-1), DPM-Solver
  1-3 (noise prediction), DPM-Solver++ 1-2 (data prediction) and SDE-DPM-Solver++ 1-2.
- `singlestep`: DPM-Solver-fast 1-3 (intermediate points from the chosen spacing).
- `heun`: Karras et al. 2022 Algorithm 1 (S_churn = 0), Euler on the last step to sigma = 0.
- `unipc`: UniPC (Zhao et al. 2023), UniP-p predictor with the UniC corrector, data
  prediction, B(h) = h (`bh1`) or expm1(h) (`bh2`).
- `consistency`: a consistency model's one-step and multistep sampling (Song et al. 2023,
  Algorithm 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import consistency as consistency_lib
from diffusion_jax.diffusion.process import NoiseProcess, model_log_variance
from diffusion_jax.diffusion.schedules import LEARNED_VARIANCE

# The reference code lowers the order of the final multistep updates only below 10 steps.
LOWER_ORDER_FINAL_BELOW = 10


class Prediction(NamedTuple):
    eps: jax.Array  # eps_hat [B, ...]
    x0: jax.Array  # x0_hat [B, ...] (clipped with sampling.clip_denoised)
    out: jax.Array  # the raw network output [B, ..., C or 2C]


Predict = Callable[..., Prediction]
Row = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Stepper:
    """A sampler: its step table (host arrays [K]) and its step function."""

    rows: dict[str, np.ndarray]
    step: Callable[[Any, Row, Predict, jax.Array], tuple[Any, jax.Array]]
    init: Callable[[jax.Array], Any] = lambda x: x
    sample: Callable[[Any], jax.Array] = lambda carry: carry

    @property
    def num_steps(self) -> int:
        return int(self.rows["position"].shape[0])

    @property
    def nfe(self) -> int:
        """Network evaluations per sample, counted from the table."""
        return int(np.sum(self.rows["nfe"]))


def point(process: NoiseProcess, t: np.ndarray, suffix: str = "") -> dict[str, np.ndarray]:
    """The columns `predict` reads at times t [K]: network timestep, alpha_t, sigma_t."""
    t = np.asarray(t, np.float64)
    return {
        f"t_model{suffix}": process.model_timestep(t),
        f"alpha{suffix}": process.alpha(t),
        f"sigma{suffix}": process.sigma(t),
    }


def _base(process: NoiseProcess, grid: np.ndarray, nfe: Any = 1) -> dict[str, np.ndarray]:
    k = grid.shape[0] - 1
    return {
        **point(process, grid[:-1]),
        "position": np.arange(k - 1, -1, -1),
        "nfe": np.broadcast_to(np.asarray(nfe), (k,)).copy(),
    }


def _lambdas(process: NoiseProcess, t: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return process.lam(np.asarray(t, np.float64))


def _expand(a: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.reshape(a, (-1,) + (1,) * (x.ndim - 1)) if jnp.ndim(a) else a


# ---------------------------------------------------------------------------------------------
# Ancestral sampling (DDPM Algorithm 2) on a chain


def ancestral(process: NoiseProcess, timesteps: Sequence[int]) -> Stepper:
    """DDPM Algorithm 2 over the chain keeping `timesteps`: x_{t-1} = mu_theta + sigma_t z (no
    noise at the last step), mu_theta = coef1 x0_hat + coef2 x_t (eq. 7 with the clipped x0_hat;
    the network output itself for xprev). Variances (`model_var_type`): fixed_small beta~_t;
    fixed_large beta_t, with beta~ at the last step (official code); learned: the output is the
    log variance; learned_range (IDDPM eq. 15): v in [-1, 1] mixes log beta_t and log beta~_t."""
    kept = sorted(set(int(k) for k in timesteps))
    chain = process.respace(kept).arrays
    a = {k: v[::-1] for k, v in chain.items()}  # rows: noisiest first
    grid = np.concatenate([process.chain_time(kept[::-1]), [0.0]])
    rows = {
        **_base(process, grid),
        "coef1": a["posterior_mean_coef1"],
        "coef2": a["posterior_mean_coef2"],
        "log_var": a["fixed_log_variance"],
        "min_log": a["posterior_log_variance_clipped"],
        "max_log": a["log_betas"],
    }
    rows["noise"] = (rows["position"] != 0).astype(np.float64)
    var_type, xprev = process.model_var_type, process.model_output == "xprev"

    def step(x, row, predict, noise):
        p = predict(x, row)
        c = x.shape[-1]
        mean = p.out[..., :c] if xprev else row["coef1"] * p.x0 + row["coef2"] * x
        var_out = p.out[..., c:] if var_type in LEARNED_VARIANCE else None
        log_var = model_log_variance(
            var_type, var_out, row["log_var"], row["min_log"], row["max_log"]
        )
        return mean + row["noise"] * jnp.exp(0.5 * log_var) * noise, p.x0

    return Stepper(rows, step)


# ---------------------------------------------------------------------------------------------
# Linear multistep updates: DDIM, DPM-Solver, DPM-Solver++, SDE-DPM-Solver++


def multistep_orders(
    num_steps: int, order: int, lower_order_final: bool = True, below: int = LOWER_ORDER_FINAL_BELOW
) -> np.ndarray:
    """Order of each multistep update [num_steps]: min(order, j + 1) warm-up (no history yet),
    and with `lower_order_final` below `below` steps also min(., num_steps - j) (reference
    `sample(method='multistep')`; UniPC's reference lowers them at any step count)."""
    j = np.arange(int(num_steps))
    orders = np.minimum(order, j + 1)
    if lower_order_final and num_steps < below:
        orders = np.minimum(orders, num_steps - j)
    return orders.astype(np.int32)


def _multistep_columns(
    kind: str, process: NoiseProcess, grid: np.ndarray, orders: np.ndarray, eta: float = 0.0
) -> dict[str, np.ndarray]:
    """Coefficients of x_t = c_x x + c_0 m_s + c_z z  (order 1)
                           + 0.5 c_0 D1_0           (order 2)
                   or      + c_2 D1 + c_3 D2        (order 3, replacing the order-2 term)
    for the step s -> t of each row, with m = x0_hat ('data') or eps_hat ('noise') and
    D1_0 = (m_s - m_{-1}) / r0, D1_1 = (m_{-1} - m_{-2}) / r1, D1 = D1_0 + r0/(r0+r1) (D1_0 -
    D1_1), D2 = (D1_0 - D1_1) / (r0 + r1), r0 = h_0 / h, r1 = h_1 / h (reference
    `multistep_dpm_solver_*_update`), h = lambda_t - lambda_s:
    - 'dpm_solver++' (Lu et al. 2022b eq. 9, Algorithm 2): c_x = sigma_t / sigma_s, c_0 =
      -alpha_t phi_1, phi_1 = expm1(-h); c_2 = alpha_t phi_2, c_3 = -alpha_t phi_3, phi_2 =
      phi_1 / h + 1, phi_3 = phi_2 / h - 0.5.
    - 'dpm_solver' (Lu et al. 2022a eq. 3.7, noise prediction): c_x = alpha_t / alpha_s, c_0 =
      -sigma_t phi_1, phi_1 = expm1(h) (-> sigma_t - alpha_t sigma_s / alpha_s at sigma_t = 0);
      c_2 = -sigma_t phi_2, c_3 = -sigma_t phi_3, phi_2 = phi_1 / h - 1, phi_3 = phi_2 / h - 0.5.
    - 'sde_dpm_solver++' (Lu et al. 2022b §4, SDE-DPM-Solver++(2M), midpoint): c_x = sigma_t /
      sigma_s e^-h, c_0 = alpha_t (1 - e^-2h), c_z = sigma_t sqrt(1 - e^-2h).
    - 'ddim' (Song et al. 2021 eq. 12, data prediction, eps_hat = (x - alpha_s x0_hat) /
      sigma_s): sigma_eta = eta sqrt((1 - ab_t) / (1 - ab_s)) sqrt(1 - ab_s / ab_t), c_eps =
      sqrt(1 - ab_t - sigma_eta^2): c_x = c_eps / sigma_s, c_0 = alpha_t - c_eps alpha_s /
      sigma_s, c_z = sigma_eta. At eta = 0 this is the 'dpm_solver++' order-1 step.
    Kept as in the reference (and diffusers): D2 estimates h^2 m''/2 while the Taylor term of the
    exponential integral is h^2 phi_3 m'', so the multistep order-3 update is locally O(h^3); the
    singlestep DPM-Solver-3 is the third-order method. A step to t = 0 (sigma = 0) is order 1."""
    s, t = grid[:-1], grid[1:]
    lam = _lambdas(process, grid)
    lam_s, lam_t = lam[:-1], lam[1:]
    a_s, a_t = process.alpha(s), process.alpha(t)
    sig_s, sig_t = process.sigma(s), process.sigma(t)
    order = np.where(sig_t > 0, orders, 1)
    lam_p1 = np.concatenate([lam[:1], lam[:-2]])  # lambda_{j-1} (lambda_0 when j = 0)
    lam_p2 = np.concatenate([lam[:1], lam[:1], lam[:-3]])[: lam_s.shape[0]]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h = lam_t - lam_s
        cols = {
            "order": order,
            "r0": np.where(order >= 2, (lam_s - lam_p1) / h, 1.0),
            "r1": np.where(order >= 3, (lam_p1 - lam_p2) / h, 1.0),
            "c_z": np.zeros_like(h),
        }
        if kind == "dpm_solver++":
            phi_1 = np.expm1(-h)
            phi_2 = phi_1 / h + 1.0
            cols.update(
                c_x=sig_t / sig_s, c_0=-a_t * phi_1, c_2=a_t * phi_2, c_3=-a_t * (phi_2 / h - 0.5)
            )
        elif kind == "dpm_solver":
            phi_1 = np.expm1(h)
            phi_2 = phi_1 / h - 1.0
            c_0 = np.where(sig_t > 0, -sig_t * phi_1, sig_t - a_t * sig_s / a_s)
            cols.update(c_x=a_t / a_s, c_0=c_0, c_2=-sig_t * phi_2, c_3=-sig_t * (phi_2 / h - 0.5))
        elif kind == "sde_dpm_solver++":
            decay = -np.expm1(-2.0 * h)
            cols.update(c_x=sig_t / sig_s * np.exp(-h), c_0=a_t * decay, c_z=sig_t * np.sqrt(decay))
        else:  # ddim
            ab_s, ab_t = a_s**2, a_t**2
            sig_eta = eta * np.sqrt((1.0 - ab_t) / (1.0 - ab_s)) * np.sqrt(1.0 - ab_s / ab_t)
            c_eps = np.sqrt(1.0 - ab_t - sig_eta**2)
            cols.update(c_x=c_eps / sig_s, c_0=a_t - c_eps * a_s / sig_s, c_z=sig_eta)
    for name in ("c_2", "c_3"):
        cols[name] = np.where(order >= 3, cols.get(name, 0.0), 0.0)
    return cols


def multistep(
    kind: str,
    process: NoiseProcess,
    grid: np.ndarray,
    orders: np.ndarray,
    eta: float = 0.0,
) -> Stepper:
    """The multistep update `kind` (`_multistep_columns`) over `grid` with per-step `orders`
    (`multistep_orders`); 'dpm_solver' keeps eps_hat history, the others x0_hat."""
    rows = {**_base(process, grid), **_multistep_columns(kind, process, grid, orders, eta)}
    data, top = kind != "dpm_solver", int(np.max(rows["order"]))
    stochastic = kind == "sde_dpm_solver++" or (kind == "ddim" and eta > 0)

    def step(carry, row, predict, noise):
        x, m1, m2 = carry
        p = predict(x, row)
        m0 = p.x0 if data else p.eps
        x1 = row["c_x"] * x + row["c_0"] * m0
        if stochastic:
            x1 = x1 + row["c_z"] * noise
        if top == 1:
            return (x1, m0, m1), p.x0
        order, r0, r1 = row["order"], row["r0"], row["r1"]
        d1_0 = (m0 - m1) / r0
        x2 = x1 + 0.5 * row["c_0"] * d1_0
        if top == 2:
            return (jnp.where(order == 1, x1, x2), m0, m1), p.x0
        d1_1 = (m1 - m2) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        x3 = x1 + row["c_2"] * d1 + row["c_3"] * d2
        return (jnp.where(order == 1, x1, jnp.where(order == 2, x2, x3)), m0, m1), p.x0

    def init(x):
        return (x, jnp.zeros_like(x), jnp.zeros_like(x))

    return Stepper(rows, step, init, lambda carry: carry[0])


# ---------------------------------------------------------------------------------------------
# DPM-Solver-fast (singlestep)


def singlestep_orders(num_steps: int, order: int) -> list[int]:
    """DPM-Solver-fast (Lu et al. 2022a §3.3, reference `get_orders_and_timesteps_for_
    singlestep_solver`): the orders of the K outer steps, summing to num_steps (= NFE).
    order 3: K = S // 3 + 1 steps, [3] * (K - 2) + [2, 1] if S % 3 == 0, [3] * (K - 1) + [1] if
    S % 3 == 1, [3] * (K - 1) + [2] if S % 3 == 2; order 2: [2] * (S // 2) (+ [1] if S is odd)."""
    s = int(num_steps)
    if order == 3:
        k = s // 3 + 1
        return {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1], 2: [3] * (k - 1) + [2]}[s % 3]
    if order == 2:
        return [2] * (s // 2) + [1] * (s % 2)
    return [1] * s


def singlestep(
    process: NoiseProcess, outer: np.ndarray, orders: Sequence[int], inner: np.ndarray
) -> Stepper:
    """DPM-Solver-fast (Lu et al. 2022a Algorithms 1-2) with noise prediction over the outer
    grid [K + 1] with `orders` [K]; `inner` [K, 2] are each step's intermediate times s1, s2
    (the chosen spacing between s and t, as the reference code; `registry`), r_i =
    (lambda_si - lambda_s) / h. With phi_1 = expm1(h):
    DPM-Solver-1 (eq. 3.7, = DDIM): x_t = alpha_t/alpha_s x - sigma_t phi_1 eps_s.
    DPM-Solver-2 (Algorithm 1): u = alpha_s1/alpha_s x - sigma_s1 expm1(r1 h) eps_s,
      x_t = (order 1) - sigma_t/(2 r1) phi_1 (eps(u, s1) - eps_s).
    DPM-Solver-3 (Algorithm 2): u1 as above; u2 = alpha_s2/alpha_s x - sigma_s2 expm1(r2 h) eps_s
      - sigma_s2 r2/r1 (expm1(r2 h)/(r2 h) - 1) (eps(u1) - eps_s);
      x_t = (order 1) - sigma_t/r2 (phi_1/h - 1) (eps(u2) - eps_s).
    A step to t = 0 is order 1 (its eps coefficient is the limit sigma_t - alpha_t sigma_s /
    alpha_s). The step's order selects a `lax.switch` branch."""
    orders = np.asarray(orders)
    s, t = outer[:-1], outer[1:]
    lam_s, lam_t = _lambdas(process, s), _lambdas(process, t)
    a_s, a_t, sig_s, sig_t = (
        process.alpha(s),
        process.alpha(t),
        process.sigma(s),
        process.sigma(t),
    )
    rows = {**_base(process, outer, orders), "order": orders}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h = lam_t - lam_s
        phi_1 = np.expm1(h)
        rows["c_x"] = a_t / a_s
        rows["c_e"] = np.where(sig_t > 0, -sig_t * phi_1, sig_t - a_t * sig_s / a_s)
        r = (_lambdas(process, inner) - lam_s[:, None]) / h[:, None]
        r = np.where(orders[:, None] > 1, r, 0.5)
        r1, r2 = r[:, 0], r[:, 1]
        for i, ri in ((1, r1), (2, r2)):
            rows.update(point(process, inner[:, i - 1], f"_{i}"))
            rows[f"u{i}_x"] = process.alpha(inner[:, i - 1]) / a_s
            rows[f"u{i}_e"] = -process.sigma(inner[:, i - 1]) * np.expm1(ri * h)
        phi_22 = np.expm1(r2 * h) / (r2 * h) - 1.0
        rows["u2_d"] = -(r2 / r1) * process.sigma(inner[:, 1]) * phi_22
        rows["k_2"] = (0.5 / r1) * rows["c_e"]
        rows["k_3"] = -(1.0 / r2) * sig_t * (phi_1 / h - 1.0)
    for name in ("u1_x", "u1_e", "u2_x", "u2_e", "u2_d", "k_2", "k_3"):
        rows[name] = np.where(orders > 1, rows[name], 0.0)

    def first(x, eps_s, row, predict):
        return row["c_x"] * x + row["c_e"] * eps_s

    def second(x, eps_s, row, predict):
        eps_1 = predict(row["u1_x"] * x + row["u1_e"] * eps_s, row, "_1").eps
        return first(x, eps_s, row, predict) + row["k_2"] * (eps_1 - eps_s)

    def third(x, eps_s, row, predict):
        eps_1 = predict(row["u1_x"] * x + row["u1_e"] * eps_s, row, "_1").eps
        u2 = row["u2_x"] * x + row["u2_e"] * eps_s + row["u2_d"] * (eps_1 - eps_s)
        eps_2 = predict(u2, row, "_2").eps
        return first(x, eps_s, row, predict) + row["k_3"] * (eps_2 - eps_s)

    branches = (first, second, third)[: int(orders.max())]

    def step(x, row, predict, noise):
        p = predict(x, row)
        if len(branches) == 1:
            return first(x, p.eps, row, predict), p.x0
        fns = [lambda x, e, r, f=f: f(x, e, r, predict) for f in branches]
        return jax.lax.switch(row["order"] - 1, fns, x, p.eps, row), p.x0

    return Stepper(rows, step)


# ---------------------------------------------------------------------------------------------
# Karras et al. 2022, Algorithm 1 (deterministic Heun)


def heun(process: NoiseProcess, grid: np.ndarray) -> Stepper:
    """EDM Algorithm 1 with S_churn = 0 on the VP model over `grid` ending at t = 0: in EDM's
    variables x_k = x_t / alpha_t, sigma = sigma_t / alpha_t = exp(-lambda_t), D(x_k; sigma) =
    x0_hat(alpha_t x_k, t). Steps to sigma_{i+1} > 0 are Heun steps (lines 4-8):
      d_i = (x_i - D(x_i; sigma_i)) / sigma_i,  x' = x_i + (sigma_{i+1} - sigma_i) d_i,
      x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d'_i) / 2   (2 network calls);
    the last, to sigma = 0, is the Euler step x = D(x_{N-1}; sigma_{N-1}) (1 call), so N grid
    points cost 2 N - 1 calls."""
    euler = grid[1:] == 0.0
    rows = {**_base(process, grid, np.where(euler, 1, 2)), **point(process, grid[1:], "_next")}
    rows["euler"] = euler.astype(np.int32)
    with np.errstate(divide="ignore"):
        rows["edm_sigma"] = np.exp(-_lambdas(process, grid[:-1]))
        rows["edm_sigma_next"] = np.exp(-_lambdas(process, grid[1:]))

    def step(x, row, predict, noise):
        x_k = x / row["alpha"]
        d_x = predict(x, row).x0
        sigma, sigma_next = row["edm_sigma"], row["edm_sigma_next"]
        d = (x_k - d_x) / sigma
        x_euler = x_k + (sigma_next - sigma) * d

        def second_order(_):
            d_next = predict(row["alpha_next"] * x_euler, row, "_next").x0
            d_prime = (x_euler - d_next) / sigma_next
            return row["alpha_next"] * (x_k + (sigma_next - sigma) * 0.5 * (d + d_prime))

        x = jax.lax.cond(row["euler"] == 1, lambda _: d_x, second_order, None)
        return x, d_x

    return Stepper(rows, step)


# ---------------------------------------------------------------------------------------------
# Consistency models (Song et al. 2023, Algorithm 1)


def consistency(process: NoiseProcess, grid: np.ndarray) -> Stepper:
    """Multistep consistency sampling over `grid` ending at t = 0: at each t_k f(x, t_k)
    (`diffusion.consistency.consistency_fn`, one call), then unless t_{k+1} = 0 re-noise:
    x = alpha_{k+1} (f + sqrt(s_{k+1}^2 - s_min^2) z) (EDM noise levels s). One step (grid
    [1, 0]) is f(x_T, 1); the sample is the last f (the data plus s_min noise, x~ units)."""
    s_min, _ = consistency_lib.sigma_range(process)
    nxt, rows = grid[1:], _base(process, grid)
    with np.errstate(divide="ignore"):
        rows["edm_sigma"] = np.exp(-_lambdas(process, grid[:-1]))
        s_next = np.exp(-_lambdas(process, nxt))
    rows["alpha_next"] = np.where(nxt > 0, process.alpha(nxt), 1.0)
    rows["renoise"] = np.where(nxt > 0, np.sqrt(np.maximum(s_next**2 - s_min**2, 0.0)), 0.0)

    def step(x, row, predict, noise):
        f = consistency_lib.consistency_fn(
            x, predict(x, row).x0, row["alpha"], row["edm_sigma"], s_min
        )
        return row["alpha_next"] * (f + row["renoise"] * noise), f

    return Stepper(rows, step)


# ---------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023)


def _unipc_weights(
    lam_t: float, lam_hist: Sequence[float], order: int, corrector: bool, bh: str
) -> tuple[float, float, float, float, float]:
    """One UniP (predictor) or UniC (corrector) step of `order` with data prediction, from
    lambda_s0 = lam_hist[0] to lambda_t with earlier points lam_hist[1:order]. Returns
    (B_h, h_phi_1, w_1, w_2, w_t) such that
      x_t = sigma_t/sigma_s0 x - alpha_t h_phi_1 m_0
            - alpha_t B_h (w_1 (m_1 - m_0) + w_2 (m_2 - m_0) + w_t (m_t - m_0)),
    h = lambda_t - lambda_s0, h_phi_1 = expm1(-h), B_h = -h (bh1) or expm1(-h) (bh2);
    r_i = (lambda_si - lambda_s0) / h, D_i = (m_i - m_0) / r_i, R = [r^(k-1)]_k with r_order = 1,
    b_k = h_phi_k k! / B_h (reference `multistep_uni_pc_bh_update`); rho solves R rho = b (the
    predictor drops the last row and column; the predictor at order 2 and the corrector at
    order 1 use rho = 1/2, as the reference), and w_i = rho_i / r_i, w_t = rho_last."""
    h = lam_t - lam_hist[0]
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = hh if bh == "bh1" else np.expm1(hh)
    w = [0.0, 0.0, 0.0]
    if order == 1 and not corrector:
        return (b_h, h_phi_1, *w)
    rks = np.asarray([(lam_hist[i] - lam_hist[0]) / h for i in range(1, order)] + [1.0])
    h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1.0, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    big_r, b = np.stack([rks ** (i - 1) for i in range(1, order + 1)]), np.asarray(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(big_r, b)
        w[2] = rhos[-1]
    else:
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1])
    for i in range(order - 1):
        w[i] = rhos[i] / rks[i]
    return (b_h, h_phi_1, *w)


def unipc(process: NoiseProcess, grid: np.ndarray, orders: np.ndarray, bh: str = "bh2") -> Stepper:
    """UniPC (Zhao et al. 2023, Algorithms 2-3; reference `multistep_uni_pc_bh_update`, as
    diffusers' `UniPCMultistepScheduler`) with data prediction over `grid` [K + 1]: at row j
    the network's x0_hat m_j at x_j (one call), then UniC of order p_{j-1} corrects x_j with m_j
    (no extra call: the corrected x_j is not re-evaluated), then UniP of order p_j predicts
    x_{j+1}. A step to t = 0 is UniP-1: x = m_j. Coefficients per row (host, float64):
    predictor 'p_*' and corrector 'c_*' (`_unipc_weights`)."""
    k = grid.shape[0] - 1
    lam = _lambdas(process, grid)
    a, sig = process.alpha(grid), process.sigma(grid)
    order = np.where(sig[1:] > 0, orders, 1)
    cols = {n: np.zeros(k) for n in ("p_1", "p_2", "c_x", "c_0", "c_1", "c_2", "c_t")}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cols["p_x"] = sig[1:] / sig[:-1]
        cols["p_0"] = -a[1:] * np.expm1(lam[:-1] - lam[1:])
        for j in range(k):
            p = int(order[j])
            if p >= 2:
                b_h, _, w1, w2, _ = _unipc_weights(lam[j + 1], lam[j::-1], p, False, bh)
                cols["p_1"][j], cols["p_2"][j] = -a[j + 1] * b_h * w1, -a[j + 1] * b_h * w2
            if j >= 1:  # UniC of the step j - 1 -> j, with the order of that step's predictor
                b_h, h_phi_1, w1, w2, wt = _unipc_weights(
                    lam[j], lam[j - 1 :: -1], int(order[j - 1]), True, bh
                )
                cols["c_x"][j] = sig[j] / sig[j - 1]
                cols["c_0"][j] = -a[j] * h_phi_1
                cols["c_1"][j], cols["c_2"][j] = -a[j] * b_h * w1, -a[j] * b_h * w2
                cols["c_t"][j] = -a[j] * b_h * wt
    rows = {**_base(process, grid), **cols, "correct": (np.arange(k) >= 1).astype(np.int32)}

    def step(carry, row, predict, noise):
        x, x_prev, m1, m2, m3 = carry
        m0 = predict(x, row).x0
        corrected = (
            row["c_x"] * x_prev
            + row["c_0"] * m1
            + row["c_1"] * (m2 - m1)
            + row["c_2"] * (m3 - m1)
            + row["c_t"] * (m0 - m1)
        )
        x = jnp.where(row["correct"] == 1, corrected, x)
        x_next = row["p_x"] * x + row["p_0"] * m0 + row["p_1"] * (m1 - m0) + row["p_2"] * (m2 - m0)
        return (x_next, x, m0, m1, m2), m0

    def init(x):
        z = jnp.zeros_like(x)
        return (x, z, z, z, z)

    return Stepper(rows, step, init, lambda carry: carry[0])
