"""The evaluator types, what each needs, the configured instances, and their checks."""

from __future__ import annotations

import enum
import importlib
from typing import Any

import ml_collections

from diffusion_jax import input_pipeline
from diffusion_jax.diffusion import ode_likelihood, process
from diffusion_jax.metrics import dataset_quality
from diffusion_jax.runtime import errors
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.training import config_checks

# jax.default_matmul_precision names.
PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")

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
    """What an evaluator class declares in its `needs`; `check_config`
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


def check_config(config: ml_collections.ConfigDict) -> None:
    """What each configured evaluator declares it needs (`Need`), then the
    `config.eval` fields."""
    kinds = set()
    for name, (kind, own) in instances(config).items():
        needs = evaluator_class(kind).needs
        kinds.add(kind)
        if Need.IMAGES in needs and not input_pipeline.is_image_data(config):
            raise errors.ConfigError(
                f"config.eval.evaluators: {name!r} needs image data, not {config.data.name!r}"
            )
        if Need.QUALITY_METRIC in needs and config.data.name not in dataset_quality.HEADLINE:
            raise errors.ConfigError(
                f"config.eval.evaluators: {name!r} has a metric for "
                f"{', '.join(dataset_quality.HEADLINE)} only, not {config.data.name!r}; use 'fid'"
            )
        if own is config:
            continue
        if Need.SAMPLES not in needs and own.sampling.to_dict() != config.sampling.to_dict():
            raise errors.ConfigError(
                f"config.eval.instances.{name}.sampling: a {kind!r} evaluator draws no samples"
            )
        config_checks.check_sampling(own, mode="eval")
    for name in (
        "batch_size",
        "grid_num",
        "progressive_steps",
        "interpolation_lambdas",
        "is_splits",
    ):
        if int(config.eval[name]) < 1:
            raise errors.ConfigError(f"config.eval.{name}={config.eval[name]!r} must be >= 1")
    config_checks.check_field_choice(config, "eval.precision", PRECISIONS)
    config_checks.check_field_choice(config, "eval.ode_solver", ode_likelihood.SOLVERS)
    config_checks.check_field_choice(config, "eval.ode_divergence", ode_likelihood.DIVERGENCES)
    config_checks.check_field_choice(config, "eval.ode_probe", ode_likelihood.PROBES)
    config_checks.check_positive(config, ("eval.ode_num_steps", "eval.ode_num_probes"))
    if "ode_bpd" in kinds:
        config_checks.check_field_choice(
            config, "diffusion.model_output", process.ODE_MODEL_OUTPUTS
        )
    if 0 < config.eval.num_samples < config.eval.is_splits:
        raise errors.ConfigError(
            f"config.eval.num_samples={config.eval.num_samples} is fewer than the "
            f"{config.eval.is_splits} Inception Score splits (eval.is_splits)"
        )
