"""The embedded offline default: scikit-learn's 8x8 handwritten digits (bundled with the
package, no download) at their native 8x8 resolution, with a small U-Net (701k parameters)
that draws digits close to real ones after about five minutes of training on 2 CPU cores.

What departs from the paper's CIFAR-10 recipe, and why (two-sample classifier accuracy of
800 samples against the real digits; 0.5 = indistinguishable, real vs real 0.48-0.52):

* the IDDPM cosine noise schedule (T = 1000) instead of linear betas: at 8x8 the linear
  schedule destroys the digits within the first third of the chain (IDDPM §3.2). With 3000
  steps of batch 64, linear gives 0.54 / 0.65 / 0.57 (logistic regression / random forest /
  MLP, 5-fold CV, the 1000-step chain), cosine 0.53 / 0.57 / 0.52;
* 3000 steps of batch 48 with Adam 2e-3 (warmup 200) and EMA 0.999. Batch 48 because XLA:CPU
  runs it at ~70 ms a step on a 2-core machine against ~130 ms for batch 64 (a cliff between
  48 and 56; BENCHMARKS.md, "The quick start's recipe"): 3000 x 48 reaches the logistic
  two-sample test of 4000 x 48 and of 3000 x 64 within its noise (0.530, 0.519, 0.529 with the
  sampler below), where 2000 x 64 falls short (0.590);
* samples are stored on the data's 17 grey levels (`data.levels`, scikit-learn's counts
  0..16), as the data are: with 256 levels a random forest tells any sample by its pixel
  values alone (1.00);
* the default sampler is SDE-DPM-Solver++(2M) at 20 network calls on quadratic time steps
  ending at sigma = 0: on this model it is told from real digits as rarely as the paper's
  1000-step chain (0.509 against 0.504, BENCHMARKS.md "Stochastic samplers at 20 NFE") at
  1/50 of the cost. The chain is one flag away: `--config.sampling.method=ancestral
  --config.sampling.num_steps=0`.

The paper's diffusion is one flag away: `--config.diffusion.schedule=linear`.
"""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric
    config.data.levels = 17  # scikit-learn's pixel counts 0..16

    config.diffusion.schedule = "cosine"  # the paper's: "linear" (see the docstring)

    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.num_groups = 8
    config.model.dropout = 0.0
    config.model.dtype = "float32"  # XLA:CPU runs bfloat16 convolutions ~3x slower

    config.training.batch_size = 48
    config.training.num_train_steps = 3000
    config.training.learning_rate = 2e-3
    config.training.warmup_steps = 200
    config.training.ema_decay = 0.999
    config.training.log_every = 250
    config.training.sample_every = 1000
    config.training.checkpoint_every = 1000
    config.training.keep_every = 2000
    config.training.final_samples = 256

    # SDE-DPM-Solver++(2M), 20 NFE, quadratic in sqrt(t), last step to sigma = 0 (docstring)
    config.sampling.method = "sde_dpm_solver++"
    config.sampling.num_steps = 20
    config.sampling.spacing = "quadratic"

    config.sampling.preview_respacing = "100"
    config.sampling.preview_num = 64
    config.sampling.grid_num = 36
    # Evaluation sized for a CPU: bits/dim costs 1000 network calls per image.
    # FID needs the Inception weights (absent offline); 'quality' scores digits without them.
    config.eval.evaluators = ("bpd", "ode_bpd", "samples", "interpolation", "quality", "fid")
    for name in ("bpd", "ode_bpd"):
        config.evals[name].num_examples = 64
        config.evals[name].batch_size = 64
    config.evals.samples.grid_num = 36
    config.evals.samples.progressive_rows = 6
    config.evals.interpolation.timestep = 200  # 8x8 digits keep little of x_0 at t = 500
    config.evals.interpolation.lambdas = 9
    config.evals.quality.num_samples = 1000  # the same samples as FID/IS
    config.evals.fid.num_samples = 1000
    config.evals.fid.batch_size = 64
    return config
