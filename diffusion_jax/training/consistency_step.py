"""Consistency distillation and consistency tuning (`--mode consistency`): the pure update of
a one/few-step student, trained by the training loop. The math (the consistency function, the
pairs (s, r), the distance and weight) is `diffusion.consistency`'s.

One update on a batch x_0 [B, H, W, C], at stage = step // (num_train_steps / num_stages):
draw s per example (lognormal), its partner r < s (`consistency.partner`), eps ~ N(0, I), the
point x~_s = x_0 + s eps (VP: x_s = alpha_s x~_s), and the point at r on (an estimate of) the
same ODE trajectory:
- distillation (CD, Song et al. 2023, Algorithm 2): the teacher's one ODE step from x_s to r,
  DDIM (x~_r = x0_hat + r eps_hat) or Heun;
- tuning (ECT, Geng et al. 2024; consistency training, CM Algorithm 3): x~_r = x_0 + r eps,
  the same eps, no teacher.
The loss is lambda(s, r) d(f_theta(x_s, s), f_target(x_r, r)) with f_target = the EMA target
network (decay `target_decay`) or, at decay 0, the online network itself, both under
stop_gradient and with the same dropout key. The student starts from the teacher's EMA
weights (as student, EMA and target); its own EMA (`training.ema_decay`) is what samples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffusion_jax.diffusion import consistency as cm
from diffusion_jax.diffusion import process as process_lib
from diffusion_jax.diffusion.process import NoiseProcess
from diffusion_jax.runtime import streams
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import train_step


def steps_per_stage(config: ml_collections.ConfigDict) -> int:
    """Updates per discretisation stage: `training.num_train_steps` / `consistency.num_stages`."""
    return max(int(config.training.num_train_steps) // int(config.consistency.num_stages), 1)


def stage_of(config: ml_collections.ConfigDict, step: Any) -> Any:
    """The discretisation stage of update `step` (0-based), the last one running to the end."""
    return jnp.minimum(step // steps_per_stage(config), int(config.consistency.num_stages) - 1)


def point(process: NoiseProcess, s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(alpha_t, sigma_t, network timestep) at EDM noise levels s [B]: t from lambda = -log s."""
    alpha, sigma = cm.vp_from_edm(s)
    t = process.inverse_lambda(-jnp.log(s))
    return alpha, sigma, process.model_timestep(t)


def consistency_step(
    state: state_lib.ConsistencyState,
    batch: dict[str, jax.Array],
    *,
    config: ml_collections.ConfigDict,
    apply: Callable[..., jax.Array],
    tx: optax.GradientTransformation,
    shardings: state_lib.TrainState | None = None,
) -> tuple[state_lib.ConsistencyState, dict[str, jax.Array]]:
    """One update (module docstring) on {'image': [B, H, W, C], 'label': [B]}; `shardings`
    place it (`train_step.apply_gradients`)."""
    c = config.consistency
    process = process_lib.from_config(config.diffusion)
    s_min, s_max = cm.sigma_range(process)
    x0 = batch["image"]
    b = x0.shape[0]
    shape = (b,) + (1,) * (x0.ndim - 1)
    key = streams.key(config.seed, streams.Stream.TRAIN, state.step)
    key_s, key_noise, key_dropout = jax.random.split(key, 3)
    stage = stage_of(config, state.step)
    s = cm.sample_sigmas(key_s, b, c.p_mean, c.p_std, s_min, s_max)
    r = cm.partner(s, stage, s_min, c.q, c.k, c.b)
    eps = jax.random.normal(key_noise, x0.shape, x0.dtype)
    alpha_s, sigma_s, t_s = point(process, s)
    alpha_r, sigma_r, t_r = point(process, r)
    x_s = alpha_s.reshape(shape) * (x0 + s.reshape(shape) * eps)
    labels = batch["label"] if config.model.num_classes else None

    def predict(params, output, x, alpha, sigma, t, dropout_key=None):
        out = apply(params, x, t, labels, dropout_key)
        return process_lib.eps_and_x0(output, out, x, alpha, sigma)

    if c.method == "distillation":
        teacher = functools.partial(
            predict, jax.lax.stop_gradient(state.teacher_params), c.teacher_output
        )
        eps_hat, x0_hat = teacher(x_s, alpha_s, sigma_s, t_s)
        x_tilde_r = cm.ddim_to(x0_hat, eps_hat, r)
        if c.teacher_solver == "heun":
            eps_hat_r, _ = teacher(alpha_r.reshape(shape) * x_tilde_r, alpha_r, sigma_r, t_r)
            x_tilde_r = cm.heun_to(x_s / alpha_s.reshape(shape), s, r, eps_hat, eps_hat_r)
    else:
        x_tilde_r = x0 + r.reshape(shape) * eps
    x_r = alpha_r.reshape(shape) * x_tilde_r

    output = config.diffusion.model_output

    def f(params, x, alpha, sigma, t, level):
        _, x0_hat = predict(params, output, x, alpha, sigma, t, key_dropout)
        return cm.consistency_fn(x, x0_hat, alpha, level, s_min)

    params = train_step.whole(state.params, shardings)
    target_params = state.target_params if state.target_params is not None else params
    target = jax.lax.stop_gradient(f(target_params, x_r, alpha_r, sigma_r, t_r, r))
    w = cm.weight(s, r, c.weighting)

    def loss_fn(params):
        online = f(params, x_s, alpha_s, sigma_s, t_s, s)
        return jnp.mean(w * cm.distance(online, target, c.distance))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    new_state = train_step.apply_gradients(
        state, grads, loss, tx, config.training.ema_decay, shardings
    )
    if state.target_params is not None:
        target = train_step.moving_average(state.target_params, new_state.params, c.target_decay)
        new_state = new_state.replace(target_params=target)
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": state_lib.learning_rate_schedule(config)(state.step),
        "stage": stage.astype(jnp.float32),
        "mean_gap_ratio": jnp.mean((s - r) / s),
    }
    return new_state, metrics
