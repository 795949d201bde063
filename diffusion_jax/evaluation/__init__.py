"""Evaluators (big_vision style), chosen by `config.eval.evaluators`, and the job that runs
them over checkpoints (`job.evaluate_checkpoints`, `--mode eval`).

| name | module | what it reports |
| --- | --- | --- |
| bpd | `bpd.py` | the variational bound in bits/dim, rate/distortion (DDPM eq. 5, §4.3) |
| ode_bpd | `ode_bpd.py` | bits/dim by the probability-flow ODE (Song et al. 2021), its SE, NFE |
| samples | `pictures.py` | the sample grid and the progressive strip (DDPM Fig. 6) |
| interpolation | `pictures.py` | latent interpolation (DDPM §4.4, Fig. 8) |
| fid | `fid.py` | FID and Inception Score of `eval.num_samples` samples |
| quality | `quality.py` | digits FD / classifier scores, swiss-roll energy distance / MMD |

Each is built as `cls(context, **options)` and called as `run(params, step) -> dict`; see
`base.py` for the interface.
"""

from __future__ import annotations

import importlib

from diffusion_jax import errors

# name -> "module.Class" in this package, imported on first use (so that
# `python -m diffusion_jax.evaluation.quality` does not import itself twice).
EVALUATORS = {
    "bpd": "bpd.BitsPerDim",
    "ode_bpd": "ode_bpd.OdeBitsPerDim",
    "samples": "pictures.Samples",
    "interpolation": "pictures.Interpolation",
    "fid": "fid.FidInceptionScore",
    "quality": "quality.SampleQuality",
}
# Evaluators that need image data (not the 2-D swiss roll).
IMAGE_EVALUATORS = ("bpd", "ode_bpd", "interpolation", "fid")


def evaluator_class(name: str) -> type:
    """The evaluator class registered as `name` (ValueError naming the allowed ones)."""
    if name not in EVALUATORS:
        raise errors.ConfigError(f"evaluator {name!r}; allowed: {', '.join(EVALUATORS)}")
    module, cls = EVALUATORS[name].split(".")
    return getattr(importlib.import_module(f"diffusion_jax.evaluation.{module}"), cls)
