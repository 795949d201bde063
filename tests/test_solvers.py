"""ODE solvers and step spacings: Gaussian data, whose probability-flow ODE is linear and solved
in closed form, checks each solver's error and convergence order; then the DDIM paper's
timesteps, the program structure (one scan, traced once), sharding, guidance, settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core
from jax.sharding import Mesh

from configs import base as base_config
from diffusion_jax import continuous_time as ct
from diffusion_jax import generation
from diffusion_jax import sampling as SM
from diffusion_jax import schedules as S
from diffusion_jax import solvers as SV

T = 1000
BETAS = S.get_beta_schedule("linear", T)
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)  # float64
LOG_ALPHA = 0.5 * np.log(ALPHAS_CUMPROD)  # knots of log(alpha_t) at t_i = (i + 1) / T
VP = ct.vp_schedule(S.make_diffusion(BETAS))
S2 = 0.25  # data x_0 ~ N(0, S2), elementwise
X_T = jax.random.normal(jax.random.PRNGKey(0), (8, 2, 1, 1))


# Every ODE solver, with the variant options that change its algorithm.
ODE_CASES = [
    ("dpm_solver++", {}),
    ("dpm_solver", {}),
    ("dpm_solver", {"variant": "multistep"}),
    ("heun", {}),
]


def gaussian_denoiser(kind: str = "eps", variance_channels: bool = False):
    """The optimal network for data N(0, S2 I), at fractional timesteps too: alpha_t of the
    interpolated schedule at t = (timestep + 1) / T, sigma_t = sqrt(1 - alpha_t^2),
    E[eps | x_t] = sigma_t x_t / (alpha_t^2 S2 + sigma_t^2), E[x0 | x_t] = alpha_t S2 x_t / (.),
    v = alpha_t eps - sigma_t x0. `variance_channels` appends junk learned-variance channels."""

    def denoise(x, timesteps):
        t = (jnp.asarray(timesteps, jnp.float32) + 1.0) / T
        a = jnp.exp(ct.marginal_log_alpha(VP, t)).reshape((-1,) + (1,) * (x.ndim - 1))
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


# name: (method, options). DDIM is the chain sampler over the DDIM paper's uniform timesteps.
CONVERGENCE = {
    "ddim": None,
    "dpm_solver-1": ("dpm_solver", {"order": 1}),
    "dpm_solver++(2M)": ("dpm_solver++", {}),
    "heun": ("heun", {}),
    "dpm_solver-3": ("dpm_solver", {"order": 3}),
}


def solve(name: str, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample, exact solution) for solver `name` from X_T."""
    denoise = gaussian_denoiser()
    if name == "ddim":
        use = SV.ddim_timesteps(T, num_steps, "uniform")
        d = S.make_diffusion(BETAS, use_timesteps=use)
        run = lambda x: SM.sample_loop(
            d, denoise, x.shape, jax.random.PRNGKey(1), method="ddim", clip_denoised=False, x_init=x
        )
        # it starts at timestep use[-1] and ends at alphabar_0 = 1
        return np.asarray(jax.jit(run)(X_T)["sample"]), exact_flow(X_T, LOG_ALPHA[use[-1]], 0.0)
    method, options = CONVERGENCE[name]
    run = lambda x: SV.sample(
        method, VP, denoise, x.shape, None, x_init=x, num_steps=num_steps, **options
    )
    end = 0.0 if method == "heun" else LOG_ALPHA[0]  # Heun ends at sigma = 0, the others at t_min
    return np.asarray(jax.jit(run)(X_T)["sample"]), exact_flow(X_T, LOG_ALPHA[-1], end)


@pytest.mark.parametrize(
    "name, fit_steps, slope_range, max_error_50",
    [
        ("ddim", (5, 10, 20, 50), (0.8, 1.2), 0.08),
        ("dpm_solver-1", (5, 10, 20, 50), (0.8, 1.2), 0.06),
        # pre-asymptotic below 20 steps (lambda spans ~10, so h ~ 1 at 10 steps)
        ("dpm_solver++(2M)", (20, 50, 100), (1.7, 2.4), 5e-3),
        ("heun", (10, 20, 50), (1.7, 2.7), 1e-2),
        # step counts = 2 mod 3: outer orders [3, ..., 3, 2], no first-order final step
        ("dpm_solver-3", (20, 35, 50, 65), (2.6, 3.9), 1e-3),
    ],
)
def test_gaussian_error_and_convergence_order(name, fit_steps, slope_range, max_error_50):
    """Relative max error against the exact flow at 5/10/20/50 steps, and the log-log slope of
    error vs steps (the global order) over `fit_steps`. Multistep DPM-Solver-3 is left out:
    its first-order warm-up (and the reference's third-order term, see
    `solvers._multistep_update`) make it globally second order."""
    steps = sorted({5, 10, 20, 50, *fit_steps})
    errors = {}
    for n in steps:
        got, exact = solve(name, n)
        errors[n] = np.abs(got - exact).max() / np.abs(exact).max()
    assert errors[10] > errors[20] > errors[50], errors
    assert errors[50] < max_error_50, errors
    slope = -np.polyfit(np.log(fit_steps), np.log([errors[n] for n in fit_steps]), 1)[0]
    assert slope_range[0] < slope < slope_range[1], (slope, errors)


@pytest.mark.parametrize("method, options", ODE_CASES)
def test_every_spacing_reaches_the_solution(method, options):
    """Each spacing drives each solver to the exact solution (singlestep DPM-Solver off
    `logsnr` takes its outer times from the num_steps grid at the cumulative orders)."""
    end = 0.0 if method == "heun" else LOG_ALPHA[0]
    exact = exact_flow(X_T, LOG_ALPHA[-1], end)
    for spacing in SV.SPACINGS:
        run = lambda x, spacing=spacing: SV.sample(
            method,
            VP,
            gaussian_denoiser(),
            x.shape,
            None,
            x_init=x,
            num_steps=32,
            spacing=spacing,
            **options,
        )
        error = np.abs(np.asarray(jax.jit(run)(X_T)["sample"]) - exact).max() / np.abs(exact).max()
        # uniform t spends few steps where lambda moves fast (t near 0 on the linear schedule)
        assert error < (0.2 if spacing == "uniform" else 0.03), (spacing, error)


def test_dpm_solver_1_is_ddim():
    """DPM-Solver-1 is DDIM (Lu et al. 2022a, §4.1): on a uniform t grid through the integer
    timesteps 999, 972, ..., 0 (999 = 27 * 37) it matches the DDIM chain over them, whose last
    step to alphabar_0 = 1 is x0_hat at timestep 0."""
    denoise = gaussian_denoiser()
    ode = SV.sample(
        "dpm_solver",
        VP,
        denoise,
        X_T.shape,
        None,
        x_init=X_T,
        num_steps=37,
        order=1,
        spacing="uniform",
    )["sample"]
    d = S.make_diffusion(BETAS, use_timesteps=range(0, T, 27))
    chain = SM.sample_loop(
        d,
        denoise,
        X_T.shape,
        jax.random.PRNGKey(1),
        method="ddim",
        clip_denoised=False,
        x_init=X_T,
    )["sample"]
    a0, s0 = np.sqrt(ALPHAS_CUMPROD[0]), np.sqrt(1 - ALPHAS_CUMPROD[0])
    x0 = (ode - s0 * denoise(ode, jnp.zeros(8, jnp.int32))) / a0
    np.testing.assert_allclose(x0, chain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spacing", SV.SPACINGS)
def test_time_spacings(spacing):
    for n in (1, 2, 7, 50, T):
        t = SV.time_steps(VP, n, spacing)
        assert t.shape == (n + 1,)
        assert t[0] * T - 1 == T - 1 and t[-1] == 1 / T  # from the last timestep to the first
        assert np.all(np.diff(t) < 0)
    n = 12
    t = SV.time_steps(VP, n, spacing)
    lam = ct.marginal_coefficients_host(VP, t)[3]
    if spacing == "uniform":
        np.testing.assert_allclose(np.diff(t), -(1 - 1 / T) / n)
    elif spacing == "quadratic":
        np.testing.assert_allclose(np.diff(np.sqrt(t)), (np.sqrt(1 / T) - 1) / n)
    elif spacing == "logsnr":
        np.testing.assert_allclose(np.diff(lam), (lam[-1] - lam[0]) / n, rtol=1e-9)
    else:  # EDM eq. 5 over sigma = sqrt((1 - alphabar) / alphabar), rho = 7
        alphabar = np.exp(2 * np.asarray(VP.log_alpha_array, np.float64)[[-1, 0]])  # VP's knots
        s_max, s_min = np.sqrt((1 - alphabar) / alphabar)
        i = np.arange(n + 1) / n
        expected = (s_max ** (1 / 7) + i * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
        np.testing.assert_allclose(np.exp(-lam), expected, rtol=1e-5)


def test_ddim_paper_timesteps():
    """The DDIM code (ermongroup/ddim, runners/diffusion.py): uniform seq = range(0, T, T // S),
    quadratic seq = [int(s) for s in np.linspace(0, sqrt(0.8 T), S) ** 2]; its compute_alpha
    reads cumprod(1 - [0, betas])[t + 1], which is alphas_cumprod[t] here (0-based)."""
    assert SV.ddim_timesteps(T, 10, "uniform") == list(range(0, 1000, 100))
    assert SV.ddim_timesteps(T, 30, "uniform") == list(range(0, 1000, 33))  # 31 steps, as there
    quadratic_10 = [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    assert SV.ddim_timesteps(T, 10, "quadratic") == quadratic_10
    for steps in (10, 50, 100):  # 100: repeated small timesteps collapse (96 kept)
        seq = [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), steps) ** 2)]
        assert SV.ddim_timesteps(T, steps, "quadratic") == sorted(set(seq))
    chain = generation.chain_diffusion(
        _config(method="ddim", num_steps=10, spacing="quadratic"), ""
    )
    np.testing.assert_array_equal(chain.timesteps, quadratic_10)
    np.testing.assert_allclose(chain.alphas_cumprod, ALPHAS_CUMPROD[quadratic_10], rtol=1e-6)
    assert SV.nfe("ddim", 10, num_timesteps=T, spacing="quadratic") == 10
    assert SV.nfe("ddim", 30, num_timesteps=T) == 31
    # ancestral num_steps = S is respacing "S"; an explicit respacing argument wins
    ancestral = _config(method="ancestral", num_steps=25)
    np.testing.assert_array_equal(
        generation.chain_diffusion(ancestral, "").timesteps, S.space_timesteps(T, "25")
    )
    assert generation.chain_diffusion(ancestral, "100").num_timesteps == 100


# ---------------------------------------------------------------------------------------------
# Through generation.make_sampler: sharding, tracing, program size, guidance


def _config(**sampling):
    config = base_config.get_base_config()
    config.data.image_size, config.data.channels = 2, 1
    for key, value in sampling.items():
        config.sampling[key] = value
    return config


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
    "ddim": dict(method="ddim"),
    "dpm_solver++": dict(method="dpm_solver++"),
    "dpm_solver": dict(method="dpm_solver"),
    "dpm_solver-multistep-3": dict(method="dpm_solver", dpm_solver_variant="multistep"),
    "heun": dict(method="heun"),
}
PARAMS = {"w": jnp.float32(0.7)}


@pytest.mark.parametrize("name", CASES)
def test_sharded_equals_unsharded_and_traced_once(devices, name):
    config = _config(num_steps=7, guidance_scale=1.5, **CASES[name])
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
    # one trace per call site in the scan body (+ Heun's final step), each of batch 2B
    sites = {"dpm_solver": 4, "heun": 3}.get(name, 1)
    assert traced == 2 * sites and set(traces) == {(32, 2, 2, 1)}


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
        sampler = generation.make_sampler(
            _config(num_steps=num_steps, **CASES[name]), fake_apply([]), mesh, 8, ""
        )
        labels = jnp.zeros(8, jnp.int32)
        sizes.append(_num_eqns(sampler.trace(PARAMS, jax.random.PRNGKey(0), labels).jaxpr.jaxpr))
    assert sizes[0] == sizes[1], sizes


@pytest.mark.parametrize("method, options", ODE_CASES)
def test_guidance_one_step_by_hand(method, options):
    w, null = 2.5, 10
    labels = jnp.arange(8, dtype=jnp.int32) % 3

    def model_fn(x, t, y):
        return 0.3 * x * (1.0 + t / T)[:, None, None, None] + 0.05 * y[:, None, None, None]

    guided = SM.classifier_free_guidance(model_fn, labels, w, null)
    got = SV.sample(method, VP, guided, X_T.shape, None, x_init=X_T, num_steps=1, **options)
    # by hand, float64: one step from t = 1 (timestep 999) to t_min = 1/T (or sigma = 0)
    x = np.asarray(X_T, np.float64)
    eps = lambda y: 0.3 * x * (1.0 + (T - 1) / T) + 0.05 * np.asarray(y)[:, None, None, None]
    eps_g = (1 + w) * eps(labels) - w * eps(np.full(8, null))
    a1, a0 = np.exp(LOG_ALPHA[-1]), np.exp(LOG_ALPHA[0])
    s1, s0 = np.sqrt(1 - a1**2), np.sqrt(1 - a0**2)
    h = np.log(a0 / s0) - np.log(a1 / s1)
    x0_g = (x - s1 * eps_g) / a1
    expected = {
        "heun": x0_g,  # the final Euler step to sigma = 0 is D(x; sigma_max)
        "dpm_solver++": s0 / s1 * x - a0 * np.expm1(-h) * x0_g,  # DPM-Solver++ eq. 9, order 1
        "dpm_solver": a0 / a1 * x - s0 * np.expm1(h) * eps_g,  # DPM-Solver-1, eq. 3.7
    }[method]
    np.testing.assert_allclose(got["sample"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, options", ODE_CASES)
def test_eps_x0_v_outputs_give_the_same_samples(method, options):
    def run(kind, variance_channels=False):
        denoise = gaussian_denoiser(kind, variance_channels)
        return SV.sample(
            method,
            VP,
            denoise,
            X_T.shape,
            None,
            x_init=X_T,
            model_output=kind,
            num_steps=8,
            **options,
        )["sample"]

    ref = run("eps")
    for kind in ("x0", "v"):
        np.testing.assert_allclose(run(kind), ref, rtol=1e-4, atol=1e-5, err_msg=kind)
    np.testing.assert_array_equal(run("eps", variance_channels=True), ref)  # dropped


@pytest.mark.parametrize(
    "method, options, num_steps",
    [
        ("dpm_solver++", {}, 7),
        ("dpm_solver", {}, 7),
        ("dpm_solver", {"order": 2}, 7),
        ("dpm_solver", {"variant": "multistep"}, 7),
        ("heun", {}, 5),
    ],
)
def test_nfe_counts_network_calls(method, options, num_steps):
    """NFE is the number of network calls per sample (lax.switch runs one branch); guidance
    doubles each call's batch, not the count."""
    calls = []

    def model_fn(x, t, y):
        jax.debug.callback(lambda n: calls.append(int(n)), x.shape[0])
        return 0.1 * x

    guided = SM.classifier_free_guidance(model_fn, jnp.zeros(8, jnp.int32), 1.0, 3)
    out = SV.sample(method, VP, guided, X_T.shape, None, x_init=X_T, num_steps=num_steps, **options)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert calls == [16] * SV.nfe(method, num_steps, options.get("order", 0))
    assert SV.nfe("heun", num_steps) == 2 * num_steps - 1
    assert SV.nfe("dpm_solver", num_steps, 3) == num_steps


@pytest.mark.parametrize("method", SV.ODE_METHODS)
def test_solver_snapshots(method):
    config = _config(method=method, num_steps=7)
    positions = generation.sampler_steps(config, "")
    out = SV.sample(
        method, VP, gaussian_denoiser(), X_T.shape, None, x_init=X_T, num_steps=7, snapshot_every=3
    )
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
        r"method='euler'.*allowed: ancestral, ddim, dpm_solver\+\+, dpm_solver, heun",
    ),
    (
        dict(method="dpm_solver++", num_steps=9, spacing="cosine"),
        r"spacing='cosine' is not supported.*uniform, logsnr, quadratic, karras",
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
    config = _config(**sampling)
    with pytest.raises(ValueError, match=match):
        SV.validate_sampling(config.sampling, T)
    with pytest.raises(ValueError, match=match):
        generation.make_sampler(config, fake_apply([]), Mesh(np.array(devices), ("data",)), 8, "")


def test_settings_checks_pass_and_name_the_model_output():
    for method in SV.METHODS:
        SV.validate_sampling(_config(method=method, num_steps=10).sampling, T, "eps")
    SV.validate_sampling(_config().sampling, T)  # today's defaults: ancestral, full chain
    with pytest.raises(ValueError, match=r"model_output='xprev' has no ODE form.*eps, x0, v"):
        SV.validate_sampling(_config(method="heun", num_steps=5).sampling, T, "xprev")
    with pytest.raises(ValueError, match=r"method='ddim' is not an ODE solver"):
        SV.sample("ddim", VP, gaussian_denoiser(), X_T.shape, None, x_init=X_T, num_steps=5)


@pytest.mark.parametrize("method", ["heun", "dpm_solver", "dpm_solver++"])
def test_clip_denoised_reaches_every_solver(method):
    """A network whose x0_hat overshoots the data range (eps = -2 x: x0_hat = 3x / alpha at
    small noise): with clip_denoised every solver sees x0_hat clipped to [-1, 1], so the
    sample stays in range; without it the overshoot goes through."""
    vp = ct.vp_schedule(S.make_diffusion(S.get_beta_schedule("linear", 100)))
    denoise = lambda x, t: -2.0 * x
    key = jax.random.PRNGKey(0)
    run = lambda clip: SV.sample(
        method, vp, denoise, (64, 2), key, num_steps=8, clip_denoised=clip
    )["sample"]
    clipped, free = np.asarray(run(True)), np.asarray(run(False))
    assert np.abs(clipped).max() <= 1.05  # DPM-Solvers end at t_min, x = alpha x0 + sigma eps
    assert np.abs(free).max() > 2.0
