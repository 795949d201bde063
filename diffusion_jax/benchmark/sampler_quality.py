"""Sample quality per network evaluation: every sampler at several NFE on one checkpoint.

    python -m diffusion_jax.benchmark.sampler_quality --workdir /tmp/diffusion_digits \\
        [--num_samples 800] [--nfe 10,20,50] [--out FILE.json]

For each method (strided ancestral, DDIM, DPM-Solver++ 2M, DPM-Solver-3, Heun) at each NFE,
and the paper's full ancestral chain, draws `--num_samples` samples from the EMA parameters
of the latest checkpoint (under the run's own config.json) with the same noise, times them
after a compile run, and scores them with the project's sample-quality metric
(`evaluation.quality`: digits FD with its real-data floor, swiss-roll energy distance).
Prints a Markdown table; `--out` keeps the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import numpy as np

from diffusion_jax import (
    checkpoint,
    config_checks,
    distributed,
    errors,
    generation,
    input_pipeline,
    solvers,
)
from diffusion_jax import state as state_lib
from diffusion_jax.evaluation import quality

# (method, sampling overrides for a given NFE); Heun spends 2 N - 1 evaluations on N steps.
METHODS = {
    "ancestral (strided)": lambda nfe: {"method": "ancestral", "num_steps": nfe},
    "ddim": lambda nfe: {"method": "ddim", "num_steps": nfe, "spacing": "uniform"},
    "ddim (quadratic)": lambda nfe: {"method": "ddim", "num_steps": nfe, "spacing": "quadratic"},
    "dpm_solver++ 2M": lambda nfe: {"method": "dpm_solver++", "num_steps": nfe},
    "dpm_solver-3": lambda nfe: {"method": "dpm_solver", "num_steps": nfe, "order": 3},
    "heun": lambda nfe: {"method": "heun", "num_steps": (nfe + 1) // 2},
}


def _sampling(config: Any, overrides: dict[str, Any]) -> Any:
    c = config.copy_and_resolve_references()
    c.sampling.respacing = ""
    for k, v in overrides.items():
        c.sampling[k] = v
    return c


def measure(config: Any, workdir: str, num_samples: int, nfes: list[int]) -> list[dict]:
    """Rows {'method', 'nfe', 'seconds', **quality.score} for every method and NFE."""
    config_checks.validate_config(config, "sample")
    mesh = distributed.make_mesh()
    graphdef, rest, abstract = state_lib.abstract_train_state(config, mesh)
    step = checkpoint.checkpoint_steps(workdir)[-1]
    params = checkpoint.restore_step(workdir, step, abstract).ema_params
    apply = generation.model_apply(graphdef, rest)
    key = generation.stream_key(config, 1)
    labels = generation.default_labels(config, num_samples)
    settings = [("ancestral (paper)", {"method": "ancestral", "num_steps": 0})]
    settings += [(name, make(n)) for n in nfes for name, make in METHODS.items()]
    rows = []
    for name, overrides in settings:
        c = _sampling(config, overrides)
        solvers.validate_sampling(c.sampling, c.diffusion.num_timesteps, c.diffusion.model_output)
        draw = generation.make_sampler(c, apply, mesh, num_samples, "")
        jax.block_until_ready(draw(params, key, labels))  # compile
        start = time.perf_counter()
        out = jax.block_until_ready(draw(params, key, labels)["sample"])
        seconds = time.perf_counter() - start
        samples = np.asarray(out)
        if input_pipeline.is_image_data(c):
            samples = input_pipeline.to_data_levels(samples, int(c.data.levels))
        row = {
            "method": name,
            "nfe": generation.sampler_nfe(c, ""),
            "seconds": seconds,
            **quality.score(samples),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict], device: str) -> str:
    """Markdown: method | NFE | headline metric (floor) | seconds for the batch."""
    key, floor = (
        ("digits_fd", "digits_fd_floor")
        if "digits_fd" in rows[0]
        else (
            "swissroll_energy",
            "swissroll_energy_floor",
        )
    )
    lines = [
        f"| method | NFE | {key} (real floor {rows[0][floor]:.4g}) | seconds ({device}) |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['nfe']} | {r[key]:.4g} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training run (config.json, checkpoints)")
    p.add_argument("--num_samples", type=int, default=800)
    p.add_argument("--nfe", default="10,20,50")
    p.add_argument("--out", default="")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    args = p.parse_args(argv)
    with errors.reported(args.debug):
        config = checkpoint.read_config(args.workdir)
        if config is None:
            raise errors.UserError(f"no config.json in {args.workdir}")
        nfes = [int(n) for n in args.nfe.split(",")]
        rows = measure(config, args.workdir, args.num_samples, nfes)
    device = f"{jax.device_count()} {jax.devices()[0].platform}, jax {jax.__version__}"
    print(table(rows, device))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "num_samples": args.num_samples, "rows": rows}, f)


if __name__ == "__main__":
    main()
