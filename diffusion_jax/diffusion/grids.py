"""Every step grid: the times a sampler steps through, as float64 NumPy on the host.

A grid is a strictly decreasing array of continuous times t_0 > t_1 > ... > t_K
(`process.NoiseProcess`): step k goes from t_k to t_{k+1}, the network is called at t_k (and
at a stepper's intermediate points). Two families, one table each:

Chain grids (`chain`): the sorted 0-based timesteps a respaced chain keeps, at times
(k + 1) / N, followed by t = 0 (the chain's last step goes to alphabar_0 = 1). They come from
- `respacing` strings (IDDPM §4.3, `schedules.space_timesteps`): "" the full chain, "K" K
  evenly spaced steps, "K1,K2,..." per-section counts, "ddimK" the DDIM stride below;
- `num_steps` = S with a `spacing` (`chain_timesteps`): for ancestral `uniform` is IDDPM's even
  respacing str(S); DDIM `uniform` is THE DDIM stride rule, stated once (`ddim_uniform`):
  range(0, T, c) with the smallest stride c that keeps exactly S steps (so `respacing="ddimS"`
  and `method=ddim, num_steps=S` keep the same timesteps; an S that no stride gives is an
  error); `quadratic` is the DDIM paper's int(linspace(0, sqrt(0.8 T), S)^2) (repeated values
  collapse, so it may keep fewer than S). The DDIM code indexes alphas as
  alphas_cumprod_padded[t + 1] with alphas_cumprod_padded[0] = 1, so its timestep t is exactly
  this repo's 0-based index, fed to the network as t.
- DDIM's `trailing` spacing (`trailing`): t_i = i / S from 1 down to 0, every step 1/S of the
  time (diffusers' timestep_spacing="trailing"; the grid of progressive distillation, whose
  students learn exactly these steps). Its times are chain timesteps where S divides N and
  fractions of one between them.

Time grids (`time_grid`) for the ODE solvers, from t_max = 1 down to t_min = 1 / N with exact
endpoints (DPM-Solver's `get_time_steps`): `uniform` in t, `logsnr` uniform in lambda (DPM-
Solver's choice for low-resolution images), `quadratic` in sqrt(t) (`time_quadratic`, the
continuous version of DDIM's quadratic), `karras` (EDM eq. 5, rho = 7, over sigma = exp(-lambda)).
`denoise_to_zero` replaces the grid's last point t_min by t = 0 (diffusers' final_sigmas_type=
"zero"): the last step goes from the spacing's second-to-last point to sigma = 0, so the step
count and the network calls stay S and t_min is never visited. On Gaussian data with an exact
network this beats the alternative of S - 1 steps to t_min and one more to 0 for every spacing
on a single variance, and for Heun on every problem measured (BENCHMARKS "Solver error against
diffusers"). The probability-flow likelihood integrates over
the same `uniform` / `logsnr` time grids.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion.process import NoiseProcess
from diffusion_jax.runtime.errors import ConfigError

CHAIN_SPACINGS = ("uniform", "quadratic")
TRAILING = "trailing"  # DDIM only: t_i = i / S (`trailing`)
TIME_SPACINGS = ("uniform", "logsnr", "quadratic", "karras")
KARRAS_RHO = 7.0


def ddim_uniform(num_timesteps: int, num_steps: int) -> list[int]:
    """THE DDIM stride rule: range(0, T, c) with the smallest stride c keeping exactly S steps
    (IDDPM's 'ddimS'). ConfigError when no stride gives S steps."""
    T, S = int(num_timesteps), int(num_steps)
    for stride in range(1, T + 1):
        if len(range(0, T, stride)) == S:
            return list(range(0, T, stride))
    counts = sorted({len(range(0, T, c)) for c in range(1, T + 1)})
    near = [c for c in counts if abs(c - S) == min(abs(c - S) for c in counts)]
    raise ConfigError(
        f"DDIM uniform spacing: no integer stride keeps {S} of {T} timesteps "
        f"(nearest step counts: {', '.join(map(str, near))})"
    )


def ddim_quadratic(num_timesteps: int, num_steps: int) -> list[int]:
    """The DDIM paper's quadratic skip: sorted unique int(linspace(0, sqrt(0.8 T), S)^2)."""
    seq = (np.linspace(0, np.sqrt(int(num_timesteps) * 0.8), int(num_steps)) ** 2).astype(int)
    return sorted({int(i) for i in seq})


def respacing_timesteps(num_timesteps: int, respacing: str) -> list[int]:
    """Timesteps kept by a `respacing` string ('' = all; 'ddimS' = `ddim_uniform`)."""
    if not respacing:
        return list(range(int(num_timesteps)))
    if respacing.strip().startswith("ddim"):
        try:
            steps = int(respacing.strip()[len("ddim") :])
        except ValueError:
            raise ConfigError(
                f"respacing={respacing!r} is not 'K', 'K1,K2,...' or 'ddimN'"
            ) from None
        return ddim_uniform(num_timesteps, steps)
    try:
        return schedules.space_timesteps(int(num_timesteps), respacing)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def chain_timesteps(ancestral: bool, num_timesteps: int, num_steps: int, spacing: str) -> list[int]:
    """Timesteps of the S-step chain of `spacing` (module docstring): ancestral `uniform` is
    IDDPM's even respacing str(S), DDIM `uniform` `ddim_uniform`, `quadratic` `ddim_quadratic`."""
    T, S = int(num_timesteps), int(num_steps)
    if not 1 <= S <= T:
        raise ConfigError(f"sampling.num_steps={num_steps!r} must lie in [1, {T}]")
    if spacing == "quadratic":
        return ddim_quadratic(T, S)
    if ancestral:
        return schedules.space_timesteps(T, str(S))
    return ddim_uniform(T, S)


def trailing(num_steps: int) -> np.ndarray:
    """The `trailing` grid of S steps [S + 1]: t_i = i / S, from t = 1 (network timestep N - 1)
    down to t = 0 (the data); progressive distillation's sampler (Salimans & Ho 2022, Alg. 2)."""
    return np.linspace(1.0, 0.0, int(num_steps) + 1)


def chain(process: NoiseProcess, timesteps: Sequence[int]) -> np.ndarray:
    """The grid of a chain keeping `timesteps`: their times, decreasing, then 0 [K + 1]."""
    kept = np.asarray(sorted(set(int(k) for k in timesteps)))
    return np.concatenate([process.chain_time(kept[::-1]), [0.0]])


def karras_sigmas(
    sigma_max: float, sigma_min: float, n: int, rho: float = KARRAS_RHO
) -> np.ndarray:
    """EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho, i = 0..n-1 ([n] float64, decreasing; [sigma_max] when n = 1)."""
    frac = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    inv = 1.0 / rho
    return (sigma_max**inv + frac * (sigma_min**inv - sigma_max**inv)) ** rho


def spaced(
    process: NoiseProcess, t_from: float, t_to: float, num_steps: int, spacing: str
) -> np.ndarray:
    """[num_steps + 1] times from t_from down to t_to (> 0), spaced by `spacing`, exact ends."""
    n = int(num_steps)
    if spacing == "uniform":
        t = np.linspace(t_from, t_to, n + 1)
    elif spacing == "quadratic":
        t = np.linspace(t_from**0.5, t_to**0.5, n + 1) ** 2
    elif spacing in ("logsnr", "karras"):
        lam_from, lam_to = process.lam(np.array([t_from, t_to]))
        if spacing == "logsnr":
            lam = np.linspace(lam_from, lam_to, n + 1)
        else:  # sigma = exp(-lambda)
            lam = -np.log(karras_sigmas(np.exp(-lam_from), np.exp(-lam_to), n + 1))
        t = process.inverse_lambda(lam)
    else:
        raise ConfigError(
            f"sampling.spacing={spacing!r} is not supported; allowed: {', '.join(TIME_SPACINGS)}"
        )
    t[0], t[-1] = t_from, t_to
    return t


def time_grid(
    process: NoiseProcess, num_steps: int, spacing: str, denoise_to_zero: bool = False
) -> np.ndarray:
    """The ODE solvers' grid of `num_steps` steps (module docstring) [num_steps + 1]."""
    n = int(num_steps)
    if n < 1:
        raise ConfigError(f"sampling.num_steps={num_steps!r} must be >= 1")
    t = spaced(process, process.t_max, process.t_min, n, spacing)
    if denoise_to_zero:
        t[-1] = 0.0
    return t
