"""Timestep sampling for training: uniform, and IDDPM's loss-aware importance sampler (§3.3).

The importance sampler is a functional state (a pytree of arrays) that lives inside the
jitted, sharded train step: `sample_timesteps` draws t and importance weights, and
`update_loss_history` records the latest per-example losses. Under `jax.jit` over a mesh the
step sees the global batch, so every device keeps the same history with no extra collectives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

SAMPLERS = ("uniform", "loss_aware")


@struct.dataclass
class LossHistory:
    """The last K losses of each of T timesteps: history [T, K], counts [T], next slot [T]."""

    history: jax.Array
    counts: jax.Array
    position: jax.Array


def init_loss_history(num_timesteps: int, history_per_term: int = 10) -> LossHistory:
    return LossHistory(
        history=jnp.zeros((num_timesteps, history_per_term), jnp.float32),
        counts=jnp.zeros((num_timesteps,), jnp.int32),
        position=jnp.zeros((num_timesteps,), jnp.int32),
    )


def loss_aware_probs(state: LossHistory, uniform_prob: float = 0.001) -> jax.Array:
    """p_t proportional to sqrt(E[L_t^2]) over the stored history (IDDPM eq. 18), mixed with
    `uniform_prob` of the uniform distribution; exactly uniform until every t has K values."""
    num_timesteps, k = state.history.shape
    weights = jnp.sqrt(jnp.mean(jnp.square(state.history), axis=-1))
    probs = weights / jnp.sum(weights)
    probs = probs * (1.0 - uniform_prob) + uniform_prob / num_timesteps
    uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)
    return jnp.where(jnp.all(state.counts >= k), probs, uniform)


def sample_timesteps(
    key: jax.Array,
    batch_size: int,
    num_timesteps: int,
    state: LossHistory | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Draws t [B] (int32) and the importance weights [B] = 1 / (T p_t) that keep the loss
    unbiased. Uniform (weights 1) when `state` is None."""
    if state is None:
        t = jax.random.randint(key, (batch_size,), 0, num_timesteps, jnp.int32)
        return t, jnp.ones((batch_size,), jnp.float32)
    probs = loss_aware_probs(state)
    t = jax.random.choice(key, num_timesteps, (batch_size,), p=probs).astype(jnp.int32)
    return t, 1.0 / (num_timesteps * probs[t])


def update_loss_history(state: LossHistory, t: jax.Array, losses: jax.Array) -> LossHistory:
    """Appends losses [B] at timesteps t [B] to each timestep's ring buffer of K values.

    Equivalent to appending the batch one example at a time: examples sharing a timestep
    take consecutive slots, and when more than K share one only the last K are kept.
    """
    num_timesteps, k = state.history.shape
    same = t[:, None] == t[None, :]  # [B, B]
    earlier = jnp.tril(same, k=-1).sum(axis=1)  # rank among same-t examples before it
    count = jnp.zeros((num_timesteps,), jnp.int32).at[t].add(1)
    keep = earlier >= count[t] - k  # drop those overwritten within this same batch
    slot = (state.position[t] + earlier) % k
    rows = jnp.where(keep, t, num_timesteps)  # out-of-range rows are dropped by the scatter
    history = state.history.at[rows, slot].set(losses.astype(jnp.float32), mode="drop")
    return LossHistory(
        history=history,
        counts=jnp.minimum(state.counts + count, k),
        position=(state.position + count) % k,
    )
