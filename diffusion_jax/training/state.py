"""The training state and everything that builds it: used by training, evaluation, sampling,
conversion and the benchmark alike.

`TrainState` holds the parameters, their EMA, the optimiser state and the timestep sampler's
loss history; `DistillState` adds the teacher of a progressive-distillation round
(`distill.py`), `ConsistencyState` a consistency run's teacher and target network
(`consistency_step.py`). The optimiser is Adam with global-norm clipping and a linear
learning-rate warmup (DDPM §4), or for distillation a linear decay to 0 over each round
(Salimans & Ho 2022), built from optax schedules.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from diffusion_jax import models
from diffusion_jax.diffusion import timestep_sampler
from diffusion_jax.runtime import distributed, errors


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # nnx.State of the model's nnx.Param variables
    ema_params: Any
    opt_state: Any
    loss_history: timestep_sampler.LossHistory | None
    nonfinite_step: jax.Array  # int32 [], the first step (1-based) whose loss was not finite, or -1


@struct.dataclass
class DistillState(TrainState):
    teacher_params: Any  # the teacher of the current round, shaped as params


@struct.dataclass
class ConsistencyState(TrainState):
    teacher_params: Any  # consistency distillation's frozen teacher; None for tuning
    target_params: Any  # the EMA target network; None when consistency.target_decay = 0


def consistency_method(config: ml_collections.ConfigDict) -> str:
    """`consistency.method` ('' when `config` is not a consistency run)."""
    return str(config.get("consistency", {}).get("method", ""))


def distilling(config: ml_collections.ConfigDict) -> bool:
    """Whether `config` distils a teacher (`distill.teacher_workdir` set; `--mode distill`)."""
    return bool(config.get("distill", {}).get("teacher_workdir", ""))


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
    """The model of `config` with shapes only (no parameter is initialised)."""
    return nnx.eval_shape(lambda: models.build_model(config, nnx.Rngs(0)))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate by the optimiser's update count: a linear warmup from 0 to
    `training.learning_rate` over `training.warmup_steps`, then constant (DDPM §4: warmup
    5000); for a distillation a linear decay to 0 over each round, whose optimiser restarts
    (Salimans & Ho 2022, `distill.distill_step`)."""
    lr = float(config.training.learning_rate)
    if distilling(config):
        return optax.linear_schedule(lr, 0.0, int(config.distill.steps_per_round))
    return optax.linear_schedule(0.0, lr, max(int(config.training.warmup_steps), 1))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with global-norm clipping (`training.grad_clip`) and `learning_rate_schedule`."""
    parts = [optax.adam(learning_rate_schedule(config))]
    if config.training.grad_clip > 0:
        parts.insert(0, optax.clip_by_global_norm(config.training.grad_clip))
    return optax.chain(*parts)


def init_train_state(
    config: ml_collections.ConfigDict,
) -> tuple[nnx.GraphDef, nnx.State, TrainState, optax.GradientTransformation]:
    """Builds the model from `config.seed` and the initial (host-local) train state; a
    `DistillState` whose teacher is a copy of the parameters for a distillation config (its
    run then loads the teacher's, `distill.init_state`)."""
    model = models.build_model(config, nnx.Rngs(params=config.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(config)
    history = None
    if config.diffusion.timestep_sampler == "loss_aware":
        history = timestep_sampler.init_loss_history(
            config.diffusion.num_timesteps, config.diffusion.history_per_term
        )
    state = TrainState(
        step=jnp.int32(0),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        loss_history=history,
        nonfinite_step=jnp.int32(-1),
    )
    copy = lambda: jax.tree.map(jnp.copy, params)
    if distilling(config):
        state = DistillState(**vars(state), teacher_params=copy())
    elif method := consistency_method(config):
        state = ConsistencyState(
            **vars(state),
            teacher_params=copy() if method == "distillation" else None,
            target_params=copy() if config.consistency.target_decay > 0 else None,
        )
    return graphdef, rest, state, tx


def state_shardings(config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
    """Where each leaf of `config`'s train state lives on `mesh` (a TrainState of
    shardings): replicated, or with `training.shard_optimizer` (ZeRO-1, Rajbhandari et al.
    2020, stage 1 with the float32 master parameters counted as optimiser state) the
    parameters, the Adam moments and the EMA split over the data axis
    (`distributed.split_over_data`: an array with no axis the device count divides stays
    replicated), so each device stores and updates 1/N of them. The step gathers the
    parameters whole for the forward and backward passes (`train_step.whole`) and keeps each
    device's part of the summed gradients (`train_step.apply_gradients`). The step counter,
    the loss history, a distillation's teacher and a consistency run's target network stay
    replicated."""
    shapes = jax.eval_shape(lambda: init_train_state(config)[2])
    repl = distributed.replicated(mesh)
    out = jax.tree.map(lambda _: repl, shapes)
    if not config.training.get("shard_optimizer", False):
        return out
    split = lambda x: distributed.split_over_data(mesh, x.shape)
    return out.replace(
        params=jax.tree.map(split, shapes.params),
        ema_params=jax.tree.map(split, shapes.ema_params),
        opt_state=jax.tree.map(split, shapes.opt_state),
    )


def abstract_train_state(
    config: ml_collections.ConfigDict, mesh: Mesh, training: bool = False
) -> tuple[nnx.GraphDef, nnx.State, TrainState]:
    """(graphdef, non-parameter state, TrainState of ShapeDtypeStructs on `mesh`) without
    initialising any parameter (shapes only): placed for the train step (`state_shardings`)
    when `training`, else replicated, as the samplers and evaluators take the EMA parameters
    (a checkpoint restores into either)."""
    graphdef, _, rest = nnx.split(abstract_model(config), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise errors.ConfigError(
            f"model {config.model.name!r} has non-parameter state; not supported"
        )
    shapes = jax.eval_shape(lambda: init_train_state(config)[2])
    repl = distributed.replicated(mesh)
    state = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes,
        state_shardings(config, mesh) if training else jax.tree.map(lambda _: repl, shapes),
    )
    return graphdef, rest, state
