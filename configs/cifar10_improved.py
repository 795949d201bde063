"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021, §3): cosine schedule with
T = 4000, learned-range variances trained with L_hybrid, importance-sampled timesteps, and the
IDDPM CIFAR-10 model (3 residual blocks, attention at 16 and 8, dropout 0.3, lr 1e-4)."""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 4000
    config.diffusion.model_var_type = "learned_range"
    config.diffusion.loss_type = "hybrid"
    config.diffusion.timestep_sampler = "loss_aware"

    config.model.num_res_blocks = 3
    config.model.attn_resolutions = (16, 8)
    config.model.dropout = 0.3

    config.training.learning_rate = 1e-4
    config.training.num_train_steps = 500_000

    config.sampling.respacing = "100"  # ~100 steps reach near full-chain FID (IDDPM §4.3)
    return config
