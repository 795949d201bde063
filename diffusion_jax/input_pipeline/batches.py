"""Deterministic, step-indexed batching (the package doc): seeds and random streams, the
in-memory and streamed example orders, flips, host slices and evaluation batches."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import numpy as np

from diffusion_jax.input_pipeline.datasets import Batch
from diffusion_jax.input_pipeline.tf_data import StreamSource, import_tf, tf_options
from diffusion_jax.runtime import errors

# Tags separating the independent random streams derived from config.seed.

# Tags separating the independent random streams derived from config.seed.
_PERMUTATION_STREAM = 0
_FLIP_STREAM = 1
FILE_ORDER_STREAM = 2
_SHUFFLE_STREAM = 3


def host_batch_size(global_batch_size: int, process_count: int) -> int:
    """Per-host batch size ``global_batch_size // process_count``; raises on a remainder."""
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}.")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise errors.ConfigError(
            f"training.batch_size={global_batch_size} must be a positive multiple of the "
            f"number of processes ({process_count})."
        )
    return global_batch_size // process_count


def check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, process_count={process_count})."
        )


def _seed_entropy(seed: int) -> int:
    """Maps any Python int seed to the non-negative entropy numpy's SeedSequence needs."""
    return int(seed) % (1 << 64)


def derive_seed(*parts: int) -> int:
    """A 63-bit integer seed derived deterministically from integer `parts` (for tf.data)."""
    words = np.random.SeedSequence([_seed_entropy(p) for p in parts]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the examples in epoch `epoch`: int64 [num_examples], from (seed, epoch)."""
    rng = np.random.default_rng([_PERMUTATION_STREAM, _seed_entropy(seed), epoch])
    return rng.permutation(num_examples)


def flip_mask(seed: int, step: int, global_batch_size: int) -> np.ndarray:
    """Horizontal-flip decisions bool [global_batch_size] for step `step`, from (seed, step)."""
    rng = np.random.default_rng([_FLIP_STREAM, _seed_entropy(seed), step])
    return rng.random(global_batch_size) < 0.5


def global_batch_indices(
    seed: int,
    step: int,
    global_batch_size: int,
    num_examples: int,
    cache: dict[int, np.ndarray] | None = None,
) -> np.ndarray:
    """Dataset indices int64 [global_batch_size] of the global batch for step `step`.

    The stream position ``p = step * global_batch_size + i`` is example
    ``epoch_permutation(seed, p // N, N)[p % N]``. `cache` (epoch -> permutation) may be given
    to avoid redrawing permutations; it is pruned to the epochs of this batch.
    """
    positions = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_examples)
    cache = {} if cache is None else cache
    out = np.empty(global_batch_size, dtype=np.int64)
    wanted = [int(e) for e in np.unique(epochs)]
    for epoch in wanted:
        if epoch not in cache:
            cache[epoch] = epoch_permutation(seed, epoch, num_examples)
        sel = epochs == epoch
        out[sel] = cache[epoch][offsets[sel]]
    for epoch in list(cache):
        if epoch < wanted[0]:
            del cache[epoch]
    return out


def to_data_levels(images: np.ndarray, levels: int = 256) -> np.ndarray:
    """Model-range images in [-1, 1] -> uint8 on the data's own grid of `levels` evenly spaced
    grey levels (`data.levels`): round((x + 1) / 2 (L - 1)) scaled to 0..255. For L = 256 this
    is the official rounding x * 127.5 + 127.5; the bundled digits have L = 17 (scikit-learn's
    counts 0..16), so samples are stored, like the data, on those levels."""
    if not 2 <= levels <= 256:
        raise errors.ConfigError(f"data.levels={levels} must be in [2, 256]")
    x = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
    k = np.round(x * (levels - 1))
    return np.clip(np.round(k * (255.0 / (levels - 1))), 0, 255).astype(np.uint8)


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] as x / 127.5 - 1; float input is passed as float32."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return images.astype(np.float32, copy=False)


def even_slice(num: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[lo, hi) of host `process_index` in an even contiguous split of `num` items (tfds style)."""
    base, extra = divmod(num, process_count)
    lo = process_index * base + min(process_index, extra)
    return lo, lo + base + (process_index < extra)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """The training batches one host yields: steps `start_step`, `start_step` + 1, ... of
    global batches of `global_batch_size`, of which host `process_index` of `process_count`
    takes its share, flipped when `random_flip` (the package doc)."""

    seed: int
    start_step: int
    global_batch_size: int
    process_index: int
    process_count: int
    random_flip: bool

    @property
    def host_batch(self) -> int:
        return self.global_batch_size // self.process_count

    def finish(self, chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[Batch]:
        """Training batch dicts of this host's (uint8 NHWC or float vector images, labels)
        chunks for the steps from `start_step` on: model range, then the step's flips."""
        for (images, labels), step in zip(chunks, itertools.count(self.start_step), strict=False):
            x = to_model_range(images)
            if self.random_flip and x.ndim == 4:
                lo = self.process_index * x.shape[0]
                flips = flip_mask(self.seed, step, self.global_batch_size)[lo : lo + x.shape[0]]
                if flips.any():
                    x[flips] = x[flips, :, ::-1, :]
            yield {"image": x, "label": np.asarray(labels, dtype=np.int32)}


def in_memory_batches(images: np.ndarray, labels: np.ndarray, plan: BatchPlan) -> Iterator[Batch]:
    """Host batches of `plan` from whole in-memory arrays (see the package doc)."""
    host = slice(plan.process_index * plan.host_batch, (plan.process_index + 1) * plan.host_batch)
    cache: dict[int, np.ndarray] = {}

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for step in itertools.count(plan.start_step):
            n = len(images)
            idx = global_batch_indices(plan.seed, step, plan.global_batch_size, n, cache)[host]
            yield images[idx], labels[idx]

    yield from plan.finish(chunks())


def _rechunk(
    chunks: Iterator[tuple[np.ndarray, np.ndarray]], size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regroups a stream of (images, labels) chunks of any sizes into chunks of exactly `size`."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    count = 0
    for x, y in chunks:
        xs.append(x)
        ys.append(y)
        count += len(x)
        while count >= size:
            x_all = xs[0] if len(xs) == 1 else np.concatenate(xs)
            y_all = ys[0] if len(ys) == 1 else np.concatenate(ys)
            yield x_all[:size], y_all[:size]
            xs, ys = [x_all[size:]], [y_all[size:]]
            count -= size


def stream_batches(source: StreamSource, plan: BatchPlan) -> Iterator[Batch]:
    """Host batches of `plan` from this host's shard of a streamed dataset (package doc)."""
    tf = import_tf()
    seed, host_batch = plan.seed, plan.host_batch
    epoch, offset = divmod(plan.start_step * host_batch, source.num_examples)

    def epoch_chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        e, skip = epoch, offset
        while True:
            ds = source.records(
                derive_seed(FILE_ORDER_STREAM, seed, e),
                derive_seed(_SHUFFLE_STREAM, seed, e, plan.process_index),
            )
            ds = ds.skip(skip).map(
                source.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
            )
            ds = ds.batch(host_batch).prefetch(1).with_options(tf_options(tf))
            for chunk in ds.as_numpy_iterator():
                yield chunk["image"], chunk["label"]
            e, skip = e + 1, 0

    yield from plan.finish(_rechunk(epoch_chunks(), host_batch))


def array_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """Consecutive batches of `batch_size` of the arrays (the last one possibly smaller)."""
    for i in range(0, len(images), batch_size):
        yield {"image": images[i : i + batch_size], "label": labels[i : i + batch_size]}


def stream_eval_batches(
    source: StreamSource,
    limit: int | None,
    batch_size: int,
    process_index: int,
    process_count: int,
) -> Iterator[Batch]:
    """Host `process_index`'s even slice of the first `limit` (None: all) examples of a
    whole split's `source`, in stored order, in batches of `batch_size` (uint8 images)."""
    tf = import_tf()
    n = source.num_examples if limit is None else min(limit, source.num_examples)
    lo, hi = even_slice(n, process_index, process_count)
    ds = source.records(None, None).take(hi).skip(lo)
    ds = ds.map(source.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).prefetch(1).with_options(tf_options(tf))

    def gen() -> Iterator[Batch]:
        for chunk in ds.as_numpy_iterator():
            yield {"image": chunk["image"], "label": chunk["label"].astype(np.int32)}

    return gen()
