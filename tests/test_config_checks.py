"""Configurations that would run and give wrong results are refused before anything compiles,
in one ConfigError naming the field: an xprev network on any respaced chain (sampling,
DDIM steps, training previews), guidance or label dropout on an unconditional model, a beta
of 1. The jsd schedule is clipped (IDDPM's max_beta), so it samples finite numbers with the
chain and with the ODE solvers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from diffusion_jax.diffusion import schedules
from diffusion_jax.runtime import distributed, errors
from diffusion_jax.sampling import generation
from diffusion_jax.training import config_checks


def config(**overrides):
    c = digits.get_config()
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        c[section][key] = value
    return c


def refused(c, mode="train"):
    with pytest.raises(errors.ConfigError) as info:
        config_checks.validate_config(c, mode, num_devices=1)
    assert "\n" not in str(info.value)
    return str(info.value)


XPREV = dict(  # on the paper's chain (the digits config samples with a solver)
    diffusion__model_output="xprev",
    eval__evaluators=("samples",),
    sampling__method="ancestral",
    sampling__num_steps=0,
)


@pytest.mark.parametrize(
    "mode, overrides, field",
    [
        ("train", {}, "sampling.preview_respacing"),  # digits previews: the '100' chain
        ("train", dict(sampling__preview_respacing="ddim25"), "sampling.preview_respacing"),
        ("sample", dict(sampling__respacing="50"), "sampling.respacing"),
        ("eval", dict(sampling__method="ddim", sampling__num_steps=30), "sampling.num_steps"),
        ("sample", dict(sampling__num_steps=250), "sampling.num_steps"),
    ],
)
def test_xprev_on_a_respaced_chain_is_refused(mode, overrides, field):
    message = refused(config(**{**XPREV, **overrides}), mode)
    assert message.startswith("diffusion.model_output='xprev' predicts one step of the full 1000")
    assert field in message and "train an eps, x0 or v model" in message


def test_xprev_on_the_full_chain_is_allowed():
    c = config(**XPREV, sampling__preview_respacing="")
    for mode in ("train", "eval", "sample"):
        config_checks.validate_config(c, mode, num_devices=1)
    # Previews are not drawn (sample_every = 0): their respacing does not matter.
    c = config(**XPREV, training__sample_every=0)
    config_checks.validate_config(c, "train", num_devices=1)
    chain = dict(sampling__method="ancestral", sampling__num_steps=0, sampling__respacing="50")
    config_checks.validate_config(config(**chain), "sample", num_devices=1)


@pytest.mark.parametrize(
    "field, value", [("sampling.guidance_scale", 1.5), ("training.label_dropout", 0.1)]
)
def test_class_settings_on_an_unconditional_model_are_refused(field, value):
    section, key = field.split(".")
    message = refused(config(**{f"{section}__{key}": value}))
    assert message.startswith(f"config.{field}={value} needs a class-conditional model")
    conditional = config(**{f"{section}__{key}": value}, model__num_classes=10)
    config_checks.validate_config(conditional, "train", num_devices=1)


def test_a_beta_of_one_is_refused():
    message = refused(config(diffusion__schedule="const", diffusion__beta_end=1.0))
    assert "betas must lie in (0, 1)" in message


def test_jsd_is_clipped_like_iddpm_and_samples_finite_numbers():
    """beta_t = 1/(T - t + 1) reaches 1 at the last step; clipped to 0.999, alphabar_T > 0,
    and the chain and an ODE solver draw finite samples from an eps network."""
    betas = schedules.get_beta_schedule("jsd", 1000)
    assert betas[-1] == 0.999 and betas[-2] == 0.5
    c = config(diffusion__schedule="jsd", diffusion__num_timesteps=50, sampling__respacing="")
    config_checks.validate_config(c, "sample", num_devices=1)
    mesh = distributed.make_mesh()
    apply = lambda params, x, t, y=None: params * x  # eps_hat = x / 2: any smooth network
    for method, steps in (("ancestral", 0), ("dpm_solver++", 10), ("ddim", 10)):
        c.sampling.method, c.sampling.num_steps = method, steps
        draw = generation.make_sampler(c, apply, mesh, 8, "")
        out = draw(jnp.float32(0.5), jax.random.PRNGKey(0), None)
        assert np.all(np.isfinite(np.asarray(out["sample"]))), method
