"""Input pipeline: deterministic, resumable, host-sharded training batches (REFERENCE.md §4).

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

TensorFlow and tensorflow_datasets are imported lazily inside the functions that need them (the
rest of the project imports without them), and TensorFlow is hidden from the accelerators.
Nothing is ever downloaded implicitly: missing data raises `DatasetUnavailableError` explaining
how to prepare it, e.g. ``python -m diffusion_jax.input_pipeline --prepare cifar10 --data_dir
DIR`` on a machine with internet access.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

DATASETS = (
    "cifar10",
    "celeb_a_hq",
    "lsun_bedroom",
    "lsun_church",
    "lsun_cat",
    "digits",
    "swissroll",
)
IN_MEMORY_DATASETS = ("cifar10", "digits", "swissroll")
LSUN_DATASETS = ("lsun_bedroom", "lsun_church", "lsun_cat")
TFDS_NAMES = {"cifar10": "cifar10", "celeb_a_hq": "celeb_a_hq/256"}
DEFAULT_TFRECORD_PATTERN = "{name}-{split}.tfrecord*"
DEFAULT_SHUFFLE_BUFFER = 10_000
SWISSROLL_NUM_EXAMPLES = 10_000
SWISSROLL_NOISE = 0.5

# Tags separating the independent random streams derived from config.seed.
_PERMUTATION_STREAM = 0
_FLIP_STREAM = 1
_FILE_ORDER_STREAM = 2
_SHUFFLE_STREAM = 3

_ENCODED_IMAGE_KEYS = ("image", "image/encoded", "image_raw", "img", "jpeg")
_LABEL_KEYS = ("label", "image/class/label")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM")

Batch = dict[str, np.ndarray]


class DatasetUnavailableError(RuntimeError):
    """The requested dataset is not prepared locally; the message says how to prepare it."""


# ---------------------------------------------------------------------------------------------
# Validation and small pure helpers.
# ---------------------------------------------------------------------------------------------


def validate_dataset_name(name: str) -> str:
    """Returns `name` if it is a supported `data.name`, else raises ValueError."""
    if name not in DATASETS:
        raise ValueError(f"Unknown data.name={name!r}; allowed values: {', '.join(DATASETS)}.")
    return name


def host_batch_size(global_batch_size: int, process_count: int) -> int:
    """Per-host batch size ``global_batch_size // process_count``; raises on a remainder."""
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}.")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"training.batch_size={global_batch_size} must be a positive multiple of the "
            f"number of processes ({process_count})."
        )
    return global_batch_size // process_count


def _check_process(process_index: int, process_count: int) -> None:
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


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] as x / 127.5 - 1; float input is passed as float32."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return images.astype(np.float32, copy=False)


def _finish_batch(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    step: int,
    global_batch_size: int,
    process_index: int,
    random_flip: bool,
) -> Batch:
    """uint8 NHWC (or float vectors) + labels -> the training batch dict of one host."""
    x = to_model_range(images)
    if random_flip and x.ndim == 4:
        lo = process_index * x.shape[0]
        flips = flip_mask(seed, step, global_batch_size)[lo : lo + x.shape[0]]
        if flips.any():
            x[flips] = x[flips, :, ::-1, :]
    return {"image": x, "label": np.asarray(labels, dtype=np.int32)}


def _even_slice(num: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[lo, hi) of host `process_index` in an even contiguous split of `num` items (tfds style)."""
    base, extra = divmod(num, process_count)
    lo = process_index * base + min(process_index, extra)
    return lo, lo + base + (process_index < extra)


# ---------------------------------------------------------------------------------------------
# Preparation instructions and lazy TF / tfds imports.
# ---------------------------------------------------------------------------------------------


def _lsun_pattern(config_pattern: str, name: str) -> str:
    return config_pattern or DEFAULT_TFRECORD_PATTERN.format(name=name, split="{split}")


def preparation_instructions(name: str, data_dir: str = "", tfrecord_pattern: str = "") -> str:
    """Human-readable steps that make dataset `name` available under `data_dir`."""
    shown_dir = data_dir or "<data_dir>"
    cli = "python -m diffusion_jax.input_pipeline"
    if name == "cifar10":
        return (
            f"Prepare it once on a machine with internet access:\n"
            f"  {cli} --prepare cifar10 --data_dir {shown_dir}\n"
            f"(equivalently `tfds build cifar10 --data_dir={shown_dir}`), copy the resulting "
            f"'cifar10/' folder into the data_dir used for training, and pass "
            f"--config.data.data_dir={shown_dir}."
        )
    if name == "celeb_a_hq":
        manual = (
            os.path.join(data_dir, "downloads", "manual")
            if data_dir
            else ("<data_dir>/downloads/manual")
        )
        return (
            "celeb_a_hq/256 needs a manual download: create the CelebA-HQ tar files "
            "(data2x2.tar, data4x4.tar, ..., data1024x1024.tar) with the "
            "progressive_growing_of_gans instructions (https://github.com/tkarras/progressive_growing_of_gans"
            "#preparing-datasets-for-training), put them in the manual_dir "
            f"{manual}, then run\n"
            f"  {cli} --prepare celeb_a_hq --data_dir {shown_dir} --manual_dir {manual}\n"
            f"(equivalently `tfds build celeb_a_hq/256 --data_dir={shown_dir} "
            f"--manual_dir={manual}`) and pass --config.data.data_dir={shown_dir}."
        )
    if name in LSUN_DATASETS:
        pattern = _lsun_pattern(tfrecord_pattern, name)
        category = name.removeprefix("lsun_")
        return (
            f"{name} is read from TFRecord files matching data_dir/tfrecord_pattern "
            f"({os.path.join(shown_dir, pattern)}; '{{split}}' is replaced by the split name). "
            "Each record is a tf.train.Example with an encoded PNG/JPEG under the 'image' bytes "
            "feature (or the progressive-GAN 'data' + 'shape' layout) holding a 256x256 centre "
            f"crop. To make them: download the LSUN {category} LMDB (https://github.com/fyu/lsun; "
            + (
                "the cat LMDB is among the LSUN object categories"
                if category == "cat"
                else "`python download.py -c "
                + ("church_outdoor" if category == "church" else category)
                + "`"
            )
            + "), export it to image files (`python data.py export <lmdb> --out_dir IMAGES`), "
            "then run\n"
            f"  {cli} --prepare {name} --source_dir IMAGES --data_dir {shown_dir}\n"
            f"and pass --config.data.data_dir={shown_dir}."
        )
    return f"{name} is built in and needs no preparation."


def _import_tf() -> Any:
    """Imports TensorFlow lazily and hides the accelerators from it (JAX owns them)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # Already initialised: visibility can no longer change.
        pass
    return tf


def _import_tfds() -> Any:
    _import_tf()
    import tensorflow_datasets as tfds

    return tfds


def _tfds_builder(name: str, data_dir: str) -> Any:
    tfds = _import_tfds()
    return tfds.builder(TFDS_NAMES[name], data_dir=data_dir or None)


def _tfds_as_dataset(builder: Any, name: str, data_dir: str, **kwargs: Any) -> Any:
    """`builder.as_dataset(**kwargs)`, turning "not prepared" into DatasetUnavailableError.

    `as_dataset` never downloads, so this cannot hang offline.
    """
    try:
        return builder.as_dataset(**kwargs)
    except AssertionError as e:
        raise DatasetUnavailableError(
            f"Dataset {name!r} (tfds {TFDS_NAMES[name]!r}) is not prepared in data_dir "
            f"{data_dir or '<tfds default>'!r} (looked in {builder.data_dir}). "
            + preparation_instructions(name, data_dir)
        ) from e


# ---------------------------------------------------------------------------------------------
# In-memory datasets.
# ---------------------------------------------------------------------------------------------


def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """float64 [n_out, n_in] bilinear interpolation weights (half-pixel centres, edge clamp)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1.0)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = src - lo
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - w)
    np.add.at(m, (rows, hi), w)
    return m


def load_digits_arrays(image_size: int, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as uint8 [1797, S, S, channels] and int32 labels [1797].

    Values 0..16 are rescaled to 0..255, then bilinearly resized from 8x8 to S x S.
    """
    from sklearn.datasets import load_digits

    if channels not in (1, 3):
        raise ValueError(f"data.channels={channels} must be 1 or 3 for digits.")
    digits = load_digits()
    images = digits.images.astype(np.float64) * (255.0 / 16.0)  # [N, 8, 8]
    m = linear_resize_matrix(8, image_size)
    images = np.einsum("oh,nhw,pw->nop", m, images, m)
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)[..., None]
    if channels == 3:
        images = np.repeat(images, 3, axis=-1)
    return images, digits.target.astype(np.int32)


def make_swissroll(num_examples: int = SWISSROLL_NUM_EXAMPLES, seed: int = 0) -> np.ndarray:
    """float32 [num_examples, 2]: (x, z) of `make_swiss_roll` scaled so the roll spans [-1, 1].

    The 2-D swiss roll of Sohl-Dickstein et al. 2015; noise 0.5 (in the original units).
    """
    from sklearn.datasets import make_swiss_roll

    points, _ = make_swiss_roll(num_examples, noise=SWISSROLL_NOISE, random_state=seed)
    xz = points[:, [0, 2]]
    t = np.linspace(1.5 * np.pi, 4.5 * np.pi, 10_001)  # The noise-free roll.
    curve = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    lo, hi = curve.min(axis=0), curve.max(axis=0)
    return ((xz - (lo + hi) / 2) / ((hi - lo).max() / 2)).astype(np.float32)


def _load_tfds_arrays(
    name: str, data_dir: str, split: str, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A whole tfds split as uint8 [N, S, S, 3] and int32 [N] in the split's stored order."""
    tfds = _import_tfds()
    tf = _import_tf()
    builder = _tfds_builder(name, data_dir)
    ds = _tfds_as_dataset(builder, name, data_dir, split=split, shuffle_files=False)
    ds = ds.map(
        lambda ex: {
            "image": _tf_square_resize(tf, ex["image"], image_size),
            "label": tf.cast(ex.get("label", 0), tf.int32),
        }
    )
    images, labels = [], []
    for chunk in tfds.as_numpy(ds.batch(1024)):
        images.append(chunk["image"])
        labels.append(chunk["label"])
    if not images:
        raise DatasetUnavailableError(f"Split {split!r} of {name!r} in {data_dir!r} is empty.")
    return np.concatenate(images), np.concatenate(labels)


def load_arrays(config: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """An in-memory dataset's split: (uint8 [N, H, W, C] images, or float32 [N, 2] for
    swissroll; int32 [N] labels)."""
    name = validate_dataset_name(config.data.name)
    if name == "digits":
        return load_digits_arrays(config.data.image_size, config.data.channels)
    if name == "swissroll":
        seed = {"train": 0, "test": 1}.get(split)
        if seed is None:
            raise ValueError(f"swissroll has splits 'train' and 'test', got split={split!r}.")
        points = make_swissroll(SWISSROLL_NUM_EXAMPLES, seed=seed)
        return points, np.zeros(len(points), np.int32)
    if name == "cifar10":
        _check_rgb(config)
        return _load_tfds_arrays(name, config.data.data_dir, split, config.data.image_size)
    raise ValueError(f"data.name={name!r} is streamed, not loaded into memory.")


def _check_rgb(config: Any) -> None:
    if config.data.channels != 3:
        raise ValueError(
            f"data.channels={config.data.channels} but {config.data.name} images have 3 channels."
        )


def _in_memory_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    start_step: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    random_flip: bool,
) -> Iterator[Batch]:
    """Host batches for steps start_step, start_step + 1, ... (see the module docstring)."""
    host_batch = global_batch_size // process_count
    host = slice(process_index * host_batch, (process_index + 1) * host_batch)
    cache: dict[int, np.ndarray] = {}
    for step in itertools.count(start_step):
        idx = global_batch_indices(seed, step, global_batch_size, len(images), cache)[host]
        yield _finish_batch(
            images[idx],
            labels[idx],
            seed=seed,
            step=step,
            global_batch_size=global_batch_size,
            process_index=process_index,
            random_flip=random_flip,
        )


# ---------------------------------------------------------------------------------------------
# Streaming datasets (tf.data).
# ---------------------------------------------------------------------------------------------


def _tf_square_resize(tf: Any, image: Any, size: int) -> Any:
    """uint8 [H, W, C] -> centre-cropped, bilinearly (antialiased) resized uint8 [size, size, C]."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    side = tf.minimum(h, w)
    image = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)

    def resize() -> Any:
        x = tf.image.resize(tf.cast(image, tf.float32), [size, size], antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)

    out = tf.cond(tf.equal(side, size), lambda: tf.identity(image), resize)
    return tf.ensure_shape(out, [size, size, image.shape[-1]])


@dataclasses.dataclass(frozen=True)
class _StreamSource:
    """A host's shard of a streamed dataset.

    num_examples: records in this host's shard (one epoch).
    records: (epoch_seed, shuffle_seed) -> tf.data.Dataset of undecoded records of one epoch of
      this host's shard; (None, None) gives the stored order, unshuffled.
    decode: record -> {'image': uint8 [S, S, 3], 'label': int32 []} (tf functions).
    """

    num_examples: int
    records: Callable[[int | None, int | None], Any]
    decode: Callable[[Any], Any]


def _tf_options(tf: Any) -> Any:
    options = tf.data.Options()
    options.deterministic = True
    return options


def _resolve_pattern(config: Any, split: str) -> str:
    name = config.data.name
    pattern = _lsun_pattern(config.data.tfrecord_pattern, name).replace("{split}", split)
    if config.data.data_dir and not os.path.isabs(pattern):
        pattern = os.path.join(config.data.data_dir, pattern)
    return os.path.expanduser(pattern)


def _tfrecord_files(config: Any, split: str) -> list[str]:
    name = config.data.name
    pattern = _resolve_pattern(config, split)
    files = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
    if not files:
        raise DatasetUnavailableError(
            f"Dataset {name!r}: no TFRecord files match {pattern!r} (data_dir="
            f"{config.data.data_dir!r}, tfrecord_pattern={config.data.tfrecord_pattern!r}). "
            + preparation_instructions(name, config.data.data_dir, config.data.tfrecord_pattern)
        )
    return files


def _first_record(tf: Any, files: list[str]) -> bytes:
    for f in files:
        for raw in tf.data.TFRecordDataset(f).take(1):
            return raw.numpy()
    raise DatasetUnavailableError(f"The TFRecord files {files[:3]}... hold no records.")


def _make_tfrecord_decoder(tf: Any, first: bytes, image_size: int) -> Callable[[Any], Any]:
    """Builds the record parser for the layout of `first` (see the module docstring)."""
    example = tf.train.Example.FromString(first)
    feats = example.features.feature
    keys = set(feats.keys())
    label_key = next((k for k in _LABEL_KEYS if k in keys and feats[k].int64_list.value), None)

    def first_bytes(key: str) -> bytes:
        values = feats[key].bytes_list.value
        return values[0] if values else b""

    spec: dict[str, Any] = {}
    if label_key:
        spec[label_key] = tf.io.FixedLenFeature([], tf.int64)
    encoded_key = next(
        (k for k in _ENCODED_IMAGE_KEYS if k in keys and first_bytes(k).startswith(_IMAGE_MAGIC)),
        None,
    )
    raw_key = next((k for k in ("data", "image_raw") if k in keys and first_bytes(k)), None)
    if encoded_key:
        spec[encoded_key] = tf.io.FixedLenFeature([], tf.string)

        def to_image(parsed: Any) -> Any:
            return tf.io.decode_image(parsed[encoded_key], channels=3, expand_animations=False)

    elif raw_key and "shape" in keys and len(feats["shape"].int64_list.value) == 3:
        shape0 = list(feats["shape"].int64_list.value)
        chw = shape0[0] in (1, 3) and shape0[2] not in (1, 3)
        spec[raw_key] = tf.io.FixedLenFeature([], tf.string)
        spec["shape"] = tf.io.FixedLenFeature([3], tf.int64)

        def to_image(parsed: Any) -> Any:
            x = tf.reshape(tf.io.decode_raw(parsed[raw_key], tf.uint8), parsed["shape"])
            x = tf.transpose(x, [1, 2, 0]) if chw else x
            return _to_rgb(tf, x)

    elif raw_key and "height" in keys and "width" in keys:
        spec[raw_key] = tf.io.FixedLenFeature([], tf.string)
        spec["height"] = tf.io.FixedLenFeature([], tf.int64)
        spec["width"] = tf.io.FixedLenFeature([], tf.int64)

        def to_image(parsed: Any) -> Any:
            flat = tf.io.decode_raw(parsed[raw_key], tf.uint8)
            x = tf.reshape(flat, tf.stack([parsed["height"], parsed["width"], -1]))
            return _to_rgb(tf, x)

    else:
        raise ValueError(
            f"Unrecognised TFRecord layout (features {sorted(keys)}); expected an encoded image "
            f"under one of {_ENCODED_IMAGE_KEYS}, or raw uint8 'data' + int64[3] 'shape', or raw "
            "'image_raw'/'data' + 'height' + 'width'."
        )

    def decode(record: Any) -> Any:
        parsed = tf.io.parse_single_example(record, spec)
        image = _tf_square_resize(tf, to_image(parsed), image_size)
        label = tf.cast(parsed[label_key], tf.int32) if label_key else tf.constant(0, tf.int32)
        return {"image": image, "label": label}

    return decode


def _to_rgb(tf: Any, x: Any) -> Any:
    """uint8 [H, W, 1 or 3] -> [H, W, 3] with a static channel count."""
    x = tf.cond(tf.equal(tf.shape(x)[-1], 1), lambda: tf.tile(x, [1, 1, 3]), lambda: x)
    return tf.ensure_shape(x, [None, None, 3])


def _count_records(tf: Any, ds: Any) -> int:
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())


def _tfrecord_source(
    config: Any, split: str, process_index: int, process_count: int, shuffle_buffer: int
) -> _StreamSource:
    """Host shard of the LSUN-style TFRecord files (whole files when they divide evenly)."""
    tf = _import_tf()
    files = _tfrecord_files(config, split)
    decode = _make_tfrecord_decoder(tf, _first_record(tf, files), config.data.image_size)
    by_file = len(files) % process_count == 0
    host_files = files[process_index::process_count] if by_file else files

    def records(epoch_seed: int | None, shuffle_seed: int | None) -> Any:
        order, parallel = list(host_files), None  # Stored order: files read one after another.
        if epoch_seed is not None:
            perm = np.random.default_rng([_FILE_ORDER_STREAM, epoch_seed]).permutation(len(order))
            order, parallel = [order[i] for i in perm], min(4, len(order))
        ds = tf.data.TFRecordDataset(order, num_parallel_reads=parallel)
        if not by_file:
            ds = ds.shard(process_count, process_index)
        if shuffle_seed is not None:
            ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.with_options(_tf_options(tf))

    num = _count_records(tf, records(None, None))
    if num == 0:
        raise DatasetUnavailableError(
            f"Host {process_index} of {process_count} got no records of {config.data.name!r} "
            f"from {len(files)} file(s) matching {_resolve_pattern(config, split)!r}."
        )
    return _StreamSource(num_examples=num, records=records, decode=decode)


def _tfds_stream_source(
    config: Any, split: str, process_index: int, process_count: int, shuffle_buffer: int
) -> _StreamSource:
    """Host shard (`tfds.split_for_jax_process`: an even contiguous slice) of a tfds split,
    read with the image undecoded so shuffling and resume-skipping stay cheap."""
    tf = _import_tf()
    tfds = _import_tfds()
    name, data_dir = config.data.name, config.data.data_dir
    builder = _tfds_builder(name, data_dir)
    host_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count
    )
    probe = _tfds_as_dataset(builder, name, data_dir, split=host_split)  # Availability check.
    if builder.info.splits:
        num = builder.info.splits[host_split].num_examples
    else:  # No stored split metadata (e.g. mocked data): count the records once.
        num = _count_records(tf, probe)
    image_size = config.data.image_size

    def records(epoch_seed: int | None, shuffle_seed: int | None) -> Any:
        read_config = tfds.ReadConfig(
            shuffle_seed=epoch_seed, try_autocache=False, options=_tf_options(tf)
        )
        ds = builder.as_dataset(
            split=host_split,
            shuffle_files=epoch_seed is not None,
            read_config=read_config,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        ds = ds.map(lambda ex: ex["image"])
        if shuffle_seed is not None:
            ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.with_options(_tf_options(tf))

    def decode(encoded: Any) -> Any:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image = _tf_square_resize(tf, image, image_size)
        return {"image": image, "label": tf.constant(0, tf.int32)}

    if num < 1:
        raise DatasetUnavailableError(f"Host {process_index} got no examples of {name!r}.")
    return _StreamSource(num_examples=num, records=records, decode=decode)


def _stream_source(
    config: Any, split: str, process_index: int, process_count: int
) -> _StreamSource:
    _check_rgb(config)
    shuffle_buffer = int(config.data.get("shuffle_buffer", DEFAULT_SHUFFLE_BUFFER))
    if config.data.name == "celeb_a_hq":
        return _tfds_stream_source(config, split, process_index, process_count, shuffle_buffer)
    return _tfrecord_source(config, split, process_index, process_count, shuffle_buffer)


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


def _stream_batches(
    source: _StreamSource,
    *,
    seed: int,
    start_step: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    random_flip: bool,
) -> Iterator[Batch]:
    """Host batches for steps start_step, ... of a streamed dataset (module docstring)."""
    tf = _import_tf()
    host_batch = global_batch_size // process_count
    epoch, offset = divmod(start_step * host_batch, source.num_examples)

    def epoch_chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        e, skip = epoch, offset
        while True:
            ds = source.records(
                derive_seed(_FILE_ORDER_STREAM, seed, e),
                derive_seed(_SHUFFLE_STREAM, seed, e, process_index),
            )
            ds = ds.skip(skip).map(
                source.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
            )
            ds = ds.batch(host_batch).prefetch(1).with_options(_tf_options(tf))
            for chunk in ds.as_numpy_iterator():
                yield chunk["image"], chunk["label"]
            e, skip = e + 1, 0

    steps = itertools.count(start_step)
    for (images, labels), step in zip(_rechunk(epoch_chunks(), host_batch), steps, strict=False):
        yield _finish_batch(
            images,
            labels,
            seed=seed,
            step=step,
            global_batch_size=global_batch_size,
            process_index=process_index,
            random_flip=random_flip,
        )


# ---------------------------------------------------------------------------------------------
# Prefetching.
# ---------------------------------------------------------------------------------------------


_END = object()


def _produce(make: Callable[[], Iterator[Any]], out: queue.Queue, stop: threading.Event) -> None:
    """Thread body: puts items of `make()` into `out` until exhausted, failed or stopped."""
    item: Any = _END
    it = None
    try:
        it = make()
        for value in it:
            while not stop.is_set():
                try:
                    out.put((True, value), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer.
        item = e
    finally:
        if it is not None and hasattr(it, "close"):
            it.close()
    while not stop.is_set():
        try:
            out.put((False, item), timeout=0.1)
            return
        except queue.Full:
            continue


class PrefetchIterator(Iterator[Any]):
    """Runs an iterator in a daemon thread, keeping up to `buffer_size` items ready.

    Exceptions raised in the thread are re-raised by `__next__`. `close()` (also called on
    garbage collection and by `with`) stops the thread; being a daemon, it never blocks
    interpreter exit.
    """

    def __init__(self, make: Callable[[], Iterator[Any]], buffer_size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, buffer_size))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=_produce,
            args=(make, self._queue, self._stop),
            daemon=True,
            name="input_pipeline_prefetch",
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._stop.set)

    def __iter__(self) -> PrefetchIterator:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        while True:
            try:
                ok, value = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise StopIteration from None
        if ok:
            return value
        self._done = True
        if value is _END:
            raise StopIteration
        raise value

    def close(self) -> None:
        """Stops the background thread (idempotent)."""
        self._done = True
        self._stop.set()

    def __enter__(self) -> PrefetchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


def create_train_iterator(
    config: Any, *, start_step: int = 0, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
    """Training batches of this host for steps start_step, start_step + 1, ... (endless).

    Each batch is ``{'image': float32 [B_host, H, W, C] in [-1, 1] (NHWC; [B_host, 2] for
    swissroll), 'label': int32 [B_host]}`` with ``B_host = config.training.batch_size //
    process_count``; deterministic given ``config.seed`` and identical for step ``s`` whatever
    `start_step` was (see the module docstring). Data loading and checks happen here, so a
    missing dataset raises `DatasetUnavailableError` immediately. The returned iterator has a
    ``close()`` method when prefetching (``config.data.prefetch > 0``).
    """
    name = validate_dataset_name(config.data.name)
    _check_process(process_index, process_count)
    global_batch = int(config.training.batch_size)
    host_batch_size(global_batch, process_count)
    start_step = int(start_step)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    seed = int(config.seed)
    random_flip = bool(config.data.random_flip) and name != "swissroll"
    common = dict(
        seed=seed,
        start_step=start_step,
        global_batch_size=global_batch,
        process_index=process_index,
        process_count=process_count,
        random_flip=random_flip,
    )
    split = config.data.get("train_split", "train")
    if name in IN_MEMORY_DATASETS:
        images, labels = load_arrays(config, split)
        make = lambda: _in_memory_batches(images, labels, **common)
    else:
        source = _stream_source(config, split, process_index, process_count)
        make = lambda: _stream_batches(source, **common)
    prefetch = int(config.data.get("prefetch", 2))
    return PrefetchIterator(make, prefetch) if prefetch > 0 else make()


def create_eval_arrays(
    config: Any,
    split: str,
    num_examples: int | None,
    *,
    batch_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Unflipped, unshuffled evaluation batches of this host, in the split's stored order.

    Takes the first `num_examples` examples of `split` (all when None or <= 0, or when the
    split is smaller); host ``h`` gets the even contiguous slice ``h`` of them. Yields
    ``{'image': uint8 [b, H, W, C] in [0, 255] (NHWC; float32 [b, 2] for swissroll),
    'label': int32 [b]}`` with ``b = batch_size`` (default ``config.eval.batch_size //
    process_count``), the last batch possibly smaller. Use the test split for bits/dim and the
    train split for FID reference statistics.
    """
    name = validate_dataset_name(config.data.name)
    _check_process(process_index, process_count)
    if batch_size is None:
        ev = config.get("eval", None)
        batch_size = max(1, int(ev.batch_size if ev is not None else 256) // process_count)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    limit = int(num_examples) if num_examples is not None and num_examples > 0 else None
    if name in IN_MEMORY_DATASETS:
        images, labels = load_arrays(config, split)
        n = len(images) if limit is None else min(limit, len(images))
        lo, hi = _even_slice(n, process_index, process_count)
        return _array_batches(images[lo:hi], labels[lo:hi], batch_size)
    return _stream_eval_batches(config, split, limit, batch_size, process_index, process_count)


def _array_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[Batch]:
    for i in range(0, len(images), batch_size):
        yield {"image": images[i : i + batch_size], "label": labels[i : i + batch_size]}


def _stream_eval_batches(
    config: Any,
    split: str,
    limit: int | None,
    batch_size: int,
    process_index: int,
    process_count: int,
) -> Iterator[Batch]:
    tf = _import_tf()
    source = _stream_source(config, split, 0, 1)  # Whole split, stored order.
    n = source.num_examples if limit is None else min(limit, source.num_examples)
    lo, hi = _even_slice(n, process_index, process_count)
    ds = source.records(None, None).take(hi).skip(lo)
    ds = ds.map(source.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).prefetch(1).with_options(_tf_options(tf))

    def gen() -> Iterator[Batch]:
        for chunk in ds.as_numpy_iterator():
            yield {"image": chunk["image"], "label": chunk["label"].astype(np.int32)}

    return gen()


# ---------------------------------------------------------------------------------------------
# Command line: preparing datasets.
# ---------------------------------------------------------------------------------------------


def prepare_tfds(name: str, data_dir: str, manual_dir: str = "") -> str:
    """Downloads and prepares tfds dataset `name` into `data_dir`; returns its folder."""
    tfds = _import_tfds()
    builder = _tfds_builder(name, data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    builder.download_and_prepare(download_config=download_config)
    return str(builder.data_dir)


def write_image_tfrecords(
    image_paths: list[str],
    output_prefix: str,
    *,
    image_size: int = 256,
    num_shards: int = 16,
) -> list[str]:
    """Writes centre-cropped, resized RGB PNGs as TFRecords ``{prefix}-NNNNN-of-MMMMM``.

    Each record is a `tf.train.Example` with the encoded image under the 'image' bytes
    feature: the layout the LSUN path reads.
    """
    import io

    from PIL import Image

    tf = _import_tf()
    num_shards = max(1, min(num_shards, len(image_paths)))
    outputs = [f"{output_prefix}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(p) for p in outputs]
    try:
        for i, path in enumerate(image_paths):
            with Image.open(path) as img:
                img = img.convert("RGB")
                w, h = img.size
                side = min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                img = img.crop((left, top, left + side, top + side)).resize(
                    (image_size, image_size), Image.BICUBIC
                )
                buf = io.BytesIO()
                img.save(buf, format="PNG")
            value = tf.train.BytesList(value=[buf.getvalue()])
            feature = {"image": tf.train.Feature(bytes_list=value)}
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writers[i % num_shards].write(example.SerializeToString())
    finally:
        for w in writers:
            w.close()
    return outputs


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_jax.input_pipeline --prepare NAME --data_dir DIR [...]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", required=True, choices=DATASETS)
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--manual_dir", default="", help="celeb_a_hq: folder of the tar files")
    parser.add_argument("--source_dir", default="", help="LSUN: folder of exported images")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--num_shards", type=int, default=16)
    args = parser.parse_args(argv)
    name = args.prepare
    if name in TFDS_NAMES:
        print(f"Prepared {name} in {prepare_tfds(name, args.data_dir, args.manual_dir)}")
        return 0
    if name in LSUN_DATASETS:
        if not args.source_dir or not args.data_dir:
            print(preparation_instructions(name, args.data_dir), file=sys.stderr)
            return 2
        exts = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
        paths = sorted(
            os.path.join(root, f)
            for root, _, files in os.walk(args.source_dir)
            for f in files
            if f.lower().endswith(exts)
        )
        if not paths:
            print(f"No images found under {args.source_dir}.", file=sys.stderr)
            return 2
        os.makedirs(args.data_dir, exist_ok=True)
        prefix = os.path.join(args.data_dir, f"{name}-{args.split}.tfrecord")
        out = write_image_tfrecords(
            paths, prefix, image_size=args.image_size, num_shards=args.num_shards
        )
        print(f"Wrote {len(paths)} images to {len(out)} files {prefix}-*")
        return 0
    print(preparation_instructions(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
