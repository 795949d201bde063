"""Evaluator instances (`config.evals`) and their checks (evaluation/evaluators.py)."""

import re

import pytest

from configs import cifar10, digits, swissroll
from diffusion_jax.evaluation import evaluators
from diffusion_jax.evaluation.evaluators import EVALUATORS, Need
from diffusion_jax.runtime import errors

CONFIGS = {"swissroll": swissroll, "cifar10": cifar10, "digits": digits}


def refused(c):
    with pytest.raises(errors.ConfigError) as info:
        evaluators.check_config(c)
    assert "\n" not in str(info.value)
    return str(info.value)


def with_instance(data, kind, **changes):
    """`data`'s config running one instance 'mine': the base settings of `kind`, changed."""
    c = CONFIGS[data].get_config()
    c.evals.mine = dict(c.evals[kind].to_dict(), **changes)
    c.eval.evaluators = ("mine",)
    return c


@pytest.mark.parametrize(
    "data, kind, changes, match",
    [
        # By what the class declares, under any instance name.
        ("swissroll", "bpd", {}, r"config.evals.mine: a 'bpd' evaluator needs image data"),
        ("swissroll", "interpolation", {}, r"'interpolation' evaluator needs image data"),
        ("cifar10", "quality", {}, r"has a metric for digits, swissroll only"),
        # Sampler settings only for an evaluator that draws samples.
        ("digits", "bpd", dict(sampling=dict(num_steps=20)), r"'bpd' evaluator draws no"),
        # An instance's own sampler is checked like the configured one, and named.
        ("digits", "fid", dict(sampling=dict(method="euler")), r"evals.mine.sampling: .*'euler'"),
        ("digits", "fid", dict(sampling=dict(steps=20)), r"evals.mine.sampling.steps: config"),
        ("digits", "fid", dict(sampling=dict(num_steps="20")), r"evals.mine.sampling.num_steps: "),
        # The settings are the constructor's: none unknown, none missing, the right type.
        ("digits", "bpd", dict(num_samples=5), r"evals.mine.num_samples: a 'bpd' .* no setting"),
        ("digits", "fid", dict(is_splits=2.5), r"evals.mine.is_splits=2.5 must be of type int"),
        ("digits", "fid", dict(is_logits_bias=1), r"is_logits_bias=1 must be of type bool"),
        ("digits", "samples", dict(grid_num=True), r"grid_num=True must be of type int"),
        ("digits", "quality", dict(type="nonesuch"), r"evals.mine.type='nonesuch'; allowed: bpd"),
        # Each type's own value checks.
        ("digits", "bpd", dict(precision="fast"), r"evals.mine.precision='fast'; allowed"),
        ("digits", "bpd", dict(batch_size=0), r"evals.mine.batch_size=0 must be > 0"),
        ("digits", "ode_bpd", dict(solver="euler"), r"evals.mine.solver='euler'"),
        ("digits", "ode_bpd", dict(num_probes=0), r"evals.mine.num_probes=0 must be > 0"),
        ("digits", "fid", dict(num_samples=5), r"num_samples=5 is fewer than the 10 Inception"),
        ("digits", "interpolation", dict(timestep=-1), r"evals.mine.timestep=-1 must be >= 0"),
        ("digits", "fid", dict(reference_examples=-1), r"reference_examples=-1 must be >= 0"),
        ("digits", "samples", dict(progressive_rows=0), r"progressive_rows=0 must be > 0"),
    ],
)
def test_instances_are_checked_in_one_line_naming_the_setting(data, kind, changes, match):
    message = refused(with_instance(data, kind, **changes))
    assert re.search(match, message), message


def test_a_missing_setting_or_instance_is_named():
    c = with_instance("digits", "fid")
    del c.evals.mine["is_splits"]
    assert re.search(r"config.evals.mine: missing setting\(s\) is_splits of 'fid'", refused(c))
    c.eval.evaluators = ("fid", "nonesuch")
    assert "'nonesuch' is not an entry of config.evals (bpd, fid" in refused(c)


def test_the_ode_likelihood_refuses_a_model_without_an_ode():
    c = with_instance("digits", "ode_bpd")
    c.diffusion.model_output = "xprev"
    assert re.search(r"evals.mine: the probability-flow ODE .* not 'xprev'", refused(c))


def test_every_configured_instance_passes_and_holds_exactly_its_type_settings():
    """The shipped configs' entries are complete and valid for each type (base.py defines one
    instance per type); an instance's sampler override is applied to its config alone."""
    for module in CONFIGS.values():
        c = module.get_config()
        assert {c.evals[name].type for name in c.evals} == set(EVALUATORS)
        for name in c.evals:
            kind = c.evals[name].type
            settings = set(c.evals[name]) - {"type", "sampling"}
            assert settings == set(evaluators.setting_types(evaluators.evaluator_class(kind)))
        evaluators.check_config(c)
    c = with_instance("digits", "fid", sampling=dict(method="ddim", num_steps=5))
    (instance,) = evaluators.instances(c).values()
    assert instance.own_samples and instance.config.sampling.num_steps == 5
    assert c.sampling.num_steps == CONFIGS["digits"].get_config().sampling.num_steps
    assert instance.job_config is c


def test_tools_find_the_settings_of_the_first_instance_of_a_type():
    c = digits.get_config()
    assert evaluators.settings_of_type(c, "bpd")["batch_size"] == 64
    c.evals.bpd_small = dict(c.evals.bpd.to_dict(), batch_size=8)
    c.eval.evaluators = ("bpd_small", "bpd")
    assert evaluators.settings_of_type(c, "bpd")["batch_size"] == 8
    del c.evals["fid"]
    with pytest.raises(errors.ConfigError, match="no evaluator of type 'fid'"):
        evaluators.settings_of_type(c, "fid")


def test_every_evaluator_declares_its_needs_and_checks():
    for name in EVALUATORS:
        cls = evaluators.evaluator_class(name)
        assert isinstance(cls.needs, frozenset) and cls.needs <= set(Need), name
        assert callable(cls.check_settings), name
        types = evaluators.setting_types(cls)
        assert types and set(types.values()) <= {"int", "float", "str", "bool"}, (name, types)
