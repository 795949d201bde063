"""The diffusers peer of `python -m diffusion_jax.tools.benchmark.solver_error`: diffusers'
schedulers on the same Gaussian data, scored the same way (relative RMS error of the final
sample against the exact probability-flow solution from the scheduler's first time to
sigma = 0, or to its last sigma where the scheduler stops short of 0).

Counterparts at diffusers' defaults on the linear schedule (T = 1000, beta 1e-4 to 0.02):
DPMSolverMultistepScheduler (dpmsolver++, order 2, final sigma 0; the deprecated 'dpmsolver'
stops at sigma_min), UniPCMultistepScheduler, HeunDiscreteScheduler and DDIMScheduler
(clip_sample off: the data are not images in [-1, 1]).

Optional tools, not package dependencies: torch and diffusers (0.32.2 measured).

    python launch/solver_error_peer.py --problem spectrum --out peer.json
    python -m diffusion_jax.tools.benchmark.solver_error --problem spectrum --compare peer.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

T = 1000
COMMON = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
SCHEDULERS = {
    "dpm_solver++": lambda: DPMSolverMultistepScheduler(**COMMON, algorithm_type="dpmsolver++"),
    "dpm_solver (2M)": lambda: DPMSolverMultistepScheduler(
        **COMMON, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"
    ),
    "unipc": lambda: UniPCMultistepScheduler(**COMMON),
    "heun": lambda: HeunDiscreteScheduler(**COMMON),
    "ddim": lambda: DDIMScheduler(**COMMON, clip_sample=False),
}
STEPS = (3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 100)


def variances(problem: str) -> np.ndarray:
    """[1, 8, 8] (NCHW) data variances: the same values as ours (`solver_error.variances`)."""
    if problem == "scalar":
        return np.full((1, 8, 8), 0.25)
    return np.logspace(-4, 0, 64).reshape(1, 8, 8)


def flow(x_vp: np.ndarray, s2: np.ndarray, a_from: float, a_to: float) -> np.ndarray:
    """The probability-flow ODE of N(0, s2) data from alpha = a_from to a_to (float64)."""
    v = lambda a: a * a * s2 + 1.0 - a * a
    return x_vp * np.sqrt(v(a_to) / v(a_from))


def error(make, steps: int, s2: np.ndarray) -> tuple[float, int]:
    """(relative RMS error, NFE) of one scheduler at `steps` steps."""
    acp = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
    x_t = np.random.default_rng(0).standard_normal((16, 1, 8, 8))
    s = make()
    s.set_timesteps(steps)
    heun = isinstance(s, HeunDiscreteScheduler)
    # Heun works on x / alpha (sigma = sqrt(1 - alpha^2) / alpha); the others on x.
    sample = torch.from_numpy((x_t * float(s.init_noise_sigma) if heun else x_t).astype(np.float32))
    if heun:
        a_start = 1.0 / np.sqrt(1.0 + float(s.sigmas[0]) ** 2)
    else:
        a_start = np.sqrt(acp[int(s.timesteps[0])])
    nfe = 0
    for t in s.timesteps:
        if heun:
            x = s.scale_model_input(sample, t).double().numpy()  # = the VP x_t
            a = 1.0 / np.sqrt(1.0 + float(s.sigmas[s.step_index]) ** 2)
        else:
            x, a = sample.double().numpy(), np.sqrt(acp[int(t)])
        var = 1.0 - a * a
        eps = np.sqrt(var) * x / (a * a * s2 + var)
        nfe += 1
        sample = s.step(torch.from_numpy(eps.astype(np.float32)), t, sample).prev_sample
    a_end = 1.0
    if getattr(s.config, "final_sigmas_type", "zero") == "sigma_min":
        a_end = np.sqrt(acp[0])
    exact = flow(x_t, s2, a_start, a_end)
    got = sample.double().numpy()
    return float(np.linalg.norm(got - exact) / np.linalg.norm(exact)), nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="spectrum", choices=("spectrum", "scalar"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    s2 = variances(args.problem)
    errors = {}
    for name, make in SCHEDULERS.items():
        for steps in STEPS:
            err, nfe = error(make, steps, s2)
            errors.setdefault(name, {})[nfe] = err
        print(name, {n: f"{e:.2e}" for n, e in errors[name].items()})
    with open(args.out, "w") as f:
        json.dump(
            {
                "problem": args.problem,
                "diffusers": __import__("diffusers").__version__,
                "errors": errors,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
