"""Running a stepper: the x_T draw, one `lax.scan` over the step table, snapshots.

Every sampler takes a `denoise_fn(x_t, timesteps [B] float32) -> network output`, fed the
network timestep of `NoiseProcess.model_timestep` (integers on the chain, fractions between), and
a PRNG key: x_T = N(0, I) from split(key)[0]; the noise of the row at `position` p (steps still
to go) from fold_in(split(key)[1], p), so a chain draws the same noise at the same chain
position whatever it started from. Images are NHWC [B, H, W, C]; nothing loops over the steps
in Python: the program has the same size for any step count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion.process import NoiseProcess, eps_and_x0
from diffusion_jax.sampling import steppers
from diffusion_jax.sampling.steppers import Predict, Prediction, Row, Stepper

# (x_t [B, ...], timesteps [B] float32) -> output [B, ..., C or 2C]
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
NoiseFn = Callable[[jax.Array, tuple[int, ...]], jax.Array]
_INTS = ("position", "nfe", "order", "euler", "correct")


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32)


def make_predict(denoise_fn: DenoiseFn, model_output: str, clip_denoised: bool) -> Predict:
    """The one network call of every stepper: `predict(x, row, suffix='')` -> (eps_hat, x0_hat,
    output) at the row's point (`steppers.point`), converted by `process.eps_and_x0` (xprev on
    chain rows, with their posterior coefficients). With `clip_denoised`, x0_hat is clipped to
    [-1, 1] and eps_hat re-derived from it: every sampler sees the same clipped model."""

    def predict(x: jax.Array, row: Row, suffix: str = "") -> Prediction:
        alpha, sigma = row[f"alpha{suffix}"], row[f"sigma{suffix}"]
        steps = jnp.full(x.shape[:1], row[f"t_model{suffix}"], jnp.float32)
        out = denoise_fn(x, steps).astype(x.dtype)
        eps, x0 = eps_and_x0(
            model_output,
            out,
            x,
            alpha,
            sigma,
            clip=clip_denoised,
            coef1=row.get("coef1"),
            coef2=row.get("coef2"),
        )
        return Prediction(eps, x0, out)

    return predict


def device_rows(rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host table as scan inputs: int32 counters/orders/flags, float32 values."""
    return {k: jnp.asarray(v, jnp.int32 if k in _INTS else jnp.float32) for k, v in rows.items()}


def sample(
    stepper: Stepper,
    predict: Predict,
    shape: Sequence[int],
    key: jax.Array,
    *,
    x_init: jax.Array | None = None,
    snapshot_every: int = 0,
    noise_fn: NoiseFn = _normal,
    unroll: int = 1,
) -> dict[str, jax.Array]:
    """Runs `stepper` from x_T ~ N(0, I) of `shape` (or `x_init`) through its whole table, in
    one `lax.scan` over its rows with `unroll` of them per loop iteration.

    Returns {'sample'}; with `snapshot_every` = k also 'snapshots' [S, B, ...], x0_hat at the
    start of every row whose position p has p % k == 0, noisiest first (DDPM Fig. 6), and
    'snapshot_timesteps' [S], their network timesteps."""
    shape = tuple(shape)
    init_key, loop_key = jax.random.split(key)
    x = noise_fn(init_key, shape) if x_init is None else x_init
    if x.shape != shape:
        raise ValueError(f"x_init has shape {x.shape}; expected {shape}")
    positions = stepper.rows["position"]
    every = int(snapshot_every)
    count = int(positions[0]) // every + 1 if every else 0
    # One scratch slot at the end receives the rows that are not snapshotted.
    buf = jnp.zeros((count + 1,) + shape, jnp.float32) if every else None

    def body(carry, row):
        c, buf = carry
        noise = noise_fn(jax.random.fold_in(loop_key, row["position"]), shape)
        c, x0 = stepper.step(c, row, predict, noise)
        if every:
            p = row["position"]
            slot = jnp.where(p % every == 0, count - 1 - p // every, count)
            buf = jax.lax.dynamic_update_index_in_dim(buf, x0.astype(buf.dtype), slot, 0)
        return (c, buf), None

    rows = device_rows(stepper.rows)
    (c, buf), _ = jax.lax.scan(body, (stepper.init(x), buf), rows, unroll=unroll)
    result = {"sample": stepper.sample(c)}
    if every:
        hit = positions % every == 0
        result["snapshots"] = buf[:count]
        result["snapshot_timesteps"] = jnp.asarray(stepper.rows["t_model"][hit], jnp.float32)
    return result


def classifier_free_guidance(
    model_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    labels: jax.Array,
    guidance_scale: float,
    null_label: int,
) -> DenoiseFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a `DenoiseFn`.

    `model_fn(x, t, y)` is the class-conditional network; the guided mean output is
    (1 + w) * out(x, t, y) - w * out(x, t, null). Learned-variance channels (beyond x's C)
    are taken from the conditional output. Both passes run as one batch of 2B, so guidance
    doubles the batch of each network call, not the number of calls (the NFE).
    """

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        null = jnp.full_like(labels, null_label)
        both = model_fn(
            jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null])
        )
        cond, uncond = jnp.split(both, 2)
        c = x.shape[-1]
        guided = (1.0 + guidance_scale) * cond[..., :c] - guidance_scale * uncond[..., :c]
        return jnp.concatenate([guided, cond[..., c:]], axis=-1)

    return denoise


def interpolate(
    process: NoiseProcess,
    predict: Predict,
    x_a: jax.Array,
    x_b: jax.Array,
    lambdas: jax.Array,
    t_index: int,
    key: jax.Array,
) -> jax.Array:
    """DDPM §4.4: encode x_a, x_b [B, H, W, C] with q to chain timestep t_index, mix
    (1 - lam) x_t + lam x_t' for each lam in `lambdas` [L], and decode with the full chain's
    ancestral steps from there. The encoding and decoding noise is shared across lambdas.
    Returns [L, B, H, W, C]."""
    if x_a.shape != x_b.shape:
        raise ValueError(f"interpolate: x_a {x_a.shape} and x_b {x_b.shape} differ in shape")
    key_a, key_b, key_loop = jax.random.split(key, 3)
    t = process.chain_time(t_index)
    alpha, sigma = jnp.float32(process.alpha(t)), jnp.float32(process.sigma(t))
    xt_a = alpha * x_a + sigma * jax.random.normal(key_a, x_a.shape)
    xt_b = alpha * x_b + sigma * jax.random.normal(key_b, x_b.shape)
    lam = jnp.asarray(lambdas, jnp.float32).reshape((-1,) + (1,) * x_a.ndim)
    num = lam.shape[0]
    mixed = ((1.0 - lam) * xt_a + lam * xt_b).reshape((-1,) + x_a.shape[1:])

    def shared_noise(k, shape):
        return jnp.tile(jax.random.normal(k, x_a.shape), (num,) + (1,) * (x_a.ndim - 1))

    chain = steppers.ancestral(process, range(process.num_timesteps))
    keep = chain.rows["position"] <= t_index
    chain = dataclasses.replace(chain, rows={k: v[keep] for k, v in chain.rows.items()})
    out = sample(chain, predict, mixed.shape, key_loop, x_init=mixed, noise_fn=shared_noise)
    return out["sample"].reshape((num,) + x_a.shape)
