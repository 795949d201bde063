"""Sample quality per network evaluation: every sampler at several NFE on one checkpoint.

    python -m diffusion_jax.tools.benchmark.sampler_quality --workdir /tmp/diffusion_digits \\
        [--num_samples 800] [--nfe 10,20,50] [--step N] [--out FILE.json]

For each method of `METHODS` (strided ancestral with uniform and quadratic steps, DDIM,
DPM-Solver++ 2M with and without the final step to sigma = 0, SDE-DPM-Solver++ 2M on logSNR
and quadratic steps, UniPC, DPM-Solver-3, Heun) at each NFE, and the paper's full ancestral
chain, draws `--num_samples` samples from the EMA parameters
of the latest checkpoint (under the run's own config.json) with the same noise, times them
after compiling, and scores them with the project's sample-quality metric
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

from diffusion_jax import input_pipeline
from diffusion_jax.evaluation import quality
from diffusion_jax.runtime import distributed, errors, platforms, streams
from diffusion_jax.sampling import generation, registry
from diffusion_jax.training import checkpoint, config_checks
from diffusion_jax.training import state as state_lib

# (method, sampling overrides for a given NFE); Heun spends 2 N - 1 evaluations on N steps.
# "(to zero)": the grid's last point is sigma = 0 (sampling.denoise_to_zero), at the same NFE;
# the others stop at t = 1/T.
METHODS = {
    "ancestral (strided)": lambda nfe: {"method": "ancestral", "num_steps": nfe},
    "ddim": lambda nfe: {"method": "ddim", "num_steps": nfe, "spacing": "uniform"},
    "ddim (quadratic)": lambda nfe: {"method": "ddim", "num_steps": nfe, "spacing": "quadratic"},
    "ddim (trailing)": lambda nfe: {"method": "ddim", "num_steps": nfe, "spacing": "trailing"},
    "dpm_solver++ 2M": lambda nfe: {
        "method": "dpm_solver++",
        "num_steps": nfe,
        "denoise_to_zero": False,
    },
    "dpm_solver++ 2M (to zero)": lambda nfe: {
        "method": "dpm_solver++",
        "num_steps": nfe,
        "denoise_to_zero": True,
    },
    "sde_dpm_solver++ 2M (to zero)": lambda nfe: {
        "method": "sde_dpm_solver++",
        "num_steps": nfe,
        "denoise_to_zero": True,
    },
    "sde_dpm_solver++ 2M quadratic (to zero)": lambda nfe: {
        "method": "sde_dpm_solver++",
        "num_steps": nfe,
        "spacing": "quadratic",
        "denoise_to_zero": True,
    },
    "ancestral (quadratic)": lambda nfe: {
        "method": "ancestral",
        "num_steps": nfe,
        "spacing": "quadratic",
    },
    "unipc-2 bh2 (to zero)": lambda nfe: {
        "method": "unipc",
        "num_steps": nfe,
        "denoise_to_zero": True,
    },
    "unipc-3 bh1 (to zero)": lambda nfe: {
        "method": "unipc",
        "num_steps": nfe,
        "order": 3,
        "unipc_variant": "bh1",
        "denoise_to_zero": True,
    },
    "dpm_solver-3": lambda nfe: {
        "method": "dpm_solver",
        "num_steps": nfe,
        "order": 3,
        "denoise_to_zero": False,
    },
    "heun": lambda nfe: {"method": "heun", "num_steps": (nfe + 1) // 2},
    # a consistency model's workdir (`--mode consistency`): one or multistep sampling
    "consistency": lambda nfe: {"method": "consistency", "num_steps": nfe},
}


def _sampling(config: Any, overrides: dict[str, Any]) -> Any:
    c = config.copy_and_resolve_references()
    c.sampling.respacing, c.sampling.spacing = "", ""  # the workdir's own sampler left aside
    for k, v in overrides.items():
        c.sampling[k] = v
    return c


def measure(
    config: Any,
    workdir: str,
    num_samples: int,
    nfes: list[int],
    methods: list[str],
    paper: bool = True,
    step: int = -1,
) -> list[dict]:
    """Rows {'method', 'nfe', 'seconds', **quality.score} for `methods` at every NFE, from
    checkpoint `step` (-1: the latest)."""
    config_checks.validate_config(config, "sample")
    mesh = distributed.make_mesh()
    graphdef, rest, abstract = state_lib.abstract_train_state(config, mesh)
    step = checkpoint.checkpoint_steps(workdir)[-1] if step < 0 else step
    params = checkpoint.restore_step(workdir, step, abstract).ema_params
    apply = generation.model_apply(graphdef, rest)
    key = streams.key(config.seed, streams.Stream.SAMPLES)
    labels = generation.default_labels(config, num_samples)
    settings = [("ancestral (paper)", {"method": "ancestral", "num_steps": 0})] if paper else []
    settings += [(name, METHODS[name](n)) for n in nfes for name in methods]
    rows = []
    for name, overrides in settings:
        c = _sampling(config, overrides)
        draw = generation.make_sampler(c, apply, mesh, num_samples, "")
        draw = draw.lower(params, key, labels).compile()  # compile first, not timed
        start = time.perf_counter()
        out = jax.block_until_ready(draw(params, key, labels)["sample"])
        seconds = time.perf_counter() - start
        samples = np.asarray(out)
        if input_pipeline.is_image_data(c):
            samples = input_pipeline.to_data_levels(samples, int(c.data.levels))
        row = {
            "method": name,
            "nfe": registry.build(c).nfe,
            "seconds": seconds,
            **quality.score(samples),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict], device: str) -> str:
    """Markdown: method | NFE | headline metric (floor) | [two-sample test, class score] |
    seconds for the batch."""
    if "digits_fd" in rows[0]:
        columns = [
            ("digits FD", "digits_fd", "digits_fd_floor", ".2f"),
            ("two-sample test", "digits_c2st", "digits_c2st_floor", ".3f"),
            ("class score", "digits_is", "digits_is_real", ".2f"),
        ]
    else:
        columns = [
            ("energy distance", "swissroll_energy", "swissroll_energy_floor", ".4f"),
            ("MMD", "swissroll_mmd", "swissroll_mmd_floor", ".4f"),
        ]
    head = " | ".join(f"{name} (real: {rows[0][floor]:{fmt}})" for name, _, floor, fmt in columns)
    lines = [
        f"| method | NFE | {head} | seconds ({device}) |",
        "| --- | --- |" + " --- |" * len(columns) + " --- |",
    ]
    for r in rows:
        values = " | ".join(f"{r[key]:{fmt}}" for _, key, _, fmt in columns)
        lines.append(f"| {r['method']} | {r['nfe']} | {values} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training run (config.json, checkpoints)")
    p.add_argument("--num_samples", type=int, default=800)
    p.add_argument("--nfe", default="10,20,50")
    p.add_argument("--methods", default=",".join(METHODS), help="names of METHODS, comma-separated")
    p.add_argument("--no_paper", action="store_true", help="leave out the 1000-step chain row")
    p.add_argument("--step", type=int, default=-1, help="the checkpoint (-1: the latest)")
    p.add_argument("--out", default="")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    args = p.parse_args(argv)
    platforms.skip_tpu_off_tpu_vms()
    with errors.reported(args.debug):
        config = checkpoint.read_config(args.workdir)
        if config is None:
            raise errors.UserError(f"no config.json in {args.workdir}")
        nfes = [int(n) for n in args.nfe.split(",")]
        methods = args.methods.split(",")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise errors.UserError(f"unknown --methods {unknown}; allowed: {', '.join(METHODS)}")
        rows = measure(
            config, args.workdir, args.num_samples, nfes, methods, not args.no_paper, args.step
        )
    device = f"{jax.device_count()} {jax.devices()[0].platform}, jax {jax.__version__}"
    print(table(rows, device))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "num_samples": args.num_samples, "rows": rows}, f)


if __name__ == "__main__":
    main()
