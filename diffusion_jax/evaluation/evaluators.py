"""The evaluator types, what each needs, the configured instances, and their checks.

An instance is an entry of `config.evals` (big_vision style), `config.evals.<name> =
dict(type=<one of EVALUATORS>, **settings)`, whose settings are exactly the keyword-only
arguments of that type's constructor; an optional `sampling` dict overrides `config.sampling`
for that instance alone. `config.eval.evaluators` names the instances a job runs, in order.
"""

from __future__ import annotations

import enum
import importlib
import inspect
from typing import Any

import ml_collections

from diffusion_jax import input_pipeline
from diffusion_jax.metrics import dataset_quality
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.training import config_checks

# jax.default_matmul_precision names.
PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")

# type -> "module.Class" in this package, imported on first use (so that
# `python -m diffusion_jax.evaluation.quality` does not import itself twice).
EVALUATORS = {
    "bpd": "bpd.BitsPerDim",
    "ode_bpd": "ode_bpd.OdeBitsPerDim",
    "samples": "pictures.Samples",
    "interpolation": "pictures.Interpolation",
    "fid": "fid.FidInceptionScore",
    "quality": "quality.SampleQuality",
}

# The annotations a setting may have, and the values each accepts.
_SETTING_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


class Need(enum.Enum):
    """What an evaluator class declares in its `needs`; `check_config`
    checks each before anything compiles."""

    IMAGES = "image data"  # [H, W, C] images, not the 2-D swiss roll
    QUALITY_METRIC = "a sample-quality metric of the data"  # `dataset_quality.HEADLINE`
    SAMPLES = "samples"  # draws samples: an instance may give it its own sampler settings


def evaluator_class(kind: str) -> type:
    """The evaluator class registered as `kind` (ConfigError naming the allowed ones)."""
    if kind not in EVALUATORS:
        raise ConfigError(f"evaluator type {kind!r}; allowed: {', '.join(EVALUATORS)}")
    module, cls = EVALUATORS[kind].split(".")
    return getattr(importlib.import_module(f"diffusion_jax.evaluation.{module}"), cls)


def setting_types(cls: type) -> dict[str, str]:
    """{setting: annotation} of an evaluator class: the keyword-only constructor arguments
    without a default (those with one, such as a test's `feature_fn`, are not settings)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {
        p.name: str(p.annotation)
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    }


class Instance:
    """One configured evaluator: its name, type, settings and the config it runs with (the
    job's, with the instance's `sampling` overrides)."""

    def __init__(self, name: str, spec: ml_collections.ConfigDict, config: Any) -> None:
        self.name = name
        self.kind = spec.get("type", "")
        self.settings = {k: v for k, v in spec.items() if k not in ("type", "sampling")}
        self.sampling = dict(spec.get("sampling", None) or {})
        self.job_config = self.config = config
        if self.sampling:
            own = config.copy_and_resolve_references()
            with own.unlocked():
                for key, value in self.sampling.items():
                    if key not in own.sampling:
                        raise ConfigError(
                            f"config.evals.{name}.sampling.{key}: config.sampling has no "
                            f"field {key!r}"
                        )
                    try:
                        own.sampling[key] = value
                    except TypeError as e:  # ml_collections keeps each field's type
                        raise ConfigError(f"config.evals.{name}.sampling.{key}: {e}") from None
            self.config = own

    @property
    def own_samples(self) -> bool:
        """Whether it samples with other settings than the job's (then into its own folder)."""
        return self.config.sampling.to_dict() != self.job_config.sampling.to_dict()

    def build(self, context: Any, **options: Any) -> Any:
        return evaluator_class(self.kind)(context, **self.settings, **options)


def instances(config: Any) -> dict[str, Instance]:
    """{name: Instance} of `config.eval.evaluators`, in order; ConfigError for a name that
    `config.evals` does not define or an unknown type."""
    defined = config.get("evals", None) or {}
    out = {}
    for name in config.eval.evaluators:
        if name not in defined:
            raise ConfigError(
                f"config.eval.evaluators: {name!r} is not an entry of config.evals "
                f"({', '.join(defined) or 'none'})"
            )
        spec = defined[name]
        if spec.get("type", "") not in EVALUATORS:
            raise ConfigError(
                f"config.evals.{name}.type={spec.get('type', '')!r}; allowed: "
                f"{', '.join(EVALUATORS)}"
            )
        out[name] = Instance(name, spec, config)
    return out


def settings_of_type(config: Any, kind: str) -> dict[str, Any]:
    """The settings of the first instance of type `kind` (those run first, then the rest of
    `config.evals`), for the tools that compile an evaluator's programs (aot, benchmark)."""
    defined = config.get("evals", None) or {}
    names = [*config.eval.evaluators, *defined]
    for name in names:
        if name in defined and defined[name].get("type", "") == kind:
            return Instance(name, defined[name], config).settings
    raise ConfigError(f"config.evals has no evaluator of type {kind!r}")


def _check_settings(instance: Instance) -> None:
    """The settings against the constructor's: none unknown, none missing, the right types."""
    where = f"config.evals.{instance.name}"
    expected = setting_types(evaluator_class(instance.kind))
    for key, value in instance.settings.items():
        if key not in expected:
            raise ConfigError(
                f"{where}.{key}: a {instance.kind!r} evaluator has no setting {key!r}; its "
                f"settings: {', '.join(expected)}"
            )
        allowed = _SETTING_TYPES[expected[key]]
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            raise ConfigError(f"{where}.{key}={value!r} must be of type {expected[key]}")
    missing = [key for key in expected if key not in instance.settings]
    if missing:
        raise ConfigError(f"{where}: missing setting(s) {', '.join(missing)} of {instance.kind!r}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Each instance of `config.eval.evaluators`: its type, its settings (names, types and
    the evaluator's own `check_settings`), what its type declares it needs (`Need`), and its
    sampler overrides."""
    for name, instance in instances(config).items():
        cls = evaluator_class(instance.kind)
        _check_settings(instance)
        cls.check_settings(instance.config, f"evals.{name}")
        if Need.IMAGES in cls.needs and not input_pipeline.is_image_data(config):
            raise ConfigError(
                f"config.evals.{name}: a {instance.kind!r} evaluator needs image data, not "
                f"{config.data.name!r}"
            )
        if Need.QUALITY_METRIC in cls.needs and config.data.name not in dataset_quality.HEADLINE:
            raise ConfigError(
                f"config.evals.{name}: a {instance.kind!r} evaluator has a metric for "
                f"{', '.join(dataset_quality.HEADLINE)} only, not {config.data.name!r}; use 'fid'"
            )
        if not instance.sampling:
            continue
        if Need.SAMPLES not in cls.needs:
            raise ConfigError(
                f"config.evals.{name}.sampling: a {instance.kind!r} evaluator draws no samples"
            )
        try:
            config_checks.check_sampling(instance.config, mode="eval")
        except ConfigError as e:
            raise ConfigError(f"config.evals.{name}.sampling: {e}") from None
