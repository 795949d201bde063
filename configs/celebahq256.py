"""DDPM CelebA-HQ 256x256 (the official DDPM code's run script): the 256x256 U-Net
(113,673,219 parameters), batch 64, lr 2e-5, no dropout, random flips, 0.5M steps.
Data: tfds `celeb_a_hq/256` (manual download; see the error message for instructions)."""

from configs.base import get_base_config


def get_lsun_like_config(name: str, num_train_steps: int, random_flip: bool = True):
    config = get_base_config()
    config.data.name = name
    config.data.image_size = 256
    config.data.random_flip = random_flip
    config.data.eval_split = "train"  # no test split is used for these datasets

    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0

    config.training.batch_size = 64
    config.training.learning_rate = 2e-5  # 2e-4 was unstable at 256x256
    config.training.num_train_steps = num_train_steps

    config.sampling.batch_size = 128
    for name in ("bpd", "ode_bpd", "fid"):
        config.evals[name].batch_size = 64
    return config


def get_config():
    return get_lsun_like_config("celeb_a_hq", 500_000)
