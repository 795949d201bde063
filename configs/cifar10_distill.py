"""Progressive distillation of DDPM CIFAR-10 (`configs/cifar10.py`), Salimans & Ho 2022's
CIFAR-10 recipe: the teacher's DDIM sampler starts at 1024 steps and 8 rounds of 50k updates
(batch 128, Adam 5e-5 decayed linearly to 0 over each round, no EMA, no dropout, gradient
clipping 1) halve it down to 4 steps. The eps teacher is first fine-tuned into a v predictor
on the data for one round (diffusion_jax/training/distill.py):

    python -m diffusion_jax.main --mode distill --config configs/cifar10_distill.py \\
        --workdir gs://BUCKET/cifar10_distill --config.distill.teacher_workdir=gs://BUCKET/cifar10

Every round's last student is kept: `--mode sample --config.sampling.num_steps=8
--config.sampling.checkpoint_step=...` draws from the 8-step one. The paper's FIDs: 2.57
(8 steps), 3.00 (4), 4.51 (2), 9.12 (1; `--config.distill.end_steps=1` for 2 more rounds).
"""

import ml_collections

from configs import cifar10


def get_config():
    config = cifar10.get_config()
    config.diffusion.model_output = "v"  # the student's output; the teacher predicts eps

    d = config.distill
    d.teacher_workdir = "gs://BUCKET/cifar10"  # the trained teacher: override on the command line
    d.teacher_output = "eps"
    d.start_steps = 1024
    d.end_steps = ml_collections.FieldReference(4)
    d.steps_per_round = 50_000

    config.model.dropout = 0.0
    config.training.num_train_steps = 0  # all rounds: 9 x 50k
    config.training.batch_size = 128
    config.training.learning_rate = 5e-5
    config.training.warmup_steps = 0
    config.training.ema_decay = 0.0
    config.training.grad_clip = 1.0

    config.sampling.method = "ddim"
    config.sampling.spacing = "trailing"
    config.sampling.num_steps = d.get_ref("end_steps")
    return config
