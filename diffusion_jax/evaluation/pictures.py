"""Pictures of a checkpoint (DDPM §4): the sample grid and the progressive generation strip
(x0_hat along the chain, Fig. 6), evaluator 'samples'; the latent interpolation grid (§4.4,
Fig. 8), evaluator 'interpolation'."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from diffusion_jax import input_pipeline
from diffusion_jax.diffusion import process
from diffusion_jax.evaluation import base
from diffusion_jax.runtime import distributed, errors, logs, streams, visualize
from diffusion_jax.sampling import generation, registry, run
from diffusion_jax.training import config_checks


def progressive_strip(snapshots: np.ndarray, rows: int) -> tuple[np.ndarray, int]:
    """Snapshots [S, B, H, W, C] (noisy -> clean) -> (images [rows * S, H, W, C], S): row r
    is example r's x0_hat along the chain (DDPM Fig. 6)."""
    s = snapshots.shape[0]
    strip = np.swapaxes(np.asarray(snapshots)[:, :rows], 0, 1)
    return strip.reshape((-1, *snapshots.shape[2:])), s


def interpolation_grid(
    x_a: np.ndarray, x_b: np.ndarray, decoded: np.ndarray
) -> tuple[np.ndarray, int]:
    """Sources [P, H, W, C] and decoded mixtures [L, P, H, W, C] -> (images, L + 2): row p is
    x_a[p], the mixtures for lambda = 0 .. 1, then x_b[p] (DDPM Fig. 8)."""
    rows = np.concatenate([x_a[None], np.asarray(decoded), x_b[None]], axis=0)
    return np.swapaxes(rows, 0, 1).reshape((-1, *x_a.shape[1:])), rows.shape[0]


def snapshot_every(chain_length: int, num_snapshots: int) -> int:
    """Spacing that puts `num_snapshots` snapshots from about T - 1 down to 0."""
    return max(1, (chain_length - 1) // max(num_snapshots - 1, 1))


def make_interpolation_fn(
    config: ml_collections.ConfigDict,
    apply: Callable[..., jax.Array],
    timestep: int,
    lambdas: int,
) -> Callable[..., jax.Array]:
    """Jitted `(params, x_a, x_b [P, H, W, C], labels [P], key) -> [L, P, H, W, C]`: DDPM
    §4.4 on the full chain from `timestep` (at most T - 1) with L = `lambdas` evenly spaced
    lambdas in [0, 1]. It runs where its inputs are (one device: the batch is small and need
    not divide the device count)."""
    sched = process.from_config(config.diffusion)
    t_index = min(int(timestep), sched.num_timesteps - 1)
    mix = np.linspace(0.0, 1.0, int(lambdas))

    def interpolate(params, x_a, x_b, labels, key):
        tiled = jnp.tile(labels, len(mix)) if config.model.num_classes else None
        fn = generation.denoise_fn(config, apply, params, tiled)
        predict = run.make_predict(fn, config.diffusion.model_output, config.sampling.clip_denoised)
        return run.interpolate(sched, predict, x_a, x_b, mix, t_index, key)

    return jax.jit(interpolate, compiler_options=distributed.compiler_options())


class Samples:
    """Evaluator 'samples': `grid_num` samples as a grid ('samples'), and for images the
    progressive strip ('progressive') of the first `progressive_rows` of them at
    `progressive_steps` points of the chain, from one sampling run with the configured
    sampler."""

    needs = frozenset({base.Need.SAMPLES})

    def __init__(
        self,
        context: base.Context,
        *,
        grid_num: int,
        progressive_steps: int,
        progressive_rows: int,
    ) -> None:
        self.context = context
        self.grid_num, self.progressive_rows = grid_num, progressive_rows
        self.progressive_steps = progressive_steps
        self.batch = base.round_up_to_devices(max(grid_num, progressive_rows))
        self._sampler = None

    @classmethod
    def check_settings(cls, config: Any, path: str) -> None:
        counts = ("grid_num", "progressive_steps", "progressive_rows")
        config_checks.check_positive(config, tuple(f"{path}.{k}" for k in counts))

    def _make_sampler(self) -> Callable[..., dict[str, jax.Array]]:
        ctx, c = self.context, self.context.config
        steps = registry.build(c).num_steps
        every = snapshot_every(steps, self.progressive_steps)
        return generation.make_sampler(
            c, ctx.apply, ctx.mesh, self.batch, c.sampling.respacing, snapshot_every=every
        )

    def run(self, params: Any, step: int) -> dict[str, Any]:
        c = self.context.config
        self._sampler = self._sampler or self._make_sampler()
        labels = generation.default_labels(c, self.batch)
        out = self._sampler(params, streams.key(c.seed, streams.Stream.GRID), labels)
        samples = multihost_utils.process_allgather(out["sample"], tiled=True)
        snapshots = multihost_utils.process_allgather(out["snapshots"], tiled=True)
        if not logs.is_chief():
            return {}
        samples = np.asarray(samples)[: self.grid_num]
        pictures = {"samples": visualize.picture(samples, input_pipeline.reference_points(c))}
        if input_pipeline.is_image_data(c):
            images, ncol = progressive_strip(np.asarray(snapshots), self.progressive_rows)
            pictures["progressive"] = visualize.grid_image(images, ncol=ncol)
        return {"pictures": pictures}


class Interpolation:
    """Evaluator 'interpolation': the first 2P test images (P = `pairs`) interpolated
    pairwise in latent space from `timestep` with `lambdas` mixtures (chief only, one
    device)."""

    needs = frozenset({base.Need.IMAGES})

    def __init__(self, context: base.Context, *, timestep: int, pairs: int, lambdas: int) -> None:
        self.context = context
        self.timestep, self.pairs, self.lambdas = timestep, pairs, lambdas
        self._fn = None

    @classmethod
    def check_settings(cls, config: Any, path: str) -> None:
        config_checks.check_positive(config, (f"{path}.pairs", f"{path}.lambdas"))
        config_checks.check_positive(config, (f"{path}.timestep",), strict=False)

    def run(self, params: Any, step: int) -> dict[str, Any]:
        if not logs.is_chief():
            return {}
        ctx, c = self.context, self.context.config
        self._fn = self._fn or make_interpolation_fn(c, ctx.apply, self.timestep, self.lambdas)
        pairs = self.pairs
        batches = input_pipeline.create_eval_arrays(
            c, c.data.eval_split, 2 * pairs, batch_size=2 * pairs
        )
        batch = next(iter(batches))
        if len(batch["label"]) < 2 * pairs:
            raise errors.ConfigError(
                f"config.evals.{ctx.name}.pairs={pairs} needs {2 * pairs} test images"
            )
        x = input_pipeline.to_model_range(batch["image"])
        x_a, x_b = x[:pairs], x[pairs:]
        local_params = jax.tree.map(lambda a: a.addressable_data(0), params)
        decoded = self._fn(
            local_params,
            x_a,
            x_b,
            batch["label"][:pairs],
            streams.key(c.seed, streams.Stream.INTERPOLATION),
        )
        images, ncol = interpolation_grid(x_a, x_b, np.asarray(decoded))
        return {"pictures": {"interpolation": visualize.grid_image(images, ncol=ncol)}}
