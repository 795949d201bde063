"""TensorFlow, imported lazily and hidden from the accelerators (JAX owns them), and the
tf.data pieces the tfds and TFRecord streams share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


def import_tf() -> Any:
    """Imports TensorFlow lazily and hides the accelerators from it (JAX owns them)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # Already initialised: visibility can no longer change.
        pass
    return tf


def import_tfds() -> Any:
    import_tf()
    import tensorflow_datasets as tfds

    return tfds


def tf_options(tf: Any) -> Any:
    options = tf.data.Options()
    options.deterministic = True
    return options


def tf_square_resize(tf: Any, image: Any, size: int) -> Any:
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


def count_records(tf: Any, ds: Any) -> int:
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())


@dataclasses.dataclass(frozen=True)
class StreamSource:
    """A host's shard of a streamed dataset.

    num_examples: records in this host's shard (one epoch).
    records: (epoch_seed, shuffle_seed) -> tf.data.Dataset of undecoded records of one epoch of
      this host's shard; (None, None) gives the stored order, unshuffled.
    decode: record -> {'image': uint8 [S, S, 3], 'label': int32 []} (tf functions).
    """

    num_examples: int
    records: Callable[[int | None, int | None], Any]
    decode: Callable[[Any], Any]
