"""The trained model a progressive distillation (`distill.py`) or a consistency run
(`consistency_step.py`) starts from: its workdir's config, checked against the student's, its
EMA parameters, and the run's first state. `name` is the config section naming it ("distill" or
"consistency": `teacher_workdir`, `teacher_step`, `teacher_output`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from diffusion_jax.runtime import errors
from diffusion_jax.training import checkpoint
from diffusion_jax.training import state as state_lib


def teacher_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The config saved in the teacher's workdir, checked against `config`: InputError when
    there is none, ConfigError when its model shape, noise schedule or output differ from what
    the student needs."""
    section = config[name]
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
        raise errors.ConfigError(
            f"the teacher in {workdir} predicts {out!r}, but config.{name}.teacher_output="
            f"{section.teacher_output!r}; set it to {out!r}"
        )
    return saved


def teacher_params(config: ml_collections.ConfigDict, name: str, mesh: Mesh) -> Any:
    """The teacher's EMA parameters (checkpoint `teacher_step`, -1 = the newest readable one),
    replicated on `mesh`."""
    saved = teacher_config(config, name)
    section = config[name]
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


def start_from_teacher(
    config: ml_collections.ConfigDict,
    name: str,
    state: state_lib.TrainState,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> state_lib.TrainState:
    """The first state of a run: the teacher's EMA parameters as the student's parameters and
    EMA, in the state's teacher slot (a `DistillState`'s, a consistency distillation's) and as
    the start of a consistency run's target network, where the state has them; a fresh
    optimiser."""
    params = teacher_params(config, name, mesh)
    copy = lambda: jax.tree.map(jnp.copy, params)
    slots = {"teacher_params": lambda: params, "target_params": copy}
    filled = {k: fill() for k, fill in slots.items() if getattr(state, k, None) is not None}
    return state.replace(
        params=copy(), ema_params=copy(), opt_state=jax.jit(tx.init)(params), **filled
    )
