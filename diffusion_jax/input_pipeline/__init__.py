"""Input pipeline: deterministic, resumable, host-sharded training batches (the DDPM recipe,
Ho et al. 2020 §3.3 and Appendix B: pixels scaled to [-1, 1], random horizontal flips).

Datasets (`config.data.name`):

- ``cifar10``: tfds ``cifar10`` (32x32x3, labels 0..9). Loaded once into host memory
  (50k x 32 x 32 x 3 uint8 = 150 MB) with `tfds.as_numpy`. Must be prepared beforehand.
- ``celeb_a_hq``: tfds ``celeb_a_hq/256`` (manual download, 30k images, no labels). Streamed
  with tf.data.
- ``lsun_bedroom`` / ``lsun_church`` / ``lsun_cat``: TFRecord files of 256x256 crops found by
  ``config.data.data_dir`` + ``config.data.tfrecord_pattern`` (the pattern may contain
  ``{split}``; default ``<name>-{split}.tfrecord*``). Streamed with tf.data. Each record is a
  `tf.train.Example`; accepted layouts (detected from the first record):

  * an encoded PNG/JPEG/GIF/BMP bytes feature named ``image``, ``image/encoded``, ``image_raw``,
    ``img`` or ``jpeg``;
  * the progressive-GAN / StyleGAN ``dataset_tool.py`` layout used by the official DDPM code:
    ``data`` (raw uint8 bytes) + ``shape`` (int64[3], CHW, or HWC when the last entry is 1 or 3);
  * raw uint8 bytes under ``image_raw`` or ``data`` with int64 ``height`` and ``width`` (and
    optionally ``depth``/``channels``) features, HWC order.

  An optional int64 ``label`` (or ``image/class/label``) feature becomes the label. Images are
  centre-cropped to a square and resized (bilinear, antialiased) to ``config.data.image_size``
  when they are not already that size. ``python -m diffusion_jax.input_pipeline --prepare
  lsun_bedroom --source_dir DIR --data_dir OUT`` writes such files from a folder of images.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16), rescaled
  to uint8 0..255 and bilinearly upsampled to ``config.data.image_size``; 1 channel (tiled to 3
  when ``config.data.channels == 3``), labels 0..9. Never downloads anything. There is no
  held-out split: every split name returns the same 1797 images.
- ``swissroll``: the 2-D toy of Sohl-Dickstein et al. 2015, the (x, z) coordinates of
  `sklearn.datasets.make_swiss_roll` (10,000 points, noise 0.5, fixed seed; ``test`` uses another
  fixed seed), centred and scaled isotropically so the noise-free roll spans [-1, 1]. Here
  ``image`` is a float32 [B, 2] vector; never flipped.

Training batches (`create_train_iterator`), per host::

    {'image': float32 [B_host, H, W, C] in [-1, 1] (NHWC; x / 127.5 - 1 from uint8),
     'label': int32 [B_host]}   (zeros when the dataset has none)

with ``B_host = config.training.batch_size // process_count`` and random horizontal flips
when ``config.data.random_flip``.

Determinism and resumption. The batch for step ``s`` depends only on (``config.seed``, ``s``,
the host layout), so an iterator started at ``start_step=s`` yields exactly what an iterator
started at 0 yields at step ``s``:

- In-memory datasets (digits, swissroll, cifar10): the global example stream is the
  concatenation of epochs, epoch ``e`` being a permutation drawn from (seed, e); global
  step ``s`` takes stream positions ``[s B, (s + 1) B)`` and host ``h`` the slice
  ``[h B_host, (h + 1) B_host)`` of that global batch. Every host holds the whole (small) array
  and reads only its slice, so the union of the hosts' batches is exactly the single-host global
  batch, and each example appears exactly once per epoch. Resuming costs nothing.
- Streaming datasets (celeb_a_hq, lsun_*): each host reads only its shard (tfds: an even
  contiguous slice of the split, as `tfds.even_splits` / `tfds.split_for_jax_process`; TFRecords:
  every ``process_count``-th file when the file count divides evenly, else every
  ``process_count``-th record). Host ``h``'s stream is the concatenation of epochs of its shard,
  epoch ``e`` shuffled by a tf.data shuffle buffer seeded by (seed, e, h) after a file-order
  permutation seeded by (seed, e); host step ``s`` takes host-stream positions
  ``[s B_host, (s + 1) B_host)``. Knowing the shard size needs one pass over the shard's raw
  records at start-up for TFRecords (tfds stores the counts), and resuming skips the raw
  (undecoded) records of the partial epoch: one read-through of at most an epoch.
- Flips for step ``s`` are drawn from (seed, s) for the whole global batch; a host uses its slice.

A background daemon thread keeps ``config.data.prefetch`` batches ready (0 disables it).

Modules: `datasets` (names, shapes, checks, preparation instructions), `sources` (in-memory
arrays: digits, swiss roll, tfds; the tfds stream), `tfrecords` (LSUN TFRecord discovery,
layout sniffing, decoding, writing), `tf_data` (lazy TensorFlow, shared tf.data pieces),
`batches` (deterministic step-indexed batching and seeds), `prefetch` (the prefetch thread),
`prepare` (the ``--prepare`` command line, also ``python -m diffusion_jax.input_pipeline``).

TensorFlow and tensorflow_datasets are imported lazily inside the functions that need them (the
rest of the project imports without them), and TensorFlow is hidden from the accelerators.
Nothing is ever downloaded implicitly: missing data raises `DatasetUnavailableError` explaining
how to prepare it, e.g. ``python -m diffusion_jax.input_pipeline --prepare cifar10 --data_dir
DIR`` on a machine with internet access.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from diffusion_jax.input_pipeline import batches, sources
from diffusion_jax.input_pipeline.batches import (
    derive_seed,
    epoch_permutation,
    flip_mask,
    global_batch_indices,
    host_batch_size,
    to_data_levels,
    to_model_range,
)
from diffusion_jax.input_pipeline.datasets import (
    DATASETS,
    DEFAULT_TFRECORD_PATTERN,
    IN_MEMORY_DATASETS,
    LSUN_DATASETS,
    TFDS_NAMES,
    Batch,
    DatasetUnavailableError,
    data_shape,
    is_image_data,
    preparation_instructions,
    validate_dataset_name,
)
from diffusion_jax.input_pipeline.prefetch import PrefetchIterator
from diffusion_jax.input_pipeline.prepare import prepare_tfds
from diffusion_jax.input_pipeline.sources import (
    SWISSROLL_NOISE,
    SWISSROLL_NUM_EXAMPLES,
    linear_resize_matrix,
    load_arrays,
    load_digits_arrays,
    make_swissroll,
    reference_points,
)
from diffusion_jax.input_pipeline.tfrecords import write_image_tfrecords

__all__ = [
    "DATASETS",
    "DEFAULT_TFRECORD_PATTERN",
    "IN_MEMORY_DATASETS",
    "LSUN_DATASETS",
    "SWISSROLL_NOISE",
    "SWISSROLL_NUM_EXAMPLES",
    "TFDS_NAMES",
    "Batch",
    "DatasetUnavailableError",
    "PrefetchIterator",
    "create_eval_arrays",
    "create_train_iterator",
    "data_shape",
    "derive_seed",
    "epoch_permutation",
    "flip_mask",
    "global_batch_indices",
    "host_batch_size",
    "is_image_data",
    "linear_resize_matrix",
    "load_arrays",
    "load_digits_arrays",
    "make_swissroll",
    "prepare_tfds",
    "preparation_instructions",
    "reference_points",
    "to_data_levels",
    "to_model_range",
    "validate_dataset_name",
    "write_image_tfrecords",
]


def create_train_iterator(
    config: Any, *, start_step: int = 0, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
    """Training batches of this host for steps start_step, start_step + 1, ... (endless).

    Each batch is ``{'image': float32 [B_host, H, W, C] in [-1, 1] (NHWC; [B_host, 2] for
    swissroll), 'label': int32 [B_host]}`` with ``B_host = config.training.batch_size //
    process_count``; deterministic given ``config.seed`` and identical for step ``s`` whatever
    `start_step` was (see the package docstring). Data loading and checks happen here, so a
    missing dataset raises `DatasetUnavailableError` immediately. The returned iterator has a
    ``close()`` method when prefetching (``config.data.prefetch > 0``).
    """
    name = validate_dataset_name(config.data.name)
    batches.check_process(process_index, process_count)
    global_batch = int(config.training.batch_size)
    host_batch_size(global_batch, process_count)
    start_step = int(start_step)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    plan = batches.BatchPlan(
        seed=int(config.seed),
        start_step=start_step,
        global_batch_size=global_batch,
        process_index=process_index,
        process_count=process_count,
        random_flip=bool(config.data.random_flip) and name != "swissroll",
    )
    split = config.data.get("train_split", "train")
    if name in IN_MEMORY_DATASETS:
        images, labels = load_arrays(config, split)
        make = lambda: batches.in_memory_batches(images, labels, plan)
    else:
        source = sources.stream_source(config, split, process_index, process_count)
        make = lambda: batches.stream_batches(source, plan)
    prefetch = int(config.data.get("prefetch", 2))
    return PrefetchIterator(make, prefetch) if prefetch > 0 else make()


def create_eval_arrays(
    config: Any,
    split: str,
    num_examples: int | None,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Unflipped, unshuffled evaluation batches of this host, in the split's stored order.

    Takes the first `num_examples` examples of `split` (all when None or <= 0, or when the
    split is smaller); host ``h`` gets the even contiguous slice ``h`` of them. Yields
    ``{'image': uint8 [b, H, W, C] in [0, 255] (NHWC; float32 [b, 2] for swissroll),
    'label': int32 [b]}`` with ``b = batch_size``, the last batch possibly smaller. Use the
    test split for bits/dim and the train split for FID reference statistics.
    """
    name = validate_dataset_name(config.data.name)
    batches.check_process(process_index, process_count)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    limit = int(num_examples) if num_examples is not None and num_examples > 0 else None
    if name in IN_MEMORY_DATASETS:
        images, labels = load_arrays(config, split)
        n = len(images) if limit is None else min(limit, len(images))
        lo, hi = batches.even_slice(n, process_index, process_count)
        return batches.array_batches(images[lo:hi], labels[lo:hi], batch_size)
    source = sources.stream_source(config, split, 0, 1)  # Whole split, stored order.
    return batches.stream_eval_batches(source, limit, batch_size, process_index, process_count)
