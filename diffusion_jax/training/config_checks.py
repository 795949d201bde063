"""The checks of a config's data, model, diffusion, training, distillation and sampler
settings, run by every mode before anything compiles (the evaluators' settings are checked by
`evaluation.evaluators.check_config`).

Each check raises ConfigError naming the field, its value and what is allowed; `main` turns it
into one line on stderr and exit code 1.
"""

from __future__ import annotations

import jax
import ml_collections

from diffusion_jax import MODES, input_pipeline, models
from diffusion_jax.diffusion import consistency, losses, process, schedules, timestep_sampler
from diffusion_jax.runtime import errors
from diffusion_jax.sampling import registry
from diffusion_jax.training import state

STUDENT_OUTPUTS = ("v", "x0")  # what a distilled or consistency student predicts


def field(config: ml_collections.ConfigDict, name: str):
    """The value of the dotted field `name` ('training.batch_size', 'evals.bpd.precision')."""
    value = config
    for key in name.split("."):
        value = value[key]
    return value


def check_positive(config: ml_collections.ConfigDict, fields: tuple[str, ...], strict: bool = True):
    for name in fields:
        value = field(config, name)
        if (value <= 0) if strict else (value < 0):
            bound = "> 0" if strict else ">= 0"
            raise errors.ConfigError(f"config.{name}={value!r} must be {bound}")


def check_field_choice(
    config: ml_collections.ConfigDict, name: str, allowed: tuple[str, ...]
) -> None:
    value = field(config, name)
    if value not in allowed:
        raise errors.ConfigError(f"config.{name}={value!r}; allowed: {', '.join(allowed)}")


def _divisible(config: ml_collections.ConfigDict, name: str, num_devices: int) -> None:
    value = field(config, name)
    if value % num_devices:
        raise errors.ConfigError(
            f"config.{name}={value} is not divisible by the {num_devices} devices; "
            f"use a multiple of {num_devices}"
        )


def check_model(config: ml_collections.ConfigDict) -> None:
    """Data, diffusion and model fields: what any mode needs to build the network."""
    input_pipeline.validate_dataset_name(config.data.name)
    check_field_choice(config, "model.name", models.MODEL_NAMES)
    schedules.get_beta_schedule(
        config.diffusion.schedule,
        config.diffusion.num_timesteps,
        config.diffusion.beta_start,
        config.diffusion.beta_end,
    )
    process.from_config(config.diffusion)  # parameterisation names
    check_field_choice(config, "diffusion.loss_type", losses.LOSS_TYPES)
    check_field_choice(config, "diffusion.timestep_sampler", timestep_sampler.SAMPLERS)
    check_positive(config, ("diffusion.beta_start", "diffusion.beta_end"))
    check_positive(config, ("model.dropout", "diffusion.hybrid_lambda"), strict=False)
    if not 2 <= config.data.levels <= 256:
        raise errors.ConfigError(f"config.data.levels={config.data.levels!r} must be in [2, 256]")
    state.abstract_model(config)  # the network's own checks, shapes only


def check_training(config: ml_collections.ConfigDict, num_devices: int) -> None:
    check_positive(
        config,
        (
            "training.batch_size",
            "training.learning_rate",
            "training.steps_per_call",
            "training.log_every",
            "training.checkpoint_every",
            "training.keep",
        ),
    )
    check_positive(
        config,
        (
            "training.num_train_steps",  # 0: distillation's own count
            "training.warmup_steps",
            "training.grad_clip",
            "training.label_dropout",
            "training.sample_every",
        ),
        strict=False,
    )
    for name in ("ema_decay", "label_dropout"):
        value = config.training[name]
        if not 0.0 <= value < 1.0:
            raise errors.ConfigError(f"config.training.{name}={value!r} must be in [0, 1)")
    _divisible(config, "training.batch_size", num_devices)
    _needs_classes(config, "training.label_dropout")


def check_task(config: ml_collections.ConfigDict, mode: str) -> None:
    """The settings of a training mode's task (train, distill, consistency; `tasks.py`): a
    config meant for another mode is refused with the mode to use (a config naming
    `distill.teacher_workdir` distils, one naming `consistency.method` is a consistency run);
    the teacher itself is checked when it is loaded (`teacher.teacher_config`)."""
    if state.distilling(config):
        wanted = "distill"
        why = f"config.distill.teacher_workdir={config.distill.teacher_workdir!r}"
    elif method := state.consistency_method(config):
        wanted, why = "consistency", f"config.consistency.method={method!r}"
    else:
        wanted, why = "train", ""
    if mode != wanted and wanted != "train":
        raise errors.ConfigError(
            f"{why}: this config is a {wanted} run; run it with --mode {wanted}"
        )
    if mode == "train":
        check_positive(config, ("training.num_train_steps",))
    elif mode == "distill":
        check_distill(config)
    else:
        check_consistency(config)


def check_consistency(config: ml_collections.ConfigDict) -> None:
    """`config.consistency` for `--mode consistency`."""
    c = config.consistency
    check_field_choice(config, "consistency.method", ("distillation", "tuning"))
    if not c.teacher_workdir:
        raise errors.ConfigError(
            f"--mode consistency ({c.method}) starts from a trained model: set "
            "--config.consistency.teacher_workdir"
        )
    check_positive(config, ("training.num_train_steps", "consistency.num_stages"))
    check_positive(config, ("consistency.p_std", "consistency.k", "consistency.b"))
    if int(c.num_stages) > int(config.training.num_train_steps):
        raise errors.ConfigError(
            f"config.consistency.num_stages={c.num_stages!r} is more than the "
            f"{config.training.num_train_steps} updates (training.num_train_steps)"
        )
    if not c.q > 1.0:
        raise errors.ConfigError(
            f"config.consistency.q={c.q!r} must be > 1: each stage divides the gap s - r by q"
        )
    if not 0.0 <= c.target_decay < 1.0:
        raise errors.ConfigError(
            f"config.consistency.target_decay={c.target_decay!r} must be in [0, 1)"
        )
    check_field_choice(config, "consistency.teacher_solver", ("ddim", "heun"))
    check_field_choice(config, "consistency.distance", consistency.DISTANCES)
    check_field_choice(config, "consistency.weighting", consistency.WEIGHTINGS)
    check_field_choice(config, "consistency.teacher_output", process.ODE_MODEL_OUTPUTS)
    check_field_choice(config, "diffusion.model_output", STUDENT_OUTPUTS)


def check_distill(config: ml_collections.ConfigDict) -> None:
    """`config.distill` for `--mode distill`."""
    d = config.distill
    if not d.teacher_workdir:
        raise errors.ConfigError(
            "--mode distill needs the trained teacher: set --config.distill.teacher_workdir"
        )
    start, end = int(d.start_steps), int(d.end_steps)
    if end < 1 or start <= end or start % end or (start // end) & (start // end - 1):
        raise errors.ConfigError(
            f"config.distill.start_steps={d.start_steps!r} must be end_steps={d.end_steps!r} "
            "(>= 1) times a power of 2 (>= 2): each round halves the steps"
        )
    check_positive(config, ("distill.steps_per_round",))
    check_field_choice(config, "diffusion.model_output", STUDENT_OUTPUTS)
    if d.teacher_output not in ("eps", config.diffusion.model_output):
        raise errors.ConfigError(
            f"config.distill.teacher_output={d.teacher_output!r}: a student predicting "
            f"{config.diffusion.model_output!r} starts from an eps teacher (fine-tuned first) "
            "or from one with its own output"
        )


def _needs_classes(config: ml_collections.ConfigDict, name: str) -> None:
    """`name` (label dropout, guidance) does something only for a class-conditional model."""
    if field(config, name) > 0 and not config.model.num_classes:
        raise errors.ConfigError(
            f"config.{name}={field(config, name)!r} needs a class-conditional model, but "
            "config.model.num_classes=0; set model.num_classes to the number of classes, or "
            f"{name}=0"
        )


def check_sampling(config: ml_collections.ConfigDict, mode: str = "train") -> None:
    """The sampler settings (method, steps, spacing, order, guidance), for every mode:
    training previews and final samples sample too."""
    registry.validate(
        config.sampling, config.diffusion.num_timesteps, config.diffusion.model_output
    )
    _needs_classes(config, "sampling.guidance_scale")
    if config.diffusion.model_output == "xprev":
        chains = {"sampling.respacing / sampling.num_steps": config.sampling.respacing}
        if mode == "train" and config.training.sample_every > 0:
            chains["sampling.preview_respacing"] = config.sampling.preview_respacing
        for name, respacing in chains.items():
            _check_xprev_chain(config, name, respacing)


def _check_xprev_chain(config: ml_collections.ConfigDict, name: str, respacing: str) -> None:
    """An xprev network predicts the posterior mean of one step t -> t-1 of the full T-step
    chain (DDPM eq. 7); a respaced chain would read it as the mean of a longer step t -> s
    and sample from the wrong distribution, so only the full chain may run it."""
    num_timesteps = config.diffusion.num_timesteps
    steps = registry.build(config, respacing).num_steps
    if steps != num_timesteps:
        raise errors.ConfigError(
            f"diffusion.model_output='xprev' predicts one step of the full {num_timesteps}-"
            f"step chain, so it cannot sample the {steps}-step chain set by {name} "
            f"(respacing={respacing!r}, num_steps={config.sampling.num_steps}); set it to "
            "the full chain ('' and 0), or train an eps, x0 or v model"
        )


def validate_config(
    config: ml_collections.ConfigDict, mode: str = "train", num_devices: int | None = None
) -> None:
    """All checks that `mode` ('train' | 'distill' | 'eval' | 'sample') needs; ValueError on
    the first bad value. Training previews sample, so every mode checks the sampler settings."""
    errors.check_choice("mode", mode, MODES)
    num_devices = num_devices or jax.device_count()
    check_model(config)
    check_training(config, num_devices)
    if mode in ("train", "distill", "consistency"):
        check_task(config, mode)
    check_sampling(config, mode)
    if mode != "train":
        _divisible(config, "sampling.batch_size", num_devices)
