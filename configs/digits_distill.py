"""Progressive distillation of the quickstart model (`configs/digits.py`, trained in
/tmp/diffusion_digits by the README's first command) down to a 4-step sampler, in minutes on
2 CPU cores:

    python -m diffusion_jax.main --mode distill --config configs/digits_distill.py \\
        --workdir /tmp/digits_distill [--config.distill.teacher_workdir DIR]

Round 0 fine-tunes the eps teacher into a v predictor on the data; rounds 1-4 halve its DDIM
steps 64 -> 32 -> 16 -> 8 -> 4 (diffusion_jax/training/distill.py). The student samples with DDIM on
its own grid (`sampling.spacing="trailing"`), so `--mode sample` and `--mode eval` on the
workdir draw 4-step samples; `--config.sampling.num_steps=8 --config.sampling.checkpoint_step=
...` samples an earlier round's student from its last checkpoint (every round's is kept).
"""

import ml_collections

from configs import digits


def get_config():
    config = digits.get_config()
    config.diffusion.model_output = "v"  # the student's output; the teacher predicts eps

    d = config.distill
    d.teacher_workdir = "/tmp/diffusion_digits"
    d.teacher_output = "eps"
    d.start_steps = 64
    d.end_steps = ml_collections.FieldReference(4)
    d.steps_per_round = 600

    config.model.dropout = 0.0  # the paper's students have none
    config.training.num_train_steps = 0  # all rounds: 5 x 600
    config.training.batch_size = 64  # the measured recipe (BENCHMARKS.md)
    config.training.learning_rate = 2e-4
    config.training.warmup_steps = 0
    config.training.ema_decay = 0.0  # the paper's: each round's student is its last update
    config.training.log_every = 200
    config.training.sample_every = 600
    config.training.checkpoint_every = 600

    config.sampling.method = "ddim"
    config.sampling.spacing = "trailing"
    config.sampling.num_steps = d.get_ref("end_steps")
    return config
