"""Training-free samplers: DDIM step spacings, DPM-Solver, DPM-Solver++ and Karras' Heun.

The ODE solvers run on the continuous-time view of the discrete chain (`continuous_time`,
DPM-Solver §3.4): t in [t_min, t_max] = [1/N, 1], alpha_t from the interpolated log(alpha_t),
sigma_t = sqrt(1 - alpha_t^2), lambda_t = log(alpha_t / sigma_t). They solve the probability-flow
ODE from x_T ~ N(0, I) at t = 1 and feed the network the fractional timestep t N - 1
(`continuous_time.model_timestep`) through the usual `DenoiseFn`. Each solver is ONE
`lax.scan` over its steps: the program (and its jaxpr) has the same size for any step count.

Methods (`config.sampling.method`), the step count `num_steps` and the network evaluations per
sample (`nfe`):

| method         | solver                                              | NFE              |
|----------------|-----------------------------------------------------|------------------|
| `ancestral`    | DDPM Algorithm 2 on the (respaced) chain            | chain length     |
| `ddim`         | DDIM eq. 12 on the respaced chain                   | chain length     |
| `dpm_solver++` | DPM-Solver++(2M), data prediction (Lu et al. 2022b) | num_steps        |
| `dpm_solver`   | DPM-Solver-1/2/3, noise prediction (Lu et al. 2022a)| num_steps        |
| `heun`         | Karras et al. 2022 Algorithm 1, S_churn = 0         | 2 num_steps - 1  |

Classifier-free guidance is a `DenoiseFn` (`sampling.classifier_free_guidance`): it doubles the
batch of each network call, not the number of calls, so `nfe` does not count it. Model outputs
eps, x0 and v are turned into (eps_hat, x0_hat) by `continuous_time.eps_and_x0_at`
(learned-variance channels are dropped); `clip_denoised` clips every solver's x0_hat to
[-1, 1] (static thresholding). Multistep solvers use lower orders for the first steps (no
history) and, with `lower_order_final`, for the last ones below 10 steps (reference code).
Snapshots (`snapshot_every`) are x0_hat at the start of every k-th step, counted back from the
last step as `sampling.sample_loop` does.

All step times and schedule coefficients are tabulated on the host in float64 at trace time
(the `VPSchedule` must be concrete, e.g. closed over) and enter the scan as float32 arrays,
so the scan body holds only the network calls and elementwise updates.

Step spacings (`config.sampling.spacing`; '' = the method's default, `DEFAULT_SPACING`):
- ODE solvers (`time_steps`): `uniform` in t, `logsnr` uniform in lambda (DPM-Solver's
  recommendation for low-resolution images such as CIFAR-10, used for its CIFAR-10 DDPM
  results; `uniform` is its recommendation for high-resolution and strongly guided
  sampling), `quadratic` in t (DPM-Solver's `time_quadratic`: t = (linspace(sqrt(t_max),
  sqrt(t_min)))^2, the continuous version of DDIM's quadratic), `karras` (EDM eq. 5, rho = 7,
  over sigma = exp(-lambda) = sqrt((1 - alphabar) / alphabar), the default for `heun`).
- Chain samplers (`chain_timesteps`, the 0-based timesteps kept by the respaced chain): for
  `ddim`, the DDIM paper's code, `uniform` = range(0, T, T // S) and `quadratic` =
  int(linspace(0, sqrt(0.8 T), S)^2). The DDIM code indexes alphas as
  alphas_cumprod_padded[t + 1] with alphas_cumprod_padded[0] = 1, so its timestep t is exactly
  this repo's 0-based index t (the paper's t + 1), fed to the network as t; its final step to
  "-1" is the respaced chain's step to alphabar_0 = 1. Repeated quadratic values (S near
  sqrt(0.8 T)) collapse, as a DDIM step between equal timesteps is the identity at eta = 0, and
  T // S not dividing T gives more than S steps, as in the DDIM code. For `ancestral`,
  `uniform` is IDDPM's even respacing (`respacing = str(S)`), `quadratic` the DDIM one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import continuous_time as ct
from diffusion_jax import errors, schedules
from diffusion_jax.continuous_time import VPSchedule
from diffusion_jax.sampling import DenoiseFn

METHODS = ("ancestral", "ddim", "dpm_solver++", "dpm_solver", "heun")
CHAIN_METHODS = ("ancestral", "ddim")  # run by `sampling.sample_loop` over a respaced chain
ODE_METHODS = ("dpm_solver++", "dpm_solver", "heun")  # run by `sample` here
SPACINGS = ("uniform", "logsnr", "quadratic", "karras")
METHOD_SPACINGS = {
    "ancestral": ("uniform", "quadratic"),
    "ddim": ("uniform", "quadratic"),
    "dpm_solver++": SPACINGS,
    "dpm_solver": SPACINGS,
    "heun": SPACINGS,
}
DEFAULT_SPACING = {
    "ancestral": "uniform",
    "ddim": "uniform",
    "dpm_solver++": "logsnr",
    "dpm_solver": "logsnr",
    "heun": "karras",
}
ORDERS = {
    "ancestral": (1,),
    "ddim": (1,),
    "dpm_solver++": (1, 2),
    "dpm_solver": (1, 2, 3),
    "heun": (2,),
}
DEFAULT_ORDER = {"ancestral": 1, "ddim": 1, "dpm_solver++": 2, "dpm_solver": 3, "heun": 2}
DPM_SOLVER_VARIANTS = ("singlestep", "multistep")
KARRAS_RHO = 7.0
# The reference code lowers the order of the final multistep updates only below 10 steps.
LOWER_ORDER_FINAL_BELOW = 10


def _allowed(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values)


def resolve_spacing(method: str, spacing: str = "") -> str:
    """The spacing to use: `spacing`, or the method's default when ''."""
    return spacing or DEFAULT_SPACING[method]


def resolve_order(method: str, order: int = 0) -> int:
    """The solver order to use: `order`, or the method's default when 0."""
    return int(order) or DEFAULT_ORDER[method]


# ---------------------------------------------------------------------------------------------
# Step spacings


def karras_sigmas(
    sigma_max: float, sigma_min: float, n: int, rho: float = KARRAS_RHO
) -> np.ndarray:
    """EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho, i = 0..n-1 ([n] float64, decreasing; [sigma_max] when n = 1)."""
    frac = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    inv = 1.0 / rho
    return (sigma_max**inv + frac * (sigma_min**inv - sigma_max**inv)) ** rho


def time_steps(vp: VPSchedule, num_steps: int, spacing: str, rho: float = KARRAS_RHO) -> np.ndarray:
    """[num_steps + 1] continuous times (float64 NumPy, computed on the host at trace time)
    from t_max = 1 down to t_min = 1/N, strictly decreasing with exact endpoints, spaced by
    `spacing` (module docstring; reference `get_time_steps`, EDM eq. 5 for `karras`)."""
    if spacing not in SPACINGS:
        raise errors.ConfigError(
            f"sampling.spacing={spacing!r} is not supported; allowed: {_allowed(SPACINGS)}"
        )
    if int(num_steps) < 1:
        raise errors.ConfigError(f"sampling.num_steps={num_steps!r} must be >= 1")
    n = int(num_steps)
    t_max, t_min = vp.t_max, vp.t_min
    if spacing == "uniform":
        t = np.linspace(t_max, t_min, n + 1)
    elif spacing == "quadratic":
        t = np.linspace(t_max**0.5, t_min**0.5, n + 1) ** 2
    else:
        lam_max, lam_min = ct.marginal_coefficients_host(vp, np.array([t_max, t_min]))[3]
        if spacing == "logsnr":  # lambda is smallest at t_max
            lam = np.linspace(lam_max, lam_min, n + 1)
        else:  # karras: sigma = exp(-lambda)
            lam = -np.log(karras_sigmas(np.exp(-lam_max), np.exp(-lam_min), n + 1, rho))
        t = ct.inverse_lambda_host(vp, lam)
    t[0], t[-1] = t_max, t_min
    return t


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str) -> list[int]:
    """The DDIM paper code's skip sequences as sorted 0-based indices (module docstring):
    `uniform` range(0, T, T // S), `quadratic` (linspace(0, sqrt(0.8 T), S)^2).astype(int)."""
    T, S = int(num_timesteps), int(num_steps)
    if not 1 <= S <= T:
        raise errors.ConfigError(f"sampling.num_steps={num_steps!r} must lie in [1, {T}]")
    if spacing == "uniform":
        seq = range(0, T, T // S)
    elif spacing == "quadratic":
        seq = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(int)
    else:
        raise errors.ConfigError(
            f"sampling.spacing={spacing!r} is not available for method 'ddim'; allowed: "
            f"{_allowed(METHOD_SPACINGS['ddim'])}"
        )
    return sorted({int(i) for i in seq})


def chain_timesteps(method: str, num_timesteps: int, num_steps: int, spacing: str) -> list[int]:
    """The 0-based timesteps kept by the respaced chain of `ancestral` or `ddim` with
    `num_steps` = S > 0: ancestral `uniform` is `schedules.space_timesteps(T, str(S))`
    (IDDPM respacing), everything else `ddim_timesteps`."""
    if method == "ancestral" and spacing == "uniform":
        if not 1 <= int(num_steps) <= int(num_timesteps):
            raise errors.ConfigError(
                f"sampling.num_steps={num_steps!r} must lie in [1, {num_timesteps}]"
            )
        return schedules.space_timesteps(int(num_timesteps), str(int(num_steps)))
    return ddim_timesteps(num_timesteps, num_steps, spacing)


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


# ---------------------------------------------------------------------------------------------
# Network evaluations


def _predict(
    vp: VPSchedule,
    denoise_fn: DenoiseFn,
    model_output: str,
    x: jax.Array,
    t: jax.Array,
    alpha: jax.Array,
    sigma: jax.Array,
    clip: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(eps_hat, x0_hat) [B, ...] of the network at continuous time t [] (alpha_t, sigma_t
    tabulated by `_grid`). With `clip` (`sampling.clip_denoised`), x0_hat is clipped to
    [-1, 1] and eps_hat re-derived from it, as the chain samplers do (DDPM's official code;
    DPM-Solver++'s static thresholding): every solver then sees the same clipped model."""
    steps = jnp.full(x.shape[:1], ct.model_timestep(vp, t), jnp.float32)
    out = denoise_fn(x, steps).astype(x.dtype)
    eps, x0 = ct.eps_and_x0_at(model_output, out, x, alpha, sigma)
    if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - alpha * x0) / sigma
    return eps, x0


def _grid(vp: VPSchedule, t: np.ndarray) -> dict[str, np.ndarray]:
    """Schedule values at the times t [K], tabulated on the host in float64 before the scan
    (`_f32` makes them float32 constants): t, log_alpha, alpha, sigma and lam, each [K]."""
    log_alpha, alpha, sigma, lam = ct.marginal_coefficients_host(vp, t)
    values = {"t": t, "log_alpha": log_alpha, "alpha": alpha, "sigma": sigma, "lam": lam}
    return {k: np.asarray(v, np.float64) for k, v in values.items()}


def _f32(table: dict[str, Any]) -> dict[str, jax.Array]:
    """Host tables as device constants: int32 counters/orders, float32 values."""
    ints = ("order", "j", "i")
    return {k: jnp.asarray(v, jnp.int32 if k in ints else jnp.float32) for k, v in table.items()}


def _model_steps(vp: VPSchedule, t: np.ndarray) -> jax.Array:
    """The network timesteps t N - 1 [K] of host times t (float32)."""
    return jnp.asarray(np.asarray(t) * vp.num_timesteps - 1.0, jnp.float32)


class _Snapshots:
    """x0_hat at every step position p (steps still to go after this one) with p % every == 0,
    written into a buffer [count + 1, ...] noisiest first; slot `count` is scratch."""

    def __init__(self, num_positions: int, every: int, like_shape: tuple[int, ...]) -> None:
        self.every = int(every)
        self.count = (num_positions - 1) // self.every + 1 if self.every else 0
        self.like_shape = like_shape

    def init(self) -> jax.Array | None:
        if not self.every:
            return None
        return jnp.zeros((self.count + 1,) + self.like_shape, jnp.float32)

    def put(self, buf: jax.Array | None, position: jax.Array, x0: jax.Array) -> jax.Array | None:
        if not self.every:
            return buf
        hit = position % self.every == 0
        slot = jnp.where(hit, self.count - 1 - position // self.every, self.count)
        return jax.lax.dynamic_update_index_in_dim(buf, x0.astype(buf.dtype), slot, 0)

    def result(self, buf: jax.Array | None, step_timesteps: jax.Array) -> dict[str, jax.Array]:
        """`step_timesteps` [P]: the network timestep of each step, in step order."""
        if not self.every:
            return {}
        num = step_timesteps.shape[0]
        positions = (self.count - 1 - np.arange(self.count)) * self.every
        return {
            "snapshots": buf[: self.count],
            "snapshot_timesteps": step_timesteps[num - 1 - positions],
        }


# ---------------------------------------------------------------------------------------------
# DPM-Solver and DPM-Solver++ (multistep)


def _multistep_update(
    algorithm: str,
    x: jax.Array,
    m: tuple[jax.Array, jax.Array, jax.Array],
    c: dict[str, jax.Array],
) -> jax.Array:
    """One multistep update from s to t with model values m = (m_s, m_{-1}, m_{-2}) at
    lambda_s, lambda_{-1}, lambda_{-2}; `c` holds the step's scalars (`_multistep_grid`), its
    'order' (1..3, traced) selecting the update.

    DPM-Solver++ (data prediction, Lu et al. 2022b eq. 9 and Algorithm 2, r0 = h_0 / h):
      x_t = sigma_t/sigma_s x - alpha_t phi_1 m_s                              (order 1)
          - 0.5 alpha_t phi_1 D1_0                                             (order 2)
      phi_1 = expm1(-h); order 3 adds alpha_t (phi_2 D1 - phi_3 D2) to the order-1 value,
      phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 0.5.
    DPM-Solver (noise prediction, Lu et al. 2022a eq. 3.7 and its multistep form):
      x_t = alpha_t/alpha_s x - sigma_t phi_1 m_s - 0.5 sigma_t phi_1 D1_0,  phi_1 = expm1(h);
      order 3: - sigma_t (phi_2 D1 + phi_3 D2), phi_2 = phi_1 / h - 1, phi_3 = phi_2 / h - 0.5.
    D1_0 = (m_s - m_{-1}) / r0, D1_1 = (m_{-1} - m_{-2}) / r1, D1 = D1_0 + r0/(r0+r1) (D1_0 -
    D1_1), D2 = (D1_0 - D1_1) / (r0 + r1), r1 = h_1 / h (reference code
    `multistep_dpm_solver_*_update`, 'dpmsolver' type). Missing history is masked finite.

    Kept as in the reference (and diffusers): D2 estimates h^2 m''/2 while the Taylor term of
    the exponential integral is h^2 phi_3 m'', so the order-3 update is locally O(h^3), and with
    the first-order warm-up every multistep variant converges with global order <= 2. The
    singlestep DPM-Solver-3 (`dpm_solver_singlestep`) is the third-order method.
    """
    m0, m1, m2 = m
    order, h, r0, r1 = c["order"], c["h"], c["r0"], c["r1"]
    d1_0 = (m0 - m1) / r0
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    if algorithm == "dpm_solver++":
        phi_1 = jnp.expm1(-h)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        a_t = c["alpha_t"]
        x1 = (c["sigma_t"] / c["sigma_s"]) * x - (a_t * phi_1) * m0
        x2 = x1 - 0.5 * (a_t * phi_1) * d1_0
        x3 = x1 + (a_t * phi_2) * d1 - (a_t * phi_3) * d2
    else:
        phi_1 = jnp.expm1(h)
        phi_2 = phi_1 / h - 1.0
        phi_3 = phi_2 / h - 0.5
        s_t = c["sigma_t"]
        x1 = jnp.exp(c["log_alpha_t"] - c["log_alpha_s"]) * x - (s_t * phi_1) * m0
        x2 = x1 - 0.5 * (s_t * phi_1) * d1_0
        x3 = x1 - (s_t * phi_2) * d1 - (s_t * phi_3) * d2
    return jnp.where(order == 1, x1, jnp.where(order == 2, x2, x3))


def multistep_orders(num_steps: int, order: int, lower_order_final: bool = True) -> np.ndarray:
    """Order of each multistep update [num_steps]: min(order, j + 1) warm-up (the first
    updates lack history), and with `lower_order_final` below `LOWER_ORDER_FINAL_BELOW` steps
    also min(., num_steps - j) (reference `sample(method='multistep')`)."""
    j = np.arange(int(num_steps))
    orders = np.minimum(order, j + 1)
    if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW:
        orders = np.minimum(orders, num_steps - j)
    return orders.astype(np.int32)


def _multistep_grid(vp: VPSchedule, ts: np.ndarray, orders: np.ndarray) -> dict[str, jax.Array]:
    """Per-step scalars [M] of the multistep updates from ts[j] to ts[j + 1] (host, float64,
    returned as float32 constants)."""
    g = _grid(vp, ts)
    lam = g["lam"]
    lam_s, lam_t = lam[:-1], lam[1:]
    lam_p1 = np.concatenate([lam[:1], lam[:-2]])  # lambda_{j-1} (lambda_0 when j = 0)
    lam_p2 = np.concatenate([lam[:1], lam[:1], lam[:-3]])[: lam_s.shape[0]]
    h = lam_t - lam_s
    order = np.asarray(orders)
    return _f32(
        {
            "t_s": ts[:-1],
            "order": order,
            "h": h,
            "r0": np.where(order >= 2, (lam_s - lam_p1) / h, 1.0),
            "r1": np.where(order >= 3, (lam_p1 - lam_p2) / h, 1.0),
            "log_alpha_s": g["log_alpha"][:-1],
            "log_alpha_t": g["log_alpha"][1:],
            "alpha_s": g["alpha"][:-1],
            "alpha_t": g["alpha"][1:],
            "sigma_s": g["sigma"][:-1],
            "sigma_t": g["sigma"][1:],
        }
    )


def dpm_solver_multistep(
    vp: VPSchedule,
    denoise_fn: DenoiseFn,
    x_T: jax.Array,
    *,
    algorithm: str = "dpm_solver++",
    model_output: str = "eps",
    num_steps: int = 20,
    order: int = 2,
    spacing: str = "logsnr",
    lower_order_final: bool = True,
    clip_denoised: bool = False,
    snapshot_every: int = 0,
) -> dict[str, jax.Array]:
    """Multistep DPM-Solver(++) from x_T [B, ...] at t = 1 to t_min = 1/N: one network call per
    step (NFE = num_steps), the update of each step from `_multistep_update`.

    `algorithm` 'dpm_solver++' uses the data prediction x0_hat, 'dpm_solver' the noise
    prediction eps_hat (both from the clipped x0_hat with `clip_denoised`: static
    thresholding, Lu et al. 2022b §5). Returns {'sample': x_{t_min}} (+ 'snapshots'
    [S, B, ...] of x0_hat and 'snapshot_timesteps' [S] with `snapshot_every`)."""
    ts = time_steps(vp, num_steps, spacing)
    grid = _multistep_grid(vp, ts, multistep_orders(num_steps, order, lower_order_final))
    snap = _Snapshots(num_steps, snapshot_every, x_T.shape)

    def step(carry, c):
        x, m1, m2, j, buf = carry
        eps, x0 = _predict(
            vp, denoise_fn, model_output, x, c["t_s"], c["alpha_s"], c["sigma_s"], clip_denoised
        )
        m0 = x0 if algorithm == "dpm_solver++" else eps
        buf = snap.put(buf, num_steps - 1 - j, x0)
        x = _multistep_update(algorithm, x, (m0, m1, m2), c)
        return (x, m0, m1, j + 1, buf), None

    zeros = jnp.zeros_like(x_T)
    init = (x_T, zeros, zeros, jnp.int32(0), snap.init())
    (x, *_, buf), _ = jax.lax.scan(step, init, grid)
    return {"sample": x, **snap.result(buf, _model_steps(vp, ts[:-1]))}


# ---------------------------------------------------------------------------------------------
# DPM-Solver (singlestep, "DPM-Solver-fast")


def dpm_solver_singlestep(
    vp: VPSchedule,
    denoise_fn: DenoiseFn,
    x_T: jax.Array,
    *,
    model_output: str = "eps",
    num_steps: int = 20,
    order: int = 3,
    spacing: str = "logsnr",
    snapshot_every: int = 0,
    clip_denoised: bool = False,
) -> dict[str, jax.Array]:
    """DPM-Solver-fast (Lu et al. 2022a Algorithms 1-2, §3.3) with noise prediction: outer
    steps of orders `singlestep_orders(num_steps, order)` (NFE = num_steps). With `logsnr`
    spacing the K + 1 outer times are uniform in lambda; otherwise they are the
    num_steps-step grid taken at the cumulative orders (as the reference code).

    DPM-Solver-1 (eq. 3.7, = DDIM): x_t = alpha_t/alpha_s x - sigma_t expm1(h) eps_s.
    DPM-Solver-2 (Algorithm 1, r1 = 1/2): u = alpha_s1/alpha_s x - sigma_s1 expm1(r1 h) eps_s,
      x_t = alpha_t/alpha_s x - sigma_t expm1(h) eps_s - sigma_t/(2 r1) expm1(h) (eps(u, s1) -
      eps_s).
    DPM-Solver-3 (Algorithm 2, r1 = 1/3, r2 = 2/3): u1 as above; u2 = alpha_s2/alpha_s x -
      sigma_s2 expm1(r2 h) eps_s - sigma_s2 r2/r1 (expm1(r2 h)/(r2 h) - 1) (eps(u1) - eps_s);
      x_t = alpha_t/alpha_s x - sigma_t expm1(h) eps_s - sigma_t/r2 (expm1(h)/h - 1)
      (eps(u2) - eps_s).
    Intermediate times are lambda_s + r h mapped back by `inverse_lambda` (all computed before
    the scan). The step's order selects a `lax.switch` branch (one traced copy of each).
    Returns as `dpm_solver_multistep` ('snapshots' count outer steps)."""
    orders = singlestep_orders(num_steps, order)
    k = len(orders)
    if spacing == "logsnr":
        ts = time_steps(vp, k, "logsnr")
    else:
        ts = time_steps(vp, num_steps, spacing)[np.cumsum([0] + orders)]
    snap = _Snapshots(k, snapshot_every, x_T.shape)
    g = _grid(vp, ts)
    lam_s, h = g["lam"][:-1], g["lam"][1:] - g["lam"][:-1]
    r1 = np.where(np.asarray(orders) == 3, 1.0 / 3.0, 0.5)  # order 2: r1 = 1/2
    g1 = _grid(vp, ct.inverse_lambda_host(vp, lam_s + r1 * h))
    g2 = _grid(vp, ct.inverse_lambda_host(vp, lam_s + (2.0 / 3.0) * h))  # order 3: r2 = 2/3
    xs = {
        "j": np.arange(k),
        "order": np.asarray(orders),
        "h": h,
        "r1": r1,
        "t_s": ts[:-1],
        "alpha_s": g["alpha"][:-1],
        "sigma_s": g["sigma"][:-1],
        "alpha_ts": np.exp(g["log_alpha"][1:] - g["log_alpha"][:-1]),  # alpha_t / alpha_s
        "sigma_t": g["sigma"][1:],
        "t_1": g1["t"],
        "alpha_1": g1["alpha"],
        "alpha_1s": np.exp(g1["log_alpha"] - g["log_alpha"][:-1]),
        "sigma_1": g1["sigma"],
        "t_2": g2["t"],
        "alpha_2": g2["alpha"],
        "alpha_2s": np.exp(g2["log_alpha"] - g["log_alpha"][:-1]),
        "sigma_2": g2["sigma"],
    }

    def eps_at(x, c, i):
        return _predict(
            vp,
            denoise_fn,
            model_output,
            x,
            c[f"t_{i}"],
            c[f"alpha_{i}"],
            c[f"sigma_{i}"],
            clip_denoised,
        )[0]

    def first(x, eps_s, c):
        return c["alpha_ts"] * x - c["sigma_t"] * jnp.expm1(c["h"]) * eps_s

    def second(x, eps_s, c):
        h, r1 = c["h"], c["r1"]
        u = c["alpha_1s"] * x - c["sigma_1"] * jnp.expm1(r1 * h) * eps_s
        eps_1 = eps_at(u, c, 1)
        phi_1 = jnp.expm1(h)
        return first(x, eps_s, c) - (0.5 / r1) * (c["sigma_t"] * phi_1) * (eps_1 - eps_s)

    def third(x, eps_s, c):
        h, r1, r2 = c["h"], c["r1"], 2.0 / 3.0
        phi_12 = jnp.expm1(r2 * h)
        phi_22 = phi_12 / (r2 * h) - 1.0
        phi_2 = jnp.expm1(h) / h - 1.0
        u1 = c["alpha_1s"] * x - c["sigma_1"] * jnp.expm1(r1 * h) * eps_s
        eps_1 = eps_at(u1, c, 1)
        u2 = (
            c["alpha_2s"] * x
            - (c["sigma_2"] * phi_12) * eps_s
            - (r2 / r1) * (c["sigma_2"] * phi_22) * (eps_1 - eps_s)
        )
        eps_2 = eps_at(u2, c, 2)
        return first(x, eps_s, c) - (1.0 / r2) * (c["sigma_t"] * phi_2) * (eps_2 - eps_s)

    branches = (first, second, third)[: max(orders)]

    def step(carry, c):
        x, buf = carry
        eps_s, x0 = _predict(
            vp, denoise_fn, model_output, x, c["t_s"], c["alpha_s"], c["sigma_s"], clip_denoised
        )
        buf = snap.put(buf, k - 1 - c["j"], x0)
        if len(branches) == 1:
            x = first(x, eps_s, c)
        else:
            x = jax.lax.switch(c["order"] - 1, branches, x, eps_s, c)
        return (x, buf), None

    (x, buf), _ = jax.lax.scan(step, (x_T, snap.init()), _f32(xs))
    return {"sample": x, **snap.result(buf, _model_steps(vp, ts[:-1]))}


# ---------------------------------------------------------------------------------------------
# Karras et al. 2022, Algorithm 1 (deterministic Heun)


def heun_sample(
    vp: VPSchedule,
    denoise_fn: DenoiseFn,
    x_T: jax.Array,
    *,
    model_output: str = "eps",
    num_steps: int = 18,
    spacing: str = "karras",
    rho: float = KARRAS_RHO,
    snapshot_every: int = 0,
    clip_denoised: bool = False,
) -> dict[str, jax.Array]:
    """EDM Algorithm 1 with S_churn = 0 on the VP model: x_k = x_t / alpha_t, sigma =
    sigma_t / alpha_t = exp(-lambda_t), D(x_k; sigma_i) = x0_hat(alpha_{t_i} x_k, t_i).

    The N = num_steps noise levels sigma_0 > ... > sigma_{N-1} run from sigma(t_max) to
    sigma(t_min) (EDM eq. 5 with rho for `karras`, else exp(-lambda) of `time_steps`), and
    sigma_N = 0. Steps i < N - 1 are Heun steps (Algorithm 1 lines 4-8):
      d_i = (x_i - D(x_i; sigma_i)) / sigma_i,  x' = x_i + (sigma_{i+1} - sigma_i) d_i,
      x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d'_i) / 2,
    and the last is an Euler step to sigma = 0, x_N = D(x_{N-1}; sigma_{N-1}) (NFE 2N - 1).
    x_T [B, ...] ~ N(0, I) is the VP sample at t = 1. Returns {'sample': x_N} (the data, at
    sigma = 0), + 'snapshots' of D at each step's start with `snapshot_every`."""
    n = int(num_steps)
    if n < 1:
        raise errors.ConfigError(f"sampling.num_steps={num_steps!r} must be >= 1")
    ts = time_steps(vp, n - 1, spacing, rho) if n > 1 else np.array([vp.t_max])
    g = _grid(vp, ts)
    sigmas = np.exp(-g["lam"])
    snap = _Snapshots(n, snapshot_every, x_T.shape)

    def denoise(x_k, t, alpha, sigma):
        """D(x_k; sigma_t / alpha_t): x0_hat at x_t = alpha_t x_k."""
        x0 = _predict(vp, denoise_fn, model_output, alpha * x_k, t, alpha, sigma, clip_denoised)
        return x0[1]

    xs = {
        "i": np.arange(n - 1),
        "t": ts[:-1],
        "t_next": ts[1:],
        "alpha": g["alpha"][:-1],
        "alpha_next": g["alpha"][1:],
        "vp_sigma": g["sigma"][:-1],
        "vp_sigma_next": g["sigma"][1:],
        "sigma": sigmas[:-1],
        "sigma_next": sigmas[1:],
    }

    def step(carry, c):
        x, buf = carry
        d_x = denoise(x, c["t"], c["alpha"], c["vp_sigma"])
        buf = snap.put(buf, n - 1 - c["i"], d_x)
        dsigma = c["sigma_next"] - c["sigma"]
        d = (x - d_x) / c["sigma"]
        x_euler = x + dsigma * d
        d_prime = (
            x_euler - denoise(x_euler, c["t_next"], c["alpha_next"], c["vp_sigma_next"])
        ) / c["sigma_next"]
        return (x + dsigma * 0.5 * (d + d_prime), buf), None

    x_k = x_T / jnp.float32(g["alpha"][0])
    (x_k, buf), _ = jax.lax.scan(step, (x_k, snap.init()), _f32(xs))
    last = _f32({k: g[k][-1] for k in ("t", "alpha", "sigma")})
    # Euler step to sigma_N = 0: x + (0 - sigma) (x - D) / sigma = D
    x_0 = denoise(x_k, last["t"], last["alpha"], last["sigma"])
    buf = snap.put(buf, jnp.int32(0), x_0)
    return {"sample": x_0, **snap.result(buf, _model_steps(vp, ts))}


# ---------------------------------------------------------------------------------------------
# Front door, NFE and configuration checks


def sample(
    method: str,
    vp: VPSchedule,
    denoise_fn: DenoiseFn,
    shape: Sequence[int],
    key: jax.Array | None,
    *,
    model_output: str = "eps",
    num_steps: int = 20,
    order: int = 0,
    spacing: str = "",
    variant: str = "singlestep",
    lower_order_final: bool = True,
    clip_denoised: bool = False,
    snapshot_every: int = 0,
    x_init: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Runs ODE solver `method` ('dpm_solver++' | 'dpm_solver' | 'heun') from x_T ~ N(0, I)
    [B, ...] = `shape` (drawn as `sampling.sample_loop` draws it from `key`, so the chain
    samplers and the solvers start from the same x_T) or `x_init`. `order` 0 / `spacing` ''
    pick the method's default; `variant` ('singlestep' | 'multistep') applies to 'dpm_solver',
    `clip_denoised` to every solver (`_predict`).
    Returns {'sample', ['snapshots', 'snapshot_timesteps']}.
    """
    if method not in ODE_METHODS:
        raise ValueError(
            f"solvers.sample: method={method!r} is not an ODE solver; allowed: "
            f"{_allowed(ODE_METHODS)} (the chain methods run in sampling.sample_loop)"
        )
    check_solver_arguments(method, num_steps, order, spacing, variant, model_output)
    shape = tuple(shape)
    x = (
        jax.random.normal(jax.random.split(key)[0], shape, jnp.float32)
        if x_init is None
        else x_init
    )
    if x.shape != shape:
        raise ValueError(f"x_init has shape {x.shape}; expected {shape}")
    order, spacing = resolve_order(method, order), resolve_spacing(method, spacing)
    common = dict(
        model_output=model_output,
        num_steps=int(num_steps),
        spacing=spacing,
        snapshot_every=snapshot_every,
        clip_denoised=clip_denoised,
    )
    if method == "heun":
        return heun_sample(vp, denoise_fn, x, **common)
    if method == "dpm_solver" and variant == "singlestep":
        return dpm_solver_singlestep(vp, denoise_fn, x, order=order, **common)
    return dpm_solver_multistep(
        vp,
        denoise_fn,
        x,
        algorithm=method,
        order=order,
        lower_order_final=lower_order_final,
        **common,
    )


def nfe(
    method: str,
    num_steps: int,
    order: int = 0,
    *,
    num_timesteps: int | None = None,
    spacing: str = "",
) -> int:
    """Network evaluations per sample. ODE solvers: `num_steps` (DPM-Solver singlestep and
    multistep, any order; DPM-Solver++), 2 num_steps - 1 (Heun). `ancestral`/`ddim`: the chain
    length, which is `num_steps` unless `num_timesteps` is given, when the kept timesteps are
    counted (DDIM's uniform stride can keep more, its quadratic spacing fewer). Classifier-free
    guidance runs both passes in one batch of 2B, so it does not change the count; `order` is
    accepted for symmetry (no method's NFE depends on it)."""
    if method not in METHODS:
        raise errors.ConfigError(
            f"sampling.method={method!r} is not supported; allowed: {_allowed(METHODS)}"
        )
    del order
    n = int(num_steps)
    if method == "heun":
        return 2 * n - 1
    if method in CHAIN_METHODS and num_timesteps is not None:
        return len(chain_timesteps(method, num_timesteps, n, resolve_spacing(method, spacing)))
    return n


def check_solver_arguments(
    method: str,
    num_steps: int,
    order: int = 0,
    spacing: str = "",
    variant: str = "singlestep",
    model_output: str | None = None,
    num_timesteps: int | None = None,
) -> None:
    """ValueError naming the bad value and the allowed ones, for one method's settings
    (num_steps 0 means 'not given', which only the chain methods accept)."""
    if method not in METHODS:
        raise errors.ConfigError(
            f"sampling.method={method!r} is not supported; allowed: {_allowed(METHODS)}"
        )
    if spacing and spacing not in SPACINGS:
        raise errors.ConfigError(
            f"sampling.spacing={spacing!r} is not supported; allowed: '' (the "
            f"method's default), {_allowed(SPACINGS)}"
        )
    if spacing and spacing not in METHOD_SPACINGS[method]:
        raise errors.ConfigError(
            f"sampling.spacing={spacing!r} is not available for method "
            f"{method!r}; allowed: {_allowed(METHOD_SPACINGS[method])}"
        )
    if int(order) != order or (order and order not in ORDERS[method]):
        raise errors.ConfigError(
            f"sampling.order={order!r} is not available for method {method!r}; "
            f"allowed: 0 (the default, {DEFAULT_ORDER[method]}), "
            f"{_allowed(ORDERS[method])}"
        )
    if variant not in DPM_SOLVER_VARIANTS:
        raise errors.ConfigError(
            f"sampling.dpm_solver_variant={variant!r} is not supported; allowed: "
            f"{_allowed(DPM_SOLVER_VARIANTS)}"
        )
    upper = f", {num_timesteps}" if num_timesteps is not None else ", T"
    if (
        int(num_steps) != num_steps
        or num_steps < 0
        or (num_timesteps is not None and num_steps > num_timesteps)
    ):
        raise errors.ConfigError(
            f"sampling.num_steps={num_steps!r} must be 0 (not given) or lie in [1{upper}]"
        )
    if method in ODE_METHODS and num_steps < 1:
        raise errors.ConfigError(
            f"sampling.num_steps={num_steps!r}: method {method!r} needs num_steps in [1{upper}]"
        )
    if method in ODE_METHODS and model_output is not None:
        if model_output not in ct.ODE_MODEL_OUTPUTS:
            raise errors.ConfigError(
                f"diffusion.model_output={model_output!r} has no ODE form for "
                f"method {method!r}; allowed: {_allowed(ct.ODE_MODEL_OUTPUTS)}"
            )


def _get(cfg: Mapping[str, Any] | Any, name: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def validate_sampling(sampling: Any, num_timesteps: int, model_output: str | None = None) -> None:
    """Checks `config.sampling` before anything compiles: ValueError naming the bad value and
    the allowed ones for an unknown method, spacing or DPM-Solver variant, num_steps < 0 or
    > T (0 = not given; the ODE solvers need >= 1), an order the method lacks, num_steps > 0
    together with a `respacing` string (ancestral/ddim: set one of them), a respacing string
    with an ODE solver (they take num_steps), and (when given) a model output without an ODE
    form (xprev) for an ODE solver."""
    method = _get(sampling, "method", "ancestral")
    num_steps = _get(sampling, "num_steps", 0)
    respacing = _get(sampling, "respacing", "")
    check_solver_arguments(
        method,
        num_steps,
        _get(sampling, "order", 0),
        _get(sampling, "spacing", ""),
        _get(sampling, "dpm_solver_variant", "singlestep"),
        model_output,
        int(num_timesteps),
    )
    if respacing and num_steps and method in CHAIN_METHODS:
        raise errors.ConfigError(
            f"sampling.num_steps={num_steps} and sampling.respacing={respacing!r} "
            "both choose the chain; set one of them (num_steps=0 or respacing='')"
        )
    if respacing and method in ODE_METHODS:
        raise errors.ConfigError(
            f"sampling.respacing={respacing!r} applies to the chain methods "
            f"({_allowed(CHAIN_METHODS)}); method {method!r} takes "
            "sampling.num_steps, so set respacing=''"
        )
    if method in CHAIN_METHODS and num_steps:
        chain_timesteps(
            method, num_timesteps, num_steps, resolve_spacing(method, _get(sampling, "spacing", ""))
        )


def step_settings(sampling: Any) -> dict[str, Any]:
    """The step settings a sample depends on, resolved ('' / 0 replaced by the method's
    defaults, None where the method does not use them), e.g. for a sample folder's
    settings record: num_steps, spacing, order, dpm_solver_variant, lower_order_final."""
    method = _get(sampling, "method", "ancestral")
    num_steps = int(_get(sampling, "num_steps", 0))
    variant = _get(sampling, "dpm_solver_variant", "singlestep")
    multistep = method == "dpm_solver++" or (method == "dpm_solver" and variant == "multistep")
    steps_used = method in ODE_METHODS or num_steps > 0
    return {
        "num_steps": num_steps,
        "spacing": resolve_spacing(method, _get(sampling, "spacing", "")) if steps_used else None,
        "order": resolve_order(method, _get(sampling, "order", 0))
        if method in ODE_METHODS
        else None,
        "dpm_solver_variant": variant if method == "dpm_solver" else None,
        "lower_order_final": bool(_get(sampling, "lower_order_final", True)) if multistep else None,
    }
