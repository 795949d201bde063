"""Preparing datasets (on a machine with internet access, or with the manual downloads):

    python -m diffusion_jax.input_pipeline --prepare NAME --data_dir DIR [--manual_dir DIR]
        [--source_dir IMAGES] [--split train] [--image_size 256] [--num_shards 16]

tfds datasets (cifar10, celeb_a_hq) are built with tfds; LSUN TFRecords are written from a
folder of exported images (`tfrecords.write_image_tfrecords`); the others need nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

from diffusion_jax.input_pipeline.datasets import (
    DATASETS,
    LSUN_DATASETS,
    TFDS_NAMES,
    preparation_instructions,
)
from diffusion_jax.input_pipeline.sources import tfds_builder
from diffusion_jax.input_pipeline.tf_data import import_tfds
from diffusion_jax.input_pipeline.tfrecords import write_image_tfrecords


def prepare_tfds(name: str, data_dir: str, manual_dir: str = "") -> str:
    """Downloads and prepares tfds dataset `name` into `data_dir`; returns its folder."""
    tfds = import_tfds()
    builder = tfds_builder(name, data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    builder.download_and_prepare(download_config=download_config)
    return str(builder.data_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_jax.input_pipeline --prepare NAME --data_dir DIR [...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_jax.input_pipeline", description=__doc__.splitlines()[0]
    )
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
