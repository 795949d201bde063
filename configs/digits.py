"""The embedded offline default: scikit-learn's 8x8 handwritten digits (bundled with the
package, no download) at their native 8x8 resolution, with a small U-Net that draws
recognisable digits after about three minutes of training on 2 CPU cores. The diffusion is
the paper's (T = 1000, linear betas)."""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric
    config.data.num_classes = 10

    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.num_groups = 8
    config.model.dropout = 0.0

    config.training.batch_size = 64
    config.training.num_train_steps = 1500
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.995
    config.training.log_every = 100
    config.training.sample_every = 500
    config.training.checkpoint_every = 500
    config.training.keep_every = 1000

    config.sampling.preview_respacing = "100"
    config.sampling.preview_num = 64
    # Evaluation sized for a CPU: the full 1000-step chain costs 1000 network calls per image,
    # for bits/dim and for every sample alike.
    config.eval.num_samples = 1000  # FID/IS samples (only with the Inception weights)
    config.eval.bpd_num_examples = 64
    config.eval.batch_size = 64
    config.eval.grid_num = 36
    config.eval.progressive_rows = 6
    config.eval.interpolation_t = 200  # 8x8 digits keep little of x_0 at t = 500
    config.eval.interpolation_lambdas = 9
    return config
