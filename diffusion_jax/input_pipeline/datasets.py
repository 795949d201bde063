"""The supported datasets: their names, shapes, checks, and how to prepare the ones that need
preparing (`preparation_instructions`, quoted by every `DatasetUnavailableError`)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from diffusion_jax.runtime import errors

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
Batch = dict[str, np.ndarray]


class DatasetUnavailableError(errors.UserError):
    """The requested dataset is not prepared locally; the message says how to prepare it."""


def validate_dataset_name(name: str) -> str:
    """Returns `name` if it is a supported `data.name`, else raises ValueError."""
    if name not in DATASETS:
        raise errors.ConfigError(
            f"Unknown data.name={name!r}; allowed values: {', '.join(DATASETS)}."
        )
    return name


def check_rgb(config: Any) -> None:
    """Raises unless `config.data.channels` is 3 (the RGB datasets)."""
    if config.data.channels != 3:
        raise errors.ConfigError(
            f"data.channels={config.data.channels} but {config.data.name} images have 3 channels."
        )


def data_shape(config: Any) -> tuple[int, ...]:
    """The shape of one example: (H, W, C) images, or (2,) points for the swiss roll."""
    if config.data.name == "swissroll":
        return (2,)
    return (config.data.image_size, config.data.image_size, config.data.channels)


def is_image_data(config: Any) -> bool:
    """True for image datasets (examples [H, W, C]), False for the swiss roll's points."""
    return len(data_shape(config)) == 3


def lsun_pattern(config_pattern: str, name: str) -> str:
    """`data.tfrecord_pattern`, or the default `<name>-{split}.tfrecord*` when empty."""
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
        pattern = lsun_pattern(tfrecord_pattern, name)
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
