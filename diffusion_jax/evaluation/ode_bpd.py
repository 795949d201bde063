"""Bits/dim through the probability-flow ODE (Song et al. 2021), evaluator 'ode_bpd'.

The exact likelihood of the model's continuous relaxation, next to the variational bound of
'bpd', on the same first `eval.bpd_num_examples` test images: uniformly dequantized 8-bit
data, the discrete chain mapped to continuous time as DPM-Solver does (`continuous_time`),
and a fixed-step solver inside one `lax.scan` (`ode_likelihood`), so every shard and host
takes the same `eval.ode_num_steps` steps and the cost is known in advance. The divergence
is Hutchinson's estimator with `eval.ode_num_probes` probes (`eval.ode_probe`) or exact
(`eval.ode_divergence = "exact"`, small data only). Reports 'ode_bpd', its standard error
over images and probes 'ode_bpd_se', and the network evaluations per image 'ode_nfe'.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from diffusion_jax import (
    continuous_time,
    distributed,
    generation,
    logs,
    ode_likelihood,
    schedules,
)
from diffusion_jax.evaluation import base, bpd


def make_ode_bpd_fn(
    config: ml_collections.ConfigDict, apply: Callable[..., jax.Array], mesh: Mesh
) -> Callable[..., dict[str, jax.Array]]:
    """Jitted `(params, image uint8 [B, H, W, C], label [B], mask [B], key) -> sums` over the
    unmasked examples (replicated): 'count', 'bpd' and 'bpd_sq' (of the per-image bpd, for
    the standard error); conditional models use the true labels and no guidance."""
    c = config.eval
    vp = continuous_time.vp_schedule(schedules.diffusion_from_config(config.diffusion))
    conditional = bool(config.model.num_classes)
    apply = base.with_precision(apply, config.eval.precision)

    def run(params, image, label, mask, key):
        y = label if conditional else None
        out = ode_likelihood.ode_bpd(
            vp,
            config.diffusion.model_output,
            lambda x_t, t: apply(params, x_t, t, y),
            image,
            key,
            num_steps=int(c.ode_num_steps),
            solver=c.ode_solver,
            divergence=c.ode_divergence,
            probe=c.ode_probe,
            num_probes=int(c.ode_num_probes),
        )
        return {
            "count": jnp.sum(mask),
            "bpd": jnp.sum(mask * out["bpd"]),
            "bpd_sq": jnp.sum(mask * out["bpd"] ** 2),
        }

    sharded, repl = distributed.batch_sharded(mesh), distributed.replicated(mesh)
    return jax.jit(
        run,
        in_shardings=(repl, sharded, sharded, sharded, repl),
        out_shardings=repl,
        compiler_options=distributed.compiler_options(mesh),
    )


class OdeBitsPerDim:
    """Evaluator 'ode_bpd' (see the module doc)."""

    def __init__(self, context: base.Context) -> None:
        self.context = context
        self._fn = None

    def run(self, params: Any, step: int) -> dict[str, Any]:
        ctx, c = self.context, self.context.config
        self._fn = self._fn or make_ode_bpd_fn(c, ctx.apply, ctx.mesh)
        key = generation.stream_key(c, base.ODE_STREAM)
        total = None
        for i, batch in enumerate(bpd.eval_batches(c, c.eval.bpd_num_examples)):
            g = distributed.global_batch(batch, ctx.mesh)
            sums = self._fn(params, g["image"], g["label"], g["mask"], jax.random.fold_in(key, i))
            sums = {k: float(v) for k, v in jax.device_get(sums).items()}
            total = sums if total is None else {k: total[k] + v for k, v in sums.items()}
            logs.log(
                f"  ODE bits/dim: {int(total['count'])} examples, running mean "
                f"{total['bpd'] / max(total['count'], 1):.4f}"
            )
        if total is None or total["count"] <= 0:
            raise ValueError("ODE bits/dim: the evaluation split yielded no examples")
        n = total["count"]
        mean = total["bpd"] / n
        var = max(total["bpd_sq"] / n - mean**2, 0.0) * n / max(n - 1, 1)
        return {
            "ode_bpd": mean,
            "ode_bpd_se": math.sqrt(var / n),
            "ode_nfe": ode_likelihood.ode_nfe(int(c.eval.ode_num_steps), c.eval.ode_solver),
            "ode_num_examples": int(round(n)),
        }
