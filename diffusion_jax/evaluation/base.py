"""What every evaluator shares: the context it runs in, its random streams, and batches
padded to a fixed shape so that all hosts step in lockstep.

An evaluator (big_vision style) is built once per job from a `Context` and called once per
checkpoint: `run(params, step) -> dict` of scalars for `metrics.jsonl` and TensorBoard, plus
an optional 'pictures' entry {name: uint8 [H, W, C]} that the job writes as
`eval/<name>_<step>.png` and TensorBoard images. Jitted functions are built on first use
and reused for every checkpoint (the parameters are arguments).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax.evaluation import sample_job
from diffusion_jax.evaluation.evaluators import Need
from diffusion_jax.runtime import distributed, errors, logs
from diffusion_jax.sampling import generation, registry


@dataclasses.dataclass(frozen=True)
class Context:
    """What an evaluator may use: its instance's `name` in `config.evals` (for its messages),
    the config (the job's, with the instance's `sampling` overrides), the workdir, the device
    mesh, the pure network `apply(params, x, t, y=None) -> output`, and `samples_key`, the
    sub-folder of its sample shards ('' = the job's shared samples)."""

    name: str
    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: Mesh
    apply: Callable[..., jax.Array]
    samples_key: str = ""

    @property
    def eval_dir(self) -> epath.Path:
        return self.workdir / "eval"


class Evaluator(Protocol):
    """Built as `cls(context, **settings)` (its keyword-only settings, `config.evals.<name>`),
    called once per checkpoint."""

    needs: frozenset[Need]

    @classmethod
    def check_settings(cls, config: Any, path: str) -> None:
        """ConfigError for a bad value of its settings `config.<path>.*`."""

    def run(self, params: Any, step: int) -> dict[str, Any]: ...


def with_precision(apply: Callable[..., jax.Array], precision: str) -> Callable[..., jax.Array]:
    """`apply` with every matrix product and convolution at `precision` ('highest': float32
    on TPU and without TF32 on GPU; 'default': the platform's fast path), for likelihoods
    whose value must not depend on the accelerator."""

    def precise(*args, **kwargs):
        with jax.default_matmul_precision(precision):
            return apply(*args, **kwargs)

    return precise


def make_masked_sums_fn(
    per_example: Callable[..., dict[str, jax.Array]], mesh: Mesh
) -> Callable[..., dict[str, jax.Array]]:
    """Jitted `(params, image [B, ...], label [B], mask [B], key) -> sums` with the batch
    sharded over `mesh`: 'count' and, for each [B, ...] output of `per_example(params, image,
    label, key)`, its sum over the unmasked examples (replicated)."""

    def run(params, image, label, mask, key):
        out = per_example(params, image, label, key)
        # Elementwise products, not `mask @ x`: TPU/GPU matmuls may run float32 in bf16/TF32.
        sums = {
            k: jnp.sum(mask.reshape((-1,) + (1,) * (v.ndim - 1)) * v, axis=0)
            for k, v in out.items()
        }
        return {"count": jnp.sum(mask), **sums}

    sharded, repl = distributed.batch_sharded(mesh), distributed.replicated(mesh)
    return jax.jit(
        run,
        in_shardings=(repl, sharded, sharded, sharded, repl),
        out_shardings=repl,
        compiler_options=distributed.compiler_options(mesh),
    )


def sum_over_batches(
    sums_fn: Callable[..., dict[str, jax.Array]],
    params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    key: jax.Array,
    name: str,
    mean_of: str,
) -> dict[str, np.ndarray]:
    """The float64 totals of `sums_fn` (from `make_masked_sums_fn`; floats, arrays for
    curves) over `batches` (from `padded_batches`), one fresh key per batch (fold_in of
    `key`), logging the running mean of `mean_of`. ValueError when there is no example."""
    total = None
    for i, batch in enumerate(batches):
        g = distributed.global_batch(batch, mesh)
        sums = sums_fn(params, g["image"], g["label"], g["mask"], jax.random.fold_in(key, i))
        sums = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(sums))
        total = sums if total is None else jax.tree.map(np.add, total, sums)
        mean = total[mean_of] / max(total["count"], 1)
        logs.log(f"  {name}: {int(total['count'])} examples, running mean {mean:.4f}")
    if total is None or total["count"] <= 0:
        raise errors.UserError(f"{name}: the evaluation split yielded no examples")
    return {k: float(v) if v.ndim == 0 else v for k, v in total.items()}


def local_batch_size(global_batch: int) -> int:
    """This host's share of a global batch, rounded up to a multiple of its devices."""
    per_host = -(-global_batch // jax.process_count())
    local = jax.local_device_count()
    return -(-per_host // local) * local


def round_up_to_devices(n: int) -> int:
    return -(-n // jax.device_count()) * jax.device_count()


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def padded_batches(
    batches: Iterable[dict[str, np.ndarray]], size: int, image_shape: tuple[int, ...]
) -> Iterator[dict[str, np.ndarray]]:
    """Batches {'image' uint8 [b, H, W, C], 'label' [b]} zero-padded to `size` rows with
    'mask' [size] (1 = real example); on several hosts, they continue until all hosts are done
    (an exhausted host contributes all-padding batches)."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if not _any_process(batch is not None):
            return
        n = 0 if batch is None else len(batch["label"])
        if n > size:
            raise ValueError(f"batch of {n} exceeds the padded size {size}")
        out = {
            "image": np.zeros((size, *image_shape), np.uint8),
            "label": np.zeros((size,), np.int32),
            "mask": np.zeros((size,), np.float32),
        }
        if n:
            out["image"][:n] = batch["image"]
            out["label"][:n] = batch["label"]
            out["mask"][:n] = 1.0
        yield out


class EvalSamples:
    """The eval job's samples of a checkpoint: the first `num_samples` drawn with the
    configured sampler (batches of `sampling.batch_size`) into resumable shards
    `DIR/eval/samples/<step>/` (`sample_job.write_sample_shards`), shared by every evaluator
    that scores samples with the same sampler: the one that runs first draws them, the others
    find them written. Shard i depends on i alone, so one that needs more samples adds shards
    and one that needs fewer reads a prefix."""

    def __init__(self, context: Context, num_samples: int) -> None:
        self.context = context
        self.num_samples = int(num_samples)
        self._sampler = None

    def directory(self, step: int) -> epath.Path:
        return self.context.eval_dir / "samples" / self.context.samples_key / str(step)

    def draw(self, params: Any, step: int) -> epath.Path:
        """Makes sure all shards of checkpoint `step` exist; returns their folder."""
        ctx, c = self.context, self.context.config
        directory = self.directory(step)
        nfe = registry.build(c).nfe
        logs.log(
            f"  {self.num_samples} samples of checkpoint {step} ({c.sampling.method}, {nfe} "
            f"network evaluations per sample) in {directory}"
        )
        self._sampler = self._sampler or generation.make_sampler(
            c, ctx.apply, ctx.mesh, int(c.sampling.batch_size), c.sampling.respacing
        )
        sample_job.write_sample_shards(c, self._sampler, params, directory, self.num_samples)
        return directory

    def settings(self) -> dict[str, Any]:
        """What the scores of these samples depend on, for the metrics record."""
        c = self.context.config
        return {
            "sample_method": registry.method_name(c.sampling, c.sampling.respacing),
            "sample_nfe": registry.build(c).nfe,
        }
