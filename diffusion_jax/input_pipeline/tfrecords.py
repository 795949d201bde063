"""LSUN-style TFRecord files: finding them, sniffing the record layout from the first record,
decoding, this host's shard, and writing them from a folder of images."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from diffusion_jax.input_pipeline.batches import FILE_ORDER_STREAM
from diffusion_jax.input_pipeline.datasets import (
    DatasetUnavailableError,
    lsun_pattern,
    preparation_instructions,
)
from diffusion_jax.input_pipeline.tf_data import (
    StreamSource,
    count_records,
    import_tf,
    tf_options,
    tf_square_resize,
)
from diffusion_jax.runtime import errors

_ENCODED_IMAGE_KEYS = ("image", "image/encoded", "image_raw", "img", "jpeg")
_LABEL_KEYS = ("label", "image/class/label")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM")


def _resolve_pattern(config: Any, split: str) -> str:
    name = config.data.name
    pattern = lsun_pattern(config.data.tfrecord_pattern, name).replace("{split}", split)
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
    """Builds the record parser for the layout of `first` (see the package docstring)."""
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
        raise errors.InputError(
            f"Unrecognised TFRecord layout (features {sorted(keys)}); expected an encoded image "
            f"under one of {_ENCODED_IMAGE_KEYS}, or raw uint8 'data' + int64[3] 'shape', or raw "
            "'image_raw'/'data' + 'height' + 'width'."
        )

    def decode(record: Any) -> Any:
        parsed = tf.io.parse_single_example(record, spec)
        image = tf_square_resize(tf, to_image(parsed), image_size)
        label = tf.cast(parsed[label_key], tf.int32) if label_key else tf.constant(0, tf.int32)
        return {"image": image, "label": label}

    return decode


def _to_rgb(tf: Any, x: Any) -> Any:
    """uint8 [H, W, 1 or 3] -> [H, W, 3] with a static channel count."""
    x = tf.cond(tf.equal(tf.shape(x)[-1], 1), lambda: tf.tile(x, [1, 1, 3]), lambda: x)
    return tf.ensure_shape(x, [None, None, 3])


def tfrecord_source(
    config: Any, split: str, process_index: int, process_count: int, shuffle_buffer: int
) -> StreamSource:
    """Host shard of the LSUN-style TFRecord files (whole files when they divide evenly)."""
    tf = import_tf()
    files = _tfrecord_files(config, split)
    decode = _make_tfrecord_decoder(tf, _first_record(tf, files), config.data.image_size)
    by_file = len(files) % process_count == 0
    host_files = files[process_index::process_count] if by_file else files

    def records(epoch_seed: int | None, shuffle_seed: int | None) -> Any:
        order, parallel = list(host_files), None  # Stored order: files read one after another.
        if epoch_seed is not None:
            perm = np.random.default_rng([FILE_ORDER_STREAM, epoch_seed]).permutation(len(order))
            order, parallel = [order[i] for i in perm], min(4, len(order))
        ds = tf.data.TFRecordDataset(order, num_parallel_reads=parallel)
        if not by_file:
            ds = ds.shard(process_count, process_index)
        if shuffle_seed is not None:
            ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.with_options(tf_options(tf))

    num = count_records(tf, records(None, None))
    if num == 0:
        raise DatasetUnavailableError(
            f"Host {process_index} of {process_count} got no records of {config.data.name!r} "
            f"from {len(files)} file(s) matching {_resolve_pattern(config, split)!r}."
        )
    return StreamSource(num_examples=num, records=records, decode=decode)


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

    tf = import_tf()
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
