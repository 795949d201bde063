"""Where the examples come from: the in-memory arrays (digits, swiss roll, tfds cifar10) and
the streamed sources (tfds celeb_a_hq here, LSUN TFRecords in `tfrecords`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_jax.input_pipeline import tfrecords
from diffusion_jax.input_pipeline.datasets import (
    TFDS_NAMES,
    DatasetUnavailableError,
    check_rgb,
    preparation_instructions,
    validate_dataset_name,
)
from diffusion_jax.input_pipeline.tf_data import (
    StreamSource,
    count_records,
    import_tf,
    import_tfds,
    tf_options,
    tf_square_resize,
)
from diffusion_jax.runtime import errors

SWISSROLL_NUM_EXAMPLES = 10_000
SWISSROLL_NOISE = 0.5


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
        raise errors.ConfigError(f"data.channels={channels} must be 1 or 3 for digits.")
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


def reference_points(config: Any, num: int = 2000) -> np.ndarray | None:
    """Data points drawn under 2-D samples in their scatter plots; None for images."""
    return make_swissroll()[:num] if config.data.name == "swissroll" else None


def tfds_builder(name: str, data_dir: str) -> Any:
    tfds = import_tfds()
    return tfds.builder(TFDS_NAMES[name], data_dir=data_dir or None)


def tfds_as_dataset(builder: Any, name: str, data_dir: str, **kwargs: Any) -> Any:
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


def _load_tfds_arrays(
    name: str, data_dir: str, split: str, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A whole tfds split as uint8 [N, S, S, 3] and int32 [N] in the split's stored order."""
    tfds = import_tfds()
    tf = import_tf()
    builder = tfds_builder(name, data_dir)
    ds = tfds_as_dataset(builder, name, data_dir, split=split, shuffle_files=False)
    ds = ds.map(
        lambda ex: {
            "image": tf_square_resize(tf, ex["image"], image_size),
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
        check_rgb(config)
        return _load_tfds_arrays(name, config.data.data_dir, split, config.data.image_size)
    raise ValueError(f"data.name={name!r} is streamed, not loaded into memory.")


def tfds_stream_source(
    config: Any, split: str, process_index: int, process_count: int, shuffle_buffer: int
) -> StreamSource:
    """Host shard (`tfds.split_for_jax_process`: an even contiguous slice) of a tfds split,
    read with the image undecoded so shuffling and resume-skipping stay cheap."""
    tf = import_tf()
    tfds = import_tfds()
    name, data_dir = config.data.name, config.data.data_dir
    builder = tfds_builder(name, data_dir)
    host_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count
    )
    probe = tfds_as_dataset(builder, name, data_dir, split=host_split)  # Availability check.
    if builder.info.splits:
        num = builder.info.splits[host_split].num_examples
    else:  # No stored split metadata (e.g. mocked data): count the records once.
        num = count_records(tf, probe)
    image_size = config.data.image_size

    def records(epoch_seed: int | None, shuffle_seed: int | None) -> Any:
        read_config = tfds.ReadConfig(
            shuffle_seed=epoch_seed, try_autocache=False, options=tf_options(tf)
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
        return ds.with_options(tf_options(tf))

    def decode(encoded: Any) -> Any:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image = tf_square_resize(tf, image, image_size)
        return {"image": image, "label": tf.constant(0, tf.int32)}

    if num < 1:
        raise DatasetUnavailableError(f"Host {process_index} got no examples of {name!r}.")
    return StreamSource(num_examples=num, records=records, decode=decode)


def stream_source(config: Any, split: str, process_index: int, process_count: int) -> StreamSource:
    """This host's shard of a streamed split: celeb_a_hq from tfds, LSUN from TFRecords."""
    check_rgb(config)
    shuffle_buffer = int(config.data.shuffle_buffer)
    if config.data.name == "celeb_a_hq":
        return tfds_stream_source(config, split, process_index, process_count, shuffle_buffer)
    return tfrecords.tfrecord_source(config, split, process_index, process_count, shuffle_buffer)
