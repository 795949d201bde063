"""The training state and everything that builds it: used by training, evaluation, sampling,
conversion and the benchmark alike.

`TrainState` holds the parameters, their EMA, the optimiser state and the timestep sampler's
loss history. The optimiser is Adam with a linear learning-rate warmup and global-norm
clipping (DDPM §4), built from optax schedules.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from diffusion_jax import distributed, errors, models, timestep_sampler


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # nnx.State of the model's nnx.Param variables
    ema_params: Any
    opt_state: Any
    loss_history: timestep_sampler.LossHistory | None
    nonfinite_step: jax.Array  # int32 [], the first step (1-based) whose loss was not finite, or -1


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
    """The model of `config` with shapes only (no parameter is initialised)."""
    return nnx.eval_shape(lambda: models.build_model(config, nnx.Rngs(0)))


def learning_rate_schedule(training: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to `training.learning_rate` over `training.warmup_steps`, then
    constant (DDPM §4: warmup 5000)."""
    warmup = max(int(training.warmup_steps), 1)
    return optax.linear_schedule(0.0, float(training.learning_rate), warmup)


def make_optimizer(training: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with the warmup schedule and global-norm clipping (DDPM §4)."""
    parts = [optax.adam(learning_rate_schedule(training))]
    if training.grad_clip > 0:
        parts.insert(0, optax.clip_by_global_norm(training.grad_clip))
    return optax.chain(*parts)


def init_train_state(
    config: ml_collections.ConfigDict,
) -> tuple[nnx.GraphDef, nnx.State, TrainState, optax.GradientTransformation]:
    """Builds the model from `config.seed` and the initial (host-local) train state."""
    model = models.build_model(config, nnx.Rngs(params=config.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(config.training)
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
    return graphdef, rest, state, tx


def abstract_train_state(
    config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[nnx.GraphDef, nnx.State, TrainState]:
    """(graphdef, non-parameter state, TrainState of ShapeDtypeStructs replicated over
    `mesh`) without initialising any parameter (shapes only)."""
    graphdef, _, rest = nnx.split(abstract_model(config), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise errors.ConfigError(
            f"model {config.model.name!r} has non-parameter state; not supported"
        )
    shapes = jax.eval_shape(lambda: init_train_state(config)[2])
    repl = distributed.replicated(mesh)
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)
    return graphdef, rest, state
