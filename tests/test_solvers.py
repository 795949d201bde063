"""Time-grid samplers (DPM-Solver, DPM-Solver++, SDE-DPM-Solver++, UniPC, Heun) and DDIM:
Gaussian data, whose probability-flow ODE is linear and solved in closed form, checks each
solver's error and convergence order; then grids, the program structure (one scan, traced
once), sharding, guidance, NFE and settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import draw, sampler_config
from jax.extend import core as jex_core
from jax.sharding import Mesh

from diffusion_jax.diffusion import grids
from diffusion_jax.diffusion import process as process_lib
from diffusion_jax.diffusion import schedules as S
from diffusion_jax.diffusion.process import NoiseProcess
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.sampling import generation, registry, run

T = 1000
BETAS = S.get_beta_schedule("linear", T)
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)  # float64
LOG_ALPHA = 0.5 * np.log(ALPHAS_CUMPROD)  # log(alpha_t) at t = (i + 1) / T
SCHED = NoiseProcess(BETAS)
S2 = 0.25  # data x_0 ~ N(0, S2), elementwise
X_T = jax.random.normal(jax.random.PRNGKey(0), (8, 2, 1, 1))

# Every time-grid sampler, with the options that change its algorithm.
ODE_CASES = [
    ("dpm_solver++", {}),
    ("dpm_solver", {}),
    ("dpm_solver", {"dpm_solver_variant": "multistep"}),
    ("unipc", {}),
    ("unipc", {"order": 3, "unipc_variant": "bh1"}),
    ("heun", {}),
]


def alpha_sigma(timesteps):
    """alpha_t, sigma_t at network timesteps (t = (timestep + 1) / T), from float64 knots:
    log(alpha) linear in t between the integer timesteps (DPM-Solver's interpolation)."""
    t = (np.asarray(timesteps, np.float64) + 1.0) / T
    log_alpha = np.interp(t, np.arange(T + 1) / T, np.concatenate([[0.0], LOG_ALPHA]))
    return np.exp(log_alpha), np.sqrt(-np.expm1(2 * log_alpha))


def gaussian_denoiser(kind: str = "eps", variance_channels: bool = False):
    """The optimal network for data N(0, S2 I), at fractional timesteps too:
    E[eps | x_t] = sigma_t x_t / (alpha_t^2 S2 + sigma_t^2), E[x0 | x_t] = alpha_t S2 x_t / (.),
    v = alpha_t eps - sigma_t x0. `variance_channels` appends junk learned-variance channels."""
    knots_t = jnp.asarray(np.arange(T + 1) / T, jnp.float32)
    knots = jnp.asarray(np.concatenate([[0.0], LOG_ALPHA]), jnp.float32)

    def denoise(x, timesteps):
        t = (jnp.asarray(timesteps, jnp.float32) + 1.0) / T
        a = jnp.exp(jnp.interp(t, knots_t, knots)).reshape((-1,) + (1,) * (x.ndim - 1))
        sig = jnp.sqrt(1.0 - a**2)
        eps = sig * x / (a**2 * S2 + sig**2)
        x0 = a * S2 * x / (a**2 * S2 + sig**2)
        out = {"eps": eps, "x0": x0, "v": a * eps - sig * x0}[kind]
        return jnp.concatenate([out, jnp.full_like(out, 7.0)], -1) if variance_channels else out

    return denoise


def exact_flow(x, log_alpha_from: float, log_alpha_to: float) -> np.ndarray:
    """The probability-flow ODE of Gaussian data is linear: x_t is x_s times
    sqrt(alpha_t^2 S2 + sigma_t^2) / sqrt(alpha_s^2 S2 + sigma_s^2) (float64)."""
    scale = lambda la: np.exp(2 * la) * S2 + 1.0 - np.exp(2 * la)
    return np.asarray(x, np.float64) * np.sqrt(scale(log_alpha_to) / scale(log_alpha_from))


def solve(num_steps: int, method: str, **options) -> tuple[np.ndarray, np.ndarray]:
    """(sample, exact solution) of `method` from X_T over the linear schedule (to t_min unless
    `denoise_to_zero` is given)."""
    options = {"denoise_to_zero": False, **options}
    config = sampler_config(method=method, num_steps=num_steps, **options)
    got = np.asarray(draw(config, gaussian_denoiser(), X_T)["sample"])
    grid = registry.build(config).rows["t_model"]
    start = LOG_ALPHA[int(round(grid[0]))]
    to_zero = method in ("ddim", "heun") or options["denoise_to_zero"]
    return got, exact_flow(X_T, start, 0.0 if to_zero else LOG_ALPHA[0])


CONVERGENCE = {
    "ddim": ("ddim", {}),
    "dpm_solver-1": ("dpm_solver", {"order": 1}),
    "dpm_solver++(2M) to t_min": ("dpm_solver++", {"denoise_to_zero": False}),
    "dpm_solver++(2M) to zero": ("dpm_solver++", {"denoise_to_zero": True}),
    "heun": ("heun", {}),
    "dpm_solver-3": ("dpm_solver", {"order": 3}),
    "unipc-2": ("unipc", {}),
    "unipc-3 bh1": ("unipc", {"order": 3, "unipc_variant": "bh1"}),
}


@pytest.mark.parametrize(
    "name, fit_steps, slope_range, max_error_50",
    [
        ("ddim", (5, 10, 20, 50), (0.8, 1.2), 0.08),
        ("dpm_solver-1", (5, 10, 20, 50), (0.8, 1.2), 0.06),
        # pre-asymptotic below 20 steps (lambda spans ~10, so h ~ 1 at 10 steps)
        ("dpm_solver++(2M) to t_min", (20, 50, 100), (1.7, 2.4), 5e-3),
        # the last step from the second-to-last point to 0 gains on the way to its floor
        # (x0_hat at t_min, ~1.5 sigma_min^2 relative): 1.25e-2, 2.0e-3, 3.4e-4 at 20, 50, 100
        ("dpm_solver++(2M) to zero", (20, 50, 100), (1.9, 2.7), 5e-3),
        ("heun", (10, 20, 50), (1.7, 2.7), 1e-2),
        # step counts = 2 mod 3: outer orders [3, ..., 3, 2], no first-order final step
        ("dpm_solver-3", (20, 35, 50, 65), (2.6, 3.9), 1e-3),
        ("unipc-2", (20, 50, 100), (2.6, 3.3), 1e-3),
        ("unipc-3 bh1", (20, 50, 100), (2.7, 3.4), 1e-4),
    ],
)
def test_gaussian_error_and_convergence_order(name, fit_steps, slope_range, max_error_50):
    """Relative max error against the exact flow at 5/10/20/50 steps, and the log-log slope of
    error vs steps (the global order) over `fit_steps`. Multistep DPM-Solver-3 is left out:
    its first-order warm-up (and the reference's third-order term, see
    `steppers._multistep_columns`) make it globally second order. UniPC-p with its corrector is
    of order p + 1 (Zhao et al. 2023, Theorem 3.1)."""
    steps = sorted({5, 10, 20, 50, *fit_steps})
    errors = {}
    for n in steps:
        got, exact = solve(n, *CONVERGENCE[name][:1], **CONVERGENCE[name][1])
        errors[n] = np.abs(got - exact).max() / np.abs(exact).max()
    assert errors[10] > errors[20] > errors[50], errors
    assert errors[50] < max_error_50, errors
    slope = -np.polyfit(np.log(fit_steps), np.log([errors[n] for n in fit_steps]), 1)[0]
    assert slope_range[0] < slope < slope_range[1], (slope, errors)


def test_denoise_to_zero_ends_at_the_data():
    """With `denoise_to_zero` the last of the S steps goes to sigma = 0, so the sample is the
    last x0_hat (the last snapshot) and solves the flow to t = 0, at the same NFE."""
    config = sampler_config(method="dpm_solver++", num_steps=50, denoise_to_zero=True)
    out = draw(config, gaussian_denoiser(), X_T, snapshot_every=1)
    np.testing.assert_array_equal(out["snapshots"][-1], out["sample"])
    exact = exact_flow(X_T, LOG_ALPHA[-1], 0.0)
    assert np.abs(out["sample"] - exact).max() / np.abs(exact).max() < 3e-3
    assert registry.build(config).nfe == 50


def _unipc_reference(x_T, num_steps, order, bh):
    """UniPC (data prediction) written as the reference scheduler loop, in float64 NumPy:
    a list of model outputs, UniC then UniP at each step, weights solved per step."""
    t = grids.time_grid(SCHED, num_steps, "logsnr")
    a, sig = SCHED.alpha(t), SCHED.sigma(t)
    lam = np.log(a / sig)
    x = np.asarray(x_T, np.float64)
    ms, last, this_order = [], None, 1

    def weights(k, s0, hist, p, corrector):
        h = lam[k] - lam[s0]
        hh, rks = -h, []
        for i in range(1, p):
            rks.append((lam[hist[i]] - lam[s0]) / h)
        rks.append(1.0)
        h_phi_1 = np.expm1(hh)
        b_h = hh if bh == "bh1" else np.expm1(hh)
        h_phi_k, fact, b = h_phi_1 / hh - 1, 1, []
        for i in range(1, p + 1):
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        r = np.array([np.power(rks, i - 1) for i in range(1, p + 1)])
        if corrector:
            rho = np.array([0.5]) if p == 1 else np.linalg.solve(r, b)
        else:
            rho = np.array([0.5]) if p == 2 else np.linalg.solve(r[:-1, :-1], b[:-1])
        return rks, rho, h_phi_1, b_h

    denoise = lambda x, k: a[k] * S2 * x / (a[k] ** 2 * S2 + sig[k] ** 2)
    for k in range(num_steps):
        m = denoise(x, k)
        if k > 0:  # UniC with the previous predictor's order
            p = this_order
            rks, rho, h_phi_1, b_h = weights(k, k - 1, [k - 1, k - 2, k - 3], p, True)
            corr = sum(rho[i] * (ms[-(i + 2)] - ms[-1]) / rks[i] for i in range(p - 1))
            x = sig[k] / sig[k - 1] * last - a[k] * h_phi_1 * ms[-1]
            x = x - a[k] * b_h * (corr + rho[-1] * (m - ms[-1]))
        ms.append(m)
        this_order = min(order, num_steps - k, k + 1)
        last = x
        rks, rho, h_phi_1, b_h = weights(k + 1, k, [k, k - 1, k - 2], this_order, False)
        pred = sum(rho[i] * (ms[-(i + 2)] - ms[-1]) / rks[i] for i in range(this_order - 1))
        x = sig[k + 1] / sig[k] * x - a[k + 1] * h_phi_1 * ms[-1] - a[k + 1] * b_h * pred
    return x


@pytest.mark.parametrize("order, bh", [(1, "bh2"), (2, "bh2"), (2, "bh1"), (3, "bh1"), (3, "bh2")])
def test_unipc_matches_the_reference_loop(order, bh):
    """The scanned UniPC table equals the reference scheduler's list-based loop (float64)."""
    for n in (3, 6, 11):
        config = sampler_config(
            method="unipc", num_steps=n, order=order, unipc_variant=bh, denoise_to_zero=False
        )
        config.diffusion.model_output = "x0"
        got = draw(config, gaussian_denoiser("x0"), X_T)["sample"]
        np.testing.assert_allclose(got, _unipc_reference(X_T, n, order, bh), rtol=2e-5, atol=2e-6)


def sde_variance(num_steps: int, order: int) -> float:
    """Var of SDE-DPM-Solver++(2M)'s sample on Gaussian data, by a float64 recursion of the
    paper's update (Lu et al. 2022b, Algorithm: x_t = sigma_t/sigma_s e^-h x_s + alpha_t
    (1 - e^-2h) (D_0 + D_1 / 2) + sigma_t sqrt(1 - e^-2h) z, D_0 = x0_hat(x_s), D_1 = (D_0 -
    D_-1) / r0): the sampler is linear, so (x_k, x_{k-1}) has a 2x2 covariance."""
    t = grids.time_grid(SCHED, num_steps, "logsnr", denoise_to_zero=True)
    a, sig = SCHED.alpha(t), SCHED.sigma(t)
    with np.errstate(divide="ignore"):
        lam = np.log(a) - np.log(sig)
    gain = a * S2 / (a**2 * S2 + sig**2)  # x0_hat = gain x
    cov = np.array([[1.0, 0.0], [0.0, 0.0]])  # of (x_k, x_{k-1})
    for k in range(num_steps):
        h = lam[k + 1] - lam[k]
        decay = -np.expm1(-2 * h)
        c_x = sig[k + 1] / sig[k] * np.exp(-h)
        second = order == 2 and 0 < k < num_steps - 1
        r0 = (lam[k] - lam[k - 1]) / h if second else 1.0
        w0 = a[k + 1] * decay * (1 + (0.5 / r0 if second else 0.0))  # on D_0
        w1 = -a[k + 1] * decay * 0.5 / r0 if second else 0.0  # on D_-1
        m = np.array([[c_x + w0 * gain[k], w1 * gain[k - 1] if k else 0.0], [1.0, 0.0]])
        cov = m @ cov @ m.T + np.diag([sig[k + 1] ** 2 * decay, 0.0])
    return float(cov[0, 0])


def test_sde_dpm_solver_does_what_the_math_says():
    """SDE-DPM-Solver++(2M) on Gaussian data (a stochastic sampler: a statistical check over
    65,536 scalars): the variance of its samples is the float64 recursion's, and it approaches
    the data's S2 as the steps grow; the same noise gives the same samples."""
    shape = (4096, 4, 2, 2)
    for order, steps in ((2, 10), (2, 20), (1, 20), (2, 100)):
        config = sampler_config(
            method="sde_dpm_solver++", num_steps=steps, order=order, denoise_to_zero=True
        )
        x = np.asarray(draw(config, gaussian_denoiser(), shape=shape)["sample"], np.float64)
        exact = sde_variance(steps, order)
        assert abs(x.mean()) < 4 * np.sqrt(S2 / x.size)
        assert abs(x.var() - exact) < 4 * exact * np.sqrt(2 / x.size), (
            order,
            steps,
            x.var(),
            exact,
        )
    assert abs(sde_variance(100, 2) / S2 - 1) < 0.01 < abs(sde_variance(20, 2) / S2 - 1)
    again = draw(config, gaussian_denoiser(), shape=shape)["sample"]
    np.testing.assert_array_equal(np.asarray(again, np.float64), x)


@pytest.mark.parametrize("method, options", ODE_CASES)
def test_every_spacing_reaches_the_solution(method, options):
    """Each spacing drives each solver to the exact solution (singlestep DPM-Solver off
    `logsnr` takes its outer times from the num_steps grid at the cumulative orders)."""
    for spacing in grids.TIME_SPACINGS:
        got, exact = solve(32, method, spacing=spacing, **options)
        error = np.abs(got - exact).max() / np.abs(exact).max()
        # uniform t spends few steps where lambda moves fast (t near 0 on the linear schedule)
        assert error < (0.2 if spacing == "uniform" else 0.03), (spacing, error)


def test_singlestep_intermediate_points_come_from_the_spacing():
    """Singlestep DPM-Solver takes each step's intermediate times from the chosen spacing
    between its ends (reference `sample(method='singlestep')`): the uniform spacing's midpoint
    in t for order 2, the logsnr spacing's midpoint in lambda."""
    for spacing in ("uniform", "logsnr"):
        rows = registry.build(
            sampler_config(method="dpm_solver", num_steps=8, order=2, spacing=spacing)
        ).rows
        t_s, t_1 = (rows["t_model"] + 1) / T, (rows["t_model_1"] + 1) / T
        t_t = np.append(t_s[1:], 1 / T)
        if spacing == "uniform":
            np.testing.assert_allclose(t_1, (t_s + t_t) / 2, rtol=1e-12)
        else:
            lam = lambda t: SCHED.lam(t)
            np.testing.assert_allclose(lam(t_1), (lam(t_s) + lam(t_t)) / 2, rtol=1e-9)


def test_dpm_solver_1_is_ddim():
    """DPM-Solver-1 is DDIM (Lu et al. 2022a, §4.1): ending at t = 0 on the uniform t grid
    through the integer timesteps 999, 972, ..., 0 (999 = 27 * 37), its noise-prediction
    update matches the DDIM chain over them (data-prediction form)."""
    denoise = gaussian_denoiser()
    config = sampler_config(
        method="dpm_solver", num_steps=38, order=1, spacing="uniform", denoise_to_zero=True
    )
    ode = draw(config, denoise, X_T)["sample"]
    chain = draw(sampler_config(method="ddim"), denoise, X_T, respacing="ddim38")["sample"]
    assert grids.ddim_uniform(T, 38) == list(range(0, T, 27))
    np.testing.assert_allclose(ode, chain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spacing", grids.TIME_SPACINGS)
def test_time_spacings(spacing):
    for n in (1, 2, 7, 50, T):
        t = grids.time_grid(SCHED, n, spacing)
        assert t.shape == (n + 1,)
        assert t[0] * T - 1 == T - 1 and t[-1] == 1 / T  # from the last timestep to the first
        assert np.all(np.diff(t) < 0)
        to_zero = grids.time_grid(SCHED, n, spacing, denoise_to_zero=True)
        assert to_zero.shape == (n + 1,) and to_zero[-1] == 0.0
        np.testing.assert_array_equal(to_zero[:-1], t[:-1])  # t_min replaced by 0
    n = 12
    t = grids.time_grid(SCHED, n, spacing)
    lam = SCHED.lam(t)
    if spacing == "uniform":
        np.testing.assert_allclose(np.diff(t), -(1 - 1 / T) / n)
    elif spacing == "quadratic":
        np.testing.assert_allclose(np.diff(np.sqrt(t)), (np.sqrt(1 / T) - 1) / n)
    elif spacing == "logsnr":
        np.testing.assert_allclose(np.diff(lam), (lam[-1] - lam[0]) / n, rtol=1e-9)
    else:  # EDM eq. 5 over sigma = sqrt((1 - alphabar) / alphabar), rho = 7
        alphabar = ALPHAS_CUMPROD[[-1, 0]]
        s_max, s_min = np.sqrt((1 - alphabar) / alphabar)
        i = np.arange(n + 1) / n
        expected = (s_max ** (1 / 7) + i * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
        np.testing.assert_allclose(np.exp(-lam), expected, rtol=1e-9)


def test_ddim_timesteps_one_rule():
    """DDIM keeps the same timesteps from `respacing='ddimS'` and from num_steps = S: the
    smallest stride with exactly S steps (T = 1000, S = 30: stride 34, not the DDIM code's
    T // S = 33 with 31 steps); quadratic is the DDIM code's int(linspace(0, sqrt(0.8 T),
    S)^2) (ermongroup/ddim runners/diffusion.py), repeated values collapsed."""
    for steps in (10, 25, 30, 50, 334):
        by_steps = registry.build(sampler_config(method="ddim", num_steps=steps)).rows
        by_respacing = registry.build(sampler_config(respacing=f"ddim{steps}")).rows
        np.testing.assert_array_equal(by_steps["t_model"], by_respacing["t_model"])
        assert len(by_steps["t_model"]) == steps
    assert grids.ddim_uniform(T, 30) == list(range(0, 1000, 34))
    with pytest.raises(ConfigError, match=r"no integer stride keeps 600 of 1000.*counts: 500\)"):
        grids.ddim_uniform(T, 600)
    quadratic_10 = [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    assert grids.ddim_quadratic(T, 10) == quadratic_10
    for steps in (10, 50, 100):  # 100: repeated small timesteps collapse (96 kept)
        seq = [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), steps) ** 2)]
        assert grids.ddim_quadratic(T, steps) == sorted(set(seq))
    stepper = registry.build(sampler_config(method="ddim", num_steps=10, spacing="quadratic"))
    np.testing.assert_array_equal(stepper.rows["t_model"], quadratic_10[::-1])
    np.testing.assert_allclose(stepper.rows["alpha"] ** 2, ALPHAS_CUMPROD[quadratic_10[::-1]])
    assert stepper.nfe == 10
    # ancestral num_steps = S is respacing "S"; an explicit respacing argument wins
    ancestral = sampler_config(method="ancestral", num_steps=25)
    np.testing.assert_array_equal(
        registry.build(ancestral).rows["t_model"], S.space_timesteps(T, "25")[::-1]
    )
    assert registry.build(ancestral, "100").nfe == 100


# ---------------------------------------------------------------------------------------------
# Through generation.make_sampler: sharding, tracing, program size, guidance


def fake_apply(traces: list):
    """A stand-in network `(params, x, t, y) -> output`; appends to `traces` when traced."""

    optimal = gaussian_denoiser()

    def apply(params, x, t, y=None, dropout_key=None):
        traces.append(x.shape)
        wx = params["w"] * x  # a rational nonlinearity: XLA:CPU's tanh rounds differently
        out = optimal(x, t) * (1.0 + 0.1 * wx / (1.0 + wx**2))  # on other batch sizes
        if y is not None:
            out = out + 0.01 * y.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        return out

    return apply


CASES = {
    "ancestral": dict(method="ancestral"),
    "ddim": dict(method="ddim"),
    "dpm_solver++": dict(method="dpm_solver++"),
    "sde_dpm_solver++": dict(method="sde_dpm_solver++", denoise_to_zero=True),
    "dpm_solver": dict(method="dpm_solver"),
    "dpm_solver-multistep-3": dict(method="dpm_solver", dpm_solver_variant="multistep"),
    "unipc": dict(method="unipc", order=3),
    "heun": dict(method="heun"),
}
PARAMS = {"w": jnp.float32(0.7)}


@pytest.mark.parametrize("name", CASES)
def test_sharded_equals_unsharded_and_traced_once(devices, name):
    config = sampler_config(num_steps=7, guidance_scale=1.5, **CASES[name])
    config.model.num_classes = 3  # classifier-free guidance through make_sampler
    traces = []
    apply = fake_apply(traces)
    labels = jnp.arange(16, dtype=jnp.int32) % 3
    key = jax.random.PRNGKey(0)
    sharded = generation.make_sampler(config, apply, Mesh(np.array(devices), ("data",)), 16, "", 2)
    single = generation.make_sampler(
        config, apply, Mesh(np.array(devices[:1]), ("data",)), 16, "", 2
    )
    ref = single(PARAMS, key, labels)
    got = sharded(PARAMS, key, labels)
    assert len(got["sample"].sharding.device_set) == 8
    assert not got["sample"].sharding.is_fully_replicated
    # Float32 rounding differs with the per-device batch; 7-NFE DPM-Solver-3 with guidance turns
    # a 1e-7 relative change of the network output into ~3e-5 in the sample.
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=5e-5, err_msg=name)
    assert got["snapshots"].shape[1:] == (16, 2, 2, 1)
    traced = len(traces)
    sharded(PARAMS, jax.random.PRNGKey(1), labels)  # a new key: no new trace or compile
    assert len(traces) == traced and sharded._cache_size() == 1
    # one trace per call site in the scan body, each of batch 2B
    sites = {"dpm_solver": 4, "heun": 2}.get(name, 1)
    assert traced == 2 * sites and set(traces) == {(32, 2, 2, 1)}


@pytest.mark.parametrize("name", CASES)
def test_two_steps_per_loop_turn_draw_the_same_samples(devices, name):
    """`make_sampler(unroll=2)`, the twin `tools.aot` compiles to count a sampler's loop: the
    same samples and snapshots as one step per turn, at 7 steps (the last runs after the
    loop), to float32 rounding (XLA fuses the two-step body differently; DPM-Solver-3
    amplifies that, as above)."""
    config = sampler_config(num_steps=7, **CASES[name])
    mesh = Mesh(np.array(devices[:1]), ("data",))
    labels, key = jnp.zeros(4, jnp.int32), jax.random.PRNGKey(0)
    draw = lambda unroll: generation.make_sampler(
        config, fake_apply([]), mesh, 4, "", 2, unroll=unroll
    )(PARAMS, key, labels)
    for a, b in zip(jax.tree.leaves(draw(1)), jax.tree.leaves(draw(2)), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=5e-5, err_msg=name)


def _num_eqns(jaxpr) -> int:
    """Equations of a jaxpr, counting those of nested jaxprs (scan bodies, switch branches)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    total += _num_eqns(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    total += _num_eqns(sub)
    return total


@pytest.mark.parametrize("name", CASES)
def test_program_size_does_not_grow_with_steps(devices, name):
    mesh = Mesh(np.array(devices[:1]), ("data",))
    sizes = []
    for num_steps in (7, 31):  # singlestep orders [3, 3, 1] and [3] * 10 + [1]: same branches
        config = sampler_config(num_steps=num_steps, **CASES[name])
        sampler = generation.make_sampler(config, fake_apply([]), mesh, 8, "")
        labels = jnp.zeros(8, jnp.int32)
        sizes.append(_num_eqns(sampler.trace(PARAMS, jax.random.PRNGKey(0), labels).jaxpr.jaxpr))
    assert sizes[0] == sizes[1], sizes


@pytest.mark.parametrize("method, options", ODE_CASES)
def test_guidance_one_step_by_hand(method, options):
    w, null = 2.5, 10
    labels = jnp.arange(8, dtype=jnp.int32) % 3

    def model_fn(x, t, y):
        return 0.3 * x * (1.0 + t / T)[:, None, None, None] + 0.05 * y[:, None, None, None]

    guided = run.classifier_free_guidance(model_fn, labels, w, null)
    config = sampler_config(method=method, num_steps=1, denoise_to_zero=False, **options)
    got = draw(config, guided, X_T)
    # by hand, float64: one step from t = 1 (timestep 999) to t_min = 1/T (or sigma = 0)
    x = np.asarray(X_T, np.float64)
    eps = lambda y: 0.3 * x * (1.0 + (T - 1) / T) + 0.05 * np.asarray(y)[:, None, None, None]
    eps_g = (1 + w) * eps(labels) - w * eps(np.full(8, null))
    a1, a0 = np.exp(LOG_ALPHA[-1]), np.exp(LOG_ALPHA[0])
    s1, s0 = np.sqrt(1 - a1**2), np.sqrt(1 - a0**2)
    h = np.log(a0 / s0) - np.log(a1 / s1)
    x0_g = (x - s1 * eps_g) / a1
    if method == "heun":  # the final Euler step to sigma = 0 is D(x; sigma_max)
        expected = x0_g
    elif method == "dpm_solver":  # DPM-Solver-1, eq. 3.7
        expected = a0 / a1 * x - s0 * np.expm1(h) * eps_g
    else:  # DPM-Solver++ eq. 9, order 1 (= UniP-1)
        expected = s0 / s1 * x - a0 * np.expm1(-h) * x0_g
    np.testing.assert_allclose(got["sample"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, options", ODE_CASES + [("ddim", {})])
def test_eps_x0_v_outputs_give_the_same_samples(method, options):
    def sample(kind, variance_channels=False):
        config = sampler_config(method=method, num_steps=8, **options)
        config.diffusion.model_output = kind
        return draw(config, gaussian_denoiser(kind, variance_channels), X_T)["sample"]

    ref = sample("eps")
    for kind in ("x0", "v"):
        np.testing.assert_allclose(sample(kind), ref, rtol=1e-4, atol=1e-5, err_msg=kind)
    np.testing.assert_array_equal(sample("eps", variance_channels=True), ref)  # dropped


@pytest.mark.parametrize(
    "options, expected_nfe",
    [
        (dict(method="dpm_solver++", num_steps=7), 7),
        (dict(method="dpm_solver++", num_steps=7, denoise_to_zero=True), 7),
        (dict(method="dpm_solver", num_steps=7), 7),
        (dict(method="dpm_solver", num_steps=7, order=2, denoise_to_zero=True), 7),
        (dict(method="dpm_solver", num_steps=7, dpm_solver_variant="multistep"), 7),
        (dict(method="unipc", num_steps=7, order=3), 7),
        (dict(method="sde_dpm_solver++", num_steps=7), 7),
        (dict(method="heun", num_steps=5), 9),
        (dict(method="ddim", num_steps=10, spacing="quadratic"), 10),
    ],
)
def test_nfe_counts_network_calls(options, expected_nfe):
    """NFE, counted from the step table, is the number of network calls per sample (lax.switch
    and lax.cond run one branch); guidance doubles each call's batch, not the count."""
    calls = []

    def model_fn(x, t, y):
        jax.debug.callback(lambda n: calls.append(int(n)), x.shape[0])
        return 0.1 * x

    guided = run.classifier_free_guidance(model_fn, jnp.zeros(8, jnp.int32), 1.0, 3)
    out = draw(sampler_config(**options), guided, X_T)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert registry.build(sampler_config(**options)).nfe == expected_nfe
    assert calls == [16] * expected_nfe


@pytest.mark.parametrize("method", ["dpm_solver++", "dpm_solver", "heun", "unipc"])
def test_solver_snapshots(method):
    config = sampler_config(method=method, num_steps=7)
    positions = registry.build(config).num_steps
    out = draw(config, gaussian_denoiser(), X_T, snapshot_every=3)
    count = (positions - 1) // 3 + 1
    assert out["snapshots"].shape == (count, *X_T.shape)
    steps = np.asarray(out["snapshot_timesteps"])
    assert np.all(np.diff(steps) < 0)
    if positions == 7:  # snapshots at steps 0, 3, 6; step 0 is at the last timestep
        assert steps[0] == T - 1
    else:  # singlestep DPM-Solver-3: 7 NFE are the outer steps [3, 3, 1]
        assert positions == 3 and count == 1
    if method == "heun":  # the last snapshot is D at the final step, which is the sample
        np.testing.assert_array_equal(out["snapshots"][-1], out["sample"])


BAD_SETTINGS = [
    (
        dict(method="euler"),
        r"method='euler'.*allowed: ancestral, ddim, dpm_solver\+\+, sde_dpm_solver\+\+, "
        r"dpm_solver, unipc, heun",
    ),
    (
        dict(method="dpm_solver++", num_steps=9, spacing="cosine"),
        r"spacing='cosine' is not supported.*uniform, quadratic, trailing, logsnr, karras",
    ),
    (
        dict(method="ddim", num_steps=9, spacing="logsnr"),
        r"spacing='logsnr' is not available for method 'ddim'; allowed: uniform, quadratic",
    ),
    (dict(method="heun"), r"num_steps=0: method 'heun' needs num_steps in \[1, 1000\]"),
    (
        dict(method="dpm_solver", num_steps=-1),
        r"num_steps=-1 must be 0 \(not given\) or lie in \[1, 1000\]",
    ),
    (
        dict(method="ddim", num_steps=1001),
        r"num_steps=1001 must be 0 \(not given\) or lie in \[1, 1000\]",
    ),
    (dict(method="ddim", num_steps=600), r"no integer stride keeps 600 of 1000"),
    (dict(respacing="ddim600"), r"no integer stride keeps 600 of 1000"),
    (
        dict(method="dpm_solver++", num_steps=9, order=3),
        r"order=3 is not available for method 'dpm_solver\+\+'; allowed: 0 \(the default, 2\), "
        r"1, 2",
    ),
    (
        dict(method="heun", num_steps=9, order=1),
        r"order=1 is not available for method 'heun'; allowed: 0 \(the default, 2\), 2",
    ),
    (
        dict(method="dpm_solver", num_steps=9, dpm_solver_variant="adaptive"),
        r"dpm_solver_variant='adaptive' is not supported; allowed: singlestep, multistep",
    ),
    (
        dict(method="unipc", num_steps=9, unipc_variant="bh3"),
        r"unipc_variant='bh3' is not supported; allowed: bh2, bh1",
    ),
    (
        dict(method="ancestral", num_steps=50, respacing="100"),
        r"num_steps=50 and sampling.respacing='100' both choose the chain",
    ),
    (
        dict(method="dpm_solver++", num_steps=20, respacing="ddim50"),
        r"respacing='ddim50' applies to the chain methods \(ancestral, ddim\)",
    ),
]


@pytest.mark.parametrize("sampling, match", BAD_SETTINGS)
def test_bad_settings_raise_before_compiling(devices, sampling, match):
    config = sampler_config(**sampling)
    with pytest.raises(ConfigError, match=match):
        registry.validate(config.sampling, T) if "ddim600" not in str(sampling) else registry.build(
            config
        )
    with pytest.raises(ConfigError, match=match):
        generation.make_sampler(
            config, fake_apply([]), Mesh(np.array(devices), ("data",)), 8, config.sampling.respacing
        )


def test_settings_checks_pass_and_name_the_model_output():
    for method in registry.METHODS:
        registry.validate(sampler_config(method=method, num_steps=10).sampling, T, "eps")
    registry.validate(sampler_config().sampling, T)  # today's defaults: ancestral, full chain
    # denoise_to_zero is satisfied by the samplers that always end at sigma = 0: a config whose
    # default solver sets it switches to them with one flag, and their grids are unchanged
    for method in ("ancestral", "ddim", "heun"):
        plain = registry.build(sampler_config(method=method, num_steps=10))
        to_zero = registry.build(sampler_config(method=method, num_steps=10, denoise_to_zero=True))
        np.testing.assert_array_equal(plain.rows["t_model"], to_zero.rows["t_model"])
    with pytest.raises(ConfigError, match=r"model_output='xprev' has no ODE form.*eps, x0, v"):
        registry.validate(sampler_config(method="heun", num_steps=5).sampling, T, "xprev")


@pytest.mark.parametrize("method", ["heun", "dpm_solver", "dpm_solver++", "unipc"])
def test_clip_denoised_reaches_every_solver(method):
    """A network whose x0_hat overshoots the data range (eps = -2 x: x0_hat = 3x / alpha at
    small noise): with clip_denoised every solver sees x0_hat clipped to [-1, 1], so the
    sample stays in range; without it the overshoot goes through."""
    config = sampler_config(num_timesteps=100, method=method, num_steps=8)
    denoise = lambda x, t: -2.0 * x
    sample = lambda clip: np.asarray(draw(config, denoise, shape=(64, 2), clip=clip)["sample"])
    clipped, free = sample(True), sample(False)
    assert np.abs(clipped).max() <= 1.05  # DPM-Solvers end at t_min, x = alpha x0 + sigma eps
    assert np.abs(free).max() > 2.0


def test_heun_takes_logsnr_steps_on_the_cosine_schedule():
    """Quadratic steps on the linear schedule (the most accurate on Gaussian data,
    `test_solver_error`), logSNR on the cosine one, whose first quadratic step would jump from
    t = 1 (alpha ~ 1e-4) to sigma ~ 3 (`registry.default_spacing`); a given spacing wins."""
    linear, cosine = (
        sampler_config(method="heun", num_steps=5),
        sampler_config("cosine", method="heun", num_steps=5),
    )
    second = (1.0 - (1.0 - (1.0 / T) ** 0.5) / 5) ** 2  # sqrt(t) in 5 equal steps to 1/T
    np.testing.assert_allclose(registry.build(linear).rows["t_model"][1], second * T - 1)
    t = registry.build(cosine).rows["t_model"]
    lam = process_lib.from_config(cosine.diffusion).lam((t + 1.0) / T)
    np.testing.assert_allclose(np.diff(lam[:-1]), np.diff(lam[:-1])[0], rtol=1e-3)
    cosine.sampling.spacing = "quadratic"
    assert registry.resolved(cosine.sampling, "", "cosine")["spacing"] == "quadratic"
