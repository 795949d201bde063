"""Bits/dim through the probability-flow ODE (Song et al. 2021), evaluator 'ode_bpd'.

The exact likelihood of the model's continuous relaxation, next to the variational bound of
the 'bpd' evaluator, on the first `num_examples` test images: uniformly dequantized 8-bit
data, the discrete chain mapped to continuous time as DPM-Solver does (`process.NoiseProcess`),
and a fixed-step solver inside one `lax.scan` (`ode_likelihood`), so every shard and host
takes the same `num_steps` steps of `solver` and the cost is known in advance. The divergence
is Hutchinson's estimator with `num_probes` probes of `probe` ('rademacher' | 'gaussian') or
exact (`divergence = "exact"`, small data only). Batches and `precision` as for 'bpd'.
Reports 'ode_bpd', its standard error over images and probes 'ode_bpd_se', and the network
evaluations per image 'ode_nfe'.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from diffusion_jax.diffusion import ode_likelihood, process
from diffusion_jax.evaluation import base, bpd, evaluators
from diffusion_jax.runtime import errors, streams
from diffusion_jax.training import config_checks


def make_ode_bpd_fn(
    config: ml_collections.ConfigDict,
    apply: Callable[..., jax.Array],
    mesh: Mesh,
    *,
    precision: str,
    num_steps: int,
    solver: str,
    divergence: str,
    probe: str,
    num_probes: int,
) -> Callable[..., dict[str, jax.Array]]:
    """Jitted `(params, image uint8 [B, H, W, C], label [B], mask [B], key) -> sums` over the
    unmasked examples (replicated): 'count', 'bpd' and 'bpd_sq' (of the per-image bpd, for
    the standard error); conditional models use the true labels and no guidance."""
    vp = process.from_config(config.diffusion)
    conditional = bool(config.model.num_classes)
    apply = base.with_precision(apply, precision)

    def per_example(params, image, label, key):
        y = label if conditional else None
        out = ode_likelihood.ode_bpd(
            vp,
            config.diffusion.model_output,
            lambda x_t, t: apply(params, x_t, t, y),
            image,
            key,
            num_steps=int(num_steps),
            solver=solver,
            divergence=divergence,
            probe=probe,
            num_probes=int(num_probes),
        )
        return {"bpd": out["bpd"], "bpd_sq": out["bpd"] ** 2}

    return base.make_masked_sums_fn(per_example, mesh)


class OdeBitsPerDim:
    """Evaluator 'ode_bpd' (see the module doc)."""

    needs = frozenset({base.Need.IMAGES})

    def __init__(
        self,
        context: base.Context,
        *,
        num_examples: int,
        batch_size: int,
        precision: str,
        num_steps: int,
        solver: str,
        divergence: str,
        probe: str,
        num_probes: int,
    ) -> None:
        self.context = context
        self.num_examples, self.batch_size = num_examples, batch_size
        self.ode = dict(
            precision=precision,
            num_steps=num_steps,
            solver=solver,
            divergence=divergence,
            probe=probe,
            num_probes=num_probes,
        )
        self._fn = None

    @classmethod
    def check_settings(cls, config: Any, path: str) -> None:
        counts = ("num_examples", "batch_size", "num_steps", "num_probes")
        config_checks.check_positive(config, tuple(f"{path}.{k}" for k in counts))
        for key, allowed in (
            ("precision", evaluators.PRECISIONS),
            ("solver", ode_likelihood.SOLVERS),
            ("divergence", ode_likelihood.DIVERGENCES),
            ("probe", ode_likelihood.PROBES),
        ):
            config_checks.check_field_choice(config, f"{path}.{key}", allowed)
        if config.diffusion.model_output not in process.ODE_MODEL_OUTPUTS:
            raise errors.ConfigError(
                f"config.{path}: the probability-flow ODE needs diffusion.model_output in "
                f"{', '.join(process.ODE_MODEL_OUTPUTS)}, not {config.diffusion.model_output!r}"
            )

    def run(self, params: Any, step: int) -> dict[str, Any]:
        ctx, c = self.context, self.context.config
        self._fn = self._fn or make_ode_bpd_fn(c, ctx.apply, ctx.mesh, **self.ode)
        batches = bpd.eval_batches(c, self.num_examples, self.batch_size)
        key = streams.key(c.seed, streams.Stream.ODE_BPD)
        total = base.sum_over_batches(
            self._fn, params, batches, ctx.mesh, key, "ODE bits/dim", "bpd"
        )
        n = total["count"]
        mean = total["bpd"] / n
        var = max(total["bpd_sq"] / n - mean**2, 0.0) * n / max(n - 1, 1)
        return {
            "ode_bpd": float(mean),
            "ode_bpd_se": math.sqrt(var / n),
            "ode_nfe": ode_likelihood.ode_nfe(int(self.ode["num_steps"]), self.ode["solver"]),
            "ode_num_examples": int(round(n)),
        }
