"""Solver error per NFE on Gaussian data, whose probability-flow ODE is solved in closed form:

    python -m diffusion_jax.tools.benchmark.solver_error [--problem spectrum] \\
        [--nfe 5,10,20,50,100] [--out ours.json] [--compare peer.json]

Data x_0 ~ N(0, diag(s2)) over 8x8 pixels: `spectrum` has 64 variances log-spaced from 1e-4 to
1 (as the variances of natural images' components spread over decades), `scalar` 0.25 for all
(the tests' problem: a single variance lets a solver's error cross zero at some NFE). The
network is the exact eps-prediction sigma_t x / (alpha_t^2 s2 + sigma_t^2) on the linear
schedule, T = 1000; the flow from x_T at t_max to sigma = 0 is x_T sqrt(s2 / (alpha^2 s2 +
sigma^2)) elementwise. Each sampler runs at its defaults (the config's spacing and final
step) and is scored by the relative RMS error ||x - x_exact|| / ||x_exact|| against the flow
to sigma = 0, the data it is meant to produce. `launch/solver_error_peer.py` measures
diffusers' schedulers the same way; `--compare` prints both side by side.
"""

from __future__ import annotations

import argparse
import json
import runpy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import process as process_lib
from diffusion_jax.runtime import paths, platforms
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.sampling import registry, run

# ours -> (sampling overrides at an NFE, diffusers' counterpart in launch/solver_error_peer.py)
METHODS: dict[str, Any] = {
    "dpm_solver++": lambda nfe: {"method": "dpm_solver++", "num_steps": nfe},
    "dpm_solver (2M)": lambda nfe: {
        "method": "dpm_solver",
        "num_steps": nfe,
        "order": 2,
        "dpm_solver_variant": "multistep",
    },
    "unipc": lambda nfe: {"method": "unipc", "num_steps": nfe},
    "heun": lambda nfe: {"method": "heun", "num_steps": (nfe + 1) // 2},
    "ddim": lambda nfe: {"method": "ddim", "num_steps": nfe},
}
NFES = (5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 100)


def variances(problem: str) -> np.ndarray:
    """[8, 8, 1] data variances of `problem` (module docstring)."""
    if problem == "scalar":
        return np.full((8, 8, 1), 0.25)
    if problem == "spectrum":
        return np.logspace(-4, 0, 64).reshape(8, 8, 1)
    raise ValueError(f"unknown problem {problem!r}")


def errors(overrides: dict[str, Any], problems: tuple[str, ...]) -> tuple[dict[str, float], int]:
    """({problem: relative RMS error against the flow to sigma = 0}, NFE) of one sampler
    setting; the problems run side by side as channels of one sample, each from the same x_T."""
    config = runpy.run_path(str(paths.REPO_ROOT / "configs" / "base.py"))["get_base_config"]()
    config.data.image_size, config.data.channels = 8, len(problems)
    config.sampling.clip_denoised = False
    config.sampling.update(overrides)
    process = process_lib.from_config(config.diffusion)
    s2 = np.concatenate([variances(p) for p in problems], axis=-1)

    def denoise(x, steps):
        t = (steps + 1.0) / process.num_full_timesteps
        a = process.alpha(t).reshape((-1, 1, 1, 1))
        var = 1.0 - a**2
        return jnp.sqrt(var) * x / (a**2 * jnp.asarray(s2, jnp.float32) + var)

    stepper = registry.build(config)
    x_t = jnp.tile(jax.random.normal(jax.random.key(0), (16, 8, 8, 1)), (1, 1, 1, len(problems)))
    predict = run.make_predict(denoise, "eps", False)
    fn = jax.jit(lambda x: run.sample(stepper, predict, x.shape, jax.random.key(1), x_init=x))
    got = np.asarray(fn(x_t)["sample"], np.float64)
    a = float(stepper.rows["alpha"][0])
    exact = np.asarray(x_t, np.float64) * np.sqrt(s2 / (a * a * s2 + 1.0 - a * a))
    out = {
        p: float(np.linalg.norm(got[..., i] - exact[..., i]) / np.linalg.norm(exact[..., i]))
        for i, p in enumerate(problems)
    }
    return out, int(stepper.nfe)


def error(overrides: dict[str, Any], problem: str = "spectrum") -> tuple[float, int]:
    """(relative RMS error against the flow to sigma = 0, NFE) of one sampler setting."""
    out, nfe = errors(overrides, (problem,))
    return out[problem], nfe


def measure(problem: str, nfes: tuple[int, ...] = NFES) -> dict[str, dict[int, float]]:
    """{method: {NFE: error}} for every method of `METHODS` (DDIM at the NFEs its stride rule
    keeps exactly)."""
    out: dict[str, dict[int, float]] = {}
    for name, overrides in METHODS.items():
        for n in nfes:
            try:
                err, nfe = error(overrides(n), problem)
            except ConfigError:
                continue
            out.setdefault(name, {})[nfe] = err
    return out


def table(ours: dict, peer: dict | None = None) -> str:
    """Markdown: one row per NFE, ours (and diffusers' with their ratio) per method."""
    names = list(ours)
    nfes = sorted({int(n) for v in ours.values() for n in v})
    head = "| NFE | " + " | ".join(f"{m} | diffusers | ratio" if peer else m for m in names) + " |"
    lines = [head, "|" + " --- |" * (1 + len(names) * (3 if peer else 1))]
    for n in nfes:
        cells = []
        for m in names:
            mine = ours[m].get(n)
            theirs = peer.get(m, {}).get(str(n)) if peer else None
            cells.append("" if mine is None else f"{mine:.2e}")
            if peer:
                cells.append("" if theirs is None else f"{theirs:.2e}")
                cells.append("" if None in (mine, theirs) else f"{theirs / mine:.1f}x")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="spectrum", choices=("spectrum", "scalar"))
    parser.add_argument("--nfe", default=",".join(map(str, NFES)))
    parser.add_argument("--out", default="")
    parser.add_argument("--compare", default="", help="diffusers' JSON (solver_error_peer.py)")
    args = parser.parse_args(argv)
    platforms.skip_tpu_off_tpu_vms()
    ours = measure(args.problem, tuple(int(n) for n in args.nfe.split(",")))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"problem": args.problem, "errors": ours}, f, indent=1)
    peer = None
    if args.compare:
        with open(args.compare) as f:
            peer = json.load(f)["errors"]
    print(table(ours, peer))


if __name__ == "__main__":
    main()
