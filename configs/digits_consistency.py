"""Consistency tuning (ECT) of the quick-start model (`configs/digits.py`, trained in
/tmp/diffusion_digits by the README's first command) into a one/two-step sampler, in 10-20
minutes on 2 CPU cores:

    python -m diffusion_jax.main --mode consistency --config configs/digits_consistency.py \\
        --workdir /tmp/digits_consistency [--config.consistency.method=distillation] \\
        [--config.consistency.teacher_workdir DIR]

The student starts from the teacher's EMA weights and predicts v (an eps output cannot make
one step from t = 1, where alpha ~ 1e-4 on the cosine schedule: `diffusion/consistency.py`);
stage 0 of 6 (500 updates) is plain denoising, which turns the eps network into a v network,
and each later stage halves the gap s - r between the two points of a training pair. It
samples with `sampling.method="consistency"` at 2 steps (`--config.sampling.num_steps=1` for
one step), so `--mode sample` and `--mode eval` on the workdir draw 2-step samples. README
"Consistency models" compares distillation, tuning and progressive distillation at 1, 2 and 4
steps.
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.diffusion.model_output = "v"  # the student's output; the teacher predicts eps

    c = config.consistency
    c.method = "tuning"  # on the digits it beats distillation (README "Consistency models")
    c.teacher_workdir = "/tmp/diffusion_digits"
    c.teacher_output = "eps"
    c.teacher_solver = "ddim"
    c.target_decay = 0.0
    c.num_stages = 6

    config.training.num_train_steps = 3000
    config.training.learning_rate = 5e-4
    config.training.warmup_steps = 0
    config.training.ema_decay = 0.995
    config.training.log_every = 250
    config.training.sample_every = 500
    config.training.checkpoint_every = 500

    config.sampling.method = "consistency"
    config.sampling.num_steps = 2
    # re-noise at t = 1/2: of four spacings the best at 2 steps for both students (two-sample
    # test, tuning 0.540, distillation 0.596; logsnr 0.625, 0.645; BENCHMARKS.md)
    config.sampling.spacing = "uniform"
    return config
