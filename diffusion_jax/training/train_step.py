"""The pure train step, jit-compiled over a device mesh: shared by the training loop
(`train.py`), the TPU compile check (`aot.py`) and the benchmark.

The batch is sharded over the mesh's 'data' axis; the timestep sampler's loss history is
replicated; the float32 parameters, the Adam moments and the EMA are split over the data axis
(ZeRO-1, `state.state_shardings`; the step gathers the parameters whole, `whole`), or
replicated with `training.shard_optimizer=False`. The old state is donated.
Dropout, timestep and noise keys derive from the step number (`streams.Stream.TRAIN`), so a
resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffusion_jax.diffusion import losses, timestep_sampler
from diffusion_jax.diffusion.process import NoiseProcess
from diffusion_jax.runtime import distributed, streams
from diffusion_jax.training import state as state_lib


def train_step(
    state: state_lib.TrainState,
    batch: dict[str, jax.Array],
    *,
    config: ml_collections.ConfigDict,
    apply: Callable[..., jax.Array],
    diffusion: NoiseProcess,
    tx: optax.GradientTransformation,
    shardings: state_lib.TrainState | None = None,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    """One optimisation step on a global batch {'image': [B, H, W, C], 'label': [B]};
    `shardings` (`state.state_shardings`) place the update (`apply_gradients`)."""
    x_start = batch["image"]
    key = streams.key(config.seed, streams.Stream.TRAIN, state.step)
    key_t, key_noise, key_dropout, key_label = jax.random.split(key, 4)
    t, weights = timestep_sampler.sample_timesteps(
        key_t, x_start.shape[0], diffusion.num_timesteps, state.loss_history
    )
    noise = jax.random.normal(key_noise, x_start.shape, x_start.dtype)
    labels = None
    if config.model.num_classes:
        drop = jax.random.bernoulli(key_label, config.training.label_dropout, batch["label"].shape)
        labels = jnp.where(drop, config.model.num_classes, batch["label"])

    def loss_fn(params):
        model_fn = lambda x_t, tt: apply(params, x_t, tt, labels, key_dropout)
        terms = losses.training_losses(
            diffusion,
            model_fn,
            x_start,
            t,
            noise,
            config.diffusion.loss_type,
            config.diffusion.hybrid_lambda,
        )
        return jnp.mean(terms["loss"] * weights), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(whole(state.params, shardings))
    history = state.loss_history
    if history is not None:  # IDDPM importance sampling follows the bound terms L_t
        tracked = terms["vb"] if config.diffusion.loss_type != "mse" else terms["loss"]
        history = timestep_sampler.update_loss_history(history, t, tracked)
    new_state = apply_gradients(state, grads, loss, tx, config.training.ema_decay, shardings)
    new_state = new_state.replace(loss_history=history)
    metrics = {
        "loss": loss,
        "mse": jnp.mean(terms["mse"]),
        "vb": jnp.mean(terms["vb"]),
        "grad_norm": optax.global_norm(grads),
        "learning_rate": state_lib.learning_rate_schedule(config)(state.step),
    }
    return new_state, metrics


def apply_gradients(
    state,
    grads,
    loss: jax.Array,
    tx: optax.GradientTransformation,
    ema_decay,
    shardings: state_lib.TrainState | None = None,
):
    """`state` (a TrainState or a subclass) one update on: step + 1, the optimiser's update of
    the parameters, their EMA (decay * ema + (1 - decay) * params), and the first step whose
    loss was not finite.

    With `shardings` (inside a jit over a mesh) the summed gradients are placed as the
    parameters are: under ZeRO-1 each device keeps its part (the TPU compiler all-reduces
    them and slices, BENCHMARKS.md) and updates its part of the parameters, the moments and
    the EMA."""
    if shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, shardings.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = moving_average(state.ema_params, params, ema_decay)
    bad = (state.nonfinite_step < 0) & ~jnp.isfinite(loss)
    return state.replace(
        step=state.step + 1,
        params=params,
        ema_params=ema,
        opt_state=opt_state,
        nonfinite_step=jnp.where(bad, state.step + 1, state.nonfinite_step),
    )


def whole(params, shardings: state_lib.TrainState | None):
    """`params` whole on every device, as the forward and backward passes read them: under
    ZeRO-1 an all-gather of the devices' parts. On a TPU, a parameter that the passes read
    only in bfloat16 (a bfloat16 model's kernels, `models.precision`; a float32 model's too,
    whose products at default precision take one bfloat16 pass) is gathered in bfloat16: XLA
    casts each part before the gather (BENCHMARKS.md). The gradients with respect to the
    result are float32. `shardings.step` is the replicated placement (`state_shardings`)."""
    if shardings is None:
        return params
    return jax.lax.with_sharding_constraint(params, shardings.step)


def moving_average(average, params, decay):
    """decay * average + (1 - decay) * params, leaf by leaf (the EMA of the parameters, a
    consistency run's target network)."""
    return jax.tree.map(lambda a, p: decay * a + (1.0 - decay) * p, average, params)


def multi_step(step_fn, state: state_lib.TrainState, batches: dict[str, jax.Array]):
    """K steps in one compiled call: `batches` leaves are [K, B, ...]; metrics are averaged.

    K > 1 runs a `lax.scan` (the accelerator path). K = 1 calls the step directly: XLA:CPU
    runs convolution gradients inside a loop body about 40x slower than outside one.
    """
    if jax.tree.leaves(batches)[0].shape[0] == 1:
        return step_fn(state, jax.tree.map(lambda x: x[0], batches))
    state, metrics = jax.lax.scan(step_fn, state, batches)
    return state, jax.tree.map(jnp.mean, metrics)


def compile_train_fn(config, apply, diffusion, tx, mesh):
    """The jitted `(state, batches [K, B, ...]) -> (state, metrics)`, state donated."""
    step_fn = functools.partial(train_step, config=config, apply=apply, diffusion=diffusion, tx=tx)
    return compile_steps(step_fn, config, mesh)


def compile_steps(step_fn, config: ml_collections.ConfigDict, mesh):
    """`multi_step` of `step_fn(state, batch, shardings=...) -> (state, metrics)` (a training
    task's step) jitted over `mesh`: the state placed as `state.state_shardings(config, mesh)`
    say, which the step also receives, and donated; the batches [K, B, ...] sharded over B."""
    shardings = state_lib.state_shardings(config, mesh)
    repl = distributed.replicated(mesh)
    return jax.jit(
        functools.partial(multi_step, functools.partial(step_fn, shardings=shardings)),
        in_shardings=(shardings, distributed.batch_sharded(mesh, 1)),
        out_shardings=(shardings, repl),
        donate_argnums=(0,),
        compiler_options=distributed.compiler_options(mesh),
    )
