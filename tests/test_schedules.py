"""Schedules against float64 NumPy re-derivations written independently (loops, Bayes' rule)."""

import math

import numpy as np
import pytest

from diffusion_jax.diffusion import process as P
from diffusion_jax.diffusion import schedules as S

T = 1000


def reference_betas(name: str, t: int = T) -> np.ndarray:
    """Each schedule re-derived one element at a time."""
    b0, b1 = 1e-4, 0.02
    out = []
    for i in range(t):
        frac = i / (t - 1) if t > 1 else 0.0
        if name == "linear":
            out.append(b0 + frac * (b1 - b0))
        elif name == "quad":
            out.append((math.sqrt(b0) + frac * (math.sqrt(b1) - math.sqrt(b0))) ** 2)
        elif name == "const":
            out.append(b1)
        elif name == "jsd":
            out.append(min(1.0 / (t - i), 0.999))
        elif name.startswith("warmup"):
            w = int(t * int(name[len("warmup") :]) / 100)
            out.append(b0 + i / (w - 1) * (b1 - b0) if i < w else b1)
        elif name == "cosine":

            def abar(u):
                return math.cos((u / t + 0.008) / 1.008 * math.pi / 2) ** 2

            out.append(min(1 - abar(i + 1) / abar(i), 0.999))
    return np.array(out)


@pytest.mark.parametrize("name", S.SCHEDULES)
def test_betas_match_reference(name):
    np.testing.assert_allclose(S.get_beta_schedule(name, T), reference_betas(name), rtol=1e-10)


@pytest.mark.parametrize("name", S.SCHEDULES)
def test_derived_quantities_match_float64(name):
    betas = reference_betas(name)
    d = P.NoiseProcess(betas)
    ac, prev = 1.0, 1.0
    ref = {k: [] for k in ("ac", "prev", "pv", "c1", "c2")}
    for b in betas:
        prev, ac = ac, ac * (1 - b)
        ref["ac"].append(ac)
        ref["prev"].append(prev)
        # Bayes' rule for q(x_{t-1} | x_t, x_0): precisions add, means weight by precision.
        precision = (1 - b) / b + 1 / (1 - prev) if prev < 1 else math.inf
        pv = 1 / precision
        ref["pv"].append(pv)
        ref["c1"].append(pv * math.sqrt(prev) / (1 - prev) if prev < 1 else 1.0)
        ref["c2"].append(pv * math.sqrt(1 - b) / b if prev < 1 else 0.0)
    ref = {k: np.array(v) for k, v in ref.items()}
    f32 = dict(rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(d.array("betas"), betas, **f32)
    np.testing.assert_allclose(d.array("alphas_cumprod"), ref["ac"], **f32)
    np.testing.assert_allclose(d.array("alphas_cumprod_prev"), ref["prev"], **f32)
    np.testing.assert_allclose(d.array("alphas_cumprod_next"), np.append(ref["ac"][1:], 0.0), **f32)
    np.testing.assert_allclose(d.array("sqrt_alphas_cumprod"), np.sqrt(ref["ac"]), **f32)
    np.testing.assert_allclose(
        d.array("sqrt_one_minus_alphas_cumprod"), np.sqrt(1 - ref["ac"]), **f32
    )
    np.testing.assert_allclose(d.array("sqrt_recip_alphas_cumprod"), 1 / np.sqrt(ref["ac"]), **f32)
    np.testing.assert_allclose(d.array("posterior_variance"), ref["pv"], rtol=2e-6, atol=1e-12)
    np.testing.assert_allclose(d.array("posterior_mean_coef1"), ref["c1"], rtol=2e-6, atol=1e-12)
    np.testing.assert_allclose(d.array("posterior_mean_coef2"), ref["c2"], rtol=2e-6, atol=1e-12)
    clipped = np.log(np.append(ref["pv"][1], ref["pv"][1:]))
    np.testing.assert_allclose(d.array("posterior_log_variance_clipped"), clipped, rtol=2e-6)
    np.testing.assert_allclose(
        d.array("sqrt_recipm1_alphas_cumprod"), np.sqrt(1 / ref["ac"] - 1), rtol=2e-6
    )
    np.testing.assert_allclose(
        d.array("log_one_minus_alphas_cumprod"), np.log(1 - ref["ac"]), rtol=2e-6
    )
    assert np.all(
        np.isfinite(d.array("sqrt_recip_alphas_cumprod"))
    )  # alphabar_T > 0 for every schedule
    assert d.array("alphas_cumprod").dtype == np.float32


def test_paper_linear_schedule_endpoints():
    betas = S.get_beta_schedule("linear", 1000)
    assert betas[0] == 1e-4 and betas[-1] == 0.02 and betas.dtype == np.float64


def test_respacing_all_steps_reproduces_schedule():
    betas = S.get_beta_schedule("linear", T)
    full = P.NoiseProcess(betas)
    spaced = full.respace(range(T))
    for field in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
        np.testing.assert_array_equal(full.array(field), spaced.array(field))
    np.testing.assert_array_equal(spaced.timesteps, np.arange(T))


@pytest.mark.parametrize("spec", ["50", "10,15,20"])
def test_respaced_betas_follow_iddpm_formula(spec):
    betas = S.get_beta_schedule("cosine", T)
    use = S.space_timesteps(T, spec)
    spaced = P.NoiseProcess(betas).respace(use)
    abar = np.cumprod(1 - betas)
    # alphabar_S is the training schedule's; beta_{S_i} = 1 - abar_{S_i} / abar_{S_{i-1}}.
    np.testing.assert_allclose(spaced.array("alphas_cumprod"), abar[use], rtol=2e-6)
    expected = [1 - abar[s] / (abar[use[i - 1]] if i else 1.0) for i, s in enumerate(use)]
    np.testing.assert_allclose(spaced.array("betas"), expected, rtol=2e-6)
    np.testing.assert_array_equal(spaced.timesteps, use)


def test_space_timesteps_forms():
    assert S.space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    sections = S.space_timesteps(300, "10,10,10")
    assert len(sections) == 30 and sections[0] == 0 and sections[-1] == 299
    assert sections[9] == 99 and sections[10] == 100
    assert S.space_timesteps(1000, "1000") == list(range(1000))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: S.get_beta_schedule("sigmoid", T), "sigmoid.*allowed: linear, cosine"),
        (lambda: S.get_beta_schedule("linear", 0), "num_timesteps=0"),
        (lambda: P.NoiseProcess(np.array([0.1, 0.0])), r"\(0, 1\) .*; betas\[1\] = 0.0"),
        (lambda: P.NoiseProcess(np.array([0.1, 1.0])), r"beta = 1 makes .*betas\[1\] = 1.0"),
        (lambda: P.NoiseProcess(np.array([0.1, 1.5])), r"betas\[1\] = 1.5"),
        (lambda: P.NoiseProcess(np.full(3, 0.1), model_output="score"), "model_output='score'"),
        (lambda: P.NoiseProcess(np.full(3, 0.1), model_var_type="big"), "allowed: fixed_large"),
        (lambda: S.space_timesteps(100, "fast"), "'fast'"),
        (lambda: S.space_timesteps(10, "20"), "cannot take 20 steps"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
