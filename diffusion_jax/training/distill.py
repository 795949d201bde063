"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): few-step students of a trained
model, trained by the training loop (`--mode distill`) with this module's pure step.

A run has rounds of `distill.steps_per_round` updates each. In round h (h = 1, 2, ...) a
student of S = start_steps / 2^h steps learns to match, in one DDIM step, two DDIM steps of
its teacher on the grid t_i = i / (2 S) (`sampling.spacing="trailing"`, `grids.trailing`):
from z_t at t = i / S the teacher steps to t' = t - 1 / (2 S) and t'' = t - 1 / S, and the
student's x0_hat at t is regressed onto the x0 that makes one DDIM step land on z_t'':

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

with the truncated-SNR weight max(alpha_t^2 / sigma_t^2, 1) on |x0_hat - x~|^2. Each round
starts from the EMA of the previous one, as student and teacher both, with a fresh optimiser
whose learning rate decays linearly to 0 over the round; the last student has end_steps.

Parameterisation: the student predicts `diffusion.model_output` = v (or x0). At t = 1 an eps
prediction gives x0 = (z - sigma eps) / alpha with alpha ~ 0, which one-step students cannot
afford (the paper's section 4). The project's teachers predict eps, so an eps teacher first
gets a round 0: the same network, initialised from the teacher, fine-tuned into a v predictor
on the data (the target x~ is the data x0 itself, at t = i / start_steps, same weight). A v or
x0 teacher whose output matches the student's starts at round 1.

All times are multiples of 1 / start_steps: the step reads alpha, sigma and the network
timestep from one float64 table of them (`time_table`), indexed by integers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffusion_jax.diffusion import grids, process
from diffusion_jax.runtime import streams
from diffusion_jax.sampling import steppers
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import train_step


@dataclasses.dataclass(frozen=True)
class Plan:
    """The rounds of a run. Round r (0-based) halves the steps h = r + 1 - fine_tune times;
    h = 0 is the fine-tune round of an eps teacher."""

    start_steps: int
    end_steps: int
    steps_per_round: int
    fine_tune: bool

    @property
    def num_rounds(self) -> int:
        return int(math.log2(self.start_steps // self.end_steps)) + int(self.fine_tune)

    @property
    def total_steps(self) -> int:
        return self.num_rounds * self.steps_per_round

    def halvings(self, r: Any) -> Any:
        return r + 1 - int(self.fine_tune)

    def student_steps(self, r: int) -> int:
        """The sampler steps of round r's student (the fine-tune round: start_steps)."""
        return self.start_steps >> self.halvings(r)

    def round_of(self, step: int) -> int:
        """The round of the model after `step` updates (round 0 before any)."""
        return max(int(step) - 1, 0) // self.steps_per_round

    def describe(self, r: int) -> str:
        if self.halvings(r) == 0:
            return (
                f"round {r}/{self.num_rounds - 1}: fine-tuning the eps teacher into a "
                f"v predictor on the data ({self.start_steps}-step grid)"
            )
        n = self.student_steps(r)
        return f"round {r}/{self.num_rounds - 1}: a {n}-step student of a {2 * n}-step teacher"


def plan(config: ml_collections.ConfigDict) -> Plan:
    """The `Plan` of `config.distill` (a fine-tune round when the teacher predicts eps)."""
    d = config.distill
    fine_tune = d.teacher_output != config.diffusion.model_output
    return Plan(int(d.start_steps), int(d.end_steps), int(d.steps_per_round), fine_tune)


def final_step(config: ml_collections.ConfigDict) -> int:
    """The last update of a run of `config`: `training.num_train_steps`, or for distillation
    its rounds' total (capped by `training.num_train_steps` when that is > 0)."""
    steps = int(config.training.num_train_steps)
    if not state_lib.distilling(config):
        return steps
    total = plan(config).total_steps
    return min(total, steps) if steps > 0 else total


def time_table(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """t_model, alpha and sigma at t = j / start_steps, j = 0..start_steps (float64 [J + 1]),
    on the schedule of `config.diffusion` (`process.NoiseProcess`, as the samplers read it)."""
    t = grids.trailing(int(config.distill.start_steps))[::-1]
    return steppers.point(process.from_config(config.diffusion), t)


def ddim_target(
    z: jax.Array,
    predict: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    table: dict[str, jax.Array],
    j: jax.Array,
    d: jax.Array,
) -> jax.Array:
    """x~ of two DDIM steps (eta = 0) of `predict(z, j) -> (eps_hat, x0_hat)` from z [B, ...] at
    table index j [B] to j - d / 2 and j - d (paper Algorithm 2). [B, ...]"""

    def at(name, k):
        return table[name][k].reshape((-1,) + (1,) * (z.ndim - 1))

    def ddim(z, j_from, j_to):
        eps, x0 = predict(z, j_from)
        return at("alpha", j_to) * x0 + at("sigma", j_to) * eps

    j_mid, j_end = j - d // 2, j - d
    z_end = ddim(ddim(z, j, j_mid), j_mid, j_end)
    ratio = at("sigma", j_end) / at("sigma", j)
    return (z_end - ratio * z) / (at("alpha", j_end) - ratio * at("alpha", j))


def distill_step(
    state: state_lib.DistillState,
    batch: dict[str, jax.Array],
    *,
    config: ml_collections.ConfigDict,
    apply: Callable[..., jax.Array],
    tx: optax.GradientTransformation,
    rounds: Plan,
    shardings: state_lib.TrainState | None = None,
) -> tuple[state_lib.DistillState, dict[str, jax.Array]]:
    """One update of the round that `state.step` lies in, on {'image': [B, H, W, C], 'label'}.
    At a round's first update the EMA becomes student and teacher, and Adam restarts.
    `shardings` place the update (`train_step.apply_gradients`)."""
    table = {k: jnp.asarray(v, jnp.float32) for k, v in time_table(config).items()}
    per_round = rounds.steps_per_round
    r = state.step // per_round
    ema = state.ema_params
    restart = (state.step % per_round == 0) & (state.step > 0)
    fresh = state.replace(params=ema, teacher_params=ema, opt_state=tx.init(ema))
    state = jax.tree.map(lambda a, b: jnp.where(restart, a, b), fresh, state)

    x0 = batch["image"]
    b = x0.shape[0]
    key = streams.key(config.seed, streams.Stream.TRAIN, state.step)
    key_i, key_noise, key_dropout = jax.random.split(key, 3)
    h = rounds.halvings(r)
    d = jnp.left_shift(1, h)  # a student step in units of 1 / start_steps
    i = jax.random.randint(key_i, (b,), 1, rounds.start_steps // d + 1)
    j = i * d
    noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
    shape = (b,) + (1,) * (x0.ndim - 1)
    alpha, sigma = table["alpha"][j], table["sigma"][j]
    z = alpha.reshape(shape) * x0 + sigma.reshape(shape) * noise
    labels = batch["label"] if config.model.num_classes else None
    output = config.diffusion.model_output

    def predict(params, z, k, dropout_key=None):
        out = apply(params, z, table["t_model"][k], labels, dropout_key)
        return process.eps_and_x0(output, out, z, table["alpha"][k], table["sigma"][k])

    teacher = functools.partial(predict, jax.lax.stop_gradient(state.teacher_params))
    target = jax.lax.cond(
        h == 0, lambda: x0, lambda: ddim_target(z, teacher, table, j, jnp.full_like(j, d))
    )
    weight = jnp.maximum(jnp.square(alpha / sigma), 1.0)

    def loss_fn(params):
        _, x0_hat = predict(params, z, j, key_dropout)
        mse = jnp.mean(jnp.square(x0_hat - target).reshape(b, -1), axis=1)
        return jnp.mean(weight * mse)

    loss, grads = jax.value_and_grad(loss_fn)(train_step.whole(state.params, shardings))
    new_state = train_step.apply_gradients(
        state, grads, loss, tx, config.training.ema_decay, shardings
    )
    lr = state_lib.learning_rate_schedule(config)(state.step % per_round)  # Adam's count
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": lr,
        "round": r.astype(jnp.float32),
        "student_steps": (rounds.start_steps // d).astype(jnp.float32),
    }
    return new_state, metrics
