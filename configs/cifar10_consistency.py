"""Consistency tuning of DDPM CIFAR-10 (`configs/cifar10.py`) into a one/two-step sampler: ECT's
CIFAR-10 recipe (Geng et al. 2024) adapted to the DDPM U-Net (35.7M parameters, the linear
schedule, EDM noise levels s from 0.01 at t = 1/T to 157 at t = 1):

    python -m diffusion_jax.main --mode consistency --config configs/cifar10_consistency.py \\
        --workdir gs://BUCKET/cifar10_consistency \\
        --config.consistency.teacher_workdir=gs://BUCKET/cifar10

What is ECT's: batch 128, learning rate 1e-4, dropout 0.2, the lognormal of s (P_mean -1.1,
P_std 2.0), the mapping r = s (1 - n(s) / q^stage) with n(s) = 1 + 8 sigmoid(-s), the online
network as its own target under stop-gradient with one dropout mask for both passes, and the
student's EMA for sampling. What differs: Adam (the project's optimiser) for RAdam; the DDPM
U-Net predicting v from the eps teacher's weights (ECT starts from an EDM network with its
own preconditioning), with stage 0 of 8 (plain denoising, `diffusion/consistency.py`)
turning it into one; q = 2 over 8 equal stages; iCT's pseudo-Huber distance (c = 0.00054
sqrt(3072) = 0.03) and 1 / (s - r) weighting for ECT's L2 norm and 1 / s^2 + 1 / sigma_data^2.
`--config.consistency.method=distillation` distils the teacher's DDIM step instead (CM's CD;
the digits' comparison is in README).

It samples in one step (`sampling.num_steps=1`); `--config.sampling.num_steps=2` for two. Each
stage's last student is kept (a checkpoint every 25k updates), so the evaluation job scores
FID per stage (BENCHMARKS.md "Consistency models on the TPU").
"""

from configs import cifar10


def get_config():
    config = cifar10.get_config()
    config.diffusion.model_output = "v"  # the student's output; the teacher predicts eps

    c = config.consistency
    c.method = "tuning"
    c.teacher_workdir = "gs://BUCKET/cifar10"  # the trained teacher: override on the command line
    c.teacher_output = "eps"
    c.target_decay = 0.0
    c.num_stages = 8

    config.model.dropout = 0.2
    config.training.num_train_steps = 200_000
    config.training.batch_size = 128
    config.training.learning_rate = 1e-4
    config.training.warmup_steps = 0
    config.training.ema_decay = 0.9999
    config.training.checkpoint_every = 25_000

    config.sampling.method = "consistency"
    config.sampling.num_steps = 1
    config.sampling.spacing = "logsnr"
    return config
