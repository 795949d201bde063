"""The 2-D swiss roll of Sohl-Dickstein et al. 2015 with a small MLP denoiser: trains in
seconds on a CPU and shows the reverse process turning Gaussian noise into the roll."""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.data.name = "swissroll"
    config.data.channels = 2  # the data dimension
    config.data.random_flip = False

    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 100

    config.model.name = "mlp"
    config.model.hidden = 128
    config.model.depth = 3
    config.model.dropout = 0.0
    config.model.dtype = "float32"  # XLA:CPU runs bfloat16 convolutions ~3x slower

    config.training.batch_size = 256
    config.training.num_train_steps = 4000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.995
    config.training.log_every = 500
    config.training.sample_every = 2000
    config.training.checkpoint_every = 2000
    config.training.keep_every = 0
    config.training.final_samples = 2048

    config.sampling.preview_respacing = ""  # the full 100-step chain
    config.sampling.preview_num = 1024
    config.eval.evaluators = ("samples", "quality")  # bits/dim, FID, interpolation: images
    config.evals.quality.num_samples = 2048
    return config
