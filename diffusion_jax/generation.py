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

from diffusion_jax import continuous_time, distributed, input_pipeline, sampling, schedules, solvers


def stream_key(config: ml_collections.ConfigDict, stream: int) -> jax.Array:
    """An independent random stream below `config.seed` (fold_in), the same for every
    checkpoint; each use of randomness at evaluation and sampling has its own number."""
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), stream)


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
) -> sampling.DenoiseFn:
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
        return sampling.classifier_free_guidance(
            model, labels, config.sampling.guidance_scale, null_label=num_classes
        )
    return lambda x, t: apply(params, x, t, labels)


def sample_shape(config: ml_collections.ConfigDict, batch: int) -> tuple[int, ...]:
    """[B, H, W, C] for images, [B, 2] for the swiss roll."""
    return (batch, *input_pipeline.data_shape(config))


def sampler_steps(config: ml_collections.ConfigDict, respacing: str) -> int:
    """How many steps (snapshot positions) `make_sampler(config, ..., respacing)` runs: the
    chain length for ancestral/ddim, `sampling.num_steps` for the ODE solvers (the outer steps
    for singlestep DPM-Solver). Use it to space the progressive-strip snapshots."""
    s = config.sampling
    method = sampler_method(config, respacing)
    if method in solvers.ODE_METHODS:
        if method == "dpm_solver" and s.get("dpm_solver_variant", "singlestep") == "singlestep":
            order = solvers.resolve_order(method, s.get("order", 0))
            return len(solvers.singlestep_orders(s.num_steps, order))
        return int(s.num_steps)
    return chain_diffusion(config, respacing).num_timesteps


def sampler_nfe(config: ml_collections.ConfigDict, respacing: str) -> int:
    """Network evaluations per sample of `make_sampler(config, ..., respacing)` (the chain
    length for ancestral/ddim; `solvers.nfe` for the ODE solvers). Guidance runs its two
    passes as one batch of 2B and does not change the count."""
    method = sampler_method(config, respacing)
    if method in solvers.ODE_METHODS:
        return solvers.nfe(method, int(config.sampling.num_steps))
    return chain_diffusion(config, respacing).num_timesteps


def sampler_method(config: ml_collections.ConfigDict, respacing: str) -> str:
    """The method `make_sampler(config, ..., respacing)` runs: `sampling.method`, except that
    a 'ddimN' respacing turns 'ancestral' into 'ddim'."""
    method = config.sampling.method
    if method in solvers.CHAIN_METHODS and respacing.startswith("ddim"):
        return "ddim"  # a 'ddimN' respacing string selects DDIM, as it always has
    return method


def chain_diffusion(config: ml_collections.ConfigDict, respacing: str) -> schedules.Diffusion:
    """The (respaced) chain `make_sampler` runs ancestral/ddim over: `respacing` when given,
    else `sampling.num_steps` > 0 with `sampling.spacing` (`solvers.chain_timesteps`), else
    the full chain."""
    s, d = config.sampling, config.diffusion
    method = sampler_method(config, respacing)
    num_steps = int(s.get("num_steps", 0))
    if respacing or not num_steps:
        return schedules.diffusion_from_config(d, respacing)
    spacing = solvers.resolve_spacing(method, s.get("spacing", ""))
    use = solvers.chain_timesteps(method, d.num_timesteps, num_steps, spacing)
    betas = schedules.get_beta_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
    return schedules.make_diffusion(betas, d.model_output, d.model_var_type, use)


def make_sampler(
    config: ml_collections.ConfigDict,
    apply: Callable[..., jax.Array],
    mesh: Mesh,
    batch: int,
    respacing: str,
    snapshot_every: int = 0,
) -> Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]:
    """A jitted `(params, key, labels [B]) -> {'sample': [B, ...], ...}` with the batch
    sharded over the mesh, running `config.sampling.method`:

    - 'ancestral' | 'ddim' (with `sampling.eta`): over the chain `respacing` (as in
      `schedules.space_timesteps`; a 'ddimN' string selects DDIM); when `respacing` is ''
      and `sampling.num_steps` = S > 0, over the S-step chain of `sampling.spacing`
      (`solvers.chain_timesteps`: ancestral 'uniform' is respacing str(S), DDIM 'uniform' the
      DDIM paper's stride); else the full chain.
    - 'dpm_solver++' | 'dpm_solver' | 'heun': `solvers.sample` with `sampling.num_steps`,
      `spacing`, `order`, `dpm_solver_variant`, `lower_order_final` (`respacing` is not used,
      so training previews run the configured solver too); `sampling.clip_denoised` clips
      every solver's x0_hat (and re-derives eps_hat from it), as the chain samplers do.

    Settings are checked first (`solvers.validate_sampling`). `snapshot_every` = k adds
    'snapshots' [S, B, ...] of x0_hat every k steps (`sampler_steps` counts them) and
    'snapshot_timesteps' [S] (fractional network timesteps for the ODE solvers)."""
    s = config.sampling
    solvers.validate_sampling(s, config.diffusion.num_timesteps, config.diffusion.model_output)
    shape = sample_shape(config, batch)
    method = sampler_method(config, respacing)
    clip = bool(s.clip_denoised) and config.data.name != "swissroll"

    if method in solvers.ODE_METHODS:
        vp = continuous_time.vp_schedule(schedules.diffusion_from_config(config.diffusion))

        def draw(fn, key):
            return solvers.sample(
                method,
                vp,
                fn,
                shape,
                key,
                model_output=config.diffusion.model_output,
                num_steps=int(s.num_steps),
                order=int(s.get("order", 0)),
                spacing=s.get("spacing", ""),
                variant=s.get("dpm_solver_variant", "singlestep"),
                lower_order_final=bool(s.get("lower_order_final", True)),
                clip_denoised=clip,
                snapshot_every=snapshot_every,
            )

    else:
        diffusion = chain_diffusion(config, respacing)

        def draw(fn, key):
            return sampling.sample_loop(
                diffusion,
                fn,
                shape,
                key,
                method=method,
                eta=s.eta,
                clip_denoised=clip,
                snapshot_every=snapshot_every,
            )

    def run(params, key, labels):
        return draw(
            denoise_fn(config, apply, params, labels if config.model.num_classes else None), key
        )

    sharded = distributed.batch_sharded(mesh)
    repl = distributed.replicated(mesh)
    out_shardings = {"sample": sharded}
    if snapshot_every:
        out_shardings["snapshots"] = distributed.batch_sharded(mesh, 1)
        out_shardings["snapshot_timesteps"] = repl
    return jax.jit(
        run,
        in_shardings=(repl, repl, sharded),
        out_shardings=out_shardings,
        compiler_options=distributed.compiler_options(mesh),
    )


def default_labels(config: ml_collections.ConfigDict, batch: int, offset: int = 0) -> jax.Array:
    """Cycling class labels 0..num_classes-1 (zeros for unconditional models)."""
    classes = max(config.model.num_classes, 1)
    return (jnp.arange(batch, dtype=jnp.int32) + offset) % classes
