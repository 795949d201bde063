"""DDPM LSUN Cat 256x256 (the official DDPM code's run script): the 256x256 U-Net,
batch 64, lr 2e-5, no dropout, no flips, 1,800,000 steps. Data: TFRecord files of 256x256
crops under data.data_dir (see `python -m diffusion_jax.input_pipeline --prepare lsun_cat`)."""

from configs.celebahq256 import get_lsun_like_config


def get_config():
    return get_lsun_like_config("lsun_cat", 1_800_000, random_flip=False)
