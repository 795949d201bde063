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

Configured instances (big_vision style): a name in `config.eval.evaluators` is an evaluator
type above, or an instance of `config.eval.instances`, {name: {'type': ..., 'sampling': {...},
'eval': {...}}}, whose `sampling` and `eval` settings override the config's for that instance
alone, e.g. FID at 20-step DPM-Solver++ next to FID at the 1000-step chain in one job:

    config.eval.instances = {"fid_dpm20": {"type": "fid", "sampling": {"method": "dpm_solver++",
                                                                        "num_steps": 20}}}
    config.eval.evaluators = ("fid", "fid_dpm20")

An instance named other than its type reports its metrics and pictures prefixed with its name
('fid_dpm20/fid'); an instance with its own sampling settings draws its own sample shards
(`DIR/eval/samples/<instance>/<step>/`), the others share `DIR/eval/samples/<step>/`.
"""

from __future__ import annotations

import enum
import importlib
from typing import Any

from diffusion_jax.errors import ConfigError

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


class Need(enum.Enum):
    """What an evaluator class declares in its `needs`; `config_checks.check_evaluation`
    checks each before anything compiles."""

    IMAGES = "image data"  # [H, W, C] images, not the 2-D swiss roll
    QUALITY_METRIC = "a sample-quality metric of the data"  # `metrics.quality.HEADLINE`
    SAMPLES = "samples"  # draws samples: an instance may give it its own sampler settings


def instances(config: Any) -> dict[str, tuple[str, Any]]:
    """{instance name: (evaluator type, the config it runs with)} of `config.eval.evaluators`
    (module docstring); ConfigError for a name that is neither a type nor an instance."""
    defined = config.eval.get("instances", None) or {}
    out = {}
    for name in config.eval.evaluators:
        if name in EVALUATORS and name not in defined:
            out[name] = (name, config)
            continue
        if name not in defined:
            raise ConfigError(
                f"config.eval.evaluators: {name!r} is neither an evaluator "
                f"({', '.join(EVALUATORS)}) nor an instance of config.eval.instances"
            )
        spec = defined[name]
        kind = spec.get("type", "")
        if kind not in EVALUATORS:
            raise ConfigError(
                f"config.eval.instances.{name}.type={kind!r}; allowed: {', '.join(EVALUATORS)}"
            )
        own = config.copy_and_resolve_references()
        with own.unlocked():
            for section in ("sampling", "eval"):
                for key, value in (spec.get(section, None) or {}).items():
                    if key not in own[section]:
                        raise ConfigError(
                            f"config.eval.instances.{name}.{section}.{key}: config.{section} "
                            f"has no field {key!r}"
                        )
                    own[section][key] = value
        out[name] = (kind, own)
    return out


def evaluator_class(name: str) -> type:
    """The evaluator class registered as `name` (ConfigError naming the allowed ones)."""
    if name not in EVALUATORS:
        raise ConfigError(f"evaluator {name!r}; allowed: {', '.join(EVALUATORS)}")
    module, cls = EVALUATORS[name].split(".")
    return getattr(importlib.import_module(f"diffusion_jax.evaluation.{module}"), cls)
