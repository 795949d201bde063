"""The trained model a progressive distillation (`distill.py`) or a consistency run
(`consistency_step.py`) starts from: its workdir's config, checked against the student's, and its
EMA parameters. `section` is the config section naming it (`config.distill` or
`config.consistency`: `teacher_workdir`, `teacher_step`, `teacher_output`)."""

from __future__ import annotations

from typing import Any

import ml_collections
from jax.sharding import Mesh

from diffusion_jax.runtime import errors
from diffusion_jax.training import checkpoint
from diffusion_jax.training import state as state_lib


def teacher_config(
    config: ml_collections.ConfigDict, section: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """The config saved in the teacher's workdir, checked against `config`: InputError when
    there is none, ConfigError when its model shape, noise schedule or output differ from what
    the student needs."""
    workdir = section.teacher_workdir
    checkpoint.check_workdir_exists(workdir)
    saved = checkpoint.read_config(workdir)
    if saved is None:
        raise errors.InputError(
            f"the teacher workdir {workdir} has no config.json: give the workdir of a training run"
        )
    checkpoint.check_compatible(workdir, config)
    for name in ("schedule", "num_timesteps", "beta_start", "beta_end"):
        theirs, mine = saved.diffusion.get(name), config.diffusion[name]
        if theirs != mine:
            raise errors.ConfigError(
                f"the teacher in {workdir} was trained with diffusion.{name}={theirs!r}, this "
                f"config has {mine!r}: a student learns the teacher's noise schedule"
            )
    out = saved.diffusion.get("model_output", "eps")
    if out != section.teacher_output:
        field = "distill" if section is config.get("distill") else "consistency"
        raise errors.ConfigError(
            f"the teacher in {workdir} predicts {out!r}, but config.{field}.teacher_output="
            f"{section.teacher_output!r}; set it to {out!r}"
        )
    return saved


def teacher_params(
    config: ml_collections.ConfigDict, section: ml_collections.ConfigDict, mesh: Mesh
) -> Any:
    """The teacher's EMA parameters (checkpoint `section.teacher_step`, -1 = the newest
    readable one), replicated on `mesh`."""
    saved = teacher_config(config, section)
    workdir = section.teacher_workdir
    _, _, abstract = state_lib.abstract_train_state(saved, mesh)
    step = int(section.teacher_step)
    if step >= 0:
        params = checkpoint.restore_step(workdir, step, abstract).ema_params
    else:
        step, restored = checkpoint.restore_newest_step(workdir, abstract)
        params = restored.ema_params
    print(f"Teacher: {workdir}, checkpoint {step} (EMA parameters).", flush=True)
    return params
