"""Turns model parameters into denoise functions and images: shared by training previews,
`--mode sample` and the evaluation job."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from diffusion_jax import input_pipeline
from diffusion_jax.runtime import distributed
from diffusion_jax.sampling import registry, run


def model_apply(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable[..., jax.Array]:
    """A pure function `(params, x, t, y=None, dropout_key=None) -> output` of the module."""

    def apply(params, x, t, y=None, dropout_key=None):
        return nnx.merge(graphdef, params, rest)(x, t, y, dropout_key=dropout_key)

    return apply


def denoise_fn(
    config: ml_collections.ConfigDict,
    apply: Callable[..., jax.Array],
    params: Any,
    labels: jax.Array | None = None,
) -> run.DenoiseFn:
    """`(x_t, t) -> output` for sampling: unconditional, conditional on `labels`, or with
    classifier-free guidance when `sampling.guidance_scale` > 0 (the null class is
    `model.num_classes`)."""
    num_classes = config.model.num_classes
    if not num_classes:
        return lambda x, t: apply(params, x, t)
    if labels is None:
        raise ValueError("model.num_classes > 0: sampling needs class labels")
    if config.sampling.guidance_scale > 0:
        model = lambda x, t, y: apply(params, x, t, y)
        return run.classifier_free_guidance(
            model, labels, config.sampling.guidance_scale, null_label=num_classes
        )
    return lambda x, t: apply(params, x, t, labels)


def sample_shape(config: ml_collections.ConfigDict, batch: int) -> tuple[int, ...]:
    """[B, H, W, C] for images, [B, 2] for the swiss roll."""
    return (batch, *input_pipeline.data_shape(config))


def make_sampler(
    config: ml_collections.ConfigDict,
    apply: Callable[..., jax.Array],
    mesh: Mesh,
    batch: int,
    respacing: str,
    snapshot_every: int = 0,
    unroll: int = 1,
) -> Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]:
    """A jitted `(params, key, labels [B]) -> {'sample': [B, ...], ...}` with the batch sharded
    over the mesh, running the sampler of `config.sampling` (`sampling.registry.build`; a
    non-empty `respacing` selects the chain, '' the configured `sampling.num_steps` or the full
    chain) through `sampling.run.sample`. `sampling.clip_denoised` clips x0_hat for every
    sampler (images only). `snapshot_every` = k adds 'snapshots' [S, B, ...] of x0_hat every
    k steps (`registry.build(...).num_steps` counts the steps) and 'snapshot_timesteps' [S].
    `unroll`: steps per iteration of the sampler's loop (the same samples; the TPU compile
    check compiles a twin with 2 to tell the loop's cost from the rest, `tools.aot`)."""
    stepper = registry.build(config, respacing)
    shape = sample_shape(config, batch)
    clip = bool(config.sampling.clip_denoised) and config.data.name != "swissroll"

    def draw(params, key, labels):
        fn = denoise_fn(config, apply, params, labels if config.model.num_classes else None)
        predict = run.make_predict(fn, config.diffusion.model_output, clip)
        return run.sample(
            stepper, predict, shape, key, snapshot_every=snapshot_every, unroll=unroll
        )

    sharded = distributed.batch_sharded(mesh)
    repl = distributed.replicated(mesh)
    out_shardings = {"sample": sharded}
    if snapshot_every:
        out_shardings["snapshots"] = distributed.batch_sharded(mesh, 1)
        out_shardings["snapshot_timesteps"] = repl
    return jax.jit(
        draw,
        in_shardings=(repl, repl, sharded),
        out_shardings=out_shardings,
        compiler_options=distributed.compiler_options(mesh),
    )


def default_labels(config: ml_collections.ConfigDict, batch: int, offset: int = 0) -> jax.Array:
    """Cycling class labels 0..num_classes-1 (zeros for unconditional models)."""
    classes = max(config.model.num_classes, 1)
    return (jnp.arange(batch, dtype=jnp.int32) + offset) % classes
