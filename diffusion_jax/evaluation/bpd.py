"""The variational bound in bits/dim (DDPM eq. 5) and its rate/distortion split (§4.3).

Evaluator 'bpd': the full-chain bound on the first `num_examples` images of
`data.eval_split` (`vlb.calc_bpd_loop`), in global batches of `batch_size`, every network call
at the matmul `precision`, with the EMA parameters; conditional models are evaluated with the
true labels and without guidance. Pictures: the rate/distortion plot
(DDPM Fig. 5); the curves are also kept in `eval/rate_distortion_<step>.npz`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from diffusion_jax import input_pipeline
from diffusion_jax.diffusion import process, vlb
from diffusion_jax.evaluation import base, evaluators
from diffusion_jax.runtime import files, logs, streams, visualize
from diffusion_jax.sampling import generation
from diffusion_jax.training import config_checks


def make_bpd_fn(
    config: ml_collections.ConfigDict,
    apply: Callable[..., jax.Array],
    mesh: Mesh,
    *,
    precision: str,
) -> Callable[..., dict[str, jax.Array]]:
    """Jitted `(params, image uint8 [B, H, W, C], label [B], mask [B], key) -> sums`.

    The sums over the unmasked examples (replicated): 'count', 'total_bpd', 'prior_bpd',
    'vb' [T] and 'x0_mse' [T] of `vlb.calc_bpd_loop` on the full chain, every network
    call at `precision` (`evaluators.PRECISIONS`). Conditional models use the true labels
    and no guidance.
    """
    diffusion = process.from_config(config.diffusion)
    conditional = bool(config.model.num_classes)
    apply = base.with_precision(apply, precision)

    def per_example(params, image, label, key):
        y = label if conditional else None
        out = vlb.calc_bpd_loop(
            diffusion,
            lambda x_t, t: apply(params, x_t, t, y),
            input_pipeline.to_model_range(image),
            key,
            clip_denoised=config.sampling.clip_denoised,
        )
        return {k: out[k] for k in ("total_bpd", "prior_bpd", "vb", "x0_mse")}

    return base.make_masked_sums_fn(per_example, mesh)


def summarize_bpd(sums: dict[str, np.ndarray]) -> dict[str, Any]:
    """Means of the sums of `make_bpd_fn`: 'bpd' (total bound), 'bpd_prior' (L_T),
    'bpd_rate' (L_1 + ... + L_T), 'bpd_distortion' (L_0, the decoder) in bits/dim, 'rmse'
    (distortion of x0_hat(x_1) on the 0-255 scale), 'count', and the curves 'rate' [T],
    'distortion' [T], 'vb' [T] indexed by timestep (see `vlb.rate_distortion`)."""
    count = float(sums["count"])
    if count <= 0:
        raise ValueError("bits/dim: no evaluation examples")
    mean = {k: np.asarray(v, np.float64) / count for k, v in sums.items() if k != "count"}
    rd = vlb.rate_distortion(
        {
            "vb": mean["vb"][None],
            "prior_bpd": mean["prior_bpd"][None],
            "x0_mse": mean["x0_mse"][None],
        }
    )
    rate, distortion = np.asarray(rd["rate"], np.float64), np.asarray(rd["distortion"], np.float64)
    return {
        "bpd": float(mean["total_bpd"]),
        "bpd_prior": float(mean["prior_bpd"]),
        "bpd_rate": float(rate[0]),
        "bpd_distortion": float(mean["vb"][0]),
        "rmse": float(distortion[0]),
        "count": int(round(count)),
        "rate": rate,
        "distortion": distortion,
        "vb": mean["vb"],
    }


def compute_bpd(
    bpd_fn: Callable[..., dict[str, jax.Array]],
    params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    key: jax.Array,
) -> dict[str, Any]:
    """Bits/dim over `batches` (from `base.padded_batches`: image, label, mask), one fresh
    key per batch (fold_in of `key`); returns `summarize_bpd` of the summed results."""
    total = base.sum_over_batches(bpd_fn, params, batches, mesh, key, "bits/dim", "total_bpd")
    return summarize_bpd(total)


def eval_batches(
    config: ml_collections.ConfigDict, num_examples: int, batch_size: int
) -> Iterable[dict[str, np.ndarray]]:
    """This host's share of the first `num_examples` images of `data.eval_split`, padded to
    one fixed local batch (`batch_size` global) with a mask."""
    local = base.local_batch_size(batch_size)
    batches = input_pipeline.create_eval_arrays(
        config,
        config.data.eval_split,
        num_examples,
        batch_size=local,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return base.padded_batches(batches, local, generation.sample_shape(config, 1)[1:])


class BitsPerDim:
    """Evaluator 'bpd': the variational bound and rate/distortion (see the module doc)."""

    needs = frozenset({base.Need.IMAGES})

    def __init__(
        self, context: base.Context, *, num_examples: int, batch_size: int, precision: str
    ) -> None:
        self.context = context
        self.num_examples, self.batch_size, self.precision = num_examples, batch_size, precision
        self._fn = None

    @classmethod
    def check_settings(cls, config: Any, path: str) -> None:
        config_checks.check_positive(config, (f"{path}.num_examples", f"{path}.batch_size"))
        config_checks.check_field_choice(config, f"{path}.precision", evaluators.PRECISIONS)

    def run(self, params: Any, step: int) -> dict[str, Any]:
        ctx, c = self.context, self.context.config
        self._fn = self._fn or make_bpd_fn(c, ctx.apply, ctx.mesh, precision=self.precision)
        result = compute_bpd(
            self._fn,
            params,
            eval_batches(c, self.num_examples, self.batch_size),
            ctx.mesh,
            streams.key(c.seed, streams.Stream.BPD),
        )
        record: dict[str, Any] = {
            k: result[k] for k in ("bpd", "bpd_prior", "bpd_rate", "bpd_distortion", "rmse")
        }
        record["bpd_num_examples"] = result["count"]
        if logs.is_chief():
            buffer = io.BytesIO()
            np.savez(buffer, **{k: result[k] for k in ("rate", "distortion", "vb")})
            path = ctx.eval_dir / f"rate_distortion_{step:08d}.npz"
            files.write_atomic(path, buffer.getvalue())
            record["pictures"] = {
                "rate_distortion": visualize.rate_distortion_image(
                    result["rate"], result["distortion"]
                )
            }
        return record
